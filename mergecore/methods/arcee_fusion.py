"""Arcee Fusion: keep only the other model's most important changes to the base."""

from __future__ import annotations

import torch

from mergecore.methods.base import BaseTensor, Tensors, merge_method, need_base, need_count

# Quantiles are estimated from at most this many entries (sampled with replacement), as in mergekit.
QUANTILE_SAMPLE_SIZE = 1_000_000


def _importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ1 − θ0| · KL(softmax(θ1) ‖ softmax(θ0)), the KL taken along the last dimension."""
    eps = 1e-8
    p = torch.softmax(other, dim=-1).add_(eps)
    q = torch.softmax(base, dim=-1).add_(eps)
    ratio = torch.div(p, q, out=q).log_().mul_(p)
    del p
    kl = ratio.sum(dim=-1, keepdim=True)
    del ratio
    return torch.sub(other, base).abs_().mul_(kl)


def _threshold(
    importance: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """median + 1.5 · IQR of the importance scores (nearest-lower-rank quantiles)."""
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        idx = torch.randint(
            flat.numel(), (QUANTILE_SAMPLE_SIZE,), device=flat.device, generator=generator
        )
        flat = flat[idx]
    ordered, _ = torch.sort(flat)
    # Index = floor(q · (n − 1)), computed in float32 like mergekit.
    ranks = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[ranks.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


@merge_method(base="required", max_models=1, tags=("selective",),
              summary="apply only the other model's changes whose importance exceeds median + 1.5·IQR",
              formula="θ = θ₀ + (θ₁ − θ₀)⊙[s ≥ median(s) + 1.5·IQR(s)],  s = |θ₁ − θ₀|·KL(softmax θ₁ ‖ softmax θ₀)",
              paper="Arcee AI, Arcee Fusion (mergekit docs)")
def arcee_fusion(tensors: Tensors, base: BaseTensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """θ = θ0 + (θ1 − θ0) ⊙ [s ≥ Q2(s) + 1.5 (Q3(s) − Q1(s))], s = |θ1 − θ0| · KL(p1 ‖ p0).

    Arcee Fusion (Arcee AI; mergekit docs): the importance s of each entry is its absolute
    change times the KL divergence between softmax(θ1) and softmax(θ0) (each + 1e-8) along the
    last dimension; only entries whose importance reaches the outlier threshold median + 1.5 ×
    interquartile range are taken from θ1, the rest stay the base's. Quantiles use the sorted
    scores at index ⌊q(n−1)⌋; above 10⁶ entries they are estimated from 10⁶ entries sampled with
    replacement (seeded by the per-tensor generator), as mergekit samples them.
    """
    base = need_base("arcee_fusion", base)
    need_count("arcee_fusion", tensors, 1, 1, "the base_model and exactly one other model")
    other = tensors[0]
    importance = _importance(other, base)
    threshold = _threshold(importance, generator)
    mask = importance.ge_(threshold)  # in place: importance is no longer needed
    delta = torch.sub(other, base).mul_(mask)
    return delta.add_(base)
