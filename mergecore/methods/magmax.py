"""MagMax: keep, entry by entry, the task-vector value of largest magnitude."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.methods.base import BaseTensor, Range, Tensors, merge_method, need_base, need_count, owns_inputs

_PAPER = ("Marczak et al. 2024, MagMax: Leveraging Model Merging for Seamless Continual Learning "
          "(arXiv:2407.06322)")


@merge_method(base="required", min_models=1, tags=("streaming",),
              summary="per entry, the task-vector value of largest magnitude, scaled and added to the base",
              formula="θ = θ₀ + λ·τᵢ*[j],  i* = argmaxᵢ |τᵢ[j]|,  τᵢ = θᵢ − θ₀",
              paper=_PAPER, starting={"lambda": 0.5},
              grid={"lambda": (0.3, 0.5, 0.7, 1.0, 1.5)})
def magmax(tensors: Tensors, base: BaseTensor, *,
           lambda_: Annotated[float, Range(0.0, None), "scale of the selected task vector"] = 0.5) -> torch.Tensor:
    """θ = θ0 + λ·τ_max with τ_max[j] = τ_{i*}[j], i* = argmax_i |τ_i[j]| and τ_i = θ_i − θ0.

    MagMax (Marczak, Twardowski, Trzciński & Cygert, ECCV 2024, arXiv:2407.06322), for models
    fine-tuned from one base. As in the authors' `merge_max_abs` (danielm1405/magmax,
    src/merging/task_vectors.py) the models are folded in order and a later model wins a tie
    (|τ_i| ≥ the running maximum). The default λ = 0.5 is the scaling coefficient of the authors'
    8-dataset script, also FusionBench's default. Every tensor (1-D too) takes the same rule.
    One pass over the models: each input is read once, in order (and reused in place when the
    executor hands over owned inputs).
    """
    base = need_base("magmax", base)
    need_count("magmax", tensors, 1, None, "at least one fine-tuned model besides the base_model")
    owned = owns_inputs(tensors)
    best: torch.Tensor | None = None
    best_abs = mask = None
    for i in range(len(tensors)):
        x = tensors[i]
        tau = x.sub_(base) if owned else x - base
        if best is None:
            best, best_abs = tau, tau.abs()
            mask = torch.empty_like(best, dtype=torch.bool)
            continue
        tau_abs = tau.abs()
        torch.ge(tau_abs, best_abs, out=mask)
        torch.where(mask, tau, best, out=best)
        torch.maximum(best_abs, tau_abs, out=best_abs)
        del tau, tau_abs
    del best_abs, mask
    return best.mul_(lambda_).add_(base)
