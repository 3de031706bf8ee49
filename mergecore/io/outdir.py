"""Where a run may write, and the temporary folders it leaves while it works.

Output policy (the CLI, the app and the searches all go through `check_output_dir`): a run
writes to a new path, an empty folder, or a folder that an earlier mergecore run of the same
kind wrote, recognised by the marker file `.mergecore-output.json` that every run puts into the
folder it creates. A merge replaces such a folder only with `overwrite=True` (`--overwrite`); a
search resumes in it. Everything else is refused with one line before anything is written: the
current directory or one of its ancestors, a source model's folder (or anything inside or above
one), the recipe's folder, a non-empty folder without the marker. So nothing a run did not
create is ever deleted.

Temporary folders (`.NAME.tmp-XXXXXXXX` beside the output) carry an owner record (pid, host,
start time) and sit in a process-wide registry while they live. `install_signal_handlers`
makes SIGINT/SIGTERM/SIGHUP remove the live ones from the main thread (the app merges in worker
threads) before the process stops; a run killed outright (SIGKILL, power loss) leaves its folder
behind, and the next run in the same parent removes it once its owner is dead
(`remove_stale_temp_dirs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from mergecore.errors import MergeError
from mergecore.version import __version__

MARKER = ".mergecore-output.json"
OWNER = ".mergecore-owner.json"
_RECORD_LIMIT = 64 * 1024  # marker and owner files are tiny; never read a planted huge one whole
_TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


# ---------------------------------------------------------------------------------------------
# Markers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_record(path: Path) -> Optional[dict[str, Any]]:
    """A small JSON object from `path`, or None when missing, not a regular file or unreadable."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        with open(path, "rb") as f:
            raw = f.read(_RECORD_LIMIT + 1)
        if len(raw) > _RECORD_LIMIT:
            return None
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: str | Path, kind: str) -> None:
    """Mark `folder` as written by a mergecore run of `kind` ("merge", "rmm", "dam", "evo" ...)."""
    record = {"kind": kind, "created": _now(), "mergecore": __version__}
    (Path(folder) / MARKER).write_text(json.dumps(record) + "\n")


def read_marker(folder: str | Path) -> Optional[str]:
    """The kind recorded in `folder`'s marker, or None when there is no valid marker."""
    record = _read_record(Path(folder) / MARKER)
    kind = record.get("kind") if record else None
    return kind if isinstance(kind, str) and kind else None


# ---------------------------------------------------------------------------------------------
# The output-path policy


def _show(path: Path | str) -> str:
    """A path for an error line: whole unless absurdly long (the tail names the folder)."""
    text = " ".join(str(path).split())
    return text if len(text) <= 240 else "..." + text[-237:]


# products: replaced whole (with overwrite), never resumed
_PRODUCTS = {"merge": "a merge", "extract-lora": "an extracted LoRA adapter", "moe": "a mixture of experts",
             "merge-adapters": "a merged LoRA adapter"}


