"""Task-vector merge methods (task arithmetic, TIES, DARE, breadcrumbs, DELLA, SCE).

Expected values are worked out by hand on tiny tensors; the comments show the arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from mergecore.errors import MergeError
from mergecore.methods import get_method
from mergecore.methods._sparsify import (
    della_probabilities_,
    kth_largest,
    rank_window_mask_,
    sign_consensus_mask,
    sparsify,
)

T = torch.tensor


def run(name, tensors, base, generator=None, **params):
    """Call a method with recipe-named params, filling the defaults like the executor does."""
    method = get_method(name)
    n = len(tensors)
    full = {}
    for spec in method.params:
        if spec.name in params:
            value = params[spec.name]
            full[spec.name] = (
                [spec.coerce(v) for v in value] if spec.per_model else spec.coerce(value)
            )
        elif not spec.required:
            full[spec.name] = [spec.default] * n if spec.per_model else spec.default
    return method(tensors, base, full, generator=generator)


def close(a, b, tol=1e-6):
    b = T(b, dtype=torch.float32) if not isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=1e-6), (a, b)


# Two task vectors used by the TIES tests.
TAU1 = T([3.0, -1.0, 2.0, -4.0, 0.5, 1.0])
TAU2 = T([-2.0, 2.0, 1.0, 1.0, -3.0, 0.2])
BASE = T([0.5, -0.5, 1.0, 0.0, 2.0, -1.0])


def models(*taus, base=BASE):
    return [base + t for t in taus]


# ----------------------------------------------------------------------------- registry


def test_all_methods_registered_with_mergekit_defaults():
    defaults = {
        # name: (normalize, rescale, has consensus)
        "task_arithmetic": (False, False, False),
        "ties": (True, False, True),
        "dare_ties": (False, True, True),
        "dare_linear": (False, True, False),
        "breadcrumbs": (False, False, False),
        "breadcrumbs_ties": (False, False, True),
        "della": (True, True, True),
        "della_linear": (False, True, False),
    }
    for name, (normalize, rescale, consensus) in defaults.items():
        m = get_method(name)
        assert m.base == "required"
        assert m.param("normalize").default is normalize, name
        assert m.param("rescale").default is rescale, name
        assert m.param("lambda").default == 1.0 and m.param("lambda").arg == "lambda_"
        assert m.param("weight").required and m.param("weight").per_model
        assert m.param("density").default == 1.0 and m.param("density").per_model
        assert m.param("int8_mask").default is False
        assert (m.param("consensus") is not None) is consensus, name
        if consensus:
            assert m.param("consensus").default == "sum"
            assert m.param("consensus").choices == ("sum", "count")
        assert m.summary and m.doc and "arXiv" in m.doc
    assert get_method("breadcrumbs").param("gamma").default == 0.01
    assert get_method("breadcrumbs_ties").param("gamma").default == 0.01
    assert get_method("della").param("epsilon").default == 0.15
    assert get_method("della_linear").param("epsilon").default == 0.15
    for name in ("dare_ties", "dare_linear", "della", "della_linear"):
        assert get_method(name).randomized
    for name in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "sce"):
        assert not get_method(name).randomized
    sce = get_method("sce")
    assert sce.base == "required"
    assert sce.param("select_topk").default == 1.0
    assert sce.param("int8_mask").default is False


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1])
def test_density_out_of_range(bad):
    for name in ("ties", "dare_ties", "breadcrumbs", "della"):
        spec = get_method(name).param("density")
        with pytest.raises(MergeError, match="density"):
            spec.coerce(bad)
    assert get_method("ties").param("density").coerce(1) == 1.0
    assert get_method("ties").param("density").coerce("0.25") == 0.25


def test_other_ranges():
    with pytest.raises(MergeError):
        get_method("breadcrumbs").param("gamma").coerce(1.5)
    with pytest.raises(MergeError):
        get_method("della").param("epsilon").coerce(-0.1)
    with pytest.raises(MergeError):
        get_method("sce").param("select_topk").coerce(1.2)
    with pytest.raises(MergeError):
        get_method("ties").param("consensus").coerce("median")


# ----------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic():
    ts = models(TAU1, TAU2)
    # base + 1·τ1 + 3·τ2
    close(run("task_arithmetic", ts, BASE, weight=[1, 3]), BASE + TAU1 + 3 * TAU2)
    # normalize: divide by 1 + 3
    close(
        run("task_arithmetic", ts, BASE, weight=[1, 3], normalize=True),
        BASE + (TAU1 + 3 * TAU2) / 4,
    )
    # lambda scales the merged task vector only
    close(
        run("task_arithmetic", ts, BASE, weight=[1, 3], **{"lambda": 0.5}),
        BASE + 0.5 * (TAU1 + 3 * TAU2),
    )
    # weights summing to zero: normalisation is skipped
    close(
        run("task_arithmetic", ts, BASE, weight=[1, -1], normalize=True), BASE + TAU1 - TAU2
    )


def test_inputs_not_modified():
    ts = models(TAU1, TAU2)
    copies = [t.clone() for t in ts]
    base = BASE.clone()
    g = torch.Generator().manual_seed(0)
    for name in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "sce"):
        params = {} if name == "sce" else {"weight": [1, 1]}
        if name in ("ties", "dare_ties", "della", "breadcrumbs_ties"):
            params["density"] = [0.5, 0.5]
        run(name, ts, base, generator=g, **params)
        for t, c in zip(ts, copies):
            assert torch.equal(t, c)
        assert torch.equal(base, BASE)


# ----------------------------------------------------------------------------- TIES


def test_ties_trim_elect_disjoint_mean():
    # density 0.5 of 6 entries -> keep 3 per model:
    #   τ1 -> [3, 0, 2, -4, 0, 0]      τ2 -> [-2, 2, 0, 0, -3, 0]
    # weights 2, 1: weighted sum = [4, 2, 4, -8, -3, 0] -> elected signs + + + - - + (0 -> +)
    # agreeing weighted values / agreeing weights:
    #   [6/2, 2/1, 4/2, -8/2, -3/1, 0/1] = [3, 2, 2, -4, -3, 0]
    ts = models(TAU1, TAU2)
    out = run("ties", ts, BASE, weight=[2, 1], density=[0.5, 0.5])
    close(out, BASE + T([3.0, 2.0, 2.0, -4.0, -3.0, 0.0]))
    # normalize off: the agreeing weighted values are summed
    out = run("ties", ts, BASE, weight=[2, 1], density=[0.5, 0.5], normalize=False)
    close(out, BASE + T([6.0, 2.0, 4.0, -8.0, -3.0, 0.0]))
    # lambda
    out = run("ties", ts, BASE, weight=[2, 1], density=[0.5, 0.5], **{"lambda": 0.5})
    close(out, BASE + 0.5 * T([3.0, 2.0, 2.0, -4.0, -3.0, 0.0]))


def test_ties_per_model_density_and_rescale():
    # τ1 with density 1/6 keeps only -4 (k = max(1, int(6/6)) = 1); τ2 with density 1 keeps all.
    ts = models(TAU1, TAU2)
    out = run("ties", ts, BASE, weight=[1, 1], density=[1 / 6, 1.0], normalize=False)
    # sum = [-2, 2, 1, -3, -3, 0.2] -> signs - + + - - +; at index 3 only τ1's -4 agrees
    close(out, BASE + T([-2.0, 2.0, 1.0, -4.0, -3.0, 0.2]))
    # rescale: trimmed τ1 = [.., -4, ..] scaled by ||τ1||_1 / 4 = 11.5 / 4
    out = run("ties", [BASE + TAU1], BASE, weight=[1], density=[1 / 6], rescale=True)
    close(out, BASE + T([0.0, 0.0, 0.0, -11.5, 0.0, 0.0]))


def test_ties_sign_election_sum_vs_count():
    base = torch.zeros(1)
    ts = [T([5.0]), T([-1.0]), T([-1.0])]
    # sum: 5 - 1 - 1 = 3 > 0 -> only the +5 survives
    close(run("ties", ts, base, weight=[1, 1, 1]), [5.0])
    # count: one +, two - -> elected -, mean of the two agreeing = -1
    close(run("ties", ts, base, weight=[1, 1, 1], consensus="count"), [-1.0])


def test_ties_negative_weight_flips_vote():
    # weighted deltas: 1·[2] and -3·[1] = [-3] -> sum -1 -> elected -, only model 2 agrees
    # normalised by its weight (-3): -3 / -3 = 1
    base = torch.zeros(1)
    close(run("ties", [T([2.0]), T([1.0])], base, weight=[1, -3]), [1.0])


def test_ties_exact_k_with_equal_magnitudes():
    # four equal magnitudes, density 0.5 -> exactly two survive (lower index ranks higher)
    base = torch.zeros(4)
    out = run("ties", [T([1.0, -1.0, 1.0, -1.0])], base, weight=[1], density=[0.5])
    close(out, [1.0, -1.0, 0.0, 0.0])


def test_sign_consensus_mask_helper():
    d = torch.stack([T([1.0, -2.0, 0.0, 3.0]), T([-3.0, -1.0, 1.0, 0.0])])
    # sum: [-2, -3, 1, 3] -> - - + +
    m = sign_consensus_mask(d, "sum")
    assert m.tolist() == [[False, True, False, True], [True, True, True, False]]
    # count: [0, -2, 1, 1] -> + - + +
    m = sign_consensus_mask(d, "count")
    assert m.tolist() == [[True, True, False, True], [False, True, True, False]]


# ----------------------------------------------------------------------------- DARE


def test_dare_drop_and_rescale_seeded():
    n = 4000
    base = torch.linspace(-1, 1, n)
    tau = torch.full((n,), 0.25)
    tau[::2] = -0.25
    g = torch.Generator().manual_seed(123)
    out = run("dare_linear", [base + tau], base, generator=g, weight=[1], density=[0.3])
    delta = out - base
    kept = delta != 0
    n_kept = int(kept.sum())
    assert 0.25 * n < n_kept < 0.35 * n
    # mergekit's rescale restores the L1 norm: factor ||τ||_1 / ||kept||_1 = n / n_kept here,
    # i.e. 1/density up to the sampling error of the mask.
    factor = n / n_kept
    assert torch.allclose(delta[kept], tau[kept] * factor, rtol=1e-5, atol=1e-6)
    assert abs(factor - 1 / 0.3) < 0.35
    # the mask is torch.bernoulli(density) drawn from the same seed (mergekit parity)
    ref = torch.bernoulli(torch.full((n,), 0.3), generator=torch.Generator().manual_seed(123))
    assert torch.equal(kept, ref.bool())
    # same seed -> same result; another seed -> another mask
    again = run("dare_linear", [base + tau], base, weight=[1], density=[0.3],
                generator=torch.Generator().manual_seed(123))
    assert torch.equal(again, out)
    other = run("dare_linear", [base + tau], base, weight=[1], density=[0.3],
                generator=torch.Generator().manual_seed(124))
    assert not torch.equal(other, out)


def test_dare_without_rescale_keeps_exact_values():
    base = torch.zeros(1000)
    tau = torch.arange(1, 1001, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    out = run("dare_linear", [tau], base, generator=g, weight=[1], density=[0.5], rescale=False)
    kept = out != 0
    assert torch.equal(out[kept], tau[kept])
    assert 400 < int(kept.sum()) < 600


def test_dare_density_one_is_task_arithmetic():
    ts = models(TAU1, TAU2)
    g = torch.Generator().manual_seed(0)
    close(
        run("dare_linear", ts, BASE, generator=g, weight=[1, 0.5]),
        run("task_arithmetic", ts, BASE, weight=[1, 0.5]),
    )
    # dare_ties at density 1 is TIES without trimming (normalize off by default)
    close(
        run("dare_ties", ts, BASE, generator=g, weight=[2, 1]),
        run("ties", ts, BASE, weight=[2, 1], normalize=False),
    )


def test_dare_ties_two_models_seeded():
    base = torch.zeros(2000)
    g = torch.Generator().manual_seed(5)
    t1 = torch.randn(2000, generator=g)
    t2 = torch.randn(2000, generator=g)
    a = run("dare_ties", [t1, t2], base, weight=[1, 1], density=[0.5, 0.5],
            generator=torch.Generator().manual_seed(9))
    b = run("dare_ties", [t1, t2], base, weight=[1, 1], density=[0.5, 0.5],
            generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    # rebuild by hand: masks are consecutive Bernoulli draws from the generator
    g = torch.Generator().manual_seed(9)
    m1 = torch.bernoulli(torch.full((2000,), 0.5), generator=g)
    m2 = torch.bernoulli(torch.full((2000,), 0.5), generator=g)
    d1 = t1 * m1 * (t1.abs().sum() / (t1 * m1).abs().sum())
    d2 = t2 * m2 * (t2.abs().sum() / (t2 * m2).abs().sum())
    positive = (d1 + d2) >= 0
    agree1 = torch.where(positive, d1 > 0, d1 < 0)
    agree2 = torch.where(positive, d2 > 0, d2 < 0)
    expected = d1 * agree1 + d2 * agree2
    close(a, expected, tol=1e-5)


# ----------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_drops_outliers_and_small():
    # n = 10, density 0.5, gamma 0.1: keep 5, drop the 1 largest, so drop the 4 smallest too.
    base = torch.zeros(10)
    tau = T([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
    out = run("breadcrumbs", [tau], base, weight=[1], density=[0.5], gamma=[0.1])
    close(out, [0.0, -9.0, 8.0, -7.0, 6.0, -5.0, 0.0, 0.0, 0.0, 0.0])
    # density 0.9, gamma 0.2: keep 9 of 10, so only one outlier can go
    out = run("breadcrumbs", [tau], base, weight=[1], density=[0.9], gamma=[0.2])
    close(out, [0.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
    # rescale restores the L1 norm: 55 / 35
    out = run("breadcrumbs", [tau], base, weight=[1], density=[0.5], gamma=[0.1], rescale=True)
    close(out, T([0.0, -9.0, 8.0, -7.0, 6.0, -5.0, 0.0, 0.0, 0.0, 0.0]) * (55 / 35))
    # density 1 keeps everything, gamma included (mergekit skips sparsification)
    out = run("breadcrumbs", [tau], base, weight=[1], density=[1.0], gamma=[0.3])
    close(out, tau)


def test_breadcrumbs_ties():
    # density 0.5, gamma 1/6 on 6 entries: keep 3, drop the largest and the 2 smallest.
    #   τ1 |x| order: 4 > 3 > 2 > 1 = 1 > 0.5 -> keep 3, 2, and the first 1 (index 1)
    #       -> [3, -1, 2, 0, 0, 0]
    #   τ2 |x| order: 3 > 2 = 2 > 1 = 1 > 0.2 -> keep 2 (index 0), 2 (index 1), 1 (index 2)
    #       -> [-2, 2, 1, 0, 0, 0]
    # sum [1, 1, 3, 0, 0, 0] -> + + + + + +, agreeing sums: [3, 2, 3, 0, 0, 0]
    ts = models(TAU1, TAU2)
    out = run("breadcrumbs_ties", ts, BASE, weight=[1, 1], density=[0.5, 0.5], gamma=[1 / 6] * 2)
    close(out, BASE + T([3.0, 2.0, 3.0, 0.0, 0.0, 0.0]))
    out = run("breadcrumbs_ties", ts, BASE, weight=[1, 1], density=[0.5, 0.5],
              gamma=[1 / 6] * 2, normalize=True)
    close(out, BASE + T([3.0, 2.0, 1.5, 0.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------- DELLA


def test_della_keep_probabilities():
    # density 0.5, epsilon 0.2, row of 5: p = 0.3 + 0.4 (rank - 1) / 4
    ranks = T([[3.0, 1.0, 5.0, 2.0, 4.0]])
    probs = della_probabilities_(ranks, 5, 0.5, 0.2)
    close(probs, [[0.5, 0.3, 0.7, 0.4, 0.6]])
    # a row of one entry gets p = density
    close(della_probabilities_(T([[1.0]]), 1, 0.5, 0.2), [[0.5]])


def test_della_linear_empirical_keep_rates():
    rows = 20000
    row = T([2.0, -5.0, 1.0, 4.0, -3.0])  # magnitude ranks 2, 5, 1, 4, 3
    tau = row.repeat(rows, 1)
    base = torch.zeros_like(tau)
    g = torch.Generator().manual_seed(11)
    out = run("della_linear", [tau], base, generator=g, weight=[1], density=[0.5],
              epsilon=[0.2], rescale=False)
    kept = (out != 0).float().mean(dim=0)
    expected = T([0.4, 0.7, 0.3, 0.6, 0.5])
    assert torch.allclose(kept, expected, atol=0.02), kept
    # kept entries are unchanged without rescale
    mask = out != 0
    assert torch.equal(out[mask], tau[mask])
    # with rescale the L1 norm is restored
    g = torch.Generator().manual_seed(11)
    out = run("della_linear", [tau], base, generator=g, weight=[1], density=[0.5],
              epsilon=[0.2])
    assert torch.allclose(out.abs().sum(), tau.abs().sum(), rtol=1e-4)
    assert torch.equal(out != 0, mask)  # same seed, same mask


def test_della_mask_matches_bernoulli_of_probabilities():
    tau = T([[0.1, -0.4, 0.3, 0.2], [-1.0, 0.5, 0.25, 2.0]])
    base = torch.zeros_like(tau)
    out = run("della_linear", [tau], base, generator=torch.Generator().manual_seed(3),
              weight=[1], density=[0.6], epsilon=[0.1], rescale=False)
    ranks = torch.argsort(torch.argsort(tau.abs(), dim=1), dim=1).float() + 1
    probs = 0.5 + (ranks - 1) / 3 * 0.2
    ref = torch.bernoulli(probs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out != 0, ref.bool())


def test_della_ties_and_errors():
    ts = models(TAU1, TAU2)
    g = torch.Generator().manual_seed(0)
    # density 1 skips pruning: della == ties without trimming (normalize on for both)
    close(run("della", ts, BASE, generator=g, weight=[2, 1]), run("ties", ts, BASE, weight=[2, 1]))
    with pytest.raises(MergeError, match="epsilon"):
        run("della", ts, BASE, generator=g, weight=[1, 1], density=[0.1, 0.5], epsilon=[0.15] * 2)
    with pytest.raises(MergeError, match="epsilon"):
        run("della_linear", ts, BASE, generator=g, weight=[1, 1], density=[0.9, 0.5])
    a = run("della", ts, BASE, generator=torch.Generator().manual_seed(4), weight=[1, 1],
            density=[0.5, 0.5], epsilon=[0.1, 0.1])
    b = run("della", ts, BASE, generator=torch.Generator().manual_seed(4), weight=[1, 1],
            density=[0.5, 0.5], epsilon=[0.1, 0.1])
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- SCE


def test_sce_hand_computed():
    base = torch.zeros(4)
    t1 = T([1.0, 2.0, 0.0, -1.0])
    t2 = T([3.0, -2.0, 0.0, -1.0])
    # signs from the sum [4, 0, 0, -2]: + + + -
    # weights: mean squares 6/4 = 1.5 and 14/4 = 3.5 -> 0.3, 0.7
    # [ (0.3·1 + 0.7·3)/1, 0.3·2/0.3, 0, (−0.3 − 0.7)/1 ] = [2.4, 2, 0, -1]
    close(run("sce", [t1, t2], base), [2.4, 2.0, 0.0, -1.0])
    # select_topk 0.5: variances [1, 4, 0, 0], 2 non-zero -> k = 1 keeps index 1 only;
    # then both weights are 4/4 = 1 -> 0.5 each; sum 0 -> +; only t1's +2 agrees -> 2
    close(run("sce", [t1, t2], base, select_topk=0.5), [0.0, 2.0, 0.0, 0.0])
    # select_topk 0 erases everything
    close(run("sce", [t1, t2], base, select_topk=0.0), [0.0, 0.0, 0.0, 0.0])


def test_sce_tiny_energy_uses_uniform_weights():
    # mean squares sum below 1e-6 -> weights 1/2 each
    base = torch.ones(2)
    t1 = base + T([1e-4, 3e-4])
    t2 = base + T([3e-4, -1e-4])
    # signs: + +; index 0: both agree -> (0.5e-4 + 1.5e-4)/1 = 2e-4; index 1: only t1 -> 3e-4
    close(run("sce", [t1, t2], base), base + T([2e-4, 3e-4]), tol=1e-9)


# ----------------------------------------------------------------------------- helpers


def test_kth_largest_and_window_large_tensor():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5000, (1_500_000,), generator=g).float()  # many ties
    ref = a.sort(descending=True).values
    for k in (1, 10, 450_000, 1_499_999, 1_500_000):
        res = kth_largest(a, k)
        assert res.value == ref[k - 1].item()
        assert res.n_gt == int((a > res.value).sum()) and res.n_eq == int((a == res.value).sum())
    m = rank_window_mask_(a.clone(), 1000, 451_000)
    assert int(m.sum()) == 450_000
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    kept = a[m.bool()]
    assert kept.max() <= ref[1000] and kept.min() >= ref[450_999]


def test_sparsify_wrapper_matches_methods():
    x = T([0.5, -3.0, 2.0, -1.0, 4.0, 0.1])
    close(sparsify(x, "magnitude", 0.5), [0.0, -3.0, 2.0, 0.0, 4.0, 0.0])
    trimmed = T([0.0, -3.0, 2.0, 0.0, 4.0, 0.0])
    close(sparsify(x, "magnitude", 0.5, rescale=True), trimmed * (10.6 / 9))  # ||x||_1 / 9
    close(sparsify(x, "magnitude_outliers", 0.5, gamma=0.2), [0.0, -3.0, 2.0, -1.0, 0.0, 0.0])
    assert torch.equal(sparsify(x, "random", 1.0), x)


@pytest.mark.parametrize("n_models", [3, 8, 11])
def test_ties_many_models_matches_plain_reference(n_models):
    """The bit-mask divisor (<= 8 models) and its float fallback (> 8) give the plain TIES result."""
    g = torch.Generator().manual_seed(n_models)
    base = torch.randn(40, 30, generator=g)
    tensors = [base + torch.randn(40, 30, generator=g) for _ in range(n_models)]
    weights = [0.3 + 0.1 * i for i in range(n_models)]
    got = get_method("ties")(tensors, base, {"weight": weights, "density": [0.6] * n_models, "lambda": 1.0,
                                             "normalize": True, "rescale": False, "int8_mask": False,
                                             "consensus": "sum"})
    deltas = []
    for t in tensors:
        d = (t - base).flatten()
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[torch.topk(d.abs(), int(0.6 * d.numel())).indices] = True
        deltas.append((d * keep).view_as(base))
    w = torch.tensor(weights).view(-1, 1, 1)
    stacked = torch.stack(deltas) * w
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == sign)
    num = (stacked * agree).sum(0)
    den = (w * agree).sum(0)
    den = torch.where(den == 0, torch.ones_like(den), den)
    assert torch.allclose(got, base + num / den, atol=1e-5)
