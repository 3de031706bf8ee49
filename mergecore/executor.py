"""Plan -> checkpoint: the jobs of a `Plan` streamed read -> method -> write.

`execute_plan` runs the jobs on a small thread pool under a memory budget: each job reads its
input tensors, calls the method, writes the result at its final offset and releases
everything, so peak memory is a few tensors, not a model. `merge_in_memory` runs the same jobs
into a resident model (searches score candidates this way). Planning is `mergecore.plan`; the
one call that does both is `mergecore.merge`.
"""

from __future__ import annotations

import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mergecore.errors import MergeError
from mergecore.events import CancelToken, MergeProgress, ProgressCallback
from mergecore.io.names import checkpoint_tensors
from mergecore.io.outdir import stale_warning
from mergecore.io.source import dtype_name
from mergecore.io.writer import DEFAULT_SHARD_SIZE, ShardedWriter
from mergecore.methods import get_method
from mergecore.methods.base import OwnedInputs
from mergecore.plan import Plan, TensorJob, default_memory_budget
from mergecore.side_files import write_side_files


class _Budget:
    """Counting semaphore over bytes; a job larger than the budget runs alone."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, n: int, cancel: CancelToken) -> int:
        n = min(n, self.total)
        with self.cond:
            while self.used + n > self.total:
                self.cond.wait(0.2)
                cancel.check()
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def seed_for_tensor(seed: int, name: str) -> int:
    """Seed of a randomised method for one tensor, from the recipe seed and the *source* tensor
    name: the same source layer gets the same random mask wherever it lands in the output (so a
    search's layer bank and the replayed recipe agree)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class NonFiniteTally:
    """Non-finite values met in source tensors during one run, per model; safe across threads.

    Each (model, tensor) counts once, however many jobs read it, so the warning reports what
    the files hold.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}

    def add(self, model: str, name: str, count: int) -> None:
        with self._lock:
            self._seen[(model, name)] = count

    def warnings(self) -> list[str]:
        with self._lock:
            items = sorted(self._seen.items())
        by_model: dict[str, list[tuple[str, int]]] = {}
        for (model, name), count in items:
            by_model.setdefault(model, []).append((name, count))
        out = []
        for model, hits in by_model.items():
            values = sum(c for _, c in hits)
            first = ", ".join(f"'{n}'" for n, _ in hits[:3]) + (", ..." if len(hits) > 3 else "")
            out.append(f"model '{model}' holds {values} non-finite value{'s' if values != 1 else ''} (NaN or inf) "
                       f"in {len(hits)} tensor{'s' if len(hits) != 1 else ''} ({first}); merged tensors that "
                       f"read them may be non-finite too")
        return out


def _nonfinite_count(t: torch.Tensor) -> int:
    """How many values of `t` are NaN or +-inf (0 for integer tensors); one pass when all are finite."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return 0
    return int((~torch.isfinite(t)).sum())


def _check_output(plan: Plan, job: TensorJob, method: str, merged: torch.Tensor, out: torch.Tensor) -> None:
    """Refuse an output that turned non-finite from finite inputs: a parameter (lambda: -1e308) or
    the cast to a narrower dtype overflowed, and the checkpoint would hold inf/NaN silently."""
    if plan.allow_nonfinite:
        return
    bad = _nonfinite_count(merged)
    if bad:
        raise MergeError(
            f"merged tensor '{job.out_name}' ({method}) has {bad} non-finite values although its inputs are "
            f"finite; check the parameters (lambda, weight) or pass --allow-nonfinite")
    bad = _nonfinite_count(out) if out is not merged else 0
    if bad:
        raise MergeError(
            f"merged tensor '{job.out_name}' ({method}) has {bad} values out of the range of "
            f"{dtype_name(job.out_dtype)}, non-finite after the cast; use a wider --dtype or pass --allow-nonfinite")


def compute_tensor(plan: Plan, job: TensorJob, device: torch.device | str = "cpu", *,
                   source_nonfinite: Optional[NonFiniteTally] = None) -> torch.Tensor:
    """Run one job's method and return the output tensor (out dtype, on CPU).

    Raises MergeError when the result is non-finite although every input was finite (unless
    `plan.allow_nonfinite`); non-finite values already in an input are recorded in
    `source_nonfinite` instead, and do not fail the tensor.
    """
    inputs_finite = True

    def note(model: str, name: str, t: torch.Tensor) -> torch.Tensor:
        nonlocal inputs_finite
        bad = _nonfinite_count(t)
        if bad:
            inputs_finite = False
            if source_nonfinite is not None:
                source_nonfinite.add(model, name, bad)
        return t

    if job.copy:
        model, name = job.inputs[0]
        raw = note(model, name, plan.sources[model].read(name))
        if job.vocab and plan.vocab is not None:
            merged = plan.vocab.permute([(model, raw.to(plan.compute_dtype))], None, job.out_name)[0]
        else:
            merged = raw
        out = merged.to(job.out_dtype)
        if inputs_finite:
            _check_output(plan, job, "copy", merged, out)
        return out
    dev = torch.device(device)
    method = get_method(job.method) if job.method else plan.method

    def loader(model: str, name: str):
        return lambda: note(model, name, plan.sources[model].read(name).to(dev)).to(plan.compute_dtype)

    if job.streaming:  # planned: the method reads each input when it gets to it (not for vocab rows)
        tensors = OwnedInputs([loader(m, n) for m, n in job.inputs])
    else:
        tensors = [loader(m, n)() for m, n in job.inputs]
    base = loader(*job.base)() if job.base else None
    if job.vocab and plan.vocab is not None:  # rows into the output vocabulary, with mergekit's fill
        fill_base = job.base[0] if job.base else plan.base
        given = list(zip([m for m, _ in job.inputs], tensors)) + ([(job.base[0], base)] if job.base else [])
        permuted = plan.vocab.permute(given, fill_base, job.out_name)
        tensors, base = permuted[:len(job.inputs)], (permuted[-1] if job.base else None)
        del given, permuted
    gen = None
    if method.randomized:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed_for_tensor(plan.recipe.seed or 0, job.inputs[0][1]))
    merged = method(tensors, base, job.params, generator=gen, tensor_name=job.out_name, artifacts=plan.artifacts,
                    input_models=[m for m, _ in job.inputs])
    del tensors, base
    if tuple(merged.shape) != job.shape:
        raise MergeError(f"method '{method.name}' returned shape {list(merged.shape)} for '{job.out_name}', expected {list(job.shape)}")
    out = merged.to("cpu", job.out_dtype)
    if inputs_finite:  # a streaming method has read every input by now
        _check_output(plan, job, method.name, merged, out)
    return out


