"""Linear averaging (model soups)."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.methods.base import BaseTensor, PerModel, Tensors, merge_method


@merge_method(summary="weighted average of the models (model soup)", formula="θ = Σᵢ wᵢ·θᵢ / Σᵢ wᵢ",
              paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)", starting={"weight": 1.0})
def linear(tensors: Tensors, base: BaseTensor, *, weight: Annotated[PerModel[float], "weight of each model"],
           normalize: Annotated[bool, "divide by the sum of the weights"] = True) -> torch.Tensor:
    """Weighted average θ = Σ_i w_i θ_i / Σ_i w_i (without normalize: θ = Σ_i w_i θ_i).

    Model soups (Wortsman et al., ICML 2022) average fine-tuned models that share an
    initialisation. When the weights sum to zero, normalisation is skipped.
    """
    out = torch.zeros_like(tensors[0])
    for w, t in zip(weight, tensors):
        out.add_(t, alpha=w)
    total = sum(weight)
    if normalize and total != 0:
        out.div_(total)
    return out
