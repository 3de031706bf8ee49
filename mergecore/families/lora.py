"""Low-rank adapters (LoRA) on a model's linear layers, trained and then folded back into the weights.

`add_lora` wraps the chosen `nn.Linear` modules (names ending in one of `targets`) so that
``y = W x + (alpha / r) * B A x`` with ``A`` (r x in) random and ``B`` (out x r) zero, and
freezes everything else; `fold_lora` writes ``W + (alpha / r) * B A`` back into each linear
layer and removes the wrappers, leaving a model with exactly the original parameter names and
shapes (so a LoRA-fine-tuned expert merges with its base like a fully fine-tuned one).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1:
            raise ValueError("LoRA rank must be at least 1")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        bound = 1 / math.sqrt(base.in_features)  # what kaiming_uniform_(a=sqrt(5)) gives, as in LoRA / peft
        a = torch.empty(rank, base.in_features, dtype=base.weight.dtype).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale


def add_lora(model: nn.Module, targets: Iterable[str], rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """Wrap every `nn.Linear` whose name ends in one of `targets`; freeze the rest. Returns the adapter parameters."""
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no linear layer is named like {', '.join(targets)}")
    params: list[nn.Parameter] = []
    for name in names:  # named_modules order: deterministic
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(getattr(parent, child), rank, alpha, gen)
        setattr(parent, child, wrapped)
        params += [wrapped.lora_A, wrapped.lora_B]
    return params


@torch.no_grad()
def fold_lora(model: nn.Module) -> int:
    """Fold every adapter into its linear layer and unwrap it; returns how many were folded."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, m in wrapped:
        m.base.weight.add_(m.delta().to(m.base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return len(wrapped)
