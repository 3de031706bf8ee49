"""CART: the fine-tuned models' average plus low-rank parts of their deviations from it."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch

from mergecore.methods._cost import Cost
from mergecore.methods._spectral import gram_svd_flops, thin_svd
from mergecore.methods.base import BaseTensor, Ends, Range, Tensors, merge_method, need_count

_PAPER = ("Choi et al. 2024, Revisiting Weight Averaging for Model Merging (arXiv:2412.12153)")


def cart_rank(shape: tuple[int, ...], rank_fraction: float) -> int:
    """Triplets kept per model: max(1, int(rank_fraction·min(m, n))), as the authors' code."""
    return max(1, int(rank_fraction * min(shape)))


def _cart_cost(shape: tuple[int, ...], n_models: int, params: dict[str, Any]) -> Optional[Cost]:
    """One float64 Gram eigh per model (none for two models: their low-rank parts cancel)."""
    if len(shape) != 2 or n_models < 3:
        return None
    m, n = shape
    k = min(cart_rank(shape, float(params.get("rank_fraction", 0.12))), min(m, n))
    small = min(m, n)
    return Cost(flops=n_models * gram_svd_flops(m, n, k) + n_models * 2.0 * m * n * k,
                extra_bytes=8 * (3 * m * n + 2 * small * small + (m + n) * k), svd=((small, small),) * n_models,
                note="cart: per matrix one float64 Gram eigh per model")


@merge_method(base="ignored", min_models=2, tags=("matrices",), cost=_cart_cost,
              summary="average of the models plus λ times a rank-k approximation of each one's deviation from it",
              formula="θ = θ̄ + λ·Σᵢ LowRank_k(θᵢ − θ̄),  θ̄ = mean(θᵢ)", paper=_PAPER,
              grid={"lambda": (0.5, 1.0, 1.5, 2.0, 3.0)})
def cart(tensors: Tensors, base: BaseTensor, *,
         lambda_: Annotated[float, Range(0.0, None), Ends("0 = the plain average", "more = more of each model"),
                            "scale of the summed low-rank deviations"] = 2.0,
         rank_fraction: Annotated[float, Range(0.0, 1.0, lo_open=True),
                                  Ends("0 = rank 1", "1 = full rank (λ has no effect)"),
                                  "share of each deviation's rank kept"] = 0.12) -> torch.Tensor:
    """θ = θ̄ + λ Σ_i LowRank_k(θ_i − θ̄) for a 2-D weight, θ̄ = (1/T) Σ_i θ_i (CART).

    Centered Arithmetic with Reduced rank Task vectors (Choi et al. 2024, arXiv:2412.12153;
    code: JH-GEECS/CART, src/merging.py `_merge_weights` "CART"): task vectors are taken
    around the average of the fine-tuned models instead of the pre-trained one, so no base
    model is needed; each centred vector keeps its top k = max(1, int(rank_fraction·min(m, n)))
    singular triplets. Defaults from the authors' 8-task config (configs/CART/ViT-b-32_8_CART.yaml:
    prior λ = 2.0, initial_rank_ratio 0.12). The reference truncates only attention/MLP
    matrices of CLIP; here every 2-D tensor is (narrow it with recipe filters). Other tensors
    take the reference's path, full centred vectors, whose sum is zero: θ̄. With two models
    θ_2 − θ̄ = −(θ_1 − θ̄), and a truncated SVD is odd, so the low-rank parts cancel exactly and
    the result is θ̄ (computed without an SVD). Truncated SVDs are exact, from a float64 Gram
    eigendecomposition (`_spectral`).
    """
    need_count("cart", tensors, 2, None, "at least two models")
    avg = torch.zeros_like(tensors[0])
    for x in tensors:
        avg.add_(x)
    avg.div_(len(tensors))
    if avg.dim() != 2 or len(tensors) == 2:
        return avg
    k = cart_rank(avg.shape, rank_fraction)
    low_rank = torch.zeros_like(avg, dtype=torch.float64)
    for x in tensors:
        u, s, v = thin_svd(x - avg, k)
        low_rank.addmm_(u * s, v.T)
        del u, s, v
    return low_rank.mul_(lambda_).to(avg.dtype).add_(avg)
