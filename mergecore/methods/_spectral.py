"""Exact SVD pieces for the spectral merges (tsv_m, iso_c, iso_cts, cart), from Gram matrices.

Why not `torch.linalg.svd`: on a CPU a full float32 SVD of a 2048 x 2048 matrix takes tens of
seconds (the singular vectors' back-transformation), while an eigendecomposition of the float64
Gram matrix of the smaller side takes about two, and is more accurate than the float32 SVD for
every singular value above the float32 noise floor (the float32 input is exact in float64).
So: σ², V = eigh(XᵀX) in float64 and U = XV/σ; a polar factor A(AᵀA)^(-1/2) the same way.

Singular triplets with σ ≤ `rtol(m, n)`·σ_max are dropped: their singular vectors are
arbitrary (any basis of the null space) and sit below the rounding noise of a float32 input, so
an SVD routine would return whatever its algorithm happens to produce there. Dropping them makes
the result well defined on rank-deficient inputs (a LoRA-style task vector, two equal
fine-tunes); on full-rank inputs nothing is dropped.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mergecore.methods._cost import matmul_flops

_EPS32 = float(torch.finfo(torch.float32).eps)


def rtol(m: int, n: int) -> float:
    """Relative size below which a singular value of an m x n float32 matrix counts as zero."""
    return 8.0 * _EPS32 * math.sqrt(max(m, n, 1))


def thin_svd(x: torch.Tensor, k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `k` (default: all) nonzero singular triplets of a 2-D `x`, in float64 on x's device:
    x ≈ U diag(S) Vᵀ with S descending, U (m x r), V (n x r), r ≤ min(k, rank). One eigh of the
    Gram matrix of the smaller side."""
    m, n = x.shape
    a = x.to(torch.float64)
    flip = m < n
    if flip:  # work on the tall orientation: the Gram matrix is min(m, n) square
        a = a.T
    lam, w = torch.linalg.eigh(a.T @ a)
    lam, w = lam.flip(0), w.flip(1)
    s = lam.clamp(min=0).sqrt_()
    keep = int((s > s[0] * rtol(m, n)).sum()) if s.numel() and s[0] > 0 else 0
    if k is not None:
        keep = min(keep, k)
    s, w = s[:keep], w[:, :keep]
    u = (a @ w).div_(s)
    return (w, s, u) if flip else (u, s, w)


def inv_sqrt_gram(a: torch.Tensor, tol: float) -> torch.Tensor:
    """(aᵀa)^(+1/2), the pseudo-inverse square root of the Gram matrix of a's columns (float64),
    so that a·(aᵀa)^(+1/2) is a's polar factor (its nearest matrix with orthonormal columns,
    U Vᵀ of its SVD). Eigenvalues ≤ tol²·λ_max count as zero (dependent columns)."""
    lam, w = torch.linalg.eigh(a.T @ a)
    if lam.numel() == 0 or lam[-1] <= 0:
        return a.new_zeros(a.shape[1], a.shape[1])
    keep = lam > lam[-1] * tol * tol
    lam, w = lam[keep], w[:, keep]
    return (w * lam.rsqrt()) @ w.T


def whitened_product(a: torch.Tensor, s: torch.Tensor, b: torch.Tensor, tol: float) -> torch.Tensor:
    """polar(a) diag(s) polar(b)ᵀ for a (m x p), b (n x p): the TSV / Iso-CTS reconstruction
    with decorrelated singular vectors, as a float64 m x n matrix."""
    middle = (inv_sqrt_gram(a, tol) * s) @ inv_sqrt_gram(b, tol)
    return a @ (middle @ b.T)


def eigh_flops(n: int) -> float:
    """Flops of a symmetric eigendecomposition with vectors (tridiagonalisation, divide and
    conquer, back-transformation: about 9n³)."""
    return 9.0 * n**3


def gram_svd_flops(m: int, n: int, k: int) -> float:
    """thin_svd of an m x n matrix keeping k triplets: Gram, eigh, U = XV/σ."""
    small, big = min(m, n), max(m, n)
    return matmul_flops(small, big, small) + eigh_flops(small) + matmul_flops(big, small, k)


def whitened_product_flops(m: int, n: int, p: int) -> float:
    """whitened_product of an m x p and an n x p factor."""
    return (matmul_flops(p, m, p) + matmul_flops(p, n, p) + 2 * eigh_flops(p) + 2 * matmul_flops(p, p, p)
            + matmul_flops(p, p, n) + matmul_flops(m, p, n))
