"""Passthrough: copy one model's tensor, optionally scaled (the building block of slices)."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.errors import MergeError
from mergecore.methods.base import PerModel, merge_method


@merge_method(
    "passthrough",
    base="ignored",
    min_models=1,
    max_models=1,
    summary="copy one model's tensors unchanged (optionally scaled); used for frankenmerges",
    paper="mergekit docs (passthrough / slices)",
    tags=("structural",),
)
def passthrough(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    scale: Annotated[PerModel[float], "multiply the tensor by this factor"] = 1.0,
) -> torch.Tensor:
    """θ = s · θ1 (θ = θ1 when s = 1).

    mergekit's passthrough: exactly one input model per tensor, copied as is, which is how
    layer-range slices ("frankenmerges") are assembled; the optional per-model `scale`
    multiplies the tensor (mergekit's default, no scale, equals s = 1). With s = 1 the input
    tensor itself is returned, not a copy.
    """
    if len(tensors) != 1:
        raise MergeError(f"passthrough takes exactly one model per tensor, got {len(tensors)}")
    s = scale[0] if isinstance(scale, (list, tuple)) else scale
    if s is None or s == 1.0:
        return tensors[0]
    return tensors[0] * s
