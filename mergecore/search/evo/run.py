"""Run an evolutionary (CMA-ES) merge search from a YAML config.

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
    final_tasks: families/fmnist-vit/tasks.yml   # optional: the best is scored once on these
    data_ratio: 0.1                 # each candidate is scored on this (fixed) fraction of each task
    sigma0: 0.1667                  # CMA-ES initial step on the [0, 1] gene cube
    popsize: null                   # null: CMA-ES's default 4 + 3 ln(genes)
    max_evals: 100
    seed: 0
    backend: local                  # or ray (pip install mergecore[ray])
    workers: 2                      # Ray actors
    ray_address: null               # an existing Ray cluster; null starts a local instance

Outputs in OUT_DIR: `recipe.yml` (the best candidate as a plain recipe that `mergecore merge`
replays), `result.json` (best score and per-task scores, the genes, timings, the final-task
scores), `evo_log.jsonl` (one line per generation) and `evo_checkpoint.safetensors` (resume state:
plain JSON in a safetensors file, no pickle).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergecore.errors import MergeError
from mergecore.events import CancelToken, Event, EventCallback
from mergecore.search.backend import BackendSpec, WorkerFactory, make_backend
from mergecore.search.evo.genome import Bounds, Genome
from mergecore.search.evo.search import CHECKPOINT, EvoSearch, EvoSettings
from mergecore.search.evo.worker import EvalSpec, EvoWorker


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
    models: list[str]
    parameters: dict[str, BoundsSpec]
    fixed: dict[str, Any] = Field(default_factory=dict)
    layer_groups: int = 1
    filters: list[str] = Field(default_factory=list)
    dtype: Optional[str] = "float32"
    recipe_seed: Optional[int] = None  # seed written into the recipe (randomised methods); default: seed
    tasks: str
    final_tasks: Optional[str] = None
    data_ratio: Union[float, int] = 0.1  # ratio in (0, 1] or an example count per task
    subset_index: int = 0
    batch_size: int = 128
    sigma0: float = 1 / 6
    popsize: Optional[int] = None
    max_evals: int = 100
    seed: int = 0
    cma_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("models must list at least one model")
        return v

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

    @field_validator("layer_groups", "batch_size", "max_evals")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("sigma0")
    @classmethod
    def _sigma(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("sigma0 must be in (0, 1] (genes live in [0, 1])")
        return v

    @field_validator("popsize")
    @classmethod
    def _pop(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 2:
            raise ValueError("popsize must be at least 2")
        return v

    def settings(self) -> EvoSettings:
        return EvoSettings(sigma0=self.sigma0, popsize=self.popsize, max_evals=self.max_evals, seed=self.seed,
                           cma_options=dict(self.cma_options))

    def genome(self, root: Path) -> Genome:
        return Genome(
            method=self.method,
            models=tuple(_model_path(m, root) for m in self.models),
            base_model=_model_path(self.base_model, root) if self.base_model else None,
            parameters=tuple((n, Bounds(b.min, b.max, b.init)) for n, b in self.parameters.items()),
            layer_groups=self.layer_groups, filters=tuple(self.filters), fixed=tuple(self.fixed.items()),
            dtype=self.dtype, seed=self.seed if self.recipe_seed is None else self.recipe_seed,
        )

    def eval_spec(self, root: Path, genome: Genome) -> EvalSpec:
        from mergecore.search.evo.worker import processor_folder

        return EvalSpec(tasks=_path(self.tasks, root), subset=self.data_ratio, subset_index=self.subset_index,
                        seed=self.seed, batch_size=self.batch_size,
                        processor_from=processor_folder(genome.reference))


def _path(ref: str, root: Path) -> str:
    """A path relative to the config's folder (or ~-expanded / absolute) if it exists, else as given."""
    p = Path(ref).expanduser()
    for cand in ([p] if p.is_absolute() else [root / p, p]):
        if cand.exists():
            return str(cand.resolve())
    return ref


def _model_path(ref: str, root: Path) -> str:
    return _path(ref, root)


def load_evo_config(path: Union[str, Path]) -> tuple[EvoConfig, Path]:
    from mergecore.search.config import load_config

    cfg, root = load_config(path, EvoConfig)
    return cfg, root  # type: ignore[return-value]


