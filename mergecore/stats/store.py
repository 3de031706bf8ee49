"""The statistics file of data-informed methods (RegMean, RegMean++, Fisher merging), and its reader.

One safetensors file. Its metadata holds `format: mergecore-stats` and `stats`, a JSON object:

    kind         gram | gram_plusplus | fisher
    models       [{"name": ref as given, "path": resolved folder or null}, ...] in collection order
    tasks        [task name per model]           examples  [examples per model]
    rows         [rows per model]  (images, or non-pad tokens of an LM; per forward pass)
    dtype        "float32"
    inputs       (gram kinds) {weight name: key of its Gram}: weights that read the same input
                 (q/k/v, gate/up) share one matrix, stored once under the first weight's name
    transposed   (gram kinds) weight names stored [in, out] (transformers Conv1D)
    fisher_norm  (fisher) per model, the L2 norm of its whole Fisher (FusionBench's normalisation)
    estimator    (fisher) "exact" (expectation over the classes) or "sampled" (one label per row)

Tensors are keyed `"<model index>/<key>"`: a Gram is the mean XᵀX/N over the N rows the layer
saw (as FusionBench stores it), [in, in]; a Fisher has its parameter's shape. Sizes: one
[in, in] float32 matrix per distinct linear input and model (a Llama layer has 4: attention
input, o_proj input, MLP input, down_proj input), a Fisher file is one float32 copy of each
model. Written atomically (temporary file + rename); read lazily, one tensor at a time.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mergecore.errors import MergeError, clip

FORMAT = "mergecore-stats"
KINDS = ("gram", "gram_plusplus", "fisher")
# what each kind is, in words (the CLI's help and the app's statistics panel say it)
KIND_TEXT = {"gram": "Gram matrices of each linear layer's inputs",
             "gram_plusplus": "Gram matrices of each linear layer's inputs, taken through the merged earlier layers",
             "fisher": "the diagonal Fisher information of each parameter"}


def describe_kind(kind: str) -> str:
    """What statistics of `kind` are, in words."""
    return KIND_TEXT.get(kind, f"{kind} statistics")


def tensor_key(index: int, name: str) -> str:
    return f"{index}/{name}"


def write_stats(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `tensors` (float32, keyed by `tensor_key`) and `meta` to `path` atomically: nothing is
    left at `path` (or beside it) when writing fails."""
    from safetensors.torch import save_file

    if meta.get("kind") not in KINDS:
        raise MergeError(f"statistics kind must be one of {', '.join(KINDS)}, got '{meta.get('kind')}'")
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    data = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    try:
        save_file(data, str(tmp), metadata={"format": FORMAT, "stats": json.dumps({**meta, "dtype": "float32"})})
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def is_stats_file(path: str | Path) -> bool:
    """Whether `path` is a statistics file this tool wrote (format marker in its header)."""
    try:
        return _header(Path(path)).get("format") == FORMAT
    except MergeError:
        return False


def _header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - a corrupt file or not safetensors
        raise MergeError(f"cannot read statistics {path}: {clip(err, 120) or type(err).__name__}") from None


