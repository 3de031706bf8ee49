"""Truncated SVD of one weight difference ΔW into LoRA factors, and the rank it keeps.

Which SVD: an exact `torch.linalg.svd` when the matrix is small (its smaller side at most
`EXACT_MAX_DIM`) or the rank wanted is more than a quarter of that side (a randomized SVD then
saves little and is less accurate); otherwise `torch.svd_lowrank` (Halko et al.'s randomized
range finder, `NITER` power iterations, `OVERSAMPLE` extra columns), seeded per tensor from its
name so a run gives the same bytes whatever the order or the process. With `--energy` and no rank
known in advance, the randomized SVD starts at `START_Q` components and doubles until the share
is reached (or falls back to the exact SVD past a quarter of the side).

The split: B = U·√S, A = √S·Vᵀ (so B·A = U·S·Vᵀ). Both factors carry half the scale, which keeps
them in range in float16 / bfloat16 and is what training from the adapter expects; with
`lora_alpha = r` peft's scale α/r is 1, so B·A is exactly the truncated ΔW.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from mergecore.errors import MergeError, clip

EXACT_MAX_DIM = 1024  # smaller side up to this: exact SVD (fast enough, and exact)
NITER = 4  # power iterations of the randomized SVD (2-4 is the usual accuracy / cost trade)
OVERSAMPLE = 10  # extra random columns, dropped after the SVD
START_Q = 32  # first guess of the rank when only --energy is given
ENERGY_SLACK = 1e-6  # float32 sums of squares: a share within this of the target counts as reached


@dataclass(frozen=True)
class LowRank:
    """ΔW ≈ B·A at `rank`, with the share of ‖ΔW‖² it keeps and its relative Frobenius error."""

    b: torch.Tensor  # (out, rank)
    a: torch.Tensor  # (rank, in)
    rank: int
    energy: float  # Σ kept σ² / ‖ΔW‖²_F
    error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F, of the factors as saved (after the dtype cast)
    method: str  # "exact" or "randomized"


def rank_for_energy(sq: torch.Tensor, total: float, energy: float) -> Optional[int]:
    """The smallest k whose first k squared singular values `sq` keep `energy` of `total`, or
    None when all of them do not (the caller then looks further, or stops at its cap)."""
    if total <= 0:
        return 1
    kept = torch.cumsum(sq.double(), 0) / total
    reached = torch.nonzero(kept >= energy - ENERGY_SLACK)
    return int(reached[0]) + 1 if len(reached) else None


def tensor_seed(name: str) -> int:
    """A stable seed from a tensor's name (crc32: the same in every process, unlike hash())."""
    return zlib.crc32(name.encode("utf-8"))


def _randomized(delta: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets by `torch.svd_lowrank`, its random draws seeded without touching the
    caller's random state."""
    devices = [delta.device] if delta.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=min(q + OVERSAMPLE, min(delta.shape)), niter=NITER)
    return u, s, v.mT


def _svd(delta: torch.Tensor, cap: int, energy: Optional[float], total: float,
         seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U, S, Vh, method) holding at least the components the rank choice needs."""
    side = min(delta.shape)
    q = cap if energy is None else min(cap, START_Q)
    exact = side <= EXACT_MAX_DIM or q > side / 4
    while not exact:
        u, s, vh = _randomized(delta, q, seed)
        if energy is None or q >= cap or rank_for_energy(s[:q] ** 2, total, energy) is not None:
            return u, s, vh, "randomized"
        q = min(2 * q, cap)
        exact = q > side / 4
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u, s, vh, "exact"


def factorize(delta: torch.Tensor, *, rank: Optional[int], energy: Optional[float], name: str,
              dtype: torch.dtype) -> LowRank:
    """Truncate `delta` (float32, on the compute device) to `rank` components, or to the fewest
    keeping `energy` of its squared singular values (at most `rank` when both are given); the
    factors come back on the CPU in `dtype`."""
    side = min(delta.shape)
    cap = min(rank, side) if rank is not None else side
    total = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    u, s, vh, method = _svd(delta, cap, energy, total, tensor_seed(name))
    k = min(cap, len(s)) if energy is None else min(cap, len(s), rank_for_energy(s ** 2, total, energy) or len(s))
    root = s[:k].sqrt()
    b = (u[:, :k] * root).to(dtype)
    a = (root[:, None] * vh[:k]).to(dtype)
    kept = float((s[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    residual = delta - b.to(delta.dtype) @ a.to(delta.dtype)
    error = float(torch.linalg.vector_norm(residual, dtype=torch.float64)) / total ** 0.5 if total > 0 else 0.0
    return LowRank(b.cpu(), a.cpu(), k, min(kept, 1.0), error, method)


def svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin exact SVD (U, S, Vh) of B·A without forming it (adapters are merged as factors):
    QR of B and of Aᵀ, then the SVD of the small core R_B·R_Aᵀ; float64, on the factors' device.
    Costs O((out + in)·k²) for inner size k instead of a full out×in SVD."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, *, rank: Optional[int], energy: Optional[float],
             dtype: torch.dtype, method: str = "exact") -> LowRank:
    """LowRank factors of U·diag(S)·Vh (an exact SVD) kept to `rank` components, or to the fewest
    keeping `energy` of Σ S² (at most `rank` when both are given); error and energy from S."""
    sq = s.double() ** 2
    total = float(sq.sum())
    cap = len(s) if rank is None else min(rank, len(s))
    k = cap if energy is None else min(cap, rank_for_energy(sq, total, energy) or cap)
    k = max(k, 1)
    root = s[:k].sqrt()
    b = (u[:, :k] * root).to(dtype)
    a = (root[:, None] * vh[:k]).to(dtype)
    kept = float(sq[:k].sum()) / total if total > 0 else 1.0
    error = max(0.0, 1.0 - kept) ** 0.5 if total > 0 else 0.0
    return LowRank(b.cpu(), a.cpu(), k, min(kept, 1.0), error, method)


def factorize_product(b: torch.Tensor, a: torch.Tensor, *, rank: Optional[int], energy: Optional[float],
                      dtype: torch.dtype) -> LowRank:
    """B·A (adapters' factors side by side) truncated by its exact SVD, never formed in full."""
    u, s, vh = svd_of_product(b, a)
    return truncate(u, s, vh, rank=rank, energy=energy, dtype=dtype)


def check_rank(rank: Optional[int], energy: Optional[float]) -> None:
    """--rank an integer >= 1 and --energy in (0, 1], when given (one line otherwise)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeError(f"--rank must be an integer of at least 1, got {clip(rank, 40)}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise MergeError(f"--energy must be in (0, 1] (the share of the squared singular values kept), "
                         f"got {clip(energy, 40)}")


def check_device(device: str) -> torch.device:
    """The device the SVDs run on: cpu, or cuda when one is there."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MergeError(f"unknown device '{clip(device, 60)}'; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise MergeError(f"unsupported device '{clip(device, 60)}'; use cpu or cuda")
    return dev
