"""What every YAML file a user writes for evaluation or a search shares: pydantic errors as one
line, and paths relative to the file that names them.

Task files, search configs (`mergecore.search.config`) and the app use these two functions, so
a user sees the same wording everywhere and a relative path means the same thing in every file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from mergecore.errors import clip


def validation_message(err: ValidationError, where: str) -> str:
    """The first problem of `err` as one line, `where: field.path: message`. Pydantic's `input`
    is left out: a value from the file may be huge (an alias can expand to millions of items)."""
    problems = err.errors(include_url=False, include_input=False)
    first = problems[0]
    loc = [clip(p, 60) for p in first["loc"]]
    msg = clip(first["msg"].removeprefix("Value error, "), 300)
    if first["type"] == "extra_forbidden" and loc:
        msg = f"unknown key '{loc.pop()}'"
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{where}: {'.'.join(loc) + ': ' if loc else ''}{msg}{more}"


def relative_path(ref: str, base_dir: Optional[Path]) -> Path:
    """`ref` as named in a file: `~` expanded, an absolute path as it is, a relative one taken
    against `base_dir` (the file's folder), never against the current directory."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path
