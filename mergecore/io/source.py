"""Model sources: a local folder or a Hugging Face Hub id, read lazily one tensor at a time.

Safetensors files are read with plain positioned reads (no memory map), so a tensor's bytes
live only as long as the caller holds the tensor: resident memory stays bounded by the tensors
in flight, not by the model. `.bin` checkpoints are opened only through
``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from mergecore.errors import MergeError

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


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; returns (header, data_start). Raises MergeError if corrupt."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MergeError(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(size - 8, 100_000_000):
                raise MergeError(f"corrupt safetensors file {path}: header length {hlen} exceeds the file")
            header = json.loads(f.read(hlen))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MergeError(f"corrupt safetensors file {path}: {err}") from None
    if not isinstance(header, dict):
        raise MergeError(f"corrupt safetensors file {path}: header is not a JSON object")
    data_start = 8 + hlen
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise MergeError(f"corrupt safetensors file {path}: bad entry for tensor '{name}'") from None
    if data_start + end > size:
        raise MergeError(
            f"truncated safetensors file {path}: header promises {data_start + end} bytes, "
            f"file has {size}"
        )
    return header, data_start


def _safetensors_infos(path: Path) -> dict[str, TensorInfo]:
    header, start = read_safetensors_header(path)
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise MergeError(f"{path}: tensor '{name}' has unsupported dtype {meta.get('dtype')}")
        begin, end = (int(x) for x in meta["data_offsets"])
        out[name] = TensorInfo(name, dtype, tuple(int(s) for s in meta["shape"]), path, start + begin, end - begin)
    return out


def is_hub_id(ref: str) -> bool:
    return bool(HUB_ID_RE.match(ref.split("@", 1)[0])) and not ref.startswith((".", "/", "~"))


def resolve_model_path(ref: str, search_dirs: tuple[Path, ...] = ()) -> Path:
    """A local folder for `ref`: an existing folder, or a Hub snapshot downloaded or cached.

    Never substitutes other weights: when the Hub cannot be reached the error names the id and
    says how to point at a local copy.
    """
    if "+" in ref and not Path(ref).exists():
        raise MergeError(f"model '{ref}': LoRA references (model+adapter) are not supported; merge the adapter into the model first")
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
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as err:
            raise MergeError(f"model '{self.ref}': config.json is not valid JSON ({err})") from None

    def _index(self) -> None:
        p = self.path
        st_index = p / "model.safetensors.index.json"
        bin_index = p / "pytorch_model.bin.index.json"
        if st_index.is_file():
            files = self._files_from_index(st_index)
            for f in files:
                self.tensors.update(_safetensors_infos(f))
        elif (p / "model.safetensors").is_file():
            self.tensors.update(_safetensors_infos(p / "model.safetensors"))
        elif list(p.glob("*.safetensors")):
            for f in sorted(p.glob("*.safetensors")):
                self.tensors.update(_safetensors_infos(f))
        elif bin_index.is_file():
            for f in self._files_from_index(bin_index):
                self._index_bin(f)
        elif (p / "pytorch_model.bin").is_file():
            self._index_bin(p / "pytorch_model.bin")
        else:
            raise MergeError(
                f"model '{self.ref}' ({p}) has no weights: expected model.safetensors, a sharded "
                f"safetensors index, or pytorch_model.bin"
            )
        if not self.tensors:
            raise MergeError(f"model '{self.ref}' ({p}): its weight files contain no tensors")

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise MergeError(f"model '{self.ref}': bad index file {index.name} ({err})") from None
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            f = index.parent / fname
            if not f.is_file():
                raise MergeError(f"model '{self.ref}': shard {fname} named in {index.name} is missing")
            files.append(f)
        return files

    def _index_bin(self, f: Path) -> None:
        sd = self._load_bin(f)
        for name, t in sd.items():
            if isinstance(t, torch.Tensor):
                self.tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), f, -1, t.numel() * t.element_size())

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

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into a fresh CPU tensor (its own memory, nothing mapped)."""
        info = self.info(name)
        if info.offset < 0:
            return self._load_bin(info.file)[name]
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


def open_sources(refs: list[str], search_dirs: tuple[Path, ...] = ()) -> dict[str, ModelSource]:
    return {r: ModelSource(r, search_dirs=search_dirs) for r in refs}


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
