"""Scoring leaderboard candidates: in memory (the evo worker's way) or from a merged folder.

A `LeaderboardWorker` is built once per process (this one, or each Ray actor, through
`mergecore.search.backend`): it opens the models once (kept resident when they fit), loads the
reference model once and prepares the validation evaluator. An item is
`{"recipe": dict, "part": "val" | "test", "folder": bool}`: the recipe is planned against the
open models and merged into the resident model (`executor.merge_in_memory`, the tensors
`mergecore.merge` would write), or, with `folder` (a search's result, whose layout may differ
from the reference's), merged by `mergecore.merge` into a temporary folder that is scored and
removed. `part` picks the evaluator: validation, or test (built on first use).

Without a separate validation file, validation and test are the two disjoint parts of every
task: validation the first `val_fraction` of the Evaluator's seeded permutation (its subset 0),
test every other example (`ComplementEvaluator`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mergecore.errors import MergeError
from mergecore.eval.evaluator import Evaluator
from mergecore.search.base import EvalSpec


class ComplementEvaluator(Evaluator):
    """Scores the examples an `Evaluator(subset=fraction)` leaves out of its subset 0: the test
    part of a task whose first part is the validation split. Refuses a task too small to split."""

    def indices(self, task, subset_index: int = 0) -> np.ndarray:
        kept = super().indices(task, 0)
        rest = np.setdiff1d(np.arange(task.num_examples()), kept)
        if not len(rest):
            raise MergeError(f"task '{task.name}' has {task.num_examples()} examples: too few to split into "
                             f"validation and test; give a validation file with --val-tasks")
        return rest


@dataclass(frozen=True)
class Scoring:
    """How the leaderboard scores (picklable, for Ray workers): `val` as an EvalSpec, and the
    test tasks file, which is the complement of `val` when `split` (one file split in two)."""

    val: EvalSpec
    test_tasks: str
    split: bool

    def test_evaluator(self) -> Evaluator:
        v = self.val
        if self.split:
            return ComplementEvaluator(self.test_tasks, subset=v.subset, seed=v.seed, batch_size=v.batch_size,
                                       processor_from=v.processor_from)
        return Evaluator(self.test_tasks, seed=v.seed, batch_size=v.batch_size, processor_from=v.processor_from)

    def test_share(self) -> float:
        """Examples on test per example on validation (what a test pass costs against a validation one)."""
        from mergecore.eval.tasks import load_tasks

        if self.split:
            return (1 - float(self.val.subset)) / float(self.val.subset)
        count = [sum(t.num_examples() for t in load_tasks(f)) for f in (self.test_tasks, str(self.val.tasks))]
        return count[0] / max(1, count[1])

    def describe(self) -> dict[str, str]:
        v = self.val
        if self.split:
            return {"validation": f"{v.tasks} (a seeded {v.subset:g} of each task)",
                    "test": f"{self.test_tasks} (the other {1 - float(v.subset):g}, disjoint)"}
        return {"validation": str(v.tasks), "test": self.test_tasks}


class LeaderboardWorker:
    """Scores recipes: `evaluate(item) -> {mean, scores, seconds, merge_seconds, eval_seconds}`."""

    def __init__(self, refs: tuple[str, ...], reference: str, scoring: Scoring, resident_bytes: int = 4 << 30):
        from mergecore.io.source import ModelSource, resolve_model_path
        from mergecore.models import load_model
        from mergecore.search.evo.worker import ResidentSource

        self.scoring = scoring
        sources = {ref: ModelSource(ref, path=resolve_model_path(ref)) for ref in refs}
        total = sum(s.total_bytes() for s in sources.values())
        self.sources: dict[str, Any] = (
            {r: ResidentSource(s) for r, s in sources.items()} if total <= resident_bytes else sources)
        self.model = load_model(sources[reference].path)
        self.evaluators: dict[str, Evaluator] = {"val": scoring.val.evaluator()}
        self.evaluators["val"].prepare()

    def evaluator(self, part: str) -> Evaluator:
        if part not in self.evaluators:
            ev = self.evaluators[part] = self.scoring.test_evaluator()
            ev.prepare()
        return self.evaluators[part]

    def evaluate(self, item: dict[str, Any], cancel=None) -> dict[str, Any]:
        from mergecore.recipe import recipe_from_dict

        ev = self.evaluator(item["part"])
        recipe = recipe_from_dict(item["recipe"], where=item.get("label", "leaderboard candidate"))
        t0 = time.time()
        if item.get("folder"):
            return self._from_folder(recipe, ev, t0, cancel)
        from mergecore.executor import merge_in_memory
        from mergecore.plan import plan_merge

        model = merge_in_memory(plan_merge(recipe, sources=self.sources), self.model, cancel=cancel)
        t1 = time.time()
        res = ev.evaluate(model, cancel=cancel)
        return _result(res, t0, t1)

    def _from_folder(self, recipe, ev: Evaluator, t0: float, cancel) -> dict[str, Any]:
        from mergecore.merging import merge

        tmp = Path(tempfile.mkdtemp(prefix="mergecore-leaderboard-"))
        try:
            merge(recipe, tmp / "model", cancel=cancel)
            t1 = time.time()
            res = ev.evaluate(tmp / "model", cancel=cancel)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _result(res, t0, t1)


def _result(res, t0: float, t1: float) -> dict[str, Any]:
    t2 = time.time()
    return {"mean": res.mean, "scores": res.scores, "seconds": t2 - t0, "merge_seconds": t1 - t0,
            "eval_seconds": t2 - t1}


def worker_refs(base: Optional[str], models: list[str]) -> tuple[tuple[str, ...], str]:
    """The models a worker opens (base first) and the one it keeps resident."""
    refs = tuple(dict.fromkeys(([base] if base else []) + list(models)))
    return refs, refs[0]
