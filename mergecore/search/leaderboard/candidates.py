"""The leaderboard's data-free candidates and the rows it records.

Every registered method that needs no data (no collected statistics, not a layer-copying
structural method, no trained coefficients) and takes the given models is a candidate: first
at its defaults (its `starting` values and parameter defaults), then at each point of its
`grid` (`@merge_method(grid=...)`). The defaults of every method come before any grid point and
the grids are interleaved (each method's first point, then each one's second ...), so a short
budget still covers every method and spreads what is left evenly.

A candidate is identified by the hash of its recipe (`key`); the rows of OUT/candidates.jsonl
(one JSON object per scored candidate, appended and flushed as each lands) and OUT/test.jsonl
(test scores of the top K) are keyed by it, so a rerun skips what is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from mergecore.methods import all_methods, get_method
from mergecore.methods.base import MergeMethod

CANDIDATES_FILE = "candidates.jsonl"
TEST_FILE = "test.jsonl"
DATA_FREE = "data-free"
SEARCH = "search"

_SYMBOLS = {"lambda": "λ", "alpha": "α"}


@dataclass(frozen=True)
class Candidate:
    """One data-free merge to score: `params` are the recipe-named values that differ between
    its method's candidates (what the label shows); `recipe` is the whole recipe as a dict."""

    key: str
    label: str
    method: str
    params: dict[str, Any]
    stage: str  # "defaults" or "grid"
    recipe: dict[str, Any]


def not_applicable(m: MergeMethod, n_models: int, has_base: bool) -> Optional[str]:
    """Why method `m` is no data-free candidate for `n_models` models (None when it is one)."""
    if "structural" in m.tags:
        return "copies layers (structural), not a merge of the models"
    if m.stats:
        return f"needs {m.stats} statistics collected on data"
    if not m.operator:
        return "needs trained coefficients (run the dam search)"
    if m.base == "required" and not has_base:
        return "needs a base model (--base)"
    if not m.accepts(n_models):
        most = "" if m.max_models is None else f" to {m.max_models}"
        return f"takes {m.min_models}{most} models, not {n_models}"
    return None


def recipe_key(recipe: dict[str, Any]) -> str:
    """A stable id of a recipe (its canonical JSON's hash)."""
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def label_of(method: str, params: dict[str, Any]) -> str:
    """`ties λ=1 density=0.5`: the method and the values that tell its candidates apart."""
    return " ".join([method, *(f"{_SYMBOLS.get(k, k)}={_fmt(v)}" for k, v in params.items())])


def method_recipe(m: MergeMethod, values: dict[str, Any], models: list[str], base: Optional[str], *,
                  dtype: str, seed: int) -> dict[str, Any]:
    """The recipe of method `m` at `values` (recipe-named; a per-model value is shared by every model)."""
    per_model = {k: v for k, v in values.items() if m.param(k) is not None and m.param(k).per_model}
    global_ = {k: v for k, v in values.items() if k not in per_model}
    data: dict[str, Any] = {"merge_method": m.name}
    if base and m.base != "ignored":
        data["base_model"] = base
    data["models"] = [{"model": ref, **({"parameters": dict(per_model)} if per_model else {})} for ref in models]
    if global_:
        data["parameters"] = global_
    data["dtype"] = dtype
    if m.randomized:
        data["seed"] = seed
    return data


def plan_candidates(models: list[str], base: Optional[str], *, methods: Optional[list[str]] = None,
                    grid: bool = True, dtype: str = "float32", seed: int = 0
                    ) -> tuple[list[Candidate], list[dict[str, str]]]:
    """The data-free candidates in the order they are scored, and the skipped methods with why."""
    chosen = [get_method(n) for n in methods] if methods else list(all_methods().values())
    skipped, usable = [], []
    for m in chosen:
        reason = not_applicable(m, len(models), base is not None)
        if reason:
            skipped.append({"method": m.name, "reason": reason})
        else:
            usable.append(m)

    def make(m: MergeMethod, point: dict[str, Any], stage: str) -> Candidate:
        start = m.starting_params()
        shown = {n: point.get(n, start.get(n, m.param(n).default)) for n, _ in m.grid}
        values = {k: v for k, v in {**start, **point}.items() if m.param(k).required or v != m.param(k).default}
        recipe = method_recipe(m, values, models, base, dtype=dtype, seed=seed)  # defaults left out: one key each
        return Candidate(recipe_key(recipe), label_of(m.name, shown), m.name, shown, stage, recipe)

    out = [make(m, {}, "defaults") for m in usable]
    if grid:
        points = [m.grid_points() for m in usable]
        for i in range(max((len(p) for p in points), default=0)):
            out += [make(m, p[i], "grid") for m, p in zip(usable, points) if i < len(p)]
    seen: set[str] = set()
    unique = []
    for c in out:  # a grid point equal to the defaults is scored once, as the defaults
        if c.key not in seen:
            seen.add(c.key)
            unique.append(c)
    return unique, skipped


class RowFile:
    """A JSON-lines file of rows keyed by `key`: read back on resume (a line cut short by a crash
    is dropped, and cut off before the next append), appended and synced one row at a time."""

    def __init__(self, path: Path, *, repair: bool = True):
        """`repair=False` for a reader beside a running leaderboard: a cut line is skipped, not cut off."""
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            raw = self.path.read_bytes()
            whole = raw[:raw.rfind(b"\n") + 1]
            if repair and len(whole) != len(raw):
                with open(self.path, "r+b") as f:
                    f.truncate(len(whole))
            for line in whole.decode("utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("key"), str):
                    self.rows[row["key"]] = row

    def add(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row["key"]] = row

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def values(self) -> Iterable[dict[str, Any]]:
        return self.rows.values()

    def clear(self) -> None:
        self.rows.clear()
        if self.path.is_file():
            self.path.unlink()


def ranked(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by validation mean, best first; ties keep the order they were scored in."""
    rows = list(rows)
    order = {id(r): i for i, r in enumerate(rows)}
    return sorted(rows, key=lambda r: (-r["val_mean"], order[id(r)]))


def read_board(out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The rows a leaderboard in `out_dir` has recorded so far, ranked by validation, and the test
    scores by key (for an app or a script, also while the leaderboard runs; nothing is written)."""
    rows = RowFile(Path(out_dir) / CANDIDATES_FILE, repair=False)
    tests = RowFile(Path(out_dir) / TEST_FILE, repair=False)
    return ranked(rows.values()), dict(tests.rows)
