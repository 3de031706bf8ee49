"""Scoring evo candidates: merge in memory into a resident model, evaluate on a data subset.

An `EvoWorker` is built once per process (the local search, or each Ray actor). It opens the
source models once (headers, and with `resident_bytes` the tensors too), loads the reference
model once, and then, per candidate: decode the genome to a recipe, plan it against the open
sources, write the merged tensors into the resident model (`executor.merge_in_memory`) and
run the evaluator. No checkpoint is written per candidate.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from mergecore.io.source import ModelSource, resolve_model_path
from mergecore.search.base import EvalSpec
from mergecore.search.evo.genome import Genome


class ResidentSource:
    """A ModelSource whose tensors are read once and kept in memory; `read` hands out copies
    (streaming merge methods may overwrite what they read)."""

    def __init__(self, source: ModelSource):
        self._src = source
        self._cache: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._src, name)

    @property
    def tensors(self):
        return self._src.tensors

    def read(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is None:
            t = self._cache[name] = self._src.read(name)
        return t.clone()


class EvoWorker:
    """Scores genomes of one template: `evaluate(genome) -> {score, scores, seconds, merge_seconds}`."""

    def __init__(self, genome: Genome, evaluation: EvalSpec, resident_bytes: int = 4 << 30):
        from mergecore.models import load_model

        self.genome = genome
        self.evaluation = evaluation
        sources = {ref: ModelSource(ref, path=resolve_model_path(ref)) for ref in genome.refs}
        total = sum(s.total_bytes() for s in sources.values())
        self.sources: dict[str, Any] = (
            {r: ResidentSource(s) for r, s in sources.items()} if total <= resident_bytes else sources)
        self.model = load_model(sources[genome.reference].path)
        self.evaluator = evaluation.evaluator()
        self.evaluator.prepare()

    def merge(self, x: list[float]) -> torch.nn.Module:
        """The resident model holding candidate `x`."""
        from mergecore.executor import merge_in_memory
        from mergecore.plan import plan_merge

        plan = plan_merge(self.genome.recipe(x), sources=self.sources)
        return merge_in_memory(plan, self.model)

    def evaluate(self, x: list[float], cancel=None) -> dict[str, Any]:
        t0 = time.time()
        model = self.merge(x)
        t1 = time.time()
        res = self.evaluator.evaluate(model, subset_index=self.evaluation.subset_index, cancel=cancel)
        t2 = time.time()
        return {"score": res.mean, "scores": res.scores, "seconds": t2 - t0, "merge_seconds": t1 - t0}


