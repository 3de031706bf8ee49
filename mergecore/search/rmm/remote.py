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
from typing import Any, Optional, Union

import torch


@dataclass(frozen=True)
class RMMWorkerSpec:
    base: str
    models: tuple[str, ...]
    operators: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...]  # (name, method, parameters)
    tasks: str
    subset: Union[None, int, float]
    seed: int = 0
    batch_size: int = 128
    prefix_cache: bool = True
    cache_bytes: int = 1 << 30
    reward_scale: float = 100.0


class RMMWorker:
    """`evaluate((emitted, subset)) -> (reward, metrics, seconds)`."""

    def __init__(self, spec: RMMWorkerSpec):
        from mergecore.eval.evaluator import Evaluator, load_model
        from mergecore.io.source import resolve_model_path
        from mergecore.search.rmm.layers import Assembler, LayerBank, Operator, PrefixCache

        self.spec = spec
        base_path = resolve_model_path(spec.base)
        base = load_model(base_path)
        models = [load_model(resolve_model_path(r)) for r in spec.models]
        ops = [Operator(n, m, dict(p)) for n, m, p in spec.operators]
        self.bank = LayerBank(models, base, ops, seed=spec.seed)
        self.cache: Optional[PrefixCache] = PrefixCache(spec.cache_bytes) if spec.prefix_cache else None
        self.assembler = Assembler(base, self.bank, self.cache)
        self.evaluator = Evaluator(spec.tasks, subset=spec.subset, seed=spec.seed, batch_size=spec.batch_size,
                                   processor_from=base_path)
        self.evaluator.prepare()

    def evaluate(self, item: tuple[list[tuple[int, int]], int]) -> tuple[float, dict[str, float], float]:
        emitted, subset = item
        t0 = time.time()
        model = self.assembler.build([tuple(x) for x in emitted])
        with torch.no_grad():
            res = self.evaluator.evaluate(model, subset_index=subset)
        return self.spec.reward_scale * res.mean, res.scores, time.time() - t0
