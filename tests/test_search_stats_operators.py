"""Data-informed methods inside searches: an RMM operator and an evolutionary template read the
statistics named in the search config's `artifacts:`, exactly as a recipe's merge reads them, and
the recipe a search writes carries the artifacts so it replays to the same tensors."""

from __future__ import annotations

import pytest
import torch

from mergecore.io.source import ModelSource
from mergecore.merging import merge
from mergecore.models import load_model
from mergecore.recipe import recipe_from_dict
from mergecore.search.evo.genome import Bounds, Genome, template_methods
from mergecore.search.rmm.layers import LayerBank, Operator
from mergecore.search.rmm.search import trajectory_recipe
from mergecore.stats import collect_stats
from test_stats import build_lm


@pytest.fixture(scope="module")
def lm_stats(tmp_path_factory, model_factory):
    root = tmp_path_factory.mktemp("op-stats")
    lm = build_lm(root, model_factory)
    stats = root / "gram.safetensors"
    collect_stats("gram", lm["tasks"], [str(lm["a"]), str(lm["b"])], stats, examples=6)
    return lm, stats


def test_regmean_operator_equals_the_recipe_merge_and_the_replay(lm_stats, tmp_path):
    lm, stats = lm_stats
    refs = [str(lm["a"]), str(lm["b"])]
    models = [load_model(r) for r in refs]
    base = load_model(refs[0])
    bank = LayerBank(models, base, [Operator("rm", "regmean", {})], artifacts={"stats": str(stats)}, model_refs=refs)
    layer0 = bank.merged_state(0, 0)

    out = tmp_path / "full"
    merge(recipe_from_dict({"merge_method": "regmean", "models": [{"model": r} for r in refs],
                            "artifacts": {"stats": str(stats)}, "dtype": "float32"}), out)
    full = ModelSource(str(out))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(layer0["self_attn.q_proj.weight"].float(), full.read(name).float(), atol=1e-6)
    a = ModelSource(refs[0]).read(name).float()
    assert not torch.allclose(layer0["self_attn.q_proj.weight"].float(), a)  # really merged

    # the trajectory's recipe carries the artifacts and replays the operator's layer
    recipe = trajectory_recipe([(0, 2), (1, 0)], refs[0], refs, [Operator("rm", "regmean", {})],
                               artifacts={"stats": str(stats)})
    assert recipe.artifacts == {"stats": str(stats)}
    replay = tmp_path / "replay"
    merge(recipe, replay)
    got = ModelSource(str(replay))
    assert torch.allclose(got.read(name).float(), full.read(name).float(), atol=1e-6)
    one = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(got.read(one).float(), ModelSource(refs[0]).read(one).float())


def test_a_regmean_operator_without_its_statistics_is_one_line(lm_stats):
    lm, _ = lm_stats
    refs = [str(lm["a"]), str(lm["b"])]
    models = [load_model(r) for r in refs]
    bank = LayerBank(models, models[0], [Operator("rm", "regmean", {})], model_refs=refs)
    with pytest.raises(Exception, match="artifacts") as err:
        bank.merged_state(0, 0)
    assert "\n" not in str(err.value)


def test_an_evolutionary_template_carries_the_statistics(lm_stats):
    lm, stats = lm_stats
    assert "regmean" in template_methods()
    g = Genome(method="regmean", models=(str(lm["a"]), str(lm["b"])),
               parameters=(("reduce_non_diagonal_ratio", Bounds(0.0, 1.0, 0.5)),), artifacts=(("stats", str(stats)),))
    data = g.recipe_dict(g.x0())
    assert data["artifacts"] == {"stats": str(stats)}
    assert g.fingerprint()["artifacts"] == [["stats", str(stats)]]
