"""`mergecore search rmm|dam|evo CONFIG.yml OUT_DIR`: run a search from the command line.

Every kind goes through the one program (`mergecore.search.base.run_search`); `--merge` is its
replay step (the merged checkpoint lands in OUT_DIR/model and result.json holds its scores).
"""

from __future__ import annotations

import argparse
import sys

from mergecore.errors import MergeError
from mergecore.eval.cli import _quiet_transformers
from mergecore.threads import set_torch_threads

# kind -> (help, the flag that overrides the config's budget, its config field, its help)
KINDS = {
    "rmm": ("Reinforced Model Merging: PPO agent over layers", "--episodes", "episodes",
            "override the config's episode count"),
    "dam": ("Differentiable Adaptive Merging / layer-wise AdaMerging: train coefficients", "--steps", "steps",
            "override the config's step count"),
    "evo": ("evolutionary search (CMA-ES) over a recipe template's parameters", "--max-evals", "max_evals",
            "override the config's evaluation budget"),
    "leaderboard": ("every data-free merge and the searches ranked on validation in a time budget (as "
                    "`mergecore leaderboard`)", "--budget", "budget", "override the config's budget: 30m, 1h, 90s"),
}


def _seconds(text: str) -> int:
    """--budget's type: a duration in seconds (argparse reports a bad one as a usage error)."""
    from mergecore.search.leaderboard.config import parse_budget

    try:
        return parse_budget(text)
    except MergeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _cmd_search(args: argparse.Namespace) -> int:
    from mergecore.events import interruptible
    from mergecore.search.base import RECIPE_FILE, run_search, search_class
    from mergecore.search.config import load_config
    from mergecore.search.report import event_line, summary_line

    set_torch_threads(args.threads)
    kind = args.search_kind
    cls = search_class(kind)
    config, root = load_config(args.config, cls.config_class)
    _quiet_transformers()  # stderr keeps to our lines (an error is one line)
    field = KINDS[kind][2]
    budget = getattr(args, field)
    if budget is not None:
        if budget < 1:
            raise MergeError(f"{KINDS[kind][1]} must be at least 1")
        setattr(config, field, budget)
    for key in ("backend", "workers", "ray_address"):
        if getattr(args, key, None):
            setattr(config, key, getattr(args, key))
    every = getattr(args, "log_every", 1)

    def show(event) -> None:
        line = event_line(event, every)
        if line is not None:
            print(line, flush=True)

    with interruptible(f"search stopped; run the same command again to resume from {args.out_dir}") as cancel:
        summary = run_search(cls(config, root), args.out_dir, on_event=None if args.quiet else show, cancel=cancel,
                             resume=not args.restart, replay=args.merge)
    print(summary_line(kind, summary, f"{args.out_dir}/{RECIPE_FILE}"))
    if args.quiet and "replay" in summary:
        print(summary["replay"]["merge"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search for a merge (rmm, dam, evo, leaderboard)")
    kinds = p.add_subparsers(dest="search_kind", required=True)
    for kind, (help_text, flag, field, flag_help) in KINDS.items():
        k = kinds.add_parser(kind, help=help_text)
        k.add_argument("config", help="search YAML (its paths are relative to its folder)")
        k.add_argument("out_dir", help="folder for recipe.yml, result.json, events.jsonl, logs and the checkpoint")
        k.add_argument(flag, dest=field, type=_seconds if kind == "leaderboard" else int, default=None, help=flag_help)
        k.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in OUT_DIR")
        k.add_argument("--merge", action="store_true",
                       help="replay the result: merge it into OUT_DIR/model and score that checkpoint")
        k.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        k.add_argument("--quiet", "-q", action="store_true")
        if kind == "dam":
            k.add_argument("--log-every", type=int, default=10, help="print every N-th step (default 10)")
        else:
            k.add_argument("--backend", choices=["local", "ray"], default=None, help="override the config's backend")
            k.add_argument("--workers", type=int, default=None, help="Ray workers (with --backend ray)")
            k.add_argument("--ray-address", default=None, help="connect to this Ray cluster instead of starting one")
        k.set_defaults(func=_cmd_search)


if __name__ == "__main__":  # pragma: no cover
    from mergecore.cli import main

    sys.exit(main())
