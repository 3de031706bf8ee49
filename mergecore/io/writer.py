"""Streaming sharded safetensors writer that finishes atomically.

The layout (names, dtypes, shapes) is known from the plan before any tensor is computed, so
each shard's header is written up front and every tensor goes straight to its final offset with
a positioned write. Nothing is buffered per shard: memory stays bounded by the tensors in
flight, and tensors may arrive in any order from several threads.

Everything is written into a hidden temporary folder beside the target and renamed into place
by `finalize()`; `abort()` (or an exception inside the `with` block) removes it, so a failed or
cancelled merge leaves nothing at the output path. The output path follows the policy of
`mergecore.io.outdir` (checked on creation and again before the rename): an existing folder is
replaced only if an earlier merge marked it and `overwrite` is set. The temporary folder carries
an owner record and is registered, so a signal handler or a later run can remove it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from mergecore.errors import Cancelled, MergeError, clip
from mergecore.io.outdir import (
    OWNER,
    StaleTemp,
    TempDir,
    check_output_dir,
    make_temp_dir,
    register_temp,
    release_temp,
    remove_stale_temp_dirs,
    remove_tree,
    signals_deferred,
    write_marker,
    write_owner,
)
from mergecore.io.source import DTYPE_NAMES

DEFAULT_SHARD_SIZE = 5 * 1000**3
MAX_SIZE = 1000**5  # 1 PB: more than any disk; a bigger size is a typo


def parse_size(text: str | int) -> int:
    """'5GB', '500M', '1.5G', '2GiB' or a plain byte count -> bytes.

    Only a finite, positive size up to `MAX_SIZE` passes: 'inf', 'nan', '1e400' (which float()
    reads as inf) and '-5GB' are one-line errors, not an OverflowError deep in a merge.
    """
    shown = clip(text, 40)
    if isinstance(text, bool):
        raise MergeError(f"cannot parse size '{shown}' (examples: 5GB, 500MB, 2GiB)")
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().upper().replace(" ", "")
        units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
                 "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
                 "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "B": 1}
        for unit, mult in units.items():
            if s.endswith(unit):
                num = s[: -len(unit)]
                break
        else:
            num, mult = s, 1
        try:
            number = float(num)
        except ValueError:
            raise MergeError(f"cannot parse size '{shown}' (examples: 5GB, 500MB, 2GiB)") from None
        if not math.isfinite(number * mult):
            raise MergeError(f"size must be a finite number of bytes, got '{shown}'")
        value = int(number * mult)
    if value <= 0:
        raise MergeError(f"size must be positive, got '{shown}'")
    if value > MAX_SIZE:
        raise MergeError(f"size '{shown}' is too large (at most {MAX_SIZE // 1000**5} PB)")
    return value


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def prepare_output_dir(out_dir: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path] = (),
                       protect: Iterable[str | Path] = (), kind: str = "merge") -> Path:
    """Check a checkpoint of `kind` (a merge, a mixture of experts) may be written at `out_dir`
    (see `mergecore.io.outdir.check_output_dir`); returns the resolved path. Creates nothing, so
    callers can fail before any work."""
    return check_output_dir(out_dir, kind=kind, overwrite=overwrite, sources=sources, protect=protect)


class ShardedWriter:
    """Write tensors of a known layout into sharded safetensors in a temporary folder."""

    def __init__(
        self,
        out_dir: str | Path,
        layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        shard_size: int = DEFAULT_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        *,
        overwrite: bool = False,
        sources: Iterable[str | Path] = (),
        protect: Iterable[str | Path] = (),
        kind: str = "merge",
    ):
        self._policy = {"overwrite": overwrite, "sources": tuple(sources), "protect": tuple(protect), "kind": kind}
        self.out_dir = prepare_output_dir(out_dir, **self._policy)
        self.stale_removed: list[StaleTemp] = []
        self._fds: list[int] = []
        self._closed = False
        try:
            missing = []
            p = self.out_dir.parent
            while not p.exists():
                missing.append(p)
                p = p.parent
            self._created_parents = missing  # removed again if the merge fails
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            # folders of runs that died here (reported by the caller, e.g. in MergeResult.warnings)
            self.stale_removed = remove_stale_temp_dirs(self.out_dir.parent)
            self._temp = make_temp_dir(self.out_dir)
            self.tmp_dir = self._temp.path
            write_marker(self.tmp_dir, kind)  # only a later run of the same kind replaces it
        except OSError as err:
            self.abort()
            raise MergeError(f"cannot write to output path {self.out_dir}: {err.strerror or err}") from None
        self._lock = threading.Lock()
        self._written: set[str] = set()
        try:
            self._plan_shards(layout, shard_size, metadata or {})
        except BaseException:
            self.abort()
            raise

    # -- layout ------------------------------------------------------------------------------

    def _plan_shards(self, layout, shard_size: int, metadata: dict[str, str]) -> None:
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in layout:
            n = 1
            for d in shape:
                n *= d
            nbytes = n * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        count = len(shards)
        self.shard_names = (
            ["model.safetensors"] if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        for i, entries in enumerate(shards):
            header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
            offset = 0
            for name, dtype, shape, nbytes in entries:
                if name in self.slots or name in header:
                    raise MergeError(f"output tensor '{name}' is planned twice")
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            path = self.tmp_dir / self.shard_names[i]
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, start + offset)
            pos = start
            for name, dtype, shape, nbytes in entries:
                self.slots[name] = _Slot(i, pos, nbytes, dtype, shape)
                pos += nbytes
        self.total_bytes = sum(s.nbytes for s in self.slots.values())

    # -- writing -----------------------------------------------------------------------------

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Write one tensor at its slot (thread-safe); returns the bytes written."""
        slot = self.slots.get(name)
        if slot is None:
            raise MergeError(f"internal: tensor '{name}' is not in the output layout")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise MergeError(
                f"internal: tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, layout says "
                f"{slot.shape} {slot.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        view = memoryview(data.numpy())
        done = 0
        fd = self._fds[slot.shard]
        while done < slot.nbytes:
            done += os.pwrite(fd, view[done:], slot.offset + done)
        with self._lock:
            self._written.add(name)
        return slot.nbytes

    def _check_alive(self) -> None:
        """Stop if a signal handler removed the temporary folder (the process is going down)."""
        temp = getattr(self, "_temp", None)
        if temp is not None and temp.removed:
            raise Cancelled("merge stopped by a signal; nothing was written")

    def _subdir(self, relpath: str) -> Path:
        """The folder for `relpath` inside the temporary folder, created below it one level at a
        time: a temporary folder removed by a signal handler is never silently recreated."""
        self._check_alive()
        folder = self.tmp_dir
        for part in Path(relpath).parent.parts:
            folder = folder / part
            folder.mkdir(exist_ok=True)
        return folder

    def add_file(self, relpath: str, content: str | bytes) -> None:
        path = self._subdir(relpath) / Path(relpath).name
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)

    def copy_file(self, src: Path, relpath: str | None = None) -> None:
        rel = relpath or src.name
        shutil.copy2(src, self._subdir(rel) / Path(rel).name)

    # -- finishing ---------------------------------------------------------------------------

    def _close_fds(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def finalize(self) -> Path:
        missing = [n for n in self.slots if n not in self._written]
        if missing:
            self.abort()
            raise MergeError(f"internal: {len(missing)} tensors were never written (first: {missing[0]})")
        self._close_fds()
        try:
            self._check_alive()
            if len(self.shard_names) > 1:
                index = {
                    "metadata": {"total_size": self.total_bytes},
                    "weight_map": {n: self.shard_names[s.shard] for n, s in self.slots.items()},
                }
                (self.tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            with signals_deferred():
                old = self._swap_into_place()
        except BaseException:
            self.abort()
            raise
        if old is not None:
            remove_tree(old.path)
            release_temp(old)
        return self.out_dir

    def _swap_into_place(self) -> Optional[TempDir]:
        """Rename the temporary folder to the output (signals held by the caller); returns the
        registered previous output, renamed away, for the caller to delete."""
        self._check_alive()
        # the folder may have changed during the merge: replace only what the policy allows
        prepare_output_dir(self.out_dir, **self._policy)
        old = None
        if self.out_dir.exists() and next(os.scandir(self.out_dir), None) is not None:
            old_path = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out_dir, old_path)
            try:
                os.rename(self.tmp_dir, self.out_dir)
            except BaseException:
                os.rename(old_path, self.out_dir)  # put the previous output back
                raise
            old = register_temp(old_path)
            try:
                write_owner(old_path)  # so a later run removes it if this one dies while deleting
            except OSError:
                pass
        else:
            os.rename(self.tmp_dir, self.out_dir)  # a new path, or over an empty folder
        self._closed = True
        release_temp(self._temp)
        try:
            os.unlink(self.out_dir / OWNER)
        except OSError:
            pass
        return old

    def abort(self) -> None:
        self._close_fds()
        if not self._closed:
            temp = getattr(self, "_temp", None)
            if temp is not None:
                remove_tree(temp.path)
                release_temp(temp)
            for parent in getattr(self, "_created_parents", []):
                try:
                    parent.rmdir()
                except OSError:
                    break
            self._closed = True

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
