"""The leaderboard (`mergecore.search.leaderboard`) as a Search tab entry: every data-free merge of
the session's models at its defaults and over its grid, then the searches, ranked on validation
within a wall-clock budget; the top K scored on the test tasks at the end.

Everything goes through the engine: the budget is read by `parse_budget`, the candidates are
previewed by `plan_candidates` (a filter that leaves none is refused before anything runs), the
run is `run_search` (so a stopped leaderboard resumes in its folder, its rows replayed), and the
live table and chart read the folder with `read_board` and draw it with `outputs.figure`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from mergecore.errors import MergeError, clip, short
from mergecore.events import Event
from mergecore.search.leaderboard.candidates import DATA_FREE, not_applicable, plan_candidates, read_board
from mergecore.search.leaderboard.config import SEARCH_KINDS, LeaderboardConfig, parse_budget
from mergecore.search.leaderboard.outputs import figure as board_figure
from mergecore.search.leaderboard.searches import NOT_RUN
from mergecore.search.report import event_line, format_seconds

from app import plots
from app.searches.base import (
    SEED, Field, PlotSpec, SearchSession, SearchSpec, TableSpec, checked_inputs, number, register_search,
    scores_text, session_fields, validated,
)

TABLE_HEADERS = ["rank", "label", "method", "phase", "val mean", "test mean", "seconds"]
RUNNABLE_SEARCHES = [k for k in SEARCH_KINDS if k not in NOT_RUN]  # dam trains on data a leaderboard lacks
CHART_ROWS = 25  # the ranking chart shows the best ones (the table has them all)


def data_free_methods() -> list[str]:
    """The registered methods that can be a leaderboard candidate for some number of models."""
    from mergecore.methods import all_methods

    return [n for n, m in all_methods().items() if any(not_applicable(m, k, True) is None for k in (1, 2, 4))]


def _chosen(values: dict[str, Any], key: str) -> Optional[list[str]]:
    """A multichoice field's list (None when the form did not give the field at all)."""
    v = values.get(key)
    if v is None:
        return None
    return [str(x) for x in ([v] if isinstance(v, str) else v)]


def _config(values: dict[str, Any], session: SearchSession) -> LeaderboardConfig:
    base, names, tasks = checked_inputs(values, session)
    budget = parse_budget(str(values.get("budget") if values.get("budget") is not None else "").strip())
    val_tasks = str(values.get("val_tasks") or "").strip() or None
    if val_tasks is not None:
        if not Path(val_tasks).is_file():
            raise MergeError(f"validation tasks file not found: {short(val_tasks)}")
        if Path(val_tasks).resolve() == Path(tasks).resolve():
            raise MergeError("the validation tasks are the test tasks: leave the validation file empty (each task "
                             "is then split in two) or give a separate one")
    config = validated(LeaderboardConfig, {
        "tasks": tasks, "val_tasks": val_tasks, "base": session.path(base), "models": [session.path(n) for n in names],
        "budget": budget, "top_k": number(values, "top_k", int, 3),
        "grid": bool(values.get("grid", True)), "methods": _chosen(values, "methods") or None,
        "searches": _chosen(values, "searches"), "seed": number(values, "seed", int, 0),
        "val_fraction": number(values, "val_fraction", float, 0.5),
        "data_free_share": number(values, "data_free_share", float, 0.5),
        "batch_size": number(values, "batch_size", int, 128),
    })
    candidates, skipped = _plan(config)
    if not candidates:
        why = "; ".join(f"{s['method']} {s['reason']}" for s in skipped)
        raise MergeError(f"no data-free candidate for {len(names)} model(s): {clip(why, 300)}")
    return config


def _plan(config: LeaderboardConfig):
    return plan_candidates(list(config.models), config.base, methods=config.methods, grid=config.grid,
                           dtype=config.dtype, seed=config.seed)


def _meta(config: LeaderboardConfig, session: SearchSession) -> dict[str, Any]:
    candidates, skipped = _plan(config)
    return {"budget": config.budget, "top_k": config.top_k, "candidates": len(candidates),
            "methods": sorted({c.method for c in candidates}), "skipped": skipped,
            "models": session.names(list(config.models)), "base": session.names([config.base])[0] if config.base
            else None, "split": config.val_tasks is None}


# ---------------------------------------------------------------------------------------------
# the live view: the folder's ranking (read_board), the events for the progress


