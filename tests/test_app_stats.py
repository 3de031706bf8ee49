"""The Recipe tab's statistics panel for data-informed methods (`MergeMethod.stats`): shown from the
schema alone, never offered to searches, statistics collected over a tasks file in the background
into the session's folder and attached to the recipe's artifacts (then merged), said to no longer
match when the recipe's models change; a refused tasks path and a merge without statistics are
one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from _app_helpers import client, poll, poll_merge, recipe_text
from mergecore.errors import MergeError

pytest_plugins = ("_app_helpers",)


def _informed() -> list[str]:
    from mergecore.methods import all_methods

    return [n for n, m in all_methods().items() if m.stats]


def _fmnist_state(fam) -> dict:
    from app import state as st

    state = st.new_session()
    for name, path in fam.models.items():
        state = st.add_model(state, str(path), path, name=name)
    state["base"] = fam.base
    state["family"] = {"tasks": str(fam.tasks), "val_tasks": str(fam.val_tasks)}
    return state


def _without_taskless(form: dict, state: dict) -> dict:
    """The form with the models that have no task of their own (the demo's base) left out."""
    from app import forms

    return forms.new_form(form["method"], state, {**form, "left_out": ["base"]})


def test_panel_and_searches_follow_the_schema(demo_family):
    from app import forms, searches
    from app import stats_panel as sp
    from app import state as st
    from mergecore.methods import all_methods

    informed = _informed()
    assert informed, "no data-informed method is registered"
    state = st.new_session()
    for name, path in demo_family.models.items():
        state = st.add_model(state, str(path), path, name=name)
    for name, method in all_methods().items():
        form = forms.new_form(name, state)
        assert sp.stats_kind(form) == method.stats
        text = sp.panel_text(form, state, [])
        if method.stats:
            assert text.startswith(f"**Statistics** — {name} needs ") and "collected over a tasks file" in text
            assert "No statistics attached" in text and sp.stats_key(form, state) == "stats"
        else:
            assert text == ""
    # searches never get a method they cannot give statistics to
    assert not set(informed) & set(searches.operator_methods(2))
    assert not set(informed) & set(searches.evo_methods())
    with pytest.raises(MergeError, match=f"{informed[0]} needs .* statistics .*which a search cannot give"):
        searches.parse_operators(f"- method: {informed[0]}\n", 2)
    # the examples and tasks fields: bounded, confined, one line
    assert sp.checked_examples("32") == 32 and sp.checked_examples(8.0) == 8
    for bad in (0, 2.5, "many", sp.MAX_EXAMPLES + 1):
        with pytest.raises(MergeError, match="examples per model"):
            sp.checked_examples(bad)
    with pytest.raises(MergeError, match="outside the folders this app may read"):
        sp.checked_tasks("/etc/passwd", state, [demo_family.models["base"].parent])
    with pytest.raises(MergeError, match="give a tasks file"):
        sp.checked_tasks("", state, [])


def test_collect_attach_merge_and_models_that_change(fmnist_demo, tmp_path):
    import mergecore
    from app import forms
    from app import stats_panel as sp
    from app.context import make_context
    from app.tabs.merge import submit_merge

    ctx = make_context(tmp_path / "work", demo=fmnist_demo)
    owner, roots = "browser-" + "a" * 32, ctx.read_roots()
    state = _fmnist_state(fmnist_demo)
    form = forms.new_form("regmean", state)

    # without statistics the merge fails with the engine's one line
    job, _ = submit_merge(ctx, owner, forms.build_recipe(_without_taskless(form, state), state), "no-stats", None, 1)
    assert job.wait(60) and job.status == "failed" and "artifacts" in job.error and "\n" not in job.error, job.error

    # the demo's base has no task: the engine's one line says so
    tasks = sp.checked_tasks("", state, roots)
    assert tasks == Path(fmnist_demo.val_tasks).resolve()
    job = sp.start_collection(ctx, owner, form, state, tasks, 8)
    assert job.wait(60) and job.status == "failed" and "no task for base" in job.error, job.error

    form = _without_taskless(form, state)
    job = sp.start_collection(ctx, owner, form, state, tasks, 8)
    assert job.wait(120) and job.status == "done", job.error
    out = Path(job.result)
    assert out.parent == ctx.workspace.session_dir(owner) / "stats" and out.is_file()
    snap = ctx.jobs.snapshot(owner, job.id)
    assert {e["data"]["stage"] for e in snap["events"]} >= {"load", "collect", "write"}
    bar, line = sp.progress_view(snap)
    assert 'data-status="done"' in bar and line

    form = sp.with_stats(form, job.meta["key"], out)
    text = forms.recipe_yaml(form, state)
    assert "artifacts:" in text and f"stats: {out}" in text, text
    text = sp.panel_text(form, state, roots)
    assert "✓ Statistics attached" in text and "fmnist_tops" in text and "digits" in text, text
    res = mergecore.merge(forms.build_recipe(form, state), tmp_path / "merged")
    assert res.tensors > 0

    # a second collection is a new file, never the first one overwritten
    job2 = sp.start_collection(ctx, owner, form, state, tasks, 4)
    assert job2.wait(120) and job2.status == "done" and Path(job2.result) != out and out.is_file()

    # cancelled: nothing written, nothing to attach
    job3 = sp.start_collection(ctx, owner, form, state, tasks, 8)
    ctx.jobs.cancel(owner, job3.id)
    assert job3.wait(60) and job3.status == "cancelled" and not Path(job3.meta["out"]).exists()
    assert "Cancelled" in sp.progress_view(ctx.jobs.snapshot(owner, job3.id))[1]

    # the recipe's models change: the statistics no longer match (a model without any, or one fewer)
    for left_out in (["fmnist_tops"], []):
        changed = forms.new_form("regmean", state, {**form, "left_out": left_out})
        assert "no longer match" in sp.panel_text(changed, state, roots)
    # statistics of another kind
    other = [n for n in _informed() if forms.get_method(n).stats != "gram"]
    if other:
        changed = forms.new_form(other[0], state, form)
        assert "needs" in sp.attached_text(changed, state, roots) and "⚠" in sp.attached_text(changed, state, roots)


def test_client_collects_with_progress_and_the_merge_uses_it(fmnist_server, fmnist_demo):
    url, ctx = fmnist_server
    c = client(url)
    c.predict(api_name="/load_demo")
    out = c.predict("regmean", api_name="/set_method")
    assert recipe_text(out).startswith("merge_method: regmean")
    assert any("needs Gram matrices" in str(o) for o in out)
    experts = [n for n in fmnist_demo.models if n != "base"]
    c.predict(experts, api_name="/set_recipe_models")

    out = c.predict("/etc/passwd", 8, api_name="/collect_stats")  # refused at the field, nothing started
    assert "outside the folders this app may read" in str(out[0]["info"]), out[0]
    out = c.predict(str(fmnist_demo.val_tasks), 8, api_name="/collect_stats")
    assert any("starting ..." in str(o) for o in out), out
    seen: list[str] = []

    def finished(o) -> bool:
        seen.append(str(o[0]))
        return 'data-status="done"' in str(o[0]) or 'data-status="failed"' in str(o[0])

    out = poll(lambda: c.predict(api_name="/poll_stats"), finished, 120, 0.2, "collection")
    assert 'data-status="done"' in out[0], out[0]
    assert "Attached" in out[1] and "artifacts: stats" in out[1], out[1]
    assert "artifacts: {stats: " in recipe_text(out) and any("✓ Statistics attached" in str(o) for o in out)
    out = c.predict(api_name="/merge")
    out = poll_merge(c)
    assert "Merged" in out[2], out[2]
