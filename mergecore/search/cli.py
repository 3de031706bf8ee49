"""`mergecore search rmm|... CONFIG.yml OUT_DIR`: run a search from the command line."""

from __future__ import annotations

import argparse
import sys

from mergecore.errors import Cancelled


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


def _cmd_rmm(args: argparse.Namespace) -> int:
    from mergecore.events import CancelToken
    from mergecore.search.rmm.run import RMMConfig, load_config, run_rmm

    config, root = load_config(args.config, RMMConfig)
    if args.episodes:
        config.episodes = args.episodes
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
        from mergecore.executor import merge
        from mergecore.recipe import load_recipe

        res = merge(load_recipe(f"{args.out_dir}/recipe.yml"), f"{args.out_dir}/model")
        print(res.summary())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search for a merge (rmm)")
    kinds = p.add_subparsers(dest="search_kind", required=True)
    r = kinds.add_parser("rmm", help="Reinforced Model Merging: PPO agent over layers")
    r.add_argument("config", help="search YAML")
    r.add_argument("out_dir", help="folder for recipe.yml, result.json, log and checkpoint")
    r.add_argument("--episodes", type=int, default=None, help="override the config's episode count")
    r.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in OUT_DIR")
    r.add_argument("--merge", action="store_true", help="also write the merged checkpoint to OUT_DIR/model")
    r.add_argument("--quiet", "-q", action="store_true")
    r.set_defaults(func=_cmd_rmm)


if __name__ == "__main__":  # pragma: no cover
    from mergecore.cli import main

    sys.exit(main())
