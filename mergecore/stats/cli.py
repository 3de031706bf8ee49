"""`mergecore collect-stats KIND TASKS OUT --models ...` and `mergecore merge ... --collect-stats TASKS`."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from mergecore.errors import MergeError
from mergecore.events import CancelToken, TerminalBar


def _bar_progress(bar: TerminalBar) -> Callable[[str, int, int, str], None]:
    def progress(stage: str, done: int, total: int, message: str) -> None:
        bar.show(done, max(total, 1), desc=f"{stage}: {message}"[:60])

    return progress


def _quiet_transformers() -> None:
    """No 'Loading weights' bars from transformers between the command's own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _cmd_collect(args: argparse.Namespace) -> int:
    from mergecore.events import interruptible
    from mergecore.stats.collect import collect_stats

    _quiet_transformers()
    with interruptible("collection cancelled; nothing was written") as cancel, \
            TerminalBar("collecting", quiet=args.quiet, leave=False) as bar:
        out = collect_stats(args.kind, args.tasks, args.models, args.out, base=args.base, examples=args.examples,
                            batch_size=args.batch_size, device=args.device, seed=args.seed,
                            progress=_bar_progress(bar), cancel=cancel, overwrite=args.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def recipe_inputs(recipe: Any) -> list[str]:
    """The models a recipe merges, in order (its `models`, or its slices' sources)."""
    if recipe.models:
        return list(dict.fromkeys(m.model for m in recipe.models))
    return list(dict.fromkeys(src.model for s in recipe.slices or [] for src in s.sources))


def merge_collecting(recipe_path: str | Path, out_dir: str | Path, tasks: str, *, device: str = "cpu",
                     examples: int = 256, batch_size: int = 16, seed: int = 0, overwrite: bool = False,
                     quiet: bool = False, cancel: Optional[CancelToken] = None,
                     merge: Callable[..., Any]) -> Any:
    """Collect the statistics the recipe's method needs on `tasks` into a temporary file, then
    `merge(recipe, out_dir, search_dirs=...)` with that file as the recipe's artifact (the merge
    copies it into OUT/artifacts/). The temporary file is removed whatever happens."""
    from mergecore.io.outdir import check_output_dir, existing_dirs
    from mergecore.methods import get_method
    from mergecore.recipe import load_recipe
    from mergecore.stats.collect import collect_stats

    path = Path(recipe_path)
    recipe = load_recipe(path)
    root = path.resolve().parent
    method = get_method(recipe.merge_method)
    if method.stats is None:
        informed = ", ".join(m for m in _informed())
        raise MergeError(f"--collect-stats is for data-informed methods ({informed}); '{method.name}' reads no "
                         f"statistics")
    spec = method.param("stats")
    key = str((recipe.parameters or {}).get("stats", spec.default if spec else "stats"))
    models = recipe_inputs(recipe)
    local = existing_dirs(p for ref in recipe.referenced_models() for p in (ref, root / ref))
    check_output_dir(out_dir, kind="merge", overwrite=overwrite, sources=local, protect=(root,))  # before the work
    _quiet_transformers()
    tmp = Path(tempfile.mkdtemp(prefix="mergecore-stats-"))
    try:
        with TerminalBar(f"collecting {method.stats}", quiet=quiet, leave=False) as bar:
            stats = collect_stats(method.stats, tasks, models, tmp / f"{key}.safetensors", base=recipe.base_model,
                                  examples=examples, batch_size=batch_size, device=device, seed=seed,
                                  progress=_bar_progress(bar), cancel=cancel, search_dirs=(root,))
        if (recipe.artifacts or {}).get(key) and not quiet:
            print(f"note: the recipe's artifact '{key}' is replaced by the statistics just collected", file=sys.stderr)
        with_stats = recipe.model_copy(update={"artifacts": {**(recipe.artifacts or {}), key: str(stats)}})
        return merge(with_stats, out_dir, search_dirs=(root,))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _informed() -> list[str]:
    from mergecore.methods import all_methods

    return [m.name for m in all_methods().values() if m.stats]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect-stats", help="collect Gram matrices or Fisher information for data-informed merges")
    p.add_argument("kind", metavar="KIND",
                   help="gram, fisher or gram_plusplus, or a method that reads them (regmean, fisher, regmean_plusplus)")
    p.add_argument("tasks", metavar="TASKS", help="tasks YAML: each model runs on its own task's inputs (no labels)")
    p.add_argument("out", metavar="OUT", help="the statistics file to write (.safetensors)")
    p.add_argument("--models", nargs="+", required=True, help="the models, in the recipe's order")
    p.add_argument("--base", default=None, help="a folder with the tokenizer / image preprocessing, if the models lack them")
    p.add_argument("--examples", type=int, default=256, help="examples per model (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default 16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example choice and sampled labels (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if collect-stats wrote it")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_collect)
