"""The evolutionary search loop: CMA-ES over a genome, events, cancel, checkpoint and resume.

Each generation asks CMA-ES (the `cma` package) for a population, scores it through a backend
(`mergecore.search.backend`: in this process, or on Ray actors; results come back in candidate
order) and tells CMA-ES the negated scores. The optimiser's random draws come from the search's
own NumPy state (seeded by `seed`, saved in the checkpoint), so a run is fixed by its seed and
a resumed run continues exactly where the uninterrupted one would be.

Events: `evo.candidate` (each scored candidate, in order), `evo.generation` (generation, best,
population mean, sigma, seconds per evaluation, evaluations per minute), `evo.best` (a new best),
`evo.resumed`.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mergecore.errors import MergeError
from mergecore.events import CancelToken, Event, EventCallback
from mergecore.search.backend import Backend
from mergecore.search.evo.genome import Genome

CHECKPOINT = "evo_checkpoint.pkl"


def _randn(*shape: int) -> np.ndarray:
    """CMA-ES's sampler: numpy's global generator, which `EvoSearch` swaps its own state into.
    (cma's default, the bound method `np.random.randn`, would pickle a *copy* of the global
    generator into the checkpoint and draw from that copy after a resume.)"""
    return np.random.randn(*shape)


@dataclass
class EvoSettings:
    sigma0: float = 1 / 6  # initial step in the [0, 1] gene cube (mergekit-evolve's default)
    popsize: Optional[int] = None  # None: CMA-ES's default 4 + floor(3 ln n)
    max_evals: int = 100  # whole generations are run while they fit in this budget (at least one)
    seed: int = 0
    cma_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Candidate:
    genome: list[float]
    score: float
    scores: dict[str, float]
    evaluation: int  # 0-based index over the run
    generation: int


@dataclass
class EvoResult:
    best: Candidate
    generations: int
    evaluations: int
    seconds: float
    stop: str


class EvoSearch:
    """One CMA-ES run over `genome`, scoring through `backend`; resumable from `out_dir`."""

    def __init__(self, genome: Genome, backend: Backend, settings: EvoSettings, out_dir: Optional[Path] = None,
                 on_event: Optional[EventCallback] = None, cancel: Optional[CancelToken] = None,
                 fingerprint: Optional[dict[str, Any]] = None):
        if settings.sigma0 <= 0:
            raise MergeError("sigma0 must be positive")
        if settings.max_evals < 1:
            raise MergeError("max_evals must be at least 1")
        if settings.popsize is not None and settings.popsize < 2:
            raise MergeError("popsize must be at least 2")
        self.genome = genome
        self.backend = backend
        self.settings = settings
        self.out_dir = Path(out_dir) if out_dir else None
        self.on_event = on_event
        self.cancel = cancel or CancelToken()
        self.fingerprint = {"genome": genome.fingerprint(), "sigma0": settings.sigma0, "popsize": settings.popsize,
                            "seed": settings.seed, "cma_options": settings.cma_options, **(fingerprint or {})}
        self.es = self._new_es()
        self.rng_state = np.random.RandomState(settings.seed).get_state()
        self.generation = 0
        self.evaluations = 0
        self.eval_seconds = 0.0
        self.best: Optional[Candidate] = None
        self.history: list[dict[str, Any]] = []
        self.stop_reason = ""

    def _new_es(self):
        try:
            import cma
        except ImportError:  # pragma: no cover - a dependency
            raise MergeError("the evolutionary search needs the 'cma' package: pip install cma") from None
        opts: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "seed": float("nan"),  # no global reseeding: draws come from the search's own state
            "randn": _randn,
            "verbose": -9, "verb_disp": 0, "verb_log": 0, "verb_filenameprefix": "",
            # scores on a data subset are often tied (accuracy moves in steps): a flat stretch is no
            # reason to stop early; the evaluation budget ends the run (cma_options can set these)
            "tolflatfitness": 10**9, "tolfun": 0, "tolfunhist": 0,
        }
        if self.settings.popsize is not None:
            opts["popsize"] = self.settings.popsize
        opts.update(self.settings.cma_options)
        try:
            return cma.CMAEvolutionStrategy(self.genome.x0(), self.settings.sigma0, opts)
        except Exception as err:
            raise MergeError(f"cannot set up CMA-ES: {err}") from None

    @property
    def popsize(self) -> int:
        return int(self.es.popsize)

    # -- rng: CMA-ES draws from numpy's global state; give it ours and put the caller's back ----

    def _with_rng(self, fn, *args):
        saved = np.random.get_state()
        np.random.set_state(self.rng_state)
        try:
            return fn(*args)
        finally:
            self.rng_state = np.random.get_state()
            np.random.set_state(saved)

    # -- persistence ---------------------------------------------------------------------------

    @property
    def _ckpt(self) -> Optional[Path]:
        return self.out_dir / CHECKPOINT if self.out_dir else None

    def save(self) -> None:
        if not self._ckpt:
            return
        state = {
            "fingerprint": self.fingerprint,
            "es": self.es,
            "rng_state": self.rng_state,
            "generation": self.generation,
            "evaluations": self.evaluations,
            "eval_seconds": self.eval_seconds,
            "best": self.best,
            "history": self.history,
        }
        tmp = self._ckpt.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        tmp.replace(self._ckpt)

    def try_resume(self) -> bool:
        if not self._ckpt or not self._ckpt.is_file():
            return False
        try:
            with open(self._ckpt, "rb") as f:
                state = pickle.load(f)
        except Exception as err:
            raise MergeError(f"cannot read the checkpoint {self._ckpt} ({type(err).__name__}); "
                             f"remove it or start over with --restart") from None
        if json.dumps(state.get("fingerprint"), sort_keys=True, default=str) != json.dumps(
                self.fingerprint, sort_keys=True, default=str):
            raise MergeError(f"the checkpoint in {self.out_dir} was made by a different search config; "
                             f"use another OUT_DIR or start over with --restart")
        self.es = state["es"]
        self.rng_state = state["rng_state"]
        self.generation = state["generation"]
        self.evaluations = state["evaluations"]
        self.eval_seconds = state["eval_seconds"]
        self.best = state["best"]
        self.history = state["history"]
        self._emit("evo.resumed", {"generation": self.generation, "evaluations": self.evaluations})
        return True

    # -- loop ----------------------------------------------------------------------------------

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event:
            self.on_event(Event(kind, data))

    def _budget_allows(self) -> bool:
        if self.generation == 0:
            return True
        return self.evaluations + self.popsize <= self.settings.max_evals

    def _cma_stop(self) -> str:
        stop = {k: v for k, v in self.es.stop().items() if k not in ("maxfevals", "maxiter")}
        return ", ".join(sorted(stop))

    def step(self) -> dict[str, Any]:
        """Run one generation; returns its log entry."""
        t0 = time.time()
        self.cancel.check()
        xs = self._with_rng(self.es.ask)
        genomes = [[float(v) for v in x] for x in xs]
        results = self.backend.map(genomes, cancel=self.cancel)
        self.cancel.check()
        self._with_rng(self.es.tell, xs, [-float(r["score"]) for r in results])
        gen = self.generation
        scores = [float(r["score"]) for r in results]
        improved = False
        for i, (g, r) in enumerate(zip(genomes, results)):
            cand = Candidate(g, float(r["score"]), dict(r["scores"]), self.evaluations, gen)
            self.evaluations += 1
            self.eval_seconds += float(r["seconds"])
            self._emit("evo.candidate", {"generation": gen, "index": i, "evaluation": cand.evaluation,
                                         "score": cand.score, "scores": cand.scores, "seconds": r["seconds"],
                                         "merge_seconds": r.get("merge_seconds"), "genome": g})
            if self.best is None or cand.score > self.best.score:
                self.best = cand
                improved = True
        wall = time.time() - t0
        info = {
            "generation": gen,
            "evaluations": self.evaluations,
            "best": self.best.score,
            "best_scores": self.best.scores,
            "mean": float(np.mean(scores)),
            "max": max(scores),
            "min": min(scores),
            "sigma": float(self.es.sigma),
            "popsize": len(results),
            "eval_seconds": float(np.mean([r["seconds"] for r in results])),
            "merge_seconds": float(np.mean([r.get("merge_seconds") or 0.0 for r in results])),
            "wall_seconds": wall,
            "evals_per_minute": 60.0 * len(results) / wall if wall > 0 else None,
            "workers": getattr(self.backend, "workers", 1),
            "scores": scores,
        }
        self.history.append(info)
        self.generation += 1
        if improved:
            self._emit("evo.best", {"generation": gen, "evaluation": self.best.evaluation, "score": self.best.score,
                                    "scores": self.best.scores,
                                    "values": dict(zip(self.genome.labels(), self.genome.values(self.best.genome)))})
        self._emit("evo.generation", info)
        return info

    def run(self) -> EvoResult:
        start = time.time()
        log = None
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # the log mirrors the checkpointed history (a generation cut short is redone)
            log = open(self.out_dir / "evo_log.jsonl", "w")
            for info in self.history:
                log.write(json.dumps(info) + "\n")
            log.flush()
        try:
            while True:
                if not self._budget_allows():
                    self.stop_reason = f"max_evals ({self.settings.max_evals})"
                    break
                stop = self._cma_stop() if self.generation else ""
                if stop:
                    self.stop_reason = f"cma: {stop}"
                    break
                info = self.step()
                if log:
                    log.write(json.dumps(info) + "\n")
                    log.flush()
                self.save()
        finally:
            if log:
                log.close()
        if self.best is None:  # pragma: no cover - at least one generation runs
            raise MergeError("no candidate was scored")
        return EvoResult(self.best, self.generation, self.evaluations, time.time() - start, self.stop_reason)
