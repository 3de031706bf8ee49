"""Search configs (RMM, DAM, evo): YAML parsing with one-line errors and path resolution."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from mergecore.errors import MergeError


def load_config(path: str | Path, cls: type[BaseModel]) -> tuple[BaseModel, Path]:
    """Parse a search YAML; relative paths in it are taken relative to the file."""
    p = Path(path)
    if not p.is_file():
        raise MergeError(f"search config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise MergeError(f"{p}: line {mark.line + 1 if mark else '?'}: malformed YAML: {err.problem}") from None
    if not isinstance(data, dict):
        raise MergeError(f"{p}: expected a mapping at the top level")
    try:
        cfg = cls.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise MergeError(f"{p}: {loc}: {e['msg'].removeprefix('Value error, ')}") from None
    return cfg, p.resolve().parent


def resolve_path(ref: str, root: Path) -> str:
    """A path relative to the config's folder if it exists there, else the reference as given."""
    ref = str(Path(ref).expanduser())
    cand = root / ref
    return str(cand.resolve()) if cand.exists() else ref
