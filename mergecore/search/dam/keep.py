"""DAM's validation discipline: the data-free starts its parametrisation expresses, and the best
state it keeps while training.

Gradient steps on a distillation or entropy loss do not always raise the validation score, so
a DAM / AdaMerging run

* starts from the best uniform merge it can express (`uniform_starts`, each scored on the full
  validation split; the best becomes the initial coefficients, the default start on a tie);
* keeps the best state by its periodic evaluations (`Kept`) and stops once `patience`
  evaluations in a row brought no better score;
* returns, among that best state, the last state and the uniform merges, the one that scores
  highest on the full validation split (`mergecore.search.validation.choose`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from mergecore.methods.dam import inverse_activate
from mergecore.search.validation import DATA_FREE, OWN, Candidate, choose, validated


def uniform_starts(form: str, include_base: bool, n_models: int, transform: str, init: Optional[float] = None,
                   clamp: Optional[tuple[float, float]] = None) -> list[tuple[str, list[float]]]:
    """(label, effective coefficient of each row) of the uniform merges DAM's parametrisation
    expresses, the default start first (`init` when given, else 1/rows for `sum`, 0.3 for
    `task_vectors`): weight averaging, and with a base (`task_vectors`, or `sum` with the base as
    row 0, W = c0·W0 + Σ c_i·W_i) task arithmetic W0 + λ·Σ(W_i − W0) at λ = 0.3 and 1. Values a
    `tanh` transform or a `clamp` cannot hold are left out, and so are repeats."""
    n = n_models
    if form == "task_vectors":
        grid = [("task arithmetic (lambda 0.3)", [0.3] * n), ("weight averaging", [1.0 / n] * n),
                ("task arithmetic (lambda 1)", [1.0] * n)]
    elif include_base:
        grid = [("weight averaging with the base", [1.0 / (n + 1)] * (n + 1)),
                ("weight averaging", [0.0] + [1.0 / n] * n),
                ("task arithmetic (lambda 0.3)", [1.0 - 0.3 * n] + [0.3] * n),
                ("task arithmetic (lambda 1)", [1.0 - n] + [1.0] * n)]
    else:
        grid = [("weight averaging", [1.0 / n] * n)]
    if init is not None:
        grid.insert(0, (f"every coefficient {init:g}", [float(init)] * len(grid[0][1])))
    out: list[tuple[str, list[float]]] = []
    for label, values in grid:
        if transform == "tanh" and not all(-1 < v < 1 for v in values):
            continue
        raw = [inverse_activate(v, transform) for v in values]
        if clamp is not None and not all(clamp[0] <= r <= clamp[1] for r in raw):
            continue
        if all(values != v for _, v in out):
            out.append((label, values))
    return out


@dataclass
class Kept:
    """The best state by the periodic evaluations (its step, score and raw coefficients), how many
    evaluations since it brought no better score, and the step a run stopped early at."""

    step: Optional[int] = None
    mean: Optional[float] = None
    scores: dict[str, float] = field(default_factory=dict)
    coefs: dict[str, torch.Tensor] = field(default_factory=dict)
    since: int = 0
    stopped: Optional[int] = None

    def offer(self, step: int, mean: float, scores: dict[str, float], coefs: dict[str, torch.Tensor]) -> bool:
        """Keep this state when it scores strictly higher than the kept one; True when kept."""
        if self.mean is not None and not mean > self.mean:
            self.since += 1
            return False
        self.step, self.mean, self.scores, self.coefs, self.since = step, mean, dict(scores), coefs, 0
        return True

    def pack(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The JSON part for a checkpoint; the coefficients go into `tensors` as `best.<name>`."""
        tensors.update({f"best.{k}": v for k, v in self.coefs.items()})
        return {"step": self.step, "mean": self.mean, "scores": self.scores, "since": self.since,
                "stopped": self.stopped}

    @classmethod
    def unpack(cls, state: Any, tensors: dict[str, torch.Tensor]) -> "Kept":
        """From a checkpoint (absent from checkpoints written before it was kept: nothing kept)."""
        if state is None:
            return cls()
        if not isinstance(state, dict):
            raise TypeError("'kept' is not an object")
        step, mean, since, stopped = (state.get(k) for k in ("step", "mean", "since", "stopped"))
        scores = state.get("scores", {})
        if (step is not None and type(step) is not int) or (mean is not None and type(mean) not in (int, float)) \
                or type(since) is not int or (stopped is not None and type(stopped) is not int) \
                or not isinstance(scores, dict):
            raise TypeError("'kept' holds a malformed best state")
        coefs = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        if step is not None and not coefs:
            raise ValueError("the kept best state has no coefficients")
        return cls(step, None if mean is None else float(mean), scores, coefs, since, stopped)


