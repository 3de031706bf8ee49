"""What a task kind is: the `Task` base class, what it is handed (`Resources`), what it prepares
(`Prepared`), what it gives a search to train on (`TrainingInputs`), and the open registry.

A kind is one module in `mergecore/eval/kinds/`: a pydantic spec (its YAML keys, with a
`kind: Literal[...]` field) and a `Task` subclass, registered at the end of the module::

    class RegressionSpec(TaskSpec):
        kind: Literal["regression"]
        target_field: str = "y"

    class RegressionTask(Task):
        kind = "regression"
        metric = "neg_mse"
        spec_class = RegressionSpec

        def _prep_key(self, res): ...        # cache key of the prepared inputs
        def _prepare(self, res): ...         # data -> model inputs (`Prepared`)
        def score(self, model, prepared, indices, res, batch_size, on_batch=None): ...
        def training_inputs(self, res, model): ...   # optional: what DAM trains on

    register_kind(RegressionTask)

`mergecore.eval.tasks` imports every module of that folder, so the new kind is usable from task
files (and by DAM, through `training_inputs`) without touching any other file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergecore.errors import MergeError, clip, short
from mergecore.eval.data import Data, DataSpec, Records, load_data
from mergecore.eval.yamlspec import relative_path
from mergecore.models import ImagePrep

BatchCallback = Callable[[int], None]  # called with the number of examples finished so far


class TaskSpec(BaseModel):
    """The YAML keys every kind has; a kind's spec adds its own and a `kind: Literal[...]`."""

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


@dataclass
class Prepared:
    """Model inputs for all of a task's examples (cached per task and preprocessing)."""

    n: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingInputs:
    """What a search that trains on a task's inputs (DAM) gets from it; labels are never part of it.

    `rows` says what one row of the model's logits is: "example" (pixel or token inputs, one
    row each) or "token" (a causal LM: every non-pad position is a row). `items` is a pixel
    tensor [n, C, H, W] or a list of token-id lists; `classes` restricts the logits, `head`
    stands in for the model's own head tensors."""

    rows: str  # example | token
    items: Any
    pad_id: int = 0
    classes: Optional[torch.Tensor] = None
    head: Optional[dict[str, torch.Tensor]] = None

    @property
    def pixels(self) -> bool:
        return isinstance(self.items, torch.Tensor)


class Task(ABC):
    """One evaluation task. `score` returns metrics; `metrics[self.metric]` is the task's score."""

    kind: ClassVar[str]
    metric: ClassVar[str]
    spec_class: ClassVar[type[TaskSpec]]
    aliases: ClassVar[tuple[str, ...]] = ()  # other `kind:` values that mean this kind

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
                self._data = self._filter(load_data(self.spec.data, self.base_dir, getattr(self.spec, "label_field", None)))
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
            raise MergeError(f"{self.where()}: {self.kind} tasks need records (jsonl/json/csv/parquet/txt), got "
                             f"arrays from {d.source}")
        return d.rows

    def require_fields(self, rows: list[dict[str, Any]], *fields: Optional[str]) -> None:
        if not rows:
            raise MergeError(f"{self.where()}: the data has no rows")
        for f in fields:
            if f is not None and f not in rows[0]:
                raise MergeError(f"{self.where()}: the data has no field '{clip(f, 60)}' "
                                 f"(fields: {clip(', '.join(map(str, rows[0])), 200)})")

    def tokenizer_override(self) -> Optional[Path]:
        tok = getattr(self.spec, "tokenizer", None)
        return None if tok is None else relative_path(tok, self.base_dir)

    def head_prefix(self) -> Optional[str]:
        """Names of the tensors this task swaps in from another checkpoint (a search leaves them
        unmerged), or None."""
        return None

    # -- preparation (cached) -------------------------------------------------------------

    def prepare(self, res: Resources) -> Prepared:
        key, keep = self._prep_key(res)
        hit = self._prepared.get(key)
        if hit is not None and hit[0] is keep:
            return hit[1]
        prepared = self._prepare(res)
        self._prepared[key] = (keep, prepared)
        return prepared

    def _prep_key(self, res: Resources) -> tuple[Any, Any]:
        """(hashable cache key, object the entry must keep alive): the tokenizer by default."""
        tok = res.tokenizer(self.tokenizer_override())
        return ("tok", id(tok)), tok

    @abstractmethod
    def _prepare(self, res: Resources) -> Prepared: ...

    @abstractmethod
    def score(self, model: torch.nn.Module, prepared: Prepared, indices: np.ndarray, res: Resources,
              batch_size: int, on_batch: Optional[BatchCallback] = None) -> dict[str, float]:
        """Metrics on the examples `indices` (positions in the prepared data)."""

    def training_inputs(self, res: Resources, model: torch.nn.Module) -> TrainingInputs:
        """The inputs a merge can be trained on (DAM); a kind without them says so."""
        raise MergeError(f"{self.where()}: DAM cannot train on '{self.kind}' tasks")


# ---------------------------------------------------------------------------------------------
# helpers for kinds


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def fill_template(template: Optional[str], field_name: str, row: dict[str, Any], where: str) -> str:
    """`row[field_name]`, or `template` filled from the row's fields."""
    if template is None:
        return str(row[field_name])
    try:
        return template.format_map(row)
    except (KeyError, IndexError, ValueError) as err:
        raise MergeError(f"{where}: template {short(template)} cannot be filled from the row "
                         f"({type(err).__name__}: {clip(err, 80)})") from None


def row_text(row: dict[str, Any], field_name: str, index: int, where: str) -> str:
    """`row[field_name]` as text; a null (JSON null, an empty Parquet cell) is an error naming the
    row, never the text "None"."""
    v = row[field_name]
    if v is None or (isinstance(v, float) and v != v):
        raise MergeError(f"{where}: row {index + 1}: '{clip(field_name, 60)}' is empty (null)")
    return str(v)


def batches(indices: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(indices), size):
        yield indices[i:i + size]


def head_for(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path,
             where: str) -> dict[str, torch.Tensor]:
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


def call_with_head(model: torch.nn.Module, head: Optional[dict[str, torch.Tensor]], kwargs: dict[str, Any]):
    """Run the model, with `head` tensors standing in for its own (nothing is modified in place)."""
    if not head:
        return model(**kwargs)
    return torch.func.functional_call(model, head, args=(), kwargs=kwargs, strict=False)


# ---------------------------------------------------------------------------------------------
# the registry

_KINDS: dict[str, type[Task]] = {}


def register_kind(task_class: type[Task]) -> type[Task]:
    """Make `task_class` the task kind named by its `kind` (and `aliases`) in task files."""
    for name in (task_class.kind, *task_class.aliases):
        _KINDS[name] = task_class
    return task_class


def kind_names() -> list[str]:
    """The registered kinds' names, aliases left out, in registration order."""
    return list(dict.fromkeys(cls.kind for cls in _KINDS.values()))


def task_class(kind: str) -> Optional[type[Task]]:
    return _KINDS.get(kind)
