"""Offline model families: a base checkpoint, fine-tuned experts and their tasks, built locally.

A family lives in ``<cache>/families/<name>/`` (``<name>-quick`` for quick builds)::

    base/               HF checkpoint (config.json, model.safetensors, preprocessor_config.json)
    expert_<task>/      one fine-tuned checkpoint per expert, same shapes as base/
    tasks.yml           the family's tasks on held-out test data (head_from: expert_<task>)
    tasks-val.yml       the same tasks on validation data (for searches; keeps the test set clean)
    family.json         what was built: config, seeds, versions, timings, per-expert accuracy

Building writes into a temporary folder and renames it into place at the end, so a failed or
cancelled build leaves nothing behind.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mergecore.errors import MergeError, clip, short
from mergecore.eval.evaluator import staged_fraction
from mergecore.events import CancelToken, Event


@dataclass
class FamilyProgress:
    """Progress of a family build: the stage (e.g. 'pretrain', 'expert fmnist_tops') and its steps."""

    stage: str
    stage_index: int
    stages_total: int
    step: int
    steps: int
    elapsed: float
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return staged_fraction(self.stage_index, self.stages_total, self.step, self.steps)

    def as_event(self) -> Event:
        return Event("family.progress", {**asdict(self), "fraction": self.fraction})


FamilyProgressCallback = Callable[[FamilyProgress], None]


class StageReporter:
    """`report(stage, step, steps, message, **metrics)` for a build of `stages` (in order): the
    `FamilyProgress` each builder sends to its caller's callback."""

    def __init__(self, stages: list[str], progress: Optional[FamilyProgressCallback]):
        self.stages, self.progress, self.start = stages, progress, time.time()

    def __call__(self, stage: str, step: int, steps: int, message: str = "", **metrics: float) -> None:
        if self.progress:
            self.progress(FamilyProgress(stage, self.stages.index(stage), len(self.stages), step, steps,
                                         time.time() - self.start, message, dict(metrics)))


@dataclass
class Family:
    """A built family on disk."""

    name: str
    root: Path

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.root / "family.json").read_text())

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def experts(self) -> dict[str, Path]:
        """Expert name (= its task's name) -> checkpoint folder, in build order."""
        return {name: self.root / e["path"] for name, e in self.info["experts"].items()}

    @property
    def tasks_file(self) -> Path:
        return self.root / "tasks.yml"

    @property
    def val_tasks_file(self) -> Path:
        return self.root / "tasks-val.yml"

    def tasks(self, split: str = "test"):
        from mergecore.eval.tasks import load_tasks

        if split not in ("test", "val"):
            raise MergeError(f"split must be 'test' or 'val', got '{split}'")
        return load_tasks(self.tasks_file if split == "test" else self.val_tasks_file)

    def evaluator(self, split: str = "test", **kwargs):
        """An Evaluator over the family's tasks (tokenizer / image preprocessing from base/)."""
        from mergecore.eval.evaluator import Evaluator

        kwargs.setdefault("processor_from", self.base)
        return Evaluator(self.tasks(split), **kwargs)


class FamilyBuilder:
    """Subclasses build one family into a folder."""

    name: str = ""
    summary: str = ""

    def make_config(self, quick: bool, overrides: Optional[dict[str, Any]] = None) -> Any:
        """The full or quick preset with `overrides` (field -> value; strings are parsed as YAML)."""
        raise NotImplementedError

    def build(self, out: Path, *, quick: bool, config: Any, progress: Optional[FamilyProgressCallback],
              cancel: CancelToken) -> dict[str, Any]:
        """Write the family into `out` (an empty folder) and return family.json's content."""
        raise NotImplementedError


