"""Consensus merging (TALL masks): keep the entries of the task-arithmetic vector that at least
k tasks rely on."""

from __future__ import annotations

from typing import Annotated

import torch

from mergecore.methods.base import BaseTensor, Ends, Range, Tensors, merge_method, need_base, need_count

_PAPER = ("Wang, Dimitriadis, Ortiz-Jimenez, Fleuret & Frossard 2024, Localizing Task Information for Improved "
          "Model Merging and Compression (arXiv:2405.07813)")


@merge_method(base="required", min_models=2,
              summary="task arithmetic restricted to entries that at least k tasks' TALL masks keep",
              formula="θ = θ₀ + λ·[Σₜ mₜ ≥ k]⊙τ_MTL,  mₜ = [|τₜ| > λ_tall·|τ_MTL − τₜ|],  τ_MTL = Σᵢ τᵢ",
              paper=_PAPER, starting={"lambda": 0.3},
              grid={"lambda": (0.2, 0.3, 0.5, 0.7, 1.0)})
def consensus_ta(tensors: Tensors, base: BaseTensor, *,
                 tall_mask_lambda: Annotated[float, Range(0.0, None), Ends(
                     "0 = every task claims every changed entry", "larger = tasks claim fewer entries"),
                     "λ of the TALL masks: task t claims entry j when |τ_t| > λ·|τ_MTL − τ_t|"] = 0.6,
                 k: Annotated[int, Range(0, None), Ends("0 = keep all (task arithmetic)", "more than the models = "
                                                         "keep none ({base})"),
                              "keep an entry claimed by at least k tasks' masks"] = 2,
                 lambda_: Annotated[float, "scale α of the masked multi-task vector"] = 1.0) -> torch.Tensor:
    """θ = θ0 + α·(m_cons ⊙ τ_MTL), m_cons = [Σ_t m_t ≥ k], m_t = [|τ_t| > λ·|τ_MTL − τ_t|].

    Consensus Task Arithmetic (Wang et al., ICML 2024, arXiv:2405.07813): τ_t = θ_t − θ0, the
    multi-task vector τ_MTL = Σ_t τ_t, and the TALL mask m_t marks the entries where τ_t is
    "important" to task t, i.e. where θ_t is closer to the multi-task model θ0 + τ_MTL than to θ0
    (scaled by λ). Entries claimed by fewer than k tasks ("selfish" with k = 2, "catastrophic"
    with k = 1) are dropped. Recipe names: `tall_mask_lambda` is the paper's λ, `lambda` its α.

    As in the authors' code (nik-dim/tall_masks, src/utils/tallmask_utils.py) the mask uses a
    strict `>` and k = 2 is the released default (`prun_thre_k`). The paper picks λ per task on
    validation data from {0.2, …, 0.6}; without data the default 0.6 is FusionBench's
    (`tall_mask_lambda`), and α (chosen on validation data in [0, 1] in the paper) defaults to
    1.0 like `task_arithmetic` here. The rule is entry-wise, so every tensor (1-D too) takes it.
    """
    base = need_base("consensus_ta", base)
    need_count("consensus_ta", tensors, 2, None, "at least two fine-tuned models besides the base_model")
    tau = torch.empty_like(base)
    mtl = torch.zeros_like(base)
    for x in tensors:
        mtl.add_(torch.sub(x, base, out=tau))
    votes = torch.zeros_like(base)
    other = torch.empty_like(base)
    for x in tensors:
        torch.sub(x, base, out=tau)
        torch.sub(mtl, tau, out=other)
        other.abs_().mul_(tall_mask_lambda)
        votes.add_(tau.abs_().gt_(other))  # gt_ writes 1.0 / 0.0 into the float tensor
    del tau, other
    keep = votes.ge_(k)
    return mtl.mul_(keep).mul_(lambda_).add_(base)
