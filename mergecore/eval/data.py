"""Local data for evaluation tasks: JSONL, JSON, CSV, Parquet, text, numpy and idx arrays, image folders.

A task's `data:` block (a `DataSpec`) names the files; `load_data` returns either `Records`
(a list of dicts, for text tasks) or `Arrays` (images and integer labels, for image tasks).
Relative paths are resolved against the folder of the YAML file that named them.
Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergecore.errors import MergeError

RECORD_FORMATS = ("jsonl", "json", "csv", "parquet", "txt")
ARRAY_FORMATS = ("npy", "npz", "idx", "image_folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

Format = Literal["auto", "jsonl", "json", "csv", "parquet", "txt", "npy", "npz", "idx", "image_folder"]


class SplitSpec(BaseModel):
    """A seeded, shuffled validation/test split of one file: `part: val` keeps a random
    `val_fraction` of the rows, `part: test` keeps exactly the others, so a `tasks-val.yml` and a
    `tasks.yml` naming the same file with the same fraction and seed never share a row and
    together cover it. `stratify: true` draws the fraction within each label (the task's
    `label_field`, or an array task's labels): every label keeps its share, to within one row,
    in both parts (see `split_rows`).
    The kept rows stay in file order."""

    model_config = ConfigDict(extra="forbid")

    part: Literal["val", "test"]
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0
    stratify: bool = False


class DataSpec(BaseModel):
    """Where a task's examples come from.

    Record formats (text tasks) use `path`. Array formats (image tasks) use `images` and
    `labels` (npy / idx files) or `path` (an .npz file with `images_key`/`labels_key`, or an
    image folder with one sub-folder per class). `range` keeps rows [start, stop), then `split`
    keeps its part of those (a shuffled fraction, see `SplitSpec`), then `max_examples` the first
    N of what is left (all before any subset sampling). A .txt file is one record per non-empty
    line (`txt_unit: line`) or per paragraph, blocks separated by blank lines (`txt_unit:
    paragraph`), each as `{"text": ...}`.
    """

    model_config = ConfigDict(extra="forbid")

    format: Format = "auto"
    path: Optional[str] = None
    images: Optional[str] = None
    labels: Optional[str] = None
    images_key: str = "images"
    labels_key: str = "labels"
    class_names: Optional[list[str]] = None  # image folders: the label order (default: sorted folder names)
    range: Optional[tuple[int, int]] = None
    split: Optional[SplitSpec] = None
    max_examples: Optional[int] = None
    txt_unit: Literal["line", "paragraph"] = "line"

    @model_validator(mode="after")
    def _check(self) -> "DataSpec":
        if self.path is None and self.images is None:
            raise ValueError("data needs 'path' (a file or folder) or 'images' (+ 'labels')")
        if self.path is not None and self.images is not None:
            raise ValueError("give either 'path' or 'images'/'labels', not both")
        if self.images is not None and self.labels is None:
            raise ValueError("'images' needs 'labels' too")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError("max_examples must be at least 1")
        if self.range is not None and not (0 <= self.range[0] < self.range[1]):
            raise ValueError("range must be [start, stop) with 0 <= start < stop")
        return self


@dataclass
class Records:
    """Rows of a table (dicts), for text tasks."""

    rows: list[dict[str, Any]]
    source: str

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Arrays:
    """Images (an array N x H x W [x C], or a list of arrays of varying size) and labels (N,)."""

    images: Union[np.ndarray, list[np.ndarray]]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)


Data = Union[Records, Arrays]


# ---------------------------------------------------------------------------------------------
# format detection


def _resolve(p: str, base_dir: Optional[Path]) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _is_idx(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(("-ubyte", ".idx")) or "-idx" in name


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "image_folder"
    if _is_idx(path):
        return "idx"
    suffix = path.suffix.lower()
    table = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
             ".parquet": "parquet", ".pq": "parquet", ".txt": "txt", ".npy": "npy", ".npz": "npz"}
    if suffix in table:
        return table[suffix]
    raise MergeError(f"cannot tell the data format of {path}; set 'format:' to one of "
                     f"{', '.join(RECORD_FORMATS + ARRAY_FORMATS)}")


# ---------------------------------------------------------------------------------------------
# readers


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), optionally gzip-compressed."""
    path = Path(path)
    if not path.is_file():
        raise MergeError(f"data file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise MergeError(f"cannot read idx file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise MergeError(f"{path} is not an idx file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise MergeError(f"{path}: unknown idx element type 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise MergeError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(dtypes[code])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) < need:
        raise MergeError(f"{path}: truncated idx file: header promises {need} bytes of data, file has {len(body)}")
    return np.frombuffer(body[:need], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an idx file (gzip-compressed if the name ends in .gz)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    a = np.ascontiguousarray(array)
    if a.dtype not in codes:
        raise MergeError(f"idx cannot store dtype {a.dtype}")
    header = bytes([0, 0, codes[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    body = a.astype(a.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + body)


def _read_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise MergeError(f"data file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise MergeError(f"cannot read {path}: {err}") from None


def _read_array(path: Path) -> np.ndarray:
    fmt = detect_format(path)
    if fmt not in ("idx", "npy"):
        raise MergeError(f"{path}: 'images'/'labels' must be .npy or idx files, got {fmt}")
    if not path.is_file():
        raise MergeError(f"data file not found: {path}")
    st = path.stat()
    return _read_array_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, fmt)


@functools.lru_cache(maxsize=16)
def _read_array_cached(path: str, mtime_ns: int, size: int, fmt: str) -> np.ndarray:
    """Arrays are shared between tasks reading the same file (read-only)."""
    a = read_idx(path) if fmt == "idx" else _read_npy(Path(path))
    a.flags.writeable = False
    return a


def read_txt(path: Path, unit: str = "line") -> list[dict[str, Any]]:
    """A text file as records `{"text": ...}`: one per non-empty line, or per paragraph (blocks of
    lines separated by blank lines, inner line breaks kept)."""
    text = path.read_text(encoding="utf-8")
    if unit == "paragraph":
        blocks, cur = [], []
        for line in text.splitlines():
            if line.strip():
                cur.append(line.rstrip())
            elif cur:
                blocks.append("\n".join(cur))
                cur = []
        if cur:
            blocks.append("\n".join(cur))
        return [{"text": b} for b in blocks]
    return [{"text": line.rstrip("\n")} for line in text.splitlines() if line.strip()]


def _read_records(path: Path, fmt: str, txt_unit: str = "line") -> list[dict[str, Any]]:
    if not path.is_file():
        raise MergeError(f"data file not found: {path}")
    try:
        if fmt == "jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise MergeError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            return rows
        if fmt == "json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise MergeError(f"{path}: expected a list of records (or an object holding one list)")
                data = lists[0]
            return list(data)
        if fmt == "txt":
            return read_txt(path, txt_unit)
        import pandas as pd

        if fmt == "csv":
            # cells as written: pandas would read "NA", "null", "None" and empty cells as NaN (a text "nan")
            df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", keep_default_na=False)
        elif fmt == "parquet":
            try:
                df = pd.read_parquet(path)
            except ImportError:
                raise MergeError("reading Parquet needs pyarrow: pip install pyarrow") from None
        else:  # pragma: no cover - guarded by the caller
            raise MergeError(f"unknown record format {fmt}")
        return [{k: _plain(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
    except MergeError:
        raise
    except json.JSONDecodeError as err:
        raise MergeError(f"{path}: not valid JSON ({err.msg})") from None
    except Exception as err:
        raise MergeError(f"cannot read {path}: {type(err).__name__}: {err}") from None


def _plain(v: Any) -> Any:
    """numpy scalars/arrays from pandas -> plain Python values."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _read_image_folder(path: Path, class_names: Optional[list[str]]) -> tuple[list[np.ndarray], np.ndarray]:
    from PIL import Image

    folders = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not folders:
        raise MergeError(f"image folder {path} has no class sub-folders (expected {path}/<class>/<image>)")
    names = class_names or folders
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise MergeError(f"image folder {path}: sub-folder(s) {', '.join(unknown)} are not in class_names")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        d = path / name
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L") if im.mode in ("L", "1", "I", "I;16", "F") else im.convert("RGB")
                    images.append(np.asarray(im))
            except OSError as err:
                raise MergeError(f"cannot read image {f}: {err}") from None
            labels.append(label)
    if not images:
        raise MergeError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images, np.asarray(labels, dtype=np.int64)


def _stack_if_uniform(images: list[np.ndarray]) -> Union[np.ndarray, list[np.ndarray]]:
    shapes = {im.shape for im in images}
    return np.stack(images) if len(shapes) == 1 else images


def load_data(spec: DataSpec, base_dir: Optional[Path] = None, label_field: Optional[str] = None) -> Data:
    """Read the examples `spec` names (see `DataSpec`); `label_field` names the records' label
    column for a stratified `split`."""
    if spec.images is not None:
        ipath, lpath = _resolve(spec.images, base_dir), _resolve(spec.labels or "", base_dir)
        images = _read_array(ipath)
        labels = _read_array(lpath).reshape(-1).astype(np.int64)
        if len(images) != len(labels):
            raise MergeError(f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels")
        data: Data = Arrays(images, labels, str(ipath))
    else:
        path = _resolve(spec.path or "", base_dir)
        if not path.exists():
            raise MergeError(f"data file not found: {path}")
        fmt = detect_format(path) if spec.format == "auto" else spec.format
        if fmt in RECORD_FORMATS:
            data = Records(_read_records(path, fmt, spec.txt_unit), str(path))
        elif fmt == "npz":
            try:
                z = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as err:
                raise MergeError(f"cannot read {path}: {err}") from None
            for key in (spec.images_key, spec.labels_key):
                if key not in z:
                    raise MergeError(f"{path} has no array '{key}' (it has: {', '.join(z.files)}); set images_key/labels_key")
            data = Arrays(z[spec.images_key], z[spec.labels_key].reshape(-1).astype(np.int64), str(path))
            if len(data.images) != len(data.labels):
                raise MergeError(f"{path}: '{spec.images_key}' and '{spec.labels_key}' differ in length")
        elif fmt == "image_folder":
            if not path.is_dir():
                raise MergeError(f"{path} is not a folder (format image_folder)")
            ims, labels = _read_image_folder(path, spec.class_names)
            data = Arrays(_stack_if_uniform(ims), labels, str(path))
        elif fmt in ("npy", "idx"):
            raise MergeError(f"{path}: a {fmt} file holds one array; give 'images:' and 'labels:' files instead of 'path:'")
        else:  # pragma: no cover - pydantic restricts the format
            raise MergeError(f"unknown data format {fmt}")
    return _slice(data, spec, label_field)


def _take(data: Data, keep: Union[np.ndarray, slice]) -> Data:
    """The rows `keep` (positions, or a slice: views of arrays, no copy) of `data`."""
    if isinstance(data, Records):
        return Records(data.rows[keep] if isinstance(keep, slice) else [data.rows[i] for i in keep], data.source)
    many = isinstance(data.images, np.ndarray) or isinstance(keep, slice)
    imgs = data.images[keep] if many else [data.images[i] for i in keep]
    return Arrays(imgs, data.labels[keep], data.source)


def split_rows(labels: Optional[list[Any]], n: int, split: SplitSpec) -> np.ndarray:
    """Row positions (sorted) of `split.part` among `n` rows: `round(val_fraction * n)` rows go
    to `val`, the rest to `test`. With `labels`, each label gets its share (the floor of
    `val_fraction * its rows`, plus one for the labels with the largest remainders until the
    total is reached), drawn by a seeded shuffle within the label."""
    rng = np.random.default_rng(split.seed)
    if labels is None:
        groups = [np.arange(n)]
    else:
        by_label: dict[str, list[int]] = {}
        for i, v in enumerate(labels):
            by_label.setdefault(f"{type(v).__name__}:{v}", []).append(i)
        groups = [np.asarray(by_label[k]) for k in sorted(by_label)]
    exact = np.array([split.val_fraction * len(g) for g in groups])
    counts = np.floor(exact).astype(np.int64)
    extra = int(round(split.val_fraction * n)) - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:max(0, extra)]] += 1
    val = [g[rng.permutation(len(g))[:c]] for g, c in zip(groups, counts)]
    in_val = np.zeros(n, dtype=bool)
    for v in val:
        in_val[v] = True
    return np.flatnonzero(in_val if split.part == "val" else ~in_val)


def _split(data: Data, split: SplitSpec, label_field: Optional[str]) -> Data:
    labels: Optional[list[Any]] = None
    if split.stratify:
        if isinstance(data, Arrays):
            labels = data.labels.tolist()
        elif label_field is None:
            raise MergeError(f"{data.source}: split.stratify needs labels; only classification tasks have them")
        else:
            missing = next((i for i, r in enumerate(data.rows) if label_field not in r), None)
            if missing is not None:
                raise MergeError(f"{data.source}: row {missing + 1} has no field '{label_field}' to stratify the split by")
            labels = [data.rows[i][label_field] for i in range(len(data))]
    return _take(data, split_rows(labels, len(data), split))


def _slice(data: Data, spec: DataSpec, label_field: Optional[str] = None) -> Data:
    lo, hi = spec.range if spec.range else (0, len(data))
    if spec.range and hi > len(data):
        raise MergeError(f"{data.source}: range [{lo}, {hi}) is outside its {len(data)} rows")
    if (lo, hi) != (0, len(data)):
        data = _take(data, slice(lo, hi))
    if spec.split is not None:
        data = _split(data, spec.split, label_field)
    if spec.max_examples is not None and spec.max_examples < len(data):
        data = _take(data, slice(0, spec.max_examples))
    return data
