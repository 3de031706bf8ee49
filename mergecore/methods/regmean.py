"""RegMean and RegMean++: the closed-form merge of linear layers from their inputs' Gram matrices.

For a linear weight W_i [out, in] of model i whose inputs X_i (rows: examples or tokens of model
i's task) have the Gram matrix G_i = X_iᵀX_i / N_i, the merge that minimises Σ_i ‖X_i W − X_i W_iᵀ‖²
is W = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ (transposed back). RegMean++ solves the same equation with Gram
matrices of the inputs that reach layer l through the *merged* layers < l.

The statistics come from `mergecore collect-stats` (`mergecore.stats.store` describes the file).
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Sequence

import torch

from mergecore.errors import MergeError
from mergecore.methods._cost import Cost, matmul_flops
from mergecore.methods.base import BaseTensor, Range, Tensors, merge_method
from mergecore.stats.store import StatsFile, stats_for_method

DEFAULT_RATIO = 0.6  # FusionBench's reduce_non_diagonal_ratio for CLIP and GPT-2 (config/method/regmean/*.yaml)


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries scaled by α, the diagonal kept."""
    out = gram * ratio
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], ratio: float,
                  transposed: bool = False) -> torch.Tensor:
    """W = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ for weights [out, in] (`transposed`: [in, out], a Conv1D).

    A linear solve, not an inverse. The reference (FusionBench) inverts Σ G̃_i as it is; when the
    sum is singular (an input that is zero on every row) we add a small ridge λ = 1e-6·mean(diag)
    that pulls the unconstrained rows to the models' average instead of failing."""
    lhs: Optional[torch.Tensor] = None
    rhs: Optional[torch.Tensor] = None
    avg: Optional[torch.Tensor] = None
    for w, g in zip(weights, grams):
        wt = w if transposed else w.t()
        gt = reduce_non_diagonal(g.to(w.device, torch.float32), ratio)
        term = gt @ wt
        lhs = gt if lhs is None else lhs.add_(gt)
        rhs = term if rhs is None else rhs.add_(term)
        avg = wt.clone() if avg is None else avg.add_(wt)
    if lhs is None or rhs is None or avg is None:
        raise MergeError("regmean needs at least one model")
    sol, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        lam = 1e-6 * max(float(lhs.diagonal().abs().mean()), 1e-12)
        eye = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
        sol = torch.linalg.solve(lhs + lam * eye, rhs + lam * avg / len(weights))
    return sol if transposed else sol.t()


def _mean(tensors: Tensors) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out.div_(len(tensors))


def merge_with_grams(method: str, kinds: tuple[str, ...], tensors: Tensors, ratio: float, stats: str,
                     tensor_name: str, artifacts: Optional[dict[str, Any]],
                     input_models: Optional[list[str]]) -> torch.Tensor:
    """The shared body of regmean and regmean_plusplus: the solve where the statistics have a Gram
    for this weight, the simple average (the reference's fallback) everywhere else."""
    sf, idx = stats_for_method(artifacts, stats, method, kinds, input_models or [])
    collected = sf.meta.get("ratio")
    if collected is not None and abs(float(collected) - ratio) > 1e-9:
        raise MergeError(f"method '{method}': {sf.path.name} was collected merging with reduce_non_diagonal_ratio "
                         f"{collected}, the recipe says {ratio}; use the same value or collect again")
    if tensors[0].ndim != 2 or tensor_name not in (sf.meta.get("inputs") or {}):
        return _mean(tensors)
    grams = [sf.gram(i, tensor_name) for i in idx]
    _check_grams(sf, method, tensor_name, tensors[0].shape, grams, idx)
    return regmean_solve(tensors, grams, ratio, transposed=sf.transposed(tensor_name))  # type: ignore[arg-type]


def _check_grams(sf: StatsFile, method: str, name: str, shape: torch.Size, grams: list, idx: list[int]) -> None:
    size = shape[0] if sf.transposed(name) else shape[1]
    for g, i in zip(grams, idx):
        who = sf.models[i]["name"]
        if g is None:
            raise MergeError(f"method '{method}': {sf.path.name} has no Gram matrix of '{name}' for model '{who}'")
        if tuple(g.shape) != (size, size):
            raise MergeError(f"method '{method}': the Gram matrix of '{name}' for model '{who}' in {sf.path.name} is "
                             f"{list(g.shape)}, but the weight {list(shape)} takes {size} inputs; the statistics "
                             f"belong to other models")