def override_dataclass(preset: Any, overrides: Optional[dict[str, Any]], where: str) -> Any:
    """`dataclasses.replace(preset, **overrides)` with values checked against the preset's types."""
    import dataclasses

    from mergecore.yamlio import load_yaml

    if not overrides:
        return preset
    fields = {f.name for f in dataclasses.fields(preset)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            raise MergeError(f"{where}: unknown setting '{clip(key, 60)}'; valid: {', '.join(sorted(fields))}")
        if isinstance(value, str):
            empty = value.strip().lower() in ("none", "null", "~", "")
            value = None if empty else load_yaml(value, f"{where}: setting '{key}'")
        current = getattr(preset, key)
        if isinstance(current, float) and isinstance(value, str):
            try:  # YAML 1.1 reads 2e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if value is not None and current is not None:
            if isinstance(current, bool) != isinstance(value, bool) and not isinstance(current, (str, tuple)):
                raise MergeError(f"{where}: setting '{key}' expects {type(current).__name__}, got {short(value)}")
            if isinstance(current, float) and isinstance(value, int):
                value = float(value)
            elif isinstance(current, tuple):
                raise MergeError(f"{where}: setting '{key}' cannot be changed from the command line")
            elif isinstance(current, str):
                value = str(value)
            elif not isinstance(value, type(current)):
                raise MergeError(f"{where}: setting '{key}' expects {type(current).__name__}, got {short(value)}")
        changes[key] = value
    return dataclasses.replace(preset, **changes)


# the built-in families, by where their builder is (loaded on first use, so this module imports none)
_BUILTIN: dict[str, str] = {"fmnist-vit": "mergecore.families.fmnist_vit:FmnistVitBuilder",
                            "smollm2-domains": "mergecore.families.smollm2_domains:Smollm2DomainsBuilder",
                            "minilm-textclass": "mergecore.families.minilm_textclass:MinilmTextclassBuilder"}
_BUILDERS: dict[str, Callable[[], FamilyBuilder]] = {}


def register_family(name: str, factory: Callable[[], FamilyBuilder]) -> None:
    """Add a family (e.g. one of your own) under `name`."""
    _BUILDERS[name] = factory


def family_names() -> list[str]:
    return sorted({*_BUILTIN, *_BUILDERS})


def get_builder(name: str) -> FamilyBuilder:
    if name in _BUILDERS:
        return _BUILDERS[name]()
    if name not in _BUILTIN:
        raise MergeError(f"unknown family '{name}'; known: {', '.join(family_names())}")
    module, _, cls = _BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def families_root(root: Optional[Path] = None) -> Path:
    from mergecore.demo import cache_root

    return Path(root) if root is not None else cache_root() / "families"


def family_dir(name: str, root: Optional[Path] = None, quick: bool = False) -> Path:
    return families_root(root) / (f"{name}-quick" if quick else name)


def load_family(name: str, root: Optional[Path] = None, quick: bool = False) -> Family:
    """A family that was built before (MergeError if it was not)."""
    get_builder(name)
    d = family_dir(name, root, quick)
    if not (d / "family.json").is_file():
        flag = " --quick" if quick else ""
        raise MergeError(f"family '{name}' is not built at {d}; run: mergecore bench build-family {name}{flag}")
    return Family(name, d)


def build_family(name: str, *, root: Optional[Path] = None, quick: bool = False, force: bool = False,
                 config: Any = None, overrides: Optional[dict[str, Any]] = None,
                 progress: Optional[FamilyProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> Family:
    """Build family `name` (or return the one already built unless `force`).

    `config`: a builder-specific config object (e.g. `FmnistVitConfig`) replacing the full or
    quick preset; `overrides`: changes to the preset (field -> value). Either way the family is
    written to the full or quick folder under `root` and family.json records the config used.
    """
    builder = get_builder(name)
    if config is None:
        config = builder.make_config(quick, overrides)
    elif overrides:
        raise MergeError("give either a config or overrides, not both")
    cancel = cancel or CancelToken()
    target = family_dir(name, root, quick)
    if (target / "family.json").is_file() and not force:
        return Family(name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    start = time.time()
    try:
        info = builder.build(tmp, quick=quick, config=config, progress=progress, cancel=cancel)
        info.setdefault("name", name)
        info["quick"] = quick
        info["build_seconds"] = round(time.time() - start, 2)
        info["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (tmp / "family.json").write_text(json.dumps(info, indent=1))
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Family(name, target)


def get_family(name: str, *, root: Optional[Path] = None, quick: bool = False,
               progress: Optional[FamilyProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Family:
    """The built family, building it first if needed."""
    return build_family(name, root=root, quick=quick, progress=progress, cancel=cancel)
