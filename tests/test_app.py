"""The app: job manager, schema-driven form, compare helpers, the search registry (plain
Python), and the running app through `gradio_client` (merge from the demo families, events,
comparison, export, failures, two sessions; an RMM search on the fmnist-vit demo with live
events, stop, resume and reattaching from a second page; DAM and evolutionary searches: their
forms, plots, recipes replayed by the engine, stop and resume)."""

from __future__ import annotations

import json
import re
import threading
import time
import zipfile
from pathlib import Path

import pytest

from _app_helpers import app_server, demo_family, fmnist_demo, fmnist_server  # noqa: F401  (fixtures)
from mergecore.errors import MergeError
from mergecore.events import Event


# ---------------------------------------------------------------------------------------------
# job manager (no Gradio)


def _wait(job, timeout=10.0):
    assert job.wait(timeout), f"job {job.id} did not finish: {job.status}"


def test_search_like_job_streams_events_through_the_cursor():
    from app.jobs import DONE, JobManager
    from app.plots import events_frame

    jobs = JobManager()
    gate = threading.Event()

    def fake_search(ctx):
        best = 0.0
        for step in range(6):
            ctx.check()
            reward = 0.1 * step
            best = max(best, reward)
            ctx.emit(Event("search.step", {"step": step, "reward": reward, "best": best}))
            ctx.log(f"step {step}: reward {reward:.2f}")
            if step == 2:
                gate.wait(5)
        return {"best": best}

    job = jobs.submit("alice", "search", fake_search, title="fake search")
    deadline = time.time() + 5
    snap = jobs.snapshot("alice", job.id)
    while len(snap["events"]) < 3 and time.time() < deadline:
        time.sleep(0.01)
        snap = jobs.snapshot("alice", job.id)
    assert snap["status"] == "running" and [e["data"]["step"] for e in snap["events"]] == [0, 1, 2]
    cursor = snap["cursor"]
    gate.set()
    _wait(job)
    rest = jobs.snapshot("alice", job.id, since=cursor)
    assert [e["data"]["step"] for e in rest["events"]] == [3, 4, 5]  # only what is new
    assert rest["status"] == DONE and job.result == {"best": pytest.approx(0.5)}
    assert rest["log"][-1].endswith("step 5: reward 0.50")
    frame = events_frame(snap["events"] + rest["events"], "search.step", "step", ["reward", "best"])
    assert len(frame) == 12 and set(frame["series"]) == {"reward", "best"}


def test_jobs_cancel_fail_and_keep_working():
    from app.jobs import CANCELLED, DONE, FAILED, JobManager

    jobs = JobManager()

    def slow(ctx):
        while True:
            ctx.check()
            time.sleep(0.01)

    job = jobs.submit("bob", "merge", slow)
    with pytest.raises(MergeError, match="already running"):
        jobs.submit("bob", "merge", slow)  # one merge at a time per session
    jobs.cancel("bob", job.id)
    _wait(job)
    assert job.status == CANCELLED

    def bad_input(ctx):
        raise MergeError("tensor 'x' has shape [2]\n  but [3] elsewhere")

    def crash(ctx):
        raise ValueError("something\nbroke")

    j1 = jobs.submit("bob", "merge", bad_input)
    _wait(j1)
    j2 = jobs.submit("bob", "merge", crash)
    _wait(j2)
    assert (j1.status, j1.error) == (FAILED, "tensor 'x' has shape [2] but [3] elsewhere")
    assert (j2.status, j2.error) == (FAILED, "ValueError: something broke")
    j3 = jobs.submit("bob", "merge", lambda ctx: 42)
    _wait(j3)
    assert (j3.status, j3.result) == (DONE, 42)


def test_jobs_are_private_to_their_session():
    from app.jobs import JobManager, JobNotFound

    jobs = JobManager()
    job = jobs.submit("alice", "merge", lambda ctx: "secret")
    _wait(job)
    with pytest.raises(JobNotFound):
        jobs.snapshot("mallory", job.id)
    with pytest.raises(JobNotFound):
        jobs.cancel("mallory", job.id)
    assert jobs.jobs("mallory") == [] and [j.id for j in jobs.jobs("alice")] == [job.id]


# ---------------------------------------------------------------------------------------------
# form, curves, recipes (no Gradio)


@pytest.fixture(scope="module")
def demo_state(demo_family):  # noqa: F811
    from app import state as st

    s = st.new_session()
    for name, path in demo_family.models.items():
        s = st.add_model(s, str(path), path, name=name)
    s["base"] = "base"
    return s


def test_every_method_gets_a_form_from_its_schema(demo_state):
    from app import forms
    from mergecore.methods import all_methods
    from mergecore.recipe import recipe_from_dict, validate_parameters

    for name, method in all_methods().items():
        fields = forms.form_fields(name, demo_state)
        per_model = [p for p in method.params if p.per_model]
        targets = 2 if method.base in ("required", "optional") else 3
        assert len(fields) == len(method.params) - len(per_model) + targets * len(per_model), name
        form = forms.new_form(name, demo_state)
        recipe = recipe_from_dict(forms.build_recipe_dict(form, demo_state))
        validate_parameters(recipe)
        assert recipe.merge_method == name
        assert (recipe.base_model is not None) == (method.base in ("required", "optional")), name


def test_values_parse_and_validate(demo_state):
    from app import forms, values

    form = forms.new_form("ties", demo_state)
    f = forms.field_by_key(form, demo_state, "density@variant_a")
    assert values.text_to_value(f, "0.4") == 0.4
    assert values.text_to_value(f, "[0.2, 0.8]") == [0.2, 0.8]
    assert values.text_to_value(f, "{attn: [0, 1], mlp: 0.5}") == {"attn": [0, 1], "mlp": 0.5}
    with pytest.raises(MergeError, match="out of range"):
        values.text_to_value(f, "1.5")
    with pytest.raises(MergeError, match="attn, mlp and other"):
        values.text_to_value(f, "{foo: 1}")
    with pytest.raises(MergeError):
        values.text_to_value(f, "[0.2, banana]")
    text = values.value_to_text({"attn": [0.0, 1.0], "mlp": [1.0, 0.0], "other": 0.5})
    assert values.text_to_value(f, text) == {"attn": [0.0, 1.0], "mlp": [1.0, 0.0], "other": 0.5}


