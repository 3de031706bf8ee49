"""The leaderboard in the Search tab: its form makes the engine's config (the budget read by
`parse_budget`, a method filter that leaves no candidate refused, one-line errors); in the running
app it fills a live table ranked by validation with the top K's test scores, plots the ranking,
leaves the winner's recipe for the Recipe tab, refuses a bad budget before claiming a folder,
and stops and resumes in its folder without scoring a candidate twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from _app_helpers import EXPERTS, client, demo_session, figure, poll, poll_search, recipe_text
from mergecore.errors import MergeError

pytest_plugins = ("_app_helpers",)

KEY_L = "1" * 32
KEY_M = "2" * 32
METHODS = ["task_arithmetic", "ties", "linear", "della_linear"]


def lb_args(fam, key, **fields):
    """/start_search's arguments for a leaderboard on the demo's experts (test and validation files)."""
    values = {"models": EXPERTS, "base": "base", "tasks": str(fam.tasks), "val_tasks": str(fam.val_tasks),
              "budget": "3m", "top_k": 2, "grid": False, "methods": METHODS, "searches": [], "seed": 0, **fields}
    return {"name": "leaderboard", "key": key, **{f"leaderboard_{k}": v for k, v in values.items()}}


def table_rows(out, skipped=None) -> list[list]:
    """The leaderboard table among a poll's outputs (after the four plots); `skipped` when that
    poll left it as it was (no new events)."""
    t = out[6]
    if isinstance(t, dict) and t.get("__type__") == "update":
        if "value" not in t:
            assert skipped is not None, t
            return skipped
        t = t["value"]
    assert t["headers"] == ["rank", "label", "method", "phase", "val mean", "test mean", "seconds"], t
    return t["data"]


def test_leaderboard_form_makes_a_config(fmnist_demo):
    from app import searches as srch

    spec, session = srch.get_search("leaderboard"), demo_session(fmnist_demo)
    assert srch.search_names()[-1] == "leaderboard" and spec.table is not None
    values = {f.key: srch.field_default(f, session) for f in spec.fields}
    # the test tasks, and the family's separate validation file (searches need one)
    assert values["tasks"] == str(fmnist_demo.tasks) and values["val_tasks"] == str(fmnist_demo.val_tasks)
    assert values["models"] == EXPERTS and values["methods"] == [] and values["searches"] == ["evo", "rmm"]
    cfg = spec.make_config(values, session)
    assert cfg.budget == 600 and cfg.grid and cfg.methods is None and cfg.searches == ["evo", "rmm"]
    assert cfg.base == str(fmnist_demo.models["base"]) and len(cfg.models) == 4
    assert spec.load_config(json.loads(json.dumps(spec.dump_config(cfg)))) == cfg
    meta = spec.meta(cfg, session)
    assert meta["candidates"] > len(meta["methods"]) and "slerp" in {s["method"] for s in meta["skipped"]}
    few = spec.make_config({**values, "budget": "90s", "methods": METHODS, "grid": False, "searches": [],
                            "val_tasks": ""}, session)
    assert few.budget == 90 and few.methods == METHODS and few.searches == [] and few.val_tasks is None
    assert spec.meta(few, session)["candidates"] == len(METHODS)
    for change, msg in (({"budget": "soon"}, "budget must be a duration such as 30m"), ({"budget": ""}, "budget"),
                        ({"budget": "0"}, "between 1 second"), ({"methods": ["slerp"]}, "no data-free candidate"),
                        ({"methods": ["nope"]}, "unknown merge method"), ({"models": []}, "at least one model"),
                        ({"val_tasks": values["tasks"]}, "validation tasks are the test tasks"),
                        ({"val_tasks": "/nope.yml"}, "not found"), ({"top_k": 0}, "top_k")):
        with pytest.raises(MergeError, match=msg) as err:
            spec.make_config({**values, **change}, session)
        assert "\n" not in str(err.value)
    # a family without a separate validation file: the field starts empty (each task split in two)
    one = srch.SearchSession(session.models, "base", str(fmnist_demo.tasks), str(fmnist_demo.tasks))
    assert srch.field_default(spec.field("val_tasks"), one) == ""


def test_client_leaderboard_fills_its_table_and_offers_the_winner(fmnist_server, fmnist_demo):
    url, ctx = fmnist_server
    owner = f"browser-{KEY_L}"
    c = client(url)
    c.predict(api_name="/load_demo")
    searches = ctx.workspace.searches_dir(owner)
    before = sorted(searches.iterdir())
    # a bad budget: the error in the status line, no folder claimed, no job
    out = c.predict(**lb_args(fmnist_demo, KEY_L, budget="soon"), api_name="/start_search")
    assert "**Error:** budget must be a duration" in out[2], out[2]
    assert sorted(searches.iterdir()) == before and ctx.jobs.jobs(owner) == []

    out = c.predict(**lb_args(fmnist_demo, KEY_L), api_name="/start_search")
    assert "Started" in out[2], out[2]
    out = poll_search(c, KEY_L, timeout=120)
    data = out[-1]
    assert data["status"] == "done", data
    rows = table_rows(out)
    assert len(rows) == len(METHODS) and [r[0] for r in rows] == [1, 2, 3, 4]
    vals = [float(r[4]) for r in rows]
    assert vals == sorted(vals, reverse=True)  # ranked by validation
    assert all(r[5] for r in rows[:2]) and not any(r[5] for r in rows[2:])  # test: the top 2 only
    assert {r[2] for r in rows} == set(METHODS) and {r[3] for r in rows} == {"data-free"}
    ranking, timeline = figure(out[2]), figure(out[3])
    assert {t["name"] for t in ranking["data"]} == {"validation (data-free)", "test (top K)"}
    assert len(ranking["data"][0]["y"]) == len(METHODS)
    assert "best so far" in {t["name"] for t in timeline["data"]}
    assert f"Winner**: `{rows[0][1]}`" in out[-5] and "leaderboard.csv" in out[-5]
    assert "merge_method: " + rows[0][2] in out[-4]["value"]  # the winner's recipe
    assert "done" in out[0] and f"{len(METHODS)}/{len(METHODS)} candidates" in out[0]
    job = ctx.jobs.find(owner, data["id"])
    folder = Path(job.meta["out"])
    assert (folder / "recipe.yml").is_file() and (folder / "leaderboard.csv").is_file()
    assert job.result["winner"]["label"] == rows[0][1]

    out = c.predict(KEY_L, api_name="/use_search_recipe")  # the winner into the Recipe tab
    assert "Loaded the best leaderboard recipe" in str(out[-1])
    assert "merge_method: " + rows[0][2] in recipe_text(out)


def test_client_leaderboard_stops_and_resumes_in_its_folder(fmnist_server, fmnist_demo):
    url, ctx = fmnist_server
    owner = f"browser-{KEY_M}"
    c = client(url)
    c.predict(api_name="/load_demo")
    # every method over its grid: a hundred candidates or so, stopped after a few
    c.predict(**lb_args(fmnist_demo, KEY_M, methods=[], grid=True, budget="10m"), api_name="/start_search")
    def three_rows_or_ended(o) -> bool:
        return isinstance(o[-1], dict) and (o[-1].get("status") != "running" or len(table_rows(o, [])) >= 3)

    first_out = poll(lambda: c.predict(KEY_M, api_name="/poll_search"), three_rows_or_ended, 120, 0.1,
                     "three candidates")
    assert first_out[-1]["status"] == "running", first_out[-1]
    assert "Stopping" in c.predict(KEY_M, api_name="/stop_search")
    out = poll_search(c, KEY_M)
    assert out[-1]["status"] == "cancelled" and "Resume" in out[-3]
    first = ctx.jobs.jobs(owner, kind="search")[-1]
    folder = Path(first.meta["out"])
    scored = [json.loads(line)["key"] for line in (folder / "candidates.jsonl").read_text().splitlines()]
    assert len(scored) >= 3 and not (folder / "result.json").exists()

    assert "Resuming" in c.predict(KEY_M, api_name="/resume_search")[2]
    out = poll_search(c, KEY_M, timeout=240)
    assert out[-1]["status"] == "done", out[-1]
    second = ctx.jobs.jobs(owner, kind="search")[-1]
    assert second is not first and second.meta["out"] == str(folder) and second.meta["resumed"]
    replayed = [e.data["key"] for e in second.events if e.kind == "leaderboard.candidate" and e.data.get("replayed")]
    assert replayed == scored  # the rows of the first run, shown again, not scored again
    keys = [json.loads(line)["key"] for line in (folder / "candidates.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) > len(scored)
    start = next(e.data for e in second.events if e.kind == "leaderboard.start")
    assert start["done"] == len(scored)
    rows = table_rows(out)
    assert len(rows) == len(keys) and [float(r[4]) for r in rows] == sorted((float(r[4]) for r in rows), reverse=True)


def test_leaderboard_progress_and_table_before_and_while_it_runs(tmp_path):
    """The progress line and the table from a leaderboard's events and folder, before its first event
    and partway (no rows yet: an empty table with its headers)."""
    from app import searches as srch

    spec = srch.get_search("leaderboard")
    meta = {"budget": 120, "candidates": 8, "methods": ["ties", "linear"], "out": str(tmp_path)}
    frac, text = spec.progress([], meta)
    assert frac == 0.0 and "8 candidates from 2 methods" in text
    headers, rows = spec.table.rows([], meta)
    assert headers[:5] == ["rank", "label", "method", "phase", "val mean"] and rows == []
    t0 = time.time() - 2  # started two seconds ago, after 30 s of an earlier run
    events = [{"kind": "leaderboard.start", "time": t0, "data": {
                  "candidates": 8, "done": 2, "budget": 120.0, "elapsed": 30.0}},
              {"kind": "leaderboard.candidate", "time": t0 + 1, "data": {
                  "index": 2, "label": "ties λ=1", "val_mean": 0.5, "elapsed": 31.0}},
              {"kind": "leaderboard.search", "time": t0 + 2, "data": {
                  "search": "evo", "status": "started", "budget": "40 evaluations"}}]
    frac, text = spec.progress(events, meta)
    assert "3/8 candidates" in text and "best ties λ=1 0.5000" in text and "evo: searching with 40 evaluations" in text
    assert 0.25 < frac < 0.4 and "32s of 2m" in text
