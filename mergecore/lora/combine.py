"""How several adapters' changes to one module become one LoRA (the methods of merge-adapters).

Adapter i changes a module by D_i = s_i·B_i·A_i (LoRA orientation; s_i its scale α/r, or α/√r)
and has the merge weight w_i; an adapter without the module has D_i = 0 there. Per module:

    cat      B = [w_1 s_1 B_1 … w_n s_n B_n], A = [A_1; …; A_n]: exactly Σ w_i D_i, rank Σ r_i.
    linear   Σ w_i D_i truncated to rank R by its exact SVD, computed from the factors side by
             side (never the full matrix); without a rank or energy it is `cat` (exact).
    METHOD   any mergecore merge method that reads no statistics (ties, dare_ties, dare_linear,
             task_arithmetic, breadcrumbs, della, tsv ...) on the full D_i with a zero base and
             its own parameters (the adapters' weights as its `weight`), then a truncated SVD.
    knots    KnOTS (Stoica et al. 2024, arXiv:2410.19735): the SVD of the column-wise
             concatenation [D_1 … D_n] = U Σ [V_1ᵀ … V_nᵀ] puts every adapter in one basis U;
             the aligned parts X_i = Σ V_iᵀ are merged by `knots_merge` (ties as in the paper,
             linear, or another method) into X, and ΔW = U X = U Σ V_mergedᵀ, truncated to R.
             The SVD runs on the factors too (QR of B and of each Aᵀ, then the small core), and
             components with σ ≤ KNOTS_TOL·σ_max (none of the adapters' span) are dropped first.

Unlike the paper, which trims over the whole model at once, TIES and DARE run per module, as
every mergecore method does per tensor. Randomised methods (DARE) are seeded per module from the
seed and the module's name, so a run gives the same adapter whatever the order or the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from mergecore.errors import MergeError
from mergecore.executor import seed_for_tensor
from mergecore.lora.factor import LowRank, factorize, svd_of_product, truncate
from mergecore.methods import MergeMethod, get_method

OWN_METHODS = ("cat", "linear", "knots")  # merge-adapters' own; every other name is a mergecore method
KNOTS_TOL = 1e-6  # relative to the largest singular value of the concatenation


@dataclass(frozen=True)
class Term:
    """One adapter's LoRA of one module: its change is scale·B·A; `weight` is its merge weight."""

    b: torch.Tensor  # (out, r)
    a: torch.Tensor  # (r, in)
    scale: float
    weight: float


def full_method(name: str, n_adapters: int, weights: Sequence[float], params: dict[str, Any],
                per_adapter: Sequence[dict[str, Any]], where: str) -> tuple[MergeMethod, dict[str, Any], list[str]]:
    """A mergecore method for the full matrices, its parameters resolved for `n_adapters` inputs
    (the adapters' weights as its per-model `weight`; per-adapter values of per-model parameters
    first), and warnings for parameters it does not read. One MergeError line when it cannot run."""
    method = get_method(name)
    if method.stats or {"artifacts", "input_models"} & set(method.context):
        raise MergeError(f"{where}: method '{name}' reads statistics or artifacts of full models, which adapters "
                         f"do not have; use linear, cat, knots, ties, dare_ties, dare_linear or another method")
    if not method.accepts(n_adapters):
        most = "" if method.max_models is None else f" and at most {method.max_models}"
        raise MergeError(f"{where}: method '{name}' takes at least {method.min_models}{most} models; "
                         f"{n_adapters} adapters were given")
    raw: dict[str, Any] = dict(params)
    warnings: list[str] = []
    for spec in method.per_model_params:
        given = [p.get(spec.name) for p in per_adapter]
        if spec.name == "weight":
            raw["weight"] = list(weights)
        elif any(v is not None for v in given):
            shared = raw.get(spec.name)
            raw[spec.name] = [shared if v is None else v for v in given]
    per_model = {p.name for p in method.per_model_params} - {"weight"}
    for i, p in enumerate(per_adapter):
        for key in p:
            if key not in per_model:
                warnings.append(f"adapters[{i}]: parameter '{key}' is not a per-model parameter of '{name}' "
                                f"({', '.join(sorted(per_model)) or 'it has none besides the weight'}) and is ignored")
    if method.param("weight") is None and any(w != 1 for w in weights):
        warnings.append(f"{where}: method '{name}' takes no weights; the adapters' weights are not used")
    resolved, unused = method.resolve_params(raw, n_adapters, where)
    return method, resolved, warnings + unused


