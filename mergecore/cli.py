"""`mergecore` command line: merge, methods (and, as they land, eval, search, bench).

Bad input ends in one line on stderr and exit status 2; `--verbose` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergecore.errors import Cancelled, MergeError

EXIT_BAD_INPUT = 2


def _cmd_merge(args: argparse.Namespace) -> int:
    from mergecore.events import CancelToken, MergeProgress
    from mergecore.executor import execute_plan, plan_merge, plan_to_json
    from mergecore.io.writer import parse_size, prepare_output_dir
    from mergecore.recipe import load_recipe

    if args.threads < 1:
        raise MergeError("--threads must be at least 1")
    recipe = load_recipe(args.recipe)
    shard_size = parse_size(args.shard_size)
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    if not args.dry_run:
        prepare_output_dir(args.out_dir)
    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    search_dirs = (Path(args.recipe).resolve().parent,)
    plan = plan_merge(recipe, out_dtype=args.dtype, search_dirs=search_dirs, allow_nonfinite=args.allow_nonfinite)
    if args.dry_run:
        print(plan_to_json(plan) if args.json else plan.describe(budget))
        return 0
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)

    bar = None
    progress: Optional[Callable[[MergeProgress], None]] = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="B", unit_scale=True, desc="merging", dynamic_ncols=True)

        def progress(p: MergeProgress) -> None:
            bar.total = p.bytes_total
            bar.n = p.bytes_done
            bar.set_postfix_str(f"{p.tensors_done}/{p.tensors_total} tensors", refresh=False)
            bar.refresh()

    cancel = CancelToken()
    try:
        result = execute_plan(plan, args.out_dir, shard_size=shard_size, threads=args.threads,
                              device=args.device, memory_budget=budget, progress=progress, cancel=cancel)
    except KeyboardInterrupt:
        cancel.cancel()
        raise Cancelled("merge cancelled; nothing was written") from None
    finally:
        if bar is not None:
            bar.close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(result.summary())
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from mergecore.methods import all_methods, get_method

    methods = all_methods()
    if args.name:
        m = get_method(args.name)
        print(f"{m.name}: {m.summary}")
        print(f"base model: {m.base}")
        for p in m.params:
            print(f"  {p.describe()}" + (f" -- {p.help}" if p.help else ""))
        if m.doc:
            print()
            print(m.doc)
        return 0
    for m in methods.values():
        print(f"{m.name:<18} {m.summary}")
        base = {"required": "base model required", "optional": "base model optional", "ignored": "no base model"}[m.base]
        print(f"{'':<18} {base}; parameters: " + ("; ".join(p.describe() for p in m.params) or "none"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergecore", description="Merge models from YAML recipes.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="run a recipe and write a checkpoint")
    p.add_argument("recipe", help="recipe YAML (mergekit format works)")
    p.add_argument("out_dir", help="output folder (written atomically)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None, help="output dtype (float32, float16, bfloat16); default: the recipe's")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size (default 5GB)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="worker threads")
    p.add_argument("--memory-budget", default=None, help="bytes of tensors in flight (e.g. 2GB); default automatic")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a peak-memory estimate, write nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write merged tensors that turn inf/NaN from finite inputs instead of stopping")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.add_argument("name", nargs="?", help="show one method in detail")
    p.set_defaults(func=_cmd_methods)

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


# Modules that add subcommands (eval, search, bench): each has `register(subparsers)`, which
# adds its parser(s) with `set_defaults(func=...)`; heavy imports stay inside the handlers.
SUBCOMMAND_MODULES: tuple[str, ...] = ("mergecore.eval.cli", "mergecore.families.cli", "mergecore.search.cli")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MergeError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        return 0
    except Exception as err:  # an unexpected failure: one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {type(err).__name__}: {msg} (run with --verbose for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
