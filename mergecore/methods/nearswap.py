"""NearSwap: take the other model's value only where it is close to the base's."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.errors import MergeError
from mergecore.methods.base import merge_method


@merge_method(
    "nearswap",
    base="required",
    min_models=1,
    max_models=1,
    summary="blend in the other model's parameters where they are within t of the base's",
    paper="alchemonaut, NearSwap (QuartetAnemoi-70B-t0.0001 model card); mergekit docs",
    tags=("geometric",),
)
def nearswap(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: Annotated[float, "similarity threshold: entries closer than t are fully swapped"],
) -> torch.Tensor:
    """θ = w·θ1 + (1−w)·θ0 with w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1), elementwise.

    NearSwap (alchemonaut's QuartetAnemoi merges; described in the mergekit docs): entries of
    the other model θ1 that differ from the base θ0 by at most t replace the base's, and the
    further apart they are the more the base's value is kept (weight t / |θ0 − θ1|).
    """
    if base is None:
        raise MergeError("nearswap needs a base_model")
    if len(tensors) != 1:
        raise MergeError(
            f"nearswap takes the base_model and exactly one other model, got {len(tensors)}"
        )
    other = tensors[0]
    w = torch.sub(base, other).abs_().clamp_(min=1e-6)
    # t / d computed as t · (1/d), the way torch evaluates `scalar / tensor`.
    w = w.reciprocal_().mul_(t).clamp_(min=0, max=1)
    # w·θ1 + (1 − w)·θ0, evaluated in that order.
    rest = torch.rsub(w, 1).mul_(base)
    return w.mul_(other).add_(rest)
