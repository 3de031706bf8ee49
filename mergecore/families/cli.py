"""`mergecore bench build-family NAME [--quick]` and `mergecore bench families`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mergecore.errors import MergeError
from mergecore.threads import set_torch_threads


def _cmd_build_family(args: argparse.Namespace) -> int:
    from mergecore.eval.cli import _quiet_transformers
    from mergecore.events import TerminalBar, interruptible
    from mergecore.families.base import FamilyProgress, build_family, family_dir, get_builder

    get_builder(args.name)  # unknown names fail before anything else
    root = Path(args.root) if args.root else None
    target = family_dir(args.name, root, args.quick)
    if (target / "family.json").is_file() and not args.force:
        print(f"family '{args.name}' is already built at {target} (use --force to rebuild)", file=sys.stderr)
        if args.json:
            print((target / "family.json").read_text())
        return 0
    set_torch_threads(args.threads)
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MergeError(f"--set expects KEY=VALUE, got '{item}'")
        overrides[key.strip()] = value
    get_builder(args.name).make_config(args.quick, overrides)  # bad settings fail before the build starts
    _quiet_transformers()
    bars: dict[str, TerminalBar] = {}

    def progress(p: FamilyProgress) -> None:
        if p.stage not in bars:  # one bar per stage, left on screen when the next one starts
            for b in bars.values():
                b.close()
            bars[p.stage] = TerminalBar(f"[{p.stage_index + 1}/{p.stages_total}] {p.stage}", quiet=args.quiet,
                                        file=sys.stderr, leave=True)
        post = " ".join(f"{k}={v:.3f}" for k, v in p.metrics.items())
        bars[p.stage].show(p.step, p.steps, postfix=(p.message + " " + post).strip())

    try:
        with interruptible("build cancelled; nothing was written") as cancel:
            fam = build_family(args.name, root=root, quick=args.quick, force=True, overrides=overrides,
                               progress=progress, cancel=cancel)
    finally:
        for b in bars.values():
            b.close()
    info = fam.info
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"built family '{args.name}' at {fam.root} in {info['build_seconds']:.0f} s")
    for name, e in info.get("experts", {}).items():
        if "test_perplexity_after" in e:  # language-model experts (smollm2-domains)
            print(f"  expert {name:<18} test perplexity {e['test_perplexity_before']:.2f} (base) -> "
                  f"{e['test_perplexity_after']:.2f}, next-line accuracy {e['test_next_line_accuracy_before']:.3f} -> "
                  f"{e['test_next_line_accuracy_after']:.3f}")
            continue
        extra = f", base linear probe {e['base_linear_probe_accuracy']:.4f}" if "base_linear_probe_accuracy" in e else ""
        if "base_test_accuracy" in e:  # the base body under this expert's head (minilm-textclass)
            extra += f", base body + this head {e['base_test_accuracy']:.4f}"
        print(f"  expert {name:<18} own-task test accuracy {e.get('test_accuracy', float('nan')):.4f}{extra}")
    print(f"tasks: {fam.tasks_file} (test), {fam.val_tasks_file} (validation)")
    return 0


def _cmd_families(args: argparse.Namespace) -> int:
    from mergecore.families.base import family_dir, family_names, get_builder

    root = Path(args.root) if args.root else None
    for name in family_names():
        b = get_builder(name)
        built = [f"{'quick' if q else 'full'}: {family_dir(name, root, q)}" for q in (False, True)
                 if (family_dir(name, root, q) / "family.json").is_file()]
        print(f"{name:<16} {b.summary}")
        print(f"{'':<16} built -- {'; '.join(built) if built else 'not yet (mergecore bench build-family ' + name + ')'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="offline model families for benchmarks and searches")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    p = bsub.add_parser("build-family", help="build (or reuse) an offline family: base + experts + tasks")
    p.add_argument("name", help="family name (see `mergecore bench families`)")
    p.add_argument("--quick", action="store_true", help="a small, fast build (own folder NAME-quick)")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")
    p.add_argument("--root", default=None, help="families folder (default: <cache>/families; MERGECORE_CACHE sets <cache>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change one build setting of the preset (repeatable), e.g. --set expert_steps=200")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print family.json when done")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_build_family)

    p = bsub.add_parser("families", help="list the families and where they are built")
    p.add_argument("--root", default=None, help="families folder (default: <cache>/families)")
    p.set_defaults(func=_cmd_families)
