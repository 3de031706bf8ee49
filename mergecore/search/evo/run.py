"""The evolutionary (CMA-ES) merge search as a search of the one program (`mergecore.search.base`).

Search YAML (paths relative to the YAML file; `~` is expanded)::

    method: ties
    base_model: families/fmnist-vit/base
    models: [families/fmnist-vit/expert_a, families/fmnist-vit/expert_b]
    layer_groups: 4                 # curve anchors per parameter (1: one scalar)
    filters: [attention, mlp]       # optional: separate genes per tensor filter (+ one for the rest)
    parameters:                     # searched, with bounds (and optionally a starting value)
      weight: {min: 0.0, max: 1.0}
      density: {min: 0.1, max: 1.0, init: 0.5}
    fixed: {normalize: true, lambda: 1.0}
    tasks: families/fmnist-vit/tasks-val.yml
    final_tasks: families/fmnist-vit/tasks.yml   # optional: the replayed best is scored once on these
    data_ratio: 0.1                 # each candidate is scored on this (fixed) fraction of each task
    sigma0: 0.1667                  # CMA-ES initial step on the [0, 1] gene cube
    popsize: null                   # null: CMA-ES's default 4 + 3 ln(genes)
    max_evals: 100
    patience: 25                    # stop after this many generations without a better best (0: never)
    rerank_top: 5                   # the best candidates (by subset score) re-scored on all of `tasks`
    seed: 0
    backend: local                  # or ray (pip install mergecore[ray])
    workers: 2                      # Ray actors
    ray_address: null               # an existing Ray cluster; null starts a local instance

The result is chosen on the full validation split (`tasks`, all of it), never on the subset
scores that steer CMA-ES: the `rerank_top` best candidates by subset score and the template at
its starting values (every gene at its `init`, or the middle of its bounds: the data-free merge)
are scored there, and the search's best is returned unless the data-free one scores higher
(`mergecore.search.validation`).

Outputs in OUT_DIR: `recipe.yml` (the chosen candidate as a plain recipe that `mergecore merge`
replays), `result.json` (its validation score and per-task scores, the genes, every candidate's
validation score, the subset best, timings; with a replay, the scores of OUT_DIR/model),
`events.jsonl`, `evo_log.jsonl` (one line per generation) and `evo_checkpoint.safetensors`
(resume state: plain JSON in a safetensors file, no pickle).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergecore.errors import MergeError
from mergecore.search.backend import BackendSpec, WorkerFactory, make_backend
from mergecore.search.base import EvalSpec, Found, SearchRun, run_search
from mergecore.search.config import ModelList, Positive, Ratio, config_file, load_config, model_ref
from mergecore.search.evo.genome import Bounds, Genome
from mergecore.search.evo.search import EvoSearch, EvoSettings
from mergecore.search.evo.worker import EvoWorker
from mergecore.search.validation import DATA_FREE, OWN, Candidate, Emit, choose, validated


class BoundsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float
    max: float
    init: Optional[float] = None


class EvoConfig(BackendSpec):
    """An evolutionary search, as written in YAML."""

    model_config = ConfigDict(extra="forbid")
    method: str
    base_model: Optional[str] = None
    models: ModelList
    parameters: dict[str, BoundsSpec]
    fixed: dict[str, Any] = Field(default_factory=dict)
    layer_groups: Positive = 1
    filters: list[str] = Field(default_factory=list)
    dtype: Optional[str] = "float32"
    recipe_seed: Optional[int] = None  # seed written into the recipe (randomised methods); default: seed
    artifacts: dict[str, str] = Field(default_factory=dict)  # files a data-informed template reads (statistics)
    tasks: str
    final_tasks: Optional[str] = None
    data_ratio: Union[float, int] = 0.1  # ratio in (0, 1] or an example count per task
    subset_index: int = 0
    batch_size: Positive = 128
    sigma0: Ratio = 1 / 6  # genes live in [0, 1]
    popsize: Optional[int] = None
    max_evals: Positive = 100
    patience: int = Field(default=25, ge=0)  # generations in a row without a better best before stopping (0: never)
    # the result is chosen on the full validation split (`tasks`) among this many best candidates by
    # subset score and the template at its starting values (the data-free merge)
    rerank_top: Positive = 5
    seed: int = 0
    cma_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _params(cls, v: dict) -> dict:
        if not v:
            raise ValueError("name at least one parameter to search")
        return v

    @field_validator("data_ratio")
    @classmethod
    def _ratio(cls, v: Union[float, int]) -> Union[float, int]:
        if isinstance(v, bool) or v <= 0 or (isinstance(v, float) and v > 1):
            raise ValueError("data_ratio must be a ratio in (0, 1] or an example count >= 1")
        return v

    @field_validator("popsize")
    @classmethod
    def _pop(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 2:
            raise ValueError("popsize must be at least 2")
        return v

    def settings(self) -> EvoSettings:
        return EvoSettings(sigma0=self.sigma0, popsize=self.popsize, max_evals=self.max_evals, seed=self.seed, patience=self.patience,
                           cma_options=dict(self.cma_options))

    def genome(self, root: Path) -> Genome:
        return Genome(
            method=self.method,
            models=tuple(model_ref(m, root) for m in self.models),
            base_model=model_ref(self.base_model, root) if self.base_model else None,
            parameters=tuple((n, Bounds(b.min, b.max, b.init)) for n, b in self.parameters.items()),
            layer_groups=self.layer_groups, filters=tuple(self.filters), fixed=tuple(self.fixed.items()),
            dtype=self.dtype, seed=self.seed if self.recipe_seed is None else self.recipe_seed,
            artifacts=tuple((k, str(config_file(v, root, f"artifact '{k}'"))) for k, v in self.artifacts.items()),
        )

    def eval_spec(self, root: Path, genome: Genome) -> EvalSpec:
        """How candidates are scored (the tasks file checked; MergeError if it is missing)."""
        from mergecore.io.source import resolve_model_path

        return EvalSpec(tasks=str(config_file(self.tasks, root)), subset=self.data_ratio,
                        subset_index=self.subset_index, seed=self.seed, batch_size=self.batch_size,
                        processor_from=str(resolve_model_path(genome.reference)))


def load_evo_config(path: Union[str, Path]) -> tuple[EvoConfig, Path]:
    return load_config(path, EvoConfig)


def check_config(config: EvoConfig, root: Path) -> Genome:
    """Build the genome and plan its starting recipe against the models (header reads only):
    every error in the template shows before any model is loaded."""
    from mergecore.arch import main_stack
    from mergecore.io.source import ModelSource, resolve_model_path
    from mergecore.plan import plan_merge

    genome = config.genome(root)
    sources = {r: ModelSource(r, path=resolve_model_path(r)) for r in genome.refs}
    try:
        plan_merge(genome.recipe(genome.x0()), sources=sources)
        found = main_stack(sources[genome.reference].tensors)
    finally:
        for s in sources.values():
            s.close()
    layers = found[1] if found else 0
    if genome.layer_groups > max(layers, 1):
        raise MergeError(f"layer_groups ({genome.layer_groups}) exceeds the {layers} layers of the models")
    config_file(config.tasks, root)
    if config.final_tasks:
        config_file(config.final_tasks, root, "final_tasks file")
    return genome


class Evo:
    """An evolutionary search from its config: the template checked against the models' headers."""

    kind: ClassVar[str] = "evo"
    config_class: ClassVar[type[EvoConfig]] = EvoConfig

    def __init__(self, config: EvoConfig, root: Path):
        self.config = config
        self.genome = check_config(config, root)
        self.spec = config.eval_spec(root, self.genome)
        self.final = None if not config.final_tasks else EvalSpec(
            str(config_file(config.final_tasks, root, "final_tasks file")), seed=config.seed,
            batch_size=config.batch_size, label=str(config.final_tasks))

    def sources(self) -> list[str]:
        return list(self.genome.refs)

    def run(self, run: SearchRun) -> Found:
        config, genome, spec = self.config, self.genome, self.spec
        run.event("evo.loading", {"models": list(genome.refs), "genes": genome.dim, "backend": config.backend,
                                  "workers": config.workers if config.backend == "ray" else 1})
        t_start = time.time()
        backend = make_backend(config, WorkerFactory(EvoWorker, (genome, spec)))
        start_s = time.time() - t_start
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # cma: "could not import matplotlib"
                search = EvoSearch(genome, backend, config.settings(), out_dir=run.out, on_event=run.emit,
                                   cancel=run.cancel, replay_history=run.replay_history,
                                   fingerprint={"tasks": spec.tasks, "subset": spec.subset,
                                                "subset_index": spec.subset_index})
            if run.resume:
                search.try_resume()
            elif search.checkpoint.path.is_file():
                search.checkpoint.path.unlink()
            result = search.run()
        finally:
            backend.close()
        chosen, validation, scored = self.choose(search, run)
        x, best = chosen.ref, result.best
        summary: dict[str, Any] = {
            "best": {"score": chosen.mean, "scores": chosen.scores, "subset_score": chosen.subset,
                     "evaluation": chosen.info.get("evaluation"), "generation": chosen.info.get("generation"),
                     "scored_on": f"{config.tasks} (all)", "source": chosen.source, "label": chosen.label,
                     "genes": dict(zip(genome.labels(), genome.values(x))), "genome": x},
            "validation": validation,
            "subset_best": {"score": best.score, "scores": best.scores, "evaluation": best.evaluation,
                            "generation": best.generation,
                            "scored_on": f"{config.tasks} (subset {spec.subset}, index {spec.subset_index})"},
            "generations": result.generations,
            "evaluations": result.evaluations,
            "stop": result.stop,
            "popsize": search.popsize,
            "genes": genome.dim,
            "eval_seconds": search.eval_seconds,
            "seconds": search.clock.elapsed(),  # the whole run's (the choice too), across resumes
            "backend": {"kind": config.backend, "workers": getattr(backend, "workers", 1),
                        "start_seconds": round(start_s, 2)},
            "config": config.model_dump(),
        }
        return Found(genome.recipe(x), summary,
                     {"best_score": chosen.mean, "source": chosen.source, "recipe": str(run.out / "recipe.yml")},
                     scored, chosen.mean)

    def choose(self, search: EvoSearch, run: SearchRun) -> tuple[Candidate, dict[str, Any], EvalSpec]:
        """The result, chosen on the full validation split (`choose_genome`), and how it was scored."""
        import dataclasses

        genome = self.genome
        scored = dataclasses.replace(self.spec, subset=None, subset_index=0)
        worker: list[EvoWorker] = []  # built on first use: a resumed run may have every score already

        def score(x: list[float]) -> tuple[float, dict[str, float]]:
            if not worker:
                worker.append(EvoWorker(genome, scored))
            r = worker[0].evaluate(x, cancel=run.cancel)
            return r["score"], r["scores"]

        chosen, block = choose_genome(search, lambda x: search.full_score(x, score), run.event, str(self.config.tasks),
                                      self.config.rerank_top)
        return chosen, block, scored


