"""Passthrough: copy one model's tensor, optionally scaled (the building block of slices)."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.methods.base import BaseTensor, PerModel, Tensors, merge_method, need_count


# not an operator: a layer copied from one model is already an RMM model action
@merge_method(max_models=1, summary="copy one model's tensors unchanged (optionally scaled); used for frankenmerges",
              formula="θ = sᵢ·θᵢ (copy)", paper="mergekit docs (passthrough / slices)", tags=("structural", "copy"),
              operator=False)
def passthrough(tensors: Tensors, base: BaseTensor, *,
                scale: Annotated[PerModel[float], "multiply the tensor by this factor"] = 1.0) -> torch.Tensor:
    """θ = s · θ1 (θ = θ1 when s = 1).

    mergekit's passthrough: exactly one input model per tensor, copied as is, which is how
    layer-range slices ("frankenmerges") are assembled; the optional per-model `scale`
    multiplies the tensor (mergekit's default, no scale, equals s = 1). With s = 1 the input
    tensor itself is returned, not a copy.
    """
    need_count("passthrough", tensors, 1, 1, "exactly one model per tensor")
    s = scale[0] if isinstance(scale, (list, tuple)) else scale
    if s is None or s == 1.0:
        return tensors[0]
    return tensors[0] * s
