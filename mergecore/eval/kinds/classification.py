"""`classification`: accuracy. Image inputs (idx / npy / npz / image folders) go through the
checkpoint's image preprocessing; text inputs (JSONL / CSV / Parquet) through its tokenizer.

``classes`` restricts both the examples and the logits to those labels, and ``head_from``
scores the task with another checkpoint's classifier head (tensors under ``head_prefix``) on
the evaluated model's body -- the task-head setting of the RMM paper, where each source model
keeps its own head and only the bodies are merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from mergecore.errors import MergeError, clip, short
from mergecore.eval.data import Arrays, Data, Records
from mergecore.eval.kind import (Prepared, Resources, Task, TaskSpec, TrainingInputs, batches, call_with_head, head_for,
                                 model_device, model_dtype, register_kind, row_text)
from mergecore.eval.prep import pad_batch, pad_id_of
from mergecore.eval.yamlspec import relative_path


class ClassificationSpec(TaskSpec):
    kind: Literal["classification"]
    input: Literal["auto", "image", "text"] = "auto"
    text_field: str = "text"
    text_pair_field: Optional[str] = None
    label_field: str = "label"
    label_names: Optional[list[str]] = None
    classes: Optional[list[int]] = None
    head_from: Optional[str] = None
    head_prefix: str = "classifier."
    max_length: int = Field(default=512, ge=1)
    tokenizer: Optional[str] = None

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("classes must be a non-empty list of distinct label ids >= 0")
        return v


class ClassificationTask(Task):
    kind = "classification"
    metric = "accuracy"
    spec_class = ClassificationSpec

    def __init__(self, spec: ClassificationSpec, base_dir: Optional[Path] = None):
        super().__init__(spec, base_dir)
        self.classes = spec.classes
        self.head_from = spec.head_from

    def head_path(self) -> Optional[Path]:
        """The checkpoint folder whose head scores this task (`head_from`), or None."""
        if self.head_from is None:
            return None
        p = relative_path(self.head_from, self.base_dir)
        if not p.is_dir():
            raise MergeError(f"{self.where()}: head_from '{clip(self.head_from)}' is not a checkpoint folder ({clip(p)})")
        return p

    def is_image(self) -> bool:
        if self.spec.input != "auto":
            return self.spec.input == "image"
        return isinstance(self.data(), Arrays)

    def _labels_of(self, data: Data) -> np.ndarray:
        if isinstance(data, Arrays):
            return data.labels
        rows = data.rows
        self.require_fields(rows, self.spec.text_field, self.spec.label_field, self.spec.text_pair_field)
        names = self.spec.label_names
        out = []
        for i, r in enumerate(rows):
            v = r[self.spec.label_field]
            if isinstance(v, str) and not v.lstrip("-").isdigit():
                if names is None or v not in names:
                    raise MergeError(f"{self.where()}: label {short(v)} is not a number; list the label names in label_names")
                out.append(names.index(v))
            elif isinstance(v, (int, str)) or (isinstance(v, float) and v.is_integer()):
                out.append(int(v))
            else:  # null, NaN, 1.5, a list: not a class
                raise MergeError(f"{self.where()}: row {i + 1}: label {short(v)} is neither a class id nor a label name")
        return np.asarray(out, dtype=np.int64)

    def _filter(self, data: Data) -> Data:
        labels = self._labels_of(data)
        self._all_labels = labels
        if self.classes is None:
            self._keep = np.arange(len(labels))
            return data
        keep = np.flatnonzero(np.isin(labels, self.classes))
        if len(keep) == 0:
            raise MergeError(f"{self.where()}: no example has a label in classes {short(self.classes)}")
        self._keep = keep
        if isinstance(data, Arrays):
            imgs = data.images[keep] if isinstance(data.images, np.ndarray) else [data.images[i] for i in keep]
            return Arrays(imgs, data.labels[keep], data.source)
        return Records([data.rows[i] for i in keep], data.source)

    def labels(self) -> np.ndarray:
        d = self.data()
        return d.labels if isinstance(d, Arrays) else self._all_labels[self._keep]

    def _prep_key(self, res: Resources) -> tuple[Any, Any]:
        if self.is_image():
            prep = res.image_prep()
            return ("image", prep), None
        tok = res.tokenizer(self.tokenizer_override())
        return ("text", id(tok)), tok

    def _prepare(self, res: Resources) -> Prepared:
        labels = torch.as_tensor(self.labels(), dtype=torch.long)
        d = self.data()
        if self.is_image():
            if not isinstance(d, Arrays):
                raise MergeError(f"{self.where()}: input is image but the data holds records")
            return Prepared(len(labels), {"pixel_values": res.image_prep()(d.images), "labels": labels})
        if not isinstance(d, Records):
            raise MergeError(f"{self.where()}: input is text but the data holds arrays")
        tok = res.tokenizer(self.tokenizer_override())
        s = self.spec
        seqs = []
        for i, r in enumerate(d.rows):
            args = (row_text(r, s.text_field, i, self.where()),) + (
                (row_text(r, s.text_pair_field, i, self.where()),) if s.text_pair_field else ())
            seqs.append(tok(*args, truncation=True, max_length=s.max_length)["input_ids"])
        return Prepared(len(labels), {"input_ids": seqs, "labels": labels, "pad_id": pad_id_of(tok)})

    def score(self, model, prepared, indices, res, batch_size, on_batch=None):
        dev = model_device(model)
        head = self._head(res, model)
        classes = torch.as_tensor(self.classes, device=dev) if self.classes is not None else None
        correct = 0
        done = 0
        dtype = model_dtype(model)
        for b in batches(indices, batch_size):
            if "pixel_values" in prepared.data:
                kwargs = {"pixel_values": prepared.data["pixel_values"][b].to(dev, dtype)}
            else:
                ids, mask = pad_batch([prepared.data["input_ids"][i] for i in b], prepared.data["pad_id"])
                kwargs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
            logits = call_with_head(model, head, kwargs).logits.float()
            if classes is not None:
                if int(classes.max()) >= logits.shape[-1]:
                    raise MergeError(f"{self.where()}: classes go up to {int(classes.max())} but the model has {logits.shape[-1]} outputs")
                pred = classes[logits[:, classes].argmax(-1)]
            else:
                pred = logits.argmax(-1)
            correct += int((pred.cpu() == prepared.data["labels"][b]).sum())
            done += len(b)
            if on_batch:
                on_batch(done)
        return {"accuracy": correct / max(1, len(indices))}

    def head_prefix(self) -> Optional[str]:
        return self.spec.head_prefix if self.head_from is not None else None

    def _head(self, res: Resources, model: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
        hp = self.head_path()
        return None if hp is None else head_for(model, res.head(hp, self.spec.head_prefix), hp, self.where())

    def training_inputs(self, res: Resources, model: torch.nn.Module) -> TrainingInputs:
        """The images (or tokenised texts), one row of logits each, with this task's head and classes."""
        prepared = self.prepare(res)
        classes = torch.as_tensor(self.classes) if self.classes is not None else None
        head = self._head(res, model)
        if "pixel_values" in prepared.data:
            return TrainingInputs("example", prepared.data["pixel_values"], 0, classes, head)
        return TrainingInputs("example", list(prepared.data["input_ids"]), prepared.data["pad_id"], classes, head)


register_kind(ClassificationTask)