def choose_genome(search: EvoSearch, score: Callable[[list[float]], tuple[float, dict[str, float]]], emit: Emit,
                  tasks: str, top: int) -> tuple[Candidate, dict[str, Any]]:
    """The `top` best candidates by subset score and the template at its starting values (the
    data-free merge), each scored by `score` (mean and per-task scores on the full validation
    split); the result by `mergecore.search.validation.choose`. Returns it and the `validation` block."""
    genome = search.genome
    candidates = []
    for c in search.ranked()[:top]:
        mean, scores = score(c.genome)
        candidates.append(validated(emit, Candidate(
            f"evaluation {c.evaluation + 1}", OWN, mean, scores, subset=c.score, ref=c.genome,
            info={"evaluation": c.evaluation, "generation": c.generation}), tasks))
    x0 = genome.x0()
    mean, scores = score(x0)
    candidates.append(validated(emit, Candidate(
        f"{genome.method} at its starting values", DATA_FREE, mean, scores, ref=x0,
        info={"values": dict(zip(genome.labels(), genome.values(x0)))}), tasks))
    return choose(candidates, emit, tasks)


SEARCH = Evo


def run_evo(config: EvoConfig, root: Path, out_dir: Union[str, Path], **options: Any) -> dict[str, Any]:
    """Run (or resume) the search into `out_dir`; `options` as `mergecore.search.base.run_search`'s."""
    return run_search(Evo(config, root), out_dir, **options)
