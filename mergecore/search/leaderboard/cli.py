"""`mergecore leaderboard TASKS OUT --base B --models M1 M2 ... --budget 30m`.

Paths on the command line are relative to the current directory. The run is a search of the
one program, so `mergecore search leaderboard CONFIG.yml OUT` (paths relative to the YAML's
folder) runs the same thing from a file. Bad input is one `error:` line and exit status 2;
Ctrl-C stops it, and the same command resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from mergecore.search.leaderboard.config import SEARCH_KINDS


def _local(ref: Optional[str]) -> Optional[str]:
    """A command-line path made absolute against the current directory (a Hub id that names no
    local path is kept as written)."""
    from mergecore.io.source import is_hub_id

    if ref is None:
        return None
    p = Path(ref).expanduser()
    if not p.exists() and is_hub_id(ref):
        return ref
    return str(p.absolute())


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from mergecore.eval.cli import _quiet_transformers
    from mergecore.events import interruptible
    from mergecore.search.base import RECIPE_FILE, run_search
    from mergecore.search.leaderboard.config import LeaderboardConfig, parse_budget
    from mergecore.search.leaderboard.run import Leaderboard
    from mergecore.search.report import event_line, summary_line
    from mergecore.threads import set_torch_threads

    set_torch_threads(args.threads)
    budget = parse_budget(args.budget)
    fields = {
        "tasks": _local(args.tasks), "val_tasks": _local(args.val_tasks), "base": _local(args.base),
        "models": [_local(m) for m in args.models], "budget": budget, "top_k": args.top_k, "grid": not args.no_grid,
        "methods": args.methods.split(",") if args.methods else None,
        "searches": [] if args.searches == "none" else (args.searches.split(",") if args.searches else None),
        "val_fraction": args.val_fraction, "seed": args.seed, "batch_size": args.batch_size,
        "backend": args.backend, "workers": args.workers,
    }
    if args.ray_address:
        fields["ray_address"] = args.ray_address
    config = _validated(LeaderboardConfig, fields)
    board = Leaderboard(config, Path.cwd())  # every path checked before OUT is claimed
    _quiet_transformers()

    def show(event) -> None:
        line = event_line(event)
        if line is not None:
            print(line, flush=True)

    with interruptible(f"leaderboard stopped; run the same command again to resume from {args.out_dir}") as cancel:
        summary = run_search(board, args.out_dir, on_event=None if args.quiet else show, cancel=cancel,
                             resume=not args.restart, replay=args.merge)
    print(summary_line("leaderboard", summary, f"{args.out_dir}/{RECIPE_FILE}"))
    return 0


def _validated(cls, fields: dict):
    from pydantic import ValidationError

    from mergecore.errors import MergeError
    from mergecore.eval.yamlspec import validation_message

    try:
        return cls.model_validate(fields)
    except ValidationError as err:
        raise MergeError(validation_message(err, "leaderboard")) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="rank every data-free merge and the searches on validation in a time "
                                           "budget; score the top K on test")
    p.add_argument("tasks", help="tasks YAML: the test tasks (split in two with validation when --val-tasks is not "
                                 "given)")
    p.add_argument("out_dir", help="folder for leaderboard.csv / .html, recipe.yml (the winner), result.json, "
                                   "candidates.jsonl, events.jsonl and searches/")
    p.add_argument("--base", default=None, help="the base model the others were fine-tuned from")
    p.add_argument("--models", nargs="+", required=True, help="the models to merge")
    p.add_argument("--budget", default="30m", help="wall-clock budget over every run in OUT_DIR: 30m, 1h, 90s or "
                                                   "seconds (default 30m)")
    p.add_argument("--val-tasks", default=None, help="validation tasks YAML (default: a seeded part of each task "
                                                     "of TASKS, the rest being test)")
    p.add_argument("--val-fraction", type=float, default=0.5, help="without --val-tasks: the share of each task "
                                                                   "used for validation (default 0.5)")
    p.add_argument("--top-k", type=int, default=3, help="how many of the best by validation are scored on test")
    p.add_argument("--methods", default=None, help="comma-separated data-free methods (default: every applicable)")
    p.add_argument("--no-grid", action="store_true", help="each method at its defaults only")
    p.add_argument("--searches", default=None,
                   help=f"comma-separated searches to run after them ({', '.join(SEARCH_KINDS)}; 'none' for none; "
                        f"default: every one that applies)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the searches and randomised methods")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="score candidates here or on Ray")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (with --backend ray)")
    p.add_argument("--ray-address", default=None, help="connect to this Ray cluster instead of starting one")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--restart", action="store_true", help="forget what an earlier run in OUT_DIR scored")
    p.add_argument("--merge", action="store_true",
                   help="replay the winner: merge it into OUT_DIR/model and score that checkpoint on validation")
    p.add_argument("--quiet", "-q", action="store_true", help="only the final line")
    p.set_defaults(func=_cmd_leaderboard)
