"""tsv_m, iso_c, iso_cts and cart against the reference code transcribed below (FusionBench and the
CART authors' repository, run in float64 with plain torch.linalg.svd), against the papers'
equations on rank-deficient inputs, plus fallbacks, errors, streaming, cost, --dry-run and a full
merge of tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from _merge_helpers import load_weights, write_recipe
from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.merging import merge
from mergecore.methods import get_method
from mergecore.methods._spectral import inv_sqrt_gram, thin_svd
from mergecore.methods.base import OwnedInputs
from mergecore.recipe import recipe_from_dict

SHAPES = [(9, 7), (7, 9), (8, 8), (12, 5)]


def run(name, tensors, base=None, **params):
    return get_method(name)(tensors, base, params)


def family(n, shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def low_rank(shape, rank, g):
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


def close(actual, expected, atol=2e-5):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=1e-5)


# --------------------------------------------------------------- transcribed reference code


def ref_tsvm(task_vectors):
    """tanganke/fusion_bench: fusion_bench/method/task_singular_vector/utils/TSVM_utils.py,
    `compute_and_sum_svd_mem_reduction`, the lines for one 2-D key (then × alpha, + θ0)."""
    num_tasks = len(task_vectors)
    sv_reduction = 1 / num_tasks
    for i, vec in enumerate(task_vectors):
        u, s, vh = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u = torch.zeros_like(u)
            sum_s = torch.zeros_like(s)
            sum_vh = torch.zeros_like(vh)
        reduced_index_s = int(s.shape[0] * sv_reduction)
        sum_u[:, i * reduced_index_s: (i + 1) * reduced_index_s] = u[:, :reduced_index_s]
        sum_s[i * reduced_index_s: (i + 1) * reduced_index_s] = s[:reduced_index_s]
        sum_vh[i * reduced_index_s: (i + 1) * reduced_index_s, :] = vh[:reduced_index_s, :]
    u_u, s_u, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, s_vh, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))


def ref_iso_c(tvs):
    """tanganke/fusion_bench: fusion_bench/method/isotropic_merging/iso_utils.py, `iso_c`, one 2-D key."""
    num_tvs = len(tvs)
    new_vector = sum(tvs) / num_tvs
    new_vector *= num_tvs
    U, S, V = torch.linalg.svd(new_vector, full_matrices=False)
    S_mean = torch.ones_like(S) * S.mean()
    return torch.linalg.multi_dot((U, torch.diag(S_mean), V))


def ref_iso_cts(task_vectors, common_space_fraction):
    """tanganke/fusion_bench: fusion_bench/method/isotropic_merging/iso_utils.py, `iso_cts`, one 2-D key."""
    shape_ = task_vectors[0].shape
    combined_w = sum(task_vectors)
    common_space_index_s = int(min(shape_) * common_space_fraction)
    _task_specific_total_space_index_s = round((min(shape_) - common_space_index_s) / len(task_vectors)) * len(
        task_vectors)
    common_space_index_s = min(shape_) - _task_specific_total_space_index_s
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    common_space_u = u[:, :common_space_index_s]
    common_space_s = s[:common_space_index_s]
    common_space_v = v[:common_space_index_s, :]
    n_dims_per_task = int((min(shape_) - common_space_index_s) / len(task_vectors))
    for i, w in enumerate(task_vectors):
        w_ts = w - common_space_u @ common_space_u.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            combined_space_u = torch.zeros_like(u_ts)
            combined_space_s = torch.zeros_like(s_ts)
            combined_space_v = torch.zeros_like(v_ts)
        combined_space_u[:, i * n_dims_per_task: (i + 1) * n_dims_per_task] = u_ts[:, :n_dims_per_task]
        combined_space_s[i * n_dims_per_task: (i + 1) * n_dims_per_task] = s_ts[:n_dims_per_task]
        combined_space_v[i * n_dims_per_task: (i + 1) * n_dims_per_task, :] = v_ts[:n_dims_per_task, :]
    t = len(task_vectors) * n_dims_per_task
    combined_space_u[:, t: t + common_space_index_s] = common_space_u
    combined_space_s[t: t + common_space_index_s] = common_space_s
    combined_space_v[t: t + common_space_index_s, :] = common_space_v
    u_combined_space_u, s_combined_space_u, v_combined_space_u = torch.linalg.svd(combined_space_u, full_matrices=False)
    u_combined_space_v, s_combined_space_v, v_combined_space_v = torch.linalg.svd(combined_space_v, full_matrices=False)
    combined_space_u = u_combined_space_u @ v_combined_space_u
    combined_space_v = u_combined_space_v @ v_combined_space_v
    combined_space_s = torch.ones_like(combined_space_s) * combined_space_s.mean()
    return torch.linalg.multi_dot((combined_space_u, torch.diag(combined_space_s), combined_space_v))


def ref_cart(finetuned, pretrained, prior, rank_ratio):
    """JH-GEECS/CART: src/merging.py, `_merge_weights("CART")` with `_get_origin` and
    `_get_truncated_task_vectors(move_origin)` for one attn/mlp matrix."""
    task_vectors = [f - pretrained for f in finetuned]
    avg_coeff = 1.0 / len(finetuned)
    _theta_avg = pretrained + avg_coeff * sum(task_vectors)
    lowrank = 0
    for value in task_vectors:
        _val = value + pretrained - _theta_avg
        U, s, V_T = torch.linalg.svd(_val, full_matrices=False)
        dim = s.shape[0]
        parsed_dim = max(1, int(rank_ratio * dim))
        lowrank = lowrank + (U[:, :parsed_dim] * s[:parsed_dim]) @ V_T[:parsed_dim, :]
    return _theta_avg + prior * lowrank


def polar(x):
    """Nearest matrix with orthonormal columns (or rows), U Vᵀ of a plain SVD."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


