"""Isotropic merging (Iso-C, Iso-CTS): flatten the spectrum of the merged task matrix."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch

from mergecore.methods._cost import Cost, matmul_flops
from mergecore.methods._spectral import (eigh_flops, gram_svd_flops, inv_sqrt_flops, inv_sqrt_gram, rtol,
                                         thin_svd, thin_svd_rest, whitened_product, whitened_product_flops)
from mergecore.methods.base import (BaseTensor, Ends, Range, Tensors, merge_method, need_base, need_count,
                                    owns_inputs)
from mergecore.methods.tsv import mean_task_vector

_PAPER = ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
          "Subspaces (ICML 2025, arXiv:2502.04959)")
Alpha = Annotated[float, Range(0.0, None), Ends("0 = {base} only", "1 = the isotropic task matrix"),
                  "scale of the merged task vector"]


def _iso_c_cost(shape: tuple[int, ...], n_models: int, params: dict[str, Any]) -> Optional[Cost]:
    """One float64 Gram eigh of the summed task matrix, then W = V Σ⁻¹ Vᵀ and X·W."""
    if len(shape) != 2:
        return None
    m, n = shape
    small, big = min(m, n), max(m, n)
    flops = matmul_flops(small, big, small) + eigh_flops(small) + matmul_flops(small, small, small) \
        + matmul_flops(big, small, small)
    return Cost(flops=flops, extra_bytes=8 * (2 * m * n + 3 * small * small), svd=((small, small),),
                note="iso_c: per matrix one float64 Gram eigh of Σ τᵢ")


@merge_method(base="required", min_models=2, tags=("matrices", "streaming"), cost=_iso_c_cost,
              summary="per matrix: Σ τᵢ with every singular value replaced by their mean (flat spectrum)",
              formula="θ = θ₀ + α·σ̄·U Vᵀ,  U Σ Vᵀ = Σᵢ τᵢ,  σ̄ = mean(Σ)", paper=_PAPER, grid={"alpha": (0.5, 1.0, 1.5, 2.0, 3.0)})
def iso_c(tensors: Tensors, base: BaseTensor, *, alpha: Alpha = 1.0) -> torch.Tensor:
    """θ = θ0 + α·σ̄·U Vᵀ with U Σ Vᵀ = Σ_i τ_i and σ̄ = (1/r) Σ_j σ_j, r = min(m, n) (Iso-C).

    Marczak et al., ICML 2025 (arXiv:2502.04959), as in FusionBench
    (fusion_bench/method/isotropic_merging/iso_utils.py, `iso_c`): the summed task matrix
    Δ = Σ_i τ_i, τ_i = θ_i − θ0, keeps its singular vectors and gets a flat spectrum, the mean of
    its singular values. α = 1 is FusionBench's default (config/method/isotropic_merging/iso_c.yaml;
    the paper tunes it on validation data). U Vᵀ is Δ's polar factor, computed exactly as
    Δ V diag(1/σ) Vᵀ from a float64 eigh of the Gram matrix (`_spectral`); directions with σ at
    the float32 noise floor (a rank-deficient Δ) are left out instead of paired arbitrarily, the
    mean still divides by r. Tensors that are not 2-D take the reference's fallback, the mean
    task vector: θ0 + α·(1/T) Σ_i τ_i. Reads each input once (streaming).
    """
    base = need_base("iso_c", base)
    need_count("iso_c", tensors, 2, None, "at least two fine-tuned models besides the base_model")
    if base.dim() != 2:
        return mean_task_vector(tensors, base).mul_(alpha).add_(base)
    total = mean_task_vector(tensors, base).mul_(len(tensors))
    m, n = total.shape
    flip = m < n
    x = (total.T if flip else total).to(torch.float64)
    del total
    lam, v = torch.linalg.eigh(x.T @ x)
    s = lam.clamp(min=0).sqrt_()
    keep = s > s[-1] * rtol(m, n) if s[-1] > 0 else torch.zeros_like(s, dtype=torch.bool)
    mean_s = float(s[keep].sum()) / min(m, n)
    v = v[:, keep]
    merged = x @ ((v * (mean_s / s[keep])) @ v.T)
    del x, v
    if flip:
        merged = merged.T
    return merged.mul_(alpha).to(base.dtype).add_(base)


def split_ranks(shape: tuple[int, ...], n_models: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dimensions, dimensions per task), as FusionBench's iso_cts sizes them: the
    task-specific total is a multiple of T and common + T·per_task = min(m, n)."""
    r = min(shape)
    common = int(r * common_space_fraction)
    per_task = min(round((r - common) / n_models), r // n_models)  # min: never more than r in all
    return r - per_task * n_models, per_task


def _iso_cts_cost(shape: tuple[int, ...], n_models: int, params: dict[str, Any]) -> Optional[Cost]:
    """Eigh of Σ τᵢ's Gram, one Gram eigh per projected task vector, one for the task-specific left
    vectors (T·s square; s x s for two tasks) and one r x r for the right ones."""
    if len(shape) != 2:
        return None
    m, n = shape
    r = min(m, n)
    common, per_task = split_ranks(shape, n_models, float(params.get("common_space_fraction", 0.8)))
    q, two = n_models * per_task, n_models == 2
    if m <= n:  # each projected task vector through the (m − common)-square Gram of its rest
        rest = m - common
        tasks = matmul_flops(rest, m, n) + gram_svd_flops(rest, n, per_task) + matmul_flops(m, rest, per_task)
        task_svd = (rest, rest)
    else:
        tasks = 2 * matmul_flops(m, common, n) + gram_svd_flops(m, n, per_task)
        task_svd = (r, r)
    flops = (gram_svd_flops(m, n, common) + n_models * tasks + inv_sqrt_flops(m, q, two) + inv_sqrt_flops(n, r)
             + whitened_product_flops(m, n, r))
    left = ((per_task, per_task),) if two else ((q, q),)
    return Cost(flops=flops, extra_bytes=8 * (3 * m * n + (m + n) * r + 5 * r * r),
                svd=((r, r),) * 2 + (task_svd,) * n_models + (left if q else ()),
                note="iso_cts: per matrix float64 Gram eighs of Σ τᵢ, of each projected τᵢ, and two to whiten")


@merge_method(base="required", min_models=2, tags=("matrices",), cost=_iso_cts_cost,
              summary="per matrix: common subspace of Σ τᵢ plus each task's own directions, flat spectrum",
              formula="θ = θ₀ + α·σ̄·U⊥V⊥ᵀ,  U = [Uᶜ, U₁ᵗˢ … U_Tᵗˢ],  Uᵢᵗˢ from (I − UᶜUᶜᵀ)τᵢ",
              paper=_PAPER, grid={"alpha": (0.5, 1.0, 1.5, 2.0, 3.0)})
def iso_cts(tensors: Tensors, base: BaseTensor, *, alpha: Alpha = 1.0,
            common_space_fraction: Annotated[
                float, Range(0.0, 1.0), Ends("0 = task-specific directions only", "1 = Iso-C (common only)"),
                "share of the rank given to the common subspace of Σ τᵢ"] = 0.8) -> torch.Tensor:
    """θ = θ0 + α·σ̄·U⊥ V⊥ᵀ over common and task-specific subspaces (Iso-CTS).

    Marczak et al., ICML 2025 (arXiv:2502.04959), as in FusionBench
    (fusion_bench/method/isotropic_merging/iso_utils.py, `iso_cts`; defaults α = 1 and
    common_space_fraction = 0.8 from config/method/isotropic_merging/iso_cts.yaml, 0.8 being the
    paper's choice). With r = min(m, n), k = common dimensions and s = (r − k)/T per task (sized as
    the reference does, so k + T·s = r): the common subspace is the top k triplets (Uᶜ, Σᶜ, Vᶜ) of
    Δ = Σ_i τ_i; each task contributes the top s triplets of its task vector projected off the
    common left subspace, (I − UᶜUᶜᵀ)τ_i; the stacked U = [U_1 … U_T, Uᶜ] and V are replaced by
    their polar factors, and every singular value by σ̄, the mean of the r stacked singular
    values: θ = θ0 + α·σ̄·U⊥ V⊥ᵀ. Exact, from float64 Gram eigendecompositions (`_spectral`; the
    projected tasks' left vectors are orthogonal to Uᶜ, so only theirs are whitened, for two tasks
    through the s x s matrix U₁ᵀU₂; with rows ≤ columns a projected task vector is decomposed
    through the (r − k)-square Gram matrix of its coordinates in the complement of Uᶜ);
    triplets at the float32 noise floor are dropped (σ̄ still divides by r). Tensors that are
    not 2-D take the reference's fallback, the mean task vector: θ0 + α·(1/T) Σ_i τ_i.
    """
    base = need_base("iso_cts", base)
    need_count("iso_cts", tensors, 2, None, "at least two fine-tuned models besides the base_model")
    if base.dim() != 2:
        return mean_task_vector(tensors, base).mul_(alpha).add_(base)
    m, n = base.shape
    r = min(m, n)
    common, per_task = split_ranks(base.shape, len(tensors), common_space_fraction)
    total = torch.zeros_like(base)
    for x in tensors:
        total.add_(x).sub_(base)
    uc, sc, vc, rest = thin_svd_rest(total, common)
    del total
    us, ss, vs = [], [], []
    for x in tensors:
        tau = (x - base).to(torch.float64)
        if rest is not None:  # rows ≤ cols: (I − UᶜUᶜᵀ)τ = R(Rᵀτ) with R the rest of R^m, a small Gram
            y, s, v = thin_svd((rest.T @ tau), per_task) if per_task else (None, None, None)
            u = None if y is None else rest @ y
        else:
            tau -= uc @ (uc.T @ tau)
            u, s, v = thin_svd(tau, per_task) if per_task else (None, None, None)
        if u is not None:
            us.append(u), ss.append(s), vs.append(v)
        del tau
    tol = rtol(m, n)
    # the task-specific left vectors are orthogonal to Uᶜ, so polar([U₁ … U_T, Uᶜ]) = [polar([U₁ … U_T]), Uᶜ]
    u_ts = torch.cat(us, 1) if us else uc[:, :0]
    f_ts = inv_sqrt_gram(u_ts, tol, us[0].shape[1] if len(us) == 2 else None)
    fa = torch.block_diag(f_ts, torch.eye(uc.shape[1], dtype=uc.dtype, device=uc.device))
    us.append(uc), ss.append(sc), vs.append(vc)
    s, b = torch.cat(ss), torch.cat(vs, 1)
    mean_s = float(s.sum()) / r
    merged = whitened_product(torch.cat(us, 1), fa, torch.full_like(s, mean_s), b, inv_sqrt_gram(b, tol))
    return merged.mul_(alpha).to(base.dtype).add_(base)
