"""`mergecore.merge`: the one call that turns a recipe into a checkpoint.

The CLI, the app, every search replay and the benches call this; it plans (headers only, every
check that can run before a byte is written), applies the output-path rule, then streams the
plan into the output folder. `mergecore.merge` is this function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from mergecore.events import CancelToken, ProgressCallback
from mergecore.recipe import Recipe, load_recipe


def merge(
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    *,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    out_dtype: Optional[str] = None,
    shard_size: int | str | None = None,
    threads: int = 2,
    device: str = "cpu",
    memory_budget: int | str | None = None,
    search_dirs: tuple[Path, ...] = (),
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    on_plan: Optional[Callable[["object"], None]] = None,
):
    """Merge `recipe` (a `Recipe`, or the path of a recipe YAML) into `out_dir`; returns a
    `MergeResult` (time, sizes, the plan, warnings).

    Relative model and artifact paths resolve against `search_dirs` and, for a recipe file, its
    folder. `on_plan(plan)` is called once the plan is checked and before anything is written
    (callers print its warnings there). Raises `MergeError` (one line) on bad input and
    `Cancelled` when `cancel` is set.
    """
    from mergecore.executor import execute_plan, plan_merge
    from mergecore.io.writer import DEFAULT_SHARD_SIZE, parse_size, prepare_output_dir

    if not isinstance(recipe, Recipe):
        path = Path(recipe)
        recipe = load_recipe(path)
        search_dirs = (path.resolve().parent, *search_dirs)
    prepare_output_dir(out_dir, overwrite=overwrite, protect=search_dirs)
    plan = plan_merge(recipe, out_dtype=out_dtype, search_dirs=search_dirs, allow_nonfinite=allow_nonfinite)
    if on_plan is not None:
        on_plan(plan)
    return execute_plan(plan, out_dir, shard_size=parse_size(shard_size) if shard_size else DEFAULT_SHARD_SIZE,
                        threads=threads, device=device,
                        memory_budget=parse_size(memory_budget) if memory_budget else None,
                        progress=progress, cancel=cancel or CancelToken(), overwrite=overwrite, protect=search_dirs)
