"""Tasks: data + how to score a model + a metric, described in YAML.

Four kinds:

- ``classification``: accuracy. Image inputs (idx / npy / npz / image folders) go through the
  checkpoint's image preprocessing; text inputs (JSONL / CSV / Parquet) through its tokenizer.
  ``classes`` restricts both the examples and the logits to those labels, and ``head_from``
  scores the task with another checkpoint's classifier head (tensors under ``head_prefix``)
  on the evaluated model's body -- the task-head setting of the RMM paper, where each source
  model keeps its own head and only the bodies are merged.
- ``lm`` (causal-LM loss / perplexity): perplexity = exp(total NLL / predicted tokens) over all
  texts; long texts are cut into ``max_length`` chunks. The score (higher is better, in (0, 1])
  is 1 / perplexity.
- ``multiple_choice``: the option with the largest log-likelihood of its tokens given the
  context wins (``normalize``: none | tokens | chars); accuracy.
- ``generation``: greedy decoding, cut at ``stop`` strings, exact match against the answer(s).

Each task's `score` is higher-is-better, so an evaluator can average them (searches maximise
that mean).

YAML (a list of tasks, or ``tasks:`` holding one; relative paths are relative to the file)::

    tasks:
      - name: fmnist_tops                 # unique; `kind` defaults to classification
        kind: classification
        data: {images: t10k-images-idx3-ubyte.gz, labels: t10k-labels-idx1-ubyte.gz}
        classes: [0, 2, 4, 6]             # optional: only these labels / logits
        head_from: expert_fmnist_tops     # optional: score with this checkpoint's classifier.*
      - name: sentiment
        kind: classification
        data: {path: sst.csv}             # jsonl / json / csv / tsv / parquet / txt records
        input: text                       # auto: arrays -> image, records -> text
        text_field: sentence
        label_field: label
        label_names: [negative, positive] # when labels are strings
      - name: wiki
        kind: lm                          # perplexity; score = 1 / perplexity
        data: {path: wiki.jsonl, max_examples: 500}
        text_field: text
        max_length: 512
      - name: arc
        kind: multiple_choice
        data: {path: arc.jsonl}
        context_template: "Question: {question}\nAnswer:"
        choices_field: choices            # or choice_fields: [A, B, C, D] (one column each)
        answer_field: answer              # index, letter, or the option's text
        normalize: none                   # none | tokens | chars
      - name: gsm
        kind: generation
        data: {path: gsm.jsonl}
        prompt_field: question
        answer_field: answer              # a string or a list of accepted strings
        max_new_tokens: 16
        stop: ["\n"]
        ignore_case: false

Data blocks (`DataSpec`): ``path`` (records, .npz, or an image folder with one sub-folder per
class), or ``images`` + ``labels`` (.npy or idx files); ``range: [start, stop]`` and
``max_examples`` keep a fixed part of the file. Text tasks may name a ``tokenizer`` folder;
otherwise the evaluated checkpoint's tokenizer is used. ``batch_size`` overrides the
evaluator's per task.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from mergecore.errors import MergeError, clip, short
from mergecore.eval.data import Arrays, Data, DataSpec, Records, load_data
from mergecore.eval.prep import ImagePrep, pad_batch, pad_id_of
from mergecore.yamlio import load_yaml, load_yaml_file

BatchCallback = Callable[[int], None]  # called with the number of examples finished so far


# ---------------------------------------------------------------------------------------------
# YAML schema


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    data: DataSpec
    batch_size: Optional[int] = Field(default=None, ge=1)
    description: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("task name is empty")
        return v


class ClassificationSpec(_Spec):
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


class LMSpec(_Spec):
    kind: Literal["lm", "perplexity"]
    text_field: str = "text"
    max_length: int = Field(default=512, ge=2)
    add_special_tokens: bool = True
    tokenizer: Optional[str] = None


class MultipleChoiceSpec(_Spec):
    kind: Literal["multiple_choice"]
    context_field: str = "question"
    context_template: Optional[str] = None  # e.g. "Question: {question}\nAnswer:" (row fields)
    choices_field: Optional[str] = "choices"
    choice_fields: Optional[list[str]] = None  # one column per option (CSV style)
    answer_field: str = "answer"
    choice_prefix: str = " "
    normalize: Literal["none", "tokens", "chars"] = "none"
    max_length: int = Field(default=1024, ge=2)
    tokenizer: Optional[str] = None


class GenerationSpec(_Spec):
    kind: Literal["generation"]
    prompt_field: str = "prompt"
    prompt_template: Optional[str] = None
    answer_field: str = "answer"
    max_new_tokens: int = Field(default=32, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    ignore_case: bool = False
    ignore_punctuation: bool = False
    strip: bool = True  # compare with surrounding whitespace removed and inner runs collapsed
    max_length: int = Field(default=1024, ge=1)
    tokenizer: Optional[str] = None


TaskSpec = Annotated[Union[ClassificationSpec, LMSpec, MultipleChoiceSpec, GenerationSpec], Field(discriminator="kind")]
_SPEC_ADAPTER: TypeAdapter = TypeAdapter(TaskSpec)
KINDS = ("classification", "lm", "multiple_choice", "generation")


# ---------------------------------------------------------------------------------------------
# resources handed to tasks by the evaluator


class Resources:
    """What a task may need to turn data into inputs: a tokenizer, image preprocessing, heads.

    The evaluator builds one per evaluated model; tasks ask only for what they use, so an image
    task never loads a tokenizer and vice versa.
    """

    def __init__(self, tokenizer: Callable[[Optional[Path]], Any], image_prep: Callable[[], ImagePrep],
                 head: Callable[[Path, str], dict[str, torch.Tensor]]):
        self._tokenizer = tokenizer
        self._image_prep = image_prep
        self._head = head

    def tokenizer(self, override: Optional[Path] = None):
        return self._tokenizer(override)

    def image_prep(self) -> ImagePrep:
        return self._image_prep()

    def head(self, path: Path, prefix: str) -> dict[str, torch.Tensor]:
        return self._head(path, prefix)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _fill(template: Optional[str], field_name: str, row: dict[str, Any], where: str) -> str:
    if template is None:
        return str(row[field_name])
    try:
        return template.format_map(row)
    except (KeyError, IndexError, ValueError) as err:
        raise MergeError(f"{where}: template {short(template)} cannot be filled from the row "
                         f"({type(err).__name__}: {clip(err, 80)})") from None


# ---------------------------------------------------------------------------------------------
# base class


@dataclass
class Prepared:
    """Model inputs for all of a task's examples (cached per task and preprocessing)."""

    n: int
    data: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """One evaluation task. `score` returns metrics; `metrics[self.metric]` is the task's score."""

    kind: ClassVar[str]
    metric: ClassVar[str]

    def __init__(self, spec: Any, base_dir: Optional[Path] = None):
        self.spec = spec
        self.name: str = spec.name
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.batch_size: Optional[int] = spec.batch_size
        self._data: Optional[Data] = None
        self._prepared: dict[Any, tuple[Any, Prepared]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- data --------------------------------------------------------------------------------

    def where(self) -> str:
        return f"task '{clip(self.name, 60)}'"

    def data(self) -> Data:
        if self._data is None:
            try:
                self._data = self._filter(load_data(self.spec.data, self.base_dir))
            except MergeError as err:
                raise MergeError(f"{self.where()}: {err}") from None
        return self._data

    def _filter(self, data: Data) -> Data:
        return data

    def num_examples(self) -> int:
        return len(self.data())

    def records(self) -> list[dict[str, Any]]:
        d = self.data()
        if not isinstance(d, Records):
            raise MergeError(f"{self.where()}: {self.kind} tasks need records (jsonl/json/csv/parquet/txt), got arrays from {d.source}")
        return d.rows

    def _require_fields(self, rows: list[dict[str, Any]], *fields: Optional[str]) -> None:
        if not rows:
            raise MergeError(f"{self.where()}: the data has no rows")
        for f in fields:
            if f is not None and f not in rows[0]:
                raise MergeError(f"{self.where()}: the data has no field '{clip(f, 60)}' "
                                 f"(fields: {clip(', '.join(map(str, rows[0])), 200)})")

    def _tokenizer_override(self) -> Optional[Path]:
        tok = getattr(self.spec, "tokenizer", None)
        if tok is None:
            return None
        p = Path(tok).expanduser()
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    # -- preparation (cached) -------------------------------------------------------------

    def prepare(self, res: Resources) -> Prepared:
        key, keep = self._prep_key(res)
        hit = self._prepared.get(key)
        if hit is not None and hit[0] is keep:
            return hit[1]
        prepared = self._prepare(res)
        self._prepared[key] = (keep, prepared)
        return prepared

    def clear_cache(self) -> None:
        self._prepared.clear()

    @abstractmethod
    def _prep_key(self, res: Resources) -> tuple[Any, Any]:
        """(hashable cache key, object the entry must keep alive -- e.g. the tokenizer)."""

    @abstractmethod
    def _prepare(self, res: Resources) -> Prepared: ...

    @abstractmethod
    def score(self, model: torch.nn.Module, prepared: Prepared, indices: np.ndarray, res: Resources,
              batch_size: int, on_batch: Optional[BatchCallback] = None) -> dict[str, float]:
        """Metrics on the examples `indices` (positions in the prepared data)."""


def _batches(indices: np.ndarray, size: int):
    for i in range(0, len(indices), size):
        yield indices[i:i + size]


# ---------------------------------------------------------------------------------------------
# classification


class ClassificationTask(Task):
    kind = "classification"
    metric = "accuracy"

    def __init__(self, spec: ClassificationSpec, base_dir: Optional[Path] = None):
        super().__init__(spec, base_dir)
        self.classes = spec.classes
        self.head_from = spec.head_from

    def head_path(self) -> Optional[Path]:
        if self.head_from is None:
            return None
        p = Path(self.head_from).expanduser()
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
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
        self._require_fields(rows, self.spec.text_field, self.spec.label_field, self.spec.text_pair_field)
        names = self.spec.label_names
        out = []
        for r in rows:
            v = r[self.spec.label_field]
            if isinstance(v, str) and not v.lstrip("-").isdigit():
                if names is None or v not in names:
                    raise MergeError(f"{self.where()}: label {short(v)} is not a number; list the label names in label_names")
                out.append(names.index(v))
            else:
                out.append(int(v))
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
        tok = res.tokenizer(self._tokenizer_override())
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
        tok = res.tokenizer(self._tokenizer_override())
        s = self.spec
        seqs = []
        for r in d.rows:
            args = (str(r[s.text_field]),) + ((str(r[s.text_pair_field]),) if s.text_pair_field else ())
            seqs.append(tok(*args, truncation=True, max_length=s.max_length)["input_ids"])
        return Prepared(len(labels), {"input_ids": seqs, "labels": labels, "pad_id": pad_id_of(tok)})

    def score(self, model, prepared, indices, res, batch_size, on_batch=None):
        dev = model_device(model)
        head = None
        hp = self.head_path()
        if hp is not None:
            head = _head_for(model, res.head(hp, self.spec.head_prefix), hp, self.where())
        classes = torch.as_tensor(self.classes, device=dev) if self.classes is not None else None
        correct = 0
        done = 0
        dtype = _model_dtype(model)
        for b in _batches(indices, batch_size):
            if "pixel_values" in prepared.data:
                kwargs = {"pixel_values": prepared.data["pixel_values"][b].to(dev, dtype)}
            else:
                ids, mask = pad_batch([prepared.data["input_ids"][i] for i in b], prepared.data["pad_id"])
                kwargs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
            logits = _call(model, head, kwargs).logits.float()
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


def _head_for(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path, where: str) -> dict[str, torch.Tensor]:
    """The head tensors, checked against the model and moved to its device and dtype."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    out = {}
    for name, t in tensors.items():
        if name not in own:
            raise MergeError(f"{where}: head tensor '{name}' from {path} is not a parameter of the evaluated model")
        if tuple(own[name].shape) != tuple(t.shape):
            raise MergeError(f"{where}: head tensor '{name}' from {path} has shape {list(t.shape)}, "
                             f"the evaluated model's has {list(own[name].shape)}")
        out[name] = t.to(own[name].device, own[name].dtype)
    return out


def _call(model: torch.nn.Module, head: Optional[dict[str, torch.Tensor]], kwargs: dict[str, Any]):
    """Run the model, with `head` tensors standing in for its own (nothing is modified in place)."""
    if not head:
        return model(**kwargs)
    return torch.func.functional_call(model, head, args=(), kwargs=kwargs, strict=False)


# ---------------------------------------------------------------------------------------------
# causal-LM loss / perplexity


def _sequence_logprobs(model: torch.nn.Module, seqs: list[list[int]], cont_lens: list[int], pad_id: int) -> list[float]:
    """Sum of log p(token) over the last `cont_len` tokens of each sequence (one forward pass)."""
    dev = model_device(model)
    ids, mask = pad_batch(seqs, pad_id, "right")
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
    out = []
    for i, (s, c) in enumerate(zip(seqs, cont_lens)):
        n = len(s)
        rows = logits[i, n - c - 1:n - 1].float()
        target = ids[i, n - c:n].to(rows.device)
        out.append(float(rows.log_softmax(-1).gather(-1, target[:, None]).sum()))
    return out


class LMTask(Task):
    kind = "lm"
    metric = "inv_perplexity"

    def _prep_key(self, res: Resources) -> tuple[Any, Any]:
        tok = res.tokenizer(self._tokenizer_override())
        return ("tok", id(tok)), tok

    def _prepare(self, res: Resources) -> Prepared:
        rows = self.records()
        self._require_fields(rows, self.spec.text_field)
        tok = res.tokenizer(self._tokenizer_override())
        L = self.spec.max_length
        chunks: list[list[list[int]]] = []
        for r in rows:
            ids = tok(str(r[self.spec.text_field]), add_special_tokens=self.spec.add_special_tokens)["input_ids"]
            chunks.append([ids[i:i + L] for i in range(0, len(ids), L)] or [[]])
        return Prepared(len(rows), {"chunks": chunks, "pad_id": pad_id_of(tok)})

    def score(self, model, prepared, indices, res, batch_size, on_batch=None):
        dev = model_device(model)
        seqs = [(k, c) for k in indices for c in prepared.data["chunks"][k] if len(c) >= 2]
        total_nll = 0.0
        total_tokens = 0
        done_texts: set[int] = set()
        pad = prepared.data["pad_id"]
        for start in range(0, len(seqs), batch_size):
            part = seqs[start:start + batch_size]
            ids, mask = pad_batch([c for _, c in part], pad, "right")
            ids, mask = ids.to(dev), mask.to(dev)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            tmask = mask[:, 1:].bool()
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none").view(tmask.shape)
            total_nll += float(nll[tmask].sum())
            total_tokens += int(tmask.sum())
            done_texts.update(k for k, _ in part)
            if on_batch:
                on_batch(len(done_texts))
        if on_batch:
            on_batch(len(indices))
        if total_tokens == 0:
            raise MergeError(f"{self.where()}: the texts give no token to predict (each needs at least 2 tokens)")
        loss = total_nll / total_tokens
        return {"inv_perplexity": math.exp(-loss), "perplexity": math.exp(loss), "loss": loss, "tokens": float(total_tokens)}


# ---------------------------------------------------------------------------------------------
# multiple choice


class MultipleChoiceTask(Task):
    kind = "multiple_choice"
    metric = "accuracy"

    def _prep_key(self, res: Resources) -> tuple[Any, Any]:
        tok = res.tokenizer(self._tokenizer_override())
        return ("tok", id(tok)), tok

    def _choices(self, row: dict[str, Any]) -> list[str]:
        s = self.spec
        if s.choice_fields:
            return [str(row[f]) for f in s.choice_fields]
        v = row[s.choices_field]
        if isinstance(v, str):  # a JSON list stored in a CSV cell
            import json

            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                raise MergeError(f"{self.where()}: field '{s.choices_field}' must be a list of options") from None
        if not isinstance(v, (list, tuple)) or len(v) < 2:
            raise MergeError(f"{self.where()}: field '{s.choices_field}' must be a list of at least 2 options")
        return [str(x) for x in v]

    def _answer(self, row: dict[str, Any], choices: list[str]) -> int:
        v = row[self.spec.answer_field]
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer()):
            i = int(v)
        elif isinstance(v, str) and v in choices:
            i = choices.index(v)
        elif isinstance(v, str) and v.strip().isdigit():
            i = int(v.strip())
        elif isinstance(v, str) and len(v.strip()) == 1 and v.strip().upper() in string.ascii_uppercase:
            i = string.ascii_uppercase.index(v.strip().upper())
        else:
            raise MergeError(f"{self.where()}: answer {short(v)} is neither an option index, a letter nor one of the options")
        if not 0 <= i < len(choices):
            raise MergeError(f"{self.where()}: answer index {i} is outside the {len(choices)} options")
        return i

    def _prepare(self, res: Resources) -> Prepared:
        s = self.spec
        rows = self.records()
        self._require_fields(rows, None if s.context_template else s.context_field, s.answer_field,
                             None if s.choice_fields else s.choices_field, *(s.choice_fields or []))
        tok = res.tokenizer(self._tokenizer_override())
        examples = []
        for r in rows:
            ctx = _fill(s.context_template, s.context_field, r, self.where())
            choices = self._choices(r)
            ctx_ids = tok(ctx)["input_ids"]
            opts = []
            for c in choices:
                cont = tok(s.choice_prefix + c, add_special_tokens=False)["input_ids"]
                if not cont:
                    raise MergeError(f"{self.where()}: option {short(c)} has no tokens")
                seq = (ctx_ids + cont)[-s.max_length:]
                opts.append((seq, min(len(cont), len(seq) - 1), len(s.choice_prefix + c)))
            examples.append((opts, self._answer(r, choices)))
        return Prepared(len(rows), {"examples": examples, "pad_id": pad_id_of(tok)})

    def score(self, model, prepared, indices, res, batch_size, on_batch=None):
        exs = prepared.data["examples"]
        flat = [(k, j, seq, c, nchar) for k in indices for j, (seq, c, nchar) in enumerate(exs[k][0])]
        lps: dict[tuple[int, int], float] = {}
        finished = 0
        for start in range(0, len(flat), batch_size):
            part = flat[start:start + batch_size]
            vals = _sequence_logprobs(model, [p[2] for p in part], [p[3] for p in part], prepared.data["pad_id"])
            for p, v in zip(part, vals):
                lps[(p[0], p[1])] = v
                finished += int(p[1] == len(exs[p[0]][0]) - 1)  # an example's last option: it is done
            if on_batch:
                on_batch(finished)
        correct = {"none": 0, "tokens": 0, "chars": 0}
        for k in indices:
            opts, ans = exs[k]
            raw = [lps[(k, j)] for j in range(len(opts))]
            scores = {"none": raw, "tokens": [v / c for v, (_, c, _) in zip(raw, opts)],
                      "chars": [v / max(1, n) for v, (_, _, n) in zip(raw, opts)]}
            for mode, vals in scores.items():
                correct[mode] += int(int(np.argmax(vals)) == ans)
        n = max(1, len(indices))
        return {"accuracy": correct[self.spec.normalize] / n, "accuracy_raw": correct["none"] / n,
                "accuracy_token_norm": correct["tokens"] / n, "accuracy_char_norm": correct["chars"] / n}


# ---------------------------------------------------------------------------------------------
# greedy generation, exact match


def _normalize_answer(text: str, spec: GenerationSpec) -> str:
    if spec.ignore_case:
        text = text.lower()
    if spec.ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split()) if spec.strip else text


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class GenerationTask(Task):
    kind = "generation"
    metric = "exact_match"

    def _prep_key(self, res: Resources) -> tuple[Any, Any]:
        tok = res.tokenizer(self._tokenizer_override())
        return ("tok", id(tok)), tok

    def _prepare(self, res: Resources) -> Prepared:
        s = self.spec
        rows = self.records()
        self._require_fields(rows, None if s.prompt_template else s.prompt_field, s.answer_field)
        tok = res.tokenizer(self._tokenizer_override())
        prompts, answers = [], []
        for r in rows:
            p = _fill(s.prompt_template, s.prompt_field, r, self.where())
            prompts.append(tok(p)["input_ids"][-s.max_length:])
            a = r[s.answer_field]
            answers.append([str(x) for x in a] if isinstance(a, (list, tuple)) else [str(a)])
        return Prepared(len(rows), {"prompts": prompts, "answers": answers, "tokenizer": tok})

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], tok) -> list[str]:
        """Greedy continuations (decoded, cut at the stop strings) of a batch of prompts."""
        from transformers import GenerationConfig

        dev = model_device(model)
        pad = pad_id_of(tok)
        ids, mask = pad_batch(prompts, pad, "left")
        eos = getattr(tok, "eos_token_id", None)
        cfg = GenerationConfig(max_new_tokens=self.spec.max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=pad, eos_token_id=eos, bos_token_id=getattr(tok, "bos_token_id", None))
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg)
        new = out[:, ids.shape[1]:].cpu()
        texts = []
        for row in new:
            toks = row.tolist()
            if eos is not None and eos in toks:
                toks = toks[:toks.index(eos)]
            texts.append(cut_at_stop(tok.decode(toks, skip_special_tokens=True), self.spec.stop))
        return texts

    def score(self, model, prepared, indices, res, batch_size, on_batch=None):
        tok = prepared.data["tokenizer"]
        hits = 0
        done = 0
        for b in _batches(indices, batch_size):
            texts = self.generate(model, [prepared.data["prompts"][i] for i in b], tok)
            for i, t in zip(b, texts):
                got = _normalize_answer(t, self.spec)
                hits += int(any(got == _normalize_answer(a, self.spec) for a in prepared.data["answers"][i]))
            done += len(b)
            if on_batch:
                on_batch(done)
        return {"exact_match": hits / max(1, len(indices))}


# ---------------------------------------------------------------------------------------------
# building tasks from YAML

TASK_CLASSES: dict[str, type[Task]] = {
    "classification": ClassificationTask, "lm": LMTask, "perplexity": LMTask,
    "multiple_choice": MultipleChoiceTask, "generation": GenerationTask,
}


def _format_error(err: ValidationError, where: str) -> str:
    """First problem only, without pydantic's `input` (a value from the file may be huge)."""
    problems = err.errors(include_url=False, include_input=False)
    first = problems[0]
    loc = ".".join(clip(p, 60) for p in first["loc"] if p not in KINDS)
    msg = clip(first["msg"].removeprefix("Value error, "), 300)
    if first["type"] == "extra_forbidden":
        msg = f"unknown key '{clip(first['loc'][-1], 60)}'"
        loc = ".".join(clip(p, 60) for p in first["loc"][:-1] if p not in KINDS)
    elif first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        msg = f"'kind' must be one of {', '.join(KINDS)}"
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{where}: {loc + ': ' if loc else ''}{msg}{more}"


def task_from_dict(data: Any, base_dir: Optional[Path] = None, where: str = "task") -> Task:
    """Build a Task from its YAML mapping; relative paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise MergeError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    data.setdefault("kind", "classification")
    if isinstance(data.get("name"), str):
        where = f"{where} ({clip(data['name'], 60)})"
    try:
        spec = _SPEC_ADAPTER.validate_python(data)
    except ValidationError as err:
        raise MergeError(_format_error(err, where)) from None
    return TASK_CLASSES[spec.kind](spec, base_dir)


def parse_tasks(text: str | bytes, base_dir: Optional[Path] = None, where: str = "tasks") -> list[Task]:
    """Tasks from YAML text: a list of tasks, or a mapping with a `tasks:` list."""
    return _tasks_from_data(load_yaml(text, where), base_dir, where)


def _tasks_from_data(data: Any, base_dir: Optional[Path], where: str) -> list[Task]:
    if isinstance(data, dict):
        unknown = set(data) - {"tasks", "description", "name"}
        if unknown:
            raise MergeError(f"{where}: unknown key(s) {clip(', '.join(sorted(map(str, unknown))), 200)} (expected 'tasks')")
        data = data.get("tasks")
    if not isinstance(data, list) or not data:
        raise MergeError(f"{where}: expected a non-empty list of tasks (or 'tasks:' with one)")
    tasks = [task_from_dict(t, base_dir, f"{where}: tasks[{i}]") for i, t in enumerate(data)]
    names = [t.name for t in tasks]
    dup = sorted(n for n, count in Counter(names).items() if count > 1)
    if dup:
        raise MergeError(f"{where}: task names must be unique; repeated: {clip(', '.join(dup), 200)}")
    return tasks


def load_tasks(path: str | Path) -> list[Task]:
    """Tasks from a YAML file; data paths are relative to the file's folder."""
    p = Path(path).expanduser()
    return _tasks_from_data(load_yaml_file(p, "tasks file"), p.resolve().parent, str(p))