def test_split_curves_reach_attention_and_mlp_tensors(demo_state):
    from app import curves, forms
    from mergecore.plan import plan_merge

    form = forms.new_form("ties", demo_state)
    form = curves.set_split(form, demo_state, "weight@variant_a", True)
    form = curves.set_curve(form, demo_state, "weight@variant_a", [0.0, 1.0], group="attn")
    form = curves.set_curve(form, demo_state, "weight@variant_a", [1.0, 0.0], group="mlp")
    d = forms.build_recipe_dict(form, demo_state)
    w = d["models"][0]["parameters"]["weight"]
    assert w == [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": [1.0, 0.0]},
                 {"value": 0.5}]
    plan = plan_merge(forms.build_recipe(form, demo_state))
    got = {(j.layer, "attn" if "self_attn" in j.out_name else "mlp" if "mlp" in j.out_name else "other"):
           j.params["weight"][0] for j in plan.jobs if j.layer in (0, 5)}
    assert got[(0, "attn")] == 0.0 and got[(5, "attn")] == 1.0
    assert got[(0, "mlp")] == 1.0 and got[(5, "mlp")] == 0.0
    assert got[(0, "other")] == 0.5
    # a preset through the curve editor's path, then back to one curve for all tensors
    from mergecore.params import preset_curve

    form = curves.set_curve(form, demo_state, "density@variant_b", preset_curve("bell", 0.2, 0.9, 5))
    assert curves.get_curve(form, "density@variant_b") == preset_curve("bell", 0.2, 0.9, 5)
    form = curves.set_split(form, demo_state, "weight@variant_a", False)
    assert form["values"]["weight@variant_a"] == [0.0, 1.0]
    md = curves.formula_markdown(form, demo_state)
    assert "θ₀ = **base**" in md and "| density · variant_b |" in md


