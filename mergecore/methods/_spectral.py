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
    u, s, v, _ = thin_svd_rest(x, k)
    return u, s, v


def thin_svd_rest(x: torch.Tensor, k: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`thin_svd`, plus, when x has no more rows than columns (its Gram matrix is then the rows'),
    an orthonormal basis of the rest of R^rows: the columns orthogonal to U (else None)."""
    m, n = x.shape
    a = x.to(torch.float64)
    flip = m <= n
    if flip:  # work on the tall orientation: the Gram matrix is min(m, n) square
        a = a.T
    lam, w = torch.linalg.eigh(a.T @ a)
    lam, w = lam.flip(0), w.flip(1)
    s = lam.clamp(min=0).sqrt_()
    keep = int((s > s[0] * rtol(m, n)).sum()) if s.numel() and s[0] > 0 else 0
    if k is not None:
        keep = min(keep, k)
    rest = w[:, keep:] if flip else None
    s, w = s[:keep], w[:, :keep]
    u = (a @ w).div_(s)
    return (w, s, u, rest) if flip else (u, s, w, None)


def inv_sqrt_gram(a: torch.Tensor, tol: float, split: Optional[int] = None) -> torch.Tensor:
    """(aᵀa)^(+1/2), the pseudo-inverse square root of the Gram matrix of a's columns (float64),
    so that a·(aᵀa)^(+1/2) is a's polar factor (its nearest matrix with orthonormal columns,
    U Vᵀ of its SVD). Eigenvalues ≤ tol²·λ_max count as zero (dependent columns). With `split`,
    a = [a₁ a₂] is two blocks of orthonormal columns (a₁ has `split`), and the Gram matrix
    [[I, C], [Cᵀ, I]] is handled through C = a₁ᵀa₂ alone (`_two_block_inv_sqrt`)."""
    if split is not None and 0 < split < a.shape[1]:
        return _two_block_inv_sqrt(a[:, :split].T @ a[:, split:], tol)
    lam, w = torch.linalg.eigh(a.T @ a)
    if lam.numel() == 0 or lam[-1] <= 0:
        return a.new_zeros(a.shape[1], a.shape[1])
    keep = lam > lam[-1] * tol * tol
    lam, w = lam[keep], w[:, keep]
    return (w * lam.rsqrt()) @ w.T


def _two_block_inv_sqrt(c: torch.Tensor, tol: float) -> torch.Tensor:
    """f(G) = G^(+1/2) for G = [[I, C], [Cᵀ, I]] (C = PΣQᵀ, k₁ x k₂), from one k₂ x k₂ eigh.

    G's eigenpairs are 1 ± σ_j with (p_j; ±q_j)/√2, and 1 on the rest, so
    f(G) = I + [[P D₁ Pᵀ, P D₂ Qᵀ], [Q D₂ Pᵀ, Q D₁ Qᵀ]] with D₁ = (a + b)/2 − 1, D₂ = (a − b)/2,
    a = (1 + σ)^(-1/2), b = (1 − σ)^(-1/2) (0 where 1 − σ is zero: dependent columns). P is never
    formed: with CQ = PΣ, P D₁ Pᵀ = CQ (D₁/σ²) (CQ)ᵀ and P D₂ = CQ (D₂/σ), both finite as σ → 0.
    Half the size of the plain eigh for TSV's two tasks (an eigh costs its size cubed)."""
    k1, k2 = c.shape
    mu, q = torch.linalg.eigh(c.T @ c)
    mu = mu.clamp(0.0, 1.0)
    sigma = mu.sqrt()
    a = (1.0 + sigma).rsqrt()
    gap = (1.0 - mu) / (1.0 + sigma)  # 1 − σ without cancellation
    dependent = gap <= (1.0 + sigma.max()) * tol * tol
    b = torch.where(dependent, torch.zeros_like(gap), gap.clamp(min=1e-300).rsqrt())
    d1, d2 = (a + b) / 2 - 1.0, (a - b) / 2
    tiny = sigma <= 1e-150
    safe = torch.where(tiny, torch.ones_like(sigma), sigma)
    d1_s2 = torch.where(tiny, torch.zeros_like(d1), d1 / (safe * safe))
    d2_s = torch.where(tiny, torch.zeros_like(d2), d2 / safe)
    cq = c @ q
    out = c.new_empty(k1 + k2, k1 + k2)
    out[:k1, :k1] = (cq * d1_s2) @ cq.T
    out[:k1, k1:] = (cq * d2_s) @ q.T
    out[k1:, :k1] = out[:k1, k1:].T
    out[k1:, k1:] = (q * d1) @ q.T
    out.diagonal().add_(1.0)
    return out


def whitened_product(a: torch.Tensor, fa: torch.Tensor, s: torch.Tensor, b: torch.Tensor,
                     fb: torch.Tensor) -> torch.Tensor:
    """a·fa·diag(s)·fb·bᵀ: with fa, fb the inverse square roots of a's and b's Gram matrices,
    polar(a) diag(s) polar(b)ᵀ, the TSV / Iso-CTS reconstruction (float64, m x n)."""
    middle = (fa * s) @ fb
    return a @ (middle @ b.T)


def eigh_flops(n: int) -> float:
    """Flops of a symmetric eigendecomposition with vectors (tridiagonalisation, divide and
    conquer, back-transformation: about 9n³)."""
    return 9.0 * n**3


def gram_svd_flops(m: int, n: int, k: int) -> float:
    """thin_svd of an m x n matrix keeping k triplets: Gram, eigh, U = XV/σ."""
    small, big = min(m, n), max(m, n)
    return matmul_flops(small, big, small) + eigh_flops(small) + matmul_flops(big, small, k)


def inv_sqrt_flops(m: int, p: int, split: bool = False) -> float:
    """inv_sqrt_gram of an m x p matrix (`split`: two equal orthonormal blocks)."""
    if split:
        k = p // 2
        return matmul_flops(k, m, k) + eigh_flops(k) + 4 * matmul_flops(k, k, k)
    return matmul_flops(p, m, p) + eigh_flops(p) + matmul_flops(p, p, p)


def whitened_product_flops(m: int, n: int, p: int) -> float:
    """whitened_product of an m x p and an n x p factor, given the inverse square roots."""
    return matmul_flops(p, p, p) + matmul_flops(p, p, n) + matmul_flops(m, p, n)
