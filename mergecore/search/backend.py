"""Where a search's candidate evaluations run: in this process (`local`) or on Ray actors (`ray`).

A search hands the backend a `WorkerFactory` -- a picklable "how to build a worker" (a class or
function importable from `mergecore`, plus its arguments) -- and then lists of items to
evaluate. A worker is built once per process and keeps what is expensive to load (the source
models, a resident model, the evaluator's prepared data) across items: with Ray, every actor
loads the models from their shared path once; no weights travel with a task.

`map(items)` returns one result per item **in item order**, whichever worker ran it, so a search
that evaluates deterministically gets the same results with any number of workers.

    backend = make_backend(BackendSpec(backend="ray", workers=2), WorkerFactory(EvoWorker, (spec,)))
    try:
        results = backend.map(candidates, cancel=cancel)
    finally:
        backend.close()

`ray` is optional (`pip install mergecore[ray]`); the local backend needs nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, field_validator

from mergecore.errors import MergeError
from mergecore.events import CancelToken
from mergecore.search.config import Positive


class BackendSpec(BaseModel):
    """The `backend` settings every search YAML accepts."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["local", "ray"] = "local"
    workers: Positive = 2  # Ray actors (ignored by the local backend)
    ray_address: Optional[str] = None  # connect to this cluster; without it a local Ray instance starts
    cpus_per_worker: float = 1.0  # CPUs each actor reserves (and torch threads it uses)

    @field_validator("cpus_per_worker")
    @classmethod
    def _cpus(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("cpus_per_worker must be positive")
        return v


@dataclass(frozen=True)
class WorkerFactory:
    """`target(*args, **kwargs)` builds a worker: an object with `evaluate(item) -> result`.

    `target` must be importable by name (a module-level class or function), so Ray can ship
    the factory to its workers."""

    target: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def build(self) -> Any:
        return self.target(*self.args, **self.kwargs)


class Backend(Protocol):
    kind: str
    workers: int

    def map(self, items: Sequence[Any], *, cancel: Optional[CancelToken] = None,
            on_result: Optional[Callable[[int, Any], None]] = None) -> list[Any]:
        """Evaluate every item; results in item order. `on_result(index, result)` as each lands."""

    def close(self) -> None:
        """Release workers (and a Ray instance this backend started)."""


class LocalBackend:
    """One worker in this process; items are evaluated one after the other, in order."""

    kind = "local"
    workers = 1

    def __init__(self, factory: WorkerFactory, worker: Any = None):
        self.worker = worker if worker is not None else factory.build()

    def map(self, items, *, cancel=None, on_result=None):
        out = []
        for i, item in enumerate(items):
            if cancel is not None:
                cancel.check()
            r = self.worker.evaluate(item)
            out.append(r)
            if on_result:
                on_result(i, r)
        return out

    def close(self) -> None:
        self.worker = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ActorBody:
    """What a Ray actor holds: one worker, built once when the actor starts."""

    def __init__(self, factory: WorkerFactory, threads: int):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch

        torch.set_num_threads(max(1, threads))
        self.error: Optional[BaseException] = None
        try:
            self.worker = factory.build()
        except Exception as err:  # reported by ready() as the worker's own error, not an actor death
            self.error = err

    def evaluate(self, item: Any) -> Any:
        if self.error is not None:
            raise self.error
        return self.worker.evaluate(item)

    def ready(self) -> int:
        if self.error is not None:
            raise self.error
        return os.getpid()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MergeError("backend 'ray' needs Ray: pip install 'mergecore[ray]' (or pip install ray)") from None
    return ray


class RayBackend:
    """`workers` Ray actors, each holding one worker; items are handed to whichever actor is free
    and the results put back in item order.

    Uses the Ray instance this process is connected to, or connects to `address`, or starts a
    local one (CPUs: enough for the workers); one this backend started is shut down by `close`."""

    kind = "ray"

    def __init__(self, factory: WorkerFactory, workers: int = 2, *, address: Optional[str] = None,
                 cpus_per_worker: float = 1.0, init_kwargs: Optional[dict[str, Any]] = None):
        if workers < 1:
            raise MergeError("the Ray backend needs at least one worker")
        ray = _import_ray()
        self.ray = ray
        self.workers = workers
        self.started_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                      "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:
                need = int(workers * cpus_per_worker + 0.999)
                kwargs["num_cpus"] = max(need, os.cpu_count() or 1)
            kwargs.update(init_kwargs or {})
            try:
                ray.init(**kwargs)
            except Exception as err:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise MergeError(f"cannot start {where}: {reason}") from None
            self.started_ray = True
        actor_cls = ray.remote(num_cpus=cpus_per_worker)(_ActorBody)
        threads = max(1, int(cpus_per_worker))
        self.actors = [actor_cls.remote(factory, threads) for _ in range(workers)]
        try:  # surface a worker that cannot start (missing model, bad config) here, not mid-search
            ray.get([a.ready.remote() for a in self.actors])
        except BaseException as err:
            self.close()
            raise _unwrap(err) from None

    def map(self, items, *, cancel=None, on_result=None):
        ray = self.ray
        items = list(items)
        results: list[Any] = [None] * len(items)
        free = list(range(len(self.actors)))
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (item index, actor index)
        nxt = 0
        try:
            while nxt < len(items) or pending:
                if cancel is not None:
                    cancel.check()
                while free and nxt < len(items):
                    a = free.pop(0)
                    pending[self.actors[a].evaluate.remote(items[nxt])] = (nxt, a)
                    nxt += 1
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
                for ref in done:
                    i, a = pending.pop(ref)
                    results[i] = ray.get(ref)
                    free.append(a)
                    if on_result:
                        on_result(i, results[i])
        except BaseException as err:
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            raise _unwrap(err) from None
        return results

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                self.ray.kill(a)
            except Exception:
                pass
        self.actors = []
        if self.started_ray:
            try:
                self.ray.shutdown()
            except Exception:
                pass
            self.started_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _unwrap(err: BaseException) -> BaseException:
    """A worker's own exception (MergeError, Cancelled, ...) rather than Ray's wrapper of it."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and type(err).__module__.startswith("ray"):
        return cause
    return err


def make_backend(spec: BackendSpec, factory: WorkerFactory) -> Backend:
    if spec.backend == "local":
        return LocalBackend(factory)
    t0 = time.time()
    b = RayBackend(factory, spec.workers, address=spec.ray_address, cpus_per_worker=spec.cpus_per_worker)
    b.start_seconds = time.time() - t0  # type: ignore[attr-defined]
    return b
