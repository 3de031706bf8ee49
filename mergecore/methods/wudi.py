"""WUDI-Merging: a data-free merged task vector that interferes least with each task's own inputs,
found per weight matrix by Adam on an objective built from the task vectors alone."""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

import torch

from mergecore.methods._cost import Cost, matmul_flops
from mergecore.methods.base import (BaseTensor, Ends, Range, Tensors, merge_method, need_base, need_count,
                                    owns_inputs)

_PAPER = ("Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via "
          "Task Vectors (ICML 2025, arXiv:2503.08099)")
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the authors' code uses


def gram_terms(taus: Tensors, base: torch.Tensor, owned: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(Σ τ_i, A = Σ w_i τ_iᵀτ_i, B = Σ w_i τ_i τ_iᵀτ_i) with τ_i = taus[i] − base and w_i = 1/‖τ_i‖²_F,
    reading each input once; a zero task vector has weight 0 (its term of the loss is 0)."""
    rows, cols = base.shape
    total = torch.zeros_like(base)
    a = base.new_zeros(cols, cols)
    b = torch.zeros_like(base)
    for i in range(len(taus)):
        x = taus[i]
        tau = x.sub_(base) if owned else x - base
        total.add_(tau)
        norm2 = float(torch.linalg.vector_norm(tau)) ** 2
        if norm2 > 0:
            g = tau.T @ tau
            a.add_(g, alpha=1.0 / norm2)
            b.addmm_(tau, g, alpha=1.0 / norm2)
            del g
        del tau
    return total, a, b


def gradient(tau_m: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """∇ of Σ_i w_i‖(τ_m − τ_i)τ_iᵀ‖²_F at τ_m: 2Σ_i w_i(τ_m − τ_i)τ_iᵀτ_i = 2(τ_m A − B), one matmul."""
    out = torch.mm(tau_m, a, out=out)
    return out.sub_(b).mul_(2.0)


def adam(tau_m: torch.Tensor, a: torch.Tensor, b: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Run `steps` Adam steps on τ_m in place, written as torch.optim.Adam's single-tensor update
    (bias-corrected moments, eps outside the square root, no weight decay)."""
    if steps <= 0 or lr == 0:
        return tau_m
    (beta1, beta2), g = BETAS, torch.empty_like(tau_m)
    m, v, denom = torch.zeros_like(tau_m), torch.zeros_like(tau_m), torch.empty_like(tau_m)
    for t in range(1, steps + 1):
        gradient(tau_m, a, b, out=g)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        torch.sqrt(v, out=denom).div_(math.sqrt(1 - beta2**t)).add_(EPS)
        tau_m.addcdiv_(m, denom, value=-step_size)
    return tau_m


def _wudi_cost(shape: tuple[int, ...], n_models: int, params: dict[str, Any]) -> Optional[Cost]:
    """Per 2-D tensor: the Gram terms once (2 matmuls a model), then one [r, c] x [c, c] matmul per step."""
    if len(shape) != 2:
        return None
    r, c = shape
    steps = int(params.get("steps", 300))
    setup = n_models * (matmul_flops(c, r, c) + matmul_flops(r, c, c))
    per_step = matmul_flops(r, c, c) + 12.0 * r * c
    return Cost(flops=setup + steps * per_step, extra_bytes=4 * (2 * c * c + 6 * r * c),
                note=f"wudi: {steps} Adam steps per matrix, each one [rows, cols] x [cols, cols] matmul")


@merge_method(base="required", min_models=2, tags=("matrices", "streaming"), cost=_wudi_cost,
              summary="per weight matrix, Adam-minimise each task's interference Σ‖(τ_m − τᵢ)τᵢᵀ‖²/‖τᵢ‖²",
              formula="θ = θ₀ + λ·τ_m,  τ_m = argmin Σᵢ ‖(τ_m − τᵢ)τᵢᵀ‖²_F / ‖τᵢ‖²_F  (Adam from Σᵢ τᵢ)",
              paper=_PAPER, starting={"steps": 300, "lambda": 1.0},
              grid={"lambda": (0.2, 0.3, 0.5, 0.7, 1.0)})
def wudi(tensors: Tensors, base: BaseTensor, *,
         steps: Annotated[int, Range(0, None), Ends("0 = Σ τᵢ (task arithmetic)", "more = closer to the minimum"),
                          "Adam iterations per weight matrix"] = 300,
         lr: Annotated[float, Range(0.0, None), "Adam learning rate"] = 1e-5,
         lambda_: Annotated[float, "scale of the merged task vector"] = 1.0) -> torch.Tensor:
    """θ = θ0 + λ·τ_m, τ_m ≈ argmin_τ Σ_i ‖(τ − τ_i)τ_iᵀ‖²_F / ‖τ_i‖²_F for a 2-D weight.

    WUDI-Merging (Cheng et al., ICML 2025, arXiv:2503.08099): the rows of a linear layer's task
    vector τ_i = θ_i − θ0 span the inputs that task i's fine-tuning moved, so the interference
    of the merged τ_m on task i is measured as (τ_m − τ_i)τ_iᵀ, weighted by 1/‖τ_i‖²_F. τ_m starts at
    Σ_i τ_i and takes `steps` steps of Adam (β = (0.9, 0.999), eps 1e-8) with learning rate `lr`.
    Defaults from the authors' code (nathanielyvo/WUDI-Merging, vit/coef.py; FusionBench
    fusion_bench/method/wudi/wudi.py): 300 steps (FusionBench's config: 400), lr 1e-5, squared norms
    in the weights (FusionBench and the authors' nlp_roberta/lamassu.py), and θ0 + τ_m, i.e. λ = 1
    (the ViT script sweeps λ from 0 to 1.5 on test data). The gradient 2Σ_i w_i(τ_m − τ_i)τ_iᵀτ_i =
    2(τ_m A − B) uses A = Σ w_i τ_iᵀτ_i and B = Σ w_i τ_iτ_iᵀτ_i computed once, so a step is one
    matmul, not one per model; each input is read once, in order. Every 2-D tensor is optimised
    (as in FusionBench; embeddings included); any other tensor takes FusionBench's fallback, the
    mean of the task vectors: θ0 + λ·(1/n)Σ_i τ_i. A zero task vector gets weight 0 (the reference
    divides 0 by 0 there). Cost: about steps·2·rows·cols² flops, e.g. ~5 TFLOP for a 2048 x 2048
    matrix at 300 steps: 1-2 min on 2 CPU cores, a fraction of a second with `--device cuda`.
    """
    base = need_base("wudi", base)
    need_count("wudi", tensors, 2, None, "at least two fine-tuned models besides the base_model")
    owned = owns_inputs(tensors)
    if base.dim() != 2:
        total = torch.zeros_like(base)
        for i in range(len(tensors)):
            x = tensors[i]
            total.add_(x.sub_(base) if owned else x - base)
        return total.div_(len(tensors)).mul_(lambda_).add_(base)
    tau_m, a, b = gram_terms(tensors, base, owned)
    adam(tau_m, a, b, steps, lr)
    del a, b
    return tau_m.mul_(lambda_).add_(base)
