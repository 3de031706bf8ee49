"""Statistics of data-informed merges (RegMean, RegMean++, Fisher merging): collection and file.

`collect_stats` runs each model on its own task's inputs and writes one safetensors file
(`mergecore.stats.store` describes it); the methods read it through the recipe's `artifacts:`.
The methods import the store, so `collect_stats` (which loads the evaluation code) is imported
on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["collect_stats"]


def __getattr__(name: str) -> Any:
    if name == "collect_stats":
        from mergecore.stats.collect import collect_stats

        return collect_stats
    raise AttributeError(f"module 'mergecore.stats' has no attribute {name!r}")
