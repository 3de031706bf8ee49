"""RegMean and RegMean++: the closed form against least squares and FusionBench's code, the
fallbacks, the one-line refusals, and a merge of collected statistics through a recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_stats import build_lm

from mergecore.errors import MergeError
from mergecore.io.source import ModelSource
from mergecore.merging import merge
from mergecore.methods import get_method
from mergecore.recipe import recipe_from_dict
from mergecore.stats import collect_stats
from mergecore.stats.store import open_stats, write_stats


# FusionBench's RegMean merge, transcribed for the reference (tanganke/fusion_bench,
# fusion_bench/method/regmean/regmean.py: reduce_non_diagonal_elements, merging_with_regmean_weights)
def fb_reduce_non_diagonal_elements(regmean_weights, reduce_non_diagonal_ratio):
    diag_weights = torch.diag(torch.ones(regmean_weights.shape[0]) - reduce_non_diagonal_ratio).to(regmean_weights.device)
    non_diag_weights = torch.zeros_like(diag_weights).fill_(reduce_non_diagonal_ratio)
    return regmean_weights * (diag_weights + non_diag_weights)


def fb_regmean(param_value_list, regmean_weights_list, reduce_non_diagonal_ratio, weight_transpose=True):
    param_multiplied_results, module_regmean_weights_list = [], []
    for model_idx, module_regmean_weights in enumerate(regmean_weights_list):
        module_regmean_weights = fb_reduce_non_diagonal_elements(module_regmean_weights, reduce_non_diagonal_ratio)
        module_regmean_weights_list.append(module_regmean_weights)
        model_to_merge_param = param_value_list[model_idx]
        param_multiplied_results.append(torch.matmul(
            module_regmean_weights, model_to_merge_param.transpose(0, 1) if weight_transpose else model_to_merge_param))
    sum_module_regmean_weights = sum(module_regmean_weights_list)
    sum_param_multiplied_results = sum(param_multiplied_results)
    inv_sum_module_regmean_weights = torch.inverse(sum_module_regmean_weights)
    merged_param = torch.matmul(inv_sum_module_regmean_weights, sum_param_multiplied_results)
    return merged_param.transpose(0, 1) if weight_transpose else merged_param


def _synthetic(tmp_path: Path, kind: str = "gram", size: int = 6, ratio=None):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, size, generator=g), torch.randn(25, size, generator=g) * 2]
    ws = [torch.randn(3, size, generator=g) for _ in xs]
    grams = [x.T @ x / x.shape[0] for x in xs]
    meta = {"kind": kind, "models": [{"name": "a", "path": None}, {"name": "b", "path": None}],
            "inputs": {"w": "w", "c": "w"}, "transposed": ["c"]}
    if ratio is not None:
        meta["ratio"] = ratio
    path = write_stats(tmp_path / f"{kind}.safetensors", {f"{i}/w": gm for i, gm in enumerate(grams)}, meta)
    return xs, ws, grams, path


def _call(name, tensors, path, tensor="w", models=("a", "b"), **params):
    m = get_method(name)
    values, _ = m.resolve_params(params, len(tensors))
    return m([t.clone() for t in tensors], None, values, tensor_name=tensor, artifacts={"stats": str(path)},
             input_models=list(models))


def test_closed_form_is_least_squares_and_matches_fusionbench(tmp_path):
    xs, ws, grams, path = _synthetic(tmp_path)
    exact = _call("regmean", ws, path, reduce_non_diagonal_ratio=1.0)
    # α = 1: argmin_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² / N_i, the least-squares problem itself
    a = torch.cat([x / x.shape[0] ** 0.5 for x in xs])
    b = torch.cat([x @ w.T / x.shape[0] ** 0.5 for x, w in zip(xs, ws)])
    torch.testing.assert_close(exact, torch.linalg.lstsq(a, b).solution.T, rtol=1e-4, atol=1e-5)
    for ratio in (0.6, 0.1, 1.0):
        ours = _call("regmean", ws, path, reduce_non_diagonal_ratio=ratio)
        torch.testing.assert_close(ours, fb_regmean(ws, grams, ratio), rtol=1e-4, atol=1e-5)
    default = _call("regmean", ws, path)  # default α: FusionBench's 0.6
    torch.testing.assert_close(default, fb_regmean(ws, grams, 0.6), rtol=1e-4, atol=1e-5)
    # matched by model, not by position; a Conv1D weight [in, out] is solved without the transposes
    swapped = _call("regmean", ws[::-1], path, models=("b", "a"))
    torch.testing.assert_close(swapped, default, rtol=1e-5, atol=1e-6)
    conv = _call("regmean", [w.T for w in ws], path, tensor="c")
    torch.testing.assert_close(conv, fb_regmean([w.T for w in ws], grams, 0.6, weight_transpose=False))
    torch.testing.assert_close(conv, default.T, rtol=1e-5, atol=1e-6)
    # no Gram (a norm, a bias, another matrix): the simple average
    v = [torch.randn(3), torch.randn(3)]
    torch.testing.assert_close(_call("regmean", v, path, tensor="norm"), (v[0] + v[1]) / 2)
    torch.testing.assert_close(_call("regmean", ws, path, tensor="other"), (ws[0] + ws[1]) / 2)


def test_a_singular_sum_is_regularised_towards_the_average(tmp_path):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(30, 4, generator=g) for _ in range(2)]
    for x in xs:
        x[:, 2] = 0  # an input that is never active
    ws = [torch.randn(3, 4, generator=g) for _ in xs]
    meta = {"kind": "gram", "models": [{"name": "a", "path": None}, {"name": "b", "path": None}], "inputs": {"w": "w"}}
    path = write_stats(tmp_path / "s.safetensors", {f"{i}/w": x.T @ x / 30 for i, x in enumerate(xs)}, meta)
    out = _call("regmean", ws, path)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2, rtol=1e-4, atol=1e-5)


def test_refusals_are_one_line(tmp_path):
    xs, ws, grams, path = _synthetic(tmp_path)
    m = get_method("regmean")
    with pytest.raises(MergeError, match="artifacts have no 'stats' entry"):
        m(ws, None, {"reduce_non_diagonal_ratio": 0.6, "stats": "stats"}, tensor_name="w", artifacts={},
          input_models=["a", "b"])
    with pytest.raises(MergeError, match="has no statistics for model 'c'"):
        _call("regmean", ws, path, models=("a", "c"))
    with pytest.raises(MergeError, match="needs gram_plusplus statistics, but gram.safetensors holds gram"):
        _call("regmean_plusplus", ws, path)
    _, _, _, fisher = _synthetic(tmp_path, kind="fisher")
    with pytest.raises(MergeError, match="needs gram statistics, but fisher.safetensors holds fisher"):
        _call("regmean", ws, fisher)
    with pytest.raises(MergeError, match=r"is \[6, 6\], but the weight \[3, 5\] takes 5 inputs"):
        _call("regmean", [w[:, :5] for w in ws], path)
    _, _, _, pp = _synthetic(tmp_path, kind="gram_plusplus", ratio=0.6)
    with pytest.raises(MergeError, match="collected merging with reduce_non_diagonal_ratio 0.6, the recipe says 0.9"):
        _call("regmean_plusplus", ws, pp, reduce_non_diagonal_ratio=0.9)
    torch.testing.assert_close(_call("regmean_plusplus", ws, pp), fb_regmean(ws, grams, 0.6), rtol=1e-4, atol=1e-5)
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(MergeError, match="cannot read statistics"):
        _call("regmean", ws, tmp_path / "x.safetensors")
    for e in ("regmean", "regmean_plusplus"):
        meth = get_method(e)
        assert meth.stats in ("gram", "gram_plusplus") and "matrices" in meth.tags and meth.operator  # with artifacts
        assert "θ" in meth.formula and "arXiv:" in meth.paper and meth.cost((8, 4), 2, {}).flops > 0
        assert meth.cost((8,), 2, {}) is None


def test_a_recipe_merges_collected_grams(tmp_path, model_factory):
    lm = build_lm(tmp_path, model_factory)
    models = [str(lm["a"]), str(lm["b"])]
    stats = collect_stats("gram", lm["tasks"], models, tmp_path / "g.safetensors", examples=4)
    recipe = recipe_from_dict({"merge_method": "regmean", "models": [{"model": m} for m in models], "dtype": "float32",
                               "parameters": {"reduce_non_diagonal_ratio": 0.8}, "artifacts": {"stats": str(stats)}})
    out = merge(recipe, tmp_path / "out")
    assert "extra cost: one linear solve per weight matrix" in out.plan.describe()
    merged = ModelSource("m", path=tmp_path / "out")
    srcs = [ModelSource(m, path=Path(m)) for m in models]
    sf = open_stats(stats)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.3.mlp.down_proj.weight", "lm_head.weight"):
        grams = [sf.gram(i, name) for i in range(2)]
        ref = fb_regmean([s.read(name).float() for s in srcs], grams, 0.8)
        torch.testing.assert_close(merged.read(name), ref, rtol=1e-4, atol=1e-5)
    for name in ("model.norm.weight", "model.embed_tokens.weight"):  # no Gram: the average
        torch.testing.assert_close(merged.read(name), (srcs[0].read(name) + srcs[1].read(name)) / 2)
    assert (tmp_path / "out" / "artifacts" / "g.safetensors").is_file()
