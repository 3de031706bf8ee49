"""What a method costs beyond reading its inputs, for `--dry-run`: decompositions, flops, memory.

A method that does more than a few passes over its inputs (an SVD per matrix, an iterative
optimisation, a linear solve) gives `merge_method(..., cost=fn)`; `fn(shape, n_models, params)`
returns a `Cost` for one output tensor, or None when the tensor takes the cheap path (a 1-D
tensor, say). The planner stores it on the tensor's job; `Plan.describe` adds the jobs up and
turns flops into seconds with a rate measured once on the merge device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class Cost:
    """The extra work of one tensor: `flops`, working memory beyond the inputs (`extra_bytes`)
    and the decompositions it takes (`svd`: one (rows, cols) per SVD or eigendecomposition)."""

    flops: float = 0.0
    extra_bytes: int = 0
    svd: tuple[tuple[int, int], ...] = ()
    note: str = ""


CostFn = Callable[[tuple[int, ...], int, dict[str, Any]], Optional[Cost]]


def svd_flops(rows: int, cols: int) -> float:
    """Flops of a thin SVD of a rows x cols matrix (R-SVD, Golub & Van Loan: 6mn² + 20n³, m ≥ n)."""
    m, n = max(rows, cols), min(rows, cols)
    return 6.0 * m * n * n + 20.0 * n**3


def matmul_flops(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n


_RATES: dict[str, float] = {}


def measured_rate(device: str = "cpu") -> float:
    """Flops per second of the kernel the decomposing methods spend their time in, a float64
    symmetric eigendecomposition with vectors (512 x 512, counted as 9n³; best of 3, cached).
    A small float32 SVD underestimates the rate of the large float64 eighs by up to 30x. A CUDA
    device that is not there is measured as the CPU (the merge itself refuses it)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    if device not in _RATES:
        dev = torch.device(device)
        n = 512
        a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dev)
        spd = a @ a.T
        torch.linalg.eigh(spd)  # warm-up
        best = float("inf")
        for _ in range(3):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.linalg.eigh(spd)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        _RATES[device] = 9.0 * n**3 / max(best, 1e-6)
    return _RATES[device]


def summarize(costs: list[Cost], threads: int = 1, device: str = "cpu") -> list[str]:
    """Lines for `--dry-run`: SVD sizes (counted per shape), flops, an estimated time and the
    largest extra working memory of one tensor. `threads` does not change the estimate: the
    executor runs heavy tensors one at a time, each on all of torch's threads."""
    costs = [c for c in costs if c is not None]
    if not costs:
        return []
    shapes: dict[tuple[int, int], int] = {}
    for c in costs:
        for s in c.svd:
            shapes[s] = shapes.get(s, 0) + 1
    flops = sum(c.flops for c in costs)
    lines = []
    if shapes:
        top = sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1])
        listed = ", ".join(f"{n} x [{r}, {c}]" for (r, c), n in top[:6])
        more = f" and {len(top) - 6} more shapes" if len(top) > 6 else ""
        lines.append(f"extra cost: {sum(shapes.values())} SVDs ({listed}{more})")
    notes = sorted({c.note for c in costs if c.note})
    lines += [f"extra cost: {n}" for n in notes]
    rate = measured_rate(device)  # heavy tensors run one at a time, each on all of torch's threads
    seconds = flops / rate
    lines.append(f"extra compute: {flops / 1e9:.1f} GFLOP, about {_duration(seconds)} on {device} "
                 f"(estimate; measured {rate / 1e9:.1f} GFLOP/s)")
    lines.append(f"extra working memory: up to {max(c.extra_bytes for c in costs) / 2**20:.0f} MiB per tensor "
                 f"(included in the peak estimate)")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 120:
        return f"{math.ceil(seconds)} s"
    return f"{seconds / 60:.1f} min"