@dataclass
class StatsFile:
    """An opened statistics file: its description and keys; tensors are read on demand."""

    path: Path
    meta: dict[str, Any]
    keys: frozenset

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def models(self) -> list[dict[str, Any]]:
        return self.meta["models"]

    def model_index(self, ref: str) -> Optional[int]:
        """The index of the model `ref` (a recipe's model: a path, relative or not, or a Hub id):
        the same resolved folder, else the same name, else a unique folder whose path ends in `ref`."""
        local = Path(ref).expanduser()
        resolved = str(local.resolve()) if local.is_dir() else None
        for i, m in enumerate(self.models):
            if resolved is not None and m.get("path") == resolved:
                return i
        named = [i for i, m in enumerate(self.models) if m.get("name") == ref]
        if len(named) == 1:
            return named[0]
        tail = Path(ref).parts
        ends = [i for i, m in enumerate(self.models) if m.get("path") and tail and Path(m["path"]).parts[-len(tail):] == tail]
        return ends[0] if len(ends) == 1 and ".." not in tail else None

    def match(self, refs: Sequence[str], method: str) -> list[int]:
        """The statistics' index of each recipe model, or a one-line error naming the first model
        without statistics."""
        out = []
        for ref in refs:
            i = self.model_index(ref)
            if i is None:
                have = ", ".join(m["name"] for m in self.models)
                raise MergeError(f"method '{method}': {self.path.name} has no statistics for model '{clip(ref, 80)}' "
                                 f"(collected for: {clip(have, 200)}); collect them for the recipe's models")
            out.append(i)
        if len(set(out)) != len(out):
            raise MergeError(f"method '{method}': two recipe models match the same statistics in {self.path.name}")
        return out

    def read(self, key: str) -> Optional[torch.Tensor]:
        if key not in self.keys:
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(key).to(torch.float32)

    def gram(self, index: int, weight: str) -> Optional[torch.Tensor]:
        """Model `index`'s Gram matrix of the input of `weight` (None when none was collected)."""
        key = (self.meta.get("inputs") or {}).get(weight)
        return None if key is None else self.read(tensor_key(index, key))

    def transposed(self, weight: str) -> bool:
        return weight in set(self.meta.get("transposed") or ())


def _validate(path: Path, md: dict[str, str]) -> dict[str, Any]:
    if md.get("format") != FORMAT:
        raise MergeError(f"{path.name} is not a statistics file (format '{clip(md.get('format'), 40)}'); "
                         f"write one with `mergecore collect-stats`")
    try:
        meta = json.loads(md.get("stats", ""))
    except json.JSONDecodeError:
        raise MergeError(f"{path.name}: the statistics description is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS or not isinstance(meta.get("models"), list):
        raise MergeError(f"{path.name}: the statistics description has no valid kind and model list")
    return meta


class _Reader:
    """Open statistics files once per process (keys and description cached by path, mtime, size)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[tuple[str, float, int], StatsFile] = {}

    def open(self, path: str | Path) -> StatsFile:
        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            raise MergeError(f"statistics file not found: {p}") from None
        key = (str(p), st.st_mtime, st.st_size)
        with self._lock:
            hit = self._files.get(key)
            if hit is None:
                from safetensors import safe_open

                meta = _validate(p, _header(p))
                with safe_open(str(p), "pt") as f:
                    hit = self._files[key] = StatsFile(p, meta, frozenset(f.keys()))
            return hit


_READER = _Reader()


def open_stats(path: str | Path) -> StatsFile:
    """The statistics file at `path`, checked (format, kind, model list); cached per process."""
    return _READER.open(path)


def stats_for_method(artifacts: Optional[dict[str, Any]], name: str, method: str, kinds: Sequence[str],
                     input_models: Sequence[str]) -> tuple[StatsFile, list[int]]:
    """What a data-informed method reads: the artifact `name`, of one of `kinds`, with statistics
    for every one of `input_models` (their indices in the file, in method order)."""
    path = (artifacts or {}).get(name)
    if path is None:
        raise MergeError(f"method '{method}': the recipe's artifacts have no '{name}' entry (found: "
                         f"{', '.join(sorted(artifacts or {})) or 'none'}); collect statistics with "
                         f"`mergecore collect-stats` or merge with --collect-stats TASKS.yml")
    stats = open_stats(path)
    if stats.kind not in kinds:
        raise MergeError(f"method '{method}' needs {' or '.join(kinds)} statistics, but {stats.path.name} holds "
                         f"{stats.kind} statistics")
    if not input_models:
        raise MergeError(f"method '{method}' was called without its models' names; it cannot match the statistics")
    return stats, stats.match(input_models, method)
