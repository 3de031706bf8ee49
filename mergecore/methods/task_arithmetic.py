"""Task-vector methods: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

One formula with a sparsifier and an optional sign election, so the eight methods are one table
(`VARIANTS`, as mergekit's generalized task arithmetic is one class): each entry registers a
method whose signature (weight, density, gamma/epsilon, normalize, rescale, lambda, consensus,
int8_mask) is built from the entry, and which calls `_gta`.

All of them follow mergekit's "generalized task arithmetic": with task vectors τ_i = θ_i − θ0,

    τ'_i = sparsify(τ_i)                        (optional; per-model density, gamma, epsilon;
                                                  `rescale` restores each ||τ_i||_1)
    m    = Σ_i w_i τ'_i                          (no consensus)
    m    = Σ_i w_i τ'_i [sgn(w_i τ'_i) = s]      (consensus: s = elected sign per entry)
    m   /= Σ_i w_i          (or Σ_i w_i [agrees]) if `normalize` (a zero divisor counts as 1)
    θ    = θ0 + λ m

The defaults of `normalize` and `rescale` differ between methods exactly as in mergekit 0.1.5.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import torch

from mergecore.methods._sparsify import SignConsensus, sparsify_
from mergecore.methods.base import BaseTensor, PerModel, Range, Tensors, merge_method, owns_inputs

Weight = Annotated[PerModel[float], "weight of each model's task vector"]
Density = Annotated[
    PerModel[float], Range(0.0, 1.0, lo_open=True), "fraction of each task vector kept"
]
DensityUnused = Annotated[
    PerModel[float], Range(0.0, 1.0, lo_open=True), "accepted for compatibility; not used"
]
Gamma = Annotated[PerModel[float], Range(0.0, 1.0), "fraction of largest-magnitude entries dropped"]
Epsilon = Annotated[PerModel[float], Range(0.0, None), "half-width of the keep-probability window"]
Lambda = Annotated[float, "scale of the merged task vector"]
Int8Mask = Annotated[bool, "memory hint in mergekit; accepted, no effect on the result"]
Consensus = Annotated[
    Literal["sum", "count"], "sign election: by summed values (TIES) or by counting signs"
]


def _gta(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float] | None,
    sparsification: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generalized task arithmetic, streaming over the models (see the module docstring)."""
    if not tensors:
        return base.clone()
    owned = owns_inputs(tensors)
    delta = None if owned else torch.empty_like(base)
    scratch = torch.empty_like(base)
    merger = SignConsensus(base, consensus, normalize) if consensus else None
    mixed = None if merger else torch.zeros_like(base)
    for i in range(len(tensors)):
        if owned:  # the input is ours: turn it into the task vector in place
            delta = tensors[i].sub_(base)
        else:
            torch.sub(tensors[i], base, out=delta)
        factor = 1.0
        if sparsification:
            factor = sparsify_(
                delta,
                sparsification,
                density[i],
                gamma=gamma[i] if gamma else 0.0,
                epsilon=epsilon[i] if epsilon else 0.0,
                rescale=rescale,
                generator=generator,
                scratch=scratch,
            )
        if merger:
            merger.add_(delta, weight[i] * factor, weight[i], scratch)
        else:
            mixed.add_(delta, alpha=weight[i] * factor)
    if merger:
        mixed = merger.result(scratch)
    elif normalize:
        total = sum(weight)
        if abs(total) >= 1e-8:
            mixed.div_(total)
    del delta, scratch
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


