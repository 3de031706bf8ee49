"""Run a DAM search from a YAML config: load models and data, train coefficients, write a recipe.

Search YAML (paths relative to the YAML file; `~` is expanded)::

    base_model: families/fmnist-vit/base     # every tensor without coefficients comes from it
    models:                                  # the merge inputs, each paired with its data D_i
      - families/fmnist-vit/expert_fmnist_tops
      - {model: families/fmnist-vit/expert_digits, task: digits}   # explicit pairing by task name
    train_tasks: families/fmnist-vit/tasks-val.yml   # D_i: a tasks file or an inline task list
                                             # (labels are never used); paired in order by default
    eval_tasks: families/fmnist-vit/tasks-val.yml    # scored every eval_every steps and at the end
    eval_subset: 0.25                        # periodic evaluations on this part (ratio or count)
    final_eval_full: true                    # the last evaluation on all of eval_tasks (false: the subset)
    final_tasks: families/fmnist-vit/tasks.yml       # optional: scored once on the result, never used
    granularity: column                      # column: one coefficient per input column (DAM)
                                             # layer: one per model and tensor (layer-wise AdaMerging)
    form: sum                                # sum: W = Σ c_i W_i | task_vectors: W = W0 + Σ c_i (W_i − W0)
    transform: none                          # none | tanh (written into the recipe)
    init: null                               # effective start value; default 1/N (sum) or 0.3 (task_vectors)
    include_base: false                      # also merge the base as an input (form sum)
    merge_embeddings: false                  # default: embeddings and norms stay the base's (the paper's best)
    merge_norms: false
    lm_head: true                            # an untied lm_head gets coefficients (a tied one never)
    exclude: []                              # tensor-name substrings / regexes left to the base
    loss:
      kind: kl                               # kl | mse | entropy (entropy needs no teachers)
      direction: forward                     # forward: KL(model_i ‖ merged) | reverse: KL(merged ‖ model_i)
      temperature: 2.0
      lambda_cos: 0.0                        # λ_cos Σ_l Σ_{i<j} cos(c_i^l, c_j^l)
      lambda_l1: 0.0
      lambda_l2: 0.0
    optimizer: {lr: 2.0e-3, weight_decay: 0.0, betas: [0.9, 0.999], max_grad_norm: 1.0,
                schedule: constant, warmup_steps: 0, clamp: null}
    teachers: auto                           # auto | cache | on_the_fly (auto: cache if it fits the budget)
    teacher_cache_budget: 2GB
    full_logits_max_vocab: 4096              # larger vocabularies cache only the top-k logits
    teacher_top_k: 128
    steps: 200
    batch_size: 32                           # examples per task per step
    examples_per_task: 1000                  # a seeded sample of each task's data (null: all)
    max_length: 512                          # tokens per LM example
    eval_every: 50
    checkpoint_every: 50
    seed: 0

Outputs in OUT_DIR: `dam_coefficients.safetensors` (raw coefficients, one entry per merged
tensor), `recipe.yml` (method `dam`, replayable with `mergecore merge`), `result.json` (last
evaluation, timings, memory, config), `dam_log.jsonl` (one line per step and evaluation) and
`dam_checkpoint.safetensors` (resume state: tensors and JSON, no pickle). The coefficients file and
the recipe are also rewritten at every checkpoint, so a cancelled run leaves a usable recipe.
"""

from __future__ import annotations

import gc
import json
import re
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergecore.errors import MergeError
from mergecore.events import CancelToken, Event, EventCallback

COEF_FILE = "dam_coefficients.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    model: str
    task: Optional[str] = None  # name of its task in train_tasks (default: the task at its position)


class LossSpec(_Strict):
    kind: Literal["kl", "mse", "entropy"] = "kl"
    direction: Literal["forward", "reverse"] = "forward"
    temperature: float = Field(default=2.0, gt=0)
    entropy_temperature: float = Field(default=1.0, gt=0)
    lambda_cos: float = Field(default=0.0, ge=0)
    lambda_l1: float = Field(default=0.0, ge=0)
    lambda_l2: float = Field(default=0.0, ge=0)


