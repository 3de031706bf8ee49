"""DAM as a search of the one program (`mergecore.search.base`): models, data D_i, teachers, training.

    from mergecore.search.dam import load_dam_config, run_dam
    cfg, root = load_dam_config("dam.yml")               # the YAML: mergecore.search.dam.config
    summary = run_dam(cfg, root, "out/", on_event=print)  # out/recipe.yml replays with `mergecore merge`

Outputs in OUT_DIR: `dam_coefficients.safetensors` (raw coefficients, one entry per merged
tensor), `recipe.yml` (method `dam`, replayable with `mergecore merge`), `result.json` (the
result's validation scores, every candidate's, timings, memory, config; with a replay, the scores
of OUT_DIR/model), `events.jsonl`, `dam_log.jsonl` (one line per step and evaluation) and
`dam_checkpoint.safetensors` (resume state: tensors and JSON, no pickle). The coefficients file
and the recipe are also rewritten at every checkpoint (with the best state so far), so a
cancelled run leaves a usable recipe.

With validation tasks (`eval_tasks`, default `train_tasks`), the run starts from the uniform merge
that scores best on all of them, keeps the best state by its periodic evaluations, stops after
`patience` evaluations without a better score, and returns whichever of the best state, the last
state and the uniform merges scores highest on all of eval_tasks (`mergecore.search.dam.keep`).
"""

from __future__ import annotations

import gc
import re
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from mergecore.errors import MergeError
from mergecore.events import CancelToken, Event, EventCallback
from mergecore.search.base import EvalSpec, Found, Program, SearchRun, run_search
from mergecore.search.config import config_file, load_config, model_ref
from mergecore.eval.training import pair_models_with_tasks  # noqa: F401 - moved down; re-exported for the app
from mergecore.search.dam.config import COEF_FILE, DAMConfig, ModelSpec, TaskList, dam_recipe

__all__ = ["COEF_FILE", "DAM", "DAMConfig", "DAMJob", "DAMRun", "dam_recipe", "load_dam_config",
           "pair_models_with_tasks", "prepare_dam", "run_dam"]


def _task_source(spec: TaskList, root: Path, where: str) -> TaskList:
    """A tasks file (resolved and checked) or an inline task list (as written)."""
    return str(config_file(spec, root, f"{where} file")) if isinstance(spec, str) else spec


def _load_task_list(spec: TaskList, root: Path, where: str) -> list:
    from mergecore.eval.tasks import load_tasks, task_from_dict, unique_tasks

    if isinstance(spec, str):
        return load_tasks(spec)
    if not spec:
        raise MergeError(f"{where}: the task list is empty")
    return unique_tasks([task_from_dict(t, root, f"{where}[{i}]") for i, t in enumerate(spec)], where)


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


