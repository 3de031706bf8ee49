"""Base + LoRA adapter models in the app (issue 16): the Models tab adds a base (a loaded model,
a folder or a Hub id) with a PEFT adapter as one model, checked by the engine
(`mergecore.io.adapter.open_adapter`); a bad adapter is one line and leaves the session as it
was; the pair's `BASE+ADAPTER` reference goes into the recipe, merges through `mergecore.merge`
exactly as the engine merges the same recipe, exports, and comes back in through an imported
recipe. Each side is confined like a typed folder. Compare and the searches load models whole:
they refuse the pair with the engine's one line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from _app_helpers import client, find, poll, poll_merge, recipe_text
from _merge_helpers import load_weights
from app.state import MODEL_COLUMNS
from mergecore.errors import MergeError

peft = pytest.importorskip("peft")

pytest_plugins = ("_app_helpers",)


def make_adapter(base: Path, out: Path, config=None, seed: int = 0) -> Path:
    """A PEFT adapter of `base` saved at `out`, made by peft itself, with random non-zero weights."""
    from test_lora_inputs import lora
    from test_lora_inputs import make_adapter as make

    make(base, out, config if config is not None else lora(), seed=seed)
    return out


@pytest.fixture(scope="module")
def adapters(app_server, demo_family, model_factory) -> dict[str, Path]:
    """Adapters in the app's work dir (a folder it may read): a good one on the demo's base, and
    bad ones (no adapter_config.json, an IA3 adapter, a LoRA of another model)."""
    _, ctx = app_server
    root = ctx.workspace.root / "adapters"
    base = Path(demo_family.models["base"])
    good = make_adapter(base, root / "good")
    missing = root / "no-config"
    shutil.copytree(good, missing)
    (missing / "adapter_config.json").unlink()
    ia3 = make_adapter(base, root / "ia3", peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                            feedforward_modules=["down_proj"]))
    other = make_adapter(model_factory("llama", 0), root / "other-base")
    return {"good": good, "no-config": missing, "ia3": ia3, "other-base": other}


def test_engine_joins_and_opens_a_pair(demo_family, adapters, tmp_path):
    """`join_adapter_ref` is `split_adapter_ref`'s inverse; `open_adapter` opens the pair checked."""
    from mergecore.io.adapter import AdapterSource, open_adapter
    from mergecore.io.lora_config import join_adapter_ref, split_adapter_ref

    base = str(demo_family.models["base"])
    assert split_adapter_ref(join_adapter_ref(f" {base} ", str(adapters["good"]))) == (base, str(adapters["good"]))
    for sides, expected in {("my+base", "org/adapter"): "base model 'my+base' has a '+' in its name",
                            ("org/base", " "): "give the adapter of a base+adapter model"}.items():
        with pytest.raises(MergeError, match=re.escape(expected)):
            join_adapter_ref(*sides)
    src = open_adapter(base, adapters["good"])
    assert isinstance(src, AdapterSource) and src.adapted and src.path == Path(base).resolve()
    with pytest.raises(MergeError, match="does not fit the base"):
        open_adapter(base, adapters["other-base"])


def table_rows(out) -> dict[str, list]:
    table = find(out, lambda o: isinstance(o, dict) and o.get("headers") == MODEL_COLUMNS)
    return {r[0]: r for r in table["data"]}


def done_merge(ctx, status: str):
    return next(j for j in list(ctx.jobs._jobs.values()) if j.kind == "merge" and j.status == "done"
                and f"`{j.result.out_dir}`" in status)


def test_client_adds_base_plus_adapter_merges_and_exports_it(app_server, demo_family, adapters, tmp_path):
    from mergecore import merge
    from mergecore.recipe import recipe_from_dict

    url, ctx = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    base = Path(demo_family.models["base"])
    ref = f"{base}+{adapters['good']}"
    out = c.predict("base", str(adapters["good"]), api_name="/add_adapter")  # the base: a loaded model's name
    assert f"Added `{ref}` (base + LoRA adapter)." in out[-3], out[-3]
    rows = table_rows(out)
    assert rows["good"][2] == "LlamaForCausalLM + LoRA" and rows["good"][-1] == ref
    assert "**Compatible**: 4 models" in find(out, lambda o: isinstance(o, str) and "Compatible" in o)
    text = recipe_text(out)
    assert f"model: {ref}" in text  # a new model joins the recipe, by its BASE+ADAPTER reference

    # the same pair typed as one reference (spelled another way) is already loaded
    out = c.predict(f"{base}/+{adapters['good']}/", api_name="/add_model")
    assert "is already loaded, as `good`" in out[-3] and "nothing changed" in out[-3], out[-3]
    assert len(table_rows(c.predict("base", api_name="/set_base"))) == 4

    # merged through mergecore.merge: the tensors the engine gives for the same recipe
    c.predict("with-adapter", api_name="/merge")
    status = poll_merge(c)[2]
    assert "Merged" in status, status
    job = done_merge(ctx, status)
    merge(recipe_from_dict(yaml.safe_load(text)), tmp_path / "engine")
    got, want = load_weights(Path(job.result.out_dir)), load_weights(tmp_path / "engine")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert f"{base}+{adapters['good']}" in (Path(job.result.out_dir) / "mergecore_recipe.yml").read_text()

    # exported: both sides under models/, relative to the recipe
    md, recipe_file, _ = c.predict(job.meta["name"], api_name="/export")
    assert "zipped" in md and "`models/good` ←" in md and "`models/base` ←" in md, md
    value = recipe_file["value"]
    exported = yaml.safe_load(Path(value["path"] if isinstance(value, dict) else value).read_text())
    assert "models/base+models/good" in [m["model"] for m in exported["models"]]


