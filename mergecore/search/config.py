"""Search configs (RMM, DAM, evo): YAML parsing with one-line errors, the fields they share, and
the paths they name.

A path in a search config is taken relative to the config's folder (or as written when it is
absolute or starts with `~`). It never falls back to the current directory: a missing file or
model folder is an error that says where it was looked for, raised before the search claims
its output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError

from mergecore.errors import MergeError, clip
from mergecore.eval.yamlspec import relative_path, validation_message
from mergecore.yamlio import load_yaml_file

Config = TypeVar("Config", bound=BaseModel)


def _at_least_one(v: int) -> int:
    if v < 1:
        raise ValueError("must be at least 1")
    return v


def _ratio(v: float) -> float:
    if not 0 < v <= 1:
        raise ValueError("must be in (0, 1]")
    return v


def _some_models(v: list) -> list:
    if not v:
        raise ValueError("models must list at least one model")
    return v


Positive = Annotated[int, AfterValidator(_at_least_one)]
Ratio = Annotated[float, AfterValidator(_ratio)]
ModelList = Annotated[list[str], AfterValidator(_some_models)]


def load_config(path: str | Path, cls: type[Config]) -> tuple[Config, Path]:
    """Parse a search YAML into `cls`; returns it and the config's folder (what its paths are
    relative to)."""
    p = Path(path).expanduser()
    data = load_yaml_file(p, "search config")
    if not isinstance(data, dict):
        raise MergeError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = cls.model_validate(data)
    except ValidationError as err:
        raise MergeError(validation_message(err, str(p))) from None
    return cfg, p.resolve().parent


def config_file(ref: str, root: Path, what: str = "tasks file") -> Path:
    """A file the config at `root` names (e.g. its tasks file), resolved; MergeError if missing."""
    p = relative_path(ref, root)
    if not p.is_file():
        where = "" if Path(ref).expanduser().is_absolute() else " (paths in a search config are relative to its folder)"
        raise MergeError(f"{what} not found: {clip(ref)}; looked for {p}{where}")
    return p.resolve()


def model_ref(ref: str, root: Path) -> str:
    """A model the config at `root` names: a local folder (resolved) or a Hub id (as written)."""
    from mergecore.io.source import adapter_ref_refused, is_hub_id

    p = relative_path(ref, root)
    if p.is_dir():
        return str(p.resolve())
    if "+" in ref and not p.exists():
        raise adapter_ref_refused(ref)
    if p.exists():
        raise MergeError(f"model '{clip(ref)}' is a file, expected a model folder (with config.json and weights): {p}")
    if is_hub_id(ref) and not Path(ref).expanduser().exists():
        return ref
    hint = ("; paths in a search config are relative to its folder, not the current directory"
            if not Path(ref).expanduser().is_absolute() else "")
    raise MergeError(f"model '{clip(ref)}' not found: no folder {p}{hint}")