class OptimizerSpec(_Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)  # stated explicitly: decay pulls coefficients to 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: Optional[float] = Field(default=1.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    clamp: Optional[tuple[float, float]] = None

    @field_validator("clamp")
    @classmethod
    def _clamp(cls, v):
        if v is not None and not v[0] < v[1]:
            raise ValueError("clamp must be [low, high] with low < high")
        return v


TaskList = Union[str, list[dict[str, Any]]]


class DAMConfig(_Strict):
    """A DAM search, as written in YAML."""

    base_model: Optional[str] = None
    models: list[Union[str, ModelSpec]]
    train_tasks: TaskList
    eval_tasks: Optional[TaskList] = None
    eval_subset: Optional[Union[int, float]] = None
    final_eval_full: bool = True  # the last evaluation on all of eval_tasks (false: on eval_subset too)
    final_tasks: Optional[TaskList] = None
    granularity: Literal["column", "layer"] = "column"
    form: Literal["sum", "task_vectors"] = "sum"
    transform: Literal["none", "tanh"] = "none"
    init: Optional[float] = None
    include_base: bool = False
    merge_embeddings: bool = False
    merge_norms: bool = False
    lm_head: bool = True
    exclude: list[str] = Field(default_factory=list)
    loss: LossSpec = Field(default_factory=LossSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    teachers: Literal["auto", "cache", "on_the_fly"] = "auto"
    teacher_cache_budget: str = "2GB"
    full_logits_max_vocab: int = Field(default=4096, ge=1)
    teacher_top_k: int = Field(default=128, ge=1)
    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=1)
    examples_per_task: Optional[int] = Field(default=1000, ge=1)
    max_length: Optional[int] = Field(default=512, ge=2)
    eval_every: int = Field(default=50, ge=0)
    eval_at_start: bool = True
    checkpoint_every: int = Field(default=50, ge=0)
    eval_batch_size: int = Field(default=256, ge=1)
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # of the replayed checkpoint

    @field_validator("models")
    @classmethod
    def _models(cls, v):
        if not v:
            raise ValueError("models must list at least one model")
        return v

    @field_validator("eval_subset")
    @classmethod
    def _subset(cls, v):
        if v is None:
            return v
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("eval_subset must be a ratio in (0, 1] or a count >= 1")
        if isinstance(v, int) and v < 1:
            raise ValueError("eval_subset must be a ratio in (0, 1] or a count >= 1")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DAMConfig":
        if self.form == "task_vectors":
            if self.base_model is None:
                raise ValueError("form 'task_vectors' needs a base_model")
            if self.include_base:
                raise ValueError("form 'task_vectors' cannot include the base as a merge input")
        if self.transform == "tanh" and self.init is not None and not -1 < self.init < 1:
            raise ValueError("with transform tanh, init must be in (-1, 1)")
        return self

    def model_refs(self) -> list[str]:
        return [m if isinstance(m, str) else m.model for m in self.models]


