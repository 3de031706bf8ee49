"""Progress events and the cancel token shared by the executor, the searches, the CLI and the app.

Long work takes an optional `progress` callback and an optional `CancelToken`. The CLI turns
the events into a progress bar (`TerminalBar`, `interruptible`); the app's job manager stores
them for its polling plots.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

from mergecore.errors import Cancelled


class CancelToken:
    """A thread-safe flag; long work calls `check()` between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()

    def child(self) -> "CancelToken":
        """A token cancelled with this one that can also be cancelled alone: a piece of work stops
        its own workers on failure without cancelling the caller's token."""
        return _ChildToken(self)


class _ChildToken(CancelToken):
    def __init__(self, parent: CancelToken) -> None:
        super().__init__()
        self._parent = parent

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or self._parent.cancelled


@dataclass
class Event:
    """One event: `kind` says what (e.g. 'merge.progress', 'rmm.episode'), `data` the numbers."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MergeProgress:
    """Progress of a merge: tensors and bytes written, elapsed seconds and an ETA."""

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    elapsed: float
    current: str = ""

    @property
    def fraction(self) -> float:
        if self.bytes_total:
            return self.bytes_done / self.bytes_total
        return self.tensors_done / self.tensors_total if self.tensors_total else 1.0

    @property
    def eta(self) -> Optional[float]:
        f = self.fraction
        if f <= 0:
            return None
        return self.elapsed * (1 - f) / f

    def as_event(self) -> Event:
        d = asdict(self)
        d["fraction"] = self.fraction
        d["eta"] = self.eta
        return Event("merge.progress", d)


ProgressCallback = Callable[[MergeProgress], None]
EventCallback = Callable[[Event], None]


@contextmanager
def interruptible(message: str) -> Iterator[CancelToken]:
    """A CancelToken for a command run from a terminal: Ctrl-C sets it (so worker threads stop
    too) and ends in one `Cancelled(message)` line instead of a traceback."""
    cancel = CancelToken()
    try:
        yield cancel
    except KeyboardInterrupt:
        cancel.cancel()
        raise Cancelled(message) from None


class TerminalBar:
    """A tqdm progress bar on stderr for a CLI command, drawn from the first `show` on (so lines
    printed before the work starts stay above it); does nothing when `quiet`. Closing it on the
    way out of a `with` block keeps a failure's one error line clean (`leave=False` removes it)."""

    def __init__(self, desc: str, *, quiet: bool = False, **options: Any) -> None:
        self.desc, self.quiet, self.options = desc, quiet, options
        self._bar: Any = None

    def show(self, done: float, total: float, *, postfix: str = "", desc: Optional[str] = None) -> None:
        if self.quiet:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, dynamic_ncols=True, **self.options)
        self._bar.total = total
        self._bar.n = done
        if postfix:
            self._bar.set_postfix_str(postfix, refresh=False)
        if desc is not None:
            self._bar.set_description_str(desc, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "TerminalBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
