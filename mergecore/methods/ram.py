"""RAM: Reinforced Agent Merging (closed-form), and its tensor-local RAM+ variant."""

from __future__ import annotations

from typing import Annotated, Optional

import torch

from mergecore.methods.base import BaseTensor, Range, Tensors, merge_method, need_base


def _task_vectors(tensors: Tensors, base: torch.Tensor, epsilon: float
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Task vectors τi, their masks |τi| > ε and the per-entry count of models that touch it."""
    taus = [x - base for x in tensors]
    masks = [tau.abs() > epsilon for tau in taus]
    counts = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for m in masks:
        counts += m
    return taus, masks, counts


def _ram(method: str, tensors: Tensors, base: BaseTensor, epsilon: float, boost: Optional[tuple[float, float]] = None
         ) -> torch.Tensor:
    """θ0 + Σ_i τi ⊙ 1[|τi| > ε] / max(c, 1); with `boost` = (r, α), model i's unique entries
    take λi τi instead (RAM+, see `ramplus_tl`)."""
    base = need_base(method, base)
    if not tensors:
        return base
    taus, masks, counts = _task_vectors(tensors, base, epsilon)
    unique, shared = (counts == 1, counts > 1) if boost else (None, None)
    denom = counts.clamp_(min=1)
    merged = None
    for tau, m in zip(taus, masks):
        if boost is None:
            term = tau.mul_(m).div_(denom)
        else:
            r, alpha = boost
            rho = (m & shared).sum() / (m & unique).sum().clamp(min=epsilon)
            lam = 1 + r * rho.clamp(min=0, max=alpha)
            tau.mul_(m)
            boosted = tau * lam
            tau.div_(denom)
            term = torch.where(unique, boosted, tau, out=tau)
            del boosted
        merged = term if merged is None else merged.add_(term)
    assert merged is not None
    return merged.add_(base).reshape(base.shape)


Epsilon = Annotated[float, Range(0.0, None), "changes with |τ| <= epsilon count as untouched"]
PAPER = "Reinforced Agent Merging (arXiv:2601.13572)"


@merge_method(base="required", min_models=0, paper=PAPER, tags=("task-vector",),
              summary="RAM: keep each model's unique changes, average changes shared by several models",
              formula="θ = θ₀ + Σᵢ mᵢ⊙τᵢ / max(Σⱼ mⱼ, 1),  mᵢ = [|τᵢ| > ε]")
def ram(tensors: Tensors, base: BaseTensor, *, epsilon: Epsilon = 1e-5) -> torch.Tensor:
    """θ = θ0 + Σ_i τi ⊙ 1[|τi| > ε] / max(c, 1), c = Σ_i 1[|τi| > ε] per entry.

    Reinforced Agent Merging (RAM, arXiv:2601.13572), the closed-form rule in mergekit: with
    task vectors τi = θi − θ0, each parameter entry is inactive (no model changes it by more
    than ε: the base is kept), unique (exactly one model changes it: that change is applied
    in full) or shared (c > 1 models change it: their changes are averaged over those c models,
    not diluted by the models that left it alone). With no other model the base is returned.
    """
    return _ram("ram", tensors, base, epsilon)


@merge_method(base="required", min_models=0, paper=PAPER, tags=("task-vector",),
              summary="RAM+ (tensor-local): RAM with unique changes boosted by the model's overlap ratio",
              formula="θ = θ₀ + Σᵢ (λᵢ·τᵢ where only model i changes, τᵢ / c where c models do),  "
                      "λᵢ = 1 + r·clamp(ρᵢ, 0, α)")
def ramplus_tl(tensors: Tensors, base: BaseTensor, *,
               r: Annotated[float, "strength of the rescaling of unique changes"] = 0.1,
               alpha: Annotated[float, Range(0.0, None), "cap on the overlap ratio ρ"] = 0.2,
               epsilon: Epsilon = 1e-5) -> torch.Tensor:
    """θ = θ0 + Σ_i [λi τi on entries unique to model i; τi / c on shared entries], per tensor.

    RAM+ from Reinforced Agent Merging (arXiv:2601.13572), tensor-local as in mergekit's
    `ramplus_tl`: as `ram`, but model i's unique changes are scaled by λi = 1 + r · clamp(ρi,
    0, α), where ρi = (number of model i's active entries that are shared) / max(number that
    are unique to it, ε), counted within the current tensor. This compensates models whose
    changes are mostly shared (and hence averaged down) — with the defaults, by up to 2 %.
    """
    return _ram("ramplus_tl", tensors, base, epsilon, (r, alpha))
