"""Evolutionary (CMA-ES) merge search on an offline family: speed (local vs Ray) and quality.

    python bench/evo.py [--family fmnist-vit] [--max-evals 100] [--speed-evals 24] [--workers 2]

Speed: the same seeded search (popsize 8, the val split at data ratio 0.1) run with the local
backend (one process; torch with its default threads, then with one thread) and with the Ray
backend (`--workers` actors, one core each, models loaded once per actor); evaluations per
minute over the search loop, worker start-up timed apart, and whether all gave identical scores.

Quality: searches on the family's *val* split (data ratio 0.1, a fixed subset, `--max-evals`
evaluations, sigma0 = 1/6 as in mergekit-evolve); the best recipe is replayed by the engine into
a checkpoint and scored on the full *test* split, next to the rows of bench/quality.py (same
split, same heads; its CSV is read from the family folder, or made first). Templates:

  | row                      | method          | genes                                                    |
  |--------------------------|-----------------|----------------------------------------------------------|
  | evo: task arithmetic     | task_arithmetic | weight per model per layer (4 x 4), in [0, 1], start 0.3 |
  | evo: TIES                | ties            | weight in [0, 1] and density in [0.1, 1] per model, two  |
  |                          |                 | layer groups; normalize, lambda 1                        |

The task-arithmetic search starts at the baseline task-arithmetic row (weight 1 x lambda 0.3).
Tables are printed and saved as CSV in the family folder (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergecore.merging import merge  # noqa: E402
from mergecore.families import get_family  # noqa: E402
from mergecore.search.evo.run import EvoConfig, run_evo  # noqa: E402


def templates(fam) -> dict[str, dict]:
    models = [str(p) for p in fam.experts.values()]
    common = {"base_model": str(fam.base), "models": models, "tasks": str(fam.val_tasks_file), "data_ratio": 0.1,
              "batch_size": 256}
    return {
        "evo: task arithmetic": {**common, "method": "task_arithmetic", "layer_groups": 4,
                                 "parameters": {"weight": {"min": 0.0, "max": 1.0, "init": 0.3}},
                                 "fixed": {"lambda": 1.0}},
        "evo: TIES": {**common, "method": "ties", "layer_groups": 2,
                      "parameters": {"weight": {"min": 0.0, "max": 1.0}, "density": {"min": 0.1, "max": 1.0}},
                      "fixed": {"normalize": True, "lambda": 1.0}},
    }


def speed_rows(fam, args) -> list[dict]:
    cfg = {**templates(fam)["evo: TIES"], "popsize": 8, "max_evals": args.speed_evals, "seed": args.seed}
    rows = []
    logs = {}
    import torch

    threads = torch.get_num_threads()
    variants = ((f"local (1 process, torch {threads} threads)", "local", 1, threads),
                ("local (1 process, torch 1 thread)", "local", 1, 1),
                (f"ray ({args.workers} workers, 1 core each)", "ray", args.workers, threads))
    for label, backend, workers, n_threads in variants:
        config = EvoConfig.model_validate({**cfg, "backend": backend, "workers": workers})
        torch.set_num_threads(n_threads)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                res = run_evo(config, ROOT, tmp)
                wall = time.time() - t0
                logs[label] = [json.loads(line)["scores"]
                               for line in (Path(tmp) / "evo_log.jsonl").read_text().splitlines()]
        finally:
            torch.set_num_threads(threads)
        rows.append({"backend": label, "evaluations": res["evaluations"], "search_s": round(res["seconds"], 1),
                     "evals/min": round(60 * res["evaluations"] / res["seconds"], 1),
                     "s/eval (one worker)": round(res["eval_seconds"] / res["evaluations"], 3),
                     "start_s": res["backend"]["start_seconds"], "wall_s": round(wall, 1),
                     "best (validation)": round(res["best"]["score"], 4)})
        print(json.dumps(rows[-1]), flush=True)
    first = logs[variants[0][0]]
    for r, (label, *_rest) in zip(rows, variants):
        r["same scores as first row"] = logs[label] == first
        r["speed-up"] = round(r["evals/min"] / rows[0]["evals/min"], 2)
    return rows


def quality_rows(fam, args) -> list[dict]:
    test = fam.evaluator("test", batch_size=256)
    rows = []
    for label, tmpl in templates(fam).items():
        config = EvoConfig.model_validate({**tmpl, "max_evals": args.max_evals, "seed": args.seed,
                                           "backend": args.backend, "workers": args.workers})
        with tempfile.TemporaryDirectory() as tmp:
            res = run_evo(config, ROOT, Path(tmp) / "search")
            t0 = time.time()
            out = merge(Path(tmp) / "search" / "recipe.yml", Path(tmp) / "model").out_dir
            merge_s = time.time() - t0
            t0 = time.time()
            r = test.evaluate(out)
            eval_s = time.time() - t0
            recipe_text = (Path(tmp) / "search" / "recipe.yml").read_text()
        how = (f"{tmpl['method']}, {res['genes']} genes, popsize {res['popsize']}, {res['evaluations']} evals on val "
               f"(ratio 0.1): validation best {res['best']['score']:.4f}; {config.backend}")
        rows.append({"row": label, **r.scores, "mean": r.mean, "merge_s": round(res["seconds"] + merge_s, 2),
                     "eval_s": round(eval_s, 2), "wall_s": round(res["seconds"] + merge_s + eval_s, 2), "how": how})
        print(json.dumps(rows[-1]), flush=True)
        (Path(args.out or fam.root) / f"evo-best-{tmpl['method']}.yml").write_text(recipe_text)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="fmnist-vit")
    ap.add_argument("--max-evals", type=int, default=100)
    ap.add_argument("--speed-evals", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="ray", choices=["local", "ray"], help="backend of the quality searches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    args = ap.parse_args()

    import pandas as pd

    fam = get_family(args.family)
    out = args.out or fam.root
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    if not args.skip_speed:
        speed = pd.DataFrame(speed_rows(fam, args)).set_index("backend")
        print(f"\nEvaluations per minute on {args.family} (evo search, popsize 8, val ratio 0.1, "
              f"load average now {os.getloadavg()[0]:.2f})")
        with pd.option_context("display.width", 250, "display.max_columns", 50):
            print(speed.to_string())
        speed.to_csv(out / "evo-speed.csv")
    if not args.skip_quality:
        baseline = fam.root / "quality-test.csv"
        if not baseline.is_file():
            import importlib.util

            spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
            quality = importlib.util.module_from_spec(spec)
            sys.modules["bench_quality"] = quality
            spec.loader.exec_module(quality)
            df, _ = quality.run(args.family)
            df.to_csv(baseline)
        table = pd.concat([pd.read_csv(baseline, index_col=0), pd.DataFrame(quality_rows(fam, args)).set_index("row")])
        print(f"\nQuality on {args.family} (test split; evo searched on val, budget {args.max_evals} evaluations "
              f"in whole generations)")
        with pd.option_context("display.width", 250, "display.max_columns", 50):
            print(table.drop(columns=["how"]).to_string(float_format=lambda v: f"{v:.4f}", na_rep=""))
        for label, how in table["how"].items():
            print(f"  {label:<22} {how}")
        table.to_csv(out / "evo-quality.csv")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    from mergecore.cli import run_script

    sys.exit(run_script(main, "bench/evo.py"))
