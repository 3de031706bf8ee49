"""Collecting the statistics of data-informed merges: each model run on its own task's inputs.

    from mergecore.stats import collect_stats
    collect_stats("gram", "tasks.yml", ["ft/a", "ft/b"], "stats.safetensors", base="base", examples=256)

`gram`: forward hooks on every linear map (torch Linear, transformers Conv1D) add up XᵀX of its
inputs over all rows (an image's tokens, or an LM's non-pad tokens); `fisher`: the diagonal Fisher
information of every floating parameter from per-example gradients; `gram_plusplus`: RegMean++'s
Gram matrices through the merged earlier layers (`mergecore.stats.sequential`). Labels are never
read: a task gives only its inputs (`Task.training_inputs`). The file layout is
`mergecore.stats.store`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from mergecore.errors import MergeError, clip
from mergecore.eval.kind import call_with_head
from mergecore.eval.training import TaskData, pair_models_with_tasks, task_data
from mergecore.events import CancelToken
from mergecore.models import ModelPool
from mergecore.stats.hooks import GramHooks, StatsProgress, forward, linear_modules, to_device, unique_names
from mergecore.stats.store import KINDS, is_stats_file, tensor_key, write_stats

EXACT_MAX_CLASSES = 32  # up to this many classes the Fisher takes the exact expectation over them


def stats_kind(name: str) -> str:
    """A statistics kind from a kind or a method name (through `MergeMethod.stats`)."""
    if name in KINDS:
        return name
    from mergecore.methods import all_methods

    method = all_methods().get(name)
    if method is None or method.stats is None:
        informed = [m.name for m in all_methods().values() if m.stats]
        raise MergeError(f"unknown statistics '{clip(name, 60)}': give one of {', '.join(KINDS)} or a data-informed "
                         f"method ({', '.join(informed) or 'none'})")
    return method.stats


def check_stats_out(out: str | Path, sources: Sequence[Path], overwrite: bool = False) -> Path:
    """Where a statistics file may go: a new path, or one this tool wrote (with `overwrite`); never
    inside a model folder (a .safetensors there would read as weights). One-line errors."""
    target = Path(out).expanduser().resolve()
    for s in sources:
        if s == target or s in target.parents:
            raise MergeError(f"statistics file {target} would be inside the model folder {s}; choose another path")
    if target.exists():
        if target.is_dir():
            raise MergeError(f"{target} is a folder; give the statistics file's path (e.g. stats.safetensors)")
        if not is_stats_file(target):
            raise MergeError(f"{target} exists and was not written by mergecore collect-stats; choose a new file")
        if not overwrite:
            raise MergeError(f"{target} already holds statistics; pass --overwrite to replace it")
    probe = target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise MergeError(f"cannot write {target}: {probe} is a file, not a folder")
    return target


@dataclass
class Source:
    """One model to collect for: its ref, folder, task and (once loaded) its data."""

    ref: str
    path: Path
    task: Any
    data: Optional[TaskData] = None


def fisher_of_model(model: nn.Module, data: TaskData, names: dict[str, str], device: str, seed: int,
                    tick: Callable[[int], None]) -> tuple[dict[str, torch.Tensor], str]:
    """Diagonal Fisher F = E_x E_{y~p(y|x)}[(∇ log p(y|x))²] of the parameters `names`, one example at
    a time (per-example gradients, as Matena & Raffel define it; FusionBench squares a batch's
    summed gradient instead). With at most EXACT_MAX_CLASSES classes the expectation over y is
    exact (one backward pass per class, weighted by p(y|x)); above that, and for an LM's tokens,
    y is sampled from the model (one label per row, seeded): an unbiased estimate that stays one
    backward pass per example. Never the empirical Fisher: the task's labels are not read.
    Keyed by checkpoint name (`names`: state key -> checkpoint name)."""
    params = [(names[n], p) for n, p in model.named_parameters() if n in names and p.is_floating_point()]
    acc: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    estimator = "exact"

    def add(grads: Sequence[Optional[torch.Tensor]], w: float) -> None:
        for (n, _), g in zip(params, grads):
            if g is not None:
                sq = g.detach().float().pow(2).mul_(w)
                acc[n] = sq if n not in acc else acc[n].add_(sq)

    tensors = [p for _, p in params]
    for k in range(len(data)):
        logits, mask = forward(model, data, [k], device)
        logp = torch.log_softmax(data.rows(logits, mask).float(), dim=-1)  # [rows, classes]
        if data.kind != "lm" and logp.shape[0] == 1 and logp.shape[1] <= EXACT_MAX_CLASSES:
            probs = logp.detach().exp()[0]
            for c in range(logp.shape[1]):
                add(torch.autograd.grad(logp[0, c], tensors, retain_graph=c + 1 < logp.shape[1], allow_unused=True),
                    float(probs[c]))
        else:
            estimator = "sampled"
            y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).squeeze(1).to(logp.device)
            add(torch.autograd.grad(logp.gather(1, y[:, None]).sum(), tensors, allow_unused=True), 1.0)
        tick(1)
    return {n: f / max(1, len(data)) for n, f in acc.items()}, estimator


def load_sources(refs: Sequence[str], tasks_file: str | Path, search_dirs: tuple[Path, ...] = ()) -> list[Source]:
    """Each model with its task (paired as DAM pairs them: by name, by head, else in order)."""
    from mergecore.eval.tasks import load_tasks
    from mergecore.io.source import resolve_model_path

    if not Path(tasks_file).expanduser().is_file():
        raise MergeError(f"tasks file not found: {tasks_file}")
    if not refs:
        raise MergeError("collect-stats needs at least one model (--models)")
    if len(set(refs)) != len(refs):
        raise MergeError("the same model is listed twice; each model needs its own statistics")
    paths = [resolve_model_path(r, search_dirs) for r in refs]
    names = [Path(r).name if p.is_dir() and Path(r).expanduser().is_dir() else r for r, p in zip(refs, paths)]
    tasks = load_tasks(tasks_file)
    by_name = {t.name: t for t in tasks}
    paired = pair_models_with_tasks(names, [str(p) for p in paths], str(tasks_file))
    return [Source(r, p, by_name[e["task"]] if isinstance(e, dict) else tasks[i])
            for i, (r, p, e) in enumerate(zip(refs, paths, paired))]


def collect_stats(kind: str, tasks_file: str | Path, models: Sequence[str], out: str | Path, *,
                  base: Optional[str] = None, examples: int = 256, batch_size: int = 16, device: str = "cpu",
                  seed: int = 0, progress: Optional[StatsProgress] = None, cancel: Optional[CancelToken] = None,
                  overwrite: bool = False, ratio: Optional[float] = None, pool: Optional[ModelPool] = None,
                  search_dirs: tuple[Path, ...] = ()) -> Path:
    """Collect `kind` statistics ("gram", "fisher", "gram_plusplus", or a method name) for `models`,
    each on its own task of `tasks_file` (at most `examples` examples), into the safetensors file
    `out` (atomically: nothing is written on failure or cancel). `base` supplies the tokenizer /
    image preprocessing when the models lack them. `ratio` is RegMean++'s α for its in-memory
    merges (default: the method's). Relative model paths resolve against the working directory,
    then `search_dirs` (a recipe's folder); the file records each model as given and its folder,
    which is how a method matches it to a recipe's models. Returns the file's path; one-line MergeError on bad input."""
    from mergecore.eval.evaluator import Evaluator
    from mergecore.io.source import ModelSource, resolve_model_path

    kind = stats_kind(kind)
    cancel = cancel or CancelToken()
    report = progress or (lambda *a: None)
    if examples < 1 or batch_size < 1:
        raise MergeError("--examples and --batch-size must be at least 1")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but no CUDA device is available")
    sources = load_sources(list(models), tasks_file, search_dirs)
    base_path = resolve_model_path(base, search_dirs) if base else None
    target = check_stats_out(out, [s.path for s in sources] + ([base_path] if base_path else []), overwrite)
    pool = pool or ModelPool(keep_models=False)
    evaluator = Evaluator([s.task for s in sources], batch_size=batch_size, device=device,
                          processor_from=base_path, pool=pool)
    loaded: list[nn.Module] = []
    for i, s in enumerate(sources):
        cancel.check()
        report("load", i, len(sources), f"loading {s.ref} and task '{s.task.name}'")
        model = pool.fresh_model(s.path, device=device)
        res = evaluator.resources(model, None if base_path else s.path)
        s.data = task_data(s.task, res, model, max_examples=examples, seed=seed, index=i, max_length=None)
        loaded.append(model)
    total = sum(len(s.data) for s in sources if s.data is not None)
    meta: dict[str, Any] = {
        "kind": kind, "models": [{"name": s.ref, "path": str(s.path)} for s in sources],
        "tasks": [s.task.name for s in sources], "examples": [len(s.data) for s in sources if s.data],
        "rows": [s.data.rows_total for s in sources if s.data], "seed": seed}
    checkpoint = [_names(m, ModelSource(s.ref, path=s.path)) for s, m in zip(sources, loaded)]
    tensors: dict[str, torch.Tensor] = {}
    done = 0

    def tick(n: int, message: str) -> None:
        nonlocal done
        done += n
        report("collect", done, total, message)
        cancel.check()

    if kind == "gram_plusplus":
        from mergecore.stats.sequential import collect_plusplus

        tensors, extra = collect_plusplus(loaded, [s.data for s in sources], checkpoint, device=device,
                                          batch_size=batch_size, ratio=ratio, progress=report, cancel=cancel)
        meta.update(extra)
    for i, (s, model) in enumerate(zip(sources, loaded) if kind != "gram_plusplus" else ()):
        what = f"model {i + 1}/{len(sources)} {s.ref} on '{s.task.name}'"
        data = s.data
        assert data is not None
        if kind == "gram":
            mods = linear_modules(model, checkpoint[i])
            if not mods:
                raise MergeError(f"model {s.ref} has no linear layer whose weight is in its checkpoint; RegMean needs them")
            with torch.no_grad(), GramHooks(mods) as hooks:
                for start in range(0, len(data), batch_size):
                    idx = list(range(start, min(len(data), start + batch_size)))
                    kwargs, mask, _ = data.inputs(idx)
                    hooks.batch(mask.to(device) if mask is not None else None)
                    call_with_head(model, data.head, to_device(kwargs, device))
                    tick(len(idx), what)
            _merge_inputs(meta, hooks.inputs, s.ref)
            meta.setdefault("transposed", sorted(n for n, (_, t, _) in mods.items() if t))
            tensors.update({tensor_key(i, k): g for k, g in hooks.means().items()})
        else:
            model.eval().requires_grad_(True)
            fisher, estimator = fisher_of_model(model, data, checkpoint[i], device, seed + i,
                                                lambda n: tick(n, what))
            if not fisher:
                raise MergeError(f"model {s.ref}: no parameter got a gradient on task '{s.task.name}'")
            meta.setdefault("fisher_norm", []).append(math.sqrt(sum(float(f.pow(2).sum()) for f in fisher.values())))
            meta.setdefault("estimator", []).append(estimator)
            tensors.update({tensor_key(i, n): f for n, f in fisher.items()})
        loaded[i] = None  # type: ignore[call-overload]
    cancel.check()
    report("write", 0, 1, f"writing {target.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    path = write_stats(target, tensors, meta)
    report("write", 1, 1, f"wrote {target.name}")
    return path


def _names(model: nn.Module, src: Any) -> dict[str, str]:
    """{state key: checkpoint name} of a loaded model (transformers may rename modules on load)."""
    from mergecore.io.names import checkpoint_names

    try:
        return unique_names(checkpoint_names(model, src))
    finally:
        src.close()


def _merge_inputs(meta: dict[str, Any], inputs: dict[str, str], ref: str) -> None:
    """The weight -> Gram key map, the same for every model (same architecture), or an error."""
    have = meta.setdefault("inputs", dict(inputs))
    if have != inputs:
        raise MergeError(f"model {ref} does not have the same linear layers as the first model; statistics are "
                         f"collected for models of one architecture")
