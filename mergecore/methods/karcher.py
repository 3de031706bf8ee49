"""Karcher (Riemannian / Fréchet) mean of the models on the unit hypersphere."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.methods.base import BaseTensor, Range, Tensors, merge_method


def karcher_mean(
    tensors: list[torch.Tensor],
    alphas: list[float],
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Weighted Karcher mean of the directions, scaled by the weighted mean of the norms.

    Inputs with norm <= tol are left out of the direction (their weight is renormalised away)
    but still count in the norm average Σ αi‖xi‖. The iteration starts at the normalised
    weighted mean of the unit vectors (or the first unit vector if that mean is ~0) and stops
    after max_iter steps or when the Riemannian gradient's norm drops below tol.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32

    norms: list[torch.Tensor] = []
    units: list[torch.Tensor | None] = []
    for x in tensors:
        n = torch.linalg.vector_norm(x.to(dtype))
        norms.append(n)
        units.append(None if n.item() == 0.0 else (x / n).to(x.dtype))

    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    w = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]

    mean = torch.zeros_like(us[0])
    for a, u in zip(w, us):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    if mean_norm.item() < tol:
        mean = us[0].clone()
    else:
        mean = mean.div_(mean_norm).to(mean.dtype)

    flat_mean = mean.reshape(-1)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(w, us):
            dot = torch.clamp(torch.dot(flat_mean, u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            step = u - dot * mean
            tangent += step.mul_(a * (theta / torch.sin(theta)))
            del step
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        new = torch.cos(tangent_norm) * mean
        new += torch.sin(tangent_norm) * tangent.div_(tangent_norm)
        mean = new.to(mean.dtype)
        del new, tangent
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = mean.div_(unit_norm).to(mean.dtype)
        flat_mean = mean.reshape(-1)

    scale = sum(a * n for a, n in zip(alphas, norms))
    return mean.mul_(scale)


@merge_method(summary="Riemannian (Karcher) mean of the models' directions, rescaled by their mean norm",
              formula="θ = Karcher mean of θᵢ/|θᵢ| · mean |θᵢ|", tags=("geometric",),
              paper="Karcher 1977, Riemannian center of mass and mollifier smoothing (CPAM)")
def karcher(tensors: Tensors, base: BaseTensor, *,
            max_iter: Annotated[int, Range(0, None), "maximum number of iterations"] = 10,
            tol: Annotated[float, Range(0.0, None), "convergence tolerance"] = 1e-5) -> torch.Tensor:
    """θ = (1/N Σ‖θi‖) · m, m = argmin_{‖m‖=1} Σ d(m, θi/‖θi‖)², d the great-circle angle.

    The Karcher (Riemannian centre of mass) mean of Karcher (1977) on the unit sphere, as in
    mergekit: each flattened tensor is split into its norm and direction; the mean direction m
    is found by the fixed-point iteration m ← Exp_m(Σ αi · θi'/sin θi' · (ui − ⟨ui, m⟩ m))
    (θi' = arccos⟨ui, m⟩, equal weights αi = 1/N, at most max_iter steps, stopping when the
    tangent step's norm is below tol), starting from the normalised Euclidean mean; the result
    is m times the average norm. Tensors with norm ≤ tol do not pull on the direction.
    """
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    return karcher_mean(tensors, alphas, max_iter=max_iter, tol=tol)
