"""Task-vector methods: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

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

from typing import Annotated, Literal

import torch

from mergecore.methods._sparsify import SignConsensus, sparsify_
from mergecore.methods.base import owns_inputs
from mergecore.methods.base import PerModel, Range, merge_method

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
RescaleDrop = Annotated[bool, "rescale each task vector to its original L1 norm after dropping"]


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


@merge_method(
    "task_arithmetic",
    base="required",
    tags=("streaming",),
    summary="base + λ·Σ w_i (θ_i − base): weighted sum of task vectors",
    paper="Ilharco et al. 2022, Editing models with task arithmetic (arXiv:2212.04089)",
)
def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Weight,
    density: DensityUnused = 1.0,
    normalize: Annotated[bool, "divide by the sum of the weights"] = False,
    rescale: Annotated[bool, "accepted for compatibility; nothing is sparsified"] = False,
    lambda_: Lambda = 1.0,
    int8_mask: Int8Mask = False,
) -> torch.Tensor:
    """Task arithmetic: θ = θ0 + λ Σ_i w_i τ_i with task vectors τ_i = θ_i − θ0.

    With `normalize` the sum is divided by Σ_i w_i (skipped when that is ~0). Ilharco et al.,
    "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089).
    """
    return _gta(
        tensors, base, weight=weight, density=None, sparsification=None, consensus=None,
        normalize=normalize, rescale=rescale, lambda_=lambda_,
    )


@merge_method(
    "ties",
    base="required",
    tags=("streaming",),
    summary="TIES: trim task vectors by magnitude, elect signs, average the agreeing entries",
    paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
)
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Weight,
    density: Density = 1.0,
    normalize: Annotated[bool, "divide by the summed weights of the agreeing models"] = True,
    rescale: Annotated[bool, "rescale each trimmed task vector to its original L1 norm"] = False,
    lambda_: Lambda = 1.0,
    consensus: Consensus = "sum",
    int8_mask: Int8Mask = False,
) -> torch.Tensor:
    """TIES-Merging: trim each τ_i = θ_i − θ0 to its top-k entries by |τ| (k = density·n),
    elect a sign per entry s = sgn(Σ_i w_i τ'_i) (ties to +; `consensus: count` votes with
    Σ_i sgn(w_i τ'_i) instead), and merge only the agreeing entries (disjoint mean):
    θ = θ0 + λ Σ_i w_i τ'_i [sgn(w_i τ'_i) = s] / Σ_i w_i [sgn(w_i τ'_i) = s].
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
    (arXiv:2306.01708).
    """
    return _gta(
        tensors, base, weight=weight, density=density, sparsification="magnitude",
        consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_,
    )


@merge_method(
    "dare_ties",
    base="required",
    tags=("streaming",),
    summary="DARE drop-and-rescale of task vectors, then TIES sign election",
    paper="Yu et al. 2023, Language Models are Super Mario (arXiv:2311.03099)",
)
def dare_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Weight,
    density: Density = 1.0,
    normalize: Annotated[bool, "divide by the summed weights of the agreeing models"] = False,
    rescale: RescaleDrop = True,
    lambda_: Lambda = 1.0,
    consensus: Consensus = "sum",
    int8_mask: Int8Mask = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE + TIES: each entry of τ_i = θ_i − θ0 is kept with probability `density` (a seeded
    Bernoulli mask m_i), τ'_i = m_i ⊙ τ_i · ||τ_i||_1/||m_i ⊙ τ_i||_1 with `rescale`
    (≈ 1/density: mergekit's L1 form of DARE's rescale), then TIES sign election and
    disjoint merge as in `ties`. Yu et al., "Language Models are Super Mario: Absorbing
    Abilities from Homologous Models as a Free Lunch", ICML 2024 (arXiv:2311.03099).
    """
    return _gta(
        tensors, base, weight=weight, density=density, sparsification="random",
        consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_,
        generator=generator,
    )


@merge_method(
    "dare_linear",
    base="required",
    tags=("streaming",),
    summary="DARE drop-and-rescale of task vectors, then a weighted sum",
    paper="Yu et al. 2023, Language Models are Super Mario (arXiv:2311.03099)",
)
def dare_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Weight,
    density: Density = 1.0,
    normalize: Annotated[bool, "divide by the sum of the weights"] = False,
    rescale: RescaleDrop = True,
    lambda_: Lambda = 1.0,
    int8_mask: Int8Mask = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE (linear): τ'_i = m_i ⊙ τ_i with a seeded Bernoulli(density) mask m_i, rescaled
    by ||τ_i||_1/||τ'_i||_1 when `rescale` (≈ 1/density), and θ = θ0 + λ Σ_i w_i τ'_i
    (divided by Σ_i w_i with `normalize`). Yu et al., "Language Models are Super Mario:
    Absorbing Abilities from Homologous Models as a Free Lunch", ICML 2024 (arXiv:2311.03099).
    """
    return _gta(
        tensors, base, weight=weight, density=density, sparsification="random",
        consensus=None, normalize=normalize, rescale=rescale, lambda_=lambda_,
        generator=generator,
    )


@merge_method(
    "breadcrumbs",
    base="required",
    tags=("streaming",),
    summary="Model Breadcrumbs: drop outliers and small entries of task vectors, weighted sum",
    paper="Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)",
)
def breadcrumbs(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Weight,
    density: Density = 1.0,
    gamma: Gamma = 0.01,
    normalize: Annotated[bool, "divide by the sum of the weights"] = False,
    rescale: Annotated[bool, "rescale each task vector to its original L1 norm"] = False,
    lambda_: Lambda = 1.0,
    int8_mask: Int8Mask = False,
) -> torch.Tensor:
    """Model Breadcrumbs: in each τ_i = θ_i − θ0 sorted by |τ|, drop the largest gamma·n
    entries (outliers) and keep the next density·n (fewer outliers are dropped when
    density + gamma > 1); θ = θ0 + λ Σ_i w_i τ'_i. Davari & Belilovsky, "Model Breadcrumbs:
    Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024 (arXiv:2312.06795).
    """
    return _gta(
        tensors, base, weight=weight, density=density, sparsification="magnitude_outliers",
        consensus=None, normalize=normalize, rescale=rescale, lambda_=lambda_, gamma=gamma,
    )


@merge_method(
    "breadcrumbs_ties",
    base="required",
    tags=("streaming",),
    summary="Model Breadcrumbs sparsification followed by TIES sign election",
    paper="Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)",
)
def breadcrumbs_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Weight,
    density: Density = 1.0,
    gamma: Gamma = 0.01,
    normalize: Annotated[bool, "divide by the summed weights of the agreeing models"] = False,
    rescale: Annotated[bool, "rescale each task vector to its original L1 norm"] = False,
    lambda_: Lambda = 1.0,
    consensus: Consensus = "sum",
    int8_mask: Int8Mask = False,
) -> torch.Tensor:
    """Breadcrumbs + TIES: τ'_i keeps the entries of τ_i = θ_i − θ0 ranked (by |τ|) after the
    top gamma·n and within the next density·n, then signs are elected by Σ_i w_i τ'_i and only
    agreeing entries are summed: θ = θ0 + λ Σ_i w_i τ'_i [agrees] (÷ Σ_i w_i [agrees] with
    `normalize`). Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging
    with Sparse Masks", ECCV 2024 (arXiv:2312.06795).
    """
    return _gta(
        tensors, base, weight=weight, density=density, sparsification="magnitude_outliers",
        consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_, gamma=gamma,
    )


@merge_method(
    "della",
    base="required",
    tags=("streaming",),
    summary="DELLA: magnitude-ranked random drop (MagPrune), rescale, TIES sign election",
    paper="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
)
def della(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Weight,
    density: Density = 1.0,
    epsilon: Epsilon = 0.15,
    normalize: Annotated[bool, "divide by the summed weights of the agreeing models"] = True,
    rescale: RescaleDrop = True,
    lambda_: Lambda = 1.0,
    consensus: Consensus = "sum",
    int8_mask: Int8Mask = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA-Merging: within each row of τ_i = θ_i − θ0, entry of rank r (1 = smallest |τ|)
    among L is kept with probability p = density − ε + 2ε(r − 1)/(L − 1) (seeded), the
    survivors are rescaled to the original L1 norm (`rescale`), then TIES sign election and
    disjoint mean: θ = θ0 + λ Σ_i w_i τ'_i [agrees] / Σ_i w_i [agrees]. Requires
    0 < density ± ε < 1. Deep et al., "DELLA-Merging: Reducing Interference in Model Merging
    through Magnitude-Based Sampling", 2024 (arXiv:2406.11617).
    """
    return _gta(
        tensors, base, weight=weight, density=density, sparsification="della_magprune",
        consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_,
        epsilon=epsilon, generator=generator,
    )


@merge_method(
    "della_linear",
    base="required",
    tags=("streaming",),
    summary="DELLA magnitude-ranked random drop, rescale, then a weighted sum",
    paper="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
)
def della_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Weight,
    density: Density = 1.0,
    epsilon: Epsilon = 0.15,
    normalize: Annotated[bool, "divide by the sum of the weights"] = False,
    rescale: RescaleDrop = True,
    lambda_: Lambda = 1.0,
    int8_mask: Int8Mask = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA (linear): MagPrune each τ_i = θ_i − θ0 (keep probability density − ε …
    density + ε, rising with the row-wise magnitude rank; seeded), rescale survivors to the
    original L1 norm, and θ = θ0 + λ Σ_i w_i τ'_i (÷ Σ_i w_i with `normalize`). Deep et al.,
    "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
    Sampling", 2024 (arXiv:2406.11617).
    """
    return _gta(
        tensors, base, weight=weight, density=density, sparsification="della_magprune",
        consensus=None, normalize=normalize, rescale=rescale, lambda_=lambda_,
        epsilon=epsilon, generator=generator,
    )