@dataclass
class Combiner:
    """The per-module merge of one merge-adapters run: `method` (cat, linear, knots or a mergecore
    method) and, for the full-matrix step (the method itself, or knots' `knots_merge`), `inner`
    with its resolved `params` (None: the weighted sum Σ w_i X_i)."""

    method: str
    inner: Optional[MergeMethod]
    params: dict[str, Any] = field(default_factory=dict)
    rank: Optional[int] = None
    energy: Optional[float] = None
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    seed: int = 0

    def combine(self, name: str, terms: Sequence[Optional[Term]]) -> Optional[LowRank]:
        """The merged LoRA of module `name` (terms: one per adapter, None where it has none), or
        None when the merged change is zero."""
        present = [t for t in terms if t is not None]
        if not present:
            return None
        if self.method == "cat" or (self.method == "linear" and self.rank is None and self.energy is None):
            return self._cat(present)
        if self.method == "linear":
            b, a = self._side_by_side(present, weighted=True)
            return truncate(*svd_of_product(b, a), rank=self.rank, energy=self.energy, dtype=self.dtype)
        if self.method == "knots":
            return self._knots(name, terms)
        deltas = [self._zero(present[0]) if t is None else self._delta(t) for t in terms]
        merged = self.merge_full(name, deltas, [0.0 if t is None else t.weight for t in terms])
        del deltas
        if not bool(merged.any()):
            return None
        if not bool(torch.isfinite(merged).all()):
            raise MergeError(f"module '{name}': method '{self.method}' gave inf/NaN from the adapters' changes")
        return factorize(merged, rank=self.rank, energy=self.energy, name=name, dtype=self.dtype)

    def merge_full(self, name: str, tensors: list[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """The full-matrix step: `inner` on `tensors` with a zero base, or Σ w_i T_i without one."""
        if self.inner is None:
            out = torch.zeros_like(tensors[0])
            for w, t in zip(weights, tensors):
                out.add_(t, alpha=w)
            return out
        gen = None
        if self.inner.randomized:
            gen = torch.Generator(device=tensors[0].device)
            gen.manual_seed(seed_for_tensor(self.seed, name))
        merged = self.inner(tensors, torch.zeros_like(tensors[0]), self.params, generator=gen, tensor_name=name)
        if tuple(merged.shape) != tuple(tensors[0].shape):
            raise MergeError(f"method '{self.inner.name}' returned shape {list(merged.shape)} for module '{name}', "
                             f"expected {list(tensors[0].shape)}")
        return merged.float()

    # -- the methods ------------------------------------------------------------------------------

    def _side_by_side(self, terms: Sequence[Term], *, weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """[w_1 s_1 B_1 …] (or [s_1 B_1 …]) and [A_1; …]: their product is Σ w_i D_i (or Σ D_i)."""
        b = torch.cat([t.b.to(self.device, torch.float32) * (t.scale * (t.weight if weighted else 1.0))
                       for t in terms], dim=1)
        a = torch.cat([t.a.to(self.device, torch.float32) for t in terms], dim=0)
        return b, a

    def _cat(self, terms: Sequence[Term]) -> LowRank:
        b, a = self._side_by_side(terms, weighted=True)
        return LowRank(b.to("cpu", self.dtype), a.to("cpu", self.dtype), a.shape[0], 1.0, 0.0, "cat")

    def _delta(self, t: Term) -> torch.Tensor:
        return (t.b.to(self.device, torch.float32) * t.scale) @ t.a.to(self.device, torch.float32)

    def _zero(self, t: Term) -> torch.Tensor:
        return torch.zeros(t.b.shape[0], t.a.shape[1], device=self.device)

    def _knots(self, name: str, terms: Sequence[Optional[Term]]) -> Optional[LowRank]:
        """KnOTS on the factors: [D_1 … D_n] = Bcat · blockdiag(A_1 … A_n) = (Q_B R_B)(blockdiag(R_i)ᵀ
        blockdiag(Q_i)ᵀ) with Aᵢᵀ = Q_i R_i, so its SVD is Q_B·u, σ, vh·blockdiag(Q_i)ᵀ for the SVD
        u σ vh of the small core R_B·blockdiag(R_i)ᵀ; X_i = σ·(vh's block i)·Q_iᵀ."""
        present = [t for t in terms if t is not None]
        qb, rb = torch.linalg.qr(self._side_by_side(present, weighted=False)[0].double())
        qrs = [torch.linalg.qr(t.a.to(self.device, torch.float64).T) for t in present]
        u, s, vh = torch.linalg.svd(rb @ torch.block_diag(*[r for _, r in qrs]).T, full_matrices=False)
        if not bool((s > 0).any()):
            return None
        keep = s > s[0] * KNOTS_TOL
        basis, s, vh = qb @ u[:, keep], s[keep], vh[keep]
        parts, offset, it = [], 0, iter(qrs)
        for t in terms:
            if t is None:
                parts.append(torch.zeros(len(s), present[0].a.shape[1], device=self.device))
                continue
            q, _ = next(it)
            block = vh[:, offset:offset + q.shape[1]]
            offset += q.shape[1]
            parts.append(((s[:, None] * block) @ q.T).float())  # X_i = Σ V_iᵀ
        merged = self.merge_full(name, parts, [0.0 if t is None else t.weight for t in terms])
        if not bool(merged.any()):
            return None
        return truncate(*svd_of_product(basis, merged), rank=self.rank, energy=self.energy, dtype=self.dtype,
                        method="knots")
