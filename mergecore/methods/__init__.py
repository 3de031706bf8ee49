"""Merge methods, one module per family; importing this package registers all of them."""

from __future__ import annotations

import importlib
import pkgutil

from mergecore.methods.base import (
    REQUIRED,
    Ends,
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

# the method a new recipe starts on (the app's form, the demo)
DEFAULT_METHOD = "ties"

__all__ = [
    "DEFAULT_METHOD",
    "Ends",
    "REQUIRED",
    "MergeMethod",
    "ParamSpec",
    "PerModel",
    "Range",
    "all_methods",
    "get_method",
    "merge_method",
]
