"""Model Stock: interpolate between the base and the fine-tuned average by their angle."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.methods.base import BaseTensor, Tensors, merge_method, need_base, need_count


@merge_method(base="required", min_models=2, tags=("geometric",),
              summary="move from the base towards the fine-tuned average by a ratio set by their angle",
              formula="θ = r·mean(θᵢ) + (1 − r)·θ₀,  r from the angle between the fine-tunes",
              paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models (arXiv:2403.19522)")
def model_stock(tensors: Tensors, base: BaseTensor, *, filter_wise: Annotated[
        bool, "one ratio per row (last dimension) instead of one per tensor"] = False) -> torch.Tensor:
    """θ = t·θ̄ + (1−t)·θ0 with θ̄ = 1/N Σ θi and t = N cos φ / (1 + (N−1) cos φ).

    Model Stock (Jang et al., ECCV 2024, arXiv:2403.19522): cos φ is the mean, over all pairs
    of the N ≥ 2 fine-tuned models, of the cosine between their task vectors θi − θ0 (norm
    product clamped to ≥ 1e-6, cosine clamped to [−1, 1]). As in mergekit, the angle is taken
    over the flattened tensor, or with filter_wise per vector along the last dimension (a 1-D
    tensor is then one vector). Where |1 + (N−1) cos φ| < 1e-6 the ratio is 0 (base kept).
    """
    base = need_base("model_stock", base)
    need_count("model_stock", tensors, 2, None, "at least two fine-tuned models besides the base_model")
    shape = base.shape
    if filter_wise:
        # A vector (or scalar) is a single filter.
        w0 = base.reshape(1, -1) if base.dim() <= 1 else base
        ws = [x.reshape(1, -1) for x in tensors] if base.dim() <= 1 else list(tensors)
    else:
        w0 = base.reshape(-1)
        ws = [x.reshape(-1) for x in tensors]

    offsets = [x - w0 for x in ws]
    norms = [torch.norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            prod = offsets[i] * offsets[j]
            dot = prod.sum(dim=-1)
            del prod
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)

    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denom), denom)
    ratio = torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)

    avg = ws[0].clone()
    for x in ws[1:]:
        avg.add_(x)
    avg.div_(n)
    out = avg.mul_(ratio)
    out.add_((1 - ratio) * w0)
    return out.reshape(shape)
