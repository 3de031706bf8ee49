"""consensus_ta, magmax and pcb against the authors' code (a few lines transcribed below as
reference functions) and against values worked out by hand on tiny tensors; errors, owned
(streaming) inputs and full merges of tiny checkpoints through a recipe."""

from __future__ import annotations

import copy

import pytest
import torch

from _merge_helpers import load_weights
from mergecore.errors import MergeError
from mergecore.merging import merge
from mergecore.methods import get_method
from mergecore.methods.base import OwnedInputs
from mergecore.recipe import recipe_from_dict


def T(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def run(name, tensors, base, **params):
    """Call as the executor does, with recipe names (`lambda_=` here is the recipe's `lambda`)."""
    return get_method(name)(tensors, base, {k.rstrip("_"): v for k, v in params.items()})


def family(n, shape, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


# ------------------------------------------------------------------ references (authors' code)


def ref_consensus(flat_ft, flat_ptm, lam, k, alpha):
    """nik-dim/tall_masks: src/utils/tallmask_utils.py `generate_task_masks` and
    `construct_consensus_mask`, src/eval/aggregation.py (method consensus, TA with k=100), applied
    as task_vector.apply_to(ptm, scaling_coef=alpha)."""
    tv_flat_checks = flat_ft - flat_ptm
    tv = tv_flat_checks.sum(0)
    flat_multi = flat_ptm + tv
    diff_pt_ft = (flat_ptm - flat_ft).abs()
    diff_multi_ft = (flat_multi - flat_ft).abs()
    mask = diff_pt_ft > diff_multi_ft * lam
    consensus_mask = torch.zeros_like(mask[0]).float()
    for m in mask:
        consensus_mask = consensus_mask + m.float()
    consensus_mask = consensus_mask.float() >= k
    merged_tv = tv * consensus_mask
    return flat_ptm + alpha * merged_tv


def ref_merge_max_abs(task_vectors):
    """danielm1405/magmax: src/merging/task_vectors.py `merge_max_abs` (one key)."""
    max_abs_tensor = task_vectors[0]
    for current_tensor in task_vectors[1:]:
        max_abs_tensor = torch.where(current_tensor.abs() >= max_abs_tensor.abs(), current_tensor, max_abs_tensor)
    return max_abs_tensor


def _normalize(x, dim=0):
    min_values, _ = torch.min(x, dim=dim, keepdim=True)
    max_values, _ = torch.max(x, dim=dim, keepdim=True)
    y = (x - min_values) / (max_values - min_values)
    return y


def _clamp(x, min_ratio=0, max_ratio=0):
    d = x.size(1)
    sorted_x, _ = torch.sort(x, dim=1)
    min = sorted_x[:, int(d * min_ratio)].unsqueeze(1)  # noqa: A001 (as in the source)
    max = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)  # noqa: A001
    return torch.clamp(x, min, max)


def ref_pcb_merge(flat_task_checks, pcb_ratio=0.1):
    """duguodong7/pcb-merging: pcb-merging.py `PCB_merge` (normalize, clamp, act = tanh)."""
    all_checks = flat_task_checks.clone()
    n, d = all_checks.shape
    all_checks_abs = _clamp(torch.abs(all_checks), min_ratio=0.0001, max_ratio=0.0001)
    clamped_all_checks = torch.sign(all_checks) * all_checks_abs
    self_pcb = _normalize(all_checks_abs, 1) ** 2
    self_pcb_act = torch.exp(n * self_pcb)
    cross_pcb = all_checks * torch.sum(all_checks, dim=0)
    cross_pcb_act = torch.tanh(cross_pcb)
    task_pcb = self_pcb_act * cross_pcb_act
    scale = _normalize(_clamp(task_pcb, 1 - pcb_ratio, 0), dim=1)
    tvs = clamped_all_checks
    merged_tv = torch.sum(tvs * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged_tv


# ------------------------------------------------------------------ schema and errors


@pytest.mark.parametrize("name, lo, defaults", [
    ("consensus_ta", 2, {"tall_mask_lambda": 0.6, "k": 2, "lambda": 1.0}),
    ("magmax", 1, {"lambda": 0.5}),
    ("pcb", 2, {"ratio": 0.1, "lambda": 1.0}),
])
def test_schema(name, lo, defaults):
    m = get_method(name)
    assert (m.base, m.min_models, m.max_models) == ("required", lo, None)
    assert {p.name: p.default for p in m.params} == defaults
    assert "θ" in m.formula and "arXiv:" in m.paper and m.doc
    assert ("streaming" in m.tags) == (name == "magmax") and "matrices" not in m.tags


@pytest.mark.parametrize("name, n", [("consensus_ta", 1), ("magmax", 0), ("pcb", 1)])
def test_one_line_errors(name, n):
    base, models = family(2, (3, 4), 0)
    with pytest.raises(MergeError, match=f"^{name} needs a base_model$"):
        run(name, models, None)
    with pytest.raises(MergeError, match=f"^{name} takes at least .* besides the base_model, got {n}$"):
        run(name, models[:n], base)


# ------------------------------------------------------------------ consensus_ta


def test_consensus_by_hand():
    base = T(1.0, 1.0, 1.0, 1.0, 1.0)
    t1 = T(1.0, 0.2, 0.0, -1.0, 0.5)
    t2 = T(1.0, -0.1, 0.3, 1.0, 0.0)
    t3 = T(0.0, 0.0, 0.0, 0.0, 0.0)
    # τ_MTL = (2, 0.1, 0.3, 0, 0.5). λ = 1, m_t = [|τ_t| > |τ_MTL − τ_t|] (strict: 1 > 1 is false):
    m = [[0, 1, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    mtl = t1 + t2 + t3
    for mt, t in zip(m, (t1, t2, t3)):
        assert torch.equal((t.abs() > (mtl - t).abs()).float(), T(*mt))
    out = run("consensus_ta", [base + t1, base + t2, base + t3], base, tall_mask_lambda=1.0, k=1, lambda_=0.5)
    torch.testing.assert_close(out, base + 0.5 * mtl * T(0, 1, 1, 0, 1), atol=1e-7, rtol=0)
    # λ = 0.4: m1 = (1, 1, 0, 1, 1), m2 = (1, 1, 1, 1, 0), m3 = 0 (0 > 0 is false): 2 votes at 0, 1, 3
    out = run("consensus_ta", [base + t1, base + t2, base + t3], base, tall_mask_lambda=0.4, k=2, lambda_=1.0)
    torch.testing.assert_close(out, base + T(2.0, 0.1, 0, 0, 0), atol=1e-7, rtol=0)
    # k = 0 is task arithmetic; k above the number of models keeps the base
    out = run("consensus_ta", [base + t1, base + t2], base, k=0, lambda_=1.0)
    torch.testing.assert_close(out, base + t1 + t2, atol=1e-7, rtol=0)
    assert torch.equal(run("consensus_ta", [base + t1, base + t2], base, k=3), base)


@pytest.mark.parametrize("lam, k, alpha", [(0.6, 2, 1.0), (0.2, 2, 0.4), (0.5, 1, 0.7), (0.4, 3, 1.0)])
def test_consensus_matches_the_authors_code(lam, k, alpha):
    base, models = family(4, (16, 24), 1)
    out = run("consensus_ta", models, base, tall_mask_lambda=lam, k=k, lambda_=alpha)
    ref = ref_consensus(torch.stack([m.reshape(-1) for m in models]), base.reshape(-1), lam, k, alpha)
    torch.testing.assert_close(out, ref.reshape(base.shape), atol=1e-6, rtol=0)
    kept = (out != base).float().mean().item()
    assert 0.0 < kept < 1.0  # the masks drop some but not all entries


def test_consensus_one_dimensional_tensor_takes_the_same_rule():
    base, models = family(3, (40,), 2)
    out = run("consensus_ta", models, base)
    ref = ref_consensus(torch.stack(models), base, 0.6, 2, 1.0)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ magmax


def test_magmax_by_hand_and_ties():
    base = T(0.0, 1.0, 2.0, 3.0)
    t1 = T(1.0, -2.0, 0.5, 1.0)
    t2 = T(-3.0, 1.0, -0.5, 0.0)
    out = run("magmax", [base + t1, base + t2], base, lambda_=1.0)
    # entry 2 ties (|0.5| = |−0.5|): the later model wins, as in the authors' `>=`
    torch.testing.assert_close(out, base + T(-3.0, -2.0, -0.5, 1.0), atol=1e-7, rtol=0)
    torch.testing.assert_close(run("magmax", [base + t1], base), base + 0.5 * t1, atol=1e-7, rtol=0)


@pytest.mark.parametrize("shape", [(12, 10), (33,), ()])
def test_magmax_matches_the_authors_code(shape):
    base, models = family(5, shape, 3)
    out = run("magmax", models, base, lambda_=0.7)
    ref = base + 0.7 * ref_merge_max_abs([m - base for m in models])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_magmax_streams_owned_inputs_once_in_order():
    base, models = family(3, (6, 7), 4)
    reads: list[int] = []

    def loader(i):
        def load():
            reads.append(i)
            return models[i].clone()
        return load

    owned = OwnedInputs([loader(i) for i in range(3)])
    out = get_method("magmax")(owned, base, {"lambda": 0.5})
    assert reads == [0, 1, 2]
    torch.testing.assert_close(out, run("magmax", models, base), atol=0, rtol=0)


# ------------------------------------------------------------------ pcb


@pytest.mark.parametrize("n, shape, ratio", [(2, (20, 30), 0.1), (3, (64,), 0.2), (4, (50, 40), 0.05),
                                             (3, (123, 97), 1.0)])
def test_pcb_matches_the_authors_code(n, shape, ratio):
    base, models = family(n, shape, 5 + n)
    out = run("pcb", models, base, ratio=ratio, lambda_=1.2)
    flat = torch.stack([(m - base).reshape(-1) for m in models])
    ref = base + 1.2 * ref_pcb_merge(flat, pcb_ratio=ratio).reshape(shape)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_pcb_drops_all_but_the_top_ratio_by_hand():
    base = torch.zeros(10)
    t1 = T(1.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    t2 = T(0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1)
    out = run("pcb", [t1, t2], base, ratio=0.2)
    # d = 10: |τ| is clipped to [sorted[0], sorted[int(10·0.9999 − 1)] = sorted[8]]: τ1[0] -> 0.9, τ2[0] -> 0.1.
    # Scores exp(2·Norm(|τ̂|)²)·tanh(τ⊙(τ1 + τ2)): τ1 -> e²·tanh(1.9) at 0, e²·tanh(0.9) at 9, less elsewhere;
    # τ2 -> e²·tanh(1.71) at 0, e²·tanh(0.1) at 9, 0 elsewhere. The floor is sorted[int(10·0.8)] = the
    # second largest score, so in both rows only entry 0 keeps a weight (1): (0.9 + 0.1) / 2.
    torch.testing.assert_close(out, T(0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0), atol=1e-7, rtol=0)


def test_pcb_zero_task_vector_adds_nothing_and_many_models_stay_finite():
    base, models = family(2, (8, 9), 9)
    out = run("pcb", models + [base.clone()], base)  # the reference gives NaN here
    assert torch.isfinite(out).all()
    base, models = family(120, (4, 5), 10)  # exp(n·x²) overflows float32 in the reference (n > 88)
    out = run("pcb", models, base)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_inputs_are_not_modified():
    base, models = family(3, (6, 8), 11)
    before = [m.clone() for m in models]
    for name in ("consensus_ta", "magmax", "pcb"):
        run(name, models, base)
        assert all(torch.equal(a, b) for a, b in zip(models, before)), name


# ------------------------------------------------------------------ full merges through a recipe


@pytest.mark.parametrize("name, params", [
    ("consensus_ta", {"tall_mask_lambda": 0.4, "k": 1, "lambda": 0.8}),
    ("magmax", {"lambda": 0.5}),
    ("pcb", {"ratio": 0.2, "lambda": 1.1}),
])
def test_full_merge_of_tiny_models(llama_family, tmp_path, name, params):
    recipe = recipe_from_dict({
        "merge_method": name, "base_model": str(llama_family["base"]),
        "models": [{"model": str(llama_family["a"])}, {"model": str(llama_family["b"])}],
        "parameters": copy.deepcopy(params), "dtype": "float32"})
    merge(recipe, tmp_path / "out")
    out = load_weights(tmp_path / "out")
    base, a, b = (load_weights(llama_family[k]) for k in ("base", "a", "b"))
    assert set(out) == set(base)
    method = get_method(name)
    for key in out:
        expected = method([a[key].float(), b[key].float()], base[key].float(), method.resolve_params(params, 2)[0])
        torch.testing.assert_close(out[key], expected, atol=1e-6, rtol=0, msg=key)
    changed = [k for k in out if not torch.equal(out[k], base[k])]
    assert len(changed) > len(out) // 2
