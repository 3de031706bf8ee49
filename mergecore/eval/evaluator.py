"""The Evaluator: score an in-memory model or a checkpoint folder on a list of tasks.

Built once and reused (searches call `evaluate` on hundreds of candidates): the data of each
task is read once, preprocessed / tokenised inputs are cached per task, classifier heads named
by `head_from` are read once, and a subset of each task (a ratio or a count, drawn with a
fixed seed) can be scored instead of the whole task. `subset_index=k` picks the k-th of the
disjoint subsets of one seeded permutation, so a search can cycle through the data (RMM's
dynamic average reward resets when the subsets wrap around).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from mergecore.errors import MergeError
from mergecore.eval.kind import Resources, Task
from mergecore.eval.tasks import load_tasks
from mergecore.events import CancelToken, Event
from mergecore.models import ImagePrep, ModelPool

ModelOrPath = Union[torch.nn.Module, str, Path]


def staged_fraction(index: int, total: int, done: float, steps: float) -> float:
    """How much of a piece of work is done: `index` of its `total` stages, and `done` of the
    `steps` of the current one (a stage without steps counts as done)."""
    if not total:
        return 1.0
    return (index + (done / steps if steps else 1.0)) / total


@dataclass
class EvalProgress:
    """Progress of an evaluation: which task, examples done in it, tasks done overall."""

    task: str
    task_index: int
    tasks_total: int
    examples_done: int
    examples_total: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return staged_fraction(self.task_index, self.tasks_total, self.examples_done, self.examples_total)

    def as_event(self) -> Event:
        return Event("eval.progress", {**asdict(self), "fraction": self.fraction})


EvalProgressCallback = Callable[[EvalProgress], None]


@dataclass
class TaskResult:
    name: str
    kind: str
    metric: str
    score: float
    metrics: dict[str, float]
    n: int
    seconds: float


@dataclass
class EvalResult:
    """Per-task results and their mean score (every task's score is higher-is-better)."""

    tasks: list[TaskResult]
    seconds: float
    subset_index: int = 0
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> dict[str, float]:
        return {t.name: t.score for t in self.tasks}

    @property
    def mean(self) -> float:
        return float(np.mean([t.score for t in self.tasks])) if self.tasks else float("nan")

    def __getitem__(self, name: str) -> TaskResult:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "mean": self.mean, "seconds": self.seconds, "subset_index": self.subset_index,
                "tasks": {t.name: {"kind": t.kind, "metric": t.metric, "score": t.score, "n": t.n,
                                   "seconds": t.seconds, "metrics": t.metrics} for t in self.tasks}}

    def to_frame(self):
        """A pandas table: one row per task (score, examples, seconds, other metrics) and the mean."""
        import pandas as pd

        rows = []
        for t in self.tasks:
            row = {"task": t.name, "kind": t.kind, "metric": t.metric, "score": t.score, "n": t.n, "seconds": t.seconds}
            row.update({k: v for k, v in t.metrics.items() if k != t.metric and k != "tokens"})
            rows.append(row)
        rows.append({"task": "mean", "kind": "", "metric": "", "score": self.mean,
                     "n": sum(t.n for t in self.tasks), "seconds": self.seconds})
        return pd.DataFrame(rows).set_index("task")

    def format_table(self) -> str:
        df = self.to_frame()
        return df.to_string(float_format=lambda v: f"{v:.4f}", na_rep="")