@dataclass
class MergeResult:
    out_dir: Path
    seconds: float
    tensors: int
    bytes_written: int
    shards: int
    plan: Plan
    warnings: list[str] = field(default_factory=list)  # e.g. non-finite values met in the sources

    def summary(self) -> str:
        return (
            f"wrote {self.tensors} tensors ({self.bytes_written / 1e9:.3f} GB in {self.shards} "
            f"shard{'s' if self.shards != 1 else ''}) to {self.out_dir} in {self.seconds:.1f} s"
        )


HEAVY_JOB_FLOPS = 1e9


def is_compute_heavy(job: TensorJob) -> bool:
    """A job whose method does much more than pass over its inputs (an SVD, a solve, an
    optimisation; at least `HEAVY_JOB_FLOPS`). `execute_plan` runs such jobs one at a time:
    torch's intra-op threads already use every core for one of them, and running several at
    once on a small machine oversubscribes it (measured 2x slower on 2 cores)."""
    return job.cost is not None and job.cost.flops >= HEAVY_JOB_FLOPS


def execute_plan(
    plan: Plan,
    out_dir: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    threads: int = 2,
    device: str = "cpu",
    memory_budget: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    overwrite: bool = False,
    protect: tuple[Path, ...] = (),
) -> MergeResult:
    """Stream every job of `plan` into a checkpoint at `out_dir` (atomically).

    The writer enforces the output-path policy for every caller: never a source model's folder
    (or inside or above one), a `protect`ed folder (the recipe's), the working directory, or a
    folder mergecore did not write; an earlier merge's folder only with `overwrite`."""
    cancel = cancel or CancelToken()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but no CUDA device is available")
    start = time.time()
    layout = [(j.out_name, j.out_dtype, j.shape) for j in plan.jobs]
    meta = {"mergecore_method": plan.method.name}
    budget = _Budget(memory_budget or default_memory_budget(plan))
    tally = NonFiniteTally()
    done_tensors = 0
    done_bytes = 0
    sources = [folder for src in plan.sources.values() for folder in src.folders]
    with ShardedWriter(out_dir, layout, shard_size=shard_size, metadata=meta, overwrite=overwrite,
                       sources=sources, protect=protect) as writer:
        total_bytes = writer.total_bytes

        workers = cancel.child()  # a failed job stops the workers, not the caller's token
        # torch already spreads one decomposition over every core: two at once only fight
        heavy = threading.Lock()

        def run(job: TensorJob) -> int:
            workers.check()
            held = budget.acquire(job.working_bytes(), workers)
            try:
                workers.check()
                if is_compute_heavy(job):
                    with heavy:
                        workers.check()
                        out = compute_tensor(plan, job, device, source_nonfinite=tally)
                else:
                    out = compute_tensor(plan, job, device, source_nonfinite=tally)
                return writer.write(job.out_name, out)
            finally:
                budget.release(held)

        if progress:
            progress(MergeProgress(0, len(plan.jobs), 0, total_bytes, 0.0))
        # largest jobs first keeps the pool busy at the end; writes land at fixed offsets anyway
        order = sorted(plan.jobs, key=lambda j: -j.working_bytes())
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="merge") as pool:
            pending: dict[Future, TensorJob] = {pool.submit(run, j): j for j in order}
            try:
                while pending:
                    finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    if cancel.cancelled:
                        cancel.check()
                    for fut in finished:
                        job = pending.pop(fut)
                        done_bytes += fut.result()
                        done_tensors += 1
                        if progress:
                            progress(MergeProgress(done_tensors, len(plan.jobs), done_bytes, total_bytes,
                                                   time.time() - start, job.out_name))
                        # a cancel from the progress callback (or while the last jobs finished)
                        # stops here: nothing has been renamed into place yet
                        cancel.check()
            except BaseException:
                workers.cancel()
                for fut in pending:
                    fut.cancel()
                raise
        write_side_files(writer, plan)
        out = writer.finalize()
    stale = [stale_warning(s) for s in writer.stale_removed]  # temp folders of dead runs, removed
    return MergeResult(out, time.time() - start, len(plan.jobs), done_bytes, len(writer.shard_names), plan,
                       warnings=stale + tally.warnings())


