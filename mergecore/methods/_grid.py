"""Method grids: a few values of a method's scale parameters (`@merge_method(grid=...)`), the
one source `mergecore leaderboard`, bench/quality.py and the app read."""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Optional, Sequence

Grid = tuple[tuple[str, tuple[Any, ...]], ...]


def check_grid(method: str, params: Sequence[Any], grid: Optional[Mapping[str, Sequence[Any]]]) -> Grid:
    """`grid` as a tuple, each value coerced by its parameter's `ParamSpec` (a bad grid is a
    programming error: ValueError at registration, or the parameter's MergeError)."""
    out = []
    for name, values in (grid or {}).items():
        spec = next((p for p in params if p.name == name), None)
        if spec is None or not values:
            raise ValueError(f"merge method {method!r}: grid names {name!r}, not a parameter, or has no values")
        out.append((name, tuple(spec.coerce(v, f"{method} grid") for v in values)))
    return tuple(out)


def grid_points(grid: Grid) -> list[dict[str, Any]]:
    """Every combination of the grid's values (the first parameter varying slowest); [] for none."""
    if not grid:
        return []
    names = [n for n, _ in grid]
    return [dict(zip(names, combo)) for combo in itertools.product(*(values for _, values in grid))]