def test_client_imports_a_recipe_with_base_plus_adapter(app_server, demo_family, adapters, tmp_path):
    url, ctx = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    base, variant = (str(demo_family.models[n]) for n in ("base", "variant_a"))
    ref = f"{base}+{adapters['good']}"
    recipe = yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": base,
                             "models": [{"model": ref, "parameters": {"weight": 0.7}},
                                        {"model": variant, "parameters": {"weight": 0.3}}]})
    out = c.predict(recipe, api_name="/import_yaml")
    assert "load into the session: good" in out[-2], out[-2]
    out = c.predict(api_name="/confirm_yaml")
    assert out[-1].startswith("**Applied**: task_arithmetic of base, variant_a, good."), out[-1]
    assert f"model: {ref}" in recipe_text(out)
    c.predict(api_name="/merge")
    assert "Merged" in poll_merge(c)[2]

    # each side is confined: an adapter outside the folders the app may read is refused, the text kept
    outside = tmp_path / "outside-adapter"
    shutil.copytree(adapters["good"], outside)
    out = c.predict(recipe.replace(str(adapters["good"]), str(outside)), api_name="/import_yaml")
    assert "adapter folder" in out[-1] and "outside the folders this app may read" in out[-1], out[-1]
    assert "\n" not in out[-1]


def test_client_bad_adapters_are_one_line_and_change_nothing(app_server, demo_family, adapters, tmp_path):
    url, _ = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    base = str(demo_family.models["base"])
    cases = {
        ("base", adapters["no-config"]): "has no adapter_config.json, so it is not a PEFT adapter",
        (base, adapters["ia3"]): "the adapter is IA3 (peft_type), not LoRA",
        ("base", adapters["other-base"]): "the adapter does not fit the base",
        ("base", tmp_path): "outside the folders this app may read",
        ("base", ""): "give the adapter",
        ("", adapters["good"]): "give the base model of the adapter",
        ("base", adapters["good"].parent / "missing"): "neither a local folder nor a Hub id",
    }
    for (b, a), expected in cases.items():
        out = c.predict(b, str(a), api_name="/add_adapter")
        assert expected in out[-3] and out[-3].startswith("**Error:**") and "\n" not in out[-3], (a, out[-3])
    # typed as one reference into the model box: the same check
    out = c.predict(f"{base}+{adapters['ia3']}", api_name="/add_model")
    assert "IA3 (peft_type), not LoRA" in out[-3] and "\n" not in out[-3]
    assert set(table_rows(c.predict("base", api_name="/set_base"))) == set(demo_family.models)


def test_client_whole_model_loaders_refuse_the_pair_in_one_line(app_server, demo_family, adapters):
    """Compare loads models whole: the engine's line (fold it with a passthrough merge first)."""
    url, _ = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    c.predict("base", str(adapters["good"]), api_name="/add_adapter")
    status, _, _ = c.predict(["base", "good"], "1 2 3", 4, None, "each model's own", None, "", "",
                             api_name="/compare")
    assert status.startswith("**Error:**") and "passthrough" in status and "\n" not in status, status


def test_searches_and_a_restored_session_see_the_pair(demo_family, adapters, app_server, tmp_path):
    """A search's config names the pair's source; the engine's search refuses it in one line. A
    restored session keeps the pair only while both folders are inside the roots."""
    from app import searches as srch
    from app import state as st
    from app.paths import confine_source, local_sides
    from mergecore.search.config import model_ref

    _, ctx = app_server
    base = Path(demo_family.models["base"])
    state = st.add_model(st.new_session(), str(base), base, name="base")
    state = st.add_model(state, f"{base}+{adapters['good']}", f"{base}+{adapters['good']}")
    session = srch.SearchSession.from_state(state)
    with pytest.raises(MergeError, match="passthrough"):
        model_ref(session.path("good"), tmp_path)
    roots = ctx.read_roots()
    assert confine_source(session.path("good"), roots) == session.path("good")
    outside = tmp_path / "adapter"
    shutil.copytree(adapters["good"], outside)
    with pytest.raises(MergeError, match="adapter folder .* is outside the folders"):
        confine_source(f"{base}+{outside}", roots)
    assert local_sides(f"{base}+org/adapter", roots) == [base.resolve(), None]  # a Hub side: fetched later
    with pytest.raises(MergeError, match="base\\+adapter reference, not one model folder"):
        from app.paths import local_model

        local_model(f"{base}+{outside}", roots)


def test_client_fetches_a_hub_adapter_in_the_background(app_server, demo_family, adapters, monkeypatch):
    """A Hub id on either side is fetched as a Hub model is (a job; the Add buttons wait), then the
    snapshot is confined and checked like a folder."""
    import huggingface_hub

    url, ctx = app_server
    cache = ctx.workspace.root / "hub" / "models--org--adapter" / "snapshots" / "abc"
    shutil.copytree(adapters["good"], cache)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(cache))
    c = client(url)
    c.predict(api_name="/load_demo")
    out = c.predict("base", "org/adapter", api_name="/add_adapter")
    assert "Fetching" in out[-3], out[-3]
    out = poll(lambda: c.predict(api_name="/poll_models"), lambda o: "Added" in str(o[-3]) or "Error" in str(o[-3]),
               30, 0.2, "fetch")
    ref = f"{demo_family.models['base']}+org/adapter"
    assert f"Added `{ref}`" in out[-3], out[-3]
    assert table_rows(out)["adapter"][-1] == ref