class DAM:
    """A DAM search from its config: paths resolved against `root` and checked; nothing loaded."""

    kind: ClassVar[str] = "dam"
    config_class: ClassVar[type[DAMConfig]] = DAMConfig

    def __init__(self, config: DAMConfig, root: Path):
        cfg = self.config = config
        self.root = root
        self.refs = [model_ref(r, root) for r in cfg.model_refs()]
        if len(set(self.refs)) != len(self.refs):
            raise MergeError("models lists the same model twice; each merge input needs its own entry")
        self.include_base = cfg.include_base
        if cfg.base_model is None:  # the first model supplies the unmerged tensors and is merged too
            self.base, self.include_base, self.inputs = self.refs[0], True, self.refs[1:]
        else:
            self.base, self.inputs = model_ref(cfg.base_model, root), self.refs
            if self.base in self.refs:
                raise MergeError("the base_model is also listed under models; list it only as base_model "
                                 "(set include_base: true to merge it as an input too)")
        self.train_tasks = _task_source(cfg.train_tasks, root, "train_tasks")
        self.eval_tasks = self.train_tasks if cfg.eval_tasks is None else _task_source(cfg.eval_tasks, root,
                                                                                      "eval_tasks")
        self.eval_label = cfg.eval_tasks if cfg.eval_tasks is not None else cfg.train_tasks
        self.final = None
        if cfg.final_tasks is not None:
            tasks = _task_source(cfg.final_tasks, root, "final_tasks")
            self.final = EvalSpec(tasks if isinstance(tasks, str) else _load_task_list(tasks, root, "final_tasks"),
                                  seed=cfg.seed, batch_size=cfg.eval_batch_size,
                                  label=cfg.final_tasks if isinstance(cfg.final_tasks, str) else "inline")

    def sources(self) -> list[str]:
        return [self.base, *self.refs]

    def run(self, run: SearchRun) -> Found:
        return self.prepare(run).train()

    def prepare(self, run: SearchRun, program: Optional[Program] = None) -> "DAMRun":
        """Load the models and the data, cache the teachers, build the loop (nothing trained yet)."""
        from mergecore.io.source import ModelSource, resolve_model_path
        from mergecore.search.dam.data import task_data
        from mergecore.search.dam.merger import Merger, assign_checkpoint_names, find_slots
        from mergecore.search.dam.keep import uniform_starts
        from mergecore.search.dam.search import DAMSearch

        t_start = time.time()
        cfg, emit = self.config, run.emit
        paths = {r: resolve_model_path(r) for r in [self.base, *self.refs]}
        train_tasks = _pair_tasks(cfg, _load_task_list(self.train_tasks, self.root, "train_tasks"))
        eval_tasks = _load_task_list(self.eval_tasks, self.root, "eval_tasks")

        # the resident model (changed at every evaluation: a copy of its own) and the merged tensors
        emit(Event("dam.loading", {"models": self.refs, "base": self.base}))
        module = run.pool.fresh_model(paths[self.base]).requires_grad_(False)
        heads = {p for t in [*train_tasks, *eval_tasks] if (p := t.head_prefix()) is not None}
        head_names = sorted(n for n, _ in module.named_parameters() if any(n.startswith(p) for p in heads))
        slots = find_slots(module, granularity=cfg.granularity, merge_embeddings=cfg.merge_embeddings,
                           merge_norms=cfg.merge_norms, lm_head=cfg.lm_head,
                           exclude=list(cfg.exclude) + ["^" + re.escape(n) + "$" for n in head_names])
        src = ModelSource(self.base, path=paths[self.base])
        try:
            slots = assign_checkpoint_names(slots, module, src)
        finally:
            src.close()
        merger = Merger(slots, n_models=len(self.inputs), transform=cfg.transform, form=cfg.form,
                        include_base=self.include_base, init=cfg.init)
        if merger.needs_base:
            merger.set_base(dict(module.named_parameters()))

        # D_i
        train = EvalSpec(list(train_tasks), seed=cfg.seed, batch_size=cfg.eval_batch_size,
                         processor_from=str(paths[self.base]))
        res = train.evaluator(run.pool).resources(module, paths[self.base])
        datas = []
        for i, t in enumerate(train_tasks):
            run.cancel.check()
            datas.append(task_data(t, res, module, max_examples=cfg.examples_per_task, seed=cfg.seed, index=i,
                                   max_length=cfg.max_length))
        emit(Event("dam.data", {"tasks": {d.name: len(d) for d in datas},
                                "rows": {d.name: d.rows_total for d in datas}}))
        teachers, teacher_params = self._teachers(run, module, merger, datas, paths)

        # evaluation of the merged model (periodic on a subset, the last one on all of eval_tasks)
        evaluate = final = None
        if eval_tasks:
            from mergecore.search.dam.search import Evaluate

            periodic = EvalSpec(eval_tasks, subset=cfg.eval_subset, seed=cfg.seed, batch_size=cfg.eval_batch_size,
                                processor_from=str(paths[self.base]), label=self._eval_label())
            # the result is chosen on all of eval_tasks, whatever part the periodic evaluations score
            final = periodic if cfg.eval_subset is None else EvalSpec(
                _load_task_list(self.eval_tasks, self.root, "eval_tasks"), seed=cfg.seed,
                batch_size=cfg.eval_batch_size, processor_from=str(paths[self.base]), label=self._eval_label())
            evaluate = Evaluate(periodic.evaluator(run.pool), final.evaluator(run.pool), run.cancel)

        rows = ([self.base] if self.include_base else []) + self.inputs
        recipe = dam_recipe(self.base, self.inputs, cfg, self.include_base)

        def write_recipe(search: DAMSearch) -> None:
            from mergecore.methods.dam import save_coefficients

            meta = {"transform": cfg.transform, "form": cfg.form, "include_base": self.include_base,
                    "granularity": cfg.granularity, "rows": rows, "step": search.step, "loss": cfg.loss.kind}
            raw = search.result_state()
            save_coefficients(run.out / COEF_FILE, {s.ckpt: raw[s.name] for s in slots}, meta)
            recipe.save(run.out / "recipe.yml")

        search = DAMSearch(module, merger, datas, cfg.settings(), evaluate=evaluate,
                           teacher_params=teacher_params if teachers["mode"] == "on_the_fly" else None,
                           out_dir=run.out, on_event=emit, cancel=run.cancel,
                           identity=cfg.identity(self.base, self.refs, self.include_base), on_checkpoint=write_recipe,
                           replay_history=run.replay_history, starts=uniform_starts(
                               cfg.form, self.include_base, len(self.inputs), cfg.transform, cfg.init,
                               cfg.optimizer.clamp), choose_start=cfg.init is None,
                           periodic_is_full=cfg.eval_subset is None, tasks=self._eval_label())
        return DAMRun(search, module, self, run, program, recipe, final, teachers, t_start)

    def _eval_label(self) -> str:
        return self.eval_label if isinstance(self.eval_label, str) else "inline"

    def _teachers(self, run: SearchRun, module, merger, datas: list, paths: dict) -> tuple[dict[str, Any], list]:
        """Source model i's outputs on D_i: cached once (full logits for small vocabularies, top-k
        otherwise), or its tensors kept to compute them on the fly; the merger gets the sources."""
        from mergecore.io.writer import parse_size
        from mergecore.search.dam.data import compute_teacher, run_model

        cfg = self.config
        width = _output_width(module)
        top_k = cfg.teacher_top_k if width > cfg.full_logits_max_vocab else None
        est = 0
        for d in datas:
            w = len(d.classes) if d.classes is not None else width
            est += d.rows_total * (top_k * 8 if top_k and top_k < w else w * 4)
        mode = cfg.teachers
        if mode == "auto":
            mode = "cache" if est <= parse_size(cfg.teacher_cache_budget) else "on_the_fly"
        if cfg.loss.kind not in ("kl", "mse"):
            mode = "none"
        teacher_params: list = [None] * len(datas)
        t0 = time.time()
        for i, r in enumerate(self.refs):  # model r is paired with D_i
            run.cancel.check()
            resident = self.config.base_model is None and r == self.base  # the first model is also the resident one
            if resident:  # copies: the resident model's tensors are overwritten before each evaluation
                model = module
                tensors = {n: p.detach().clone() for n, p in module.named_parameters()}
            else:  # read once and dropped: the merger keeps its tensors
                model = run.pool.fresh_model(paths[r]).requires_grad_(False)
                tensors = dict(model.named_parameters())
            d = datas[i]
            if mode == "cache":
                run.event("dam.teacher", {"task": d.name, "model": r, "examples": len(d)})
                d.teacher = compute_teacher(d, lambda kw, m=model, h=d.head: run_model(m, h, kw),
                                            batch_size=cfg.eval_batch_size, top_k=top_k,
                                            max_tokens=cfg.max_tokens_per_backward)
            elif mode == "on_the_fly":
                sd = dict(model.state_dict(keep_vars=False))
                teacher_params[i] = {k: (v.detach().clone() if resident else v.detach()) for k, v in sd.items()}
            if resident:
                merger.set_base(tensors)
            else:
                merger.add_source(tensors, r)
            del model, tensors
            gc.collect()
        teachers = {"mode": mode, "bytes": sum(d.teacher.nbytes for d in datas if d.teacher is not None),
                    "top_k": top_k if mode == "cache" else None, "seconds": time.time() - t0}
        run.event("dam.teachers", dict(teachers))
        return teachers, teacher_params


