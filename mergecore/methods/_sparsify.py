"""Sparsification and sign-consensus helpers for the task-vector merge methods.

Everything here works on float32 task vectors ("deltas") and follows mergekit 0.1.5's
semantics; the implementations are written for large tensors (tens of millions of entries):

* Masks are float32 0/1 tensors written into a caller-provided scratch buffer: on CPU, float
  ops run several times faster than the same op on bool tensors.
* Top-k thresholds come from an exact selection (`kth_largest`) that brackets the k-th value
  with a small random sample and runs `kthvalue` only on the entries inside the bracket.
* Among equal magnitudes, the entry with the lower flat index ranks as the larger one (mergekit
  uses an unstable argsort there, so which of several tied entries survives may differ; the
  number of survivors is the same).

The `*_` functions sparsify a delta in place and return the L1 rescale factor that mergekit
would apply (`rescale=True`: ||delta||_1 / ||sparsified||_1, or 1.0 when either norm is below
1e-7); the caller multiplies by it, usually folded into a later `add_(..., alpha=...)`.
`sparsify` is the out-of-place convenience wrapper returning the rescaled tensor.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, Sequence

import torch

from mergecore.errors import MergeError

SparsifyMethod = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
ConsensusMethod = Literal["sum", "count"]

_RESCALE_EPS = 1e-7  # mergekit's tolerance for near-zero norms
_SAMPLE = 1 << 18  # sample size used to bracket a k-th value
_SMALL = 1 << 20  # below this many entries, run kthvalue directly


# --------------------------------------------------------------------------- selection


class Kth(NamedTuple):
    """Result of `kth_largest`: the value, how many entries are > and == it, and the flat
    indices (ascending) of the entries equal to it when they came for free (else None)."""

    value: float
    n_gt: int
    n_eq: int
    ties: torch.Tensor | None = None


def kth_largest(a: torch.Tensor, k: int) -> Kth:
    """Exact k-th largest value of `a` (1 <= k <= numel), with tie counts.

    Avoids sorting: a random sample brackets the k-th value, one pass counts the entries above
    the bracket and gathers the (few) entries inside it, and `kthvalue` runs on those alone.
    Falls back to `kthvalue` on the whole tensor when the bracket misses (never wrong, only
    slower).
    """
    flat = a.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} entries")
    if n > _SMALL:
        gen = torch.Generator(device=flat.device).manual_seed(n ^ k)
        m = _SAMPLE
        idx = torch.randint(0, n, (m,), generator=gen, device=flat.device)
        sample = flat[idx].sort().values
        del idx
        pos = (n - k + 1) / n * m  # 1-based ascending position of the target in the sample
        margin = 5.0 * math.sqrt(m * 0.25) + 16
        lo_i, hi_i = int(pos - margin), int(math.ceil(pos + margin))
        lo = sample[lo_i - 1].item() if lo_i >= 1 else -math.inf
        hi = sample[hi_i - 1].item() if hi_i <= m else math.inf
        del sample
        band = flat >= lo
        n_ge_lo = int(torch.count_nonzero(band))
        if hi != math.inf:
            band &= flat <= hi
        where = torch.nonzero(band).view(-1)
        del band
        cand = flat[where]
        above = n_ge_lo - cand.numel()
        need = k - above  # rank of the target among the candidates, from the top
        if 1 <= need <= cand.numel():
            value = cand.kthvalue(cand.numel() - need + 1).values
            n_gt = above + int(torch.count_nonzero(cand > value))
            ties = where[cand == value]
            return Kth(value.item(), n_gt, ties.numel(), ties)
        del cand, where
    value = flat.kthvalue(n - k + 1).values
    n_gt = int(torch.count_nonzero(flat > value))
    n_eq = int(torch.count_nonzero(flat == value))
    return Kth(value.item(), n_gt, n_eq)


def rank_window_mask_(a: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Turn `a` (non-negative scores) in place into a float 0/1 mask of the entries whose
    position in descending order lies in [start, stop); exactly stop - start entries are kept.

    Ties are ordered by flat index (lower index first, i.e. treated as larger).
    """
    n = a.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return a.zero_()
    if start == 0 and stop == n:
        return a.fill_(1.0)
    flat = a.view(-1)
    # Boundary values: the first kept entry (position `start`) and the last (`stop - 1`).
    upper = kth_largest(flat, start + 1) if start > 0 else None
    lower = kth_largest(flat, stop) if stop < n else None
    # Tie groups straddling a boundary: fix them entry by entry after thresholding.
    fixes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for b in (upper, lower):
        if b is None or (start <= b.n_gt and b.n_gt + b.n_eq <= stop):
            continue
        if fixes and upper is not None and b.value == upper.value:
            continue  # same tie group as the upper boundary, already handled
        ties = b.ties if b.ties is not None else torch.nonzero(flat == b.value).view(-1)
        position = torch.arange(b.n_gt, b.n_gt + b.n_eq, device=flat.device)
        fixes.append((ties, ((position >= start) & (position < stop)).to(a.dtype)))
    if upper is not None:
        above = flat > upper.value  # entries ranked before `start`
    if lower is not None:
        flat.ge_(lower.value)
    else:
        flat.fill_(1.0)
    if upper is not None:
        flat.masked_fill_(above, 0.0)
        del above
    for ties, keep in fixes:
        flat[ties] = keep
    return a


