"""Merge methods, one module per family; importing this package registers all of them."""

from __future__ import annotations

import importlib
import pkgutil

from mergecore.methods.base import (
    REQUIRED,
    MergeMethod,
    ParamSpec,
    PerModel,
    Range,
    all_methods,
    get_method,
    merge_method,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "REQUIRED",
    "MergeMethod",
    "ParamSpec",
    "PerModel",
    "Range",
    "all_methods",
    "get_method",
    "merge_method",
]
