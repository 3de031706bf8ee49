"""Fisher merging against FusionBench's merging code, its fallbacks and refusals, and a merge of
Fisher information collected on tiny ViT classifiers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_stats import build_vit

from mergecore.errors import MergeError
from mergecore.io.source import ModelSource
from mergecore.merging import merge
from mergecore.methods import get_method
from mergecore.recipe import recipe_from_dict
from mergecore.stats import collect_stats
from mergecore.stats.store import open_stats, write_stats


# FusionBench's Fisher merge, transcribed for the reference (tanganke/fusion_bench,
# fusion_bench/method/fisher_merging/fisher_merging.py: get_models_fisher_norm, merging_with_fisher_weights)
def fb_fisher_norm(param_dict, fisher_list):
    norms = {}
    for name in param_dict:
        models_fisher = torch.stack([f[name] for f in fisher_list], dim=0)
        dims = [d for d in range(1, models_fisher.dim())]
        norms[name] = torch.linalg.vector_norm(models_fisher, dim=dims)
    return torch.norm(torch.stack(list(norms.values()), dim=1), dim=1)


def fb_fisher_merge(param_dict, fisher_list, coefficients, normalize=True, minimal=1e-6):
    merged = {}
    if normalize:
        models_fisher_norm = fb_fisher_norm(param_dict, fisher_list)
    for name, values in param_dict.items():
        param_values = torch.stack(values, dim=0)
        weights = torch.stack([f[name] for f in fisher_list], dim=0) + minimal
        coef = coefficients.reshape(-1, *[1 for _ in range(param_values.dim() - 1)])
        if normalize:
            inv = 1.0 / (models_fisher_norm + minimal)
            coef = coef * (inv / inv.sum()).reshape(-1, *[1 for _ in range(param_values.dim() - 1)])
        merged[name] = (coef * weights * param_values).sum(dim=0) / (coef * weights).sum(dim=0)
    return merged


def _synthetic(tmp_path: Path, kind: str = "fisher"):
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (3, 4), "b": (5,)}
    params = {n: [torch.randn(s, generator=g) for _ in range(2)] for n, s in shapes.items()}
    fishers = [{n: torch.rand(s, generator=g) ** 3 * (10.0 if i else 1.0) for n, s in shapes.items()} for i in range(2)]
    norms = [sum(float(f.pow(2).sum()) for f in fm.values()) ** 0.5 for fm in fishers]
    meta = {"kind": kind, "models": [{"name": "a", "path": None}, {"name": "b", "path": None}], "fisher_norm": norms}
    path = write_stats(tmp_path / f"{kind}.safetensors",
                       {f"{i}/{n}": f for i, fm in enumerate(fishers) for n, f in fm.items()}, meta)
    return params, fishers, path


def _call(tensors, path, tensor, models=("a", "b"), **params):
    m = get_method("fisher")
    values, _ = m.resolve_params(params, len(tensors))
    return m([t.clone() for t in tensors], None, values, tensor_name=tensor, artifacts={"stats": str(path)},
             input_models=list(models))


def test_matches_fusionbench_with_and_without_normalisation(tmp_path):
    params, fishers, path = _synthetic(tmp_path)
    for weights, normalize in (([1.0, 1.0], True), ([0.3, 0.7], True), ([0.3, 0.7], False)):
        ref = fb_fisher_merge(params, fishers, torch.tensor(weights), normalize=normalize)
        for name in params:
            ours = _call(params[name], path, name, weight=weights, normalize=normalize)
            torch.testing.assert_close(ours, ref[name], rtol=1e-5, atol=1e-6)
    # by hand, one entry: the Fisher-weighted average with ε = 1e-6 and no normalisation
    f0, f1 = fishers[0]["w"][0, 0] + 1e-6, fishers[1]["w"][0, 0] + 1e-6
    hand = (f0 * params["w"][0][0, 0] + f1 * params["w"][1][0, 0]) / (f0 + f1)
    assert float(_call(params["w"], path, "w", normalize=False)[0, 0]) == pytest.approx(float(hand), rel=1e-5)
    # matched by model, not by position
    swapped = _call(params["w"][::-1], path, "w", models=("b", "a"))
    torch.testing.assert_close(swapped, _call(params["w"], path, "w"), rtol=1e-6, atol=1e-7)


def test_fallback_and_refusals(tmp_path):
    params, _, path = _synthetic(tmp_path)
    v = [torch.randn(2), torch.randn(2)]  # no Fisher for this tensor: the weighted average
    torch.testing.assert_close(_call(v, path, "buffer", weight=[1.0, 3.0]), (v[0] + 3 * v[1]) / 4)
    with pytest.raises(MergeError, match="has no statistics for model 'c'"):
        _call(params["w"], path, "w", models=("a", "c"))
    with pytest.raises(MergeError, match="the Fisher of 'w' for model 'a' .* has shape \\[3, 4\\], the tensor \\[3, 3\\]"):
        _call([p[:, :3] for p in params["w"]], path, "w")
    with pytest.raises(MergeError, match="the weights add up to 0"):
        _call(params["w"], path, "w", weight=[0.0, 0.0])
    meta = {"kind": "fisher", "models": [{"name": "a", "path": None}, {"name": "b", "path": None}], "fisher_norm": [1, 1]}
    partial = write_stats(tmp_path / "p.safetensors", {"0/w": torch.ones(3, 4)}, meta)
    with pytest.raises(MergeError, match="has no Fisher of 'w' for model 'b'"):
        _call(params["w"], partial, "w")
    gram = write_stats(tmp_path / "g.safetensors", {"0/w": torch.eye(4)}, {**meta, "kind": "gram"})
    with pytest.raises(MergeError, match="needs fisher statistics, but g.safetensors holds gram"):
        _call(params["w"], gram, "w")
    m = get_method("fisher")
    assert m.stats == "fisher" and m.operator and "θ" in m.formula and "arXiv:2111.09832" in m.paper


def test_a_recipe_merges_collected_fisher(tmp_path, model_factory):
    vit = build_vit(tmp_path, model_factory)
    models = [str(vit["a"]), str(vit["b"])]
    stats = collect_stats("fisher", vit["tasks"], models, tmp_path / "f.safetensors", examples=2)
    recipe = recipe_from_dict({"merge_method": "fisher", "models": [{"model": m} for m in models], "dtype": "float32",
                               "artifacts": {"stats": str(stats)}})
    merge(recipe, tmp_path / "out")
    sf = open_stats(stats)
    srcs = [ModelSource(m, path=Path(m)) for m in models]
    names = sorted({k.split("/", 1)[1] for k in sf.keys})
    params = {n: [s.read(n).float() for s in srcs] for n in names}
    ref = fb_fisher_merge(params, [{n: sf.read(f"{i}/{n}") for n in names} for i in range(2)], torch.ones(2))
    merged = ModelSource("m", path=tmp_path / "out")
    for name in ("vit.encoder.layer.0.attention.attention.query.weight", "classifier.weight", "vit.layernorm.bias"):
        torch.testing.assert_close(merged.read(name), ref[name], rtol=1e-5, atol=1e-6)