# --------------------------------------------------------------- against the reference code


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_tsv_m_matches_fusion_bench(shape, n):
    base, models = family(n, shape, seed=n)
    taus = [(m - base).double() for m in models]
    expected = base.double() + 0.7 * ref_tsvm(taus)
    close(run("tsv_m", models, base, alpha=0.7, fraction=0.0), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_m_fraction_keeps_that_share_of_each_rank(shape):
    base, models = family(3, shape, seed=5)
    taus = [(m - base).double() for m in models]
    k = int(min(shape) * 0.25)
    svds = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    u = torch.cat([s.U[:, :k] for s in svds], 1)
    v = torch.cat([s.Vh[:k] for s in svds], 0)
    sigma = torch.cat([s.S[:k] for s in svds])
    close(run("tsv_m", models, base, alpha=1.0, fraction=0.25), base + polar(u) @ torch.diag(sigma) @ polar(v))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3])
def test_iso_c_matches_fusion_bench(shape, n):
    base, models = family(n, shape, seed=10 + n)
    expected = base.double() + 1.3 * ref_iso_c([(m - base).double() for m in models])
    close(run("iso_c", models, base, alpha=1.3), expected)


@pytest.mark.parametrize("shape", SHAPES + [(16, 11)])
@pytest.mark.parametrize("n, fraction", [(2, 0.8), (3, 0.8), (3, 0.5), (2, 1.0)])
def test_iso_cts_matches_fusion_bench(shape, n, fraction):
    base, models = family(n, shape, seed=20 + n)
    expected = base.double() + 0.9 * ref_iso_cts([(m - base).double() for m in models], fraction)
    close(run("iso_cts", models, base, alpha=0.9, common_space_fraction=fraction), expected)


def test_iso_cts_at_fraction_one_is_iso_c():
    base, models = family(3, (10, 6), seed=4)
    close(run("iso_cts", models, base, common_space_fraction=1.0), run("iso_c", models, base).double())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n, lam, ratio", [(3, 2.0, 0.12), (4, 1.5, 0.3), (3, 0.5, 1.0), (2, 2.0, 0.3)])