@dataclass(frozen=True)
class _Variant:
    """One method of the family: how it sparsifies, whether it elects signs, its defaults and texts."""

    name: str
    sparsification: Optional[str]  # see _sparsify.sparsify_; None keeps every entry
    consensus: bool  # TIES sign election before the sum
    normalize: bool  # the default of `normalize` (mergekit 0.1.5's, per method)
    summary: str
    paper: str
    formula: str
    doc: str
    starting: tuple[tuple[str, Any], ...] = (("weight", 1.0), ("density", 0.5))
    # lambda x density (density alone is unused without sparsification); a disjoint mean (normalize)
    # takes lambda around 1, a plain sum of task vectors smaller ones
    grid: Optional[dict[str, tuple[float, ...]]] = None

    def grid_values(self) -> dict[str, tuple[float, ...]]:
        if self.grid is not None:
            return dict(self.grid)
        lam = (0.5, 1.0, 1.5) if self.normalize else (0.3, 0.5, 1.0)
        return {"lambda": lam, "density": (0.3, 0.5, 0.7)}

    def parameters(self) -> list[inspect.Parameter]:
        """The keyword-only parameters, in mergekit's order: the method's schema."""
        rescale, rescale_help = _RESCALE[self.sparsification]
        params: list[tuple[str, Any, Any]] = [
            ("weight", Weight, inspect.Parameter.empty),
            ("density", Density if self.sparsification else DensityUnused, 1.0)]
        if self.sparsification == "magnitude_outliers":
            params.append(("gamma", Gamma, 0.01))
        if self.sparsification == "della_magprune":
            params.append(("epsilon", Epsilon, 0.15))
        normalize_help = ("divide by the summed weights of the agreeing models" if self.consensus
                          else "divide by the sum of the weights")
        params += [("normalize", Annotated[bool, normalize_help], self.normalize),
                   ("rescale", Annotated[bool, rescale_help], rescale), ("lambda_", Lambda, 1.0)]
        if self.consensus:
            params.append(("consensus", Consensus, "sum"))
        params.append(("int8_mask", Int8Mask, False))
        if self.sparsification in ("random", "della_magprune"):  # randomised: a seeded generator per tensor
            params.append(("generator", Optional[torch.Generator], None))
        return [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in params]

    def register(self) -> None:
        """Register the method: a function with this variant's signature that calls `_gta`."""
        variant, params = self, self.parameters()
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

        def method(tensors: Tensors, base: BaseTensor, **given: Any) -> torch.Tensor:
            kw = {**defaults, **given}
            return _gta(tensors, base, weight=kw["weight"], density=kw["density"] if variant.sparsification else None,
                        sparsification=variant.sparsification, consensus=kw.get("consensus"),
                        normalize=kw["normalize"], rescale=kw["rescale"], lambda_=kw["lambda_"],
                        gamma=kw.get("gamma"), epsilon=kw.get("epsilon"), generator=kw.get("generator"))

        method.__name__ = method.__qualname__ = self.name
        method.__doc__ = "\n\n".join(textwrap.fill(par, 92) for par in self.doc.split("\n\n"))
        method.__annotations__ = {p.name: p.annotation for p in params}
        method.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("tensors", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Tensors),
             inspect.Parameter("base", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=BaseTensor), *params],
            return_annotation=torch.Tensor)
        merge_method(self.name, base="required", tags=("streaming",), summary=self.summary, paper=self.paper,
                     formula=self.formula, starting=dict(self.starting), grid=self.grid_values())(method)


# `rescale` per sparsification: (default, help); dropping at random rescales by default, as mergekit does
_RESCALE: dict[Optional[str], tuple[bool, str]] = {
    None: (False, "accepted for compatibility; nothing is sparsified"),
    "magnitude": (False, "rescale each trimmed task vector to its original L1 norm"),
    "magnitude_outliers": (False, "rescale each task vector to its original L1 norm"),
    "random": (True, "rescale each task vector to its original L1 norm after dropping"),
    "della_magprune": (True, "rescale each task vector to its original L1 norm after dropping"),
}
_DARE = "Yu et al. 2023, Language Models are Super Mario (arXiv:2311.03099)"
_DARE_CITE = ('Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a '
              'Free Lunch", ICML 2024 (arXiv:2311.03099).')
_CRUMBS = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"
_CRUMBS_CITE = ('Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", '
                'ECCV 2024 (arXiv:2312.06795).')
_DELLA = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
_DELLA_CITE = ('Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based '
               'Sampling", 2024 (arXiv:2406.11617).')

