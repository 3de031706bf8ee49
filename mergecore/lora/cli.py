"""`mergecore extract-lora --model FT --base BASE OUT --rank R [--energy E] [--modules ...]`."""

from __future__ import annotations

import argparse
import sys


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
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(report.table())
    print(report.summary() + f" (table in {REPORT})")
    return 0


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