def test_cart_matches_the_authors_code(shape, n, lam, ratio):
    base, models = family(n, shape, seed=30 + n)
    expected = ref_cart([m.double() for m in models], base.double(), lam, ratio)
    close(run("cart", models, None, **{"lambda": lam, "rank_fraction": ratio}), expected, atol=5e-5)


def test_cart_of_two_models_is_their_average():
    _, (a, b) = family(2, (9, 6), seed=3)
    assert torch.equal(run("cart", [a, b], None, **{"lambda": 2.0}), (a + b) / 2)


# --------------------------------------------------------------- rank-deficient inputs: the papers' equations


def test_thin_svd_matches_torch_svd_and_drops_the_null_space():
    g = torch.Generator().manual_seed(1)
    for shape in [(9, 6), (6, 9)]:
        x = low_rank(shape, 3, g)
        u, s, v = thin_svd(x)
        ref = torch.linalg.svd(x.double(), full_matrices=False)
        assert s.shape == (3,) and u.shape == (shape[0], 3) and v.shape == (shape[1], 3)
        torch.testing.assert_close(s, ref.S[:3], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(u @ torch.diag(s) @ v.T, x.double(), atol=1e-5, rtol=0)
        torch.testing.assert_close(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)
        u2, s2, v2 = thin_svd(x, 2)
        torch.testing.assert_close(u2 @ torch.diag(s2) @ v2.T, ref.U[:, :2] @ torch.diag(ref.S[:2]) @ ref.Vh[:2])
    zero = thin_svd(torch.zeros(4, 3))
    assert zero[1].numel() == 0


@pytest.mark.parametrize("k1, k2, shared", [(4, 4, 0), (5, 3, 0), (3, 5, 0), (4, 4, 2), (6, 6, 0)])
def test_two_block_polar_factor_matches_the_plain_one(k1, k2, shared):
    """[A₁ A₂] with orthonormal blocks (sharing `shared` directions, or spanning all of R^12 at
    6 + 6): the k₂ x k₂ path gives the same pseudo-inverse square root as the full eigh and the
    polar factor of an SVD."""
    g = torch.Generator().manual_seed(k1 * 10 + k2 + shared)
    a1 = torch.linalg.qr(torch.randn(12, k1, generator=g, dtype=torch.float64)).Q
    a2 = torch.randn(12, k2, generator=g, dtype=torch.float64)
    a2[:, :shared] = a1[:, :shared]
    a2 = torch.linalg.qr(a2).Q  # orthonormal, its first `shared` columns ± those of a1
    a = torch.cat([a1, a2], 1)
    fast, plain = inv_sqrt_gram(a, 1e-6, k1), inv_sqrt_gram(a, 1e-6)
    torch.testing.assert_close(fast, plain, atol=1e-9, rtol=1e-9)
    if not shared:
        torch.testing.assert_close(a @ fast, polar(a), atol=1e-9, rtol=0)
    else:  # dependent columns: a partial isometry that maps a's range onto itself
        p = a @ fast
        torch.testing.assert_close(p @ p.T @ a, a, atol=1e-9, rtol=0)


@pytest.mark.parametrize("shape", [(9, 7), (7, 9)])
def test_tsv_m_on_rank_deficient_task_vectors(shape):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=g)
    taus = [low_rank(shape, 4, g), low_rank(shape, 2, g)]  # k = 3: the second has fewer directions
    svds = [torch.linalg.svd(t.double(), full_matrices=False) for t in taus]
    keep = [3, 2]  # the top min(k, rank) triplets; the rest are the null space's arbitrary vectors
    u = torch.cat([s.U[:, :k] for s, k in zip(svds, keep)], 1)
    v = torch.cat([s.Vh[:k] for s, k in zip(svds, keep)], 0)
    sigma = torch.cat([s.S[:k] for s, k in zip(svds, keep)])
    expected = base + polar(u) @ torch.diag(sigma) @ polar(v)
    close(run("tsv_m", [base + t for t in taus], base, alpha=1.0), expected)
    # rank 4 ≥ k: well defined, so FusionBench's code gives the same
    taus = [low_rank(shape, 4, g), low_rank(shape, 5, g)]
    close(run("tsv_m", [base + t for t in taus], base), base + ref_tsvm([t.double() for t in taus]))


