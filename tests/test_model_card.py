"""The model card and the files that let a checkpoint travel: YAML front matter (base_model,
library_name, tags) parsed with yaml, scores, the recipe; artifacts copied beside the weights;
an exported (portable) recipe -- Hub ids kept, local models under models/, artifacts inside --
replayed with `mergecore merge` from another folder to identical tensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from _merge_helpers import load_weights
from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.merging import merge
from mergecore.methods.dam import save_coefficients
from mergecore.recipe import load_recipe, recipe_from_dict
from mergecore.side_files import (
    model_card, portable_checkpoint, portable_models, relocate, shipped_artifacts,
)


def front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n"), card[:80]
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def assert_same_tensors(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_card_front_matter_body_and_scores(llama_family, tmp_path):
    base, a, b = (str(llama_family[k]) for k in ("base", "a", "b"))
    recipe = recipe_from_dict({"merge_method": "task_arithmetic", "base_model": base,
                               "models": [{"model": a, "parameters": {"weight": 0.5}},
                                          {"model": b, "parameters": {"weight": 0.3}}]})
    merge(recipe, tmp_path / "o")
    meta, body = front_matter((tmp_path / "o" / "README.md").read_text())
    assert meta == {"base_model": Path(base).name, "library_name": "transformers", "tags": ["merge", "mergecore"]}
    assert "**task_arithmetic**" in body and "## Evaluation" not in body
    assert "```yaml\n" + recipe.to_yaml().rstrip() + "\n```" in body

    # scores: the merged model's, or a table of models
    card = model_card(recipe, {"task_a": 0.91234, "mean": 0.9})
    assert "## Evaluation" in card and "| this model | 0.9123 | 0.9000 |" in card
    card = model_card(recipe, [{"model": "base (no merge)", "t": 0.5}, {"model": "m", "t": 0.75}])
    assert "| base (no merge) | 0.5000 |" in card and "| m | 0.7500 |" in card
    assert front_matter(card)[0]["tags"] == ["merge", "mergecore"]
    # for the Hub: base_model names Hub models only (a local name would be refused there)
    assert "base_model" not in front_matter(model_card(recipe, hub_only=True))[0]

    # Hub ids are ids; a folder of the Hub cache is its id; no base: every model
    hub = recipe_from_dict({"merge_method": "task_arithmetic", "base_model": "org/base-model",
                            "models": [{"model": "org/tuned", "parameters": {"weight": 1.0}}]})
    assert front_matter(model_card(hub))[0]["base_model"] == "org/base-model"
    assert front_matter(model_card(hub, hub_only=True))[0]["base_model"] == "org/base-model"
    snap = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    cached = recipe_from_dict({"merge_method": "linear", "models": [{"model": str(snap), "parameters": {"weight": 1}},
                                                                   {"model": a, "parameters": {"weight": 1}}]})
    assert front_matter(model_card(cached))[0]["base_model"] == ["org/cached", Path(a).name]
    renames, local = portable_models(cached)
    assert renames == {str(snap): "org/cached@abc123", a: f"models/{Path(a).name}"}
    assert local == {f"models/{Path(a).name}": a}


def test_relocate_renames_every_place_a_model_is_named():
    data = {"merge_method": "linear", "slices": [
        {"sources": [{"model": "/x/a", "layer_range": [0, 2]}, {"model": "/y/a", "layer_range": [0, 2]}],
         "base_model": "/x/a"}],
        "non_layer_from": "/y/a", "tokenizer": {"source": "/x/a", "tokens": {
            "<x>": {"source": "/y/a"}, "<y>": {"source": {"kind": "model_token", "model": "/x/a", "token": "a"}}}},
        "artifacts": {"c": "/z/c.safetensors", "d": "/w/c.safetensors"}}
    recipe = recipe_from_dict(data)
    renames, local = portable_models(recipe)
    assert renames == {"/x/a": "models/a", "/y/a": "models/a-2"} and set(local) == {"models/a", "models/a-2"}
    arts = shipped_artifacts(recipe.artifacts)
    assert arts == {"c": "artifacts/c.safetensors", "d": "artifacts/d-c.safetensors"}
    moved = relocate(recipe, renames, arts)
    text = moved.to_yaml()
    assert "/x/" not in text and "/y/" not in text and "/z/" not in text
    assert moved.referenced_models() == ["models/a", "models/a-2"]
    assert moved.tokenizer.tokens["<y>"]["source"]["model"] == "models/a" and moved.artifacts == arts
    assert moved.slices[0].sources[0].layer_range == (0, 2)


def _dam_recipe(llama_family, coef_dir: Path) -> dict:
    """A DAM recipe over the tiny Llamas with hand-made coefficients (as a DAM search leaves them)."""
    from safetensors import safe_open

    a = llama_family["a"]
    with safe_open(str(a / "model.safetensors"), "pt") as f:
        names = [n for n in f.keys() if n.endswith("proj.weight")][:3]
    g = torch.Generator().manual_seed(0)
    save_coefficients(coef_dir / "dam_coefficients.safetensors",
                      {n: torch.rand(2, 1, 1, generator=g) for n in names}, {"transform": "none"})
    return {"merge_method": "dam", "base_model": str(llama_family["base"]),
            "models": [{"model": str(llama_family["a"])}, {"model": str(llama_family["b"])}],
            "parameters": {"transform": "none"}, "artifacts": {"coefficients": "dam_coefficients.safetensors"}}


def test_a_dam_checkpoint_carries_its_artifact_and_its_export_replays_elsewhere(llama_family, tmp_path):
    search = tmp_path / "search"
    search.mkdir()
    (search / "recipe.yml").write_text(yaml.safe_dump(_dam_recipe(llama_family, search)))
    out = tmp_path / "merged"
    assert main(["merge", str(search / "recipe.yml"), str(out), "-q"]) == 0
    # the artifact is beside the weights, under artifacts/ (a top-level *.safetensors would be a weight file)
    assert (out / "artifacts" / "dam_coefficients.safetensors").read_bytes() == \
        (search / "dam_coefficients.safetensors").read_bytes()
    assert load_recipe(out / "mergecore_recipe.yml").artifacts == {"coefficients": "artifacts/dam_coefficients.safetensors"}
    assert main(["merge", str(out / "mergecore_recipe.yml"), str(tmp_path / "again"), "-q"]) == 0
    assert_same_tensors(out, tmp_path / "again")

    # the export: no path of this machine in the recipe; models where the card says, replayed from there
    exp = portable_checkpoint(out, scores={"t": 0.5}, title="my-dam")
    assert str(tmp_path) not in exp.recipe_text and str(tmp_path) not in exp.card and exp.files == {}
    names = {k: Path(v).name for k, v in llama_family.items()}
    assert exp.local_models == {f"models/{names[k]}": str(llama_family[k]) for k in ("base", "a", "b")}
    meta, body = front_matter(exp.card)
    assert meta["base_model"] == names["base"] and "# my-dam" in body and "| this model | 0.5000 |" in body
    assert all(f"- `{ref}`" in body for ref in exp.local_models)
    unpacked = tmp_path / "elsewhere" / "my-dam"
    shutil.copytree(out, unpacked)
    (unpacked / "mergecore_recipe.yml").write_text(exp.recipe_text)
    (unpacked / "README.md").write_text(exp.card)
    for ref, folder in exp.local_models.items():
        (unpacked / ref).parent.mkdir(exist_ok=True)
        (unpacked / ref).symlink_to(folder)
    replayed = tmp_path / "replayed"
    assert main(["merge", str(unpacked / "mergecore_recipe.yml"), str(replayed), "-q"]) == 0
    assert_same_tensors(out, replayed)


def test_an_older_checkpoint_without_its_artifact_gets_it_from_the_plan(llama_family, tmp_path):
    search = tmp_path / "search"
    search.mkdir()
    recipe = recipe_from_dict(_dam_recipe(llama_family, search))
    res = merge(recipe, tmp_path / "merged", search_dirs=(search,))
    out = Path(res.out_dir)
    # as merges written before artifacts travelled: the recipe names the file relative to the search
    shutil.rmtree(out / "artifacts")
    (out / "mergecore_recipe.yml").write_text(recipe.to_yaml())
    with pytest.raises(MergeError, match="artifact 'coefficients'.*not in its folder"):
        portable_checkpoint(out)
    exp = portable_checkpoint(out, artifacts=res.plan.artifacts,
                              paths={r: s.path for r, s in res.plan.sources.items()})
    assert exp.files == {"artifacts/dam_coefficients.safetensors": search / "dam_coefficients.safetensors"}
    assert exp.recipe.artifacts == {"coefficients": "artifacts/dam_coefficients.safetensors"}
