"""DAM training data D_i (inputs of source model i's task) and source model i's outputs on it.

`TaskData` and `task_data` live in `mergecore.eval.training` (statistics collection uses them
too) and are re-exported here.

Inputs come from the evaluation tasks' own preparation (the evaluator's image preprocessing
and tokeniser), so what the merge trains on is exactly what the task scores; labels are never
used. Each task kind says what its inputs are (`Task.training_inputs`): e.g. a classification
task's images with its `classes` and its `head_from` head (used for both the merged model and
the teacher), an LM task's token chunks, a multiple-choice task's context + correct option.

Rows: the logits the losses compare, [M, V]: one row per example for classification, one per
non-pad token for LM data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from mergecore.eval.training import TaskData, task_data  # noqa: F401 - moved down; re-exported for DAM


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


def run_model(module: nn.Module, params: Optional[dict[str, torch.Tensor]], kwargs: dict[str, Any]) -> torch.Tensor:
    """Logits of `module` with `params` standing in for its own tensors (nothing modified)."""
    if params:
        out = torch.func.functional_call(module, params, args=(), kwargs=kwargs, strict=False)
    else:
        out = module(**kwargs)
    return out.logits


@torch.no_grad()
def compute_teacher(data: TaskData, forward: Callable[[dict[str, Any]], torch.Tensor], *, batch_size: int,
                    top_k: Optional[int], on_batch: Optional[Callable[[int], None]] = None,
                    max_tokens: Optional[int] = None) -> Teacher:
    """Run the teacher over all of D_i once and keep its rows (top-k of them when `top_k`), at most
    `batch_size` examples and `max_tokens` tokens (padded; `mergecore.search.dam.chunks`) per forward:
    a causal LM's full logits are tokens x vocabulary floats before the top-k."""
    from mergecore.search.dam.chunks import example_tokens, split

    values: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    n = len(data)
    use_topk = False
    for start in range(0, n, batch_size):
        batch = list(range(start, min(n, start + batch_size)))
        for idx in split(batch, example_tokens(data, batch), max_tokens) if max_tokens else [batch]:
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
            del logits, per
        if on_batch:
            on_batch(min(n, start + batch_size))
    return Teacher(values, indices if use_topk else None)