def _label(kind: str) -> str:
    return _PRODUCTS.get(kind, f"a search ({kind})")


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _is_within(inner: Path, outer: Path) -> bool:
    """True if `inner` is `outer` or lies below it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_output_dir(out: str | Path, *, kind: str, overwrite: bool = False,
                     sources: Iterable[str | Path] = (), protect: Iterable[str | Path] = ()) -> Path:
    """Check that a `kind` run may write its output at `out`; returns the resolved path.

    Creates and deletes nothing. `sources` are the folders the run reads models from (refused
    as the output, inside it or around it); `protect` are folders that must survive the run, such
    as the recipe's own folder (refused as the output or around it; a new folder inside is fine).
    `overwrite` accepts a folder that an earlier run of the same kind marked; searches pass it
    to resume in their own folder.
    """
    target = _resolve(out)
    shown = _show(target)
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted: nothing to protect there
        cwd = None
    if cwd is not None and _is_within(cwd, target):
        what = "the current directory" if cwd == target else f"a folder above the current directory {_show(cwd)}"
        raise MergeError(f"output folder {shown} is {what}; replacing it would delete your files; choose a new folder")
    for src in sources:
        s = _resolve(src)
        if target == s:
            raise MergeError(f"output folder {shown} is the folder of a source model; choose a new folder")
        if _is_within(target, s):
            raise MergeError(f"output folder {shown} is inside the source model folder {_show(s)}; choose a new folder")
        if _is_within(s, target):
            raise MergeError(f"output folder {shown} contains the source model folder {_show(s)}; choose a new folder")
    for keep in protect:
        k = _resolve(keep)
        if _is_within(k, target):
            what = "the recipe's folder" if k == target else f"a folder above the recipe's folder {_show(k)}"
            raise MergeError(f"output folder {shown} is {what}; choose a new folder")
    if target.exists():
        if not target.is_dir():
            raise MergeError(f"output path {shown} exists and is not a folder")
        try:
            with os.scandir(target) as entries:
                empty = next(entries, None) is None
        except OSError as err:
            raise MergeError(f"cannot read output folder {shown}: {err.strerror or err}") from None
        if not empty:
            found = read_marker(target)
            if found is None:
                raise MergeError(f"output folder {shown} is not empty and was not written by mergecore; "
                                 f"choose a new folder")
            if found != kind:
                resume = "; a search resumes only in a folder of its own kind" if kind not in _PRODUCTS else ""
                raise MergeError(f"output folder {shown} holds {_label(found)}, not {_label(kind)}{resume}; "
                                 f"choose a new folder")
            if not overwrite:
                raise MergeError(f"output folder {shown} already holds {_label(kind)}; pass --overwrite to replace it")
    probe = target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise MergeError(f"cannot write to output path {shown}: {_show(probe)} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MergeError(f"cannot write to output path {shown}: {_show(probe)} is not writable")
    return target


def claim_output_dir(out: str | Path, *, kind: str, sources: Iterable[str | Path] = (),
                     protect: Iterable[str | Path] = ()) -> Path:
    """Check `out` for a `kind` search, create it and mark it (a search writes in place: a folder
    it marked earlier is resumed, any other non-empty folder is refused). Returns the resolved path."""
    target = check_output_dir(out, kind=kind, overwrite=True, sources=sources, protect=protect)
    try:
        target.mkdir(parents=True, exist_ok=True)
        if read_marker(target) is None:
            write_marker(target, kind)
    except OSError as err:
        raise MergeError(f"cannot write to output path {_show(target)}: {err.strerror or err}") from None
    return target


def existing_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """The entries of `paths` that are local folders (Hub ids and missing paths are left out)."""
    out = []
    for p in paths:
        try:
            q = Path(p).expanduser()
            if q.is_dir():
                out.append(q.resolve())
        except (OSError, ValueError):
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Temporary folders: owner records, the live registry, signals


@dataclass
class TempDir:
    """A temporary folder of this process; `removed` is set when a signal handler deleted it."""

    path: Path
    removed: bool = False


@dataclass(frozen=True)
class StaleTemp:
    """A temporary folder removed because the run that made it died."""

    path: Path
    pid: int


_LIVE: dict[Path, TempDir] = {}
_LOCK = threading.RLock()  # re-entrant: a handler may interrupt the main thread while it holds it
_DEFER = 0  # > 0 while some thread is inside `signals_deferred()`
_PENDING: list[int] = []
_PREVIOUS: dict[int, Any] = {}


def write_owner(folder: Path) -> None:
    """Record which process owns `folder`, so a later run can tell if it is stale."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "created": _now()}
    (folder / OWNER).write_text(json.dumps(record) + "\n")


def register_temp(path: Path) -> TempDir:
    """Put `path` in the live registry (signal handlers remove what is in it)."""
    entry = TempDir(path)
    with _LOCK:
        _LIVE[path] = entry
    return entry


def release_temp(entry: TempDir) -> None:
    with _LOCK:
        if _LIVE.get(entry.path) is entry:
            del _LIVE[entry.path]


