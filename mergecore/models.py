"""Loading models and what goes with them, once: `ModelPool` and the loaders it uses.

Evaluation, the searches and the app's Compare tab load checkpoint folders, tokenizers, image
preprocessing and classifier heads. A `ModelPool` loads each once (keyed by the resolved folder
and the options) and hands the same object to every user:

    pool = ModelPool()
    model = pool.model("families/fmnist-vit/base")         # shared: callers must not change it
    work = pool.fresh_model("families/fmnist-vit/base")    # a copy of its own, e.g. to merge into
    tok, prep = pool.tokenizer(folder), pool.image_prep(folder)
    head = pool.head(folder, "classifier.")                 # {tensor name: tensor}

`ImagePrep` reproduces what a ViT-style image processor does (resize, rescale, normalise,
channel count) in batched torch code, configured from a checkpoint's preprocessor_config.json
and config.json, so a whole test set is preprocessed in one go and cached.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from mergecore.errors import MergeError

PathLike = Union[str, Path]


def load_model(path: PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A checkpoint folder as a transformers model (class from config.json's `architectures`)."""
    import transformers

    p = Path(path).expanduser()
    cfg_file = p / "config.json"
    if not p.is_dir():
        raise MergeError(f"model folder not found: {p}")
    if not cfg_file.is_file():
        raise MergeError(f"{p} has no config.json; it is not a transformers checkpoint")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise MergeError(f"{cfg_file} is not valid JSON ({err})") from None
    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise MergeError(f"{p}: config.json names no architecture transformers knows ({archs or 'none'})")
    try:
        model = cls.from_pretrained(str(p), dtype=dtype, local_files_only=True)
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeError(f"cannot load {p} as {archs[0]}: {msg}") from None
    return model.to(device).eval()


def load_tokenizer(path: PathLike):
    """A tokenizer from a local folder (never downloaded)."""
    p = Path(path)
    if not p.is_dir():
        raise MergeError(f"tokenizer folder not found: {p}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise MergeError(f"cannot load a tokenizer from {p}: {type(err).__name__}: {first}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MergeError(f"cannot read {path}: {err}") from None


@dataclass(frozen=True)
class ImagePrep:
    """Resize to `size` (height, width), scale by `rescale`, normalise per channel, `channels` channels."""

    size: Optional[tuple[int, int]]
    channels: int = 3
    rescale: float = 1 / 255
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dicts(cls, processor: Optional[dict[str, Any]], config: Optional[dict[str, Any]]) -> "ImagePrep":
        processor = processor or {}
        config = config or {}
        channels = int(config.get("num_channels", 3))
        size: Optional[tuple[int, int]] = None
        if processor.get("do_resize", True):
            s = processor.get("size")
            if isinstance(s, dict) and "height" in s:
                size = (int(s["height"]), int(s["width"]))
            elif isinstance(s, dict) and "shortest_edge" in s:
                size = (int(s["shortest_edge"]),) * 2
            elif isinstance(s, int):
                size = (s, s)
            elif "image_size" in config:
                im = config["image_size"]
                size = tuple(im) if isinstance(im, (list, tuple)) else (int(im), int(im))  # type: ignore[assignment]
        rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
        if processor.get("do_normalize", True):
            mean = processor.get("image_mean", [0.5] * channels)
            std = processor.get("image_std", [0.5] * channels)
        else:
            mean, std = [0.0] * channels, [1.0] * channels
        mean = [float(x) for x in (mean if isinstance(mean, (list, tuple)) else [mean])]
        std = [float(x) for x in (std if isinstance(std, (list, tuple)) else [std])]
        return cls(size, channels, rescale, tuple(mean), tuple(std))

    @classmethod
    def from_folder(cls, path: PathLike) -> "ImagePrep":
        p = Path(path)
        proc = p / "preprocessor_config.json"
        cfg = p / "config.json"
        return cls.from_dicts(_read_json(proc) if proc.is_file() else None, _read_json(cfg) if cfg.is_file() else None)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ImagePrep":
        cfg = getattr(model, "config", None)
        return cls.from_dicts(None, cfg.to_dict() if cfg is not None else None)

    def _stat(self, values: tuple[float, ...]) -> torch.Tensor:
        v = list(values)
        if len(v) == 1:
            v = v * self.channels
        if len(v) != self.channels:
            v = [float(np.mean(v))] * self.channels
        return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)

    def _to_nchw(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(images).astype(np.float32))  # a writable float copy
        if x.ndim == 3:  # N H W (grayscale)
            x = x.unsqueeze(1)
        elif x.ndim == 4:
            if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
                x = x.permute(0, 3, 1, 2)  # N H W C -> N C H W
        else:
            raise MergeError(f"images must be N x H x W or N x H x W x C, got shape {list(images.shape)}")
        c = x.shape[1]
        if c == 4:
            x, c = x[:, :3], 3
        if c != self.channels:
            if c == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
            else:
                raise MergeError(f"cannot turn {c}-channel images into {self.channels} channels")
        return x

    def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]], chunk: int = 4096) -> torch.Tensor:
        """uint8 (or float) images -> float32 N x C x H x W model inputs."""
        if isinstance(images, np.ndarray):
            parts = [self._one_batch(images[i:i + chunk]) for i in range(0, len(images), chunk)]
        else:
            if self.size is None:
                raise MergeError("images of different sizes need a fixed size (preprocessor_config.json 'size')")
            parts = [self._one_batch(np.asarray(im)[None]) for im in images]
        return torch.cat(parts) if parts else torch.empty(0)

    def _one_batch(self, images: np.ndarray) -> torch.Tensor:
        x = self._to_nchw(images)
        if self.size is not None and tuple(x.shape[-2:]) != tuple(self.size):
            down = x.shape[-1] > self.size[1] or x.shape[-2] > self.size[0]
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=down)
        x = x * self.rescale
        return ((x - self._stat(self.mean)) / self._stat(self.std)).contiguous()