def _cost(shape: tuple[int, ...], n_models: int, params: dict[str, Any]) -> Optional[Cost]:
    """A Gram product per model and one solve of an [in, in] system with `out` right-hand sides."""
    if len(shape) != 2:
        return None
    out, n = shape
    flops = n_models * (matmul_flops(n, n, out) + 2 * n * n) + 2 / 3 * n**3 + 2 * n * n * out
    return Cost(flops=flops, extra_bytes=4 * (2 * n * n + 3 * n * out), note="one linear solve per weight matrix")


_PAPER = ("Jin, Ren, Preotiuc-Pietro, Cheng 2023, Dataless Knowledge Fusion by Merging Weights of Language "
          "Models (ICLR 2023, arXiv:2212.09849)")


@merge_method(tags=("matrices",), stats="gram", cost=_cost, min_models=1,
              summary="closed-form merge of linear layers that best reproduces each model's outputs on its data",
              formula="θ = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ θᵢᵀ,  G̃ᵢ = α Gᵢ + (1−α) diag(Gᵢ),  Gᵢ = XᵢᵀXᵢ/Nᵢ",
              paper=_PAPER, grid={"reduce_non_diagonal_ratio": (0.0, 0.3, 0.6, 0.9, 1.0)})
def regmean(
    tensors: Tensors,
    base: BaseTensor,
    *,
    reduce_non_diagonal_ratio: Annotated[float, Range(0, 1), "α: scale of the Gram matrices' off-diagonal entries "
                                                             "(1: exact RegMean, 0: diagonal only)"] = DEFAULT_RATIO,
    stats: Annotated[str, "name of the statistics file under the recipe's artifacts"] = "stats",
    tensor_name: str = "",
    artifacts: Optional[dict[str, Any]] = None,
    input_models: Optional[list[str]] = None,
) -> torch.Tensor:
    """W = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ with G̃_i = α G_i + (1 − α) diag(G_i), G_i = X_iᵀX_i / N_i.

    RegMean (Jin et al., ICLR 2023, arXiv:2212.09849): the weight that minimises the summed
    squared distance of the merged linear layer's outputs to each model's outputs on that model's
    own inputs X_i. Gram matrices come from the artifact `stats` (`mergecore collect-stats gram`),
    per model and linear input, averaged over the N_i rows as in FusionBench
    (fusion_bench/method/regmean/regmean.py); α defaults to FusionBench's 0.6. A Conv1D weight
    [in, out] is solved without the transposes. Every tensor without a Gram matrix (norms, biases,
    embeddings, heads) is the simple average of the models, the reference's fallback.
    """
    return merge_with_grams("regmean", ("gram",), tensors, reduce_non_diagonal_ratio, stats, tensor_name,
                            artifacts, input_models)


@merge_method(tags=("matrices",), stats="gram_plusplus", cost=_cost, min_models=1,
              summary="RegMean with each layer's inputs taken through the already merged earlier layers",
              formula="θ = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ θᵢᵀ,  Gᵢ from inputs through the merged layers < l",
              paper="Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of Regression "
                    "Mean for Model Merging (arXiv:2508.03121)")
def regmean_plusplus(
    tensors: Tensors,
    base: BaseTensor,
    *,
    reduce_non_diagonal_ratio: Annotated[float, Range(0, 1), "α: scale of the Gram matrices' off-diagonal entries "
                                                             "(1: exact RegMean, 0: diagonal only)"] = DEFAULT_RATIO,
    stats: Annotated[str, "name of the statistics file under the recipe's artifacts"] = "stats",
    tensor_name: str = "",
    artifacts: Optional[dict[str, Any]] = None,
    input_models: Optional[list[str]] = None,
) -> torch.Tensor:
    """W_l = (Σ_i G̃_i,l)⁻¹ Σ_i G̃_i,l W_i,lᵀ with G_i,l = X_i,lᵀX_i,l / N_i, where X_i,l are the inputs
    of layer l of model i when model i's data runs through the merged layers < l (and model i's
    own layer l up to the linear map).

    RegMean++ (Nguyen et al. 2025, arXiv:2508.03121; fusion_bench/method/regmean_plusplus/):
    the same solve as RegMean, on statistics collected sequentially layer by layer
    (`mergecore collect-stats gram_plusplus`), so the merge accounts for how earlier merged layers
    shift the inputs. Tensors without a Gram matrix are the simple average (the reference merges
    embeddings and norms by averaging too). Plain RegMean statistics are refused.
    """
    return merge_with_grams("regmean_plusplus", ("gram_plusplus",), tensors, reduce_non_diagonal_ratio, stats,
                            tensor_name, artifacts, input_models)
