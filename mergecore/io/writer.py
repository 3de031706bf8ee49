"""Streaming sharded safetensors writer that finishes atomically.

The layout (names, dtypes, shapes) is known from the plan before any tensor is computed, so
each shard's header is written up front and every tensor goes straight to its final offset with
a positioned write. Nothing is buffered per shard: memory stays bounded by the tensors in
flight, and tensors may arrive in any order from several threads.

Everything is written into a hidden temporary folder beside the target and renamed into place
by `finalize()`; `abort()` (or an exception inside the `with` block) removes it, so a failed or
cancelled merge leaves nothing at the output path.
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
from typing import Sequence

import torch

from mergecore.errors import MergeError, clip
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


def prepare_output_dir(out_dir: str | Path) -> Path:
    """Check the output path can be written; returns the absolute path. Creates nothing."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise MergeError(f"output path {out} exists and is not a folder")
    parent = out.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise MergeError(f"cannot write to output path {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MergeError(f"cannot write to output path {out}: {probe} is not writable")
    return out


class ShardedWriter:
    """Write tensors of a known layout into sharded safetensors in a temporary folder."""

    def __init__(
        self,
        out_dir: str | Path,
        layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        shard_size: int = DEFAULT_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = prepare_output_dir(out_dir)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            missing = []
            p = self.out_dir.parent
            while not p.exists():
                missing.append(p)
                p = p.parent
            self._created_parents = missing  # removed again if the merge fails
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir()
        except OSError as err:
            raise MergeError(f"cannot write to output path {self.out_dir}: {err.strerror or err}") from None
        self._lock = threading.Lock()
        self._written: set[str] = set()
        self._closed = False
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

    def add_file(self, relpath: str, content: str | bytes) -> None:
        path = self.tmp_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)

    def copy_file(self, src: Path, relpath: str | None = None) -> None:
        shutil.copy2(src, self.tmp_dir / (relpath or src.name))

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
        if len(self.shard_names) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {n: self.shard_names[s.shard] for n, s in self.slots.items()},
            }
            (self.tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out_dir, old)
        os.rename(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._closed = True
        return self.out_dir

    def abort(self) -> None:
        self._close_fds()
        if not self._closed:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
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