@dataclass
class DAMRun:
    """A prepared DAM search: models, data and teachers loaded; `run()` trains and writes the results
    (`train()` only trains). After it, `module` is the resident model holding the merged weights."""

    search: Any  # DAMSearch
    module: Any
    dam: DAM
    ctx: SearchRun
    program: Optional[Program]
    recipe: Any
    final_eval: Optional[EvalSpec]
    teachers: dict[str, Any]
    started: float

    def run(self, resume: bool = True) -> dict[str, Any]:
        """Train, then write recipe.yml and result.json (replayed when the config has final tasks)."""
        self.ctx.resume = resume
        if self.program is None:
            raise MergeError("this DAM run was prepared without its program; call train()")
        try:
            found = self.train()
        except BaseException:
            self.program.close()
            raise
        return self.program.finish(found)

    def train(self) -> Found:
        search, cfg = self.search, self.dam.config
        search.clock.started = self.started  # teachers and loading count too
        if self.ctx.resume:
            search.try_resume()
        merger = search.merger
        self.ctx.event("dam.start", {"step": search.step, "steps": cfg.steps, "coefficients": merger.num_coefficients(),
                                     "tensors": len(merger.slots), "teachers": self.teachers["mode"]})
        search.run()
        chosen = validation = None
        if search.last_eval is not None:  # validation tasks: the result is chosen on all of them
            chosen, validation = search.choose()
        merger.write_into(self.module)
        if search.on_checkpoint:  # the coefficients file and recipe.yml now hold the result
            search.on_checkpoint(search)
        ev = None if chosen is None else {
            "tasks": self.dam._eval_label(), "step": chosen.info.get("step"), "mean": chosen.mean,
            "scores": chosen.scores, "final": True, "label": chosen.label, "source": chosen.source}
        summary: dict[str, Any] = {
            "eval": ev,
            "validation": validation,
            "start": search.start,
            "best_step": search.kept.step,
            "stopped_early": search.kept.stopped,
            "evals": search.evals,
            "last_step": search.history[-1] if search.history else None,
            "steps": search.step,
            "examples_seen": search.examples_seen,
            "tokens_seen": search.tokens_seen,
            "train_seconds": search.train_seconds,
            "teacher_seconds": self.teachers["seconds"],
            "eval_seconds": search.eval_seconds,
            "seconds": search.clock.elapsed(),  # the whole run's, across resumes
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "coefficients": merger.num_coefficients(),
            "tensors": [s.ckpt for s in merger.slots],
            "teachers": {k: v for k, v in self.teachers.items() if k != "seconds"},
            "recipe": str(self.ctx.out / "recipe.yml"),
            "config": cfg.model_dump(mode="json"),
        }
        return Found(self.recipe, summary, {"recipe": summary["recipe"], "eval": summary["eval"]},
                     self.final_eval if chosen else None, chosen.mean if chosen else None)


