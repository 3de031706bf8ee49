"""RMM benchmark on an offline family: search quality (paper's Table I/IV shape) and speed.

    python bench/rmm.py [--family fmnist-vit] [--episodes 300] [--ratios 0.1,0.01] [--speed-episodes 60]
                        [--threads N] [--big-cache-gib G] [--skip-quality] [--skip-speed]

Quality: for each data_ratio and DAR on/off, an RMM search on the family's *val* split; the
best trajectory's recipe is replayed by the engine into a checkpoint and that checkpoint is
scored on the full *test* split, next to the data-free rows of bench/quality.py (same split,
same heads). Speed: the same seeded episodes timed five ways in one run -- a naive version that
rebuilds the model's weights every episode; the layer bank with module reuse; + the prefix
cache; + reward memoisation (without and with the cache) -- and episodes per second with the
ratio to naive, the time split (building candidates / scoring / the rest: sampling, PPO) and
Amdahl's bound for making builds free. `--speed-episodes 700` times a whole default-length
search, where a concentrating policy repeats (trajectory, subset) pairs that the memo skips;
`--big-cache-gib 8` adds a row with a larger prefix cache. The run ends with the exact-reuse
ceiling: the most any cache of exact results could gain on these episodes (`reuse_ceiling`).
Tables are printed and saved as CSV in the family folder (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergecore.eval import Evaluator, load_model  # noqa: E402
from mergecore.merging import merge  # noqa: E402
from mergecore.families import get_family  # noqa: E402
from mergecore.search.rmm.layers import LayerBank, Operator, layer_stack  # noqa: E402
from mergecore.search.rmm.ppo import PPOConfig  # noqa: E402
from mergecore.search.rmm.search import RMMSearch, RMMSettings, rerank_on_full, trajectory_recipe  # noqa: E402
from mergecore.threads import set_torch_threads  # noqa: E402

OPERATORS = [
    Operator("avg", "linear", {"weight": 1.0}),
    Operator("ta", "task_arithmetic", {"weight": 1.0, "lambda": 0.3}),
    Operator("ties", "ties", {"weight": 1.0, "density": 0.5}),
    Operator("dare", "dare_linear", {"weight": 1.0, "density": 0.5, "lambda": 0.3}),
]


class NaiveAssembler:
    """The baseline: every episode builds a fresh model and recomputes every layer's weights."""

    def __init__(self, base: nn.Module, bank: LayerBank):
        self.base = base
        self.bank = bank

    def build(self, emitted):
        model = copy.deepcopy(self.base)
        path, stack = layer_stack(model)
        mods = []
        for layer, action in emitted:
            mod = copy.deepcopy(layer_stack(self.base)[1][layer])
            if action < self.bank.n_models:
                mod.load_state_dict(self.bank.stacks[action][layer].state_dict())
            else:
                mod.load_state_dict(self.bank.merged_state(layer, action - self.bank.n_models))
            mods.append(mod)
        owner, _, attr = path.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, nn.ModuleList(mods))
        for key in ("num_hidden_layers",):
            setattr(model.config, key, len(mods))
        return model


def make_scorer(evaluator: Evaluator, scale: float = 100.0):
    class Scorer:
        n_subsets = evaluator.num_subsets()

        def __call__(self, model, subset):
            res = evaluator.evaluate(model, subset_index=subset)
            return scale * res.mean, res.scores

    return Scorer()


def load_models(fam):
    base = load_model(fam.base)
    experts = {name: load_model(path) for name, path in fam.experts.items()}
    return base, experts