def check_config(config: EvoConfig, root: Path) -> Genome:
    """Build the genome and plan its starting recipe against the models (header reads only):
    every error in the template shows before any model is loaded."""
    from mergecore.executor import plan_merge

    from mergecore.arch import main_stack
    from mergecore.io.source import ModelSource, resolve_model_path

    genome = config.genome(root)
    sources = {r: ModelSource(r, path=resolve_model_path(r)) for r in genome.refs}
    plan_merge(genome.recipe(genome.x0()), sources=sources)
    found = main_stack(sources[genome.reference].tensors)
    layers = found[1] if found else 0
    if genome.layer_groups > max(layers, 1):
        raise MergeError(f"layer_groups ({genome.layer_groups}) exceeds the {layers} layers of the models")
    tasks = Path(_path(config.tasks, root))
    if not tasks.is_file():
        raise MergeError(f"tasks file not found: {config.tasks}")
    if config.final_tasks and not Path(_path(config.final_tasks, root)).is_file():
        raise MergeError(f"final_tasks file not found: {config.final_tasks}")
    for s in sources.values():
        s.close()
    return genome


def run_evo(config: EvoConfig, root: Path, out_dir: Union[str, Path], *, on_event: Optional[EventCallback] = None,
            cancel: Optional[CancelToken] = None, resume: bool = True) -> dict[str, Any]:
    """Run (or resume) the search; write recipe.yml and result.json into `out_dir`."""
    out = Path(out_dir)
    emit = on_event or (lambda e: None)
    genome = check_config(config, root)
    spec = config.eval_spec(root, genome)
    # a new or empty folder, or one an evo search marked (resumed); never a foreign or model folder
    from mergecore.io.outdir import claim_output_dir, existing_dirs

    claim_output_dir(out, kind="evo", sources=existing_dirs(genome.refs))
    emit(Event("evo.loading", {"models": list(genome.refs), "genes": genome.dim, "backend": config.backend,
                               "workers": config.workers if config.backend == "ray" else 1}))
    t_start = time.time()
    backend = make_backend(config, WorkerFactory(EvoWorker, (genome, spec)))
    start_s = time.time() - t_start
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # cma: "could not import matplotlib"
            search = EvoSearch(genome, backend, config.settings(), out_dir=out, on_event=on_event, cancel=cancel,
                               fingerprint={"tasks": spec.tasks, "subset": spec.subset,
                                            "subset_index": spec.subset_index})
        if not resume and (out / CHECKPOINT).is_file():
            (out / CHECKPOINT).unlink()
        if resume:
            search.try_resume()
        t0 = time.time()
        result = search.run()
        seconds = time.time() - t0
    finally:
        backend.close()
    best = result.best
    recipe = genome.recipe(best.genome)
    recipe.save(out / "recipe.yml")
    summary: dict[str, Any] = {
        "best": {"score": best.score, "scores": best.scores, "evaluation": best.evaluation,
                 "generation": best.generation, "scored_on": f"{config.tasks} (subset {spec.subset}, "
                                                              f"index {spec.subset_index})",
                 "genes": dict(zip(genome.labels(), genome.values(best.genome))), "genome": best.genome},
        "generations": result.generations,
        "evaluations": result.evaluations,
        "stop": result.stop,
        "popsize": search.popsize,
        "genes": genome.dim,
        "eval_seconds": search.eval_seconds,
        "seconds": seconds,
        "backend": {"kind": config.backend, "workers": getattr(backend, "workers", 1),
                    "start_seconds": round(start_s, 2)},
        "config": config.model_dump(),
    }
    if config.final_tasks:
        worker = EvoWorker(genome, EvalSpec(tasks=_path(config.final_tasks, root), subset=None, seed=config.seed,
                                            batch_size=config.batch_size, processor_from=spec.processor_from))
        res = worker.evaluate(best.genome, cancel=cancel)
        summary["final"] = {"tasks": str(config.final_tasks), "mean": res["score"], "scores": res["scores"]}
    (out / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    emit(Event("evo.done", {"best_score": best.score, "recipe": str(out / "recipe.yml")}))
    return summary
