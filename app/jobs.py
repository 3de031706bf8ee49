"""Background jobs: long work (merges, evaluations, downloads, searches) runs in a thread.

A job is a plain function `fn(ctx) -> result` run on a daemon thread. It reports through its
`JobContext`: `ctx.emit(event)` appends a `mergecore.events.Event` (merge progress, eval
progress, a search's rewards and losses ...), `ctx.log(line)` appends a log line, and
`ctx.cancel` is the `CancelToken` the engine checks between units of work. The UI never waits
for a job: a `gr.Timer` polls `JobManager.snapshot(owner, job_id, since)`, which returns the
status, the latest progress, the log and the events added since the caller's cursor, and the
plots are redrawn from those events. Nothing here imports Gradio.

Jobs belong to an owner (the browser, or a page without a browser key); another owner's job
ids are not visible. A failed job keeps a one-line error (`MergeError` text as is, anything else
as `Type: message`), and the manager keeps working.

Jobs submitted with the same `queue` run one after the other in the order they were submitted
(e.g. one browser's merges); `position(job)` is how many of them are still ahead of it.
`listeners` are told when a job is submitted and when it has finished (`fn(event, job)` with
event 'submit' or 'finish'), e.g. to keep a merge history on disk.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mergecore.errors import Cancelled, MergeError
from mergecore.events import CancelToken, Event

log = logging.getLogger("mergecore.app")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)

MAX_EVENTS = 20_000  # per job; older events are dropped (plots downsample anyway)
MAX_LOG_LINES = 2_000


class JobNotFound(MergeError):
    def __init__(self, job_id: str):
        super().__init__(f"no such job '{job_id}' in this session")


def one_line_error(err: BaseException) -> str:
    """The line a user sees for a failed job."""
    if isinstance(err, MergeError):
        return str(err)
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


@dataclass
class Job:
    id: str
    owner: str
    kind: str  # 'merge', 'eval', 'fetch', 'demo', 'search', ...
    title: str
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    events: list[Event] = field(default_factory=list)
    dropped_events: int = 0
    lines: list[str] = field(default_factory=list)
    result: Any = None
    error: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)
    queue: Optional[str] = None  # jobs of one queue run one at a time, in order
    seq: int = 0  # submission order
    cancel: CancelToken = field(default_factory=CancelToken)
    progress: Optional[dict[str, Any]] = None  # data of the latest '*.progress' event
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _settled: bool = field(default=False, repr=False)  # set once the listeners heard it ended
    _thread: Optional[threading.Thread] = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        """Ended, and the manager's listeners have been told (so what they record is there)."""
        return self.status in FINISHED and self._settled

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the job has finished (tests and scripts only; the UI polls)."""
        end = None if timeout is None else time.time() + timeout
        while not self.done:
            if end is not None and time.time() > end:
                return False
            time.sleep(0.02)
        return True


class JobContext:
    """What a job function sees: emit events, log lines, check the cancel token."""

    def __init__(self, job: Job, manager: "JobManager"):
        self._job = job
        self._manager = manager
        self.cancel = job.cancel
        self.meta = job.meta

    @property
    def job_id(self) -> str:
        return self._job.id

    def emit(self, event: Event) -> None:
        job = self._job
        with job._lock:
            job.events.append(event)
            if len(job.events) > MAX_EVENTS:
                drop = len(job.events) - MAX_EVENTS
                del job.events[:drop]
                job.dropped_events += drop
            if event.kind.endswith(".progress"):
                job.progress = dict(event.data, kind=event.kind)

    def log(self, line: str) -> None:
        job = self._job
        stamp = time.strftime("%H:%M:%S")
        with job._lock:
            for part in str(line).splitlines() or [""]:
                job.lines.append(f"[{stamp}] {part}")
            if len(job.lines) > MAX_LOG_LINES:
                del job.lines[: len(job.lines) - MAX_LOG_LINES]

    def progress_callback(self) -> Callable[[Any], None]:
        """A callback for engine functions that report objects with `.as_event()`
        (MergeProgress, EvalProgress, FamilyProgress)."""

        def on_progress(p: Any) -> None:
            self.emit(p.as_event())

        return on_progress

    def check(self) -> None:
        self.cancel.check()


JobFn = Callable[[JobContext], Any]


class JobManager:
    """Registry of jobs keyed by owner (session) and id.

    `max_running` bounds how many jobs of the same `slot` (e.g. 'heavy') run at once across all
    sessions; the rest wait in the 'queued' state. `per_owner` bounds the unfinished jobs of one
    kind a single session may have (a second merge while one runs is refused), unless the job is
    queued (`queue=`): then up to `max_queued` unfinished jobs wait in that queue.
    """

    def __init__(self, max_running: int = 2, per_owner: int = 1, keep_finished: int = 50,
                 max_age: float = 24 * 3600, max_queued: int = 8):
        self.max_running = max_running
        self.per_owner = per_owner
        self.max_queued = max_queued
        self.listeners: list[Callable[[str, Job], None]] = []
        self.keep_finished = keep_finished
        self.max_age = max_age  # finished jobs older than this are forgotten (any owner)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._slots: dict[str, threading.Semaphore] = {}
        self._counter = itertools.count(1)

    # -- submitting ----------------------------------------------------------------------------

    def submit(self, owner: str, kind: str, fn: JobFn, *, title: str = "", slot: Optional[str] = "heavy",
               meta: Optional[dict[str, Any]] = None, exclusive: bool = True, queue: Optional[str] = None) -> Job:
        """Start `fn` on a background thread and return its Job at once.

        `exclusive`: refuse (MergeError) while this owner has an unfinished job of `kind`.
        `queue`: instead, wait behind the unfinished jobs of the same queue (first come, first
        run; `max_queued` at most).
        `slot`: jobs sharing a slot are limited to `max_running` at a time (None: unlimited).
        """
        with self._lock:
            if queue is not None:
                waiting = [j for j in self._jobs.values() if j.queue == queue and not j.done]
                if len(waiting) >= self.max_queued:
                    raise MergeError(f"{len(waiting)} {kind} jobs are already queued; wait for one to finish")
            elif exclusive:
                busy = [j for j in self._jobs.values() if j.owner == owner and j.kind == kind and not j.done]
                if len(busy) >= self.per_owner:
                    raise MergeError(f"a {kind} job is already running in this session ({busy[0].title}); "
                                     f"wait for it or cancel it first")
            seq = next(self._counter)
            job_id = f"{kind}-{seq}-{uuid.uuid4().hex[:8]}"
            job = Job(job_id, owner, kind, title or kind, meta=dict(meta or {}), queue=queue, seq=seq)
            self._jobs[job_id] = job
            self._prune(owner)
            sem = None
            if slot is not None:
                sem = self._slots.setdefault(slot, threading.Semaphore(self.max_running))
        thread = threading.Thread(target=self._run, args=(job, fn, sem), name=f"job-{job_id}", daemon=True)
        job._thread = thread
        self._tell("submit", job)
        thread.start()
        return job

    def _tell(self, event: str, job: Job) -> None:
        for fn in list(self.listeners):
            try:
                fn(event, job)
            except Exception:  # a listener never breaks a job
                log.error("job listener failed on %s %s:\n%s", event, job.id, traceback.format_exc())

    def ahead(self, job: Job) -> list[Job]:
        """The unfinished jobs of `job`'s queue submitted before it (oldest first)."""
        if job.queue is None:
            return []
        with self._lock:
            return sorted((j for j in self._jobs.values() if j.queue == job.queue and not j.done and j.seq < job.seq),
                          key=lambda j: j.seq)

    def position(self, job: Job) -> int:
        """How many jobs of its queue are still ahead of `job` (0: it runs, or runs next)."""
        return len(self.ahead(job))

    def _run(self, job: Job, fn: JobFn, sem: Optional[threading.Semaphore]) -> None:
        ctx = JobContext(job, self)
        acquired = False
        try:
            if self.ahead(job):
                ctx.log(f"queued: {self.position(job)} ahead")
                while self.ahead(job):
                    job.cancel.check()
                    time.sleep(0.05)
            if sem is not None:
                if not sem.acquire(blocking=False):
                    ctx.log("waiting for another job to finish ...")
                    while not sem.acquire(timeout=0.2):
                        job.cancel.check()
                acquired = True
            job.cancel.check()
            job.status = RUNNING
            job.started = time.time()
            result = fn(ctx)
            job.result = result
            job.status = DONE
        except Cancelled:
            job.status = CANCELLED
            job.error = "cancelled"
            ctx.log("cancelled")
        except MergeError as err:
            job.status = FAILED
            job.error = one_line_error(err)
            ctx.log(f"error: {job.error}")
        except BaseException as err:  # any failure stays inside the job
            job.status = FAILED
            job.error = one_line_error(err)
            ctx.log(f"error: {job.error}")
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        finally:
            if job.started is None:
                job.started = time.time()
            job.finished = time.time()
            if acquired and sem is not None:
                sem.release()
            self._tell("finish", job)
            job._settled = True

    def _prune(self, owner: str) -> None:
        now = time.time()
        for j in [j for j in self._jobs.values() if j.done and now - (j.finished or now) > self.max_age]:
            self._jobs.pop(j.id, None)
        finished = [j for j in self._jobs.values() if j.owner == owner and j.done]
        for j in sorted(finished, key=lambda j: j.created)[: max(0, len(finished) - self.keep_finished)]:
            self._jobs.pop(j.id, None)

    # -- reading -------------------------------------------------------------------------------

    def get(self, owner: str, job_id: str) -> Job:
        job = self._jobs.get(job_id or "")
        if job is None or job.owner != owner:
            raise JobNotFound(job_id)
        return job

    def find(self, owner: str, job_id: Optional[str]) -> Optional[Job]:
        try:
            return self.get(owner, job_id or "")
        except JobNotFound:
            return None

    def jobs(self, owner: str, kind: Optional[str] = None, status: Optional[str] = None) -> list[Job]:
        with self._lock:
            out = [j for j in self._jobs.values() if j.owner == owner]
        if kind is not None:
            out = [j for j in out if j.kind == kind]
        if status is not None:
            out = [j for j in out if j.status == status]
        return sorted(out, key=lambda j: j.created)

    def cancel(self, owner: str, job_id: str) -> Job:
        job = self.get(owner, job_id)
        if not job.done:
            job.cancel.cancel()
        return job

    def cancel_owner(self, owner: str) -> None:
        """Cancel every unfinished job of an owner (the browser session went away)."""
        for j in self.jobs(owner):
            if not j.done:
                j.cancel.cancel()

    def snapshot(self, owner: str, job_id: str, since: int = 0) -> dict[str, Any]:
        """Everything a poll needs, as plain data: status, progress, log, events since `since`.

        `since` is an event cursor: pass back the returned `cursor` to get only new events.
        """
        job = self.get(owner, job_id)
        with job._lock:
            total = job.dropped_events + len(job.events)
            start = max(0, since - job.dropped_events)
            events = [e.as_dict() for e in job.events[start:]]
            lines = list(job.lines)
            progress = dict(job.progress) if job.progress else None
        return {
            "id": job.id,
            "kind": job.kind,
            "title": job.title,
            "status": job.status,
            "done": job.done,
            "error": job.error,
            "elapsed": job.elapsed,
            "progress": progress,
            "log": lines,
            "events": events,
            "cursor": total,
            "meta": dict(job.meta),
            "position": self.position(job) if not job.done else 0,
        }
