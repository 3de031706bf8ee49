"""What a merge may learn from: a task's training inputs (never its labels), for each source model.

`task_data` turns an evaluation task into `TaskData` (the task's own preparation: image
preprocessing or tokeniser, classes, `head_from` head; `Task.training_inputs` says what they
are), and `pair_models_with_tasks` says which task's inputs belong to which model. DAM trains on
them (`mergecore.search.dam`); `mergecore.stats` collects Gram matrices and Fisher information
from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from mergecore.errors import MergeError, short
from mergecore.eval.kind import Resources, Task
from mergecore.eval.prep import pad_batch


@dataclass
class TaskData:
    name: str
    kind: str  # image | text_cls | lm
    items: Any  # pixel tensor [n, C, H, W] or a list of token-id lists
    pad_id: int = 0
    classes: Optional[torch.Tensor] = None
    head: Optional[dict[str, torch.Tensor]] = None
    teacher: Any = None  # DAM's cached teacher outputs (mergecore.search.dam.data.Teacher)
    rows_total: int = 0  # rows over all examples (examples, or non-pad tokens)
    width: int = 0  # logits per row (classes or vocabulary), known after the first forward
    _perms: dict[int, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def inputs(self, idx: list[int]) -> tuple[dict[str, Any], Optional[torch.Tensor], int]:
        """(model kwargs, token mask or None, tokens in the batch)."""
        if self.kind == "image":
            return {"pixel_values": self.items[idx]}, None, 0
        ids, mask = pad_batch([self.items[k] for k in idx], self.pad_id, "right")
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "lm":
            kwargs["use_cache"] = False
        return kwargs, mask, int(mask.sum())

    def rows(self, logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.kind == "lm":
            return logits[mask.bool()]
        if self.classes is not None:
            return logits[:, self.classes]
        return logits

    def order(self, seed: int, index: int, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self._perms[epoch] = np.random.default_rng([seed, index, epoch, 7]).permutation(len(self))
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
        return perm

    def batch_indices(self, step: int, batch_size: int, seed: int, index: int) -> list[int]:
        """The examples of step `step`: a deterministic function of (seed, task, step), so a resumed
        run sees the same batches as an uninterrupted one. Epochs reshuffle."""
        n = len(self)
        b = min(batch_size, n)
        out = []
        for pos in range(step * b, (step + 1) * b):
            epoch, k = divmod(pos, n)
            out.append(int(self.order(seed, index, epoch)[k]))
        return out


def task_data(task: Task, res: Resources, model: nn.Module, *, max_examples: Optional[int], seed: int,
              index: int, max_length: Optional[int]) -> TaskData:
    """D_i from an evaluation task (`Task.training_inputs`: labels unused), at most `max_examples`
    of them (the first of a seeded permutation)."""
    got = task.training_inputs(res, model)
    items = got.items
    kind = "image" if got.pixels else ("lm" if got.rows == "token" else "text_cls")
    n = len(items)
    if n == 0:
        raise MergeError(f"{task.where()}: no training example (texts need at least 2 tokens)")
    sel = np.arange(n)
    if max_examples is not None and max_examples < n:
        sel = np.sort(np.random.default_rng([seed, index, 3]).permutation(n)[:max_examples])
    if kind == "image":
        items = items[torch.as_tensor(sel)]
    else:
        items = [list(items[k])[: max_length or None] for k in sel]
        if kind == "lm" and any(len(x) < 1 for x in items):
            items = [x for x in items if x]
    rows = len(items) if kind != "lm" else sum(len(x) for x in items)
    return TaskData(task.name, kind, items, got.pad_id, got.classes, got.head, rows_total=rows)


_MODEL_WORDS = {"expert", "experts", "model", "ft", "finetuned", "finetune", "fine", "tuned"}


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^0-9a-z]+", name.lower()) if w]


def task_named_like(model_name: str, task_names: list[str]) -> Optional[str]:
    """The first task whose name begins with the model's name once words like `expert` are dropped
    (`expert_code` -> `code_ppl`, `ft-legal` -> `legal`), or None: a family names its expert
    folders after the domain and its tasks after the domain and the measure."""
    stem = [w for w in _words(Path(model_name).name) if w not in _MODEL_WORDS]
    if not stem:
        return None
    for t in task_names:
        if _words(t)[: len(stem)] == stem:
            return t
    return None


def pair_models_with_tasks(names: list[str], paths: list[str], tasks_file: str) -> list[Any]:
    """A config's `models:` for models `names` (folders `paths`) from a tasks file, when the user
    named no task per model (the app's form): each model's D_i is the task of its name, else the
    task scored with its head (`head_from`), else the first task named like it
    (`task_named_like`: expert_code -> code_ppl), else the tasks in order when there are as many."""
    from mergecore.eval.tasks import load_tasks

    tasks = load_tasks(tasks_file)
    heads: dict[str, str] = {}
    for t in tasks:
        try:
            head = t.head_path() if hasattr(t, "head_path") else None
        except MergeError:
            head = None
        if head is not None:
            heads.setdefault(str(Path(head).resolve()), t.name)
    task_names = [t.name for t in tasks]
    paired = [n if n in task_names else heads.get(str(Path(p).resolve())) or task_named_like(n, task_names)
              for n, p in zip(names, paths)]
    if all(paired):
        return [{"model": p, "task": t} for p, t in zip(paths, paired)]
    if len(tasks) == len(names):
        return list(paths)
    lost = ", ".join(n for n, t in zip(names, paired) if not t)
    raise MergeError(f"no task for {lost}: each model is run on its own task's inputs; the tasks file has "
                     f"{short(task_names)} (a task pairs with the model of its name or its head_from)")
