"""The browser's session on disk (app.session) and its merge history (app.history): a round trip,
unreadable files that give a fresh session and one warning line (never a crash), bounded
lists, saved recipes, merges recorded by the job manager whether or not a page is open, scores
from an evaluation, deleting only folders mergecore marked, and merges that queue."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from mergecore.errors import MergeError

OWNER = "browser-" + "a" * 32


@pytest.fixture
def ctx(tmp_path):
    from app.context import make_context

    return make_context(tmp_path / "work")


def _wait(job, timeout=30.0):
    assert job.wait(timeout), f"job {job.id} did not finish: {job.status}"


def _demo_state(paths: dict[str, Path]) -> dict:
    return {"models": [{"name": n, "ref": str(p), "path": str(p)} for n, p in paths.items()], "base": "base",
            "family": None, "trust_remote_code": False}


def test_round_trip_and_restore(ctx, llama_family):
    from app import forms
    from app.session import SESSION_FILE, restore_page

    store = ctx.sessions
    roots = [*ctx.read_roots(), llama_family["base"].parent]
    state = _demo_state(llama_family)
    form = forms.new_form("task_arithmetic", state)
    key = next(k for k in form["values"] if k.startswith("weight@"))
    form = forms.set_value(form, state, key, [0.2, 0.9])
    state["trust_remote_code"] = True
    store.save_page(OWNER, state, form)
    path = store.folder(OWNER) / SESSION_FILE
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["state"]["models"][0]["name"] == "base"
    assert not list(path.parent.glob(".session.json.tmp-*"))  # written atomically, nothing left over

    got_state, got_form, warning = restore_page(store, OWNER, roots)
    assert warning is None
    assert [m["name"] for m in got_state["models"]] == ["base", "a", "b"] and got_state["base"] == "base"
    assert got_state["trust_remote_code"] is False  # asked again after a reload
    assert got_form["method"] == "task_arithmetic" and got_form["values"][key] == [0.2, 0.9]
    assert forms.recipe_yaml(got_form, got_state) == forms.recipe_yaml(form, state)

    # another browser has nothing; the models outside the folders the app may read are dropped
    assert restore_page(store, "browser-" + "b" * 32, roots) == (None, None, None)
    got_state, _, warning = restore_page(store, OWNER, ctx.read_roots())
    assert got_state["models"] == [] and "outside the folders" in warning and "\n" not in warning


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", "huge"])
def test_unreadable_session_gives_a_fresh_one_and_one_warning(ctx, content):
    from app.session import MAX_SESSION_BYTES, SESSION_FILE, restore_page

    path = ctx.sessions.folder(OWNER) / SESSION_FILE
    path.write_bytes(b" " * (MAX_SESSION_BYTES + 1) + b"{}" if content == "huge" else content)
    state, form, warning = restore_page(ctx.sessions, OWNER, ctx.read_roots())
    assert (state, form) == (None, None)
    assert warning.startswith("The saved session.json could not be read") and "\n" not in warning
    assert not path.exists() and path.with_name("session.json.bad").is_file()  # kept aside, for a look
    assert restore_page(ctx.sessions, OWNER, ctx.read_roots()) == (None, None, None)  # said once
    ctx.sessions.save_page(OWNER, {"models": []}, {})  # and the session works again
    assert json.loads(path.read_text())["state"] == {"models": []}


@pytest.mark.parametrize("state,form", [
    ("models", {"method": 3}),
    ({"models": [{"name": 1}, "x", {"name": "m", "ref": "r", "path": "/nowhere"}], "base": ["b"]},
     {"method": "no-such-method", "values": "x"}),
    ({"models": None, "family": 5}, {"method": "linear", "values": {"weight@x": "heavy"}, "search_dirs": ["/etc"]}),
])
def test_garbage_in_a_session_file_never_crashes_the_page(ctx, state, form):
    from app.session import SESSION_FILE, restore_page

    (ctx.sessions.folder(OWNER) / SESSION_FILE).write_text(json.dumps({"state": state, "form": form, "merges": 7}))
    got_state, got_form, warning = restore_page(ctx.sessions, OWNER, ctx.read_roots())
    assert got_state["models"] == [] and got_state["base"] is None and got_state["family"] is None
    assert got_form.get("search_dirs", []) == [] and "\n" not in (warning or "")
    assert ctx.sessions.read(OWNER)["merges"] == []


def test_lists_are_bounded_and_a_too_large_session_keeps_the_old_file(ctx):
    from app.session import MAX_MERGES, MAX_SESSION_BYTES

    store = ctx.sessions
    store.update(OWNER, lambda d: d["merges"].extend({"id": f"m{i}", "name": f"m{i}"} for i in range(MAX_MERGES + 20)))
    merges = store.read(OWNER)["merges"]
    assert len(merges) == MAX_MERGES and merges[0]["id"] == "m20"  # the oldest went first
    store.save_page(OWNER, {"models": [], "big": "x" * (MAX_SESSION_BYTES + 10)}, {})
    assert store.read(OWNER)["state"] is None and len(store.read(OWNER)["merges"]) == MAX_MERGES


def test_saved_recipes(ctx):
    from app.session import MAX_RECIPE_CHARS, recipe_name

    store = ctx.sessions
    assert store.save_recipe(OWNER, "  my ../best/ recipe!  ", "merge_method: linear\n", "linear") == "my-best-recipe"
    assert recipe_name("a" * 100) == "a" * 60
    store.save_recipe(OWNER, "second", "merge_method: ties\n")
    assert list(store.recipes(OWNER)) == ["my-best-recipe", "second"]
    assert store.recipes(OWNER)["my-best-recipe"]["yaml"] == "merge_method: linear\n"
    assert store.recipes("browser-" + "c" * 32) == {}
    with pytest.raises(MergeError, match="give the recipe a name"):
        store.save_recipe(OWNER, " /// ", "merge_method: linear\n")
    with pytest.raises(MergeError, match="over the"):
        store.save_recipe(OWNER, "big", "x" * (MAX_RECIPE_CHARS + 1))
    store.delete_recipe(OWNER, "second")
    assert list(store.recipes(OWNER)) == ["my-best-recipe"]
    with pytest.raises(MergeError, match="no saved recipe"):
        store.delete_recipe(OWNER, "second")
    (store.folder(OWNER) / "recipes.json").write_text("][")
    assert store.recipes(OWNER) == {} and "recipes.json" in store.take_warning(OWNER)


def _fake_merge(ctx, owner, name, gate=None, fail=False):
    """A merge job that writes a marked folder (as mergecore does) and returns a result like it."""
    from mergecore.io.outdir import write_marker

    out = ctx.workspace.merge_dir(owner, name)

    def fn(jc):
        if gate is not None:
            while not gate.wait(0.02):
                jc.check()
        if fail:
            raise MergeError("tensor 'x' has shape [2] but [3] elsewhere")
        out.mkdir()
        write_marker(out, "merge")
        (out / "model.safetensors").write_bytes(b"0" * 100)
        return SimpleNamespace(out_dir=str(out), bytes_written=100, tensors=3, seconds=0.1, shards=1)

    return ctx.jobs.submit(owner, "merge", fn, title=out.name, exclusive=False, queue=f"merge:{owner}",
                           meta={"name": out.name, "out": str(out), "recipe": "merge_method: linear\nmodels: []\n"})


def test_history_records_merges_scores_and_survives_a_restart(ctx):
    import pandas as pd

    from app import history
    from app.context import make_context

    gate = threading.Event()
    job = _fake_merge(ctx, OWNER, "first", gate=gate)
    recs = history.records(ctx.sessions, ctx.jobs, OWNER)
    assert [(r["name"], r["status"]) for r in recs] in ([("first", "queued")], [("first", "running")])
    gate.set()
    _wait(job)
    bad = _fake_merge(ctx, OWNER, "second", fail=True)
    _wait(bad)
    recs = history.records(ctx.sessions, ctx.jobs, OWNER)
    assert [(r["name"], r["status"], r["method"]) for r in recs] == [("first", "done", "linear"),
                                                                      ("second", "failed", "linear")]
    assert recs[0]["bytes"] == 100 and "shape [2]" in recs[1]["error"]
    assert list(ctx.merges(OWNER)) == ["first"]  # only merges on disk reach Compare and Export

    history.record_evaluation(ctx.sessions, OWNER, pd.DataFrame([{"model": "first", "task1": 0.5, "mean": 0.5}]),
                              tasks="tasks.yml")
    rows = history.table(history.records(ctx.sessions, ctx.jobs, OWNER))
    assert rows[1][0] == "first" and rows[1][7] == "0.5000" and rows[0][1].startswith("failed: tensor")
    assert history.latest_evaluation(ctx.sessions, OWNER)["rows"] == [{"model": "first", "task1": 0.5, "mean": 0.5}]

    # a restarted app (a new job manager on the same work dir) finds the history and the merge
    again = make_context(ctx.workspace.root)
    assert list(again.merges(OWNER)) == ["first"]
    assert [r["status"] for r in history.records(again.sessions, again.jobs, OWNER)] == ["done", "failed"]
    # a merge that was running when the app stopped is shown as interrupted
    again.sessions.update(OWNER, lambda d: d["merges"].append({"id": "merge-9-x", "name": "lost", "status": "running"}))
    assert history.records(again.sessions, again.jobs, OWNER)[-1]["status"] == "interrupted"


def test_delete_only_a_marked_merge_folder(ctx, tmp_path):
    from mergecore.io.outdir import MARKER

    from app import history

    jobs = [_fake_merge(ctx, OWNER, n) for n in ("keep", "gone", "unmarked")]
    for j in jobs:
        _wait(j)
    ids = {r["name"]: r["id"] for r in history.records(ctx.sessions, ctx.jobs, OWNER)}
    unmarked = Path(jobs[2].meta["out"])
    (unmarked / MARKER).unlink()
    with pytest.raises(MergeError, match="no mergecore merge marker"):
        history.delete(ctx.sessions, ctx.workspace, ctx.jobs, OWNER, ids["unmarked"])
    assert unmarked.is_dir() and "unmarked" in ctx.merges(OWNER)

    # a record pointing elsewhere (hand-edited) is refused too, whatever the folder holds
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / MARKER).write_text(json.dumps({"kind": "merge"}))
    ctx.sessions.update(OWNER, lambda d: d["merges"].append({"id": "x", "name": "x", "out": str(elsewhere),
                                                             "status": "done"}))
    with pytest.raises(MergeError, match="not a folder of this browser's merges"):
        history.delete(ctx.sessions, ctx.workspace, ctx.jobs, OWNER, "x")
    assert elsewhere.is_dir()

    msg = history.delete(ctx.sessions, ctx.workspace, ctx.jobs, OWNER, ids["gone"])
    assert msg.startswith("Deleted `gone`") and not Path(jobs[1].meta["out"]).exists()
    assert list(ctx.merges(OWNER)) == ["keep", "unmarked"]
    assert "gone" not in [r["name"] for r in history.records(ctx.sessions, ctx.jobs, OWNER)]
    with pytest.raises(MergeError, match="choose a merge"):
        history.delete(ctx.sessions, ctx.workspace, ctx.jobs, OWNER, ids["gone"])


def test_two_merges_queue_and_both_reach_compare_and_export(tmp_path, llama_family, monkeypatch):
    """The second merge of a browser waits behind the first (its place shown) and both finish;
    before, the second was refused and the page stopped following the first."""
    import mergecore
    from mergecore.recipe import recipe_from_dict

    from app.context import make_context
    from app.tabs.merge import MergeTab, submit_merge

    ctx = make_context(tmp_path / "work", allowed_dirs=[llama_family["base"].parent])
    gate, real = threading.Event(), mergecore.merge

    def gated(*args, **kwargs):
        assert gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(mergecore, "merge", gated)
    recipe = recipe_from_dict({"merge_method": "linear", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": 0.5}},
        {"model": str(llama_family["b"]), "parameters": {"weight": 0.5}}]})
    first, out1 = submit_merge(ctx, OWNER, recipe, "merge", "as in recipe", 1)
    second, out2 = submit_merge(ctx, OWNER, recipe, "merge", "float16", 1)
    assert (out1.name, out2.name) == ("merge", "merge-2")  # the queued one does not take the same folder
    assert (ctx.jobs.position(first), ctx.jobs.position(second)) == (0, 1)
    assert "`merge-2` — 1 ahead" in MergeTab(ctx).queue_text(OWNER, first)
    assert second.status == "queued"
    gate.set()
    _wait(first)
    _wait(second)
    assert (first.status, second.status) == ("done", "done") and second.started >= first.finished
    assert list(ctx.merges(OWNER)) == ["merge", "merge-2"]
    from app import history

    recs = history.records(ctx.sessions, ctx.jobs, OWNER)
    assert [r["status"] for r in recs] == ["done", "done"] and recs[0]["recipe"].startswith("merge_method: linear")
