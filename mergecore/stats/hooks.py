"""Hooks and forward passes shared by the statistics collectors (`collect`, `sequential`)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from mergecore.eval.kind import call_with_head
from mergecore.eval.training import TaskData

# progress(stage, done, total, message): stage is "load", "collect" (done/total: examples, or
# layer passes for gram_plusplus) or "write"
StatsProgress = Callable[[str, int, int, str], None]


def unique_names(names: dict[str, str]) -> dict[str, str]:
    """{state key: checkpoint name} without tied tensors (two keys saved as one tensor, such as an
    LM head tied to the embeddings): their statistics would mix two different roles."""
    count: dict[str, int] = {}
    for ck in names.values():
        count[ck] = count.get(ck, 0) + 1
    return {k: ck for k, ck in names.items() if count[ck] == 1}


def linear_modules(model: nn.Module, names: dict[str, str]) -> dict[str, tuple[nn.Module, bool, str]]:
    """Checkpoint weight name -> (module, transposed, state key) for every Linear and Conv1D of the
    model whose weight the checkpoint holds (`names`: state key -> checkpoint name, untied)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()  # noqa: N806
    out = {}
    for name, m in model.named_modules():
        conv = isinstance(m, Conv1D) if Conv1D else False
        ck = names.get(f"{name}.weight")
        if (isinstance(m, nn.Linear) or conv) and ck is not None:
            out[ck] = (m, conv, f"{name}.weight")
    return out


class GramHooks:
    """Forward hooks that add XᵀX of each linear map's input rows. A weight whose input is the very
    tensor the previous linear map read (q/k/v, gate/up) shares that map's matrix."""

    def __init__(self, modules: dict[str, tuple[nn.Module, bool, str]]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.inputs: dict[str, str] = {}  # weight -> key of its Gram
        self.mask: Optional[torch.Tensor] = None
        self._last: Optional[tuple[torch.Tensor, str]] = None
        self._handles: list[Any] = []

    def __enter__(self) -> "GramHooks":
        for name, (m, *_) in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def batch(self, mask: Optional[torch.Tensor]) -> None:
        self.mask, self._last = mask, None

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            shared = self._last is not None and self._last[0] is x
            key = self.inputs.setdefault(name, self._last[1] if shared and self._last else name)
            self._last = (x, key)
            if key != name:  # its input was counted under the weight that read it first
                return
            rows = self.rows_of(x.detach())
            g = self.sums.get(key)
            if g is None:
                g = self.sums[key] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            g.addmm_(rows.t(), rows)
            self.rows[key] = self.rows.get(key, 0) + rows.shape[0]

        return hook

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """The input's rows: non-pad tokens where a token mask applies, else every position."""
        if self.mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            return x[self.mask.bool()].float()
        return x.reshape(-1, x.shape[-1]).float()

    def means(self) -> dict[str, torch.Tensor]:
        """Each Gram averaged over its rows (XᵀX / N, as FusionBench stores it)."""
        return {k: g / max(1, self.rows[k]) for k, g in self.sums.items()}


def to_device(kwargs: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def forward(model: nn.Module, data: TaskData, idx: list[int], device: str) -> tuple[Any, Optional[torch.Tensor]]:
    """The model's logits on examples `idx` of its data (the task's head standing in), and the mask."""
    kwargs, mask, _ = data.inputs(idx)
    kwargs = to_device(kwargs, device)
    out = call_with_head(model, data.head, kwargs)
    return out.logits, (mask.to(device) if mask is not None else None)
