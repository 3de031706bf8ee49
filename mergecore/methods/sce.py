"""SCE (Select, Calculate, Erase) merging from FuseChat."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.methods._sparsify import rank_window_mask_
from mergecore.methods.base import BaseTensor, Range, Tensors, merge_method


def _variance_mask(tensors: list[torch.Tensor], base: torch.Tensor, select_topk: float):
    """Float 0/1 mask of the entries whose task-vector variance across models is in the top
    `select_topk` fraction of the entries with non-zero variance (mergekit's sce_mask)."""
    n = len(tensors)
    first = torch.sub(tensors[0], base)
    diff = torch.empty_like(base)
    s1 = torch.zeros_like(base)
    s2 = torch.zeros_like(base)
    # Shifted by the first task vector: entries where all models agree get exactly 0.
    for t in tensors[1:]:
        torch.sub(t, base, out=diff).sub_(first)
        s1.add_(diff)
        s2.addcmul_(diff, diff)
    del first, diff
    var = s2.div_(n).sub_(s1.div_(n).square_()).clamp_(min=0)
    del s1
    if select_topk <= 0:
        return var.zero_()
    # Same arithmetic as mergekit: int(count (int64 tensor) * select_topk) in float32.
    k = int(torch.count_nonzero(var) * select_topk)
    return rank_window_mask_(var, 0, k)


@merge_method(base="required", summary="SCE: keep high-variance entries, weight task vectors by energy, elect signs, merge",
              formula="θ = θ₀ + Σᵢ eᵢ·mᵢ⊙select(τᵢ, topk)", paper="Wan et al. 2024, FuseChat (arXiv:2408.07990)",
              grid={"select_topk": (0.1, 0.3, 0.5)})
def sce(tensors: Tensors, base: BaseTensor, *,
        select_topk: Annotated[float, Range(0.0, 1.0), "fraction of entries kept, by variance across models"] = 1.0,
        int8_mask: Annotated[bool, "memory hint in mergekit; accepted, no effect"] = False) -> torch.Tensor:
    """SCE merging: with task vectors τ_i = θ_i − θ0, *select* the top `select_topk` fraction
    of entries (of those with non-zero variance) by Var_i(τ_i), zeroing the rest in every τ_i;
    *calculate* weights w_i = mean(τ_i²) / Σ_j mean(τ_j²) (uniform when Σ_j < 1e-6); *erase*
    entries whose sign disagrees with s = sgn(Σ_i τ_i) (ties to +); then
    θ = θ0 + Σ_i w_i τ_i [sgn τ_i = s] / max(Σ_i w_i [sgn τ_i = s], 1e-6). Wan et al.,
    "FuseChat: Knowledge Fusion of Chat Models", 2024 (arXiv:2408.07990).
    """
    if not tensors:
        return base.clone()
    n = len(tensors)
    mask = _variance_mask(tensors, base, select_topk) if select_topk < 1 else None
    tv = torch.empty_like(base)
    vote = torch.zeros_like(base)
    energy = []
    for t in tensors:
        torch.sub(t, base, out=tv)
        if mask is not None:
            tv.mul_(mask)
        vote.add_(tv)
        energy.append(torch.dot(tv.view(-1), tv.view(-1)) / max(tv.numel(), 1))
    energy = torch.stack(energy)
    total = energy.sum().item()
    weights = torch.full((n,), 1.0 / n) if abs(total) < 1e-6 else energy / total
    sign = vote.ge_(0).mul_(2).sub_(1)  # elected sign, ±1
    del vote
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for w, t in zip(weights.tolist(), tensors):
        torch.sub(t, base, out=tv)
        if mask is not None:
            tv.mul_(mask)
        tv.mul_(sign).clamp_(min=0)  # |τ_i| where it agrees with the elected sign, else 0
        merged.add_(tv, alpha=w)
        divisor.add_(tv.gt_(0), alpha=w)
    del tv, mask
    return merged.mul_(sign).div_(divisor.clamp_(min=1e-6)).add_(base)
