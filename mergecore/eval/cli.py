"""`mergecore eval CHECKPOINT_OR_RECIPE --tasks tasks.yml`: score a checkpoint (or a recipe's merge).

`mergecore eval --init-tasks DIR [--models M ...] [--overwrite]` writes DIR/tasks.yml and
DIR/tasks-val.yml from the data files in DIR instead (`mergecore.eval.scaffold`)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mergecore.errors import MergeError
from mergecore.threads import set_torch_threads


def _is_recipe(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (".yml", ".yaml")


def _cmd_init_tasks(args: argparse.Namespace) -> int:
    from mergecore.eval.scaffold import init_tasks

    if args.target is not None or args.tasks is not None:
        raise MergeError("--init-tasks DIR writes a tasks file; give no CHECKPOINT_OR_RECIPE or --tasks with it")
    found = init_tasks(args.init_tasks, models=args.models, overwrite=args.overwrite)
    for t in found:
        print(t.line())
    root = Path(args.init_tasks).expanduser()
    print(f"wrote {root / 'tasks.yml'} (test split) and {root / 'tasks-val.yml'} (validation split): "
          f"{sum(1 for t in found if t.kind)} task(s); check the guesses marked by comments")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mergecore.eval.evaluator import EvalProgress, Evaluator, parse_subset
    from mergecore.events import TerminalBar, interruptible
    from mergecore.merging import merge

    if args.init_tasks is not None:
        return _cmd_init_tasks(args)
    if args.models or args.overwrite:
        raise MergeError("--models and --overwrite go with --init-tasks DIR")
    if args.target is None or args.tasks is None:
        raise MergeError("give a CHECKPOINT_OR_RECIPE and --tasks TASKS.yml (or --init-tasks DIR to write a tasks file)")
    target = Path(args.target).expanduser()
    if not target.exists():
        raise MergeError(f"no checkpoint folder or recipe file at {target}")
    if target.is_file() and not _is_recipe(target):
        raise MergeError(f"{target} is a file but not a recipe (.yml/.yaml); give a checkpoint folder or a recipe")
    if args.batch_size < 1:
        raise MergeError("--batch-size must be at least 1")
    set_torch_threads(args.threads)
    ev = Evaluator(args.tasks, subset=parse_subset(args.subset), seed=args.seed, batch_size=args.batch_size,
                   device=args.device)
    _quiet_transformers()
    quiet = args.quiet or args.json
    tmp = None
    with interruptible("evaluation cancelled") as cancel, TerminalBar("evaluating", quiet=quiet) as bar:

        def progress(p: EvalProgress) -> None:
            bar.show(p.examples_done, p.examples_total, desc=f"[{p.task_index + 1}/{p.tasks_total}] {p.task}")

        try:
            model_dir = target
            if _is_recipe(target):
                tmp = tempfile.TemporaryDirectory(prefix="mergecore-eval-")
                model_dir = Path(tmp.name) / "merged"
                if not quiet:
                    print(f"merging {target} ...", file=sys.stderr)
                merge(target, model_dir, cancel=cancel, device=args.device)
            result = ev.evaluate(model_dir, progress=progress, cancel=cancel, subset_index=args.subset_index)
        finally:
            if tmp is not None:
                tmp.cleanup()
    result.model = str(target)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    import pandas as pd

    print(f"model: {target}")
    subset = "all examples" if ev.subset is None else f"subset {ev.subset} (seed {ev.seed}, index {args.subset_index})"
    print(f"tasks: {args.tasks} ({subset})")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(result.format_table())
    print(f"mean score: {result.mean:.4f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a checkpoint or a recipe's merge on tasks (YAML), or scaffold a tasks file")
    p.add_argument("target", metavar="CHECKPOINT_OR_RECIPE", nargs="?",
                   help="a checkpoint folder, or a recipe YAML (merged to a temporary folder first)")
    p.add_argument("--tasks", help="tasks YAML file (required with CHECKPOINT_OR_RECIPE)")
    p.add_argument("--init-tasks", metavar="DIR", default=None,
                   help="write DIR/tasks.yml and DIR/tasks-val.yml from the data files in DIR (and its sub-folders)")
    p.add_argument("--models", nargs="+", metavar="MODEL", default=None,
                   help="with --init-tasks: checkpoint folders whose classifier heads may score the tasks (head_from)")
    p.add_argument("--overwrite", action="store_true", help="with --init-tasks: replace existing tasks files")
    p.add_argument("--subset", default=None, help="score a subset of each task: a ratio (0.1, 10%%) or a count (200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset permutation (default 0)")
    p.add_argument("--subset-index", type=int, default=0, help="which of the disjoint subsets (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default 64)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def _quiet_transformers() -> None:
    """No 'Loading weights' / 'Writing model shards' bars from transformers in CLI output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
