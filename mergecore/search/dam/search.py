"""The DAM training loop: steps, losses, evaluations, events, checkpoints, resume.

Each step draws one batch from every D_i (a deterministic function of the seed and the step),
builds the merged tensors once, runs the merged model on each batch (with task i's head), adds
the loss against source model i's outputs (cached or computed on the fly), then the
regularisers, and takes one AdamW step on the coefficients. The merged tensors are detached
into leaves for the forward passes, so only one batch's activations are alive at a time, and a
batch larger than `max_tokens_per_backward` tokens runs in chunks, each loss backpropagated with
its share of the batch's rows (`mergecore.search.dam.chunks`: the same gradient); the leaves'
gradients flow back into the coefficients in one backward through the merge.

Events: `dam.step` (loss, each term, learning rate, examples and tokens seen, seconds),
`dam.eval` (task metrics; `final: true` on the last, full evaluation), `dam.checkpoint`,
`dam.resumed`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from mergecore.errors import Cancelled, MergeError
from mergecore.events import CancelToken, Event, EventCallback
from mergecore.search.checkpoint import SearchCheckpoint, WallClock, need, pack_tree, restoring, unpack_tree
from mergecore.search.dam import losses
from mergecore.search.dam.chunks import chunks
from mergecore.search.dam.data import TaskData, run_model
from mergecore.search.dam.keep import ChoosesOnValidation, Kept
from mergecore.search.dam.merger import Merger
from mergecore.search.validation import Candidate

LEGACY_CHECKPOINT = "dam_checkpoint.pt"  # the old pickle format: refused, never loaded


@dataclass
class LossSettings:
    kind: str = "kl"  # kl | mse | entropy
    direction: str = "forward"  # KL(teacher ‖ merged) | reverse: KL(merged ‖ teacher)
    temperature: float = 2.0
    entropy_temperature: float = 1.0
    lambda_cos: float = 0.0
    lambda_l1: float = 0.0
    lambda_l2: float = 0.0

    @property
    def needs_teacher(self) -> bool:
        return self.kind in ("kl", "mse")


@dataclass
class DAMSettings:
    steps: int = 200
    batch_size: int = 32  # examples per task per step
    max_tokens_per_backward: int = 4096  # tokens whose activations are held at once (mergecore.search.dam.chunks)
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    schedule: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    clamp: Optional[tuple[float, float]] = None  # clamp raw coefficients after each step
    seed: int = 0
    eval_every: int = 50  # 0: evaluate only at the end
    eval_at_start: bool = True
    patience: int = 4  # stop after this many evaluations in a row without a better score (0: never)
    checkpoint_every: int = 50
    loss: LossSettings = field(default_factory=LossSettings)


class Evaluate:
    """What the loop needs to score the merged model: `(module, final) -> EvalResult`."""

    def __init__(self, periodic: Any, final: Any, cancel: CancelToken):
        self.periodic, self.final, self.cancel = periodic, final, cancel

    def __call__(self, module: nn.Module, final: bool):
        ev = self.final if final else self.periodic
        return ev.evaluate(module, cancel=self.cancel, subset_index=0)


class DAMSearch(ChoosesOnValidation):
    """One DAM run over a resident model; resumable from `out_dir`. It starts from the best uniform
    merge, keeps the best state by its periodic evaluations, stops early, and `choose()` picks the
    result on the full validation split (`mergecore.search.dam.keep`)."""

    def __init__(self, module: nn.Module, merger: Merger, data: list[TaskData], settings: DAMSettings, *,
                 evaluate: Optional[Callable[[nn.Module, bool], Any]] = None,
                 teacher_params: Optional[list[dict[str, torch.Tensor]]] = None,
                 out_dir: Optional[Path] = None, on_event: Optional[EventCallback] = None,
                 cancel: Optional[CancelToken] = None, identity: Optional[dict[str, Any]] = None,
                 on_checkpoint: Optional[Callable[["DAMSearch"], None]] = None, replay_history: bool = False,
                 starts: Optional[list[tuple[str, list[float]]]] = None, choose_start: bool = True,
                 periodic_is_full: bool = False, tasks: str = "validation"):
        """`evaluate(module, full)` scores on the validation split (`full`: all of it, else the periodic
        evaluations' part, the same when `periodic_is_full`); `starts` are the uniform merges scored
        first (`keep.uniform_starts`), the best of which is the start when `choose_start`, else the
        first; `tasks` names the validation tasks in events."""
        self.module = module.eval().requires_grad_(False)
        self.merger = merger
        self.data = data
        self.settings = settings
        self.evaluate_fn = evaluate
        self.teacher_params = teacher_params
        if settings.loss.needs_teacher:
            for i, d in enumerate(data):
                if d.teacher is None and (teacher_params is None or teacher_params[i] is None):
                    raise MergeError(f"loss '{settings.loss.kind}' needs the outputs of the model paired with task "
                                     f"'{d.name}': neither cached nor available on the fly")
        self.out_dir = Path(out_dir) if out_dir else None
        self.on_event = on_event
        self.cancel = cancel or CancelToken()
        self.checkpoint = SearchCheckpoint(out_dir, "dam", identity or {}, legacy=LEGACY_CHECKPOINT)
        self.on_checkpoint = on_checkpoint
        self.replay_history = replay_history
        s = settings
        self.optimizer = torch.optim.AdamW(merger.parameters(), lr=s.lr, betas=tuple(s.betas), eps=s.eps,
                                           weight_decay=s.weight_decay)
        self.step = 0
        self.examples_seen = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.clock = WallClock()  # the run's wall time across resumes (started by the run)
        self.clock.start()
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.last_eval: Optional[dict[str, Any]] = None
        self.starts, self.choose_start, self.periodic_is_full, self.tasks = starts or [], choose_start, \
            periodic_is_full, tasks
        self.baselines: list[dict[str, Any]] = []  # the uniform merges, scored on the full validation split
        self.start: Optional[str] = None  # the one training started from
        self.kept = Kept()  # the best state by the periodic evaluations; early stopping
        self.chosen: Optional[Candidate] = None  # the result, once chosen

    # -- schedule ----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        s = self.settings
        if s.warmup_steps and step < s.warmup_steps:
            return s.lr * (step + 1) / s.warmup_steps
        if s.schedule == "constant":
            return s.lr
        span = max(1, s.steps - s.warmup_steps)
        frac = min(1.0, (step - s.warmup_steps) / span)
        if s.schedule == "linear":
            return s.lr * (1.0 - frac)
        if s.schedule == "cosine":
            return s.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        raise MergeError(f"unknown schedule '{s.schedule}' (constant, linear, cosine)")

    # -- persistence -------------------------------------------------------------------------

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, plain JSON state) of everything a resumed run needs to continue exactly."""
        tensors = {f"coef.{k}": v for k, v in self.merger.raw_state().items()}
        tensors["torch_rng"] = torch.get_rng_state()
        state = {
            "step": self.step,
            "optimizer": pack_tree(self.optimizer.state_dict(), "optimizer", tensors),
            "examples_seen": self.examples_seen,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "seconds": self.clock.elapsed(),
            "history": self.history,
            "evals": self.evals,
            "baselines": self.baselines,
            "start": self.start,
            "kept": self.kept.pack(tensors),
        }
        return tensors, state

    def save(self) -> None:
        self.checkpoint.save(*self.checkpoint_state())
        if self.on_checkpoint:
            self.on_checkpoint(self)
        self._emit("dam.checkpoint", {"step": self.step})

    def try_resume(self) -> bool:
        """Continue from the checkpoint in `out_dir`, if there is one; a bad one is one line."""
        if not self.checkpoint.exists():
            return False
        tensors, state = self.checkpoint.load()
        with restoring(self.checkpoint.path):
            step = need(state, "step", int)
            counters = {k: need(state, k, int) for k in ("examples_seen", "tokens_seen")}
            seconds = {k: need(state, k, float) for k in ("train_seconds", "eval_seconds")}
            self.clock.restore(state)
            history, evals = need(state, "history", list), need(state, "evals", list)
            if step < 0 or not all(isinstance(r, dict) and type(r.get("step")) is int for r in history + evals):
                raise ValueError("the step count or a history row is malformed")
            baselines, start = state.get("baselines", []), state.get("start")  # absent before they were kept
            if not isinstance(baselines, list) or not all(
                    isinstance(b, dict) and isinstance(b.get("label"), str) and type(b.get("mean")) in (int, float)
                    and isinstance(b.get("scores"), dict) and isinstance(b.get("values"), list) for b in baselines) or (start is not None and not isinstance(start, str)):
                raise TypeError("the scored uniform merges ('baselines', 'start') are malformed")
            kept = Kept.unpack(state.get("kept"), tensors)
            rng = tensors["torch_rng"]
            self.merger.load_raw_state({k[5:]: v for k, v in tensors.items() if k.startswith("coef.")})
            self.optimizer.load_state_dict(unpack_tree(need(state, "optimizer", dict), tensors))
            torch.set_rng_state(rng)
        self.step = step
        self.examples_seen, self.tokens_seen = counters["examples_seen"], counters["tokens_seen"]
        self.train_seconds, self.eval_seconds = seconds["train_seconds"], seconds["eval_seconds"]
        self.history, self.evals = history, evals
        self.baselines, self.start, self.kept = baselines, start, kept
        if self.replay_history:  # the steps and evaluations before the checkpoint, so a plot starts at the first
            for row in self._rows():
                self._emit("dam.eval" if "mean" in row else "dam.step", dict(row, replayed=True))
        self._emit("dam.resumed", {"step": self.step})
        return True

    def _rows(self) -> list[dict[str, Any]]:
        """Steps and evaluations in the order they happened (an evaluation after its step)."""
        return sorted(self.history + self.evals, key=lambda r: (r["step"], "mean" in r))

    # -- one step ----------------------------------------------------------------------------

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event:
            self.on_event(Event(kind, data))

    def _task_loss(self, i: int, d: TaskData, leaves: dict[str, torch.Tensor], idx: list[int]):
        cfg = self.settings.loss
        kwargs, mask, ntok = d.inputs(idx)
        params = dict(leaves)
        if d.head:
            params.update(d.head)
        student = d.rows(run_model(self.module, params, kwargs).float(), mask)
        if cfg.kind == "entropy":
            return losses.entropy_loss(student, cfg.entropy_temperature), ntok
        if d.teacher is not None:
            teacher, tidx = d.teacher.batch(idx)
        else:
            tp = dict(self.teacher_params[i])  # type: ignore[index]
            if d.head:
                tp.update(d.head)
            with torch.no_grad():
                teacher = d.rows(run_model(self.module, tp, kwargs).float(), mask)
            tidx = None
        if teacher.shape[0] != student.shape[0]:
            raise MergeError(f"task '{d.name}': {teacher.shape[0]} teacher rows for {student.shape[0]} merged rows")
        if cfg.kind == "kl":
            return losses.kl_loss(student, teacher, tidx, temperature=cfg.temperature, direction=cfg.direction), ntok
        return losses.mse_loss(student, teacher, tidx), ntok

    def regularizers(self) -> dict[str, torch.Tensor]:
        """cos (Σ over weight tensors Σ_{i<j} cos(c_i, c_j)), l1 and l2 of the effective coefficients."""
        weights = [self.merger.effective(s.name) for s in self.merger.slots if not s.is_bias]
        every = [self.merger.effective(s.name) for s in self.merger.slots]
        return {"cos": losses.cosine_term(weights), "l1": losses.l1_term(every), "l2": losses.l2_term(every)}

    def train_step(self) -> dict[str, Any]:
        s = self.settings
        t0 = time.time()
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            merged = self.merger.merged()
            leaves = {n: t.detach().requires_grad_(True) for n, t in merged.items()}
            terms: dict[str, float] = {}
            task_total = 0.0
            examples = tokens = 0
            for i, d in enumerate(self.data):
                idx = d.batch_indices(self.step, s.batch_size, s.seed, i)
                value = 0.0
                for part, weight in chunks(d, idx, s.max_tokens_per_backward):  # gradients accumulate in leaves
                    loss_c, ntok = self._task_loss(i, d, leaves, part)
                    if not torch.isfinite(loss_c):
                        raise MergeError(f"step {self.step + 1}: the {s.loss.kind} loss on task '{d.name}' is not "
                                         f"finite; lower the learning rate")
                    (loss_c if weight == 1.0 else loss_c * weight).backward()
                    value += loss_c.item() * weight
                    tokens += ntok
                    del loss_c
                terms[f"{s.loss.kind}/{d.name}"] = value
                task_total += value
                examples += len(idx)
            pairs = [(merged[n], leaves[n].grad) for n in merged if leaves[n].grad is not None]
            if pairs:
                torch.autograd.backward([m for m, _ in pairs], [g for _, g in pairs])
            del merged, leaves, pairs
            reg = self.regularizers()
            weighted = s.loss.lambda_cos * reg["cos"] + s.loss.lambda_l1 * reg["l1"] + s.loss.lambda_l2 * reg["l2"]
            if weighted.requires_grad and (s.loss.lambda_cos or s.loss.lambda_l1 or s.loss.lambda_l2):
                weighted.backward()
        params = self.merger.parameters()
        grad_norm = None
        if s.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm))
        self.optimizer.step()
        if s.clamp is not None:
            with torch.no_grad():
                for p in params:
                    p.clamp_(s.clamp[0], s.clamp[1])
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.examples_seen += examples
        self.tokens_seen += tokens
        dt = time.time() - t0
        self.train_seconds += dt
        terms[s.loss.kind] = task_total
        for k in ("cos", "l1", "l2"):
            terms[k] = reg[k].item()
        info = {
            "step": self.step,
            "steps": s.steps,
            "loss": task_total + weighted.item(),
            "terms": terms,
            "lr": lr,
            "grad_norm": grad_norm,
            "examples_seen": self.examples_seen,
            "tokens_seen": self.tokens_seen,
            "seconds": dt,
            "train_seconds": self.train_seconds,
        }
        self.history.append(info)
        self._emit("dam.step", info)
        return info

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, final: bool = False) -> Optional[dict[str, Any]]:
        """Score the current state (`final`: on the full validation split); a periodic evaluation
        offers it to the kept best state and may stop the run early."""
        if self.evaluate_fn is None:
            return None
        reuse = self._already_scored(final)
        if reuse is not None:
            info = dict(reuse, step=self.step, final=final, seconds=0.0)
        else:
            t0 = time.time()
            self.merger.write_into(self.module)
            res = self.evaluate_fn(self.module, final)
            dt = time.time() - t0
            self.eval_seconds += dt
            info = {"step": self.step, "mean": res.mean, "scores": res.scores, "final": final, "seconds": dt,
                    "examples": {t.name: t.n for t in res.tasks}}
        if not final:
            info["improved"] = self.kept.offer(self.step, info["mean"], info["scores"], self.merger.raw_state())
            info["best_step"] = self.kept.step
            self.evals.append(info)
        self.last_eval = info
        self._emit("dam.eval", info)
        p = self.settings.patience
        if not final and p and self.kept.since >= p and self.kept.stopped is None and self.step < self.settings.steps:
            self.kept.stopped = self.step
            self._emit("dam.stopped", {"step": self.step, "best_step": self.kept.step, "best_mean": self.kept.mean,
                                       "patience": p})
        return info

    def _already_scored(self, final: bool) -> Optional[dict[str, Any]]:
        """The full-split score of the current state when it is known: at step 0 the start's (when the
        periodic evaluations use the full split), or the periodic evaluation at this very step (an
        early stop) for the final one."""
        if not self.periodic_is_full:
            return None
        b = next((b for b in self.baselines if b["label"] == self.start), None) if self.step == 0 else None
        if b is not None:
            return {"mean": b["mean"], "scores": b["scores"], "examples": b.get("examples", {})}
        if final and self.evals and self.evals[-1]["step"] == self.step:
            return {k: self.evals[-1][k] for k in ("mean", "scores", "examples")}
        return None

    def run(self) -> dict[str, Any]:
        s = self.settings
        log = None
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.out_dir / "dam_log.jsonl", "w")  # mirrors the checkpointed history
            for row in self._rows():
                log.write(json.dumps({"event": "eval" if "mean" in row else "step", **row}) + "\n")
        try:
            if self.step == 0 and self.evaluate_fn is not None and self.start is None:
                self.pick_start()
            if self.step == 0 and s.eval_at_start and not any(e["step"] == 0 for e in self.evals):
                self._write(log, "eval", self.evaluate())
            while self.step < s.steps and self.kept.stopped is None:
                if self.cancel.cancelled:
                    self.save()  # a step boundary: the state is consistent
                    raise Cancelled(f"DAM search cancelled at step {self.step}")
                self._write(log, "step", self.train_step())
                if s.eval_every and self.step % s.eval_every == 0 and self.step < s.steps:
                    self._write(log, "eval", self.evaluate())
                if self.kept.stopped is None and s.checkpoint_every and self.step % s.checkpoint_every == 0 \
                        and self.step < s.steps:
                    self.save()
            self.cancel.check()
            final = self.evaluate(final=True)
            self._write(log, "eval", final)
            self.save()
        finally:
            if log:
                log.close()
        return {"step": self.step, "final": final}

    @staticmethod
    def _write(log, event: str, row: Optional[dict[str, Any]]) -> None:
        if log is not None and row is not None:
            log.write(json.dumps({"event": event, **row}) + "\n")
            log.flush()
