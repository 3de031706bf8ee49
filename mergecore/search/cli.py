"""`mergecore search rmm|... CONFIG.yml OUT_DIR`: run a search from the command line."""

from __future__ import annotations

import argparse
import sys

from mergecore.errors import Cancelled
from mergecore.eval.cli import _quiet_transformers
from mergecore.threads import set_torch_threads


def _episode_line(event) -> None:
    d = event.data
    if event.kind == "rmm.episode":
        best = d["best_reward"]
        print(f"episode {d['episode'] + 1:>4}  reward {d['raw_reward']:8.3f}  dar {d['dar_reward']:8.3f}  "
              f"best {best if best is None else f'{best:8.3f}'}  depth {d['depth']:>3}  "
              f"eval {d['eval_seconds']:.2f}s  evals {d['evaluations']}", flush=True)
    elif event.kind == "rmm.resumed":
        print(f"resumed at episode {d['episode']}", flush=True)
    elif event.kind == "rmm.loading":
        print(f"loading {len(d['models'])} models ...", flush=True)
    elif event.kind == "evo.generation":
        print(f"generation {d['generation'] + 1:>3}  best {d['best']:.4f}  mean {d['mean']:.4f}  "
              f"sigma {d['sigma']:.4f}  {d['eval_seconds']:.2f} s/eval  {d['evals_per_minute'] or 0:.1f} evals/min  "
              f"evals {d['evaluations']}", flush=True)
    elif event.kind == "evo.resumed":
        print(f"resumed after generation {d['generation']} ({d['evaluations']} evaluations)", flush=True)
    elif event.kind == "evo.loading":
        where = f"{d['workers']} Ray workers" if d["backend"] == "ray" else "this process"
        print(f"{d['genes']} genes; loading {len(d['models'])} models in {where} ...", flush=True)


def _cmd_rmm(args: argparse.Namespace) -> int:
    from mergecore.events import CancelToken
    from mergecore.search.config import load_config
    from mergecore.search.rmm.run import RMMConfig, run_rmm

    config, root = load_config(args.config, RMMConfig)
    _quiet_transformers()  # stderr keeps to our lines (an error is one line)
    if args.episodes:
        config.episodes = args.episodes
    _backend_overrides(config, args)
    cancel = CancelToken()
    try:
        summary = run_rmm(config, root, args.out_dir, on_event=None if args.quiet else _episode_line,
                          cancel=cancel, resume=not args.restart)
    except KeyboardInterrupt:
        cancel.cancel()
        raise Cancelled(f"search stopped; run the same command again to resume from {args.out_dir}") from None
    best = summary["best"]
    print(f"best reward {best['reward']:.3f} ({best['scored_on']}), {len(best['emitted'])} layers; "
          f"recipe: {args.out_dir}/recipe.yml")
    if args.merge:
        from mergecore.merging import merge
        from mergecore.recipe import load_recipe

        # the search owns OUT_DIR: a model it merged there before is replaced
        res = merge(load_recipe(f"{args.out_dir}/recipe.yml"), f"{args.out_dir}/model", overwrite=True)
        print(res.summary())
    return 0


def _backend_overrides(config, args: argparse.Namespace) -> None:
    if args.backend:
        config.backend = args.backend
    if args.workers:
        config.workers = args.workers
    if args.ray_address:
        config.ray_address = args.ray_address


def _cmd_evo(args: argparse.Namespace) -> int:
    from mergecore.events import CancelToken
    from mergecore.search.evo.run import load_evo_config, run_evo

    config, root = load_evo_config(args.config)
    _quiet_transformers()  # stderr keeps to our lines (an error is one line)
    if args.max_evals:
        config.max_evals = args.max_evals
    _backend_overrides(config, args)
    cancel = CancelToken()
    try:
        summary = run_evo(config, root, args.out_dir, on_event=None if args.quiet else _episode_line,
                          cancel=cancel, resume=not args.restart)
    except KeyboardInterrupt:
        cancel.cancel()
        raise Cancelled(f"search stopped; run the same command again to resume from {args.out_dir}") from None
    best = summary["best"]
    final = f"; {summary['final']['tasks']}: {summary['final']['mean']:.4f}" if "final" in summary else ""
    print(f"best score {best['score']:.4f} after {summary['evaluations']} evaluations ({summary['stop']}){final}; "
          f"recipe: {args.out_dir}/recipe.yml")
    if args.merge:
        from mergecore.merging import merge
        from mergecore.recipe import load_recipe

        # the search owns OUT_DIR: a model it merged there before is replaced
        res = merge(load_recipe(f"{args.out_dir}/recipe.yml"), f"{args.out_dir}/model", overwrite=True)
        print(res.summary())
    return 0


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["local", "ray"], default=None, help="override the config's backend")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (with --backend ray)")
    p.add_argument("--ray-address", default=None, help="connect to this Ray cluster instead of starting one")