def _board(meta: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    out = meta.get("out")
    return read_board(Path(out)) if out else ([], {})


def _num(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.4f}"


def _table(events, meta) -> tuple[list[str], list[list[Any]]]:
    rows, tests = _board(meta)
    return TABLE_HEADERS, [
        [i, r["label"], r["method"], r["phase"], _num(r["val_mean"]),
         _num(tests[r["key"]]["test_mean"]) if r["key"] in tests else "", f"{r['seconds']:.2f}"]
        for i, r in enumerate(rows, 1)]


def _ranking_figure(events, meta):
    rows, tests = _board(meta)
    title = "Ranking by validation mean (test for the top K)"
    if not rows:
        return plots.empty_figure(title)
    shown = f"the best {CHART_ROWS} of {len(rows)}" if len(rows) > CHART_ROWS else f"{len(rows)} merges"
    return board_figure(rows[:CHART_ROWS], tests, title=f"{title}: {shown}")


def _time_figure(events, meta):
    rows = sorted(_board(meta)[0], key=lambda r: r.get("elapsed") or 0.0)
    title = "Validation mean over the budget's time"
    if not rows:
        return plots.empty_figure(title)
    best, top = [], float("-inf")
    for r in rows:
        top = max(top, r["val_mean"])
        best.append(top)
    series = [{"name": "best so far", "x": [r["elapsed"] for r in rows], "y": best, "mode": "lines",
               "color": "#16a34a", "width": 2.5}]
    for phase, color in ((DATA_FREE, "#4C78A8"), ("search", "#F58518")):
        pick = [r for r in rows if r["phase"] == phase]
        if pick:
            series.append({"name": phase, "x": [r["elapsed"] for r in pick], "y": [r["val_mean"] for r in pick],
                           "mode": "markers", "color": color, "size": 8})
    budget = meta.get("budget")
    x_title = f"seconds (of the {format_seconds(budget)} budget)" if budget else "seconds"
    return plots.line_figure(title, series, x_title=x_title, y_title="validation mean")


def _last(events, kind: str) -> Optional[dict[str, Any]]:
    return next((e for e in reversed(events) if e.get("kind") == kind), None)


def _elapsed(events) -> Optional[float]:
    """The leaderboard's own clock (every run in its folder): its count at the start event of this
    run, plus the time since (up to the last event once it is done)."""
    start = _last(events, "leaderboard.start")
    if start is None:
        return None
    now = events[-1]["time"] if _last(events, "leaderboard.done") else time.time()
    return float(start["data"]["elapsed"]) + max(0.0, now - start["time"])


def _phase(events) -> str:
    """What the leaderboard is doing, from its latest events."""
    last = next((e for e in reversed(events) if e.get("kind", "").startswith("leaderboard.")), None)
    kind = last["kind"] if last else ""
    d = last["data"] if last else {}
    if kind == "leaderboard.search_progress":
        line = event_line(Event(d["kind"], d["data"]))  # the CLI's line of the search's own event
        return f"{d['search']}: {' '.join(line.split())}" if line else f"{d['search']}: searching ..."
    if kind == "leaderboard.search" and d.get("status") == "started":
        return f"{d['search']}: searching with {d['budget']} ..."
    if kind == "leaderboard.test":
        return f"scored {d['rank']} of the top on test"
    if kind == "leaderboard.done":
        return f"winner {d['winner']}"
    if kind in ("leaderboard.stopped", "leaderboard.search"):
        return "next: the searches, then the top K on test"
    return "scoring the data-free candidates"


def _progress(events, meta) -> tuple[Optional[float], str]:
    start = _last(events, "leaderboard.start")
    budget = float(meta.get("budget") or 0) or None
    if start is None:
        return 0.0, (f"loading the models and the tasks for {meta.get('candidates', '?')} candidates from "
                     f"{len(meta.get('methods') or [])} methods ...")
    s = start["data"]
    budget = float(s.get("budget") or budget or 0) or None
    cands = [e["data"] for e in events if e.get("kind") == "leaderboard.candidate"]
    done = s["done"] + len({d["index"] for d in cands if not d.get("replayed")})  # the start counts earlier runs'
    text = f"{done}/{s['candidates']} candidates"
    if cands:
        best = max(cands, key=lambda d: d["val_mean"])
        text += f" · best {best['label']} {best['val_mean']:.4f}"
    text += f" · {_phase(events)}"
    elapsed = _elapsed(events)
    if elapsed is not None and budget:
        text += f" · {format_seconds(elapsed)} of {format_seconds(budget)}"
    if _last(events, "leaderboard.done"):
        return 1.0, text
    return (min(1.0, elapsed / budget) if elapsed is not None and budget else None), text


def _summary(result: dict[str, Any], meta: dict[str, Any]) -> str:
    w = result["winner"]
    tests = scores_text(w.get("test_scores"))
    cands = result.get("candidates") or {}
    out = (f"**Winner**: `{w['label']}` ({w['method']}, {w['phase']}): validation **{w['val_mean']:.4f}**, "
           f"test **{w['test_mean']:.4f}**" + (f" ({tests})." if tests else "."))
    out += (f"\n\n{len(result.get('ranking') or [])} merges ranked by validation; {cands.get('scored', '?')} of "
            f"{cands.get('planned', '?')} data-free candidates scored, the top {result.get('top_k')} on test "
            f"(which never ranks). {format_seconds(result.get('elapsed_seconds') or 0)} of the "
            f"{format_seconds(result.get('budget_seconds') or 0)} budget.")
    searches = result.get("searches") or {}
    if searches:
        out += "\n\nSearches: " + "; ".join(
            f"{k} {v['status']}" + (f" ({v['val_mean']:.4f})" if v.get("val_mean") is not None else "")
            + (f" ({v['reason']})" if v.get("reason") else "") for k, v in searches.items()) + "."
    skipped = result.get("skipped_methods") or []
    if skipped:
        out += "\n\nNot candidates: " + "; ".join(f"{s['method']} ({s['reason']})" for s in skipped) + "."
    scoring = result.get("scoring") or {}
    if scoring:
        out += f"\n\nValidation: {scoring.get('validation')}; test: {scoring.get('test')}."
    files = result.get("files") or {}
    out += (f"\n\nThe recipe (`recipe.yml`) is the winner's; `{files.get('csv', 'leaderboard.csv')}` and "
            f"`{files.get('html', 'leaderboard.html')}` hold the whole ranking.")
    return out


LEADERBOARD = register_search(SearchSpec(
    name="leaderboard",
    title="Leaderboard: every data-free merge, ranked",
    summary=("Which merge is best for these models and this data? Every data-free method that applies is merged "
             "in memory at its defaults, then over its parameter grid, and scored on the validation tasks (or a "
             "seeded part of each test task); with a separate validation file the searches (evo, rmm) follow in "
             "the time left. Only the top K by validation are scored on the test tasks, at the end. The budget "
             "is wall-clock time over every run in the folder: Stop, then Resume continues the count and skips "
             "what is scored."),
    stops_after="the candidate being scored (or the running search's current evaluation)",
    fields=[
        *session_fields("the session's models (the base is not merged)", "task vectors are taken against it"),
        Field("tasks", "Test tasks YAML (only the top K are scored on it, at the end)", "tasks", tasks_from="test",
              info="without a validation file, a seeded part of each task is validation and the rest test"),
        Field("val_tasks", "Validation tasks YAML (optional; candidates are ranked on it, and the searches need it)",
              "tasks", tasks_from="val_file", info="empty: each test task is split in two"),
        Field("budget", "Budget (wall clock)", "text", "10m", info="30m, 1h, 90s or seconds"),
        Field("top_k", "Top K scored on test", "int", 3, minimum=1, maximum=1000),
        Field("grid", "Each method's grid after its defaults", "bool", True),
        SEED,
        Field("methods", "Methods (empty: every data-free method that applies)", "multichoice", [],
              choices=data_free_methods()),
        Field("searches", "Searches after the data-free merges (need a validation file)", "multichoice",
              list(RUNNABLE_SEARCHES), choices=list(RUNNABLE_SEARCHES)),
        Field("val_fraction", "Validation share of each task (without a validation file)", "float", 0.5,
              minimum=0.05, maximum=0.95, advanced=True),
        Field("data_free_share", "Budget share of the data-free grids while searches wait", "float", 0.5,
              minimum=0.05, maximum=1.0, advanced=True),
        Field("batch_size", "Evaluation batch size", "int", 128, minimum=1, advanced=True),
    ],
    table=TableSpec("Leaderboard (ranked by validation; test for the top K)", _table),
    plots=[PlotSpec("Ranking", _ranking_figure), PlotSpec("Validation over time", _time_figure)],
    make_config=_config, meta=_meta, progress=_progress, summary_md=_summary,
))
