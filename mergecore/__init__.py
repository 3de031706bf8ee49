"""mergecore: a model-merging engine (recipes -> streaming executor -> checkpoints).

`mergecore.merge(recipe, out_dir, ...)` is the one call that writes a merged checkpoint; it is
imported on first use, so `import mergecore` stays light (no torch).
"""

from typing import Any

from mergecore.version import __version__

__all__ = ["__version__", "merge"]


def __getattr__(name: str) -> Any:
    if name == "merge":
        from mergecore.merging import merge

        return merge
    raise AttributeError(f"module 'mergecore' has no attribute {name!r}")