def merge_in_memory(
    plan: Plan,
    model: Optional[torch.nn.Module] = None,
    *,
    device: str = "cpu",
    cancel: Optional[CancelToken] = None,
    source_nonfinite: Optional[NonFiniteTally] = None,
) -> Any:
    """Run every job of `plan` without writing a checkpoint (searches score candidates this way).

    With `model` (a resident model of the output's architecture, e.g. the base loaded once),
    each merged tensor is copied straight into the model's parameter or buffer of that name and
    the model is returned: a candidate costs one merge pass, no reload. Without it, the merged
    state dict (name -> tensor, out dtype, on CPU) is returned. The tensors are exactly what
    `execute_plan` writes for the same plan (same `compute_tensor`), so a replayed recipe
    scores the same (and is checked for non-finite values the same way; `source_nonfinite`
    collects the sources' own). Raises MergeError if an output tensor has no place in `model`.
    """
    cancel = cancel or CancelToken()
    if model is None:
        out: dict[str, torch.Tensor] = {}
        for job in plan.jobs:
            cancel.check()
            out[job.out_name] = compute_tensor(plan, job, device, source_nonfinite=source_nonfinite)
        return out
    targets = checkpoint_tensors(model)
    for job in plan.jobs:
        t = targets.get(job.out_name)
        if t is None:
            raise MergeError(f"the resident {type(model).__name__} has no parameter or buffer '{job.out_name}'; "
                             f"merge to a folder instead")
        if tuple(t.shape) != tuple(job.shape):
            raise MergeError(f"'{job.out_name}' has shape {list(job.shape)} in the plan but {list(t.shape)} in "
                             f"the resident model")
    with torch.no_grad():
        for job in plan.jobs:
            cancel.check()
            targets[job.out_name].copy_(compute_tensor(plan, job, device, source_nonfinite=source_nonfinite))
    return model
