"""`mergecore extract-lora --model FT --base BASE OUT --rank R [--energy E] [--modules ...]` and
`mergecore merge-adapters [CONFIG] OUT [--base B --adapter A --weight W ... --method M --rank R ...]`.

merge-adapters, not merge-lora: `merge-lora` would read as folding a LoRA into its base (that is
`mergecore merge` on a BASE+ADAPTER reference); this command takes adapters and writes an adapter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _print_report(report, table_file: str, quiet: bool) -> int:
    """Warnings on stderr, the per-tensor table (unless quiet) and the one-line summary."""
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not quiet:
        print(report.table())
    print(report.summary() + f" (table in {table_file})")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from mergecore.events import MergeProgress, TerminalBar, interruptible
    from mergecore.lora.extract import REPORT, extract_lora

    with interruptible("extraction cancelled; nothing was written") as cancel, \
            TerminalBar("extracting", quiet=args.quiet, unit="B", unit_scale=True, leave=False) as bar:

        def progress(p: MergeProgress) -> None:
            bar.show(p.bytes_done, p.bytes_total, postfix=f"{p.tensors_done}/{p.tensors_total} tensors")

        report = extract_lora(args.model, args.base, args.out, rank=args.rank, energy=args.energy,
                              modules=args.modules, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                              progress=progress, cancel=cancel)
    return _print_report(report, REPORT, args.quiet)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract-lora", help="extract a fine-tune's difference from its base as a PEFT LoRA adapter")
    p.add_argument("out", metavar="OUT", help="the adapter folder to write (atomically)")
    p.add_argument("--model", required=True, help="the fine-tuned model (local folder or Hub id)")
    p.add_argument("--base", required=True, help="its base model (local folder or Hub id)")
    p.add_argument("--rank", type=int, default=None,
                   help="rank of every factorised layer (with --energy: the most any layer gets)")
    p.add_argument("--energy", type=float, default=None,
                   help="per layer, the smallest rank keeping this share of the squared singular values of "
                        "the difference, in (0, 1] (e.g. 0.9)")
    p.add_argument("--modules", nargs="+", default=None, metavar="NAME",
                   help="linear modules to factorise, by name or path (q_proj v_proj, or q_proj,v_proj); "
                        "default: every linear layer of the layer stacks")
    p.add_argument("--dtype", default=None,
                   help="dtype of the saved tensors (float32, float16, bfloat16); default: factors in float32, "
                        "modules kept whole in the fine-tune's dtype")
    p.add_argument("--device", default="cpu", help="where the SVDs run: cpu or cuda (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if an earlier extract-lora wrote it")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no per-layer table")
    p.set_defaults(func=_cmd_extract)
    _register_merge(sub)


def _param(text: str) -> tuple[str, object]:
    """--param KEY=VALUE, the value read as a YAML scalar (0.5, true, sum)."""
    from mergecore.errors import MergeError
    from mergecore.yamlio import load_yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise MergeError(f"--param takes KEY=VALUE (e.g. density=0.5), got '{text[:80]}'")
    return key.strip(), load_yaml(value, f"--param {key.strip()}")


def _merge_config(args: argparse.Namespace):
    """The config file's settings (when one is given), each flag given replacing its field."""
    from mergecore.errors import MergeError
    from mergecore.lora.adapters import AdapterSpec
    from mergecore.lora.merge_config import AdapterMergeConfig, load_config

    if len(args.paths) > 2:
        raise MergeError("merge-adapters takes [CONFIG] OUT: at most a config file and the output folder")
    if len(args.paths) == 2:
        config = load_config(args.paths[0])
    elif not args.adapters:
        raise MergeError("give a config file (merge-adapters CONFIG OUT) or the adapters (--adapter A --adapter B)")
    else:
        config = AdapterMergeConfig([])
    if args.adapters:
        weights = args.weights or [1.0] * len(args.adapters)
        if len(weights) != len(args.adapters):
            raise MergeError(f"--weight is given {len(weights)} times for {len(args.adapters)} adapters; give one each")
        config.adapters = [AdapterSpec(a, w) for a, w in zip(args.adapters, weights)]
    elif args.weights:
        if len(args.weights) != len(config.adapters):
            raise MergeError(f"--weight is given {len(args.weights)} times for the config's {len(config.adapters)} "
                             f"adapters; give one each")
        config.adapters = [AdapterSpec(a.ref, w, a.params) for a, w in zip(config.adapters, args.weights)]
    for field in ("base_model", "method", "knots_merge", "rank", "energy", "dtype", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(config, field, value)
    if args.param:
        config.parameters = {**config.parameters, **dict(_param(p) for p in args.param)}
    config.check()
    return config


def _cmd_merge_adapters(args: argparse.Namespace) -> int:
    from mergecore.events import MergeProgress, TerminalBar, interruptible
    from mergecore.lora.merge import REPORT, merge_adapters

    config = _merge_config(args)
    search_dirs = (Path(args.paths[0]).expanduser().resolve().parent,) if len(args.paths) == 2 else ()
    with interruptible("adapter merge cancelled; nothing was written") as cancel, \
            TerminalBar("merging adapters", quiet=args.quiet, unit="module", leave=False) as bar:

        def progress(p: MergeProgress) -> None:
            bar.show(p.tensors_done, p.tensors_total, postfix=p.current.rpartition(".weight")[0][-40:])

        report = merge_adapters(config, args.paths[-1], device=args.device, overwrite=args.overwrite,
                                progress=progress, cancel=cancel, search_dirs=search_dirs)
    return _print_report(report, REPORT, args.quiet)


def _register_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-adapters", help="merge several LoRA adapters of one base into one PEFT adapter")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="CONFIG OUT (a merge-adapters YAML config and the adapter folder to write), or OUT alone "
                        "with --adapter")
    p.add_argument("--base", dest="base_model", default=None,
                   help="the base model (default: the adapters' base_model_name_or_path)")
    p.add_argument("--adapter", dest="adapters", action="append", default=None, metavar="ADAPTER",
                   help="an adapter folder or Hub id; repeat for each adapter (replaces the config's adapters)")
    p.add_argument("--weight", dest="weights", action="append", type=float, default=None, metavar="W",
                   help="the weight of each adapter, in order; repeat once per adapter (default 1)")
    p.add_argument("--method", default=None,
                   help="linear (default), cat, knots, or a mergecore method on the full changes: ties, dare_ties, "
                        "dare_linear, task_arithmetic, ...")
    p.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                   help="a parameter of the method (knots: of --knots-merge), e.g. density=0.5; repeatable")
    p.add_argument("--knots-merge", dest="knots_merge", default=None,
                   help="knots: how the aligned parts are merged (ties, the paper's default; linear; another method)")
    p.add_argument("--rank", type=int, default=None,
                   help="rank of the merged adapter (linear without it: exact concatenation; other methods: the "
                        "adapters' largest rank)")
    p.add_argument("--energy", type=float, default=None,
                   help="per module, the fewest components keeping this share of the merged change's squared "
                        "singular values, in (0, 1]")
    p.add_argument("--dtype", default=None, help="dtype of the saved factors (float32, float16, bfloat16)")
    p.add_argument("--seed", type=int, default=None, help="seed of randomised methods (DARE), per module (0)")
    p.add_argument("--device", default="cpu", help="where the SVDs and methods run: cpu or cuda (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if an earlier merge-adapters run wrote it")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no per-module table")
    p.set_defaults(func=_cmd_merge_adapters)