def _dam_line(every: int):
    def show(event) -> None:
        d = event.data
        if event.kind == "dam.step":
            if d["step"] % every and d["step"] != d["steps"] and d["step"] != 1:
                return
            terms = "  ".join(f"{k} {v:.4g}" for k, v in d["terms"].items() if "/" not in k)
            print(f"step {d['step']:>5}/{d['steps']}  loss {d['loss']:.5g}  {terms}  lr {d['lr']:.3g}  "
                  f"examples {d['examples_seen']}" + (f"  tokens {d['tokens_seen']}" if d["tokens_seen"] else "")
                  + f"  {d['seconds']:.2f}s", flush=True)
        elif event.kind == "dam.eval":
            scores = "  ".join(f"{k} {v:.4f}" for k, v in d["scores"].items())
            label = "final eval" if d["final"] else "eval"
            print(f"{label} @ step {d['step']}: mean {d['mean']:.4f}  {scores}  ({d['seconds']:.1f}s)", flush=True)
        elif event.kind == "dam.resumed":
            print(f"resumed at step {d['step']}", flush=True)
        elif event.kind == "dam.loading":
            print(f"loading {len(d['models'])} models ...", flush=True)
        elif event.kind == "dam.teachers":
            extra = f", {d['bytes'] / 2**20:.1f} MiB cached" if d["mode"] == "cache" else ""
            print(f"teachers: {d['mode']}{extra} ({d['seconds']:.1f}s)", flush=True)
        elif event.kind == "dam.start":
            print(f"training {d['coefficients']} coefficients on {d['tensors']} tensors, "
                  f"steps {d['step']}..{d['steps']}", flush=True)

    return show


def _cmd_dam(args: argparse.Namespace) -> int:
    from mergecore.errors import MergeError
    from mergecore.events import CancelToken
    from mergecore.search.dam.run import load_dam_config, run_dam

    config, root = load_dam_config(args.config)
    _quiet_transformers()  # stderr keeps to our lines (an error is one line)
    if args.steps is not None:
        if args.steps < 1:
            raise MergeError("--steps must be at least 1")
        config.steps = args.steps
    set_torch_threads(args.threads)
    cancel = CancelToken()
    try:
        summary = run_dam(config, root, args.out_dir, on_event=None if args.quiet else _dam_line(args.log_every),
                          cancel=cancel, resume=not args.restart)
    except KeyboardInterrupt:
        cancel.cancel()
        raise Cancelled(f"search stopped; run the same command again to resume from {args.out_dir}") from None
    ev = summary.get("eval")
    print((f"final eval mean {ev['mean']:.4f}; " if ev else "")
          + f"{summary['steps']} steps in {summary['train_seconds']:.1f}s; recipe: {args.out_dir}/recipe.yml")
    if args.merge:
        from pathlib import Path

        from mergecore.merging import merge
        from mergecore.recipe import load_recipe

        out = Path(args.out_dir)
        res = merge(load_recipe(out / "recipe.yml"), out / "model", search_dirs=(out.resolve(),), overwrite=True)
        print(res.summary())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search for a merge (rmm, evo)")
    kinds = p.add_subparsers(dest="search_kind", required=True)
    r = kinds.add_parser("rmm", help="Reinforced Model Merging: PPO agent over layers")
    r.add_argument("config", help="search YAML")
    r.add_argument("out_dir", help="folder for recipe.yml, result.json, log and checkpoint")
    r.add_argument("--episodes", type=int, default=None, help="override the config's episode count")
    r.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in OUT_DIR")
    r.add_argument("--merge", action="store_true", help="also write the merged checkpoint to OUT_DIR/model")
    r.add_argument("--quiet", "-q", action="store_true")
    _add_backend_args(r)
    r.set_defaults(func=_cmd_rmm)
    d = kinds.add_parser("dam", help="Differentiable Adaptive Merging / layer-wise AdaMerging: train coefficients")
    d.add_argument("config", help="DAM search YAML")
    d.add_argument("out_dir", help="folder for recipe.yml, coefficients, result.json, log and checkpoint")
    d.add_argument("--steps", type=int, default=None, help="override the config's step count")
    d.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in OUT_DIR")
    d.add_argument("--merge", action="store_true", help="also write the merged checkpoint to OUT_DIR/model")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.add_argument("--log-every", type=int, default=10, help="print every N-th step (default 10)")
    d.add_argument("--quiet", "-q", action="store_true")
    d.set_defaults(func=_cmd_dam)
    e = kinds.add_parser("evo", help="evolutionary search (CMA-ES) over a recipe template's parameters")
    e.add_argument("config", help="search YAML")
    e.add_argument("out_dir", help="folder for recipe.yml, result.json, log and checkpoint")
    e.add_argument("--max-evals", type=int, default=None, help="override the config's evaluation budget")
    e.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in OUT_DIR")
    e.add_argument("--merge", action="store_true", help="also write the merged checkpoint to OUT_DIR/model")
    e.add_argument("--quiet", "-q", action="store_true")
    _add_backend_args(e)
    e.set_defaults(func=_cmd_evo)


if __name__ == "__main__":  # pragma: no cover
    from mergecore.cli import main

    sys.exit(main())