@pytest.mark.parametrize("shape", [(9, 7), (7, 9)])
def test_iso_c_on_a_rank_deficient_sum(shape):
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(shape)
    taus = [low_rank(shape, 2, g), low_rank(shape, 2, g)]
    svd = torch.linalg.svd((taus[0] + taus[1]).double(), full_matrices=False)
    expected = svd.S.sum() / 7 * svd.U[:, :4] @ svd.Vh[:4]  # σ̄ over all 7; the 4 nonzero directions
    close(run("iso_c", taus, base), expected)
    assert torch.equal(run("iso_c", [base, base], base), base)  # Δ = 0


@pytest.mark.parametrize("shape", [(10, 8), (8, 10)])
def test_iso_cts_on_rank_deficient_task_vectors(shape):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(shape, generator=g)
    # r = 8, three models: 5 common dimensions and 1 per task; Δ = Σ τᵢ has rank 2 (3 null directions)
    taus = [low_rank(shape, 2, g), low_rank(shape, 2, g)]
    taus.append(low_rank(shape, 2, g) - taus[0] - taus[1])
    svd = torch.linalg.svd(sum(taus).double(), full_matrices=False)
    uc, sc, vc = svd.U[:, :2], svd.S[:2], svd.Vh[:2]
    us, ss, vs = [uc], [sc], [vc]
    for t in taus:
        proj = t.double() - uc @ (uc.T @ t.double())
        p = torch.linalg.svd(proj, full_matrices=False)
        us.append(p.U[:, :1]), ss.append(p.S[:1]), vs.append(p.Vh[:1])
    mean = torch.cat(ss).sum() / 8
    expected = base + mean * polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 0))
    close(run("iso_cts", [base + t for t in taus], base, common_space_fraction=0.8), expected)


def test_cart_on_rank_deficient_deviations():
    g = torch.Generator().manual_seed(5)
    models = [low_rank((8, 6), 1, g) for _ in range(3)]  # deviations of rank ≤ 3 < k = 6·0.6
    expected = ref_cart([m.double() for m in models], torch.zeros(8, 6, dtype=torch.float64), 1.5, 0.6)
    close(run("cart", models, None, **{"lambda": 1.5, "rank_fraction": 0.6}), expected)


# --------------------------------------------------------------- fallbacks, errors, streaming, inputs


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4), ()])
def test_other_tensors_take_the_mean_task_vector(shape):
    base, models = family(3, shape, seed=6)
    mean_tau = sum(m - base for m in models) / 3
    for name in ("tsv_m", "iso_c", "iso_cts"):
        close(run(name, models, base, alpha=0.5), base + 0.5 * mean_tau, atol=1e-6)
    close(run("cart", models, None), sum(models) / 3, atol=1e-6)  # Σ of full centred vectors is 0


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])
def test_one_line_errors(name):
    base, models = family(2, (4, 3), seed=7)
    with pytest.raises(MergeError, match=f"^{name} needs a base_model$"):
        run(name, models, None)
    with pytest.raises(MergeError, match=f"^{name} takes at least two fine-tuned models .*, got 1$"):
        run(name, models[:1], base)
    assert get_method(name).base == "required" and get_method(name).min_models == 2


def test_cart_needs_no_base_and_two_models():
    m = get_method("cart")
    assert m.base == "ignored" and m.min_models == 2
    with pytest.raises(MergeError, match="^cart takes at least two models, got 1$"):
        run("cart", [torch.ones(3, 2)])


def test_schema_and_tags():
    expect = {"tsv_m": {"alpha": 1.0, "fraction": 0.0}, "iso_c": {"alpha": 1.0},
              "iso_cts": {"alpha": 1.0, "common_space_fraction": 0.8}, "cart": {"lambda": 2.0, "rank_fraction": 0.12}}
    for name, defaults in expect.items():
        m = get_method(name)
        assert {p.name: p.default for p in m.params} == defaults
        assert "matrices" in m.tags and m.cost is not None and "arXiv:" in m.paper and "θ" in m.formula
        assert ("streaming" in m.tags) == (name in ("tsv_m", "iso_c"))