def _key(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


class ModelPool:
    """Models, tokenizers, image preprocessing and task heads, each loaded once per pool.

    What it hands out is shared: a caller that changes a model (merges into it, trains it) asks
    for `fresh_model`. `keep_models=False` keeps everything but the models (an evaluator that
    scores many checkpoint folders once each need not hold them all). Thread-safe."""

    def __init__(self, *, keep_models: bool = True):
        self.keep_models = keep_models
        self._models: dict[tuple[Path, str, torch.dtype], torch.nn.Module] = {}
        self._tokenizers: dict[Path, Any] = {}
        self._preps: dict[Path, ImagePrep] = {}
        self._heads: dict[tuple[Path, str], dict[str, torch.Tensor]] = {}
        self._lock = threading.RLock()

    def model(self, path: PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The checkpoint folder `path` as a model in eval mode, shared with other callers."""
        if not self.keep_models:
            return self.fresh_model(path, device=device, dtype=dtype)
        key = (_key(path), str(device), dtype)
        with self._lock:
            if key not in self._models:
                self._models[key] = load_model(key[0], device, dtype)
            return self._models[key]

    def fresh_model(self, path: PathLike, *, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """A model of its own for a caller that changes it (not kept by the pool)."""
        return load_model(_key(path), device, dtype)

    def tokenizer(self, path: PathLike):
        key = _key(path)
        with self._lock:
            if key not in self._tokenizers:
                self._tokenizers[key] = load_tokenizer(key)
            return self._tokenizers[key]

    def image_prep(self, path: PathLike) -> ImagePrep:
        key = _key(path)
        with self._lock:
            if key not in self._preps:
                self._preps[key] = ImagePrep.from_folder(key)
            return self._preps[key]

    def head(self, path: PathLike, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix` (e.g. a classifier head) of the checkpoint at `path`."""
        key = (_key(path), prefix)
        with self._lock:
            if key not in self._heads:
                from mergecore.io.source import ModelSource

                src = ModelSource(str(key[0]), path=key[0])
                try:
                    names = [n for n in src.tensors if n.startswith(prefix)]
                    if not names:
                        raise MergeError(f"checkpoint {path} has no tensors under '{prefix}' (head_prefix)")
                    self._heads[key] = {n: src.read(n).clone() for n in names}
                finally:
                    src.close()
            return self._heads[key]

    def release(self, path: Optional[PathLike] = None) -> None:
        """Forget the models of `path` (every model when None), so their memory can be freed."""
        with self._lock:
            for key in [k for k in self._models if path is None or k[0] == _key(path)]:
                del self._models[key]
