"""Spherical interpolation: SLERP (two models), NuSLERP and Multi-SLERP (mergekit semantics)."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.errors import MergeError
from mergecore.methods.base import BaseTensor, Ends, PerModel, Range, Tensors, merge_method, need_base, need_count

# |cos θ| above this counts as parallel and falls back to linear interpolation (mergekit's value).
DOT_THRESHOLD = 0.9995
# Norms below this are treated as 1 when normalising for the angle (mergekit's `eps`).
SLERP_EPS = 1e-8
# Elements per chunk of full-precision scratch, so scratch memory does not grow with the tensor.
_CHUNK = 1024 * 1024


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def slerp_tensors(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = SLERP_EPS,
) -> torch.Tensor:
    """SLERP from v0 (t=0) to v1 (t=1) of the whole flattened tensors, computed in chunks.

    The angle comes from copies normalised by their L2 norms (a norm <= eps counts as 1); the
    interpolation weights are applied to the *unnormalised* tensors, so the result's norm
    follows the inputs'. When |cos θ| > dot_threshold the weights are (1 - t, t).
    """
    dtype = _work_dtype(v0)
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor(t, dtype=dtype).reshape(1, 1)
    n = a.shape[1]
    if n == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)

    # Norm of the per-chunk norms (mergekit's chunked order of summation).
    na_parts, nb_parts = [], []
    for s in range(0, n, _CHUNK):
        x, y = a[:, s : s + _CHUNK].to(dtype), b[:, s : s + _CHUNK].to(dtype)
        na_parts.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        nb_parts.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))
        del x, y
    norm_a = torch.linalg.vector_norm(torch.stack(na_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(nb_parts), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)

    dot_parts = []
    for s in range(0, n, _CHUNK):
        x = a[:, s : s + _CHUNK].to(dtype) / norm_a
        x.mul_(b[:, s : s + _CHUNK].to(dtype) / norm_b)
        dot_parts.append(x.sum(dim=1, keepdim=True))
        del x
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)

    if bool(dot.abs() > dot_threshold):  # compared in float32, as mergekit does
        coef_a, coef_b = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - tt) * theta) / sin_theta
        coef_b = torch.sin(tt * theta) / sin_theta

    out = torch.empty(a.shape, dtype=dtype, device=a.device)
    for s in range(0, n, _CHUNK):
        chunk = out[:, s : s + _CHUNK]
        torch.mul(coef_a, a[:, s : s + _CHUNK].to(dtype), out=chunk)
        chunk.add_(coef_b * b[:, s : s + _CHUNK].to(dtype))
    return out.reshape(v0.shape)


@merge_method(base="required", max_models=1, tags=("geometric",),
              summary="spherical interpolation between the base and one other model",
              formula="θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁,  cos Ω = θ̂₀·θ̂₁",
              paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); used for model "
                    "merging by mergekit", grid={"t": (0.3, 0.5, 0.7)})
def slerp(tensors: Tensors, base: BaseTensor, *,
          t: Annotated[float, Range(0.0, 1.0), Ends("0 = {base} (base)", "1 = {other}"),
                       "interpolation factor: 0 gives the base, 1 the other model"]) -> torch.Tensor:
    """θ = sin((1−t)Ω)/sin Ω · θ0 + sin(tΩ)/sin Ω · θ1 with cos Ω = ⟨θ0/‖θ0‖, θ1/‖θ1‖⟩.

    Spherical linear interpolation (Shoemake, SIGGRAPH 1985), applied to model weights as in
    mergekit: each tensor is flattened, the angle Ω is measured between the L2-normalised
    copies (a norm ≤ 1e-8 is left unnormalised), and the coefficients are applied to the
    original, unnormalised tensors of the base θ0 and the other model θ1. When the tensors are
    nearly parallel or antiparallel (|cos Ω| > 0.9995, mergekit's DOT_THRESHOLD) it falls back to
    linear interpolation (1−t)·θ0 + t·θ1.
    """
    base = need_base("slerp", base)
    need_count("slerp", tensors, 1, 1, "the base_model and exactly one other model")
    return slerp_tensors(t, base, tensors[0])


def nuslerp_tensors(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """NuSLERP of two tensors: over the flattened tensors, or per vector along the last
    dimension, or (row_wise) per vector along the first dimension.

    Vectors are normalised with their norms clamped to >= 1e-7; vectors with
    1 − cos²θ <= eps² are interpolated linearly. The result keeps the inputs' magnitudes.
    """
    shape = v0.shape
    if flatten or v0.dim() == 0:
        v0 = v0.reshape(-1)
        v1 = v1.reshape(-1)
    elif row_wise:
        v0 = v0.transpose(0, -1)
        v1 = v1.transpose(0, -1)

    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u0.mul_(v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7))
    cos = u0.sum(dim=-1, keepdim=True).clamp(-1, 1)
    del u0
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)

    any_col = bool(colinear.any())
    all_col = any_col and bool(colinear.all())
    if all_col:
        out = (1 - t) * v0
        out.add_(t * v1)
    else:
        out = torch.sin((1 - t) * theta) * v0
        out.add_(torch.sin(t * theta) * v1)
        out.div_(sin_theta)
        if any_col:
            lerp = (1 - t) * v0
            lerp.add_(t * v1)
            out = torch.where(colinear, lerp, out)
    if row_wise and not flatten and out.dim() > 0:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method(base="optional", min_models=2, max_models=2, tags=("geometric",), starting={"weight": 1.0},
              summary="SLERP of two models (or of their task vectors when a base is given) with weights",
              formula="θ = slerp(θ₁, θ₂; w₂ / (w₁ + w₂))", paper="Shoemake 1985 (SLERP); NuSLERP as defined by mergekit")
def nuslerp(tensors: Tensors, base: BaseTensor, *,
            weight: Annotated[PerModel[float], "relative weight of each of the two models"],
            nuslerp_flatten: Annotated[bool, "treat each tensor as one flat vector"] = True,
            nuslerp_row_wise: Annotated[
                bool, "without flattening, interpolate vectors along dim 0 instead of the last dim"] = False,
            ) -> torch.Tensor:
    """θ = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1 with t = w1/(w0 + w1).

    mergekit's NuSLERP: spherical interpolation (Shoemake 1985) of two models v0, v1 with the
    interpolation factor taken from their weights (t = 0.5 when |w0 + w1| < 1e-6). With a base
    model θ0 it interpolates the task vectors v_i = θi − θ0 and adds the base back. By default
    each tensor is one flattened vector; with nuslerp_flatten false each row (last dimension),
    or with nuslerp_row_wise each column (first dimension), is interpolated separately. Nearly
    colinear vectors (1 − cos²Ω ≤ 1e-16) are interpolated linearly.
    """
    need_count("nuslerp", tensors, 2, 2, "exactly two models besides the base_model")
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return nuslerp_tensors(
            t, tensors[0], tensors[1], row_wise=nuslerp_row_wise, flatten=nuslerp_flatten
        )
    out = nuslerp_tensors(
        t,
        tensors[0] - base,
        tensors[1] - base,
        row_wise=nuslerp_row_wise,
        flatten=nuslerp_flatten,
    )
    return out.add_(base)


@merge_method(base="optional", tags=("geometric",), starting={"weight": 1.0},
              summary="weighted spherical barycentre of any number of models (or task vectors)",
              formula="θ = spherical barycentre of θᵢ with weights wᵢ",
              paper="Goddard 2025, Multi-SLERP (goddard.blog); implemented in mergekit")
def multislerp(tensors: Tensors, base: BaseTensor, *, weight: Annotated[PerModel[float], "weight of each model"],
               normalize_weights: Annotated[bool, "divide the weights by their sum"] = True,
               eps: Annotated[float, Range(0.0, None), "small constant for numerical stability"] = 1e-8,
               ) -> torch.Tensor:
    """θ = (Σ wi‖vi‖) · Exp_m(Σ wi (ui − ⟨ui, m⟩ m)) with ui = vi/(‖vi‖+ε), m = Σ wi ui/‖Σ wi ui‖.

    mergekit's Multi-SLERP, a barycentric interpolation on the hypersphere (generalising SLERP,
    Shoemake 1985, to many points): the flattened models vi (task vectors θi − θ0 when a base θ0
    is given) are projected to the unit sphere, mapped to the tangent space at their weighted
    Euclidean mean direction m, averaged there, mapped back with Exp_m(v) = cos‖v‖·m +
    sin‖v‖·v/‖v‖ (‖v‖ + ε is used), and rescaled by the weighted mean norm; the base is added
    back. A single model is returned unchanged. If the weighted mean of the unit vectors
    vanishes, two models fall back to w0·v0 + w1·v1 and more models are an error.
    """
    need_count("multislerp", tensors, 1, None, "at least one model besides the base_model")
    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    dtype = tensors[0].dtype
    w = torch.tensor(list(weight), dtype=dtype, device=tensors[0].device)
    if normalize_weights:
        w = w / w.sum()

    # Unit vectors u_i, built in place on the (owned) task vectors / copies.
    units: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    for x in tensors:
        v = (x - base) if base is not None else x.clone()
        v = v.reshape(1, -1)
        nrm = torch.norm(v, dim=-1, keepdim=True)
        norms.append(nrm)
        units.append(v.div_(nrm + eps))

    mean = units[0] * w[0]
    for wi, u in zip(w[1:], units[1:]):
        mean.add_(u * wi)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            # Linear fallback on the unnormalised vectors.
            res = tensors[0] - base if base is not None else tensors[0].clone()
            res.mul_(w[0])
            other = tensors[1] - base if base is not None else tensors[1]
            res.add_(other * w[1])
            if base is not None:
                res.add_(base)
            return res.reshape(shape)
        raise MergeError(
            "multislerp: the weighted sum of the unit input vectors is zero (antipodal inputs "
            "whose weights cancel); use different weights"
        )
    mean.div_(mean_norm)

    tangent = None
    for wi, u in zip(w, units):
        d = (u * mean).sum(-1, keepdim=True)
        tv = u.sub_(d * mean)  # u is no longer needed after this
        tv.mul_(wi)
        if tangent is None:
            tangent = tv
        else:
            tangent.add_(tv)
    del units
    assert tangent is not None
    tnorm = torch.norm(tangent) + eps
    out = mean.mul_(torch.cos(tnorm))
    out.add_(tangent.mul_(torch.sin(tnorm) / tnorm))
    avg_norm = (torch.cat(norms).squeeze(-1) * w).sum()
    out.mul_(avg_norm)
    out = out.reshape(shape)
    if base is not None:
        out.add_(base)
    return out