@pytest.mark.parametrize("name", ["tsv_m", "iso_c"])
@pytest.mark.parametrize("shape", [(7, 5), (5,)])
def test_streaming_methods_read_each_input_once_and_may_overwrite_it(name, shape):
    base, models = family(3, shape, seed=8)
    reads = []

    def loader(i):
        def load():
            reads.append(i)
            return models[i].clone()
        return load

    owned = OwnedInputs([loader(i) for i in range(3)])
    torch.testing.assert_close(run(name, owned, base), run(name, models, base), atol=1e-6, rtol=0)
    assert reads == [0, 1, 2]


@pytest.mark.parametrize("name, with_base", [("tsv_m", True), ("iso_c", True), ("iso_cts", True), ("cart", False)])
def test_inputs_are_not_modified(name, with_base):
    base, models = family(3, (6, 8), seed=9)
    before = [m.clone() for m in models] + [base.clone()]
    out = run(name, models, base if with_base else None)
    assert out.shape == (6, 8) and torch.isfinite(out).all()
    assert all(torch.equal(a, b) for a, b in zip(models + [base], before))


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "cart"])
def test_tensors_stay_on_their_device_and_dtype(name):
    base, models = family(3, (6, 5), seed=10)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = run(name, [m.to(device) for m in models], base.to(device) if name != "cart" else None)
    assert out.device.type == device and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), run(name, models, base if name != "cart" else None), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------- cost, dry run, full merge


def test_costs_list_the_decompositions():
    tsv, iso_c, iso_cts, cart = (get_method(n).cost for n in ("tsv_m", "iso_c", "iso_cts", "cart"))
    for cost in (tsv, iso_c, iso_cts):
        assert cost((10,), 2, {}) is None
    assert tsv((2048, 5632), 2, {"fraction": 0.0}).svd == ((2048, 2048),) * 2 + ((1024, 1024),) * 2
    assert tsv((64, 32), 4, {"fraction": 0.25}).svd == ((32, 32),) * 4 + ((32, 32),) * 2
    assert iso_c((5632, 2048), 2, {}).svd == ((2048, 2048),)
    assert iso_cts((64, 32), 3, {"common_space_fraction": 0.8}).svd == ((32, 32),) * 5 + ((6, 6),)  # 25 + 3·2
    assert iso_cts((64, 32), 2, {"common_space_fraction": 0.8}).svd == ((32, 32),) * 4 + ((4, 4),)  # 24 + 2·4
    # rows ≤ cols: each projected task vector through the Gram of its 32 − 24 coordinates off Uᶜ
    assert iso_cts((32, 64), 2, {"common_space_fraction": 0.8}).svd == ((32, 32),) * 2 + ((8, 8),) * 2 + ((4, 4),)
    assert cart((64, 32), 2, {}) is None  # two models: the low-rank parts cancel, no SVD
    assert cart((64, 32), 3, {}).svd == ((32, 32),) * 3
    c = iso_c((2048, 2048), 2, {})
    assert c.flops > 9 * 2048**3 and c.extra_bytes >= 8 * 2 * 2048 * 2048 and "eigh" in c.note


