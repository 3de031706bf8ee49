"""Fisher merging: an entry-wise average weighted by each model's diagonal Fisher information."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch

from mergecore.errors import MergeError
from mergecore.methods.base import BaseTensor, PerModel, Range, Tensors, merge_method
from mergecore.stats.store import stats_for_method, tensor_key


@merge_method(stats="fisher", min_models=1,
              summary="entry-wise average weighted by each model's Fisher information on its own task",
              formula="θ = Σᵢ λᵢ cᵢ (Fᵢ + ε) θᵢ / Σᵢ λᵢ cᵢ (Fᵢ + ε),  cᵢ ∝ 1/‖Fᵢ‖ when normalised",
              paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (NeurIPS 2022, "
                    "arXiv:2111.09832)")
def fisher(
    tensors: Tensors,
    base: BaseTensor,
    *,
    weight: Annotated[PerModel[float], Range(0, None), "λᵢ: the model's share (scales its Fisher)"] = 1.0,
    normalize: Annotated[bool, "scale each model's Fisher by 1/‖Fᵢ‖ over the whole model (FusionBench's "
                               "normalize_fisher_weight)"] = True,
    minimal_fisher_weight: Annotated[float, Range(0, None), "ε added to every Fisher entry (a floor against "
                                                            "0/0)"] = 1e-6,
    stats: Annotated[str, "name of the statistics file under the recipe's artifacts"] = "stats",
    tensor_name: str = "",
    artifacts: Optional[dict[str, Any]] = None,
    input_models: Optional[list[str]] = None,
) -> torch.Tensor:
    """θ = Σ_i λ_i c_i (F_i + ε) ⊙ θ_i / Σ_i λ_i c_i (F_i + ε), entry by entry.

    Fisher merging (Matena & Raffel, NeurIPS 2022, arXiv:2111.09832), as FusionBench implements it
    (fusion_bench/method/fisher_merging/fisher_merging.py, `merging_with_fisher_weights`): F_i is
    model i's diagonal Fisher information from the artifact `stats` (`mergecore collect-stats
    fisher`), ε = `minimal_fisher_weight` (1e-6), and with `normalize` c_i = (1/(‖F_i‖ + ε)) /
    Σ_j 1/(‖F_j‖ + ε), ‖F_i‖ the L2 norm of model i's whole Fisher (recorded when collected);
    otherwise c_i = 1. A tensor the statistics hold no Fisher for (a buffer, a parameter that got
    no gradient, such as a task head swapped in at collection) is the λ-weighted average.
    """
    sf, idx = stats_for_method(artifacts, stats, "fisher", ("fisher",), input_models or [])
    lam = [float(w) for w in weight]
    if sum(lam) <= 0:
        raise MergeError("method 'fisher': the weights add up to 0")
    present = [tensor_key(i, tensor_name) in sf.keys for i in idx]
    if not any(present):
        out = tensors[0] * lam[0]
        for t, w in zip(tensors[1:], lam[1:]):
            out.add_(t, alpha=w)
        return out.div_(sum(lam))
    if not all(present):
        who = sf.models[idx[present.index(False)]]["name"]
        raise MergeError(f"method 'fisher': {sf.path.name} has no Fisher of '{tensor_name}' for model '{who}'")
    coef = lam
    if normalize:
        norms = sf.meta.get("fisher_norm") or []
        if len(norms) != len(sf.models):
            raise MergeError(f"method 'fisher': {sf.path.name} does not record the models' Fisher norms")
        inv = [1.0 / (float(norms[i]) + minimal_fisher_weight) for i in idx]
        coef = [w * v / sum(inv) for w, v in zip(lam, inv)]
    num: Optional[torch.Tensor] = None
    den: Optional[torch.Tensor] = None
    for t, i, c in zip(tensors, idx, coef):
        f = sf.read(tensor_key(i, tensor_name))
        if f is None or tuple(f.shape) != tuple(t.shape):
            raise MergeError(f"method 'fisher': the Fisher of '{tensor_name}' for model '{sf.models[i]['name']}' "
                             f"in {sf.path.name} has shape {list(f.shape) if f is not None else None}, the tensor "
                             f"{list(t.shape)}; the statistics belong to other models")
        f = f.to(t.device).add_(minimal_fisher_weight).mul_(c)
        num = f * t if num is None else num.addcmul_(f, t)
        den = f if den is None else den.add_(f)
    assert num is not None and den is not None
    return num.div_(den)
