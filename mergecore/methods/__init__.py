"""Merge methods, one module per family; importing this package registers all of them."""

from __future__ import annotations

import importlib
import pkgutil

from mergecore.errors import MergeError
from mergecore.methods.base import (
    REQUIRED,
    Ends,
    MergeMethod,
    ParamSpec,
    PerModel,
    Range,
    merge_method,
    registered,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

# the method a new recipe starts on (the app's form, the demo)
DEFAULT_METHOD = "ties"
# the method an evolutionary template starts on, and the operators a new RMM search starts with
# (the app's search forms; each with its `starting` values)
DEFAULT_TEMPLATE = "task_arithmetic"
DEFAULT_OPERATORS = ("ties", "task_arithmetic")


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; unknown names raise a MergeError listing the valid ones."""
    methods = registered()
    try:
        return methods[name]
    except KeyError:
        raise MergeError(f"unknown merge method '{name}'; valid methods: {', '.join(methods)}") from None


def all_methods() -> dict[str, MergeMethod]:
    """Every registered method, by name (sorted)."""
    return registered()


__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_OPERATORS",
    "DEFAULT_TEMPLATE",
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
