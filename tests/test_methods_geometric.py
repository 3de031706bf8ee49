"""Geometric and selective merge methods against values derived by hand on tiny tensors.

Covers slerp, nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion, ram,
ramplus_tl and passthrough. Every method is called the way the executor calls it:
`get_method(name)(tensors, base, params)` with recipe parameter names.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergecore.errors import MergeError
from mergecore.methods import get_method

R2 = math.sqrt(2.0)


def T(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def run(name, tensors, base=None, **params):
    return get_method(name)(tensors, base, params)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    "name, base, lo, hi, defaults",
    [
        ("slerp", "required", 1, 1, {"t": "required"}),
        (
            "nuslerp",
            "optional",
            2,
            2,
            {"weight": "required", "nuslerp_flatten": True, "nuslerp_row_wise": False},
        ),
        (
            "multislerp",
            "optional",
            1,
            None,
            {"weight": "required", "normalize_weights": True, "eps": 1e-8},
        ),
        ("karcher", "ignored", 1, None, {"max_iter": 10, "tol": 1e-5}),
        ("model_stock", "required", 2, None, {"filter_wise": False}),
        ("nearswap", "required", 1, 1, {"t": "required"}),
        ("arcee_fusion", "required", 1, 1, {}),
        ("ram", "required", 0, None, {"epsilon": 1e-5}),
        ("ramplus_tl", "required", 0, None, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
        ("passthrough", "ignored", 1, 1, {"scale": 1.0}),
    ],
)
def test_schema_matches_mergekit(name, base, lo, hi, defaults):
    m = get_method(name)
    assert (m.base, m.min_models, m.max_models) == (base, lo, hi)
    got = {p.name: ("required" if p.required else p.default) for p in m.params}
    assert got == defaults
    assert m.summary and m.paper and m.doc


def test_per_model_params():
    assert get_method("nuslerp").param("weight").per_model
    assert get_method("multislerp").param("weight").per_model
    assert get_method("passthrough").param("scale").per_model
    assert get_method("arcee_fusion").randomized  # quantile sampling above 1e6 entries


# ---------------------------------------------------------------------------- slerp


def test_slerp_orthogonal_unit_vectors_midpoint():
    close(run("slerp", [T(0.0, 1.0)], T(1.0, 0.0), t=0.5), [1 / R2, 1 / R2])


def test_slerp_coefficients_apply_to_unnormalised_tensors():
    # Ω = π/2 from the normalised copies; sin(π/4)/sin(π/2) = 1/√2 times each original tensor.
    close(run("slerp", [T(0.0, 3.0)], T(2.0, 0.0), t=0.5), [2 / R2, 3 / R2])
    # t = 1/3: coefficients sin(π/3) and sin(π/6)
    close(
        run("slerp", [T(0.0, 3.0)], T(2.0, 0.0), t=1 / 3),
        [2 * math.sin(math.pi / 3), 3 * math.sin(math.pi / 6)],
    )


def test_slerp_parallel_and_antiparallel_fall_back_to_lerp():
    v = T(1.0, 2.0, 3.0)
    close(run("slerp", [2 * v], v, t=0.25), 0.75 * v + 0.25 * 2 * v)
    close(run("slerp", [-v], v, t=0.25), 0.75 * v - 0.25 * v)


def test_slerp_dot_threshold_is_0_9995():
    def pair(cos):
        return T(1.0, 0.0), T(cos, math.sqrt(1 - cos * cos))

    # |cos| = 0.9996 > 0.9995: linear interpolation exactly.
    a, b = pair(0.9996)
    close(run("slerp", [b], a, t=0.5), 0.5 * a + 0.5 * b, atol=1e-7)
    # cos = 0.999 is below the threshold: the spherical midpoint has unit norm, lerp does not.
    a, b = pair(0.999)
    out = run("slerp", [b], a, t=0.5)
    half = math.acos(0.999) / 2
    close(out, [math.cos(half), math.sin(half)], atol=1e-6)
    assert abs(out.norm().item() - 1.0) < 1e-6
    assert abs((0.5 * a + 0.5 * b).norm().item() - 1.0) > 1e-4


def test_slerp_endpoints_and_shape():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    other = torch.randn(4, 5, generator=g)
    assert torch.equal(run("slerp", [other], base, t=0.0), base)
    assert torch.equal(run("slerp", [other], base, t=1.0), other)
    mid = run("slerp", [other], base, t=0.5)
    assert mid.shape == (4, 5)


def test_slerp_zero_norm_tensor_is_not_normalised():
    # A zero base keeps norm 1 for the angle: cos Ω = 0, so θ = sin(tπ/2) · θ1.
    other = T(3.0, 4.0)
    close(run("slerp", [other], T(0.0, 0.0), t=0.5), other / R2)


def test_slerp_errors():
    with pytest.raises(MergeError):
        run("slerp", [T(1.0, 0.0)], None, t=0.5)
    with pytest.raises(MergeError):
        run("slerp", [T(1.0, 0.0), T(0.0, 1.0)], T(1.0, 1.0), t=0.5)
    with pytest.raises(MergeError):
        get_method("slerp").param("t").coerce(1.5)


# ---------------------------------------------------------------------------- nuslerp


def test_nuslerp_weights_give_t():
    e1, e2 = T(1.0, 0.0), T(0.0, 1.0)
    close(run("nuslerp", [e1, e2], weight=[1.0, 1.0]), [1 / R2, 1 / R2])
    # t = w1 / (w0 + w1) = 0.75
    close(
        run("nuslerp", [e1, e2], weight=[1.0, 3.0]),
        [math.sin(math.pi / 8), math.sin(3 * math.pi / 8)],
    )
    # weights summing to ~0 give t = 0.5
    close(run("nuslerp", [e1, e2], weight=[1.0, -1.0]), [1 / R2, 1 / R2])


def test_nuslerp_with_base_slerps_task_vectors():
    b = T(5.0, -2.0)
    close(
        run("nuslerp", [b + T(1.0, 0.0), b + T(0.0, 1.0)], b, weight=[1.0, 1.0]),
        b + T(1 / R2, 1 / R2),
    )


def test_nuslerp_per_row_and_per_column():
    v0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # last dimension: row 0 is orthogonal, row 1 parallel (linear interpolation)
    out = run("nuslerp", [v0, v1], weight=[1.0, 1.0], nuslerp_flatten=False)
    close(out, [[1 / R2, 1 / R2], [1.0, 0.0]])
    # row_wise: vectors along dim 0 (columns). Column 0: (1,1) vs (0,1), 45°; column 1 of v0
    # is zero (treated as orthogonal): sin(π/4) · (1, 0).
    out = run(
        "nuslerp", [v0, v1], weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True
    )
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(out, [[c * 1, 1 / R2], [c * 2, 0.0]])
    # flattened (default): one vector of 4 entries
    out = run("nuslerp", [v0, v1], weight=[1.0, 1.0])
    cos = 1 / 2  # <(1,0,1,0)/√2, (0,1,1,0)/√2>
    th = math.acos(cos)
    k = math.sin(th / 2) / math.sin(th)
    close(out, k * (v0 + v1))


def test_nuslerp_needs_two_models():
    with pytest.raises(MergeError):
        run("nuslerp", [T(1.0, 0.0)], weight=[1.0])


# ---------------------------------------------------------------------------- multislerp


def test_multislerp_two_orthogonal_vectors_uses_mean_norm():
    # Direction: the spherical midpoint; magnitude: the weighted mean norm (2 + 4) / 2.
    out = run("multislerp", [T(2.0, 0.0), T(0.0, 4.0)], weight=[1.0, 1.0])
    close(out, [3 / R2, 3 / R2], atol=1e-5)


def test_multislerp_single_model_and_one_hot_weights():
    v = T(1.0, -2.0, 0.5)
    assert torch.equal(run("multislerp", [v], weight=[1.0]), v)
    w = T(0.3, 0.1, 2.0)
    close(run("multislerp", [v, w], weight=[1.0, 0.0]), v, atol=1e-5)


def test_multislerp_with_base():
    b = T(1.0, 1.0)
    out = run("multislerp", [b + T(2.0, 0.0), b + T(0.0, 4.0)], b, weight=[0.5, 0.5])
    close(out, b + T(3 / R2, 3 / R2), atol=1e-5)


def test_multislerp_three_symmetric_vectors():
    e = torch.eye(3)
    out = run("multislerp", [e[0], e[1], e[2]], weight=[1.0, 1.0, 1.0])
    close(out, torch.full((3,), 1 / math.sqrt(3)), atol=1e-5)


def test_multislerp_antipodal():
    v = T(1.0, 2.0)
    # two models: linear fallback w0·v0 + w1·v1 = 0
    close(run("multislerp", [v, -v], weight=[1.0, 1.0]), [0.0, 0.0])
    with pytest.raises(MergeError):
        run("multislerp", [v, -v, T(2.0, -1.0)], weight=[1.0, 1.0, 0.0])


# ---------------------------------------------------------------------------- karcher


def test_karcher_two_vectors():
    # Mean direction of e1 and e2 is (1,1)/√2; scale is the mean norm (2 + 4) / 2.
    close(run("karcher", [T(2.0, 0.0), T(0.0, 4.0)]), [3 / R2, 3 / R2], atol=1e-5)


def test_karcher_is_riemannian_not_euclidean():
    # Units e1, e1, e2: minimise 2φ² + (π/2 − φ)²  =>  φ = π/6 from e1 (the Euclidean mean
    # direction would be atan(1/2) ≈ 26.6°).
    out = run("karcher", [T(1.0, 0.0), T(1.0, 0.0), T(0.0, 1.0)], max_iter=50, tol=1e-7)
    close(out, [math.cos(math.pi / 6), math.sin(math.pi / 6)], atol=1e-5)


def test_karcher_single_and_zero_inputs():
    v = T(1.0, 2.0)
    assert torch.equal(run("karcher", [v]), v)
    # a zero tensor does not pull on the direction but counts in the mean norm
    close(run("karcher", [T(3.0, 4.0), T(0.0, 0.0)]), [1.5, 2.0], atol=1e-6)
    close(run("karcher", [T(0.0, 0.0), T(0.0, 0.0)]), [0.0, 0.0])


# ---------------------------------------------------------------------------- model_stock


def test_model_stock_ratio_from_angle():
    b = T(1.0, 1.0)
    c = 0.5  # 60 degrees between the task vectors
    t1, t2 = T(1.0, 0.0), T(c, math.sqrt(1 - c * c))
    ratio = 2 * c / (1 + c)  # = 2/3
    out = run("model_stock", [b + t1, b + t2], b)
    close(out, b + ratio * (t1 + t2) / 2, atol=1e-6)


def test_model_stock_extremes():
    b = T(1.0, -1.0, 2.0)
    # orthogonal task vectors: ratio 0, the base
    close(run("model_stock", [b + T(1.0, 0.0, 0.0), b + T(0.0, 2.0, 0.0)], b), b)
    # same direction: ratio N/N = 1, the plain average
    x1, x2 = b + T(1.0, 1.0, 0.0), b + T(3.0, 3.0, 0.0)
    close(run("model_stock", [x1, x2], b), (x1 + x2) / 2)
    # opposite directions with two models: 1 + (N−1)cos = 0 is singular, the base is kept
    close(run("model_stock", [b + T(1.0, 0.0, 0.0), b - T(1.0, 0.0, 0.0)], b), b)


def test_model_stock_three_models_mean_cosine():
    b = torch.zeros(3)
    e = torch.eye(3)
    t = [e[0], e[0] + e[1], e[2]]
    cos = (1 / R2 + 0.0 + 0.0) / 3  # mean over the pairs (0,1), (0,2), (1,2)
    ratio = 3 * cos / (1 + 2 * cos)
    close(run("model_stock", t, b), ratio * (t[0] + t[1] + t[2]) / 3)


def test_model_stock_filter_wise():
    b = torch.zeros(2, 2)
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x2 = torch.tensor([[0.5, math.sqrt(0.75)], [0.0, 1.0]])
    out = run("model_stock", [x1, x2], b, filter_wise=True)
    # row 0: cos 0.5 -> ratio 2/3; row 1: cos 0 -> ratio 0
    close(out, [[2 / 3 * 0.75, 2 / 3 * math.sqrt(0.75) / 2], [0.0, 0.0]])
    # without filter_wise: one ratio from the cosine of the flattened task vectors
    flat = run("model_stock", [x1, x2], b)
    c = float(torch.dot(x1.flatten(), x2.flatten()) / (x1.norm() * x2.norm()))
    close(flat, (2 * c / (1 + c)) * (x1 + x2) / 2)
    # a 1-D tensor with filter_wise is a single filter
    v1, v2 = T(1.0, 0.0), T(0.5, math.sqrt(0.75))
    close(run("model_stock", [v1, v2], T(0.0, 0.0), filter_wise=True), 2 / 3 * (v1 + v2) / 2)


def test_model_stock_errors():
    with pytest.raises(MergeError):
        run("model_stock", [T(1.0, 2.0)], T(0.0, 0.0))
    with pytest.raises(MergeError):
        run("model_stock", [T(1.0, 2.0), T(2.0, 1.0)], None)


# ---------------------------------------------------------------------------- nearswap


def test_nearswap():
    base = T(0.0, 0.0, 0.0, 0.0)
    other = T(0.05, 0.2, -1.0, 0.0)
    # weight = clamp(t / |diff|, 0, 1) = 1, 0.5, 0.1, 1
    close(run("nearswap", [other], base, t=0.1), [0.05, 0.1, -0.1, 0.0])
    # t = 0: the base
    close(run("nearswap", [other], base, t=0.0), base)
    with pytest.raises(MergeError):
        run("nearswap", [other, other], base, t=0.1)
    with pytest.raises(MergeError):
        run("nearswap", [other], None, t=0.1)


# ---------------------------------------------------------------------------- arcee_fusion


def test_arcee_fusion_keeps_only_outlier_changes():
    base = torch.zeros(9)
    # changes 0.01..0.08 and one of 5.0, shuffled; importance = |Δ| · KL (one KL for a vector)
    delta = T(0.03, 0.07, 5.0, 0.01, 0.05, 0.08, 0.02, 0.06, 0.04)
    # quantile indices ⌊q·8⌋ = 2, 4, 6 -> 0.03, 0.05, 0.07: threshold 0.05 + 1.5·0.04 = 0.11
    out = run("arcee_fusion", [base + delta], base)
    close(out, T(0, 0, 5.0, 0, 0, 0, 0, 0, 0))


def test_arcee_fusion_identical_models_and_rows():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    assert torch.equal(run("arcee_fusion", [base.clone()], base), base)
    other = base + 0.01 * torch.randn(4, 6, generator=g)
    out = run("arcee_fusion", [other], base)
    # every entry is either the base's or the other model's
    assert bool(((out == base) | (out == other)).all())
    with pytest.raises(MergeError):
        run("arcee_fusion", [other, other], base)


# ---------------------------------------------------------------------------- ram


def test_ram_unique_kept_shared_averaged():
    base = T(1.0, 1.0, 1.0, 1.0)
    tau1 = T(1.0, 2.0, 0.0, 0.0)
    tau2 = T(3.0, 0.0, 4.0, 1e-6)  # 1e-6 <= epsilon: untouched
    out = run("ram", [base + tau1, base + tau2], base)
    close(out, base + T(2.0, 2.0, 4.0, 0.0))
    # a larger epsilon hides small changes
    out = run("ram", [base + tau1, base + tau2], base, epsilon=1.5)
    close(out, base + T(3.0, 2.0, 4.0, 0.0))
    assert torch.equal(run("ram", [], base), base)
    with pytest.raises(MergeError):
        run("ram", [base], None)


def test_ramplus_tl_rescales_unique_changes():
    base = torch.zeros(5)
    tau1 = T(1.0, 2.0, 5.0, 0.0, 0.0)  # shared 1, unique 2 -> rho 0.5
    tau2 = T(3.0, 0.0, 0.0, 4.0, 0.0)  # shared 1, unique 1 -> rho 1.0
    # r = 1, alpha = 0.8: lambda1 = 1 + 0.5 = 1.5, lambda2 = 1 + min(1, 0.8) = 1.8
    out = run("ramplus_tl", [tau1, tau2], base, r=1.0, alpha=0.8)
    close(out, [2.0, 3.0, 7.5, 7.2, 0.0])
    # defaults r = 0.1, alpha = 0.2: rho is capped at 0.2, lambda = 1.02 for both
    out = run("ramplus_tl", [tau1, tau2], base)
    close(out, [2.0, 2.04, 5.1, 4.08, 0.0])


def test_ramplus_tl_no_unique_entries():
    # model 2 has no unique entry: rho = shared / epsilon, capped at alpha; no effect anyway
    base = torch.zeros(3)
    tau1 = T(1.0, 1.0, 2.0)
    tau2 = T(3.0, 1.0, 0.0)
    out = run("ramplus_tl", [tau1, tau2], base, r=1.0, alpha=0.5)
    # model 1: shared 2, unique 1 -> rho 2 -> lambda 1.5 on entry 2
    close(out, [2.0, 1.0, 3.0])


# ---------------------------------------------------------------------------- passthrough


def test_passthrough():
    v = T(1.0, -2.0)
    assert torch.equal(run("passthrough", [v]), v)
    close(run("passthrough", [v], scale=[0.5]), [0.5, -1.0])
    with pytest.raises(MergeError):
        run("passthrough", [v, v])


# ---------------------------------------------------------------------------- purity


@pytest.mark.parametrize(
    "name, n, with_base, params",
    [
        ("slerp", 1, True, {"t": 0.3}),
        ("nuslerp", 2, True, {"weight": [0.3, 0.7], "nuslerp_flatten": False}),
        ("nuslerp", 2, False, {"weight": [0.3, 0.7]}),
        ("multislerp", 3, True, {"weight": [0.2, 0.3, 0.5]}),
        ("multislerp", 3, False, {"weight": [0.2, 0.3, 0.5]}),
        ("karcher", 3, False, {}),
        ("model_stock", 3, True, {"filter_wise": True}),
        ("nearswap", 1, True, {"t": 0.05}),
        ("arcee_fusion", 1, True, {}),
        ("ram", 3, True, {}),
        ("ramplus_tl", 3, True, {}),
        ("passthrough", 1, False, {"scale": [2.0]}),
    ],
)
def test_inputs_are_not_modified(name, n, with_base, params):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=g) if with_base else None
    tensors = [torch.randn(6, 8, generator=g) for _ in range(n)]
    if base is not None and name in ("ram", "ramplus_tl"):
        tensors = [base + (t - base) * (t > 0) for t in tensors]  # sparse task vectors
    before = [t.clone() for t in tensors]
    base_before = None if base is None else base.clone()
    out = run(name, tensors, base, **params)
    assert out.shape == (6, 8) and torch.isfinite(out).all()
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    assert base is None or torch.equal(base, base_before)
