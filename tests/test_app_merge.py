"""The Merge and Export tabs in the running app: the demo merged in the background with its
events, compared and exported (downloads served in place, nothing else), a failed merge in one
line, sessions that do not see each other's merges, a second merge that queues behind the
first (both reach Compare and Export), and the history's and saved recipes' endpoints."""

from __future__ import annotations

import threading
from pathlib import Path

from _app_helpers import client, poll, poll_merge, recipe_text

pytest_plugins = ("_app_helpers",)


def test_client_demo_merge_events_compare_export(app_server):
    url, ctx = app_server
    c = client(url)
    out = c.predict(api_name="/load_demo")
    assert any("Compatible" in str(o) for o in out)
    from mergecore.methods import DEFAULT_METHOD

    yaml_text = recipe_text(out)
    assert yaml_text.startswith(f"merge_method: {DEFAULT_METHOD}") and "density: [0.3, 0.7]" in yaml_text

    # a curve edit through the editor's endpoint lands in the recipe
    out = c.predict([0.25, 0.9], "density@variant_a", "attn", False, api_name="/set_curve")
    assert "density: [0.25, 0.9]" in recipe_text(out)

    out = c.predict(api_name="/merge")
    assert "Merging into" in str(out[2])
    out = poll_merge(c)
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


def test_client_failed_job_shows_one_line_and_app_recovers(app_server):
    url, _ = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    c.predict("slerp", api_name="/set_method")  # slerp takes one model besides the base; the demo has two
    c.predict(api_name="/merge")
    out = poll_merge(c)
    assert out[2].startswith("**Failed:**") and "exactly 1 model" in out[2] and "\n" not in out[2]
    c.predict("task_arithmetic", api_name="/set_method")
    c.predict(api_name="/merge")
    assert "Merged" in poll_merge(c)[2]
    plan = c.predict(api_name="/plan")
    assert "method: task_arithmetic" in str(plan)


def test_client_sessions_do_not_see_each_other(app_server):
    url, ctx = app_server
    a, b = client(url), client(url)
    a.predict(api_name="/load_demo")
    a.predict(api_name="/merge")
    assert "Merged" in poll_merge(a)[2]
    out = b.predict(api_name="/load_demo")
    export_choices = out[-4]  # ..., export dropdown, status, fetch timer, fetch progress
    assert export_choices["choices"] == []  # B has no merges of its own
    md, _, _ = b.predict(None, api_name="/export")
    assert "No merged checkpoint" in md
    assert b.predict(api_name="/cancel_merge") == "Nothing to cancel."
    owners = {j.owner for j in ctx.jobs._jobs.values()}
    assert len(owners) >= 1


def test_client_second_merge_queues_and_both_reach_compare_and_export(app_server, monkeypatch):
    """Before: the second click was refused, the page's poll stopped and the first merge never
    reached Compare or Export."""
    import mergecore

    url, ctx = app_server
    gate, real = threading.Event(), mergecore.merge

    def gated(*args, **kwargs):
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(mergecore, "merge", gated)
    c = client(url)
    c.predict(api_name="/load_demo")
    first = c.predict("queued", api_name="/merge")
    assert "Merging into" in first[2]
    second = c.predict("queued", api_name="/merge")
    assert "Queued `queued-2` behind 1 merge" in second[2] and "1 ahead" in second[4]
    out = c.predict(api_name="/poll_merge")
    assert "`queued-2` — 1 ahead" in out[7]  # the queue, with each merge's place
    gate.set()
    seen: dict[int, object] = {}  # the latest value of each output (a poll skips what did not change)

    def polled():
        out = c.predict(api_name="/poll_merge")
        seen.update({i: o for i, o in enumerate(out) if not (isinstance(o, dict) and o.get("__type__") == "update"
                                                             and len(o) == 1)})
        return out

    out = poll(polled, lambda o: "Merged" in str(o[2]) and "queued-2" in str(o[2]), 60, 0.1, "the queued merge")
    assert out[7] == ""  # nothing queued any more
    compare_choices, export_choices = seen[4]["choices"], seen[5]["choices"]
    assert {"queued", "queued-2"} <= {c[0] for c in compare_choices} & {c[0] for c in export_choices}
    history_rows = seen[8]["value"]["data"] if "value" in seen[8] else seen[8]["data"]
    assert [r[:2] for r in history_rows[:2]] == [["queued-2", "done"], ["queued", "done"]]


def test_client_history_reopen_again_delete_and_saved_recipes(app_server):
    url, ctx = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    c.predict([0.1, 0.6], "density@variant_a", "attn", False, api_name="/set_curve")
    c.predict("hist", api_name="/merge")
    out = poll_merge(c)
    assert "Merged" in out[2]
    rec_id = next(v for _, v in out[9]["choices"])
    c.predict([0.9, 0.9], "density@variant_a", "attn", False, api_name="/set_curve")

    out = c.predict(rec_id, api_name="/history_reopen")  # its recipe back in the form
    assert "density: [0.1, 0.6]" in recipe_text(out) and "Loaded the recipe of `hist`" in out[-1]
    out = c.predict(rec_id, api_name="/history_merge_again")
    assert "into `hist-2`" in out[-1]
    out = poll(lambda: c.predict(api_name="/poll_merge"), lambda o: "Merged" in str(o[2]) and "hist-2" in str(o[2]),
               60, 0.2, "merge again")
    again = ctx.merges(next(j.owner for j in ctx.jobs._jobs.values() if j.meta.get("name") == "hist-2"))
    assert "density: [0.1, 0.6]" in (again["hist-2"] / "mergecore_recipe.yml").read_text()
    md = c.predict(rec_id, api_name="/history_delete")[0]
    assert md.startswith("Deleted `hist`") and not again["hist"].exists() and again["hist-2"].is_dir()

    assert "choose a merge" in c.predict(None, api_name="/history_reopen")[-1]
    assert "choose a merge" in c.predict(None, api_name="/history_merge_again")[-1]
    assert "choose a saved recipe" in c.predict(None, api_name="/load_recipe")[-1]
    saved_md, saved_dd = c.predict("my ties", api_name="/save_recipe")
    assert "**my ties**" in saved_md and saved_dd["value"] == "my ties"
    c.predict([0.3, 0.3], "density@variant_a", "attn", False, api_name="/set_curve")
    out = c.predict("my ties", api_name="/load_recipe")
    assert "density: [0.1, 0.6]" in recipe_text(out) and "saved recipe **my ties**" in out[-1]
    saved_md, saved_dd = c.predict("my ties", api_name="/delete_recipe")
    assert "Deleted" in saved_md and saved_dd["choices"] == []