VARIANTS = (
    _Variant("task_arithmetic", None, False, False,
             "base + λ·Σ w_i (θ_i − base): weighted sum of task vectors",
             "Ilharco et al. 2022, Editing models with task arithmetic (arXiv:2212.04089)",
             "θ = θ₀ + λ·Σᵢ wᵢ·τᵢ,  τᵢ = θᵢ − θ₀",
             "Task arithmetic: θ = θ0 + λ Σ_i w_i τ_i with task vectors τ_i = θ_i − θ0.\n\n"
             "With `normalize` the sum is divided by Σ_i w_i (skipped when that is ~0). Ilharco et al., "
             '"Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089).',
             starting=(("weight", 1.0), ("density", 0.5), ("lambda", 0.3)),
             grid={"lambda": (0.2, 0.3, 0.5, 0.7, 1.0)}),
    _Variant("ties", "magnitude", True, True,
             "TIES: trim task vectors by magnitude, elect signs, average the agreeing entries",
             "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
             "θ = θ₀ + λ·Σᵢ wᵢ·mᵢ⊙trim(τᵢ, dᵢ) / Σᵢ wᵢ·mᵢ,  mᵢ = entries agreeing with the elected sign",
             "TIES-Merging: trim each τ_i = θ_i − θ0 to its top-k entries by |τ| (k = density·n), elect a sign per "
             "entry s = sgn(Σ_i w_i τ'_i) (ties to +; `consensus: count` votes with Σ_i sgn(w_i τ'_i) instead), and "
             "merge only the agreeing entries (disjoint mean): θ = θ0 + λ Σ_i w_i τ'_i [sgn(w_i τ'_i) = s] / "
             'Σ_i w_i [sgn(w_i τ\'_i) = s]. Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", '
             "NeurIPS 2023 (arXiv:2306.01708)."),
    _Variant("dare_ties", "random", True, False,
             "DARE drop-and-rescale of task vectors, then TIES sign election", _DARE,
             "θ = θ₀ + λ·TIES-merge(drop(τᵢ, 1−dᵢ)/dᵢ, wᵢ)",
             "DARE + TIES: each entry of τ_i = θ_i − θ0 is kept with probability `density` (a seeded Bernoulli "
             "mask m_i), τ'_i = m_i ⊙ τ_i · ||τ_i||_1/||m_i ⊙ τ_i||_1 with `rescale` (≈ 1/density: mergekit's L1 "
             "form of DARE's rescale), then TIES sign election and disjoint merge as in `ties`. " + _DARE_CITE),
    _Variant("dare_linear", "random", False, False,
             "DARE drop-and-rescale of task vectors, then a weighted sum", _DARE,
             "θ = θ₀ + λ·Σᵢ wᵢ·drop(τᵢ, 1−dᵢ)/dᵢ",
             "DARE (linear): τ'_i = m_i ⊙ τ_i with a seeded Bernoulli(density) mask m_i, rescaled by "
             "||τ_i||_1/||τ'_i||_1 when `rescale` (≈ 1/density), and θ = θ0 + λ Σ_i w_i τ'_i (divided by Σ_i w_i "
             "with `normalize`). " + _DARE_CITE),
    _Variant("breadcrumbs", "magnitude_outliers", False, False,
             "Model Breadcrumbs: drop outliers and small entries of task vectors, weighted sum", _CRUMBS,
             "θ = θ₀ + λ·Σᵢ wᵢ·crumbs(τᵢ; keep dᵢ, drop top γᵢ)",
             "Model Breadcrumbs: in each τ_i = θ_i − θ0 sorted by |τ|, drop the largest gamma·n entries (outliers) "
             "and keep the next density·n (fewer outliers are dropped when density + gamma > 1); "
             "θ = θ0 + λ Σ_i w_i τ'_i. " + _CRUMBS_CITE),
    _Variant("breadcrumbs_ties", "magnitude_outliers", True, False,
             "Model Breadcrumbs sparsification followed by TIES sign election", _CRUMBS,
             "θ = θ₀ + λ·TIES-merge(crumbs(τᵢ; keep dᵢ, drop top γᵢ), wᵢ)",
             "Breadcrumbs + TIES: τ'_i keeps the entries of τ_i = θ_i − θ0 ranked (by |τ|) after the top gamma·n "
             "and within the next density·n, then signs are elected by Σ_i w_i τ'_i and only agreeing entries are "
             "summed: θ = θ0 + λ Σ_i w_i τ'_i [agrees] (÷ Σ_i w_i [agrees] with `normalize`). " + _CRUMBS_CITE),
    _Variant("della", "della_magprune", True, True,
             "DELLA: magnitude-ranked random drop (MagPrune), rescale, TIES sign election", _DELLA,
             "θ = θ₀ + λ·TIES-merge(magprune(τᵢ; dᵢ ± εᵢ), wᵢ)",
             "DELLA-Merging: within each row of τ_i = θ_i − θ0, entry of rank r (1 = smallest |τ|) among L is kept "
             "with probability p = density − ε + 2ε(r − 1)/(L − 1) (seeded), the survivors are rescaled to the "
             "original L1 norm (`rescale`), then TIES sign election and disjoint mean: θ = θ0 + λ Σ_i w_i τ'_i "
             "[agrees] / Σ_i w_i [agrees]. Requires 0 < density ± ε < 1. " + _DELLA_CITE),
    _Variant("della_linear", "della_magprune", False, False,
             "DELLA magnitude-ranked random drop, rescale, then a weighted sum", _DELLA,
             "θ = θ₀ + λ·Σᵢ wᵢ·magprune(τᵢ; dᵢ ± εᵢ)",
             "DELLA (linear): MagPrune each τ_i = θ_i − θ0 (keep probability density − ε … density + ε, rising "
             "with the row-wise magnitude rank; seeded), rescale survivors to the original L1 norm, and "
             "θ = θ0 + λ Σ_i w_i τ'_i (÷ Σ_i w_i with `normalize`). " + _DELLA_CITE),
)

for _v in VARIANTS:
    _v.register()