MERGEKIT_SLERP = """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 6]
      - model: {b}
        layer_range: [0, 6]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""

MERGEKIT_TIES = """
models:
  - model: {base}
  - model: {a}
    parameters: {{density: 0.53, weight: 0.4}}
  - model: {b}
    parameters: {{density: [0.2, 0.8], weight: 0.6}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
"""


def test_mergekit_recipes_import_into_the_form(demo_family):  # noqa: F811
    from app import forms, values
    from app import state as st
    from app.forms import import_recipe as _import_yaml
    from mergecore.recipe import parse_recipe

    m = {k: str(v) for k, v in demo_family.models.items()}
    roots = list(demo_family.models.values())  # where the imported recipe's models may be (app.paths)
    text = MERGEKIT_TIES.format(base=m["base"], a=m["variant_a"], b=m["variant_b"])
    state, form, notes = _import_yaml(text, st.new_session(), roots)
    assert state["base"] == "base" and form["method"] == "ties"
    assert form["values"]["density@variant_b"] == [0.2, 0.8] and form["values"]["int8_mask"] is True
    again = parse_recipe(forms.recipe_yaml(form, state))
    orig = parse_recipe(text)
    assert again.parameters == orig.parameters
    assert [x.parameters for x in again.models] == [x.parameters for x in orig.models if x.parameters]

    text = MERGEKIT_SLERP.format(a=m["base"], b=m["variant_a"])
    state, form, notes = _import_yaml(text, st.new_session(), roots)
    assert form["slices"] and any("slices" in n for n in notes)
    assert form["values"]["t"] == {"attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "other": 0.5}
    again = parse_recipe(forms.recipe_yaml(form, state))
    assert again.parameters == parse_recipe(text).parameters and again.slices == parse_recipe(text).slices
    llama = ("self_attn", ("mlp",))
    assert values.value_from_recipe([{"filter": "self_attn", "value": 1}, {"value": 0}], llama) == {"attn": 1, "other": 0}
    for kept in ([{"filter": "attention", "value": 1}],  # matches no Llama tensor: keep it as it is
                 [{"filter": "mlp", "value": 1}, {"filter": "self_attn", "value": 0}],  # order matters
                 [{"filter": "self_attn", "value": "x"}]):
        assert values.value_from_recipe(kept, llama) == {"raw": kept}
    vit = ("attention", ("intermediate", "output.dense"))
    assert values.value_from_recipe([{"filter": "intermediate", "value": 1}], vit) == {"raw": [{"filter": "intermediate", "value": 1}]}
    with pytest.raises(MergeError, match="line"):
        _import_yaml("merge_method: ties\nmodels: [", st.new_session(), roots)
    with pytest.raises(MergeError, match="unknown merge method"):
        _import_yaml("merge_method: nope\nmodels: [{model: x}]", st.new_session(), roots)


def test_compatibility_says_what_differs(model_factory, tmp_path):
    import transformers as tf

    from app import state as st

    llama = model_factory("llama", 0)
    gpt2 = model_factory("gpt2", 0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide-vocab")
    s = st.add_model(st.add_model(st.new_session(), str(llama), llama, name="llama"),
                     str(tmp_path / "wide-vocab"), tmp_path / "wide-vocab")
    ok, text = st.compatibility(s)
    assert not ok and "`model.embed_tokens.weight` is [96, 32] in `llama` but [100, 32] in `wide-vocab`" in text
    s = st.add_model(s, str(gpt2), gpt2, name="gpt2")
    ok, text = st.compatibility(s)
    assert "architectures differ" in text and "`gpt2` is GPT2LMHeadModel" in text
    rows = st.models_table(s)
    assert rows[0][:4] == ["llama", "base", "LlamaForCausalLM", 4]
    with pytest.raises(MergeError):
        st.add_model(s, str(tmp_path), tmp_path)  # no weights there


def test_classifier_compare_with_a_tiny_vit(model_factory):
    import numpy as np

    from app import compare as cmp

    a = model_factory("vit", 1, base_seed=0)
    b = model_factory("vit", 2, base_seed=0, noise=0.5)
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    res = cmp.compare_classifiers({"a": a, "b": b}, img, reference="b")
    assert set(res["outputs"]) == {"a", "b"} and res["reference"] == "b"
    top = res["outputs"]["a"]["top"]
    assert len(top) == 3 and all(0 <= p <= 1 for _, _, p in top) and top[0][2] >= top[-1][2]
    assert top[0][1].startswith("LABEL_") or top[0][1].startswith("class")
    assert {r["model"] for r in res["rows"]} == {"a", "b"}
    own = cmp.classify(a, img)["probs"]
    swapped = cmp.classify(a, img, head_from=b)["probs"]
    assert not np.allclose(own.numpy(), swapped.numpy())
    assert np.allclose(cmp.classify(a, img)["probs"].numpy(), own.numpy())  # the head was put back
    html = cmp.render_html(res, merged={"b"})
    assert html.count('class="cmp-card"') == 2 and "merged" in html


def test_remote_code_is_never_run_unless_asked(tmp_path, model_factory):
    import shutil

    from app import compare as cmp

    src = model_factory("llama", 0)
    dst = tmp_path / "custom"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["SneakyModelForCausalLM"]
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_sneaky.SneakyModelForCausalLM"}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "modeling_sneaky.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(MergeError, match="trust remote code"):
        cmp.load_model(dst)


def test_workspace_zips_only_small_checkpoints(tmp_path, model_factory):
    import gradio as gr  # noqa: F401

    from app.files import Workspace

    ws = Workspace(tmp_path / "work", zip_limit=10_000_000)
    ckpt = model_factory("llama", 0)
    z = ws.zip_checkpoint(ckpt, "tiny")
    assert z is not None and ws.owns(z) and z.parent.parent == ws.exports
    with zipfile.ZipFile(z) as zf:
        assert "tiny/config.json" in zf.namelist()
    assert Workspace(tmp_path / "w2", zip_limit=1000).zip_checkpoint(ckpt) is None
    a = ws.merge_dir("s1", "my merge!")
    a.mkdir()
    assert ws.merge_dir("s1", "my merge!").name == "my-merge-2" and a.name == "my-merge"
    assert ws.session_dir("s1") != ws.session_dir("s2")


def test_launch_flags():
    import launch

    with pytest.raises(SystemExit) as e:
        launch.main(["--help"])
    assert e.value.code == 0


# ---------------------------------------------------------------------------------------------
# the running app, through gradio_client


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _find(out, pred):
    for o in out:
        if pred(o):
            return o
    raise AssertionError(f"no matching output in {[str(o)[:80] for o in out]}")


def _poll_merge(c, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        out = c.predict(api_name="/poll_merge")
        summary = str(out[2])
        if "Merged" in summary or "Failed" in summary or "Cancelled" in summary:
            return out
        time.sleep(0.2)
    raise AssertionError("merge did not finish")


def test_client_demo_merge_events_compare_export(app_server):  # noqa: F811
    url, ctx = app_server
    c = _client(url)
    out = c.predict(api_name="/load_demo")
    assert any("Compatible" in str(o) for o in out)
    yaml_text = _find(out, lambda o: isinstance(o, str) and o.startswith("merge_method: ties"))
    assert "density: [0.3, 0.7]" in yaml_text

    # a curve edit through the editor's endpoint lands in the recipe
    out = c.predict([0.25, 0.9], "density@variant_a", "attn", False, api_name="/set_curve")
    assert "density: [0.25, 0.9]" in _find(out, lambda o: isinstance(o, str) and "merge_method" in o)

    out = c.predict(api_name="/merge")
    assert "Merging into" in str(out[2])
    out = _poll_merge(c)
    assert "Merged" in out[2] and "57 tensors" in out[2]
    job = next(j for j in list(ctx.jobs._jobs.values()) if j.kind == "merge" and j.status == "done"
               and f"`{j.result.out_dir}`" in out[2])
    owner = job.owner
    events = ctx.jobs.snapshot(owner, job.id)["events"]
    assert events[0]["kind"] == "merge.progress" and events[-1]["data"]["fraction"] == 1.0
    out_dir = Path(job.result.out_dir)
    assert "density: [0.25, 0.9]" in (out_dir / "mergecore_recipe.yml").read_text()

    models = ["base", "variant_a", "variant_b", job.meta["name"]]
    status, html, table = c.predict(models, "1 2 3 4 5", 4, None, "each model's own", None, "", "",
                                    api_name="/compare")
    assert f"**{job.meta['name']}**" in status
    assert html.count('class="cmp-card"') == 4
    rows = {r[0]: r for r in table["data"]}
    assert set(rows) == set(models) and rows[job.meta["name"]][4] == 0  # KL to itself

    md, recipe_btn, ckpt_btn = c.predict(job.meta["name"], api_name="/export")
    assert "zipped" in md
    served = [p for p in ctx.workspace.exports.rglob("*") if p.is_file()]
    assert {p.suffix for p in served} == {".yml", ".zip"}
    import gradio as gr

    assert all(gr.utils.is_static_file(str(p)) for p in served)  # served in place, not copied
    import httpx

    def status(path):
        return httpx.get(f"{url}gradio_api/file={path}").status_code

    assert all(status(p) == 200 for p in served)
    assert status(out_dir / "config.json") == 403  # merges are not served, only prepared downloads
    assert status(Path(__file__).resolve()) == 403 and status("/etc/passwd") == 403


def test_client_failed_job_shows_one_line_and_app_recovers(app_server):  # noqa: F811
    url, _ = app_server
    c = _client(url)
    c.predict(api_name="/load_demo")
    c.predict("slerp", api_name="/set_method")  # slerp takes one model besides the base; the demo has two
    c.predict(api_name="/merge")
    out = _poll_merge(c)
    assert out[2].startswith("**Failed:**") and "exactly 1 model" in out[2] and "\n" not in out[2]
    c.predict("task_arithmetic", api_name="/set_method")
    c.predict(api_name="/merge")
    assert "Merged" in _poll_merge(c)[2]
    plan = c.predict(api_name="/plan")
    assert "method: task_arithmetic" in str(plan)


def test_client_sessions_do_not_see_each_other(app_server):  # noqa: F811
    url, ctx = app_server
    a, b = _client(url), _client(url)
    a.predict(api_name="/load_demo")
    a.predict(api_name="/merge")
    assert "Merged" in _poll_merge(a)[2]
    out = b.predict(api_name="/load_demo")
    export_choices = out[-4]  # ..., export dropdown, status, fetch timer, fetch progress
    assert export_choices["choices"] == []  # B has no merges of its own
    md, _, _ = b.predict(None, api_name="/export")
    assert "No merged checkpoint" in md
    assert b.predict(api_name="/cancel_merge") == "Nothing to cancel."
    owners = {j.owner for j in ctx.jobs._jobs.values()}
    assert len(owners) >= 1


def test_client_imports_a_recipe_and_searches_the_hub_offline(app_server, demo_family, monkeypatch):  # noqa: F811
    url, _ = app_server
    c = _client(url)
    m = {k: str(v) for k, v in demo_family.models.items()}
    text = MERGEKIT_SLERP.format(a=m["base"], b=m["variant_b"])
    out = c.predict(text, api_name="/import_yaml")
    assert "Recipe loaded" in out[-1]
    assert "merge_method: slerp" in _find(out, lambda o: isinstance(o, str) and "merge_method" in o)
    out = c.predict("merge_method: ties\nmodels: [", api_name="/import_yaml")
    assert out[-1].startswith("**Error:**") and "line" in out[-1]
    c.predict(api_name="/merge")
    assert "Merged" in _poll_merge(c)[2]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, msg = c.predict("llama", api_name="/hub_search")
    assert "offline" in msg
    # a Hub id that cannot be fetched: a background job that fails with one line
    out = c.predict("nobody-here/no-such-model", api_name="/add_model")
    assert "Fetching" in out[-3]
    end = time.time() + 30
    while time.time() < end:
        out = c.predict(api_name="/poll_models")
        if "Error" in str(out[-3]):
            break
        time.sleep(0.2)
    assert "cannot fetch 'nobody-here/no-such-model'" in out[-3] and "\n" not in out[-3]
    out = c.predict("/no/such/folder", api_name="/add_model")
    assert "outside the folders this app may read" in out[-3]  # typed paths are confined (app.paths)
    out = c.predict(str(Path(m["base"]).parent / "no-such-folder"), api_name="/add_model")
    assert "neither a local folder nor a Hub id" in out[-3]


def test_client_builds_the_demo_when_started_without_it(app_server, demo_family, monkeypatch):  # noqa: F811
    url, ctx = app_server
    saved = ctx.demo
    monkeypatch.setenv("MERGECORE_DEMO_DIR", str(Path(demo_family.models["base"]).parents[2]))
    monkeypatch.setenv("MERGECORE_DEMO_FAMILY", "synthetic-llama")
    ctx.demo = None  # as with `launch.py --no-demo`
    try:
        c = _client(url)
        out = c.predict(api_name="/load_demo")
        assert "Building the demo models" in out[-3]
        end = time.time() + 60
        while time.time() < end:
            out = c.predict(api_name="/poll_models")
            if "Loaded the demo" in str(out[-3]) or "Error" in str(out[-3]):
                break
            time.sleep(0.2)
        assert "Loaded the demo models" in out[-3]
        assert any("Compatible" in str(o) for o in out)
        assert ctx.demo is not None and ctx.demo.synthetic
    finally:
        ctx.demo = saved


# ---------------------------------------------------------------------------------------------
# the fmnist-vit demo family, the search registry, the Search tab


def test_demo_family_is_the_miniature_fmnist_vit(fmnist_demo):  # noqa: F811
    from PIL import Image

    from app.demo_family import DEFAULT_PROVIDER, PROVIDERS

    fam = fmnist_demo
    assert DEFAULT_PROVIDER == "fmnist-vit-mini" and "synthetic-llama" in PROVIDERS
    assert list(fam.models) == ["base", "fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"]
    assert fam.kind == "image-classification" and not fam.synthetic and fam.base == "base"
    assert fam.tasks.name == "tasks.yml" and fam.val_tasks.name == "tasks-val.yml"
    tasks = {e["task"] for e in fam.examples}
    assert tasks == {"fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"} and len(fam.examples) == 8
    for e in fam.examples:
        assert Image.open(e["image"]).size == (28, 28) and e["label"]
    assert {e["label"] for e in fam.examples if e["task"] == "fmnist_footwear"} <= {"Sandal", "Sneaker", "Ankle boot"}
    assert fam.recipe["merge_method"] == "ties" and len(fam.recipe["models"]) == 4


def test_task_head_compare_scores_every_body_like_the_evaluator(fmnist_demo):  # noqa: F811
    from app import compare as cmp

    fam = fmnist_demo
    heads = cmp.task_heads(fam.tasks)
    assert list(heads) == ["fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"]
    assert heads["fmnist_footwear"]["classes"] == [5, 7, 9] and heads["digits"]["classes"] is None
    ex = next(e for e in fam.examples if e["task"] == "fmnist_footwear")
    h = heads["fmnist_footwear"]
    res = cmp.compare_classifiers({k: str(v) for k, v in fam.models.items()}, ex["image"], head_from=h["head"],
                                  classes=h["classes"], truth=ex["label"], reference="base")
    for name, r in res["outputs"].items():
        assert {label for _, label, _ in r["top"]} == {"Sandal", "Sneaker", "Ankle boot"}, name
        assert abs(sum(p for _, _, p in r["top"]) - 1.0) < 1e-5  # a softmax over the task's classes
    assert all(row["correct"] in ("yes", "no") for row in res["rows"])
    html = cmp.render_html(res)
    assert html.count('class="cmp-card"') == 5 and "cmp-verdict" in html
    # the same as the evaluator: the footwear expert's prediction with its own head on its classes
    own = cmp.classify(fam.models["fmnist_footwear"], ex["image"], classes=[5, 7, 9])
    assert own["top"][0][1] == res["outputs"]["fmnist_footwear"]["top"][0][1]


def test_search_registry_operators_and_merging_map():
    from app import searches as srch

    assert "rmm" in srch.search_names() and srch.get_search("rmm").plots
    with pytest.raises(MergeError, match="unknown search"):
        srch.get_search("nope")
    methods = srch.operator_methods(4)
    assert "ties" in methods and "slerp" not in methods and "passthrough" not in methods  # slerp: exactly 1
    assert "slerp" in srch.operator_methods(1)
    from mergecore.methods import get_method

    text = srch.add_operator(srch.get_search("rmm").field("operators").default, "dare_ties", 4)
    ops = srch.parse_operators(text, 4)
    defaults = [e["method"] for e in srch.default_operators()]  # the engine's default method, and its first
    assert [o["method"] for o in ops] == defaults + ["dare_ties"] and len(set(defaults)) == 2  # with starting values
    required = {p.name for p in get_method("dare_ties").params if p.required}
    assert required <= set(ops[2]["parameters"]) and ops[2]["parameters"] == get_method("dare_ties").starting_params()
    assert [o["name"] for o in srch.parse_operators("[ties, ties]", 2)] == ["ties", "ties_2"]
    for bad, msg in (("- {method: nope}", "unknown merge method"), ("- {method: ties, parameters: {densty: 1}}",
                     "unknown parameter"), ("- {method: slerp, parameters: {t: 0.5}}", "at most 1"),
                     ("method: ties", "YAML list"), ("- [", "line 1")):
        with pytest.raises(MergeError, match=msg):
            srch.parse_operators(bad, 4)
    z, text = srch.merging_map([[0, 1], [1, 4], [1, 0], [2, 2]], n_actions=5, n_layers=3)
    assert z[1][0] == 1 and z[4][1] == 1 and z[0][1] == 1 and z[2][2] == 1 and sum(map(sum, z)) == 4
    assert text[0][1] == "#3" and text[4][1] == "#2"


def test_rmm_form_makes_a_config(fmnist_demo):  # noqa: F811
    from app import searches as srch

    spec = srch.get_search("rmm")
    state = {"models": [{"name": n, "path": str(p)} for n, p in fmnist_demo.models.items()], "base": "base",
             "family": {"tasks": str(fmnist_demo.tasks), "val_tasks": str(fmnist_demo.val_tasks)}}
    session = srch.SearchSession.from_state(state)
    values = {f.key: srch.field_default(f, session) for f in spec.fields}
    assert values["models"] == ["fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"]
    assert values["tasks"] == str(fmnist_demo.val_tasks)  # searches score on validation data
    cfg = spec.make_config(values, session)
    assert cfg.base_model == str(fmnist_demo.models["base"]) and len(cfg.models) == 4 and cfg.dar
    defaults = [e["method"] for e in srch.default_operators()]
    assert [o.method for o in cfg.operators] == defaults
    meta = spec.meta(cfg, session)
    assert meta["action_names"] == values["models"] + defaults and meta["layers"] == 2
    assert spec.load_config(json.loads(json.dumps(spec.dump_config(cfg)))) == cfg
    for change, msg in (({"models": []}, "at least one model"), ({"data_ratio": 0}, "data_ratio"),
                        ({"tasks": "/nope.yml"}, "not found"), ({"episodes": 0}, "episodes")):
        with pytest.raises(MergeError, match=msg):
            spec.make_config({**values, **change}, session)


KEY_A = "a" * 32
KEY_B = "b" * 32


def _search_args(fam, key, **over):
    args = {"name": "rmm", "key": key, "rmm_models": ["fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"],
            "rmm_base": "base", "rmm_tasks": str(fam.val_tasks), "rmm_episodes": 6, "rmm_data_ratio": 0.5,
            "rmm_update_every": 2, "rmm_rerank_top": 1, "rmm_seed": 0}
    args.update(over)
    return args


def _poll_search(c, key, until=("done", "failed", "cancelled"), timeout=120, episodes=None):
    end = time.time() + timeout
    while time.time() < end:
        out = c.predict(key, api_name="/poll_search")
        data = out[-1]
        if isinstance(data, dict) and "status" in data and (data["status"] in until or (episodes is not None and data["episodes"] >= episodes)):
            return out
        time.sleep(0.1)
    raise AssertionError(f"search did not reach {until} / {episodes} episodes: {out[-1]}")


def _figure(plot) -> dict:
    plot = plot.get("value", plot) if plot.get("__type__") == "update" else plot
    return json.loads(plot["plot"]) if isinstance(plot["plot"], str) else plot["plot"]


def test_client_compare_on_the_fmnist_demo(fmnist_server, fmnist_demo):  # noqa: F811
    from app.tabs.compare import TASK_HEAD

    url, _ = fmnist_server
    c = _client(url)
    out = c.predict(api_name="/load_demo")
    assert any("Compatible" in str(o) for o in out) and any("trained here" in str(o) for o in out)
    ex = next(e for e in fmnist_demo.examples if e["task"] == "digits")
    from gradio_client import handle_file

    names = list(fmnist_demo.models)
    status, html, table = c.predict(names, "", 8, handle_file(ex["image"]), TASK_HEAD, "digits", ex["label"],
                                    str(fmnist_demo.tasks), api_name="/compare")
    assert "digits head" in html and html.count('class="cmp-card"') == 5
    assert {r[0] for r in table["data"]} == set(names) and "correct" in table["headers"]
    status, _, _ = c.predict(names, "", 8, handle_file(ex["image"]), TASK_HEAD, None, "", str(fmnist_demo.tasks),
                             api_name="/compare")
    assert status.startswith("**Error:**") and "choose a task" in status


def test_client_rmm_search_streams_events_and_its_recipe_merges(fmnist_server, fmnist_demo):  # noqa: F811
    url, ctx = fmnist_server
    c = _client(url)
    c.predict(api_name="/load_demo")
    out = c.predict(**_search_args(fmnist_demo, KEY_A), api_name="/start_search")
    assert "Started" in out[2], out[2]  # (timer, progress, status, plots ...; states and rows are not outputs)
    seen = set()
    end = time.time() + 120
    while time.time() < end:  # the events arrive through the poll endpoint while the search runs
        out = c.predict(KEY_A, api_name="/poll_search")
        data = out[-1]
        if isinstance(data, dict) and "status" in data:
            seen.add(data["episodes"])
            if data["status"] != "running" and data["status"] != "queued":
                break
        time.sleep(0.05)
    assert data["status"] == "done", data
    assert data["episodes"] == 6 and len(seen) >= 2
    reward, timing, metrics, heatmap = (_figure(p) for p in out[2:6])
    names = [t["name"] for t in reward["data"]]
    assert names == ["raw reward", "DAR reward", "best so far"] and reward["data"][0]["x"] == [1, 2, 3, 4, 5, 6]
    assert timing["data"][0]["type"] == "bar" and len(timing["data"][0]["x"]) == 6
    assert {t["name"] for t in metrics["data"]} == {"fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"}
    hm = heatmap["data"][0]
    from app.searches import default_operators

    assert hm["type"] == "heatmap" and len(hm["x"]) == 2 and hm["y"] == [
        "fmnist_tops", "fmnist_footwear", "fmnist_other", "digits", *[e["method"] for e in default_operators()]]
    assert "Best merge" in out[-5] and "merge_method: passthrough" in out[-4]["value"]
    job = ctx.jobs.find(f"browser-{KEY_A}", data["id"])
    assert (Path(job.meta["out"]) / "result.json").is_file()

    # use the recipe: it lands in the Recipe tab's YAML and merges on the Merge tab
    out = c.predict(KEY_A, api_name="/use_search_recipe")
    assert "Loaded the best rmm recipe" in str(out[-1])
    assert "merge_method: passthrough" in _find(out, lambda o: isinstance(o, str) and "merge_method" in o)
    c.predict(api_name="/merge")
    assert "Merged" in _poll_merge(c)[2]

    # merge the best recipe and evaluate it on the test tasks
    scores, out = _replay_scores(c, KEY_A, "rmm")
    assert "mean" in scores["headers"]
    assert "rmm-best" in out[3]["choices"][-1]  # offered on the Compare tab


def test_client_search_stop_resume_and_a_second_page(fmnist_server, fmnist_demo):  # noqa: F811
    url, ctx = fmnist_server
    owner = f"browser-{KEY_B}"
    c = _client(url)
    c.predict(api_name="/load_demo")
    assert "nothing to resume" in c.predict(KEY_B, api_name="/resume_search")[2]
    c.predict(**_search_args(fmnist_demo, KEY_B, rmm_episodes=400, rmm_rerank_top=0), api_name="/start_search")
    _poll_search(c, KEY_B, episodes=5)
    assert "a search is already running" in c.predict(**_search_args(fmnist_demo, KEY_B),
                                                      api_name="/start_search")[2]
    assert "Stopping" in c.predict(KEY_B, api_name="/stop_search")
    out = _poll_search(c, KEY_B)
    assert out[-1]["status"] == "cancelled" and "Resume" in out[-3]
    first = ctx.jobs.jobs(owner, kind="search")[-1]
    out_dir = Path(first.meta["out"])
    assert (out_dir / "rmm_checkpoint.safetensors").is_file() and not (out_dir / "result.json").exists()
    stopped_at = len([e for e in first.events if e.kind == "rmm.episode"])

    out = c.predict(KEY_B, api_name="/resume_search")
    assert "Resuming" in out[2]
    # a second page of the same browser (same key, new session) finds the running search
    c2 = _client(url)
    assert c2.predict(KEY_B, api_name="/attach_search")[0] == KEY_B
    second = ctx.jobs.jobs(owner, kind="search")[-1]
    assert second is not first and second.meta["out"] == str(out_dir) and second.meta["resumed"]
    out = _poll_search(c2, KEY_B, episodes=stopped_at + 3)
    kinds = [e.kind for e in second.events]
    resumed_at = next(e.data["episode"] for e in second.events if e.kind == "rmm.resumed")
    assert resumed_at % 2 == 0 and 0 < resumed_at <= stopped_at  # the last PPO-update boundary
    replayed = [e.data["episode"] for e in second.events[:kinds.index("rmm.resumed")] if e.kind == "rmm.episode"]
    assert replayed == list(range(resumed_at))  # the plots start from episode 1, not from the checkpoint
    reward = _figure(out[2])
    assert reward["data"][0]["x"][:resumed_at + 1] == list(range(1, resumed_at + 2))
    # another browser sees none of it
    other = _client(url)
    other.predict("c" * 32, api_name="/attach_search")
    assert "status" not in (other.predict("c" * 32, api_name="/poll_search")[-1] or {})  # no job to show
    assert "Nothing to stop" in other.predict("c" * 32, api_name="/stop_search")
    assert ctx.jobs.jobs("browser-" + "c" * 32) == []
    c2.predict(KEY_B, api_name="/stop_search")
    assert _poll_search(c2, KEY_B)[-1]["status"] == "cancelled"


# ---------------------------------------------------------------------------------------------
# DAM and evolutionary search in the Search tab

KEY_D = "d" * 32
KEY_E = "e" * 32
KEY_F = "f" * 32
EXPERTS = ["fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"]


def _demo_session(fam):
    from app import searches as srch

    state = {"models": [{"name": n, "path": str(p)} for n, p in fam.models.items()], "base": "base",
             "family": {"tasks": str(fam.tasks), "val_tasks": str(fam.val_tasks)}}
    return srch.SearchSession.from_state(state)


def test_dam_and_evo_forms_make_configs(fmnist_demo):  # noqa: F811
    from app import searches as srch

    assert srch.search_names() == ["rmm", "dam", "evo"]
    session = _demo_session(fmnist_demo)
    dam = srch.get_search("dam")
    values = {f.key: srch.field_default(f, session) for f in dam.fields}
    assert values["models"] == EXPERTS and values["tasks"] == str(fmnist_demo.val_tasks)
    cfg = dam.make_config(values, session)
    assert cfg.base_model == str(fmnist_demo.models["base"]) and cfg.train_tasks == cfg.eval_tasks == values["tasks"]
    assert [(m.model, m.task) for m in cfg.models] == [(str(fmnist_demo.models[n]), n) for n in EXPERTS]
    assert cfg.granularity == "column" and cfg.loss.kind == "kl" and cfg.eval_subset == 0.25
    # two of the four experts: each still gets its own task (by name), not the first two
    two = dam.make_config({**values, "models": ["digits", "fmnist_other"], "granularity": "layer",
                           "loss": "entropy", "eval_subset": 1.0}, session)
    assert [m.task for m in two.models] == ["digits", "fmnist_other"] and two.eval_subset is None
    assert two.granularity == "layer" and two.loss.kind == "entropy"
    meta = dam.meta(cfg, session)
    assert meta["models"] == EXPERTS and meta["steps"] == 20 and meta["base"] == "base"
    assert dam.load_config(json.loads(json.dumps(dam.dump_config(cfg)))) == cfg
    for change, msg in (({"models": []}, "at least one model"), ({"steps": 0}, "^steps: "),
                        ({"lr": 0}, "optimizer.lr"), ({"tasks": "/nope.yml"}, "not found"),
                        ({"eval_subset": 2}, "eval_subset"), ({"temperature": "hot"}, "not a number")):
        with pytest.raises(MergeError, match=msg) as err:
            dam.make_config({**values, **change}, session)
        assert "\n" not in str(err.value)

    evo = srch.get_search("evo")
    values = {f.key: srch.field_default(f, session) for f in evo.fields}
    cfg = evo.make_config(values, session)
    assert cfg.method == srch.starting_method() and cfg.backend == "local" and cfg.popsize is None
    assert cfg.parameters["weight"].init == 0.3 and len(cfg.models) == 4
    meta = evo.meta(cfg, session)
    assert meta["genes"] == 4 and meta["popsize"] == 8 and meta["expected_evals"] == 24
    assert evo.load_config(json.loads(json.dumps(evo.dump_config(cfg)))) == cfg
    # empty bounds: the method's required real parameters; filters and layer groups multiply the genes
    cfg = evo.make_config({**values, "method": "ties", "parameters": "", "filters": "attention",
                           "layer_groups": 2, "fixed": "density: 0.5", "popsize": 4}, session)
    assert list(cfg.parameters) == ["weight"] and cfg.fixed == {"density": 0.5} and cfg.popsize == 4
    assert evo.meta(cfg, session)["genes"] == 4 * 2 * 2
    for change, msg in (({"models": []}, "at least one model"), ({"parameters": "densty: [0, 1]"},
                        "not a parameter of method"), ({"parameters": "- weight"}, "YAML mapping"),
                        ({"popsize": 1}, "popsize"), ({"max_evals": 0}, "max_evals"),
                        ({"layer_groups": 5}, "exceeds the 2 layers"), ({"sigma0": 0}, "sigma0")):
        with pytest.raises(MergeError, match=msg) as err:
            evo.make_config({**values, **change}, session)
        assert "\n" not in str(err.value)


def _dam_args(fam, key, **over):
    args = {"name": "dam", "key": key, "dam_models": EXPERTS, "dam_base": "base", "dam_tasks": str(fam.val_tasks),
            "dam_steps": 4, "dam_batch_size": 8, "dam_examples_per_task": 16, "dam_eval_every": 2,
            "dam_eval_subset": 0.5, "dam_lr": 0.02, "dam_lambda_l2": 0.01, "dam_seed": 0}
    args.update(over)
    return args


def _evo_args(fam, key, **over):
    args = {"name": "evo", "key": key, "evo_models": EXPERTS, "evo_base": "base", "evo_tasks": str(fam.val_tasks),
            "evo_method": "task_arithmetic", "evo_max_evals": 8, "evo_popsize": 4, "evo_data_ratio": 0.5,
            "evo_seed": 1}
    args.update(over)
    return args


def _poll_until(c, key, pred, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        out = c.predict(key, api_name="/poll_search")
        data = out[-1]
        if isinstance(data, dict) and "status" in data and pred(data):
            return out
        time.sleep(0.1)
    raise AssertionError(f"search did not get there: {out[-1]}")


def _replay_scores(c, key, name):
    out = c.predict(key, api_name="/replay_search")
    assert "merging the best recipe" in out[-1], out[-1]
    end = time.time() + 60
    while time.time() < end:
        out = c.predict(api_name="/poll_replay")
        if "merged into" in str(out[0]) or "error" in str(out[0]).lower():
            break
        time.sleep(0.2)
    assert "merged into" in out[0], out[0]
    scores = out[1]["value"] if isinstance(out[1], dict) and "value" in out[1] else out[1]
    assert [r[0] for r in scores["data"]] == ["base (no merge)", f"{name}-best"]
    return scores, out


def test_client_dam_search_plots_its_loss_terms_and_its_recipe_replays(fmnist_server, fmnist_demo):  # noqa: F811
    url, ctx = fmnist_server
    c = _client(url)
    c.predict(api_name="/load_demo")
    # bad input: a one-line error, nothing started
    # (0 steps never gets here: the number box's minimum refuses it; make_config's own check is tested above)
    for over, msg in (({"dam_models": []}, "tick at least one model"), ({"dam_lr": 0}, "optimizer.lr: ")):
        out = c.predict(**_dam_args(fmnist_demo, KEY_D, **over), api_name="/start_search")
        assert out[2].startswith("**Error:**") and msg in out[2] and "\n" not in out[2], out[2]
    assert ctx.jobs.jobs(f"browser-{KEY_D}", kind="search") == []

    out = c.predict(**_dam_args(fmnist_demo, KEY_D), api_name="/start_search")
    assert "Started **DAM" in out[2], out[2]
    fractions = set()
    out = _poll_until(c, KEY_D, lambda d: fractions.add(d["fraction"]) or d["status"] not in ("queued", "running"))
    data = out[-1]
    assert data["status"] == "done" and data["fraction"] == 1.0, data
    assert len(fractions) >= 2  # the progress moved while it ran
    loss, metrics, regs, grad = (_figure(p) for p in out[2:6])
    names = [t["name"] for t in loss["data"]]
    assert names == ["total", "kl (sum over tasks)"] + [f"kl/{t}" for t in EXPERTS]
    for t in loss["data"]:
        assert t["x"] == [1, 2, 3, 4] and len(t["y"]) == 4 and all(isinstance(v, float) for v in t["y"])
    total, kl = loss["data"][0]["y"], loss["data"][1]["y"]
    assert all(a > b for a, b in zip(total, kl))  # λ2 > 0: the total adds the weighted L2 term
    assert kl[0] == pytest.approx(sum(t["y"][0] for t in loss["data"][2:]))
    assert [t["name"].split(":")[0] for t in regs["data"]] == ["cos", "l1", "l2"]
    assert all(len(t["y"]) == 4 for t in regs["data"]) and "λ 0.01" in regs["data"][2]["name"]
    assert {t["name"] for t in metrics["data"]} == set(EXPERTS) | {"mean"}
    assert metrics["data"][-1]["x"] == [0, 2, 4]  # at the start, every 2 steps, and the final one
    assert all(0 <= v <= 1 for t in metrics["data"] for v in t["y"])
    assert len(grad["data"][0]["y"]) == 4
    assert "Trained" in out[-5] and "dam_coefficients.safetensors" in out[-5]
    assert "merge_method: dam" in out[-4]["value"]
    job = ctx.jobs.find(f"browser-{KEY_D}", data["id"])
    out_dir = Path(job.meta["out"])
    assert (out_dir / "recipe.yml").is_file() and (out_dir / "dam_coefficients.safetensors").is_file()
    assert json.loads((out_dir / "app_search.json").read_text())["search"] == "dam"
    result = json.loads((out_dir / "result.json").read_text())

    # the engine replays the recipe (Merge it and evaluate: merged from its folder, scored on the test tasks)
    scores, _ = _replay_scores(c, KEY_D, "dam")
    assert set(EXPERTS) <= set(scores["headers"])
    # ... and from the Recipe and Merge tabs (the coefficients file is found from there too)
    out = c.predict(KEY_D, api_name="/use_search_recipe")
    assert "Loaded the best dam recipe" in str(out[-1])
    c.predict(api_name="/merge")
    summary = _poll_merge(c)[2]
    assert "Merged" in summary, summary
    from mergecore.eval import Evaluator

    merged = Path(re.search(r"written to `([^`]+)`", summary).group(1))
    r = Evaluator(fmnist_demo.val_tasks, batch_size=128).evaluate(merged)
    assert r.scores == pytest.approx(result["eval"]["scores"], abs=1e-9)  # the search's final evaluation


def test_client_evo_search_plots_candidates_and_its_recipe_replays(fmnist_server, fmnist_demo):  # noqa: F811
    url, ctx = fmnist_server
    c = _client(url)
    c.predict(api_name="/load_demo")
    for over, msg in (({"evo_models": []}, "tick at least one model"),
                      ({"evo_parameters": "densty: [0, 1]"}, "'densty' is not a parameter of method 'task_arithmetic'"),
                      ({"evo_method": "slerp"}, "'weight' is not a parameter of method 'slerp'")):
        out = c.predict(**_evo_args(fmnist_demo, KEY_E, **over), api_name="/start_search")
        assert out[2].startswith("**Error:**") and msg in out[2] and "\n" not in out[2], out[2]

    out = c.predict(**_evo_args(fmnist_demo, KEY_E), api_name="/start_search")
    assert "Started **Evolutionary" in out[2], out[2]
    out = _poll_until(c, KEY_E, lambda d: d["status"] not in ("queued", "running"))
    data = out[-1]
    assert data["status"] == "done" and data["fraction"] == 1.0, data
    score, metrics, population, values = (_figure(p) for p in out[2:6])
    cands, best = score["data"]
    assert cands["name"] == "candidate" and cands["x"] == list(range(1, 9)) and len(cands["y"]) == 8
    assert best["y"] == [max(cands["y"][:i + 1]) for i in range(8)]
    assert {t["name"] for t in metrics["data"]} == set(EXPERTS) | {"mean (the score)"}
    assert metrics["data"][-1]["x"] == [4, 8] and metrics["data"][-1]["y"][-1] == best["y"][-1]
    assert [t["name"] for t in population["data"]] == ["max", "mean", "min"] and population["data"][0]["x"] == [1, 2]
    bar = values["data"][0]
    assert bar["type"] == "bar" and len(bar["x"]) == 4 and all(0 <= v <= 1 for v in bar["y"])
    assert "Best candidate" in out[-5] and "merge_method: task_arithmetic" in out[-4]["value"]
    job = ctx.jobs.find(f"browser-{KEY_E}", data["id"])
    out_dir = Path(job.meta["out"])
    result = json.loads((out_dir / "result.json").read_text())
    assert result["evaluations"] == 8 and result["best"]["score"] == best["y"][-1]

    # the recipe replays through the engine to the score the search reported
    from mergecore.merging import merge
    from mergecore.recipe import load_recipe
    from mergecore.search.evo.worker import EvoWorker

    cfg = srch_load("evo", out_dir)
    root = Path(cfg.tasks).parent
    merged = merge(load_recipe(out_dir / "recipe.yml"), out_dir / "replayed").out_dir
    genome = cfg.genome(root)
    replay = EvoWorker(genome, cfg.eval_spec(root, genome)).evaluator.evaluate(merged, subset_index=cfg.subset_index)
    assert replay.mean == result["best"]["score"] and replay.scores == result["best"]["scores"]
    _replay_scores(c, KEY_E, "evo")


def srch_load(name: str, out_dir: Path):
    """A search's config as Resume reads it back (app_search.json in its folder)."""
    from app import searches as srch

    data = json.loads((out_dir / "app_search.json").read_text())
    assert data["search"] == name
    return srch.get_search(name).load_config(data["config"])


def _wait_events(ctx, owner, kind, n, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        job = ctx.jobs.jobs(owner, kind="search")[-1]
        if len([e for e in job.events if e.kind == kind and not e.data.get("replayed")]) >= n or job.done:
            return job
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} {kind} events")


def test_client_dam_and_evo_stop_and_resume_with_their_history(fmnist_server, fmnist_demo):  # noqa: F811
    url, ctx = fmnist_server
    owner = f"browser-{KEY_F}"
    c = _client(url)
    c.predict(api_name="/load_demo")
    for start, kind, first_kind, count in (
            (_dam_args(fmnist_demo, KEY_F, dam_steps=400, dam_eval_every=3), "dam.step", "dam.resumed", "step"),
            (_evo_args(fmnist_demo, KEY_F, evo_max_evals=400), "evo.generation", "evo.resumed", "generation")):
        assert "Started" in c.predict(**start, api_name="/start_search")[2]
        first = _wait_events(ctx, owner, kind, 4)
        stopping = c.predict(KEY_F, api_name="/stop_search")
        assert stopping.startswith("Stopping after the current " + ("training step" if start["name"] == "dam"
                                                                    else "evaluation")), stopping
        out = _poll_until(c, KEY_F, lambda d: d["status"] not in ("queued", "running"))
        assert out[-1]["status"] == "cancelled" and "Resume" in out[-3], out[-1]
        out_dir = Path(first.meta["out"])
        assert not (out_dir / "result.json").exists()
        assert srch_load(start["name"], out_dir) is not None  # what Resume starts from, after a reload too

        out = c.predict(KEY_F, api_name="/resume_search")
        assert "Resuming" in out[2], out[2]
        second = _wait_events(ctx, owner, kind, 2)
        assert second is not first and second.meta["out"] == str(out_dir)
        kinds = [e.kind for e in second.events]
        at = second.events[kinds.index(first_kind)].data[count]
        replayed = [e.data[count] for e in second.events[:kinds.index(first_kind)] if e.kind == kind]
        new = [e.data[count] for e in second.events if e.kind == kind and not e.data.get("replayed")]
        if start["name"] == "dam":  # a stop between steps keeps them all; one during an evaluation the last checkpoint
            done = max(e.data["step"] for e in first.events if e.kind == "dam.step")
            assert (at == done or at % 3 == 0) and 0 < at <= done
            assert replayed == list(range(1, at + 1)) and new[0] == at + 1
        else:  # the generation the stop cut short is redone
            assert at >= 4 and replayed == list(range(at)) and new[0] == at
        out = c.predict(KEY_F, api_name="/poll_search")
        fig = _figure(out[2])
        assert fig["data"][0]["x"][:3] == [1, 2, 3]  # the plots start from the beginning, not at the checkpoint
        if start["name"] == "evo":
            assert _figure(out[5])["data"][0]["type"] == "bar"  # the checkpoint's best, before any new best
        c.predict(KEY_F, api_name="/stop_search")
        assert _poll_until(c, KEY_F, lambda d: d["status"] not in ("queued", "running"))[-1]["status"] == "cancelled"
