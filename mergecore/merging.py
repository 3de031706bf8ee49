"""`mergecore.merge`: the one call that turns a recipe into a checkpoint.

The CLI, the app, every search replay and the benches call this; it applies the output-path
rule (once before planning, with the local model folders, so a bad output fails before any model
is fetched; again with every source once planned), plans (headers only, every check that can run
before a byte is written), then streams the plan into the output folder. `mergecore.merge` is
this function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from mergecore.events import CancelToken, ProgressCallback
from mergecore.executor import MergeResult, execute_plan
from mergecore.io.lora_config import split_adapter_ref
from mergecore.io.outdir import existing_dirs
from mergecore.io.writer import DEFAULT_SHARD_SIZE, parse_size, prepare_output_dir
from mergecore.plan import Plan, plan_merge
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
    on_plan: Optional[Callable[[Plan], None]] = None,
) -> MergeResult:
    """Merge `recipe` (a `Recipe`, or the path of a recipe YAML) into `out_dir`; returns a
    `MergeResult` (time, sizes, the plan, warnings).

    Relative model and artifact paths resolve against `search_dirs` and, for a recipe file, its
    folder; those folders are protected (the output may be neither one nor above one). Sizes
    may be bytes or text ("5GB"). `on_plan(plan)` is called once the plan is checked and before
    anything is written (callers print its warnings there). Raises `MergeError` (one line) on
    bad input and `Cancelled` when `cancel` is set.
    """
    if not isinstance(recipe, Recipe):
        path = Path(recipe)
        recipe = load_recipe(path)
        search_dirs = (path.resolve().parent, *search_dirs)
    shard_bytes = parse_size(shard_size) if shard_size else DEFAULT_SHARD_SIZE
    budget = parse_size(memory_budget) if memory_budget else None
    refs = [side for ref in recipe.referenced_models() for side in (split_adapter_ref(ref, search_dirs) or (ref,))]
    local = existing_dirs(p for ref in refs for p in (ref, *(d / ref for d in search_dirs)))
    prepare_output_dir(out_dir, overwrite=overwrite, sources=local, protect=search_dirs)
    plan = plan_merge(recipe, out_dtype=out_dtype, search_dirs=search_dirs, allow_nonfinite=allow_nonfinite)
    prepare_output_dir(out_dir, overwrite=overwrite, sources=[p for s in plan.sources.values() for p in s.folders],
                       protect=search_dirs)
    if on_plan is not None:
        on_plan(plan)
    return execute_plan(plan, out_dir, shard_size=shard_bytes, threads=threads, device=device, memory_budget=budget,
                        progress=progress, cancel=cancel, overwrite=overwrite, protect=search_dirs)
