"""`mergecore leaderboard`: the data-free candidates and their order, the val/test split, the
ranking, the winner's replay, resume, the budget, the searches, Ray, the CLI's errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.search.leaderboard.candidates import plan_candidates
from mergecore.search.leaderboard.config import LeaderboardConfig, parse_budget
from mergecore.search.leaderboard.run import run_leaderboard
from mergecore.search.leaderboard.worker import LeaderboardWorker

METHODS = ["task_arithmetic", "ties", "linear", "iso_c"]


def _config(fam, **kw) -> LeaderboardConfig:
    fields = {"tasks": str(fam.tasks_file), "base": str(fam.base), "models": [str(p) for p in fam.experts.values()],
              "budget": "10m", "top_k": 2, "methods": METHODS, "batch_size": 256}
    fields.update(kw)
    return LeaderboardConfig.model_validate(fields)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_parse_budget():
    assert [parse_budget(t) for t in ("30m", "1h", "90s", "1800", "2.5m", " 45 ", 120)] == [
        1800, 3600, 90, 1800, 150, 45, 120]
    for bad in ("2x", "", "m", "0", "-5", "1e9", "30 minutes"):
        with pytest.raises(MergeError, match="budget"):
            parse_budget(bad)


def test_candidates_defaults_first_grids_interleaved_from_the_methods():
    from mergecore.methods import get_method

    models, base = ["a", "b", "c", "d"], "base"
    cands, skipped = plan_candidates(models, base)
    why = {s["method"]: s["reason"] for s in skipped}
    assert set(why) >= {"passthrough", "regmean", "fisher", "dam", "slerp", "nuslerp"}
    assert "statistics" in why["regmean"] and "takes 1 to 1 models" in why["slerp"]
    stages = [c.stage for c in cands]
    first_grid = stages.index("grid")
    assert set(stages[first_grid:]) == {"grid"}  # every method at its defaults before any grid point
    defaults = [c.method for c in cands[:first_grid]]
    assert len(defaults) == len(set(defaults)) and "iso_cts" in defaults and "linear" in defaults
    assert len({c.key for c in cands}) == len(cands)  # a grid point equal to the defaults is scored once
    # interleaved: the first grid point of every method with a grid before any method's second
    grid_methods = [c.method for c in cands[first_grid:]]
    with_grid = {m for m in defaults if get_method(m).grid}
    assert set(grid_methods[:len(with_grid) - 1]) <= with_grid
    # the grids are the methods' own (the quality bench reads the same ones)
    iso = [c for c in cands if c.method == "iso_cts"]
    assert sorted(c.params["alpha"] for c in iso) == [0.5, 1.0, 1.5, 2.0, 3.0]
    assert iso[0].label == "iso_cts α=1" and iso[0].stage == "defaults"
    ta = next(c for c in cands if c.method == "task_arithmetic")
    assert ta.recipe["parameters"] == {"lambda": 0.3} and ta.recipe["base_model"] == "base"
    lin = next(c for c in cands if c.method == "linear")
    assert "base_model" not in lin.recipe and len(lin.recipe["models"]) == 4
    # without a base, methods that need one are skipped
    _, skipped = plan_candidates(models, None)
    assert "needs a base model" in {s["method"]: s["reason"] for s in skipped}["ties"]
    # no grid: defaults only
    assert {c.stage for c in plan_candidates(models, base, grid=False)[0]} == {"defaults"}


def test_val_and_test_parts_never_overlap(tiny_fmnist_family):
    from mergecore.search.base import EvalSpec
    from mergecore.search.leaderboard.worker import Scoring

    fam = tiny_fmnist_family
    for fraction in (0.5, 0.3, 0.77):
        scoring = Scoring(EvalSpec(str(fam.tasks_file), subset=fraction, seed=4), str(fam.tasks_file), True)
        val, test = scoring.val.evaluator(), scoring.test_evaluator()
        for task in val.tasks:
            n = task.num_examples()
            v, t = val.indices(task), test.indices(test.task(task.name))
            assert len(np.intersect1d(v, t)) == 0
            assert sorted(np.concatenate([v, t]).tolist()) == list(range(n))
            assert len(v) == round(fraction * n)


def test_ranks_replays_winner_tests_top_k_and_resumes(tiny_fmnist_family, tmp_path, monkeypatch):
    from mergecore.eval.evaluator import Evaluator
    from mergecore.merging import merge
    from mergecore.search.leaderboard.worker import ComplementEvaluator

    fam = tiny_fmnist_family
    calls = []
    real = LeaderboardWorker.evaluate
    monkeypatch.setattr(LeaderboardWorker, "evaluate", lambda self, item, cancel=None: (
        calls.append(item["part"]), real(self, item, cancel))[1])
    events = []
    out = tmp_path / "board"
    summary = run_leaderboard(_config(fam), Path("."), out, on_event=events.append)
    planned = plan_candidates([str(p) for p in fam.experts.values()], str(fam.base), methods=METHODS)[0]
    assert calls.count("val") == len(planned) and calls.count("test") == 2

    rows = _csv(out / "leaderboard.csv")
    vals = [float(r["val_mean"]) for r in rows]
    assert len(rows) == len(planned) and vals == sorted(vals, reverse=True)
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    assert all(r["test_mean"] for r in rows[:2]) and not any(r["test_mean"] for r in rows[2:])
    assert {r["phase"] for r in rows} == {"data-free"}
    cand = [e.data for e in events if e.kind == "leaderboard.candidate"]
    assert [c["index"] for c in cand] == list(range(len(planned)))
    assert {c["label"] for c in cand} == {r["label"] for r in rows}
    winner = summary["winner"]
    assert winner["label"] == rows[0]["label"] and math.isclose(winner["val_mean"], vals[0], abs_tol=1e-6)
    assert (out / "leaderboard.html").read_text().count("plotly") > 10  # plotly.js inlined, no network

    # the winner's recipe, merged by `mergecore.merge` and scored on the validation part, gives its score
    merge(out / "recipe.yml", tmp_path / "replayed")
    val = Evaluator(str(fam.tasks_file), subset=0.5, seed=0).evaluate(tmp_path / "replayed")
    assert math.isclose(val.mean, winner["val_mean"], rel_tol=1e-9, abs_tol=1e-12)
    test = ComplementEvaluator(str(fam.tasks_file), subset=0.5, seed=0).evaluate(tmp_path / "replayed")
    assert math.isclose(test.mean, winner["test_mean"], rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(float(rows[0]["test_mean"]), test.mean, abs_tol=1e-6)

    # the same call again: nothing is scored again, the same table comes out
    calls.clear()
    again = run_leaderboard(_config(fam), Path("."), out)
    assert calls == [] and _csv(out / "leaderboard.csv") == rows and again["winner"] == winner
    # a larger top K scores only the new one on test
    run_leaderboard(_config(fam, top_k=3), Path("."), out)
    assert calls == ["test"]
    assert sum(1 for r in _csv(out / "leaderboard.csv") if r["test_mean"]) == 3
    # an app that plots from the start gets the recorded rows as replayed events (no line on the CLI)
    from mergecore.search.report import event_line

    events.clear()
    run_leaderboard(_config(fam, top_k=3), Path("."), out, on_event=events.append, replay_history=True)
    replayed = [e for e in events if e.kind == "leaderboard.candidate"]
    assert [e.data["index"] for e in replayed] == list(range(len(planned))) and calls == ["test"]
    assert all(e.data["replayed"] and event_line(e) is None for e in replayed)


def test_a_cancelled_run_leaves_no_half_file_and_resumes(tiny_fmnist_family, tmp_path, monkeypatch):
    from mergecore.errors import Cancelled
    from mergecore.events import CancelToken

    fam = tiny_fmnist_family
    cancel, calls = CancelToken(), []
    real = LeaderboardWorker.evaluate

    def counted(self, item, cancel_=None):
        calls.append(item["label"])
        if len(calls) == 3:
            cancel.cancel()  # Ctrl-C while the third candidate is scored
        return real(self, item, cancel_)

    monkeypatch.setattr(LeaderboardWorker, "evaluate", counted)
    out = tmp_path / "c"
    with pytest.raises(Cancelled):
        run_leaderboard(_config(fam, grid=False), Path("."), out, cancel=cancel)
    assert not any((out / f).exists() for f in ("leaderboard.csv", "leaderboard.html", "recipe.yml", "result.json"))
    lines = (out / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == 3 and [json.loads(x)["label"] for x in lines] == calls
    # a crash in the middle of a line: the cut line is dropped and scored again
    (out / "candidates.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    calls.clear()
    summary = run_leaderboard(_config(fam, grid=False), Path("."), out)
    assert calls[0] == json.loads(lines[2])["label"] and len(calls) == len(METHODS) - 2 + 2  # + the top 2 on test
    assert len(summary["ranking"]) == len(METHODS)
    assert all(json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines())


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def test_a_short_budget_stops_after_every_method_at_its_defaults(tiny_fmnist_family, tmp_path, monkeypatch):
    """A fake clock: each candidate takes 1 s (0.2 s merging, 0.8 s scoring) and scores by its
    position; the budget fits the defaults and a few grid points, not the grids."""
    import mergecore.search.leaderboard.run as lb_run

    clock = _Clock()
    monkeypatch.setattr(lb_run, "time", clock)
    monkeypatch.setattr(LeaderboardWorker, "__init__", lambda self, *a, **k: None)
    order = []

    def fake(self, item, cancel=None):
        clock.now += 1.0
        order.append(item["label"])
        return {"mean": 1.0 / len(order), "scores": {"t": 1.0 / len(order)}, "seconds": 1.0, "merge_seconds": 0.2,
                "eval_seconds": 0.8}

    monkeypatch.setattr(LeaderboardWorker, "evaluate", fake)
    fam = tiny_fmnist_family
    planned = plan_candidates([str(p) for p in fam.experts.values()], str(fam.base))[0]
    n_defaults = sum(c.stage == "defaults" for c in planned)
    events = []
    budget = n_defaults + 4 + 3  # 3 s held back for the top 3 on test
    summary = run_leaderboard(_config(fam, methods=None, top_k=3, budget=budget), Path("."), tmp_path / "b",
                              on_event=events.append)
    scored = [e.data["label"] for e in events if e.kind == "leaderboard.candidate"]
    assert scored == [c.label for c in planned[:len(scored)]]  # in the planned order
    assert n_defaults < len(scored) < len(planned)
    assert {c.method for c in planned} == {c.method for c in planned[:n_defaults]}  # every method's defaults
    stopped = [e.data for e in events if e.kind == "leaderboard.stopped"]
    assert len(stopped) == 1 and stopped[0]["done"] == len(scored)
    assert summary["stopped"] == "budget" and summary["elapsed_seconds"] <= budget
    assert summary["winner"]["label"] == planned[0].label  # the fake scores fall with the position


def test_searches_run_with_a_validation_file(tiny_fmnist_family, tmp_path):
    fam = tiny_fmnist_family
    events = []
    out = tmp_path / "s"
    summary = run_leaderboard(_config(fam, val_tasks=str(fam.val_tasks_file), methods=["ties", "task_arithmetic"],
                                      searches=["evo", "dam"], budget=12, top_k=1), Path("."), out,
                              on_event=events.append)
    searched = {e.data["search"]: e.data for e in events if e.kind == "leaderboard.search" and
                e.data["status"] != "started"}
    assert searched["dam"]["status"] == "skipped" and "own data" in searched["dam"]["reason"]
    assert searched["evo"]["status"] == "done"
    evo = json.loads((out / "searches" / "evo" / "result.json").read_text())
    plan = json.loads((out / "searches" / "evo-plan.json").read_text())
    assert plan["method"] in ("ties", "task_arithmetic") and plan["tasks"] == str(fam.val_tasks_file)
    row = next(r for r in summary["ranking"] if r["phase"] == "search")
    assert math.isclose(row["val_mean"], evo["validation"]["mean"]) and row["label"].startswith("evo: ")
    assert any(e.kind == "leaderboard.search_progress" and e.data["kind"] == "evo.generation" for e in events)
    # searches choose on a whole file: with one tasks file split in two they are skipped
    split = run_leaderboard(_config(fam, methods=["linear"], searches=["evo"], budget=60), Path("."), tmp_path / "x")
    assert split["searches"]["evo"]["status"] == "skipped" and "--val-tasks" in split["searches"]["evo"]["reason"]


def test_cli_runs_and_reports_bad_input_in_one_line(tiny_fmnist_family, tmp_path, capsys, monkeypatch):
    fam = tiny_fmnist_family
    monkeypatch.chdir(tmp_path)
    models = [str(p) for p in fam.experts.values()]
    common = [str(fam.tasks_file), "out", "--base", str(fam.base), "--models", *models]
    assert main(["leaderboard", *common, "--budget", "5m", "--methods", "linear,task_arithmetic", "--no-grid",
                 "--top-k", "1"]) == 0
    text = capsys.readouterr().out
    assert "[1/2] linear: val " in text and "of 5m)" in text and "winner " in text and "test #1" in text
    assert (tmp_path / "out" / "leaderboard.csv").is_file()
    bad = [
        (["--budget", "soon"], "budget must be a duration"),
        (["--budget", "5m", "--searches", "grid"], "unknown search 'grid'"),
        (["--budget", "5m", "--methods", "tiez"], "unknown merge method 'tiez'"),
        (["--budget", "5m", "--val-tasks", "nope.yml"], "val_tasks file not found"),
    ]
    for extra, message in bad:
        assert main(["leaderboard", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["leaderboard", str(fam.tasks_file), "out2", "--models", "missing_model"]) == 2
    err = capsys.readouterr().err
    assert f"not found: no folder {tmp_path / 'missing_model'}" in err  # relative to the current directory
    assert not (tmp_path / "out2").exists()
    # the same run from a YAML through `mergecore search leaderboard` (paths relative to the YAML)
    cfg = {"tasks": str(fam.tasks_file), "base": str(fam.base), "models": models, "methods": ["linear"],
           "grid": False, "budget": "2m", "top_k": 1}
    (tmp_path / "lb.yml").write_text(yaml.safe_dump(cfg))
    assert main(["search", "leaderboard", "lb.yml", "out3", "--budget", "1m", "--merge", "-q"]) == 0
    text = capsys.readouterr().out
    result = json.loads((tmp_path / "out3" / "result.json").read_text())
    assert result["budget_seconds"] == 60 and result["replay"]["matches"] and "winner linear" in text
    with pytest.raises(SystemExit) as stop:  # argparse's usage error: one line, status 2
        main(["search", "leaderboard", "lb.yml", "out4", "--budget", "later"])
    assert stop.value.code == 2
    assert "budget must be a duration" in capsys.readouterr().err


def test_ray_scores_like_local(tiny_fmnist_family, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray backend test needs ray (pip install 'mergecore[ray]')")
    fam = tiny_fmnist_family
    local = run_leaderboard(_config(fam, grid=False), Path("."), tmp_path / "local")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        remote = run_leaderboard(_config(fam, grid=False, backend="ray", workers=2), Path("."), tmp_path / "ray")
    finally:
        if started:
            ray.shutdown()
    strip = ("seconds", "merge_seconds", "eval_seconds", "elapsed")
    assert [{k: v for k, v in r.items() if k not in strip} for r in remote["ranking"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in local["ranking"]]
    assert (tmp_path / "ray" / "recipe.yml").read_text() == (tmp_path / "local" / "recipe.yml").read_text()
