"""An RMM scoring worker for the Ray backend: scores (trajectory, data subset) pairs.

Each worker loads the base and the source models once from their paths, builds its own layer
bank (same methods and seeds as the driver's, so a layer is the same tensor wherever it is
built) and prefix cache, and evaluates candidates with the same evaluator settings as the local
search. The driver samples the episodes of one PPO update from its policy, the workers score
them in parallel, and the driver records them in episode order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from mergecore.search.base import EvalSpec


@dataclass(frozen=True)
class RMMWorkerSpec:
    base: str
    models: tuple[str, ...]
    operators: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...]  # (name, method, parameters)
    scoring: EvalSpec  # the driver's (the same tasks, subsets and seed)
    seed: int = 0  # of randomised operators (the driver's bank's)
    prefix_cache: bool = True
    cache_bytes: int = 1 << 30
    reward_scale: float = 100.0
    artifacts: tuple[tuple[str, str], ...] = ()  # what data-informed operators read (name, file)


class RMMWorker:
    """`evaluate((emitted, subset)) -> (reward, metrics, seconds)`."""

    def __init__(self, spec: RMMWorkerSpec):
        from mergecore.models import ModelPool
        from mergecore.search.rmm.layers import Assembler, LayerBank, Operator, PrefixCache

        self.spec = spec
        pool = ModelPool()
        base = pool.model(spec.base)
        models = [pool.model(r) for r in spec.models]
        ops = [Operator(n, m, dict(p)) for n, m, p in spec.operators]
        self.bank = LayerBank(models, base, ops, seed=spec.seed, artifacts=dict(spec.artifacts),
                              model_refs=list(spec.models))
        self.cache: Optional[PrefixCache] = PrefixCache(spec.cache_bytes) if spec.prefix_cache else None
        self.assembler = Assembler(base, self.bank, self.cache)
        self.evaluator = spec.scoring.evaluator(pool)
        self.evaluator.prepare()

    def evaluate(self, item: tuple[list[tuple[int, int]], int]) -> tuple[float, dict[str, float], float]:
        emitted, subset = item
        t0 = time.time()
        model = self.assembler.build([tuple(x) for x in emitted])
        with torch.no_grad():
            res = self.evaluator.evaluate(model, subset_index=subset)
        return self.spec.reward_scale * res.mean, res.scores, time.time() - t0
