"""`mergecore moe CONFIG OUT [--device cpu|cuda]`: a mixture of experts from mergekit-moe's config."""

from __future__ import annotations

import argparse
import sys


def _cmd_moe(args: argparse.Namespace) -> int:
    from mergecore.events import TerminalBar, interruptible
    from mergecore.moe.build import MoEProgress, build_moe

    with interruptible("moe cancelled; nothing was written") as cancel, \
            TerminalBar("gates", quiet=args.quiet, unit="prompt", leave=False) as gates, \
            TerminalBar("writing", quiet=args.quiet, unit="B", unit_scale=True, leave=False) as writing:

        def progress(p: MoEProgress) -> None:
            if p.stage == "gates":
                gates.show(p.done, p.total, postfix=p.current)
            else:
                gates.close()  # done: the writing bar takes its line
                writing.show(p.done, p.total)

        result = build_moe(args.config, args.out, device=args.device, progress=progress, cancel=cancel,
                           overwrite=args.overwrite, shard_size=args.shard_size)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(result.summary())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moe", help="build a mixture of experts (Mixtral, Qwen2-MoE) from dense models "
                                   "(mergekit-moe's config)")
    p.add_argument("config", metavar="CONFIG",
                   help="YAML in mergekit-moe's format (base_model, experts, gate_mode, ...)")
    p.add_argument("out", metavar="OUT", help="the checkpoint folder to write (atomically)")
    p.add_argument("--device", default="cpu",
                   help="where the base model runs for hidden gates: cpu or cuda (default cpu)")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if an earlier mergecore moe wrote it")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_moe)
