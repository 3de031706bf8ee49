"""How every search chooses its result: on the full validation split, never below a data-free merge.

A search may steer itself with cheap scores (RMM's episode rewards on a `data_ratio` subset,
evo's candidates on a subset, DAM's periodic evaluations on `eval_subset`), but those scores
are noisy and biased towards what the search happened to try most. So the choice itself is
made here, the same way for every search:

* the search hands over a few `Candidate`s of its own (its best few by the subset score, or
  its best and last states) and the data-free merges it can express (each RMM operator on
  every layer, the evo template at its starting values, DAM's uniform coefficients), every one
  scored on the full validation split (a `search.validation` event each);
* `choose` returns the search's best on that split unless a data-free candidate scores
  strictly higher there, in which case the data-free one is returned and the
  `search.selected` event says so (`data_free: true`).

The final (test) tasks are never seen here: they are scored once, on the replayed result,
by `mergecore.search.base`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mergecore.errors import MergeError

OWN = "search"
DATA_FREE = "data-free"

Emit = Callable[[str, dict[str, Any]], None]


@dataclass
class Candidate:
    """One result a search could return, scored on the full validation split (`mean`, `scores`);
    `subset` is the score that ranked it during the search, when it had one; `ref` is the
    search's own handle on it (a trajectory, a genome, a coefficient state) and is never written."""

    label: str
    source: str  # OWN (the search's) or DATA_FREE
    mean: float
    scores: dict[str, float]
    subset: Optional[float] = None
    ref: Any = field(default=None, compare=False, repr=False)
    info: dict[str, Any] = field(default_factory=dict)  # what result.json shows besides (episode, step, ...)

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "source": self.source, "mean": self.mean, "scores": dict(self.scores),
                "subset": self.subset, **self.info}


def validated(emit: Emit, candidate: Candidate, tasks: str) -> Candidate:
    """Record one full-validation score as a `search.validation` event; returns the candidate."""
    emit("search.validation", {"tasks": tasks, **candidate.as_dict()})
    return candidate


def _best(candidates: list[Candidate]) -> Optional[Candidate]:
    """The highest `mean`, the earliest on a tie (the search's own order decides ties)."""
    best = None
    for c in candidates:
        if best is None or c.mean > best.mean:
            best = c
    return best


def choose(candidates: list[Candidate], emit: Emit, tasks: str) -> tuple[Candidate, dict[str, Any]]:
    """The result: the search's best on the full validation split, or the best data-free candidate
    when that scores strictly higher. Returns it and result.json's `validation` block."""
    own = _best([c for c in candidates if c.source == OWN])
    free = _best([c for c in candidates if c.source == DATA_FREE])
    if own is None and free is None:
        raise MergeError("no candidate was scored on the validation split")
    fallback = free is not None and (own is None or free.mean > own.mean)
    chosen = free if fallback else own
    assert chosen is not None
    data = {
        "tasks": tasks, "chosen": chosen.label, "source": chosen.source, "mean": chosen.mean,
        "search_best": None if own is None else {"label": own.label, "mean": own.mean},
        "data_free_best": None if free is None else {"label": free.label, "mean": free.mean},
        "data_free": fallback,
    }
    emit("search.selected", data)
    return chosen, {**data, "candidates": [c.as_dict() for c in candidates]}