SEARCH = DAM


def run_dam(config: DAMConfig, root: Path, out_dir: Union[str, Path], **options: Any) -> dict[str, Any]:
    """Run (or resume) a DAM search into `out_dir`; `options` as `mergecore.search.base.run_search`'s."""
    return run_search(DAM(config, root), out_dir, **options)


def prepare_dam(config: DAMConfig, root: Path, out_dir: Union[str, Path], *, on_event: Optional[EventCallback] = None,
                cancel: Optional[CancelToken] = None, replay: bool = False) -> DAMRun:
    """Claim `out_dir` and load everything; `.run()` on the result trains and writes the results."""
    dam = DAM(config, root)
    program = Program(dam, out_dir, on_event=on_event, cancel=cancel, replay=replay)
    try:
        return dam.prepare(program.run, program)
    except BaseException:
        program.close()
        raise


def load_dam_config(path: Union[str, Path]) -> tuple[DAMConfig, Path]:
    return load_config(path, DAMConfig)


class DAMJob:
    """A DAM search in a background thread: `.events` fills as it runs; `.cancel()`; `.join()`.

    After it ends, `.result` holds run_dam's summary or `.error` the exception (a Cancelled one
    when cancelled; the checkpoint in OUT_DIR resumes it).
    """

    def __init__(self, config: DAMConfig, root: Path, out_dir: Union[str, Path], *, resume: bool = True,
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
