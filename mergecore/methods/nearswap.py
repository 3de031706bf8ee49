"""NearSwap: take the other model's value only where it is close to the base's."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.methods.base import BaseTensor, Ends, Tensors, merge_method, need_base, need_count


@merge_method(base="required", max_models=1, tags=("geometric",),
              summary="blend in the other model's parameters where they are within t of the base's",
              formula="θ = θ₀ + clamp(t / |θ₁ − θ₀|, 0, 1)·(θ₁ − θ₀)",
              paper="alchemonaut, NearSwap (QuartetAnemoi-70B-t0.0001 model card); mergekit docs")
def nearswap(tensors: Tensors, base: BaseTensor, *,
             t: Annotated[float, Ends("0 = keep {base}", "1 = swap in {other} where close"),
                          "similarity threshold: entries closer than t are fully swapped"]) -> torch.Tensor:
    """θ = w·θ1 + (1−w)·θ0 with w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1), elementwise.

    NearSwap (alchemonaut's QuartetAnemoi merges; described in the mergekit docs): entries of
    the other model θ1 that differ from the base θ0 by at most t replace the base's, and the
    further apart they are the more the base's value is kept (weight t / |θ0 − θ1|).
    """
    base = need_base("nearswap", base)
    need_count("nearswap", tensors, 1, 1, "the base_model and exactly one other model")
    other = tensors[0]
    w = torch.sub(base, other).abs_().clamp_(min=1e-6)
    # t / d computed as t · (1/d), the way torch evaluates `scalar / tensor`.
    w = w.reciprocal_().mul_(t).clamp_(min=0, max=1)
    # w·θ1 + (1 − w)·θ0, evaluated in that order.
    rest = torch.rsub(w, 1).mul_(base)
    return w.mul_(other).add_(rest)