class ChoosesOnValidation:
    """What `DAMSearch` does around training: score the uniform merges and pick the start, then
    choose the result on the full validation split. (A mixin: it reads the search's merger,
    module, evaluator, kept state and events.)"""

    merger: Any
    module: Any
    evaluate_fn: Any
    starts: list[tuple[str, list[float]]]
    choose_start: bool
    periodic_is_full: bool
    tasks: str
    baselines: list[dict[str, Any]]
    start: Optional[str]
    kept: Kept
    chosen: Optional[Candidate]
    step: int
    last_eval: Optional[dict[str, Any]]
    eval_seconds: float
    _emit: Callable[[str, dict[str, Any]], None]

    def score_state(self, raw: dict[str, torch.Tensor]):
        """The full-validation result of the coefficients `raw`; the live coefficients are put back."""
        live = self.merger.raw_state()
        t0 = time.time()
        try:
            self.merger.load_raw_state(raw)
            self.merger.write_into(self.module)
            return self.evaluate_fn(self.module, True)
        finally:
            self.merger.load_raw_state(live)
            self.eval_seconds += time.time() - t0

    def score_baselines(self) -> None:
        """Score each uniform merge not scored yet on the full validation split (an event each)."""
        for label, values in self.starts:
            if any(b["label"] == label for b in self.baselines):
                continue
            res = self.score_state(self.merger.uniform_state(values))
            self.baselines.append({"label": label, "values": values, "mean": res.mean, "scores": res.scores,
                                   "examples": {t.name: t.n for t in res.tasks}})
            validated(self._emit, self._baseline(self.baselines[-1]), self.tasks)

    def pick_start(self) -> None:
        """Start from the uniform merge that scores best on the full validation split (the default
        start on a tie; the first one when the start is fixed)."""
        self.score_baselines()
        if not self.baselines:
            return
        best = self.baselines[0]
        if self.choose_start:
            for b in self.baselines[1:]:
                if b["mean"] > best["mean"]:
                    best = b
        self.start = best["label"]
        self.merger.load_raw_state(self.merger.uniform_state(best["values"]))
        self._emit("dam.init", {"start": best["label"], "values": best["values"], "mean": best["mean"],
                                "chosen": self.choose_start})

    @staticmethod
    def _baseline(b: dict[str, Any]) -> Candidate:
        return Candidate(b["label"], DATA_FREE, b["mean"], b["scores"], ref=("uniform", b["values"]),
                         info={"step": None, "values": b["values"]})

    def choose(self) -> tuple[Candidate, dict[str, Any]]:
        """The result among the kept best state, the last state and the uniform merges, all on the full
        validation split; the merger and the resident model then hold it."""
        self.score_baselines()
        last = self.last_eval
        assert last is not None and last["final"], "choose after the final evaluation"
        own = []
        k = self.kept
        if k.step is not None and k.step not in (0, self.step):  # step 0 is the start, a uniform merge
            if self.periodic_is_full:
                mean, scores = k.mean, k.scores
            else:
                res = self.score_state(k.coefs)
                mean, scores = res.mean, res.scores
            own.append(validated(self._emit, Candidate(
                f"step {k.step} (best evaluation)", OWN, mean, scores,
                subset=None if self.periodic_is_full else k.mean, ref=("kept", k.coefs), info={"step": k.step}),
                self.tasks))
        own.append(validated(self._emit, Candidate(f"step {self.step} (last)", OWN, last["mean"], last["scores"],
                                                   ref=("last", None), info={"step": self.step}), self.tasks))
        chosen, block = choose(own + [self._baseline(b) for b in self.baselines], self._emit, self.tasks)
        what, value = chosen.ref
        if what == "kept":
            self.merger.load_raw_state(value)
        elif what == "uniform":
            self.merger.load_raw_state(self.merger.uniform_state(value))
        self.merger.write_into(self.module)
        self.chosen = chosen
        return chosen, block

    def result_state(self) -> dict[str, torch.Tensor]:
        """The coefficients a recipe written now holds: the result once chosen, before that the kept
        best state (a cancelled run leaves its best so far), else the live ones."""
        if self.chosen is None and self.kept.coefs:
            return {k: v.clone() for k, v in self.kept.coefs.items()}
        return self.merger.raw_state()