def make_temp_dir(out: Path) -> TempDir:
    """Create `.NAME.tmp-XXXXXXXX` beside `out` (whose parent exists), with an owner record, registered."""
    path = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    entry = register_temp(path)
    try:
        write_owner(path)
    except BaseException:
        remove_tree(path)
        release_temp(entry)
        raise
    return entry


def remove_tree(path: Path) -> None:
    """Delete a temporary folder, its owner record last: a deletion cut short (SIGKILL) still
    leaves a folder the next run recognises as stale."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    except OSError:
        entries = []
    for e in entries:
        if e.name == OWNER:
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)
        except OSError:
            pass
    with contextlib.suppress(OSError):
        os.unlink(path / OWNER)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _process_start(pid: int) -> Optional[tuple[str, float]]:
    """(state, start time as epoch seconds) of `pid` from /proc, or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        ticks = int(fields[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return fields[0], btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_dead(record: dict[str, Any]) -> Optional[int]:
    """The owner's pid if the record names a process of this host that no longer runs, else None."""
    pid, host, started = record.get("pid"), record.get("host"), record.get("started")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or host != socket.gethostname():
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except OSError:  # exists but belongs to someone else, or cannot tell: treat as alive
        return None
    info = _process_start(pid)
    if info is None:
        return None
    state, start = info
    if state == "Z":  # a zombie: it died, nobody has reaped it yet
        return pid
    if isinstance(started, (int, float)) and start > started + 2:  # the pid was reused by a later process
        return pid
    return None


def remove_stale_temp_dirs(parent: str | Path) -> list[StaleTemp]:
    """Delete the temporary folders in `parent` left by runs that died (on this host): only
    folders named like ours (`.NAME.tmp-*`, `.NAME.old-*`) that hold an owner record whose
    process is gone. Returns what was removed, for a warning."""
    removed: list[StaleTemp] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        if not _TEMP_NAME.match(e.name):
            continue
        try:
            if not e.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        path = Path(e.path)
        with _LOCK:
            if path in _LIVE:
                continue
        record = _read_record(path / OWNER)
        pid = _owner_dead(record) if record else None
        if pid is None:
            continue
        remove_tree(path)
        if not path.exists():
            removed.append(StaleTemp(path, pid))
    return removed


def stale_warning(stale: StaleTemp) -> str:
    return f"removed stale temporary folder {_show(stale.path)} (its run, pid {stale.pid}, died)"


def remove_live_temp_dirs() -> list[Path]:
    """Delete every registered temporary folder now (signal handlers call this)."""
    with _LOCK:
        entries = list(_LIVE.values())
        for entry in entries:
            entry.removed = True
        _LIVE.clear()
    for entry in entries:
        remove_tree(entry.path)
    return [e.path for e in entries]


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold the cleanup signals while a few renames must happen together (finalize): a signal
    arriving meanwhile is handled right after, so an output is never half replaced."""
    global _DEFER
    with _LOCK:
        _DEFER += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEFER -= 1
            pending = list(_PENDING) if _DEFER == 0 else []
            if pending:
                _PENDING.clear()
        for signum in pending:
            signal.raise_signal(signum)


def _on_signal(signum: int, frame: Any) -> None:
    with _LOCK:
        if _DEFER:
            if signum not in _PENDING:
                _PENDING.append(signum)
            return
    remove_live_temp_dirs()
    previous = _PREVIOUS.get(signum)
    if callable(previous):
        previous(signum, frame)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Make SIGINT, SIGTERM and SIGHUP remove this process's live temporary folders, then act
    as before: SIGINT raises KeyboardInterrupt (or calls the previous handler), SIGTERM/SIGHUP
    call a previous Python handler or exit with 128 + the signal number. A signal that was
    ignored (e.g. SIGHUP under nohup) stays ignored. Idempotent; only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is None or signum in _PREVIOUS:
            continue
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN or previous is _on_signal:
            continue
        _PREVIOUS[signum] = previous
        signal.signal(signum, _on_signal)