def _identity(cfg: DAMConfig, base: str, refs: list[str], include_base: bool) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (the coefficients' meaning and the data order)."""
    return {"base": base, "models": refs, "granularity": cfg.granularity, "form": cfg.form,
            "transform": cfg.transform, "include_base": include_base, "merge_embeddings": cfg.merge_embeddings,
            "merge_norms": cfg.merge_norms, "lm_head": cfg.lm_head, "exclude": list(cfg.exclude),
            "seed": cfg.seed, "batch_size": cfg.batch_size, "examples_per_task": cfg.examples_per_task}


def _load_task_list(spec: TaskList, root: Path, where: str):
    from mergecore.eval.tasks import load_tasks, task_from_dict
    from mergecore.search.config import resolve_path

    if isinstance(spec, str):
        return load_tasks(resolve_path(spec, root))
    if not spec:
        raise MergeError(f"{where}: the task list is empty")
    tasks = [task_from_dict(t, root, f"{where}[{i}]") for i, t in enumerate(spec)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise MergeError(f"{where}: task names must be unique")
    return tasks


def _pair_tasks(cfg: DAMConfig, tasks: list) -> list:
    by_name = {t.name: t for t in tasks}
    out = []
    explicit = [m.task for m in cfg.models if isinstance(m, ModelSpec) and m.task]
    if not explicit and len(tasks) != len(cfg.models):
        raise MergeError(f"train_tasks has {len(tasks)} task(s) for {len(cfg.models)} model(s); pair them with "
                         f"`{{model: ..., task: NAME}}` entries or list one task per model")
    for i, m in enumerate(cfg.models):
        name = m.task if isinstance(m, ModelSpec) and m.task else None
        if name is None:
            if i >= len(tasks):
                raise MergeError(f"models[{i}] has no task: name one with `task:`")
            out.append(tasks[i])
        elif name not in by_name:
            raise MergeError(f"models[{i}]: task '{name}' is not in train_tasks ({', '.join(by_name)})")
        else:
            out.append(by_name[name])
    return out


def _output_width(module) -> int:
    out = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if out is not None and hasattr(out, "weight"):
        return int(out.weight.shape[0])
    cfg = getattr(module, "config", None)
    for key in ("num_labels", "vocab_size"):
        if cfg is not None and getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 1


def dam_recipe(base_ref: str, refs: list[str], cfg: DAMConfig, include_base: bool, name: str = "dam"):
    from mergecore.recipe import recipe_from_dict

    return recipe_from_dict({
        "merge_method": "dam",
        "base_model": base_ref,
        "models": [{"model": r} for r in refs],
        "parameters": {"transform": cfg.transform, "form": cfg.form, "include_base": include_base,
                       "coefficients": "coefficients"},
        "artifacts": {"coefficients": COEF_FILE},
        "dtype": cfg.dtype,
        "name": name,
    }, where="dam recipe")


def run_dam(config: DAMConfig, root: Path, out_dir: str | Path, *, on_event: Optional[EventCallback] = None,
            cancel: Optional[CancelToken] = None, resume: bool = True) -> dict[str, Any]:
    """Run (or resume) a DAM search; writes the coefficients, recipe.yml and result.json into `out_dir`."""
    return prepare_dam(config, root, out_dir, on_event=on_event, cancel=cancel).run(resume=resume)


@dataclass
class DAMRun:
    """A prepared DAM search: models, data and teachers loaded; `run()` trains and writes the results.
    After `run()`, `module` is the resident model holding the merged weights."""

    search: Any  # DAMSearch
    module: Any
    config: DAMConfig
    root: Path
    out: Path
    base_path: Path
    eval_spec: Any
    teachers: dict[str, Any]
    teacher_seconds: float
    started: float
    cancel: CancelToken
    emit: Any

    def run(self, resume: bool = True) -> dict[str, Any]:
        from mergecore.eval.evaluator import Evaluator

        search, cfg, out = self.search, self.config, self.out
        if resume:
            search.try_resume()
        merger = search.merger
        self.emit(Event("dam.start", {"step": search.step, "steps": cfg.steps, "coefficients": merger.num_coefficients(),
                                      "tensors": len(merger.slots), "teachers": self.teachers["mode"]}))
        search.run()
        summary: dict[str, Any] = {
            "eval": ({"tasks": self.eval_spec if isinstance(self.eval_spec, str) else "inline", **search.last_eval}
                     if search.last_eval else None),
            "evals": search.evals,
            "last_step": search.history[-1] if search.history else None,
            "steps": search.step,
            "examples_seen": search.examples_seen,
            "tokens_seen": search.tokens_seen,
            "train_seconds": search.train_seconds,
            "teacher_seconds": self.teacher_seconds,
            "eval_seconds": search.eval_seconds,
            "seconds": time.time() - self.started,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "coefficients": merger.num_coefficients(),
            "tensors": [s.ckpt for s in merger.slots],
            "teachers": self.teachers,
            "recipe": str(out / "recipe.yml"),
            "config": cfg.model_dump(mode="json"),
        }
        merger.write_into(self.module)
        if cfg.final_tasks:
            final = Evaluator(_load_task_list(cfg.final_tasks, self.root, "final_tasks"), subset=None, seed=cfg.seed,
                              batch_size=cfg.eval_batch_size, processor_from=self.base_path)
            r = final.evaluate(self.module, cancel=self.cancel)
            summary["final"] = {"tasks": cfg.final_tasks if isinstance(cfg.final_tasks, str) else "inline",
                                "mean": r.mean, "scores": r.scores}
        (out / "result.json").write_text(json.dumps(summary, indent=2))
        self.emit(Event("dam.done", {"recipe": str(out / "recipe.yml"), "eval": summary["eval"]}))
        return summary


def prepare_dam(config: DAMConfig, root: Path, out_dir: str | Path, *, on_event: Optional[EventCallback] = None,
                cancel: Optional[CancelToken] = None) -> DAMRun:
    """Load the models and the data, cache the teachers, build the search (nothing trained yet)."""
    from mergecore.eval.evaluator import Evaluator, load_model
    from mergecore.io.outdir import claim_output_dir, existing_dirs
    from mergecore.io.source import ModelSource, resolve_model_path
    from mergecore.io.writer import parse_size
    from mergecore.methods.dam import save_coefficients
    from mergecore.search.dam.data import compute_teacher, run_model, task_data
    from mergecore.search.dam.merger import Merger, assign_checkpoint_names, find_slots
    from mergecore.search.dam.search import DAMSearch, DAMSettings, Evaluate, LossSettings
    from mergecore.search.config import resolve_path

    t_start = time.time()
    cancel = cancel or CancelToken()
    emit = on_event or (lambda e: None)
    out = Path(out_dir)
    cfg = config
    # a new or empty folder, or one a DAM search marked (resumed); never a foreign or model folder
    claim_output_dir(out, kind="dam", sources=existing_dirs(
        resolve_path(r, root) for r in [*cfg.model_refs(), *([cfg.base_model] if cfg.base_model else [])]))
    refs = [resolve_path(r, root) for r in cfg.model_refs()]
    if len(set(refs)) != len(refs):
        raise MergeError("models lists the same model twice; each merge input needs its own entry")
    include_base = cfg.include_base
    if cfg.base_model is None:  # the first model supplies the unmerged tensors and is merged too
        base_ref, include_base = refs[0], True
        model_refs = refs[1:]
    else:
        base_ref = resolve_path(cfg.base_model, root)
        model_refs = refs
        if base_ref in refs:
            raise MergeError("the base_model is also listed under models; list it only as base_model "
                             "(set include_base: true to merge it as an input too)")
    paths = {r: resolve_model_path(r) for r in [base_ref, *refs]}

    train_tasks = _pair_tasks(cfg, _load_task_list(cfg.train_tasks, root, "train_tasks"))
    eval_spec = cfg.eval_tasks if cfg.eval_tasks is not None else cfg.train_tasks
    eval_tasks = _load_task_list(eval_spec, root, "eval_tasks")

    # the resident model and the merged tensors
    emit(Event("dam.loading", {"models": refs, "base": base_ref}))
    module = load_model(paths[base_ref]).requires_grad_(False)
    head_names: set[str] = set()
    for t in list(train_tasks) + list(eval_tasks):
        hf = getattr(t, "head_from", None)
        if hf is not None:
            prefix = t.spec.head_prefix
            head_names |= {n for n, _ in module.named_parameters() if n.startswith(prefix)}
    exclude = list(cfg.exclude) + ["^" + re.escape(n) + "$" for n in sorted(head_names)]
    slots = find_slots(module, granularity=cfg.granularity, merge_embeddings=cfg.merge_embeddings,
                       merge_norms=cfg.merge_norms, lm_head=cfg.lm_head, exclude=exclude)
    src = ModelSource(base_ref, path=paths[base_ref])
    try:
        slots = assign_checkpoint_names(slots, module, src)
    finally:
        src.close()
    merger = Merger(slots, n_models=len(refs) - (1 if cfg.base_model is None else 0), transform=cfg.transform,
                    form=cfg.form, include_base=include_base, init=cfg.init)
    base_params = {n: p for n, p in module.named_parameters()}
    if merger.needs_base:
        merger.set_base(base_params)

    # D_i
    evaluator = Evaluator(list(train_tasks), seed=cfg.seed, batch_size=cfg.eval_batch_size,
                          processor_from=paths[base_ref])
    res = evaluator.resources(module, paths[base_ref])
    datas = []
    for i, t in enumerate(train_tasks):
        cancel.check()
        datas.append(task_data(t, res, module, max_examples=cfg.examples_per_task, seed=cfg.seed, index=i,
                               max_length=cfg.max_length))
    emit(Event("dam.data", {"tasks": {d.name: len(d) for d in datas}, "rows": {d.name: d.rows_total for d in datas}}))

    # teachers: cached once (full logits for small vocabularies, top-k otherwise) or on the fly
    width = _output_width(module)
    needs_teacher = cfg.loss.kind in ("kl", "mse")
    top_k = cfg.teacher_top_k if width > cfg.full_logits_max_vocab else None
    est = 0
    for d in datas:
        w = len(d.classes) if d.classes is not None else width
        est += d.rows_total * (top_k * 8 if top_k and top_k < w else w * 4)
    mode = cfg.teachers
    if mode == "auto":
        mode = "cache" if est <= parse_size(cfg.teacher_cache_budget) else "on_the_fly"
    if not needs_teacher:
        mode = "none"
    teacher_params: list = [None] * len(datas)
    t_teacher = time.time()
    data_of_model = {r: i for i, r in enumerate(refs)}  # model ref -> index of its D_i
    for r in refs:
        cancel.check()
        resident = cfg.base_model is None and r == base_ref  # the first model is also the resident one
        if resident:  # copies: the resident model's tensors are overwritten before each evaluation
            model = module
            tensors = {n: p.detach().clone() for n, p in module.named_parameters()}
        else:
            model = load_model(paths[r]).requires_grad_(False)
            tensors = dict(model.named_parameters())
        i = data_of_model[r]
        d = datas[i]
        if mode == "cache":
            emit(Event("dam.teacher", {"task": d.name, "model": r, "examples": len(d)}))
            d.teacher = compute_teacher(d, lambda kw, m=model, h=d.head: run_model(m, h, kw),
                                        batch_size=cfg.eval_batch_size, top_k=top_k)
        elif mode == "on_the_fly":
            sd = dict(model.state_dict(keep_vars=False))
            teacher_params[i] = {k: (v.detach().clone() if resident else v.detach()) for k, v in sd.items()}
        if resident:
            merger.set_base(tensors)
        else:
            merger.add_source(tensors, r)
        del model, tensors
        gc.collect()
    cache_bytes = sum(d.teacher.nbytes for d in datas if d.teacher is not None)
    teacher_seconds = time.time() - t_teacher
    emit(Event("dam.teachers", {"mode": mode, "bytes": cache_bytes, "top_k": top_k if mode == "cache" else None,
                                "seconds": teacher_seconds}))

    # evaluation of the merged model (periodic on a subset, the last one on all of eval_tasks)
    eval_fn = None
    if eval_tasks:
        periodic = Evaluator(eval_tasks, subset=cfg.eval_subset, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                             processor_from=paths[base_ref])
        full = periodic if cfg.eval_subset is None or not cfg.final_eval_full else Evaluator(
            _load_task_list(eval_spec, root, "eval_tasks"), subset=None, seed=cfg.seed,
            batch_size=cfg.eval_batch_size, processor_from=paths[base_ref])
        eval_fn = Evaluate(periodic, full, cancel)

    o = cfg.optimizer
    settings = DAMSettings(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
        eps=o.eps, max_grad_norm=o.max_grad_norm or None, schedule=o.schedule, warmup_steps=o.warmup_steps,
        clamp=tuple(o.clamp) if o.clamp else None, seed=cfg.seed, eval_every=cfg.eval_every,
        eval_at_start=cfg.eval_at_start, checkpoint_every=cfg.checkpoint_every,
        loss=LossSettings(kind=cfg.loss.kind, direction=cfg.loss.direction, temperature=cfg.loss.temperature,
                          entropy_temperature=cfg.loss.entropy_temperature, lambda_cos=cfg.loss.lambda_cos,
                          lambda_l1=cfg.loss.lambda_l1, lambda_l2=cfg.loss.lambda_l2))
    recipe = dam_recipe(base_ref, model_refs, cfg, include_base)
    rows = ([base_ref] if include_base else []) + model_refs

    def write_recipe(search: DAMSearch) -> None:
        meta = {"transform": cfg.transform, "form": cfg.form, "include_base": include_base,
                "granularity": cfg.granularity, "rows": rows, "step": search.step, "loss": cfg.loss.kind}
        raw = search.merger.raw_state()
        save_coefficients(out / COEF_FILE, {s.ckpt: raw[s.name] for s in slots}, meta)
        recipe.save(out / "recipe.yml")

    search = DAMSearch(module, merger, datas, settings, evaluate=eval_fn,
                       teacher_params=teacher_params if mode == "on_the_fly" else None, out_dir=out,
                       on_event=on_event, cancel=cancel, identity=_identity(cfg, base_ref, refs, include_base),
                       on_checkpoint=write_recipe)
    teachers = {"mode": mode, "bytes": cache_bytes, "top_k": top_k if mode == "cache" else None}
    return DAMRun(search, module, cfg, root, out, paths[base_ref], eval_spec, teachers, teacher_seconds, t_start,
                  cancel, emit)


def load_dam_config(path: str | Path) -> tuple[DAMConfig, Path]:
    from mergecore.search.config import load_config

    cfg, root = load_config(path, DAMConfig)
    return cfg, root  # type: ignore[return-value]


class DAMJob:
    """A DAM search in a background thread: `.events` fills as it runs; `.cancel()`; `.join()`.

    After it ends, `.result` holds run_dam's summary or `.error` the exception (a Cancelled one
    when cancelled; the checkpoint in OUT_DIR resumes it).
    """

    def __init__(self, config: DAMConfig, root: Path, out_dir: str | Path, *, resume: bool = True,
                 on_event: Optional[EventCallback] = None):
        self.config, self.root, self.out_dir, self.resume = config, root, Path(out_dir), resume
        self.events: list[Event] = []
        self._forward = on_event
        self.token = CancelToken()
        self.result: Optional[dict[str, Any]] = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="dam-search", daemon=True)

    def _on_event(self, e: Event) -> None:
        self.events.append(e)
        if self._forward:
            self._forward(e)

    def _run(self) -> None:
        try:
            self.result = run_dam(self.config, self.root, self.out_dir, on_event=self._on_event, cancel=self.token,
                                  resume=self.resume)
        except BaseException as err:  # noqa: BLE001 - reported through .error
            self.error = err

    def start(self) -> "DAMJob":
        self.thread.start()
        return self

    def cancel(self) -> None:
        self.token.cancel()

    def join(self, timeout: Optional[float] = None) -> "DAMJob":
        self.thread.join(timeout)
        return self

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()
