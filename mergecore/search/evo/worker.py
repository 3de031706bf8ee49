"""Scoring evo candidates: merge in memory into a resident model, evaluate on a data subset.

An `EvoWorker` is built once per process (the local search, or each Ray actor). It opens the
source models once (headers, and with `resident_bytes` the tensors too), loads the reference
model once, and then, per candidate: decode the genome to a recipe, plan it against the open
sources, write the merged tensors into the resident model (`executor.merge_in_memory`) and
run the evaluator. No checkpoint is written per candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from mergecore.io.source import ModelSource, resolve_model_path
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


@dataclass(frozen=True)
class EvalSpec:
    """How candidates are scored (picklable; every worker builds the same evaluator)."""

    tasks: str
    subset: Union[None, int, float] = None
    subset_index: int = 0
    seed: int = 0
    batch_size: int = 128
    processor_from: Optional[str] = None

    def evaluator(self):
        from mergecore.eval.evaluator import Evaluator

        return Evaluator(self.tasks, subset=self.subset, seed=self.seed, batch_size=self.batch_size,
                         processor_from=self.processor_from)


class EvoWorker:
    """Scores genomes of one template: `evaluate(genome) -> {score, scores, seconds, merge_seconds}`."""

    def __init__(self, genome: Genome, evaluation: EvalSpec, resident_bytes: int = 4 << 30):
        from mergecore.eval.evaluator import load_model

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
        from mergecore.executor import merge_in_memory, plan_merge

        plan = plan_merge(self.genome.recipe(x), sources=self.sources)
        return merge_in_memory(plan, self.model)

    def evaluate(self, x: list[float], cancel=None) -> dict[str, Any]:
        t0 = time.time()
        model = self.merge(x)
        t1 = time.time()
        res = self.evaluator.evaluate(model, subset_index=self.evaluation.subset_index, cancel=cancel)
        t2 = time.time()
        return {"score": res.mean, "scores": res.scores, "seconds": t2 - t0, "merge_seconds": t1 - t0}


def processor_folder(ref: str) -> str:
    return str(resolve_model_path(ref))


