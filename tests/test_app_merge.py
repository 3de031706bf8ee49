"""The Merge and Export tabs in the running app: the demo merged in the background with its
events, compared and exported (downloads served in place, nothing else), a failed merge in one
line, and sessions that do not see each other's merges."""

from __future__ import annotations

from pathlib import Path

from _app_helpers import client, poll_merge, recipe_text

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