def quality_rows(fam, base, experts, args) -> list[dict]:
    rows = []
    test = fam.evaluator("test", batch_size=256)
    names = list(experts)
    for ratio in sorted((float(r) for r in args.ratios.split(",")), key=lambda r: r):
        for dar in (True, False):
            val = fam.evaluator("val", subset=ratio, seed=args.seed, batch_size=256)
            settings = RMMSettings(episodes=args.episodes, update_every=4, dar=dar, seed=args.seed, ppo=PPOConfig())
            search = RMMSearch(base, list(experts.values()), OPERATORS, make_scorer(val), settings,
                               model_names=names)
            t0 = time.time()
            search.run()
            full_val = fam.evaluator("val", batch_size=256)
            best = rerank_on_full(search, lambda m: (100 * (r := full_val.evaluate(m)).mean, r.scores))
            seconds = time.time() - t0
            recipe = trajectory_recipe(best.emitted, str(fam.base), [str(p) for p in fam.experts.values()],
                                       OPERATORS, seed=args.seed)
            with tempfile.TemporaryDirectory() as tmp:
                out = merge(recipe, Path(tmp) / "rmm").out_dir
                res = test.evaluate(out)
            row = {"row": f"RMM (ratio {ratio:g}, DAR {'on' if dar else 'off'})", **res.scores, "mean": res.mean,
                   "search s": seconds, "evaluations": search.evaluations, "depth": len(best.emitted),
                   "trajectory": " ".join(f"{l}:{search.walk.action_name(a, names, [o.name for o in OPERATORS])}"
                                          for l, a in best.emitted)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def speed_rows(fam, base, experts, args) -> list[dict]:
    val = fam.evaluator("val", subset=0.1, seed=args.seed, batch_size=256)
    rows = []
    gib = 2 ** 30
    default_cache = RMMSettings().cache_bytes
    variants = [("naive: rebuild weights every episode", "naive", False, False, default_cache),
                ("bank + module reuse", "bank", False, False, default_cache),
                ("bank + prefix cache", "bank", True, False, default_cache),
                ("bank + reward memo", "bank", False, True, default_cache),
                ("bank + prefix cache + reward memo", "bank", True, True, default_cache)]
    if args.big_cache_gib:
        variants.append((f"bank + {args.big_cache_gib:g} GiB prefix cache + reward memo", "bank", True, True,
                         int(args.big_cache_gib * gib)))
    trajectories = None
    memo_keys = None
    for label, kind, cache, memo, cache_bytes in variants:
        settings = RMMSettings(episodes=args.speed_episodes, update_every=4, seed=args.seed, prefix_cache=cache,
                               memoize=memo, cache_bytes=cache_bytes, ppo=PPOConfig())
        search = RMMSearch(base, list(experts.values()), OPERATORS, make_scorer(val), settings)
        if kind == "naive":
            search.assembler = NaiveAssembler(base, search.bank)
        t0 = time.time()
        search.run()
        dt = time.time() - t0
        traj = [h["actions"] for h in search.history]
        if trajectories is None:
            trajectories = traj
        same = traj == trajectories
        rows.append({"variant": label, "episodes": args.speed_episodes, "seconds": dt,
                     "episodes/s": args.speed_episodes / dt, "evaluations": search.evaluations,
                     "build s": search.build_seconds, "score s": search.eval_seconds - search.build_seconds,
                     "other s": dt - search.eval_seconds,
                     "cache hits": search.cache.hits if search.cache else 0,
                     "same trajectories": same})
        print(json.dumps(rows[-1]), flush=True)
        if memo and not cache:
            memo_keys = list(search.memo)
    naive = rows[0]["episodes/s"]
    for r in rows:
        r["speed-up"] = r["episodes/s"] / naive
    # Amdahl's bound for anything that only makes building candidates free: the naive run
    # without its build time
    r0 = rows[0]
    print(f"naive run: {r0['build s']:.1f} s building candidates of {r0['seconds']:.1f} s; making builds free "
          f"bounds the speed-up at {r0['seconds'] / (r0['seconds'] - r0['build s']):.2f}x", flush=True)
    if memo_keys:
        memo_row = next(r for r in rows if r["variant"] == "bank + reward memo")
        print(reuse_ceiling(memo_keys, r0["seconds"], memo_row["score s"], memo_row["other s"]), flush=True)
    return rows


def reuse_ceiling(keys, naive_s: float, score_s: float, other_s: float) -> str:
    """How far any exact reuse can go on this run: the memo leaves one evaluation per distinct
    (trajectory, subset); of the layer applications those need, a prefix cache can only skip the
    ones whose (emitted prefix, subset) came before. Crediting the cache with shrinking *all*
    scoring time in that proportion (embeddings, heads, metrics too) and builds as free gives an
    upper bound on the speed-up of bank + prefix cache + memo over naive."""
    applied = sum(len(emitted) for emitted, _ in keys)
    distinct = len({(emitted[:d], subset) for emitted, subset in keys for d in range(1, len(emitted) + 1)})
    best = other_s + score_s * distinct / applied
    return (f"exact-reuse ceiling: the memo's {len(keys)} evaluations apply {applied} layers (per batch); "
            f"{distinct} are distinct (prefix, subset) pairs, so a perfect prefix cache skips at most "
            f"{1 - distinct / applied:.0%} of them; with all scoring shrinking that much and free builds, "
            f"a run takes at least {best:.1f} s: at most {naive_s / best:.2f}x over naive")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="fmnist-vit")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--ratios", default="0.1,0.01")
    ap.add_argument("--speed-episodes", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--big-cache-gib", type=float, default=0,
                    help="also time the cache + memo variant with this prefix-cache budget (GiB; default 1 GiB only)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    args = ap.parse_args()
    if args.big_cache_gib < 0:
        ap.error("--big-cache-gib must be 0 (off) or a positive size in GiB")

    import pandas as pd

    torch.manual_seed(args.seed)
    set_torch_threads(args.threads)
    fam = get_family(args.family)
    base, experts = load_models(fam)
    out = args.out or fam.root
    if not args.skip_quality:
        rows = quality_rows(fam, base, experts, args)
        baseline = out / "quality-test.csv"
        table = pd.DataFrame(rows).set_index("row")
        if baseline.is_file():
            base_table = pd.read_csv(baseline, index_col=0)
            table = pd.concat([base_table, table])
        print(f"\nRMM quality on {args.family} (test split; searched on val; {args.episodes} episodes)")
        print(table.to_string(float_format=lambda v: f"{v:.3f}", na_rep=""))
        table.to_csv(out / "rmm-quality.csv")
    if not args.skip_speed:
        speed = pd.DataFrame(speed_rows(fam, base, experts, args)).set_index("variant")
        print("\nRMM speed (episodes per second, one run, same seeded episodes)")
        print(speed.to_string(float_format=lambda v: f"{v:.3f}"))
        speed.to_csv(out / "rmm-speed.csv")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    from mergecore.cli import run_script

    sys.exit(run_script(main, "bench/rmm.py"))
