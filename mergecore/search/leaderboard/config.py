"""The leaderboard's settings: a pydantic model (YAML or the `mergecore leaderboard` flags) and
the budget syntax (`30m`, `1h`, `90s`, `1800`).

    tasks: families/fmnist-vit/tasks.yml          # test tasks (scored only for the top K, at the end)
    val_tasks: families/fmnist-vit/tasks-val.yml  # optional: without it each task is split in two
    base: families/fmnist-vit/base
    models: [families/fmnist-vit/expert_a, families/fmnist-vit/expert_b]
    budget: 30m
    top_k: 3
    searches: [evo, rmm]                          # default: every search that applies
    backend: local                                # or ray (with workers)

Paths in a YAML file are relative to its folder; `mergecore leaderboard` resolves the paths of
its command line against the current directory before it builds this config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

from pydantic import ConfigDict, Field, field_validator

from mergecore.errors import MergeError, clip
from mergecore.search.backend import BackendSpec
from mergecore.search.config import ModelList, Positive

_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")

# the searches a leaderboard can run after the data-free candidates, in the order it runs them
SEARCH_KINDS = ("evo", "rmm", "dam")


def parse_budget(text: Union[str, int, float]) -> int:
    """`30m`, `1h`, `90s`, `1800` (seconds), `2.5m` -> whole seconds (at least 1); MergeError otherwise."""
    if isinstance(text, bool):
        raise MergeError(f"budget must be a duration such as 30m, 1h, 90s or 1800 (seconds), got {text!r}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = _BUDGET.match(str(text).lower())
        if not m or m.group(2) not in _UNITS:
            raise MergeError(f"budget must be a duration such as 30m, 1h, 90s or 1800 (seconds), "
                             f"got '{clip(text, 40)}'")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not seconds >= 1 or seconds > 30 * 86400:
        raise MergeError(f"budget must be between 1 second and 30 days, got {clip(text, 40)}")
    return int(round(seconds))


class LeaderboardConfig(BackendSpec):
    """A leaderboard run. `budget` is wall-clock seconds over every run in the output folder
    (a resumed run continues the count); `val_fraction` is the share of each task used for
    validation when no `val_tasks` file is given (the rest is the test part)."""

    model_config = ConfigDict(extra="forbid")
    tasks: str
    val_tasks: Optional[str] = None
    base: Optional[str] = None
    models: ModelList
    budget: int = Field(1800, description="seconds; YAML also takes 30m, 1h, 90s")
    top_k: Positive = 3
    grid: bool = True  # false: each method at its defaults only
    methods: Optional[list[str]] = None  # default: every applicable data-free method
    searches: Optional[list[str]] = None  # default: every search that applies, in SEARCH_KINDS order
    data_free_share: float = 0.5  # share of the budget the data-free phase may use while searches wait
    val_fraction: float = 0.5
    seed: int = 0
    batch_size: Positive = 128
    dtype: str = "float32"

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v):
        try:
            return parse_budget(v)
        except MergeError as err:
            raise ValueError(str(err)) from None

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError("val_fraction must be between 0 and 1 (exclusive)")
        return v

    @field_validator("data_free_share")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("data_free_share must be in (0, 1]")
        return v

    @field_validator("searches")
    @classmethod
    def _searches(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        for s in v or []:
            if s not in SEARCH_KINDS:
                raise ValueError(f"unknown search '{clip(s, 40)}'; known: {', '.join(SEARCH_KINDS)}")
        return v


def resolved(config: LeaderboardConfig, root: Path) -> LeaderboardConfig:
    """`config` with its files and model folders resolved against `root` and checked (one-line
    MergeError naming where a missing one was looked for)."""
    from mergecore.methods import get_method
    from mergecore.search.config import config_file, model_ref

    for name in config.methods or []:
        get_method(name)  # an unknown method is a one-line error with a suggestion
    return config.model_copy(update={
        "tasks": str(config_file(config.tasks, root)),
        "val_tasks": str(config_file(config.val_tasks, root, "val_tasks file")) if config.val_tasks else None,
        "base": model_ref(config.base, root) if config.base else None,
        "models": [model_ref(m, root) for m in config.models],
    })
