"""DAM and layer-wise AdaMerging on an offline family, next to the data-free baselines.

    python bench/dam.py fmnist-vit [--steps 120] [--batch-size 32] [--examples 2000] [--ablation]
                                   [--baseline-csv PATH] [--threads 2] [--quick] [--work DIR]

Rows added to bench/quality.py's table (same tasks, split and scoring; each task with its own
expert's head on the merged body), through its `ROWS` mechanism:

| row                   | search config                                                              |
|-----------------------|----------------------------------------------------------------------------|
| DAM (KL)              | per-column coefficients, Σ_i W_i·diag(c_i), KL(model_i ‖ merged) at T = 2  |
| DAM (entropy)         | per-column coefficients, entropy of the merged outputs (no teachers)       |
| layer-wise AdaMerging | one λ per model and tensor, W0 + Σ λ_i (W_i − W0), init 0.3, clamp [0, 1], |
|                       | entropy (Yang et al. 2024)                                                 |

All rows train with AdamW (weight decay 0), the same steps, batch (per task) and data: each
expert's own task inputs from the family's *training* split (labels never used; never the test
split the table scores), a seeded sample of `--examples` per task. Embeddings, norms, position
embeddings and the heads stay the base's. Each search runs as its own process
(`mergecore search dam`), so its peak RSS is measured alone; `train_s` is the optimisation time,
`search_s` the whole search (loading, teacher outputs, training, its own evaluations), `merge_s`
that plus replaying the recipe through the engine (`mergecore merge`), whose checkpoint is what
the table scores.

`--ablation` adds the loss ablation (the shape of the DAM paper's Table 3): KL, KL + cosine
(λ_cos = 0.01), KL + cosine + L1/L2 (λ1 = λ2 = 1e-6), entropy, MSE on logits.

Tables are printed and saved as CSV next to the family (`dam-<split>.csv`,
`dam-ablation-<split>.csv`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _proc import run_measured  # noqa: E402
from mergecore.errors import MergeError  # noqa: E402
from mergecore.threads import check_threads  # noqa: E402


def _quality():
    if "bench_quality" in sys.modules:
        return sys.modules["bench_quality"]
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


MAIN_ROWS: dict[str, dict[str, Any]] = {
    "DAM (KL)": {"granularity": "column", "loss": {"kind": "kl"}},
    "DAM (entropy)": {"granularity": "column", "loss": {"kind": "entropy"}},
    "layer-wise AdaMerging": {"granularity": "layer", "form": "task_vectors", "loss": {"kind": "entropy"},
                              "optimizer": {"clamp": [0.0, 1.0]}},
}
ABLATION_ROWS: dict[str, dict[str, Any]] = {
    "KL": {"loss": {"kind": "kl"}},
    "KL + cosine": {"loss": {"kind": "kl", "lambda_cos": 0.01}},
    "KL + cosine + L1/L2": {"loss": {"kind": "kl", "lambda_cos": 0.01, "lambda_l1": 1e-6, "lambda_l2": 1e-6}},
    "entropy": {"loss": {"kind": "entropy"}},
    "MSE": {"loss": {"kind": "mse"}},
}
SAME_RUN = {"KL": "DAM (KL)", "entropy": "DAM (entropy)"}  # ablation rows that are main rows


def train_tasks(fam) -> tuple[list[dict[str, Any]] | str, str]:
    """Each expert's task on the family's training split (a tasks-train.yml if the family ships
    one; for fmnist-vit the training rows the experts were fine-tuned on; for a text family its
    data/<expert>-train.jsonl), else the val split."""
    own = fam.root / "tasks-train.yml"
    if own.is_file():
        return str(own), "tasks-train.yml"
    if fam.name == "fmnist-vit":
        tasks = yaml.safe_load(fam.val_tasks_file.read_text())["tasks"]
        out = []
        for t in tasks:
            t = dict(t)
            data = dict(t["data"])
            if "range" in data:  # Fashion-MNIST: rows [0, 50000) of the train file are the training split
                data["range"] = [0, 50000]
                data.pop("max_examples", None)
            else:  # digits: the saved training split
                data["images"] = str(fam.root / "data" / "digits-train-images.npy")
                data["labels"] = str(fam.root / "data" / "digits-train-labels.npy")
            for k in ("images", "labels", "path"):
                if k in data and not Path(data[k]).is_absolute():
                    data[k] = str(fam.root / data[k])
            t["data"] = data
            if t.get("head_from") and not Path(t["head_from"]).is_absolute():
                t["head_from"] = str(fam.root / t["head_from"])
            t.pop("description", None)
            out.append(t)
        return out, "training split (Fashion-MNIST train rows 0-50000, digits train)"
    texts = {name: fam.root / "data" / f"{name}-train.jsonl" for name in fam.experts}
    if all(f.is_file() for f in texts.values()):  # LM families (smollm2-domains): each expert's training text
        return ([{"name": name, "kind": "lm", "data": {"path": str(f)}, "text_field": "text", "max_length": 256}
                 for name, f in texts.items()], "training split (data/<expert>-train.jsonl, 256-token chunks)")
    return str(fam.val_tasks_file), "validation split (the family has no training-split task file)"


def search_config(fam, variant: dict[str, Any], *, steps: int, batch_size: int, examples: int, lr: float,
                  seed: int) -> dict[str, Any]:
    tasks, _ = train_tasks(fam)
    cfg: dict[str, Any] = {
        "base_model": str(fam.base),
        "models": [str(p) for p in fam.experts.values()],
        "train_tasks": tasks,
        "eval_tasks": str(fam.val_tasks_file),
        "eval_subset": 0.1,
        "eval_every": max(1, steps // 3),
        "checkpoint_every": max(1, steps // 3),
        "steps": steps,
        "batch_size": batch_size,
        "examples_per_task": examples,
        "seed": seed,
        "optimizer": {"lr": lr, "weight_decay": 0.0},
    }
    for k, v in variant.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    return cfg


def run_search(cfg: dict[str, Any], out: Path, threads: int, log) -> dict[str, Any]:
    """`mergecore search dam` in its own process; returns result.json plus the process's peak RSS."""
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "mergecore.cli", "search", "dam", str(path), str(out), "--threads", str(threads),
           "--log-every", "20"]
    log_file = out.parent / f"{out.name}.log"
    m = run_measured(cmd, cwd=ROOT, log=log_file,
                     env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"})
    wall = m.wall_s
    if m.returncode != 0:
        tail = log_file.read_text().strip().splitlines()[-3:]
        raise MergeError(f"DAM search failed ({out.name}): {' | '.join(tail)}")
    result = json.loads((out / "result.json").read_text())
    result["process_peak_rss_bytes"] = int(m.peak_rss_gib * 1024**3)
    result["process_seconds"] = wall
    log(f"    {out.name}: {result['steps']} steps, train {result['train_seconds']:.0f} s, search {wall:.0f} s, "
        f"peak RSS {m.peak_rss_gib * 1024:.0f} MiB, validation mean {result['eval']['mean']:.4f}")
    return result


def run(family_name: str, *, quick: bool = False, steps: int = 120, batch_size: int = 32, examples: int = 2000,
        lr: float = 2e-3, seed: int = 0, ablation: bool = False, baseline_csv: Optional[Path] = None,
        threads: int = 2, split: str = "test", root: Optional[Path] = None, work: Optional[Path] = None,
        batch_eval: int = 256, rows: Optional[list[str]] = None, methods: Optional[list[str]] = None, log=print):
    """Returns (main table, ablation table or None, notes)."""
    import pandas as pd

    from mergecore.merging import merge
    from mergecore.families import build_family

    quality = _quality()
    fam = build_family(family_name, root=root, quick=quick)
    _, data_note = train_tasks(fam)
    notes = [f"DAM training data: {data_note}; {examples} examples per task, batch {batch_size} per task, "
             f"{steps} steps, AdamW lr {lr} (weight decay 0), seed {seed}"]
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="mergecore-dam-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict[str, Any]] = {}

    variants: dict[str, dict[str, Any]] = {k: v for k, v in MAIN_ROWS.items() if rows is None or k in rows}
    if ablation:
        for label, v in ABLATION_ROWS.items():
            if label not in SAME_RUN:
                variants[f"ablation: {label}"] = v

    def make_row(label: str, variant: dict[str, Any]):
        slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")

        def make(family, wd: Path):
            log(f"  training {label} ...")
            cfg = search_config(family, variant, steps=steps, batch_size=batch_size, examples=examples, lr=lr,
                                seed=seed)
            out = wd / f"dam-{slug}"
            if out.exists():
                shutil.rmtree(out)
            result = run_search(cfg, out, threads, log)
            t = time.time()
            merged = wd / f"merged-{slug}"
            if merged.exists():
                shutil.rmtree(merged)
            merge(out / "recipe.yml", merged, threads=threads)
            stats[label] = {"train_s": round(result["train_seconds"], 1),
                            "search_s": round(result["process_seconds"], 1),
                            "replay_s": round(time.time() - t, 2),
                            "peak_rss_mib": round(result["process_peak_rss_bytes"] / 2**20),
                            "coefficients": result["coefficients"]}
            return merged

        desc = json.dumps(variant, separators=(",", ":"))
        return quality.Row(label, make, describe=desc)

    saved_rows = list(quality.ROWS)
    quality.ROWS[:] = [make_row(label, v) for label, v in variants.items()]
    try:
        methods = [] if baseline_csv else methods
        df, qnotes = quality.run(family_name, quick=quick, split=split, seed=seed, batch_size=batch_eval,
                                 methods=methods, threads=threads, root=root, work=work_dir, log=log)
    finally:
        quality.ROWS[:] = saved_rows
    notes += qnotes
    if baseline_csv:
        base = pd.read_csv(baseline_csv).set_index("row")
        keep = [r for r in base.index if r not in df.index]
        df = pd.concat([df.iloc[:2], base.loc[keep], df.iloc[2:]])
        notes.append(f"data-free rows read from {baseline_csv}")
    for col in ("train_s", "search_s", "peak_rss_mib", "coefficients"):
        df[col] = [stats.get(r, {}).get(col, float("nan")) for r in df.index]

    task_cols = [c for c in df.columns if c not in ("mean", "merge_s", "eval_s", "wall_s", "how", "train_s",
                                                     "search_s", "peak_rss_mib", "coefficients")]
    data_free = [r for r in df.index if r not in stats and r not in ("pretrained", "individual")]
    if data_free:
        best = max(data_free, key=lambda r: df.loc[r, "mean"])
        for r in MAIN_ROWS:
            if r in df.index:
                verdict = "beats" if df.loc[r, "mean"] > df.loc[best, "mean"] else "does not beat"
                notes.append(f"{r} (mean {df.loc[r, 'mean']:.4f}) {verdict} the best data-free row, {best} "
                             f"(mean {df.loc[best, 'mean']:.4f})")

    abl = None
    if ablation:
        rows = []
        for label in ABLATION_ROWS:
            key = SAME_RUN.get(label, f"ablation: {label}")
            if key in df.index:
                rows.append({"loss": label, **{c: df.loc[key, c] for c in task_cols + ["mean", "train_s",
                                                                                   "peak_rss_mib"]}})
        abl = pd.DataFrame(rows).set_index("loss")
        df = df.drop(index=[r for r in df.index if str(r).startswith("ablation: ")])
    if work is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return df, abl, notes


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", help="family name, e.g. fmnist-vit")
    p.add_argument("--quick", action="store_true", help="use (and build if needed) the quick version of the family")
    p.add_argument("--split", default="test", choices=["test", "val"], help="task split the table scores")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32, help="examples per task per step")
    p.add_argument("--examples", type=int, default=2000, help="training examples per task")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation", action="store_true", help="also run the loss ablation (KL, +cos, +reg, entropy, MSE)")
    p.add_argument("--baseline-csv", default=None, help="reuse the data-free rows of a bench/quality.py CSV")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    p.add_argument("--root", default=None, help="families folder (default <cache>/families)")
    p.add_argument("--work", default=None, help="keep search outputs here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="CSV path (default <family folder>/dam-<split>.csv)")
    args = p.parse_args(argv)
    args.threads = check_threads(args.threads)

    from mergecore.families import family_dir

    root = Path(args.root) if args.root else None
    df, abl, notes = run(args.family, quick=args.quick, steps=args.steps, batch_size=args.batch_size,
                         examples=args.examples, lr=args.lr, seed=args.seed, ablation=args.ablation,
                         baseline_csv=Path(args.baseline_csv) if args.baseline_csv else None,
                         threads=args.threads, split=args.split, root=root,
                         work=Path(args.work) if args.work else None)
    out = Path(args.out) if args.out else family_dir(args.family, root, args.quick) / f"dam-{args.split}.csv"
    quality = _quality()
    quality.print_table(df, out)
    if abl is not None:
        abl_out = out.with_name(out.name.replace("dam-", "dam-ablation-"))
        quality.print_table(abl, abl_out, "loss ablation:")
        print(f"saved {abl_out}")
    quality.print_footer(df, notes, out, width=22)
    return 0

if __name__ == "__main__":
    from mergecore.cli import run_script

    sys.exit(run_script(main, "bench/dam.py"))
