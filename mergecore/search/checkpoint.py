"""Search checkpoints without pickle: tensors in one safetensors file, every other value as JSON.

A checkpoint sits in an output folder that someone else may have written, so resuming from it
must never run code (unpickling, as an unrestricted `torch.load` does). The format has only two
kinds of content, neither of which can run anything:

    <kind>_checkpoint.safetensors
        metadata   {"format": "mergecore.search-checkpoint", "version": "1", "kind": "<kind>"}
        __state__  uint8 tensor: UTF-8 JSON {"format", "version", "kind", "state": {...}}
        <name>     the search's tensors (network weights, optimizer moments, RNG states, ...)

The JSON state travels as a tensor rather than in the metadata because safetensors caps its
header at 100 MB and a long run's history could pass that. One file written to a temporary name
and renamed means a crash leaves the old checkpoint or the new one, never a mix. Reads are
bounded (header, state and file sizes) and the header is checked before any tensor is read;
every problem ends in one line naming the file and `--restart`. `kind` keeps an RMM checkpoint
from being read as DAM's. Checkpoints of the old pickle format are refused, never opened.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from mergecore.errors import MergeError, clip, short

FORMAT = "mergecore.search-checkpoint"
VERSION = 1
STATE_TENSOR = "__state__"
MAX_HEADER_BYTES = 64 << 20
MAX_STATE_BYTES = 512 << 20
MAX_FILE_BYTES = 64 << 30
MAX_TENSORS = 100_000
MAX_RANK = 8

# safetensors dtype -> (torch dtype, bytes per element), for the dtypes torch can hold
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1), "I16": (torch.int16, 2),
    "I32": (torch.int32, 4), "I64": (torch.int64, 8), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4), "F64": (torch.float64, 8),
}

Tree = Any
PathLike = Union[str, Path]


class _Corrupt(Exception):
    """A reason the file cannot be resumed from (becomes the one-line MergeError)."""


def corrupt(path: PathLike, reason: str) -> MergeError:
    """The one line every unreadable checkpoint ends in."""
    return MergeError(f"cannot resume from {path}: {reason}; start over with --restart")


# -- writing ----------------------------------------------------------------------------------


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, synced and renamed: a crash or
    Ctrl-C leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: PathLike, tensors: dict[str, torch.Tensor], state: dict[str, Any], *, kind: str) -> None:
    """Write `tensors` and the plain-data `state` (JSON: numbers, strings, lists, dicts) to `path`
    atomically. A value JSON cannot hold is a programming error and raises TypeError."""
    from safetensors.torch import save_file

    path = Path(path)
    doc = json.dumps({"format": FORMAT, "version": VERSION, "kind": kind, "state": state},
                     separators=(",", ":"), allow_nan=True).encode("utf-8")
    out: dict[str, torch.Tensor] = {STATE_TENSOR: torch.frombuffer(bytearray(doc), dtype=torch.uint8)}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or name.startswith("__"):
            raise ValueError(f"checkpoint tensor name {name!r} is reserved or not a string")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entry '{name}' is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[name] = t
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(out, str(tmp), metadata={"format": FORMAT, "version": str(VERSION), "kind": kind})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- reading ----------------------------------------------------------------------------------


def resume_file(path: PathLike, legacy: PathLike) -> bool:
    """Whether `path` holds a checkpoint to resume from. A checkpoint left in the old pickle
    format (`legacy`) is refused and left in place: loading it could run any code."""
    path, legacy = Path(path), Path(legacy)
    if os.path.lexists(path):
        return True
    if os.path.lexists(legacy):
        raise MergeError(f"cannot resume from {legacy}: it is a checkpoint in the old unsafe (pickle) format, which "
                         f"is never loaded; start over with --restart (the file is left as it is)")
    return False


def load_checkpoint(path: PathLike, *, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of the `kind` checkpoint at `path`; any problem is one MergeError line."""
    path = Path(path)
    try:
        return _load(path, kind)
    except _Corrupt as err:
        raise corrupt(path, str(err)) from None
    except MergeError:
        raise
    except Exception as err:  # noqa: BLE001 - OS errors, safetensors' own error type, a wrong structure
        raise corrupt(path, describe(err)) from None


