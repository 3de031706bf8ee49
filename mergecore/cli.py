"""`mergecore` command line: merge, methods (and, as they land, eval, search, bench).

Bad input ends in one line on stderr and exit status 2; `--verbose` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergecore.errors import MergeError, clip
from mergecore.threads import check_threads

EXIT_BAD_INPUT = 2


def _cmd_merge(args: argparse.Namespace) -> int:
    from mergecore.events import MergeProgress, TerminalBar, interruptible
    from mergecore.io.writer import parse_size
    from mergecore.merging import merge
    from mergecore.plan import Plan, plan_merge, plan_to_json
    from mergecore.recipe import load_recipe

    args.threads = check_threads(args.threads)
    parse_size(args.shard_size)  # a bad size fails before anything is read
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    if args.dry_run:  # the plan only: no output-path check, nothing written
        plan = plan_merge(load_recipe(args.recipe), out_dtype=args.dtype, search_dirs=(Path(args.recipe).resolve().parent,),
                          allow_nonfinite=args.allow_nonfinite)
        print(plan_to_json(plan) if args.json else plan.describe(budget, args.threads or 1, args.device))
        return 0

    def warn(plan: Plan) -> None:
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)

    if args.collect_stats:  # a data-informed method: its statistics first, then the merge with them
        from mergecore.stats.cli import merge_collecting

        with interruptible("merge cancelled; nothing was written") as cancel:
            with TerminalBar("merging", quiet=args.quiet, unit="B", unit_scale=True, leave=False) as bar:

                def run_merge(recipe, out_dir, search_dirs):
                    return merge(recipe, out_dir, search_dirs=search_dirs, cancel=cancel, out_dtype=args.dtype,
                                 progress=lambda p: bar.show(p.bytes_done, p.bytes_total),
                                 shard_size=args.shard_size, threads=args.threads, device=args.device,
                                 memory_budget=budget, overwrite=args.overwrite,
                                 allow_nonfinite=args.allow_nonfinite, on_plan=warn)

                result = merge_collecting(args.recipe, args.out_dir, args.collect_stats, device=args.device,
                                          examples=args.stats_examples, overwrite=args.overwrite, quiet=args.quiet,
                                          cancel=cancel, merge=run_merge)
        for w in result.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(result.summary())
        return 0

    # leave=False: a failure's one `error:` line is not preceded by a half-filled bar
    with interruptible("merge cancelled; nothing was written") as cancel, \
            TerminalBar("merging", quiet=args.quiet, unit="B", unit_scale=True, leave=False) as bar:

        def progress(p: MergeProgress) -> None:
            bar.show(p.bytes_done, p.bytes_total, postfix=f"{p.tensors_done}/{p.tensors_total} tensors")

        result = merge(args.recipe, args.out_dir, progress=progress, cancel=cancel, out_dtype=args.dtype,
                       shard_size=args.shard_size, threads=args.threads, device=args.device, memory_budget=budget,
                       overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite, on_plan=warn)
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
        print(f"formula: {m.formula_text}")
        if m.paper:
            print(f"paper: {m.paper}")
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
    parser = _Parser(prog="mergecore", description="Merge models from YAML recipes.")
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if an earlier merge wrote it (other non-empty folders are refused)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write merged tensors that turn inf/NaN from finite inputs instead of stopping")
    p.add_argument("--collect-stats", metavar="TASKS", default=None,
                   help="for a data-informed method (regmean, fisher, ...): collect its statistics on these tasks "
                        "first and merge with them (they are kept in OUT_DIR/artifacts/)")
    p.add_argument("--stats-examples", type=int, default=256, help="with --collect-stats: examples per model (256)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.add_argument("name", nargs="?", help="show one method in detail")
    p.set_defaults(func=_cmd_methods)

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


# Modules that add subcommands (eval, search, bench): each has `register(subparsers)`, which
# adds its parser(s) with `set_defaults(func=...)`; heavy imports stay inside the handlers.
SUBCOMMAND_MODULES: tuple[str, ...] = ("mergecore.eval.cli", "mergecore.families.cli", "mergecore.search.cli",
                                       "mergecore.search.leaderboard.cli", "mergecore.stats.cli", "mergecore.lora.cli",
                                       "mergecore.moe.cli")


_OS_HINTS = {
    errno.ENOSPC: "free some disk space or write somewhere else",
    errno.EDQUOT: "free some disk space or write somewhere else",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EROFS: "write somewhere else",
    errno.EMFILE: "raise the open-file limit (ulimit -n) or use fewer --threads",
    errno.ENFILE: "raise the open-file limit (ulimit -n) or use fewer --threads",
}


def _os_error_line(err: OSError, what: str) -> str:
    """`<what> failed: <strerror> (<path>); <hint>`: disk full, permissions, open files..."""
    reason = err.strerror or clip(err, 200) or type(err).__name__
    paths = [clip(p, 200) for p in (err.filename, err.filename2) if p is not None]
    hint = _OS_HINTS.get(err.errno or 0)
    return (f"{what} failed: {reason}" + (f" ({' -> '.join(paths)})" if paths else "")
            + (f"; {hint}" if hint else ""))


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as one `warning:` line each (not the two-line file:line form)."""
    try:
        print(f"warning: {clip(message, 300)}", file=file or sys.stderr)
    except OSError:  # stderr closed: nowhere to warn
        pass


def run_command(call: Callable[[], int], *, verbose: bool = False, what: str = "mergecore") -> int:
    """Run a command and turn every failure into one `error:` line on stderr and exit status 2.

    Shared by `main` and the bench scripts: bad input (`MergeError`), operating-system errors
    (disk full, permissions, too many open files) and unexpected exceptions all end the same
    way, so scripts and users can rely on one line and status 2; `verbose` adds the traceback.
    Ctrl-C is status 130.
    """
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return call()
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # output piped into e.g. `head`
            return 0
        except Exception as err:
            if verbose:
                traceback.print_exc()
            if isinstance(err, MergeError):
                line = str(err)
            elif isinstance(err, OSError):
                line = _os_error_line(err, what)
            elif isinstance(err, MemoryError):
                line = f"{what} ran out of memory"
            else:  # a bug, not bad input: still one line unless --verbose
                line = (f"internal error: {type(err).__name__}: {clip(err, 200) or '(no message)'}"
                        + ("" if verbose else " (run with --verbose for the traceback)"))
            print(f"error: {clip(line, 600)}", file=sys.stderr)
            return EXIT_BAD_INPUT


def run_script(main: Callable[[], int], name: str) -> int:
    """`run_command` for a script with its own `main` (bench/*.py); `--verbose`/`-v` shows tracebacks."""
    return run_command(main, verbose=bool({"--verbose", "-v"} & set(sys.argv[1:])), what=name)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line too, pointing at --help instead of printing the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {clip(message, 300)} (see {self.prog} --help)\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mergecore.io.outdir import install_signal_handlers

    install_signal_handlers()  # SIGINT/SIGTERM/SIGHUP remove this run's temporary folders first
    what = " ".join(str(v) for v in (args.command, getattr(args, "search_kind", None),
                                     getattr(args, "bench_command", None)) if v)
    return run_command(lambda: args.func(args), verbose=args.verbose, what=what)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