class Evaluator:
    """Scores models on tasks.

    `subset`: None (all examples), a float ratio in (0, 1], or an int count per task. `seed`
    fixes the subset permutation. `batch_size` is the default per task (a task's own
    `batch_size` wins). `processor_from`: a checkpoint folder whose tokenizer and image
    preprocessing are used for in-memory models (a checkpoint folder being evaluated supplies
    its own). `tokenizer` / `image_prep` override both. `device`: where checkpoints loaded from
    folders are put (in-memory models stay where they are). `pool`: where models, tokenizers,
    image preprocessing and heads come from (shared with a search or the app); by default the
    evaluator keeps its own, which holds no model.
    """

    def __init__(self, tasks: Union[Sequence[Task], str, Path], *, subset: Union[None, int, float] = None,
                 seed: int = 0, batch_size: int = 64, device: str = "cpu",
                 processor_from: Union[None, str, Path] = None, tokenizer: Any = None,
                 image_prep: Optional[ImagePrep] = None, pool: Optional[ModelPool] = None):
        self.tasks: list[Task] = load_tasks(tasks) if isinstance(tasks, (str, Path)) else list(tasks)
        if not self.tasks:
            raise MergeError("an evaluator needs at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise MergeError(f"task names must be unique: {', '.join(names)}")
        self.subset = _check_subset(subset)
        self.seed = int(seed)
        if batch_size < 1:
            raise MergeError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.device = device
        self.processor_from = Path(processor_from) if processor_from is not None else None
        self.tokenizer = tokenizer
        self.image_prep = image_prep
        self.pool = pool if pool is not None else ModelPool(keep_models=False)
        self._perms: dict[str, np.ndarray] = {}

    # -- subsets -------------------------------------------------------------------------------

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise MergeError(f"no task named '{name}' (tasks: {', '.join(t.name for t in self.tasks)})")

    def subset_size(self, task: Task) -> int:
        n = task.num_examples()
        if self.subset is None:
            return n
        if isinstance(self.subset, float):
            return max(1, min(n, int(round(self.subset * n))))
        return min(n, self.subset)

    def num_subsets(self, task: Optional[Task] = None) -> int:
        """How many disjoint subsets cover the task (the largest over tasks if none is named)."""
        tasks = [task] if task is not None else self.tasks
        return max(math.ceil(t.num_examples() / self.subset_size(t)) for t in tasks)

    def indices(self, task: Task, subset_index: int = 0) -> np.ndarray:
        """Sorted example positions scored for `task` in subset `subset_index` (deterministic)."""
        n = task.num_examples()
        k = self.subset_size(task)
        if k >= n:
            return np.arange(n)
        perm = self._perms.get(task.name)
        if perm is None:
            rng = np.random.default_rng([self.seed, zlib.crc32(task.name.encode())])
            perm = self._perms[task.name] = rng.permutation(n)
        chunks = math.ceil(n / k)
        j = subset_index % chunks
        sel = perm[j * k:(j + 1) * k]
        if len(sel) < k:  # the last subset is topped up from the start so every subset has k examples
            sel = np.concatenate([sel, perm[:k - len(sel)]])
        return np.sort(sel)

    # -- resources -----------------------------------------------------------------------------

    def resources(self, model: torch.nn.Module, folder: Optional[Path] = None, tokenizer: Any = None) -> Resources:
        """Tokenizer / image preprocessing / heads for `model` (evaluated from `folder`, if any)."""
        source = folder or self.processor_from or _model_folder(model)

        def get_tokenizer(override: Optional[Path]):
            if tokenizer is not None:
                return tokenizer
            if override is not None:
                return self.pool.tokenizer(override)
            if self.tokenizer is not None:
                return self.tokenizer
            if source is None:
                raise MergeError("this task needs a tokenizer: evaluate a checkpoint folder, or give the evaluator "
                                 "processor_from=FOLDER or tokenizer=...")
            return self.pool.tokenizer(source)

        def get_prep() -> ImagePrep:
            if self.image_prep is not None:
                return self.image_prep
            return self.pool.image_prep(source) if source is not None else ImagePrep.from_model(model)

        return Resources(get_tokenizer, get_prep, self.pool.head)

    # -- evaluation ----------------------------------------------------------------------------

    def prepare(self, model_or_path: Optional[ModelOrPath] = None) -> None:
        """Load and preprocess every task's data now (otherwise done on first use)."""
        model, folder = (None, None)
        if model_or_path is not None:
            model, folder = self._load(model_or_path)
        res = self.resources(model, folder, None) if model is not None else self.resources(
            torch.nn.Module(), self.processor_from, None)
        for t in self.tasks:
            t.prepare(res)

    def _load(self, model_or_path: ModelOrPath) -> tuple[torch.nn.Module, Optional[Path]]:
        if isinstance(model_or_path, torch.nn.Module):
            return model_or_path, None
        path = Path(model_or_path).expanduser()
        return self.pool.model(path, device=self.device), path

    def evaluate(self, model_or_path: ModelOrPath, *, progress: Optional[EvalProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, subset_index: int = 0, tokenizer: Any = None,
                 tasks: Optional[Sequence[str]] = None) -> EvalResult:
        """Score a model (or a checkpoint folder) on the tasks (or the named ones)."""
        cancel = cancel or CancelToken()
        start = time.time()
        model, folder = self._load(model_or_path)
        chosen = [self.task(n) for n in tasks] if tasks is not None else self.tasks
        res = self.resources(model, folder, tokenizer)
        was_training = model.training
        model.eval()
        results: list[TaskResult] = []
        try:
            with torch.no_grad():
                for ti, task in enumerate(chosen):
                    cancel.check()
                    t0 = time.time()
                    prepared = task.prepare(res)
                    idx = self.indices(task, subset_index)
                    total = len(idx)

                    def on_batch(done: int, _task=task, _ti=ti, _total=total) -> None:
                        if progress:
                            progress(EvalProgress(_task.name, _ti, len(chosen), done, _total, time.time() - start))
                        cancel.check()

                    if progress:
                        progress(EvalProgress(task.name, ti, len(chosen), 0, total, time.time() - start))
                    metrics = task.score(model, prepared, idx, res, task.batch_size or self.batch_size, on_batch)
                    results.append(TaskResult(task.name, task.kind, task.metric, float(metrics[task.metric]),
                                              {k: float(v) for k, v in metrics.items()}, total, time.time() - t0))
        finally:
            if was_training:
                model.train()
        if progress and chosen:
            progress(EvalProgress(chosen[-1].name, len(chosen) - 1, len(chosen), results[-1].n, results[-1].n,
                                  time.time() - start))
        label = str(folder) if folder is not None else type(model).__name__
        return EvalResult(results, time.time() - start, subset_index, label)


def _check_subset(subset: Union[None, int, float]) -> Union[None, int, float]:
    if subset is None:
        return None
    if isinstance(subset, bool):
        raise MergeError("subset must be a ratio in (0, 1] or a count >= 1")
    if isinstance(subset, float):
        if not 0 < subset <= 1:
            raise MergeError(f"subset ratio must be in (0, 1], got {subset}")
        return None if subset == 1.0 else subset
    if isinstance(subset, (int, np.integer)):
        if subset < 1:
            raise MergeError(f"subset count must be at least 1, got {subset}")
        return int(subset)
    raise MergeError(f"subset must be a ratio in (0, 1] or a count >= 1, got {subset!r}")


def parse_subset(text: Optional[str]) -> Union[None, int, float]:
    """CLI form: '0.1' or '10%' is a ratio, '200' a count."""
    if text is None:
        return None
    t = text.strip()
    try:
        if t.endswith("%"):
            return _check_subset(float(t[:-1]) / 100)
        if any(c in t for c in ".eE"):
            return _check_subset(float(t))
        return _check_subset(int(t))
    except ValueError:
        raise MergeError(f"--subset: expected a ratio (0.1, 10%) or a count (200), got '{text}'") from None


def _model_folder(model: torch.nn.Module) -> Optional[Path]:
    for attr in ("name_or_path",):
        v = getattr(model, attr, None)
        if v and Path(str(v)).is_dir():
            return Path(str(v))
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "_name_or_path", None) if cfg is not None else None
    if v and Path(str(v)).is_dir():
        return Path(str(v))
    return None
