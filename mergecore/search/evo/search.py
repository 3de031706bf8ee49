"""The evolutionary search loop: CMA-ES over a genome, events, cancel, checkpoint and resume.

Each generation asks CMA-ES (the `cma` package) for a population, scores it through a backend
(`mergecore.search.backend`: in this process, or on Ray actors; results come back in candidate
order) and tells CMA-ES the negated scores. The optimiser's random draws come from the search's
own NumPy state (seeded by `seed`), so a run is fixed by its seed. The checkpoint (safetensors
file, plain JSON state, no pickle) records each generation's candidates and fitness; a resume
replays them into a fresh CMA-ES under the same RNG, so it continues exactly where the
uninterrupted run would be.

Events: `evo.candidate` (each scored candidate, in order), `evo.generation` (generation, best,
population mean, sigma, seconds per evaluation, evaluations per minute), `evo.best` (a new best),
`evo.resumed`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mergecore.errors import MergeError
from mergecore.events import CancelToken, Event, EventCallback
from mergecore.search.backend import Backend
from mergecore.search.checkpoint import SearchCheckpoint, WallClock, load_checkpoint, need, restoring, resume_file
from mergecore.search.evo.genome import Genome

CHECKPOINT = "evo_checkpoint.safetensors"
LEGACY_CHECKPOINT = "evo_checkpoint.pkl"  # the old pickle format: refused, never loaded


def _randn(*shape: int) -> np.ndarray:
    """CMA-ES's sampler: numpy's global generator, which `EvoSearch` swaps its own state into.
    (cma's default, the bound method `np.random.randn`, holds on to the global generator object,
    not to whatever state is swapped into it.)"""
    return np.random.randn(*shape)


def _candidate(d: Any) -> "Candidate":
    """A Candidate from its JSON form, checked field by field."""
    genome = need(d, "genome", list)
    scores = need(d, "scores", dict)
    if not all(type(v) in (int, float) for v in genome) or not all(type(v) in (int, float) for v in scores.values()):
        raise TypeError("the best candidate's genome or scores are not numbers")
    return Candidate([float(v) for v in genome], need(d, "score", float), {k: float(v) for k, v in scores.items()},
                     need(d, "evaluation", int), need(d, "generation", int))


def checkpoint_best(out_dir: Path) -> Optional["Candidate"]:
    """The best candidate recorded in the checkpoint in `out_dir` (None without one)."""
    path = Path(out_dir) / CHECKPOINT
    if not resume_file(path, Path(out_dir) / LEGACY_CHECKPOINT):
        return None
    _, state = load_checkpoint(path, kind="evo")
    with restoring(path):
        best = state.get("best")
        return None if best is None else _candidate(best)


def default_popsize(genes: int) -> int:
    """CMA-ES's default population for `genes` dimensions: 4 + floor(3 ln n) (Hansen's rule, what
    `cma` uses when no popsize is given); the app shows it before a search starts."""
    return 4 + int(3 * np.log(max(int(genes), 1)))


@dataclass
class EvoSettings:
    sigma0: float = 1 / 6  # initial step in the [0, 1] gene cube (mergekit-evolve's default)
    popsize: Optional[int] = None  # None: CMA-ES's default 4 + floor(3 ln n)
    max_evals: int = 100  # whole generations are run while they fit in this budget (at least one)
    seed: int = 0
    cma_options: dict[str, Any] = field(default_factory=dict)
    patience: int = 25  # stop after this many generations in a row without a better best (0: never)


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
                 fingerprint: Optional[dict[str, Any]] = None, replay_history: bool = False):
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
        # what a checkpoint must agree on to be resumed (the template, CMA-ES's settings, the data)
        self.checkpoint = SearchCheckpoint(out_dir, "evo", {
            "genome": genome.fingerprint(), "sigma0": settings.sigma0, "popsize": settings.popsize,
            "seed": settings.seed, "cma_options": settings.cma_options, **(fingerprint or {})},
            legacy=LEGACY_CHECKPOINT, key="fingerprint")
        self.replay_history = replay_history
        self.es = self._new_es()
        self.rng_state = np.random.RandomState(settings.seed).get_state()
        self.generation = 0
        self.evaluations = 0
        self.eval_seconds = 0.0
        self.clock = WallClock()  # the run's wall time across resumes
        self.best: Optional[Candidate] = None
        self.history: list[dict[str, Any]] = []
        self.generations: list[dict[str, list]] = []  # asked solutions and told fitness: replayed on resume
        # decoded values -> (mean, scores) on the full validation split (the final choice's scores),
        # checkpointed so a run cut short while choosing does not score them again
        self.validated: dict[tuple, tuple[float, dict[str, float]]] = {}
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

    def save(self) -> None:
        """Write the resume state: plain JSON, CMA-ES as the record of its generations (no pickle)."""
        self.checkpoint.save({}, {
            "generation": self.generation,
            "evaluations": self.evaluations,
            "eval_seconds": self.eval_seconds,
            "seconds": self.clock.elapsed(),
            "best": asdict(self.best) if self.best is not None else None,
            "history": self.history,
            "generations": self.generations,
            "validated": [{"values": list(k), "mean": m, "scores": sc} for k, (m, sc) in self.validated.items()],
        })

    def try_resume(self) -> bool:
        """Continue from the checkpoint in `out_dir`, if there is one. CMA-ES is rebuilt by replaying
        the recorded generations (the same asks under the same RNG, told the recorded fitness), which
        gives back its state and the RNG's exactly; a bad checkpoint is one line."""
        if not self.checkpoint.exists():
            return False
        _, state = self.checkpoint.load()
        with restoring(self.checkpoint.path):
            generation = need(state, "generation", int)
            evaluations = need(state, "evaluations", int)
            eval_seconds = need(state, "eval_seconds", float)
            self.clock.restore(state)
            best = state.get("best")
            best = None if best is None else _candidate(best)
            history = need(state, "history", list)
            generations = need(state, "generations", list)
            if generation < 0 or len(generations) != generation or len(history) != generation:
                raise ValueError(f"{len(generations)} recorded generations for generation {generation}")
            records = [(need(g, "solutions", list), need(g, "fitness", list)) for g in generations]
            validated = {}
            for v in state.get("validated", []):  # absent from checkpoints written before it was kept
                values, scores = need(v, "values", list), need(v, "scores", dict)
                if not all(type(x) in (int, float) for x in values + list(scores.values())):
                    raise TypeError("a validated candidate's values or scores are not numbers")
                validated[tuple(float(x) for x in values)] = (need(v, "mean", float), scores)
            es = self._new_es()
            rng = np.random.RandomState(self.settings.seed).get_state()
            self.es, self.rng_state = es, rng
            for g, (solutions, fitness) in enumerate(records):
                if g:
                    self.es.stop()  # as `run` does before every generation after the first
                xs = self._with_rng(self.es.ask)
                if [[float(v) for v in x] for x in xs] != solutions or len(fitness) != len(xs) or not all(
                        type(f) in (int, float) for f in fitness):
                    raise ValueError(f"generation {g} does not replay to its recorded candidates (another "
                                     f"cma version or a changed file)")
                self._with_rng(self.es.tell, xs, [float(f) for f in fitness])
        self.generation, self.evaluations, self.eval_seconds = generation, evaluations, eval_seconds
        self.best, self.history, self.generations, self.validated = best, history, generations, validated
        if self.replay_history:  # the generations before the checkpoint and its best, so a plot starts at the first
            for info in self.history:
                self._emit("evo.generation", dict(info, replayed=True))
            if self.best is not None:
                self._emit("evo.best", dict(self._best_data(), replayed=True))
        self._emit("evo.resumed", {"generation": self.generation, "evaluations": self.evaluations})
        return True

    # -- loop ----------------------------------------------------------------------------------

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event:
            self.on_event(Event(kind, data))

    def _best_data(self) -> dict[str, Any]:
        b = self.best
        return {"generation": b.generation, "evaluation": b.evaluation, "score": b.score, "scores": b.scores,
                "values": dict(zip(self.genome.labels(), self.genome.values(b.genome)))}

    def _budget_allows(self) -> bool:
        if self.generation == 0:
            return True
        return self.evaluations + self.popsize <= self.settings.max_evals

    def stalled_generations(self) -> int:
        """Generations since the best score last improved (from the recorded history, so a resumed
        run counts the same as an uninterrupted one)."""
        best, since = None, 0
        for info in self.history:
            if best is None or info["best"] > best:
                best, since = info["best"], 0
            else:
                since += 1
        return since

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
        fitness = [-float(r["score"]) for r in results]
        self._with_rng(self.es.tell, xs, fitness)
        self.generations.append({"solutions": genomes, "fitness": fitness})
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
            self._emit("evo.best", self._best_data())
        self._emit("evo.generation", info)
        return info

    def ranked(self) -> list[Candidate]:
        """Every scored candidate, best subset score first (the earlier on a tie), one per recipe
        (candidates that decode to the same rounded values are one)."""
        everything, n = [], 0
        for g, record in enumerate(self.generations):
            for x, f in zip(record["solutions"], record["fitness"]):
                everything.append(Candidate([float(v) for v in x], -float(f), {}, n, g))
                n += 1
        everything.sort(key=lambda c: (-c.score, c.evaluation))
        seen: set[tuple] = set()
        out = []
        for c in everything:
            key = tuple(self.genome.values(c.genome))
            if key not in seen:
                seen.add(key)
                out.append(c)
        return out

    def full_score(self, x: list[float], score: Any) -> tuple[float, dict[str, float]]:
        """(mean, scores) of genome `x` on the full validation split, from `score(x)` once, then kept
        (and checkpointed), so a resumed run's final choice sees the same numbers."""
        key = tuple(self.genome.values(x))
        if key not in self.validated:
            self.cancel.check()
            self.validated[key] = score(x)
            self.save()
        mean, scores = self.validated[key]
        return mean, dict(scores)

    def run(self) -> EvoResult:
        start = time.time()
        self.clock.start()
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
                patience = self.settings.patience
                if patience and self.generation and self.stalled_generations() >= patience:
                    self.stop_reason = f"patience ({patience} generations without a better score)"
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
