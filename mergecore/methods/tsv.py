"""TSV-Merge: keep each task's top singular triplets, decorrelate the stacked singular vectors."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch

from mergecore.methods._cost import Cost
from mergecore.methods._spectral import (gram_svd_flops, inv_sqrt_flops, inv_sqrt_gram, rtol, thin_svd,
                                         whitened_product, whitened_product_flops)
from mergecore.methods.base import (BaseTensor, Ends, Range, Tensors, merge_method, need_base, need_count,
                                    owns_inputs)

_PAPER = ("Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging "
          "(CVPR 2025, arXiv:2412.00081)")


def task_rank(shape: tuple[int, ...], n_models: int, fraction: float) -> int:
    """Triplets kept per task: int(fraction·min(m, n)), fraction 0 meaning 1/T (at least one)."""
    share = fraction if fraction > 0 else 1.0 / max(1, n_models)
    return max(1, int(min(shape) * share))


def mean_task_vector(tensors: Tensors, base: torch.Tensor) -> torch.Tensor:
    """(1/T) Σ τ_i, reading each input once (the fallback of every spectral merge's reference code)."""
    owned = owns_inputs(tensors)
    total = torch.zeros_like(base)
    for i in range(len(tensors)):
        x = tensors[i]
        total.add_(x.sub_(base) if owned else x - base)
    return total.div_(len(tensors))


def _tsv_cost(shape: tuple[int, ...], n_models: int, params: dict[str, Any]) -> Optional[Cost]:
    """Per matrix: one Gram eigh per task, then two p x p eighs (p = T·k; k x k for two tasks) to
    decorrelate U and V."""
    if len(shape) != 2:
        return None
    m, n = shape
    k = min(task_rank(shape, n_models, float(params.get("fraction", 0.0))), min(m, n))
    p = n_models * k
    small = min(m, n)
    two = n_models == 2
    flops = (n_models * gram_svd_flops(m, n, k) + inv_sqrt_flops(m, p, two) + inv_sqrt_flops(n, p, two)
             + whitened_product_flops(m, n, p))
    extra = 8 * (2 * m * n + (m + n) * p + 3 * p * p + 2 * small * small)
    whiten = (k, k) if two else (p, p)
    return Cost(flops=flops, extra_bytes=extra, svd=((small, small),) * n_models + (whiten,) * 2,
                note="tsv_m: per matrix one float64 Gram eigh per model and two to decorrelate U and V")


@merge_method(base="required", min_models=2, tags=("matrices", "streaming"), cost=_tsv_cost,
              summary="per matrix: each task's top singular vectors, decorrelated (whitened), summed",
              formula="θ = θ₀ + α·U⊥ Σ V⊥ᵀ,  U = [U₁,k … U_T,k], V likewise, X⊥ = polar(X), τᵢ ≈ Uᵢ,k Σᵢ,k Vᵢ,kᵀ",
              paper=_PAPER, grid={"alpha": (0.5, 1.0, 1.5, 2.0, 3.0)})
def tsv_m(tensors: Tensors, base: BaseTensor, *,
          alpha: Annotated[float, Range(0.0, None), Ends("0 = {base} only", "1 = the merged task vector"),
                           "scale of the merged task vector"] = 1.0,
          fraction: Annotated[float, Range(0.0, 1.0), Ends("0 = 1/T of each task's rank (the paper's)",
                                                           "1 = every singular vector"),
                              "share of each task vector's rank kept (0: 1/number of models)"] = 0.0
          ) -> torch.Tensor:
    """θ = θ0 + α·U⊥ diag(Σ) V⊥ᵀ for a 2-D weight (TSV-Merge).

    Gargiulo et al., CVPR 2025 (arXiv:2412.00081). Each task vector τ_i = θ_i − θ0 = U_i Σ_i V_iᵀ
    keeps its top k = int(fraction·min(m, n)) triplets, fraction 1/T by default as in the paper
    and in FusionBench (fusion_bench/method/task_singular_vector/utils/TSVM_utils.py,
    `compute_and_sum_svd_mem_reduction`: sv_reduction = 1/T); the kept U_i are concatenated into
    U = [U_1 … U_T] (m x T·k), likewise V and Σ; U and V are decorrelated by replacing each with
    its polar factor X⊥ = P Qᵀ (X = P S Qᵀ), and θ = θ0 + α·U⊥ Σ V⊥ᵀ. α = 1 is FusionBench's
    default (config/method/task_singular_vector/TaskSingularVectorMerging.yaml) and the paper's.
    Computed exactly from float64 Gram matrices (`_spectral`): Σ_i, V_i from eigh(τ_iᵀτ_i) and
    X⊥ = X (XᵀX)^(-1/2) (for two tasks from the k x k matrix U₁ᵀU₂, not the 2k x 2k Gram). Singular values at the float32 noise floor (a rank-deficient τ_i) are
    dropped rather than filled with arbitrary vectors, and the polar factor of dependent columns
    is the pseudo-inverse one; k is at least 1. Tensors that are not 2-D take the reference's
    fallback, the mean task vector: θ0 + α·(1/T) Σ_i τ_i. Reads each input once (streaming).
    """
    base = need_base("tsv_m", base)
    need_count("tsv_m", tensors, 2, None, "at least two fine-tuned models besides the base_model")
    if base.dim() != 2:
        return mean_task_vector(tensors, base).mul_(alpha).add_(base)
    m, n = base.shape
    k = task_rank(base.shape, len(tensors), fraction)
    owned = owns_inputs(tensors)
    us, ss, vs = [], [], []
    for i in range(len(tensors)):
        x = tensors[i]
        u, s, v = thin_svd(x.sub_(base) if owned else x - base, k)
        del x
        us.append(u), ss.append(s), vs.append(v)
    a, b, tol = torch.cat(us, 1), torch.cat(vs, 1), rtol(m, n)
    split = us[0].shape[1] if len(us) == 2 else None  # two tasks: the k x k form of the polar factors
    merged = whitened_product(a, inv_sqrt_gram(a, tol, split), torch.cat(ss), b, inv_sqrt_gram(b, tol, split))
    return merged.mul_(alpha).to(base.dtype).add_(base)