def _load(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    st = os.stat(path)  # follows a link; a link to a device or a FIFO is refused next
    if not stat.S_ISREG(st.st_mode):
        raise _Corrupt("it is not a regular file")
    size = st.st_size
    if size > MAX_FILE_BYTES:
        raise _Corrupt(f"it is {size} bytes, over the {MAX_FILE_BYTES}-byte limit")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _Corrupt("it is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise _Corrupt(f"its header claims {n} bytes, over the {MAX_HEADER_BYTES}-byte limit; not a checkpoint")
        if 8 + n > size:
            raise _Corrupt("its header runs past the end of the file (truncated, or not a safetensors file)")
        raw = f.read(n)
    header = _json(raw, "header")
    entries = _check_header(header, size - 8 - n)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Corrupt("it is not a mergecore search checkpoint")
    _check_kind(meta.get("kind"), meta.get("version"), kind)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if set(tensors) != set(entries):
        raise _Corrupt("its tensors changed while it was read")
    doc = _json(tensors.pop(STATE_TENSOR).numpy().tobytes(), "state")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _Corrupt("its state is not a mergecore search checkpoint's")
    _check_kind(doc.get("kind"), str(doc.get("version")), kind)
    state = doc.get("state")
    if not isinstance(state, dict):
        raise _Corrupt("its state is not a JSON object")
    return tensors, state


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _Corrupt(f"its {what} is not UTF-8; not a checkpoint") from None
    except json.JSONDecodeError as err:
        raise _Corrupt(f"its {what} is not valid JSON ({err.msg} at byte {err.pos})") from None
    except RecursionError:
        raise _Corrupt(f"its {what} is nested too deeply") from None


def _check_kind(theirs: Any, version: Any, kind: str) -> None:
    if theirs != kind:
        raise _Corrupt(f"it is a checkpoint of kind {short(theirs, 40)}, not {kind!r}")
    if version != str(VERSION):
        raise _Corrupt(f"its format version {short(version, 20)} is not {VERSION}, the one this mergecore reads")


def _check_header(header: Any, data_len: int) -> set[str]:
    """Names of the tensors, after checking every entry against the data section."""
    if not isinstance(header, dict):
        raise _Corrupt("its header is not a JSON object; not a safetensors file")
    names = [k for k in header if k != "__metadata__"]
    if len(names) > MAX_TENSORS:
        raise _Corrupt(f"it lists {len(names)} tensors, over the {MAX_TENSORS} limit")
    spans = []
    for name in names:
        e = header[name]
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise _Corrupt(f"tensor {short(name, 60)} has a malformed header entry")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in _DTYPES:
            raise _Corrupt(f"tensor {short(name, 60)} has an unknown dtype {short(dtype, 20)}")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise _Corrupt(f"tensor {short(name, 60)} has a bad shape {short(shape, 60)}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise _Corrupt(f"tensor {short(name, 60)} has data offsets {short(offsets, 60)} outside the file "
                           f"(truncated?)")
        if math.prod(shape) * _DTYPES[dtype][1] != offsets[1] - offsets[0]:
            raise _Corrupt(f"tensor {short(name, 60)}: shape {short(shape, 60)} does not match its byte range")
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    end = 0
    for a, b in spans:
        if a < end:
            raise _Corrupt("two tensors overlap in the data section")
        end = b
    if end != data_len:
        raise _Corrupt("its data section does not match its header (truncated or padded)")
    state = header.get(STATE_TENSOR)
    if state is None:
        raise _Corrupt("it holds no state; not a mergecore search checkpoint")
    if state["dtype"] != "U8" or len(state["shape"]) != 1:
        raise _Corrupt("its state is not a byte string")
    if state["shape"][0] > MAX_STATE_BYTES:
        raise _Corrupt(f"its state is {state['shape'][0]} bytes, over the {MAX_STATE_BYTES}-byte limit")
    return set(names)


# -- applying a loaded state --------------------------------------------------------------------


def describe(err: BaseException) -> str:
    """A short reason from an exception met while reading or applying a checkpoint."""
    if isinstance(err, KeyError):
        return f"it has no entry {short(err.args[0] if err.args else '?', 60)}"
    if isinstance(err, RecursionError):
        return "its state is nested too deeply"
    text = short(" ".join(str(err).split()), 160)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextmanager
def restoring(path: PathLike) -> Iterator[None]:
    """Turn a wrong structure met while applying a loaded state (a missing key, a wrong type, a
    tensor of the wrong shape) into the one line naming the file and --restart."""
    try:
        yield
    except MergeError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError, OverflowError) as err:
        raise corrupt(path, describe(err)) from None


def need(d: Any, key: str, *types: type) -> Any:
    """`d[key]`, which must be one of `types` (a bool is no int, an int is a float)."""
    if not isinstance(d, dict):
        raise TypeError(f"expected a JSON object holding '{key}', got {type(d).__name__}")
    if key not in d:
        raise KeyError(key)
    v = d[key]
    ok = any((t is int and type(v) is int) or (t is float and type(v) in (int, float))
             or (t not in (int, float) and isinstance(v, t)) for t in types)
    if not ok:
        raise TypeError(f"'{key}' is a {type(v).__name__}, expected {' or '.join(t.__name__ for t in types)}")
    return float(v) if float in types and int not in types and type(v) is int else v


def pack_tree(tree: Tree, prefix: str, tensors: dict[str, torch.Tensor]) -> Tree:
    """A torch state dict (nested dicts / lists / tuples of tensors and scalars) as JSON: each
    tensor goes into `tensors` under a name from its path and is left as {"$tensor": name};
    dicts with non-string keys and tuples are tagged so `unpack_tree` gives back the same tree."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree
        return {"$tensor": prefix}
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in tree):
            return {k: pack_tree(v, f"{prefix}.{k}", tensors) for k, v in tree.items()}
        items = []
        for k, v in tree.items():
            if type(k) not in (int, str):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {prefix}")
            items.append([k, pack_tree(v, f"{prefix}.{k}", tensors)])
        return {"$items": items}
    if isinstance(tree, tuple):
        return {"$tuple": [pack_tree(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [pack_tree(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    raise TypeError(f"cannot store a {type(tree).__name__} at {prefix}")


def unpack_tree(tree: Tree, tensors: dict[str, torch.Tensor]) -> Tree:
    """The inverse of `pack_tree`; builds only dicts, lists, tuples, scalars and the file's tensors."""
    if isinstance(tree, dict):
        if len(tree) == 1 and next(iter(tree)).startswith("$"):
            (tag, v), = tree.items()
            if tag == "$tensor":
                if not isinstance(v, str) or v not in tensors:
                    raise KeyError(f"tensor {short(v, 60)}")
                return tensors[v]
            if tag == "$tuple" and isinstance(v, list):
                return tuple(unpack_tree(x, tensors) for x in v)
            if tag == "$items" and isinstance(v, list):
                out = {}
                for item in v:
                    if not (isinstance(item, list) and len(item) == 2 and type(item[0]) in (int, str)):
                        raise ValueError("a malformed $items entry")
                    out[item[0]] = unpack_tree(item[1], tensors)
                return out
            raise ValueError(f"an unknown tag {short(tag, 30)}")
        return {k: unpack_tree(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack_tree(v, tensors) for v in tree]
    return tree


# -- a search's checkpoint in its output folder -------------------------------------------------


def plain(value: Any) -> Any:
    """`value` as it comes back from JSON (tuples as lists), so a loaded identity compares equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class SearchCheckpoint:
    """The checkpoint of a `kind` search in `out_dir` (none without a folder): where it is,
    whether there is one to resume from, and the check that it belongs to this search.

    `identity` is what a checkpoint must agree on to be resumed (models, data, seeds, ...); it is
    stored under `key` and compared entry by entry, so the refusal names what differs."""

    def __init__(self, out_dir: Optional[Path], kind: str, identity: dict[str, Any], *, legacy: str,
                 key: str = "identity"):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.kind = kind
        self.identity = plain(identity)
        self.legacy = legacy
        self.key = key

    @property
    def path(self) -> Optional[Path]:
        return self.out_dir / f"{self.kind}_checkpoint.safetensors" if self.out_dir is not None else None

    def exists(self) -> bool:
        """Whether there is a checkpoint to resume from (an old pickle one is refused, never read)."""
        return self.path is not None and resume_file(self.path, self.out_dir / self.legacy)

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        if self.path is not None:
            save_checkpoint(self.path, tensors, {self.key: self.identity, **state}, kind=self.kind)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, state) of the checkpoint, refused in one line when it belongs to another search."""
        tensors, state = load_checkpoint(self.path, kind=self.kind)
        with restoring(self.path):
            theirs = need(state, self.key, dict)
        diff = sorted(k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k))
        if diff:
            label = {"rmm": "RMM", "dam": "DAM"}.get(self.kind, self.kind)
            raise MergeError(f"{self.path} belongs to a different {label} search (differs in: "
                             f"{', '.join(clip(k, 40) for k in diff[:8])}); use another output folder or --restart")
        return tensors, state


class WallClock:
    """Seconds a search has run across its resumes: the part before its checkpoint (`prior`, kept
    in the checkpoint as `seconds`) plus this process's part since `start()`."""

    def __init__(self) -> None:
        self.prior = 0.0
        self.started: Optional[float] = None

    def start(self) -> None:
        self.started = time.time()

    def elapsed(self) -> float:
        return self.prior + (time.time() - self.started if self.started is not None else 0.0)

    def restore(self, state: dict[str, Any]) -> None:
        """Take `seconds` from a checkpoint's state (absent in checkpoints written before it was kept: 0)."""
        seconds = state.get("seconds", 0.0)
        if type(seconds) not in (int, float) or not seconds >= 0:
            raise TypeError("'seconds' must be a non-negative number")
        self.prior = float(seconds)
