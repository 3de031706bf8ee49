"""Turning raw examples into model inputs: image preprocessing and tokenizer loading.

`ImagePrep` reproduces what a ViT-style image processor does (resize, rescale, normalise,
channel count) in batched torch code, configured from a checkpoint's preprocessor_config.json
and config.json, so a whole test set is preprocessed in one go and cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from mergecore.errors import MergeError


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
    def from_folder(cls, path: Union[str, Path]) -> "ImagePrep":
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


def load_tokenizer(path: Union[str, Path]):
    """A tokenizer from a local folder (never downloaded)."""
    p = Path(path)
    if not p.is_dir():
        raise MergeError(f"tokenizer folder not found: {p}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as err:
        raise MergeError(f"cannot load a tokenizer from {p}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into (input_ids, attention_mask) tensors."""
    n = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[i, :len(s)] = t
            mask[i, :len(s)] = 1
        else:
            ids[i, n - len(s):] = t
            mask[i, n - len(s):] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0
