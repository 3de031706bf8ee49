"""DAM training data D_i (inputs of source model i's task) and source model i's outputs on it.

Inputs come from the evaluation tasks' own preparation (the evaluator's image preprocessing
and tokeniser), so what the merge trains on is exactly what the task scores; labels are never
used. Each task kind says what its inputs are (`Task.training_inputs`): e.g. a classification
task's images with its `classes` and its `head_from` head (used for both the merged model and
the teacher), an LM task's token chunks, a multiple-choice task's context + correct option.

Rows: the logits the losses compare, [M, V]: one row per example for classification, one per
non-pad token for LM data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from mergecore.errors import MergeError
from mergecore.eval.kind import Resources, Task
from mergecore.eval.prep import pad_batch


@dataclass
class Teacher:
    """Cached outputs of source model i on D_i: per example, its rows (full logits or top-k)."""

    values: list[torch.Tensor]
    indices: Optional[list[torch.Tensor]] = None  # top-k vocabulary ids (int32), None for full logits

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        v = torch.cat([self.values[k] for k in idx])
        i = torch.cat([self.indices[k] for k in idx]) if self.indices is not None else None
        return v, i

    @property
    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.values)
        if self.indices is not None:
            n += sum(t.numel() * t.element_size() for t in self.indices)
        return n


@dataclass
class TaskData:
    name: str
    kind: str  # image | text_cls | lm
    items: Any  # pixel tensor [n, C, H, W] or a list of token-id lists
    pad_id: int = 0
    classes: Optional[torch.Tensor] = None
    head: Optional[dict[str, torch.Tensor]] = None
    teacher: Optional[Teacher] = None
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


def run_model(module: nn.Module, params: Optional[dict[str, torch.Tensor]], kwargs: dict[str, Any]) -> torch.Tensor:
    """Logits of `module` with `params` standing in for its own tensors (nothing modified)."""
    if params:
        out = torch.func.functional_call(module, params, args=(), kwargs=kwargs, strict=False)
    else:
        out = module(**kwargs)
    return out.logits


@torch.no_grad()
def compute_teacher(data: TaskData, forward: Callable[[dict[str, Any]], torch.Tensor], *, batch_size: int,
                    top_k: Optional[int], on_batch: Optional[Callable[[int], None]] = None) -> Teacher:
    """Run the teacher over all of D_i once and keep its rows (top-k of them when `top_k`)."""
    values: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    n = len(data)
    use_topk = False
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        kwargs, mask, _ = data.inputs(idx)
        logits = forward(kwargs).float()
        if data.kind == "lm":
            per = [logits[j, : int(mask[j].sum())] for j in range(len(idx))]
        else:
            r = data.rows(logits, None)
            per = [r[j: j + 1] for j in range(len(idx))]
        data.width = per[0].shape[-1]
        use_topk = bool(top_k) and top_k < data.width
        for rows in per:
            if use_topk:
                v, i = rows.topk(top_k, dim=-1)
                values.append(v.contiguous().clone())
                indices.append(i.to(torch.int32).contiguous())
            else:
                values.append(rows.contiguous().clone())
        if on_batch:
            on_batch(min(n, start + batch_size))
    return Teacher(values, indices if use_topk else None)
