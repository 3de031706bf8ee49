"""An adapter folder written atomically, under the project's output-path rule (io/outdir.py).

`AdapterFolder` checks OUT (a new path, an empty folder, or, with overwrite, a folder an earlier
extraction marked), builds everything in an owned `.OUT.tmp-XXXXXXXX` folder beside it (removed
on any failure, Ctrl-C, SIGTERM or SIGHUP; a killed run's is removed by the next run in the
same parent) and renames it into place with the cleanup signals held. The safetensors file is
written one tensor at a time from callables, so full modules (an embedding) are read from the
model as they are written instead of being held in memory together.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from mergecore.errors import Cancelled, MergeError
from mergecore.events import CancelToken
from mergecore.io.outdir import (
    OWNER,
    TempDir,
    check_output_dir,
    make_temp_dir,
    register_temp,
    release_temp,
    remove_stale_temp_dirs,
    remove_tree,
    signals_deferred,
    stale_warning,
    write_marker,
    write_owner,
)
from mergecore.io.source import DTYPE_NAMES

KIND = "extract-lora"  # the marker kind: only a folder a run of the same kind wrote is replaced
MERGE_KIND = "merge-adapters"  # ... and merge-adapters' own

# (key, dtype, shape, the tensor when it is written)
Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write_safetensors(path: Path, entries: Sequence[Entry], *, cancel: Optional[CancelToken] = None) -> int:
    """Write `entries` as one safetensors file (header first, then each tensor as it is made);
    returns the bytes of tensor data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape, _ in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, dtype, shape, make in entries:
            if cancel is not None:
                cancel.check()
            tensor = make().detach().to("cpu", dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise MergeError(f"internal: tensor '{key}' is {tuple(tensor.shape)}, expected {tuple(shape)}")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return offset


class AdapterFolder:
    """OUT for an adapter (extracted, or merged with `kind=MERGE_KIND`): checked at once (before
    the work), `temp()` when the results are ready, `publish()` to rename it into place;
    `discard()` (or leaving a `with` block by an exception) removes everything this run made."""

    def __init__(self, out: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path] = (),
                 kind: str = KIND):
        self.kind = kind
        self._policy = {"kind": kind, "overwrite": overwrite, "sources": tuple(sources)}
        self.out = check_output_dir(out, **self._policy)
        self.warnings: list[str] = []
        self._temp: Optional[TempDir] = None
        self._created: list[Path] = []
        self._done = False

    def temp(self) -> Path:
        """Create the owned temporary folder beside OUT (and OUT's missing parents) and mark it."""
        parent = self.out.parent
        while not parent.exists():
            self._created.append(parent)
            parent = parent.parent
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.warnings += [stale_warning(s) for s in remove_stale_temp_dirs(self.out.parent)]
            self._temp = make_temp_dir(self.out)
            write_marker(self._temp.path, self.kind)
        except OSError as err:
            self.discard()
            raise MergeError(f"cannot write to output path {self.out}: {err.strerror or err}") from None
        return self._temp.path

    def check_alive(self) -> None:
        """Stop if a signal handler removed the temporary folder (the process is going down)."""
        if self._temp is not None and self._temp.removed:
            raise Cancelled(f"{'extraction' if self.kind == KIND else 'adapter merge'} stopped by a signal; "
                            f"nothing was written")

    def publish(self) -> Path:
        """Rename the temporary folder to OUT (replacing an earlier extraction's folder when
        allowed, checked again now), with SIGINT/SIGTERM/SIGHUP held until it is done."""
        if self._temp is None:
            raise MergeError("internal: nothing to publish")
        old: Optional[TempDir] = None
        try:
            self.check_alive()
            with signals_deferred():
                check_output_dir(self.out, **self._policy)
                if self.out.exists() and next(os.scandir(self.out), None) is not None:
                    old_path = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
                    os.rename(self.out, old_path)
                    try:
                        os.rename(self._temp.path, self.out)
                    except BaseException:
                        os.rename(old_path, self.out)  # put the previous output back
                        raise
                    old = register_temp(old_path)
                    try:
                        write_owner(old_path)  # a later run removes it if this one dies while deleting
                    except OSError:
                        pass
                else:
                    os.rename(self._temp.path, self.out)  # a new path, or over an empty folder
                self._done = True
                release_temp(self._temp)
        except BaseException:
            self.discard()
            raise
        try:
            os.unlink(self.out / OWNER)
        except OSError:
            pass
        if old is not None:
            remove_tree(old.path)
            release_temp(old)
        return self.out

    def discard(self) -> None:
        """Remove the temporary folder and the parents this run created (nothing else)."""
        if self._done:
            return
        self._done = True
        if self._temp is not None:
            remove_tree(self._temp.path)
            release_temp(self._temp)
        for parent in self._created:
            try:
                parent.rmdir()
            except OSError:
                break

    def __enter__(self) -> "AdapterFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