def _recipe(fam, method, **params):
    models = [{"model": str(fam["a"])}, {"model": str(fam["b"])}]
    out = {"merge_method": method, "models": models, "parameters": params, "dtype": "float32"}
    if method != "cart":
        out["base_model"] = str(fam["base"])
    else:
        models.append({"model": str(fam["base"])})
    return out


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "cart"])
def test_dry_run_lists_the_svds(llama_family, tmp_path, capsys, method):
    recipe = write_recipe(tmp_path / "r.yml", _recipe(llama_family, method))
    assert main(["merge", str(recipe), str(tmp_path / "o"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"method: {method}" in text and f"extra cost: {method}: per matrix" in text
    assert "extra cost: " in text and " SVDs (" in text and "[32, 32]" in text
    assert "extra compute:" in text and "extra working memory:" in text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, params", [("tsv_m", {"alpha": 0.8}), ("iso_c", {"alpha": 1.2}),
                                            ("iso_cts", {"common_space_fraction": 0.5}), ("cart", {"lambda": 1.5})])
def test_full_merge_of_tiny_models(llama_family, tmp_path, method, params):
    merge(recipe_from_dict(_recipe(llama_family, method, **params)), tmp_path / "out")
    out = load_weights(tmp_path / "out")
    base, a, b = (load_weights(llama_family[k]) for k in ("base", "a", "b"))
    assert set(out) == set(base)
    m = get_method(method)
    values = m.resolve_params(params, 3 if method == "cart" else 2)[0]
    for key in out:
        inputs = [a[key].float(), b[key].float()] + ([base[key].float()] if method == "cart" else [])
        expected = m(inputs, None if method == "cart" else base[key].float(), values)
        torch.testing.assert_close(out[key], expected, atol=1e-6, rtol=0, msg=key)
    matrix = "model.layers.0.self_attn.q_proj.weight"
    mean = (a[matrix] + b[matrix] + base[matrix]) / 3 if method == "cart" else (a[matrix] + b[matrix]) / 2
    assert not torch.allclose(out[matrix], mean, atol=1e-5)  # the spectral step changed the matrix


def test_heavy_jobs_run_one_at_a_time(llama_family, tmp_path, monkeypatch):
    """With several workers, jobs that decompose matrices never overlap (torch already uses every
    core for one), while the rest still run in parallel; the result is the same as one worker's."""
    import threading
    import time

    from mergecore import executor

    monkeypatch.setattr(executor, "HEAVY_JOB_FLOPS", 0.0)  # the tiny model's SVDs count as heavy
    real = executor.compute_tensor
    lock = threading.Lock()
    running = {"heavy": 0, "any": 0}
    peak = {"heavy": 0, "any": 0}

    def tracked(plan, job, *args, **kwargs):
        kinds = ["any"] + (["heavy"] if executor.is_compute_heavy(job) else [])
        with lock:
            for k in kinds:
                running[k] += 1
                peak[k] = max(peak[k], running[k])
        time.sleep(0.02)  # long enough for the other workers to try to overlap
        try:
            return real(plan, job, *args, **kwargs)
        finally:
            with lock:
                for k in kinds:
                    running[k] -= 1

    monkeypatch.setattr(executor, "compute_tensor", tracked)
    recipe = recipe_from_dict(_recipe(llama_family, "iso_c"))
    merge(recipe, tmp_path / "four", threads=4)
    assert peak["heavy"] == 1 and peak["any"] >= 2
    monkeypatch.setattr(executor, "compute_tensor", real)
    merge(recipe, tmp_path / "one", threads=1)
    four, one = load_weights(tmp_path / "four"), load_weights(tmp_path / "one")
    assert set(four) == set(one) and all(torch.equal(four[k], one[k]) for k in one)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_ill_conditioned_task_vectors_match_the_float64_reference(shape):
    """Singular values from 1 to 1e-4 (κ = 1e4): the float64 Gram route stays within float32
    rounding of the float64 reference (a float32 SVD would be off by about κ·eps)."""
    g = torch.Generator().manual_seed(11)
    r = min(shape)
    base = torch.zeros(shape)
    taus = []
    for _ in range(2):
        u = torch.linalg.qr(torch.randn(shape[0], r, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(shape[1], r, generator=g, dtype=torch.float64)).Q
        taus.append(((u * torch.logspace(0, -4, r, dtype=torch.float64)) @ v.T).float())
    t64 = [t.double() for t in taus]
    close(run("iso_c", taus, base), ref_iso_c(t64), atol=1e-6)
    close(run("tsv_m", taus, base), ref_tsvm(t64), atol=1e-6)
    close(run("iso_cts", taus, base), ref_iso_cts(t64, 0.8), atol=1e-6)
