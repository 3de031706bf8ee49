"""PCB-Merging: weight each task vector's entries by intra- and inter-task balancing scores,
keep the top `ratio` of them and take the score-weighted mean."""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

import torch

from mergecore.methods._cost import Cost
from mergecore.methods._sparsify import kth_largest
from mergecore.methods.base import BaseTensor, Ends, Range, Tensors, merge_method, need_base, need_count

_PAPER = ("Du et al. 2024, Parameter Competition Balancing for Model Merging (NeurIPS 2024, arXiv:2410.02396)")
CLIP_RATIO = 0.0001  # share of smallest and largest |τ| clipped per task (authors' pcb-merging.py)


def _row_values(x: torch.Tensor, positions: list[int]) -> list[torch.Tensor]:
    """Per row of `x` (T x d), the values at 0-based ascending `positions` (what `sort(x)[:, p]` gives),
    as (T, 1) columns; an exact selection instead of a full sort."""
    d = x.shape[1]
    cols = []
    for p in positions:
        vals = [kth_largest(row, d - p).value for row in x]
        cols.append(torch.tensor(vals, dtype=x.dtype, device=x.device).unsqueeze(1))
    return cols


def _minmax_(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row in place to [0, 1]; a constant row (nothing to rank) becomes 0."""
    lo = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True).sub_(lo)
    flat = span <= 0
    x.sub_(lo).div_(span.masked_fill_(flat, 1.0))
    return x.masked_fill_(flat, 0.0)


def _pcb_cost(shape: tuple[int, ...], n_models: int, params: dict[str, Any]) -> Optional[Cost]:
    """Stacked task vectors, their clipped copy and the score matrix; a few selections per model."""
    n = math.prod(shape)
    return Cost(flops=30.0 * n * n_models, extra_bytes=4 * n * (4 * n_models + 2))


@merge_method(base="required", min_models=2, cost=_pcb_cost,
              summary="balance each entry's importance within and across tasks, drop all but the top ratio, "
                      "score-weighted mean",
              formula="θ = θ₀ + λ·Σᵢ βᵢ⊙clip(τᵢ) / Σᵢ βᵢ,  βᵢ = top-r(exp(n·Norm(τᵢ²))⊙tanh(τᵢ⊙Σⱼτⱼ))",
              paper=_PAPER, starting={"ratio": 0.1, "lambda": 1.0},
              grid={"lambda": (0.2, 0.3, 0.5, 0.7, 1.0)})
def pcb(tensors: Tensors, base: BaseTensor, *,
        ratio: Annotated[float, Range(0.0, 1.0, lo_open=True), Ends("0 = keep almost nothing", "1 = keep all entries"),
                         "share of each task vector's entries kept (by balancing score)"] = 0.1,
        lambda_: Annotated[float, "scale of the merged task vector"] = 1.0) -> torch.Tensor:
    """θ = θ0 + λ·Σ_i β_i ⊙ τ̂_i / Σ_i β_i over task vectors τ_i = θ_i − θ0 (n models).

    PCB-Merging (Du et al., NeurIPS 2024, arXiv:2410.02396), transcribed from the authors'
    `PCB_merge` (duguodong7/pcb-merging, pcb-merging.py), with each tensor flattened as one row
    per model (the authors flatten the whole model into one row):
      τ̂_i = sign(τ_i)·clip(|τ_i|) with |τ_i| clipped to its own 0.01 % and 99.99 % order statistics;
      intra-balancing  exp(n·Norm(|τ̂_i|)²)  (Norm = min-max over the row; the paper's softmax with
      temperature 1/n, whose normaliser cancels below);
      inter-balancing  tanh(τ_i ⊙ Σ_j τ_j);
      β_i = Norm(max(score_i, s_i)), s_i = the row's sorted score at position ⌊d(1 − ratio)⌋: the
      entries above s_i (the top `ratio`, less the one at s_i) get a weight in (0, 1], the rest 0;
      the merged task vector Σ_i β_i τ̂_i / max(Σ_i β_i, 1e-12), scaled by λ.
    Defaults: ratio = 0.1 (`pcb_ratio` of `PCB_merge`; the paper sweeps 0.05–0.2), λ = 1.0 (the
    start of the authors' evolutionary search over [0.8, 1.3]). Two safe-guards the reference lacks
    (it returns NaN there): a row whose values are all equal normalises to 0 (an all-zero task
    vector then adds nothing), and exp(n·x²) is computed as exp(n·(x² − 1)), the same scores up to a
    row factor that the normalisation removes, so that many models do not overflow float32.
    """
    base = need_base("pcb", base)
    need_count("pcb", tensors, 2, None, "at least two fine-tuned models besides the base_model")
    n = len(tensors)
    taus = torch.stack([(x - base).reshape(-1) for x in tensors])  # n x d
    d = taus.shape[1]
    mag = taus.abs()
    lo, hi = _row_values(mag, [int(d * CLIP_RATIO), int(d * (1 - CLIP_RATIO) - 1)])
    torch.clamp(mag, lo, hi, out=mag)
    score = torch.mul(taus, taus.sum(dim=0, keepdim=True)).tanh_()  # inter-balancing
    intra = _minmax_(mag.clone()).square_().sub_(1.0).mul_(n).exp_()
    score.mul_(intra)
    del intra
    clipped = taus.sign_().mul_(mag)
    del mag
    floor, top = _row_values(score, [min(int(d * (1 - ratio)), d - 1), d - 1])
    beta = _minmax_(torch.clamp(score, floor, top, out=score))
    merged = (clipped.mul_(beta)).sum(dim=0).div_(beta.sum(dim=0).clamp_(min=1e-12))
    del clipped, beta
    return merged.reshape(base.shape).mul_(lambda_).add_(base)