def _l1_factor(before: torch.Tensor, after: torch.Tensor) -> float:
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return 1.0
    return (before / after).item()


def _scratch(delta: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    if scratch is None:
        return torch.empty_like(delta)
    if scratch.shape != delta.shape or scratch.dtype != delta.dtype:
        raise ValueError("scratch buffer must match the delta's shape and dtype")
    return scratch


def _magnitudes(delta: torch.Tensor, scratch: torch.Tensor | None,
                rescale: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """|delta| in the scratch buffer, and its L1 norm when the result will be rescaled."""
    a = _scratch(delta, scratch)
    torch.abs(delta, out=a)
    return a, (a.sum() if rescale else None)


def _apply_mask(delta: torch.Tensor, mask: torch.Tensor, before: torch.Tensor | None) -> float:
    """delta *= mask (in place); returns the L1 rescale factor when `before` (||delta||_1 before
    sparsifying) is given, else 1.0. The mask buffer is reused for the norm."""
    delta.mul_(mask)
    if before is None:
        return 1.0
    return _l1_factor(before, torch.abs(delta, out=mask).sum())


# --------------------------------------------------------------------------- sparsifiers


def magnitude_(
    delta: torch.Tensor,
    density: float,
    *,
    rescale: bool = False,
    scratch: torch.Tensor | None = None,
) -> float:
    """TIES trimming: keep the max(1, int(density·n)) entries of largest |x|, zero the rest.

    In place; returns the L1 rescale factor (1.0 without rescale). density >= 1 keeps all,
    density <= 0 drops all.
    """
    if density >= 1:
        return 1.0
    if density <= 0 or delta.numel() == 0:
        delta.zero_()
        return 1.0
    a, before = _magnitudes(delta, scratch, rescale)
    k = max(1, int(density * delta.numel()))
    rank_window_mask_(a, 0, k)
    return _apply_mask(delta, a, before)


def bernoulli_(
    delta: torch.Tensor,
    density: float,
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    scratch: torch.Tensor | None = None,
) -> float:
    """DARE drop: keep each entry independently with probability `density`.

    The mask is `uniform < density` drawn with `torch.rand` from `generator` (None: torch's
    default generator), which reproduces `torch.bernoulli` draw for draw. In place; returns the
    L1 rescale factor (mergekit rescales by ||δ||_1/||kept||_1, about 1/density).
    """
    if density >= 1:
        return 1.0
    a = _scratch(delta, scratch)
    before = torch.abs(delta, out=a).sum() if rescale else None
    torch.rand(delta.shape, generator=generator, out=a)
    a.lt_(density)
    return _apply_mask(delta, a, before)


def magnitude_outliers_(
    delta: torch.Tensor,
    density: float,
    gamma: float = 0.01,
    *,
    rescale: bool = False,
    scratch: torch.Tensor | None = None,
) -> float:
    """Model Breadcrumbs: drop the int(gamma·n) largest |x| and the smallest, keep int(density·n).

    If density + gamma exceeds 1, fewer outliers are removed so that int(density·n) entries
    survive. density >= 1 keeps everything (gamma is then ignored, as in mergekit).
    """
    if density >= 1:
        return 1.0
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    a, before = _magnitudes(delta, scratch, rescale)
    # Ascending positions [n_bot, n_bot + target) are descending positions below.
    rank_window_mask_(a, n - n_bot - target, n - n_bot)
    return _apply_mask(delta, a, before)


def della_probabilities_(ranks: torch.Tensor, length: int, density: float, epsilon: float):
    """In place: 1-based ranks within a row of `length` -> DELLA keep probabilities
    p = (density − ε) + 2ε·(rank − 1)/(length − 1), i.e. linear from density − ε for the
    smallest magnitude to density + ε for the largest (a row of one entry gets p = density).
    """
    if length > 1:
        ranks.sub_(1).div_(length - 1).clamp_(0, 1)
    else:
        ranks.fill_(0.5)
    return ranks.mul_(2).mul_(epsilon).add_(density - epsilon)


def della_magprune_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    scratch: torch.Tensor | None = None,
) -> float:
    """DELLA MagPrune: drop entries at random with keep probabilities ranked by magnitude.

    Magnitudes are ranked along dim 1 (each row of a matrix; a vector is one row), and the
    rank maps linearly to a keep probability in [density − ε, density + ε]. Raises MergeError
    unless 0 < density ± ε < 1. In place; returns the L1 rescale factor.
    """
    if density >= 1:
        return 1.0
    if density <= 0:
        delta.zero_()
        return 1.0
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(
            f"della: density ± epsilon must lie inside (0, 1), got density={density:g}, "
            f"epsilon={epsilon:g}; lower epsilon or move density away from 0 and 1"
        )
    a = _scratch(delta, scratch)
    rows = delta if delta.dim() >= 2 else delta.view(1, -1)
    ranks = a.view(rows.shape)
    torch.abs(rows, out=ranks)
    before = ranks.sum() if rescale else None
    order = torch.argsort(ranks, dim=1)
    length = rows.shape[1]
    shape = [1] * rows.dim()
    shape[1] = length
    values = torch.arange(1, length + 1, dtype=a.dtype, device=a.device).view(shape)
    ranks.scatter_(1, order, values.expand(order.shape))
    del order, values
    della_probabilities_(ranks, length, density, epsilon)
    draw = torch.rand(rows.shape, generator=generator, device=a.device)
    torch.lt(draw, ranks, out=ranks)
    del draw
    return _apply_mask(delta, a, before)


def sparsify_(
    delta: torch.Tensor,
    method: SparsifyMethod,
    density: float,
    *,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    scratch: torch.Tensor | None = None,
) -> float:
    """Dispatch to one of the in-place sparsifiers; returns the rescale factor."""
    if method == "magnitude":
        return magnitude_(delta, density, rescale=rescale, scratch=scratch)
    if method == "random":
        return bernoulli_(delta, density, rescale=rescale, generator=generator, scratch=scratch)
    if method == "magnitude_outliers":
        return magnitude_outliers_(delta, density, gamma, rescale=rescale, scratch=scratch)
    if method == "della_magprune":
        return della_magprune_(
            delta, density, epsilon, rescale=rescale, generator=generator, scratch=scratch
        )
    raise ValueError(f"unknown sparsification method {method!r}")


def sparsify(tensor: torch.Tensor, method: SparsifyMethod, density: float, **options: Any) -> torch.Tensor:
    """Out-of-place sparsification (mergekit's `sparsify`), rescale applied; `options` are
    `sparsify_`'s (gamma, epsilon, rescale, generator)."""
    out = tensor.to(torch.float32, copy=True)
    factor = sparsify_(out, method, density, **options)
    if factor != 1.0:
        out.mul_(factor)
    return out


# --------------------------------------------------------------------------- sign consensus


def sign_consensus_mask(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    method: ConsensusMethod = "sum",
    mask_dtype: torch.dtype = torch.bool,
) -> torch.Tensor:
    """TIES sign election on (already weighted) deltas; returns a stacked (n, ...) mask.

    The elected sign is + where Σ_i δ_i >= 0 ("sum") or Σ_i sign(δ_i) >= 0 ("count"); entry i
    is kept where sign(δ_i) equals it, so zero entries are never kept. Reference helper for
    small inputs; the merge methods use `SignConsensus`, which streams.
    """
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus method {method!r}")
    deltas = list(deltas) if not isinstance(deltas, torch.Tensor) else list(deltas.unbind(0))
    vote = torch.zeros_like(deltas[0], dtype=torch.float32)
    for d in deltas:
        vote.add_(d if method == "sum" else torch.sign(d))
    positive = vote >= 0
    out = torch.stack([torch.where(positive, d > 0, d < 0) for d in deltas])
    return out.to(mask_dtype)


class SignConsensus:
    """Streaming TIES "disjoint merge": add scaled deltas one at a time, then combine.

    For every entry it keeps the sums of positive and of negative contributions, so each delta
    is read once and no per-model float mask is stored. For normalisation it remembers, per
    entry, which contributions were positive and which negative as bits (one byte each for up
    to 8 models, instead of two float32 weight sums), and rebuilds the agreeing weight sum
    exactly at the end. `result()` elects the sign (sum: Σ contributions >= 0; count: Σ signs
    >= 0; ties go to +) and returns the agreeing sum, divided by the agreeing weights when
    `normalize` (entries whose divisor is 0 are divided by 1, as mergekit does).
    """

    MAX_BIT_MODELS = 8

    def __init__(self, like: torch.Tensor, method: ConsensusMethod = "sum", normalize: bool = True):
        if method not in ("sum", "count"):
            raise ValueError(f"unknown consensus method {method!r}")
        self.method = method
        self.normalize = normalize
        self.pos = torch.zeros_like(like)
        self.neg = torch.zeros_like(like)
        self.weights: list[float] = []  # weight of each non-zero contribution, in order
        self.pos_bits = torch.zeros(like.shape, dtype=torch.uint8, device=like.device) if normalize else None
        self.neg_bits = torch.zeros(like.shape, dtype=torch.uint8, device=like.device) if normalize else None
        self.pos_w: torch.Tensor | None = None  # float fallback beyond MAX_BIT_MODELS contributions
        self.neg_w: torch.Tensor | None = None
        self.votes = torch.zeros_like(like) if method == "count" else None

    def _spill_bits(self) -> None:
        """Switch from bit masks to float weight sums (more than MAX_BIT_MODELS models)."""
        self.pos_w = torch.zeros_like(self.pos)
        self.neg_w = torch.zeros_like(self.pos)
        for k, w in enumerate(self.weights):
            bit = 1 << k
            self.pos_w.add_(torch.bitwise_and(self.pos_bits, bit).ne_(0), alpha=w)
            self.neg_w.add_(torch.bitwise_and(self.neg_bits, bit).ne_(0), alpha=w)
        self.pos_bits = self.neg_bits = None

    def add_(self, delta: torch.Tensor, scale: float, weight: float, scratch: torch.Tensor) -> None:
        """Add contribution `scale · delta`; `weight` counts towards the divisor where it agrees.

        Consumes `delta` (overwritten) and `scratch`.
        """
        if scale == 0:
            return  # a zero contribution has no sign: it neither votes nor is merged
        up, down = (self.pos, self.neg) if scale > 0 else (self.neg, self.pos)
        sign = 1.0 if scale > 0 else -1.0
        k = len(self.weights)
        self.weights.append(weight)
        if self.normalize and self.pos_bits is not None and k >= self.MAX_BIT_MODELS:
            self._spill_bits()
        if self.normalize and self.pos_bits is not None:
            up_bits, down_bits = (self.pos_bits, self.neg_bits) if scale > 0 else (self.neg_bits, self.pos_bits)
            up_bits.bitwise_or_(delta.gt(0).to(torch.uint8).mul_(1 << k))
            down_bits.bitwise_or_(delta.lt(0).to(torch.uint8).mul_(1 << k))
        up_w, down_w = (self.pos_w, self.neg_w) if scale > 0 else (self.neg_w, self.pos_w)
        torch.clamp(delta, min=0, out=scratch)
        up.add_(scratch, alpha=scale)
        if up_w is not None or self.votes is not None:
            scratch.gt_(0)
            if up_w is not None:
                up_w.add_(scratch, alpha=weight)
            if self.votes is not None:
                self.votes.add_(scratch, alpha=sign)
        delta.clamp_(max=0)
        down.add_(delta, alpha=scale)
        if down_w is not None or self.votes is not None:
            delta.lt_(0)
            if down_w is not None:
                down_w.add_(delta, alpha=weight)
            if self.votes is not None:
                self.votes.add_(delta, alpha=-sign)

    def _divisor(self, elect: torch.Tensor) -> torch.Tensor:
        """Σ of the weights of contributions whose sign agrees with the elected one."""
        if self.pos_w is not None:
            div = self.pos_w.mul_(elect)
            div.add_(self.neg_w.mul_(1 - elect))
            self.pos_w = self.neg_w = None
            return div
        # agreeing bits: the positive ones where + was elected, the negative ones elsewhere
        keep = elect.to(torch.uint8)  # 1 where + won
        agree = self.pos_bits.mul_(keep)
        keep.neg_().add_(1)  # 1 where - won
        agree.bitwise_or_(self.neg_bits.mul_(keep))
        del keep
        self.pos_bits = self.neg_bits = None
        div = torch.zeros_like(self.pos)
        for k, w in enumerate(self.weights):
            div.add_(torch.bitwise_and(agree, 1 << k).ne_(0), alpha=w)
        return div

    def result(self, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The merged delta (a tensor owned by the caller); the accumulator is spent.

        `scratch` (same shape, float32) is used for the elected signs if given.
        """
        if self.votes is not None:
            elect = self.votes.ge_(0)
            self.votes = None
        else:
            elect = torch.add(self.pos, self.neg, out=scratch).ge_(0)
        # Select without bool tensors: x·1 + y·0 is exact.
        out = self.pos.mul_(elect)
        if self.normalize:
            div = self._divisor(elect)
        elect.neg_().add_(1)
        out.add_(self.neg.mul_(elect))
        del elect
        self.pos = self.neg = None
        if self.normalize:
            div.add_(div.eq(0))
            out.div_(div)
        return out
