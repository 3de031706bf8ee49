"""Search configs (RMM, DAM, evo): YAML parsing with one-line errors and path resolution."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from mergecore.errors import MergeError, clip
from mergecore.yamlio import load_yaml_file


def load_config(path: str | Path, cls: type[BaseModel]) -> tuple[BaseModel, Path]:
    """Parse a search YAML; relative paths in it are taken relative to the file."""
    p = Path(path).expanduser()
    data = load_yaml_file(p, "search config")
    if not isinstance(data, dict):
        raise MergeError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = cls.model_validate(data)
    except ValidationError as err:
        # without pydantic's `input`: it may be a huge (alias-expanded) value
        e = err.errors(include_url=False, include_input=False)[0]
        loc = ".".join(clip(x, 60) for x in e["loc"])
        raise MergeError(f"{p}: {loc}: {clip(e['msg'].removeprefix('Value error, '), 300)}") from None
    return cfg, p.resolve().parent


def resolve_path(ref: str, root: Path) -> str:
    """A path relative to the config's folder if it exists there, else the reference as given."""
    ref = str(Path(ref).expanduser())
    cand = root / ref
    return str(cand.resolve()) if cand.exists() else ref
