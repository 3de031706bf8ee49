"""`mergecore leaderboard`: which merge is best for these models and this data, in a time budget.

A search of the one program (`mergecore.search.base.run_search`), so it claims OUT with its
marker, records events.jsonl, resumes, and writes recipe.yml (the winner, replayable with
`mergecore merge`) and result.json. It runs

1. every applicable data-free method (`candidates.plan_candidates`) at its defaults, then over
   its grid, each merged in memory and scored on the validation split (`worker.py`; on Ray
   actors with `backend: ray`); one row per candidate in OUT/candidates.jsonl as it lands;
2. the searches (`searches.py`) in the time left, each into OUT/searches/<kind>/;
3. the test split for the top K by validation only (OUT/test.jsonl): test scores never rank
   and never pick the winner;

then writes leaderboard.csv and leaderboard.html. A rerun of the same command skips every
candidate, search and test score already recorded. The budget counts the wall time of every
run in OUT: a candidate (or search) is only started while its expected time fits.

Events (data fields), for the CLI's lines and an app:
  leaderboard.start      candidates, done, methods, skipped [{method, reason}], searches, budget,
                         elapsed, validation, test, backend, workers
  leaderboard.candidate  index, total, key, label, method, params, phase, stage, val_mean,
                         val_scores, seconds, merge_seconds, eval_seconds, elapsed, budget
                         (replayed: true for a row of an earlier run, with `replay_history`)
  leaderboard.stopped    reason, done, total, elapsed, budget (the data-free phase stopped early)
  leaderboard.search     search, status (started|skipped|done), reason, budget, seconds, val_mean, label
  leaderboard.search_progress  search, kind, data (an event of the running search)
  leaderboard.test       rank, key, label, val_mean, test_mean, test_scores, seconds
  leaderboard.done       winner, val_mean, test_mean, csv, html, recipe (emitted by the program)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Optional

from mergecore.events import Event
from mergecore.search.backend import WorkerFactory, make_backend
from mergecore.search.base import EvalSpec, Found, SearchRun, run_search
from mergecore.search.leaderboard import searches as phase2
from mergecore.search.leaderboard.candidates import (CANDIDATES_FILE, DATA_FREE, TEST_FILE, Candidate, RowFile,
                                                     plan_candidates, ranked)
from mergecore.search.leaderboard.config import SEARCH_KINDS, LeaderboardConfig, resolved
from mergecore.search.leaderboard.outputs import CSV_FILE, HTML_FILE, write_csv, write_html
from mergecore.search.leaderboard.worker import LeaderboardWorker, Scoring, worker_refs


class Leaderboard:
    """A leaderboard from its config: paths resolved against `root` and checked, the tasks files
    read and the candidates planned (a bad input fails before OUT is claimed)."""

    kind: ClassVar[str] = "leaderboard"
    config_class: ClassVar[type[LeaderboardConfig]] = LeaderboardConfig
    final = None  # the test split is scored here, for the top K only

    def __init__(self, config: LeaderboardConfig, root: Path):
        from mergecore.eval.tasks import load_tasks
        from mergecore.io.source import resolve_model_path

        self.config = c = resolved(config, root)
        load_tasks(c.tasks)
        if c.val_tasks:
            load_tasks(c.val_tasks)
        self.refs, reference = worker_refs(c.base, c.models)
        split = c.val_tasks is None
        val = EvalSpec(c.tasks if split else c.val_tasks, subset=c.val_fraction if split else None, seed=c.seed,
                       batch_size=c.batch_size, processor_from=str(resolve_model_path(reference)),
                       label="validation part of " + c.tasks if split else c.val_tasks)
        self.scoring = Scoring(val, c.tasks, split)
        self.factory = WorkerFactory(LeaderboardWorker, (self.refs, reference, self.scoring))
        self.candidates, self.skipped = plan_candidates(c.models, c.base, methods=c.methods, grid=c.grid,
                                                        dtype=c.dtype, seed=c.seed)
        self.searches = [k for k in SEARCH_KINDS if c.searches is None or k in c.searches]

    def sources(self) -> list[str]:
        return list(self.refs)

    def run(self, run: SearchRun) -> Found:
        return _Run(self, run).go()


class _Run:
    """One run of a leaderboard in its output folder."""

    def __init__(self, board: Leaderboard, run: SearchRun):
        self.board, self.run, self.config = board, run, board.config
        self.rows = RowFile(run.out / CANDIDATES_FILE)
        self.tests = RowFile(run.out / TEST_FILE)
        if not run.resume:
            self.rows.clear()
            self.tests.clear()
            for kind in SEARCH_KINDS:
                phase2.plan_file(run.out, kind).unlink(missing_ok=True)
        self.prior = max((r.get("elapsed", 0.0) for r in self.rows.values()), default=0.0)
        self.started = time.time()
        self.backend: Any = None
        self.searched: dict[str, dict[str, Any]] = {}
        self.stopped: Optional[str] = None
        self.test_share: Optional[float] = None  # test examples per validation example, counted once

    def elapsed(self) -> float:
        return self.prior + time.time() - self.started

    # -- scoring -------------------------------------------------------------------------------

    def _backend(self):
        if self.backend is None:
            self.backend = make_backend(self.config, self.board.factory)
        return self.backend

    def _close_backend(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def costs(self) -> phase2.Costs:
        """Mean seconds of a merge and of a validation pass over the candidates scored so far
        (0 before the first: nothing is known, nothing is held back), and per method."""
        done = [r for r in self.rows.values() if r["phase"] == DATA_FREE]
        if not done:
            return phase2.Costs(0.0, 0.0)
        merges: dict[str, list[float]] = {}
        for r in done:
            merges.setdefault(r["method"], []).append(r["merge_seconds"])
        return phase2.Costs(sum(r["merge_seconds"] for r in done) / len(done),
                            sum(r["eval_seconds"] for r in done) / len(done),
                            {m: sum(v) / len(v) for m, v in merges.items()})

    def test_reserve(self) -> float:
        """Seconds kept back for scoring the top K on the test split at the end."""
        c = self.costs()
        if not c.evaluate:
            return 0.0
        if self.test_share is None:
            self.test_share = self.board.scoring.test_share()
        return self.config.top_k * (c.merge + c.evaluate * self.test_share)

    # -- phase 1 -------------------------------------------------------------------------------

    def data_free(self) -> None:
        cfg, board = self.config, self.board
        total = len(board.candidates)
        todo = [(i, c) for i, c in enumerate(board.candidates) if c.key not in self.rows]
        budget = float(cfg.budget)
        searching = not board.scoring.split and any(k in phase2.PLANNERS for k in board.searches)
        share = cfg.data_free_share * budget if searching else budget  # the rest is the searches
        self.run.event("leaderboard.start", {
            "candidates": total, "done": total - len(todo), "methods": sorted({c.method for c in board.candidates}),
            "skipped": board.skipped, "searches": board.searches, "budget": budget, "elapsed": self.elapsed(),
            **board.scoring.describe(), "backend": cfg.backend, "workers": cfg.workers if cfg.backend == "ray" else 1})
        if self.run.replay_history:  # a UI that plots from the start gets the recorded rows first
            for i, c in enumerate(board.candidates):
                if c.key in self.rows:
                    self._announce(i, self.rows.rows[c.key], replayed=True)
        while todo:
            own = todo[0][1].stage == "grid" and share < budget
            if self.elapsed() + self.costs().candidate > (share if own else budget) - self.test_reserve():
                self.stopped = "share" if own else "budget"
                self.run.event("leaderboard.stopped", {
                    "reason": "the data-free phase used its share of the budget; the rest is the searches'" if own
                    else "the next candidate would not fit in the budget", "done": total - len(todo), "total": total,
                    "elapsed": self.elapsed(), "budget": budget})
                return
            n = getattr(self._backend(), "workers", 1)
            chunk, todo = todo[:n], todo[n:]
            items = [{"recipe": c.recipe, "part": "val", "label": c.label} for _, c in chunk]
            # recorded in candidate order (not as they land), so equal scores rank the same with any backend
            for (i, c), r in zip(chunk, self._backend().map(items, cancel=self.run.cancel)):
                self._record(i, c, r)

    def _record(self, index: int, c: Candidate, r: dict[str, Any]) -> None:
        row = {"key": c.key, "label": c.label, "method": c.method, "params": c.params, "phase": DATA_FREE,
               "stage": c.stage, "val_mean": r["mean"], "val_scores": r["scores"], "seconds": round(r["seconds"], 3),
               "merge_seconds": round(r["merge_seconds"], 3), "eval_seconds": round(r["eval_seconds"], 3),
               "elapsed": round(self.elapsed(), 3), "recipe": c.recipe}
        self.rows.add(row)
        self._announce(index, row)

    def _announce(self, index: int, row: dict[str, Any], replayed: bool = False) -> None:
        self.run.event("leaderboard.candidate", {
            "index": index, "total": len(self.board.candidates), **{k: v for k, v in row.items() if k != "recipe"},
            "budget": float(self.config.budget), **({"replayed": True} if replayed else {})})

    # -- phase 2 -------------------------------------------------------------------------------

    def searches(self) -> None:
        budget = float(self.config.budget)
        kinds = self.board.searches
        for i, kind in enumerate(kinds):
            done = next((r for r in self.rows.values() if r.get("search") == kind), None)
            if done is not None:
                self.searched[kind] = {"status": "done", "val_mean": done["val_mean"], "label": done["label"]}
                continue
            left = budget - self.test_reserve() - self.elapsed()
            sharing = sum(1 for k in kinds[i:] if k in phase2.PLANNERS)  # the time left is split among them
            plan, reason = (self._plan(kind, left / max(1, sharing)) if left > 0 else (None, "the budget is spent"))
            if plan is None:
                self.searched[kind] = {"status": "skipped", "reason": reason}
                self.run.event("leaderboard.search", {"search": kind, **self.searched[kind]})
                continue
            self._close_backend()  # Ray: the search's actors need the CPUs
            self.searched[kind] = self._search(kind, plan)

    def _plan(self, kind: str, seconds: float) -> tuple[Optional[dict[str, Any]], str]:
        import json

        if kind in phase2.NOT_RUN:
            return None, phase2.NOT_RUN[kind]
        if self.board.scoring.split:
            return None, ("a search chooses on a whole tasks file; give a separate validation file "
                          "(--val-tasks) to run it")
        path = phase2.plan_file(self.run.out, kind)
        if path.is_file():  # a search started by an earlier run resumes with the same settings
            return json.loads(path.read_text()), ""
        rows = ranked(r for r in self.rows.values() if r["phase"] == DATA_FREE)
        plan, reason = phase2.PLANNERS[kind](rows, self.config, seconds, self.costs())
        if plan is not None:
            from mergecore.search.leaderboard.outputs import atomic_write

            path.parent.mkdir(exist_ok=True)
            atomic_write(path, json.dumps(plan, indent=2))
        return plan, reason

    def _search(self, kind: str, plan: dict[str, Any]) -> dict[str, Any]:
        from mergecore.search.base import search_class

        cls = search_class(kind)
        search = cls(cls.config_class.model_validate(plan), self.run.out)
        folder = self.run.out / "searches" / kind
        self.run.event("leaderboard.search", {"search": kind, "status": "started",
                                              "budget": phase2.budget_for(kind, plan), "folder": str(folder)})

        def forward(ev: Event) -> None:
            self.run.event("leaderboard.search_progress", {"search": kind, "kind": ev.kind, "data": ev.data})

        t0 = time.time()
        run_search(search, folder, on_event=forward, cancel=self.run.cancel, resume=self.run.resume,
                   pool=self.run.pool)
        row = phase2.search_row(kind, folder, time.time() - t0)
        row["elapsed"] = round(self.elapsed(), 3)
        self.rows.add(row)
        info = {"status": "done", "val_mean": row["val_mean"], "label": row["label"],
                "seconds": row["seconds"], "budget": phase2.budget_for(kind, plan)}
        self.run.event("leaderboard.search", {"search": kind, **info})
        return info

    # -- test, outputs -------------------------------------------------------------------------

    def test_top(self, board_rows: list[dict[str, Any]]) -> None:
        top = board_rows[:self.config.top_k]
        todo = [(rank, r) for rank, r in enumerate(top, 1) if r["key"] not in self.tests]
        if todo:
            items = [{"recipe": r["recipe"], "part": "test", "label": r["label"], "folder": r.get("folder", False)}
                     for _, r in todo]
            results = self._backend().map(items, cancel=self.run.cancel)
            for (rank, r), res in zip(todo, results):
                self.tests.add({"key": r["key"], "test_mean": res["mean"], "test_scores": res["scores"],
                                "seconds": round(res["seconds"], 3)})
        for rank, r in enumerate(top, 1):
            t = self.tests.rows[r["key"]]
            self.run.event("leaderboard.test", {"rank": rank, "key": r["key"], "label": r["label"],
                                                "val_mean": r["val_mean"], "test_mean": t["test_mean"],
                                                "test_scores": t["test_scores"], "seconds": t["seconds"]})

    def go(self) -> Found:
        from mergecore.errors import MergeError
        from mergecore.recipe import recipe_from_dict

        try:
            self.data_free()
            if not self.rows.rows:
                raise MergeError(f"the budget ({self.config.budget} s) ran out before any candidate was scored; "
                                 f"give a larger --budget")
            self.searches()
            board_rows = ranked(self.rows.values())
            self.test_top(board_rows)
        finally:
            self._close_backend()
        tests = {k: v for k, v in self.tests.rows.items() if k in {r["key"] for r in board_rows[:self.config.top_k]}}
        out = self.run.out
        write_csv(out / CSV_FILE, board_rows, tests)
        write_html(out / HTML_FILE, board_rows, tests, f"leaderboard: {len(board_rows)} merges ranked by validation")
        winner = board_rows[0]
        test = tests[winner["key"]]
        strip = ("recipe",)
        summary = {
            "winner": {**{k: v for k, v in winner.items() if k not in strip}, "test_mean": test["test_mean"],
                       "test_scores": test["test_scores"]},
            "ranking": [{"rank": i, **{k: v for k, v in r.items() if k not in strip},
                         **({"test_mean": tests[r["key"]]["test_mean"]} if r["key"] in tests else {})}
                        for i, r in enumerate(board_rows, 1)],
            "scoring": self.board.scoring.describe(), "top_k": self.config.top_k,
            "candidates": {"planned": len(self.board.candidates),
                           "scored": sum(1 for r in board_rows if r["phase"] == DATA_FREE)},
            "skipped_methods": self.board.skipped, "searches": self.searched, "stopped": self.stopped,
            "budget_seconds": self.config.budget, "elapsed_seconds": round(self.elapsed(), 3),
            "files": {"csv": CSV_FILE, "html": HTML_FILE, "candidates": CANDIDATES_FILE, "test": TEST_FILE},
            "config": self.config.model_dump(),
        }
        done = {"winner": winner["label"], "val_mean": winner["val_mean"], "test_mean": test["test_mean"],
                "csv": str(out / CSV_FILE), "html": str(out / HTML_FILE), "recipe": str(out / "recipe.yml")}
        recipe = recipe_from_dict(winner["recipe"], where=f"leaderboard winner {winner['label']}")
        return Found(recipe, summary, done, self.board.scoring.val, winner["val_mean"])


SEARCH = Leaderboard


def run_leaderboard(config: LeaderboardConfig, root: Path, out_dir, **options: Any) -> dict[str, Any]:
    """Run (or resume) a leaderboard into `out_dir`; `options` as `mergecore.search.base.run_search`'s
    (`on_event`, `cancel`, `resume`, `replay`). Returns result.json's content."""
    return run_search(Leaderboard(config, root), out_dir, **options)
