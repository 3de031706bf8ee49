"""Model sources: a local folder or a Hugging Face Hub id, read lazily one tensor at a time.

Safetensors files are read with plain positioned reads (no memory map), so a tensor's bytes
live only as long as the caller holds the tensor: resident memory stays bounded by the tensors
in flight, not by the model. `.bin` checkpoints are opened only through
``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from mergecore.errors import MergeError, short

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.bin.index.json",
                   "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in the file (safetensors), -1 for .bin
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


MAX_HEADER_BYTES = 100_000_000  # a safetensors header larger than this is refused unread
MAX_JSON_BYTES = 50_000_000  # config.json, shard indexes, tokenizer configs
MAX_RANK = 8
MAX_DIM = 2**48  # a dimension beyond this cannot be backed by any real file
MAX_NAME_CHARS = 1024
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


def _shown(name: Any) -> str:
    """A tensor or file name for a message: in full (quoted, control characters escaped) when of a
    real name's length, else bounded by `short`."""
    return repr(name) if isinstance(name, str) and len(name) <= 256 else short(name)


def _is_int(x: Any) -> bool:
    """A JSON integer: Python's bool is an int subclass, but `true` is not a size."""
    return isinstance(x, int) and not isinstance(x, bool)


def read_json_file(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file a model folder provides, bounded in size; any failure is one MergeError.

    Size is checked before reading so a huge file cannot exhaust memory, and parse failures
    (bad UTF-8, deep nesting, integers too long to convert) all end in one line naming `what`.
    """
    try:
        size = path.stat().st_size
        if size > limit:
            raise MergeError(f"{what} ({path}) is {size} bytes, more than the {limit}-byte limit")
        with open(path, "rb") as f:
            return json.loads(f.read(limit + 1))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise MergeError(f"{what} ({path}) is not valid JSON ({reason})") from None


def read_json_object(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """`read_json_file` for files that must hold a JSON object (config.json and the like)."""
    data = read_json_file(path, what, limit)
    if not isinstance(data, dict):
        raise MergeError(f"{what} ({path}) must hold a JSON object, got a {type(data).__name__}")
    return data


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header; returns (header, data_start).

    Every entry is checked before any tensor byte is read (see `_check_header`), so a corrupt
    or hostile file ends in one MergeError naming the file and tensor, never in header bytes
    read as weights or a RuntimeError from a reshape.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MergeError(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(size - 8, MAX_HEADER_BYTES):
                raise MergeError(f"corrupt safetensors file {path}: header length {hlen} exceeds the file")
            header = json.loads(f.read(hlen))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise MergeError(f"corrupt safetensors file {path}: {reason}") from None
    data_start = 8 + hlen
    _check_header(path, header, data_start, size)
    return header, data_start


def _check_header(path: Path, header: Any, data_start: int, size: int) -> None:
    """Raise MergeError unless `header` describes tensors that tile (part of) the data section.

    Checks: an object of objects; `__metadata__` str -> str; each tensor exactly dtype / shape /
    data_offsets with integer (not bool) values; a known dtype; rank <= MAX_RANK; offsets
    0 <= begin <= end <= size - data_start; end - begin == numel * element size; no overlaps.
    """
    bad = f"corrupt safetensors file {path}"
    if not isinstance(header, dict):
        raise MergeError(f"{bad}: header is not a JSON object")
    spans: list[tuple[int, int, str]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
                raise MergeError(f"{bad}: __metadata__ must map strings to strings")
            continue
        if not name or len(name) > MAX_NAME_CHARS:
            raise MergeError(f"{bad}: tensor name {_shown(name)} is empty or longer than {MAX_NAME_CHARS} characters")
        where = f"{bad}: tensor {_shown(name)}"
        if not isinstance(meta, dict):
            raise MergeError(f"{where}: entry is not a JSON object")
        if set(meta) != _TENSOR_KEYS:
            raise MergeError(f"{where}: entry must have exactly dtype, shape and data_offsets, has "
                             f"{short(sorted(meta))}")
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
        if dtype is None:
            raise MergeError(f"{where}: unsupported dtype {short(meta['dtype'])}; known: {', '.join(SAFETENSORS_DTYPES)}")
        shape = meta["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_RANK:
            raise MergeError(f"{where}: shape must be a list of at most {MAX_RANK} dimensions, got {short(shape)}")
        if not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
            raise MergeError(f"{where}: shape {short(shape)} must hold integers in [0, {MAX_DIM}]")
        offsets = meta["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise MergeError(f"{where}: data_offsets must be two integers, got {short(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise MergeError(f"{where}: data_offsets [{begin}, {end}] must satisfy 0 <= begin <= end")
        if data_start + end > size:
            raise MergeError(f"truncated safetensors file {path}: tensor {_shown(name)} ends at byte "
                             f"{data_start + end}, the file has {size}")
        numel = math.prod(shape)
        want = numel * dtype.itemsize
        if end - begin != want:
            raise MergeError(f"{where}: data_offsets span {end - begin} bytes but shape {shape} of "
                             f"{meta['dtype']} needs {want}")
        if end > begin:  # empty tensors take no bytes and cannot overlap anything
            spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise MergeError(f"{bad}: tensors {_shown(prev)} and {_shown(name)} overlap in the data section")


def _safetensors_infos(path: Path) -> dict[str, TensorInfo]:
    header, start = read_safetensors_header(path)
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[name] = TensorInfo(name, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]), path,
                               start + begin, end - begin)
    return out


def is_hub_id(ref: str) -> bool:
    return bool(HUB_ID_RE.match(ref.split("@", 1)[0])) and not ref.startswith((".", "/", "~"))


def adapter_ref_refused(ref: str) -> MergeError:
    """The one line for a `BASE+ADAPTER` reference where a whole model is loaded by folder (a
    search, statistics): only merges apply an adapter (mergecore.io.adapter)."""
    return MergeError(f"model '{short(ref)}': a base+adapter (LoRA) reference is applied tensor by tensor by merges "
                      f"only (mergecore merge, --dry-run); here the model is loaded whole, so fold the adapter first: "
                      f"merge a passthrough recipe with this one model into a folder and use that folder")


def resolve_model_path(ref: str, search_dirs: tuple[Path, ...] = ()) -> Path:
    """A local folder for `ref`: an existing folder, or a Hub snapshot downloaded or cached.

    Never substitutes other weights: when the Hub cannot be reached the error names the id and
    says how to point at a local copy.
    """
    if "+" in ref and not any(c.exists() for c in [Path(ref).expanduser()] + [d / ref for d in search_dirs]):
        raise adapter_ref_refused(ref)
    candidates = [Path(ref).expanduser()] + [d / ref for d in search_dirs]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
        if c.exists():
            raise MergeError(f"model '{ref}' is a file, expected a model folder (with config.json and weights)")
    if not is_hub_id(ref):
        raise MergeError(f"model '{ref}' not found: no such folder, and it is not a Hub id (org/name)")
    repo_id, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency
        raise MergeError("huggingface_hub is not installed; cannot fetch Hub models") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=WEIGHT_PATTERNS))
    except Exception as first_err:  # offline, not found, gated ...
        try:  # a copy already in the local Hub cache still works offline
            return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=WEIGHT_PATTERNS, local_files_only=True))
        except Exception:
            pass
        reason = str(first_err).splitlines()[0][:200] if str(first_err) else type(first_err).__name__
        raise MergeError(
            f"cannot fetch '{repo_id}' from the Hugging Face Hub ({type(first_err).__name__}: {reason}); "
            f"download it where the Hub is reachable and give its local folder as the model path instead"
        ) from None


class ModelSource:
    """A checkpoint folder opened lazily: config, tensor index, and per-tensor reads."""

    def __init__(self, ref: str, path: Path | None = None, search_dirs: tuple[Path, ...] = ()):
        self.ref = ref
        self.path = path if path is not None else resolve_model_path(ref, search_dirs)
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = {}
        self._bin_files: dict[Path, dict[str, torch.Tensor]] = {}
        self._bin_lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self._index()

    # -- opening -----------------------------------------------------------------------------

    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            return {}
        return read_json_object(cfg, f"model '{self.ref}': config.json")

    def _index(self) -> None:
        p = self.path
        st_index = p / "model.safetensors.index.json"
        bin_index = p / "pytorch_model.bin.index.json"
        if st_index.is_file():
            weight_map = self._weight_map(st_index)
            held = {f: _safetensors_infos(f) for f in dict.fromkeys(weight_map.values())}
            self._apply_index(st_index, weight_map, held)
        elif (p / "model.safetensors").is_file():
            self.tensors.update(_safetensors_infos(p / "model.safetensors"))
        elif list(p.glob("*.safetensors")):
            for f in sorted(p.glob("*.safetensors")):
                self.tensors.update(_safetensors_infos(f))
        elif bin_index.is_file():
            weight_map = self._weight_map(bin_index)
            held = {f: self._bin_infos(f) for f in dict.fromkeys(weight_map.values())}
            self._apply_index(bin_index, weight_map, held)
        elif (p / "pytorch_model.bin").is_file():
            self._index_bin(p / "pytorch_model.bin")
        else:
            raise MergeError(
                f"model '{self.ref}' ({p}) has no weights: expected model.safetensors, a sharded "
                f"safetensors index, or pytorch_model.bin"
            )
        if not self.tensors:
            raise MergeError(f"model '{self.ref}' ({p}): its weight files contain no tensors")

    def _weight_map(self, index: Path) -> dict[str, Path]:
        """The index's tensor -> shard file map, each shard a plain file name in the model folder.

        A shard named with a path (`../x`, `/etc/x`, `a/b`) is refused before anything is
        opened: an index must not point a merge at files outside the model it describes.
        """
        where = f"model '{self.ref}': {index.name}"
        data = read_json_object(index, where)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"{where}: 'weight_map' must be a non-empty mapping of tensor names to shard files")
        folder = index.parent
        shards: dict[str, Path] = {}
        out: dict[str, Path] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not name:
                raise MergeError(f"{where}: entry {_shown(name)}: {_shown(fname)} must map a tensor name to a file name")
            if fname not in shards:
                plain = (fname not in ("", ".", "..") and not any(c in fname for c in "/\\\0")
                         and not os.path.isabs(fname) and Path(fname).name == fname)
                f = folder / fname
                if not plain or os.path.dirname(os.path.normpath(f)) != os.path.normpath(folder):
                    raise MergeError(f"{where}: shard {_shown(fname)} must be a plain file name inside the model folder")
                if not f.is_file():
                    shown = fname if len(fname) <= 256 else short(fname)
                    raise MergeError(f"model '{self.ref}': shard {shown} named in {index.name} is missing")
                shards[fname] = f
            out[name] = shards[fname]
        return out

    def _apply_index(self, index: Path, weight_map: dict[str, Path], held: dict[Path, dict[str, TensorInfo]]) -> None:
        """Record the shards' tensors, the index deciding where a listed one is read from.

        A tensor the index lists must be in the shard it names: otherwise the read would fail
        mid-merge, or silently take a same-named tensor from another shard.
        """
        for infos in held.values():
            self.tensors.update(infos)
        for name, f in weight_map.items():
            info = held[f].get(name)
            if info is None:
                raise MergeError(f"model '{self.ref}': {index.name} puts tensor {_shown(name)} in {f.name}, "
                                 f"which does not hold it")
            self.tensors[name] = info

    def _bin_infos(self, f: Path) -> dict[str, TensorInfo]:
        return {name: TensorInfo(name, t.dtype, tuple(t.shape), f, -1, t.numel() * t.element_size())
                for name, t in self._load_bin(f).items() if isinstance(t, torch.Tensor)}

    def _index_bin(self, f: Path) -> None:
        self.tensors.update(self._bin_infos(f))

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        with self._bin_lock:
            if f not in self._bin_files:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise MergeError(f"cannot read {f}: {str(err).splitlines()[0]}") from None
                    # legacy (non-zip) format cannot be memory-mapped
                    sd = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as err:
                    raise MergeError(f"cannot read {f}: {str(err).splitlines()[0]}") from None
                if not isinstance(sd, dict):
                    raise MergeError(f"{f} does not hold a state dict")
                self._bin_files[f] = sd
            return self._bin_files[f]

    # -- reading -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.ref

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MergeError(f"model '{self.ref}' has no tensor '{name}'") from None

    @property
    def folders(self) -> tuple[Path, ...]:
        """Every folder this source reads (the output-path rule keeps a merge out of each)."""
        return (self.path,)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into a fresh CPU tensor (its own memory, nothing mapped)."""
        return self._read_info(name, self.info(name))

    def _read_info(self, name: str, info: TensorInfo) -> torch.Tensor:
        """The bytes `info` points at as a tensor (a subclass reads a second file's tensors too)."""
        if info.offset < 0:
            # a copy: the state dict is kept for the next read, and streaming methods overwrite
            # what they are handed (a shared tensor would carry one merge's arithmetic into the next)
            return self._load_bin(info.file)[name].clone()
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        try:
            fd = self._fd(info.file)
            while done < info.nbytes:
                got = os.preadv(fd, [view[done:]], info.offset + done)
                if got == 0:
                    raise MergeError(f"truncated file {info.file}: tensor '{name}' is cut short")
                done += got
        except OSError as err:
            raise MergeError(f"cannot read tensor '{name}' from {info.file}: {err}") from None
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return buf.view(info.dtype).reshape(info.shape)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._bin_lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._bin_files.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def iter_names(self) -> Iterator[str]:
        return iter(self.tensors)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config.get("model_type", "unknown")

    def __repr__(self) -> str:
        return f"ModelSource({self.ref!r}, {len(self.tensors)} tensors)"


def dtype_from_name(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float64": torch.float64, "fp64": torch.float64,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise MergeError(f"unknown dtype '{name}'; valid: float32, float16, bfloat16, float64") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fadvise_dontneed(path: Path) -> None:
    """Best effort: drop a file from the page cache (benchmarks use it for cold-cache runs)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
