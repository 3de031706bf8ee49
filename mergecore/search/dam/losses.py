"""DAM loss terms on rows of logits (one row per example, or per token of a causal LM).

Student rows `s` are the merged model's logits [M, V]; teacher rows are source model i's on the
same inputs, either full logits [M, V] or top-k (values [M, k] and vocabulary indices [M, k]).
With top-k teachers the student's logits are gathered at the teacher's indices and both
distributions are taken over those k entries (as the DAM reference code does).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _pair(student: torch.Tensor, teacher: torch.Tensor, indices: Optional[torch.Tensor]):
    if indices is not None:
        student = student.gather(-1, indices.long())
    return student, teacher


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, indices: Optional[torch.Tensor] = None, *,
            temperature: float = 2.0, direction: str = "forward") -> torch.Tensor:
    """Mean over rows of KL at temperature T, times T² (Hinton et al.'s scaling).

    forward: KL(teacher ‖ merged) = Σ p_t (log p_t − log p_s) -- what the DAM code optimises;
    reverse: KL(merged ‖ teacher) = Σ p_s (log p_s − log p_t).
    """
    s, t = _pair(student, teacher, indices)
    ls = F.log_softmax(s / temperature, dim=-1)
    lt = F.log_softmax(t / temperature, dim=-1)
    if direction == "forward":
        kl = (lt.exp() * (lt - ls)).sum(-1)
    elif direction == "reverse":
        kl = (ls.exp() * (ls - lt)).sum(-1)
    else:
        raise ValueError(f"KL direction must be 'forward' or 'reverse', got '{direction}'")
    return kl.mean() * temperature**2


def mse_loss(student: torch.Tensor, teacher: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared difference of the logits (over rows and entries; the teacher's top-k entries only)."""
    s, t = _pair(student, teacher, indices)
    return ((s - t) ** 2).mean()


def entropy_loss(student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of the entropy of the merged model's predictions (needs no teacher; AdaMerging)."""
    ls = F.log_softmax(student / temperature, dim=-1)
    return -(ls.exp() * ls).sum(-1).mean()


def cosine_term(coefs: list[torch.Tensor]) -> torch.Tensor:
    """Σ over tensors Σ_{i<j} cos(c_i, c_j): each entry of `coefs` is one tensor's [R, ...] coefficients."""
    total = torch.zeros(())
    for c in coefs:
        flat = c.reshape(c.shape[0], -1)
        if flat.shape[0] < 2:
            continue
        unit = F.normalize(flat, dim=-1, eps=1e-12)
        sim = unit @ unit.T
        iu = torch.triu_indices(flat.shape[0], flat.shape[0], offset=1)
        total = total + sim[iu[0], iu[1]].sum()
    return total


def l1_term(coefs: list[torch.Tensor]) -> torch.Tensor:
    return sum((c.abs().sum() for c in coefs), torch.zeros(()))


def l2_term(coefs: list[torch.Tensor]) -> torch.Tensor:
    return sum(((c**2).sum() for c in coefs), torch.zeros(()))
