"""Merge quality on an offline family: the shape of the RMM paper's Table I.

    python bench/quality.py fmnist-vit [--quick] [--out quality.csv] [--subset 0.1] [--split test]
    python bench/quality.py smollm2-domains
    python bench/quality.py minilm-textclass --threads 1

Builds the family if needed (cached), then scores, on every task of the family (each task with
its own expert's classifier head on the evaluated body, as in the RMM paper):

- **pretrained**: the base body (never fine-tuned on a task: fmnist-vit's rotation-pretrained
  ViT, minilm-textclass's all-MiniLM-L6-v2) with the task heads (for a family without heads,
  e.g. `smollm2-domains`, simply the base model);
- **individual**: each fine-tuned expert on its own task(s) only (the upper reference; an expert's
  tasks are `experts.<name>.tasks` in family.json, by default the task named like the expert);
- the data-free merges of the experts, run by `mergecore.merge` with the
  hyper-parameters mergekit users reach for by default:

  | row              | method          | parameters                                               |
  |------------------|-----------------|----------------------------------------------------------|
  | weight averaging | linear          | weight 1.0 each, normalize (a model soup of the experts) |
  | task arithmetic  | task_arithmetic | weight 1.0 each, lambda 0.3                              |
  | TIES             | ties            | density 0.5, weight 1.0, normalize, lambda 1.0           |
  | DARE-TIES        | dare_ties       | density 0.5, weight 1.0, normalize, lambda 1.0, seed 0   |
  | DARE-linear      | dare_linear     | density 0.5, weight 1.0, lambda 0.3, seed 0              |

  Why these: mergekit's own defaults are lambda 1.0 and (for TIES) normalize true; density 0.5
  is the value of mergekit's README examples and of most published TIES/DARE recipes. Plain
  task arithmetic with lambda 1.0 adds all four task vectors at full strength, which nobody
  uses beyond two models; lambda 0.3 is the scaling the task-arithmetic paper settles on for
  many tasks (and FusionBench's default). DARE-TIES keeps TIES's settings with random
  drop-and-rescale instead of magnitude trimming; DARE-linear is DARE in front of task
  arithmetic, with task arithmetic's lambda.

After them, one row per method past mergekit at its own defaults (the paper's): TSV-M, Iso-C,
Iso-CTS, CART, Consensus TA, MagMax, PCB, WUDI (data-free) and Fisher, RegMean, RegMean++
(data-informed: their statistics are collected once per kind over the family's validation tasks,
`tasks-val.yml`, 256 examples per expert; the test split is only scored). `--methods tsv_m,regmean`
runs a subset.

Rows are printed as a table (tasks, mean, merge / eval / wall seconds per row) and saved as CSV.
Later rows (RMM, DAM, evolutionary search) append to `ROWS` a function returning a model or a
checkpoint folder (see `Row`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergecore.threads import check_threads  # noqa: E402


@dataclass
class MergeRow:
    """A data-free merge of all experts onto the base."""

    label: str
    method: str
    per_model: dict[str, Any]
    global_params: dict[str, Any] = field(default_factory=dict)
    with_base: bool = True  # base_model in the recipe (task-vector methods)
    seed: Optional[int] = None
    tune: Optional[str] = None  # a global parameter chosen on validation from the method's own `grid`

    def describe(self) -> str:
        params = {**self.per_model, **self.global_params}
        if self.seed is not None:
            params["seed"] = self.seed
        return f"{self.method}(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"

    def recipe(self, base: Path, experts: list[Path], artifacts: Optional[dict[str, str]] = None):
        from mergecore.recipe import recipe_from_dict

        data: dict[str, Any] = {
            "merge_method": self.method,
            "models": [{"model": str(p), "parameters": dict(self.per_model)} if self.per_model else {"model": str(p)}
                       for p in experts],
            "dtype": "float32",
        }
        if artifacts:
            data["artifacts"] = dict(artifacts)
        if self.with_base:
            data["base_model"] = str(base)
        if self.global_params:
            data["parameters"] = dict(self.global_params)
        if self.seed is not None:
            data["seed"] = self.seed
        return recipe_from_dict(data, where=self.label)


MERGE_ROWS: list[MergeRow] = [
    MergeRow("weight averaging", "linear", {"weight": 1.0}, {"normalize": True}, with_base=False),
    MergeRow("task arithmetic", "task_arithmetic", {"weight": 1.0}, {"lambda": 0.3}),
    MergeRow("TIES", "ties", {"weight": 1.0, "density": 0.5}, {"normalize": True, "lambda": 1.0}),
    MergeRow("DARE-TIES", "dare_ties", {"weight": 1.0, "density": 0.5}, {"normalize": True, "lambda": 1.0}, seed=0),
    MergeRow("DARE-linear", "dare_linear", {"weight": 1.0, "density": 0.5}, {"lambda": 0.3}, seed=0),
    # methods past mergekit, each at its paper's defaults (the method's own parameter defaults)
    MergeRow("TSV-M", "tsv_m", {}),
    MergeRow("Iso-C", "iso_c", {}),
    MergeRow("Iso-CTS", "iso_cts", {}),
    MergeRow("CART", "cart", {}),
    MergeRow("Consensus TA", "consensus_ta", {}),
    MergeRow("MagMax", "magmax", {}),
    MergeRow("PCB", "pcb", {}),
    MergeRow("WUDI", "wudi", {}),
    # data-informed: statistics collected on the validation split (the tasks-val.yml file), never test
    MergeRow("Fisher", "fisher", {}),
    MergeRow("RegMean", "regmean", {}),
    MergeRow("RegMean++", "regmean_plusplus", {}),
    # the scale of the strongest data-free methods chosen on the validation split (as their papers
    # choose it), from a small grid; the test split is scored once, with the chosen value
    MergeRow("TSV-M (α on val)", "tsv_m", {}, tune="alpha"),
    MergeRow("Iso-C (α on val)", "iso_c", {}, tune="alpha"),
    MergeRow("Iso-CTS (α on val)", "iso_cts", {}, tune="alpha"),
    MergeRow("CART (λ on val)", "cart", {}, tune="lambda"),
    MergeRow("Consensus TA (λ on val)", "consensus_ta", {}, tune="lambda"),
    MergeRow("MagMax (λ on val)", "magmax", {}, tune="lambda"),
    MergeRow("PCB (λ on val)", "pcb", {}, tune="lambda"),
    MergeRow("WUDI (λ on val)", "wudi", {}, tune="lambda"),
    MergeRow("RegMean (α on val)", "regmean", {}, tune="reduce_non_diagonal_ratio"),
]
TUNE_SUBSET = 0.2  # share of each validation task scored per grid point


@dataclass
class Row:
    """A row produced by code (a search): `make(family, work_dir) -> model or checkpoint folder`."""

    label: str
    make: Callable[[Any, Path], Any]
    describe: str = ""


ROWS: list[Row] = []  # RMM / DAM / evolutionary search rows go here


def run(family_name: str, *, quick: bool = False, split: str = "test", subset=None, seed: int = 0,
        batch_size: int = 256, methods: Optional[list[str]] = None, threads: int = 2, root: Optional[Path] = None,
        work: Optional[Path] = None, log=print):
    """Build/load the family, score every row; returns (DataFrame, notes)."""
    import pandas as pd

    from mergecore.merging import merge
    from mergecore.families import build_family
    from mergecore.methods import all_methods

    def fam_progress(p) -> None:
        if p.step in (0, p.steps):
            log(f"  [{p.stage_index + 1}/{p.stages_total}] {p.stage}: {p.message} ({p.elapsed:.0f} s)")

    t0 = time.time()
    fam = build_family(family_name, root=root, quick=quick, progress=fam_progress)
    log(f"family {family_name} at {fam.root} (ready in {time.time() - t0:.1f} s)")
    ev = fam.evaluator(split, subset=subset, seed=seed, batch_size=batch_size)
    t0 = time.time()
    ev.prepare(fam.base)
    log(f"tasks ({split}): " + ", ".join(f"{t.name} ({len(ev.indices(t))})" for t in ev.tasks)
        + f"; inputs prepared in {time.time() - t0:.1f} s")
    task_names = [t.name for t in ev.tasks]
    experts = fam.experts
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def add(label: str, scores: dict[str, float], merge_s: float, eval_s: float, how: str) -> None:
        row = {"row": label, **{n: scores.get(n, float("nan")) for n in task_names}}
        vals = [scores[n] for n in task_names if n in scores]
        row["mean"] = sum(vals) / len(vals) if vals else float("nan")
        row.update({"merge_s": round(merge_s, 2), "eval_s": round(eval_s, 2), "wall_s": round(merge_s + eval_s, 2),
                    "how": how})
        rows.append(row)
        log(f"  {label:<18} mean {row['mean']:.4f}  ({merge_s + eval_s:.1f} s)")

    # pretrained body with each task's head
    t = time.time()
    r = ev.evaluate(fam.base)
    heads = any(getattr(task, "head_from", None) for task in ev.tasks)
    add("pretrained", r.scores, 0.0, time.time() - t,
        "base body + each task's expert head" if heads else "the base model")

    # each expert on its own task(s): family.json's experts.<name>.tasks where given (an LM
    # family's expert has several, e.g. code_ppl and code_next_line), else the task named like it
    scores: dict[str, float] = {}
    t = time.time()
    expert_info = fam.info.get("experts", {})
    for name, path in experts.items():
        own = [n for n in expert_info.get(name, {}).get("tasks", [name]) if n in task_names]
        if own:
            scores.update(ev.evaluate(path, tasks=own).scores)
    add("individual", scores, 0.0, time.time() - t, "each expert on its own task(s)")

    known = all_methods()
    chosen = MERGE_ROWS if methods is None else [m for m in MERGE_ROWS if m.method in methods or m.label in methods]
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="mergecore-quality-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        for m in chosen:
            if m.method not in known:
                notes.append(f"{m.label}: method '{m.method}' is not registered; row skipped")
                log(f"  {m.label:<18} skipped (method '{m.method}' not registered)")
                continue
            out = work_dir / m.method
            if out.exists():
                shutil.rmtree(out)
            t = time.time()
            artifacts, how = collected_stats(known[m.method], fam, experts, work_dir, log)
            if m.tune:
                m, picked = tuned(m, fam, experts, artifacts, work_dir, threads, batch_size, seed, merge, log)
                how += picked
            recipe = m.recipe(fam.base, list(experts.values()), artifacts)
            merge(recipe, out, threads=threads)
            merge_s = time.time() - t
            t = time.time()
            r = ev.evaluate(out)
            add(m.label, r.scores, merge_s, time.time() - t, m.describe() + how)
            shutil.rmtree(out, ignore_errors=True)
        for row in ROWS:
            t = time.time()
            model = row.make(fam, work_dir)
            make_s = time.time() - t
            t = time.time()
            r = ev.evaluate(model)
            add(row.label, r.scores, make_s, time.time() - t, row.describe)
    finally:
        if work is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return pd.DataFrame(rows).set_index("row"), notes


STATS_EXAMPLES = 256  # examples per expert's task for Gram / Fisher statistics (mergecore's default)


def collected_stats(method, fam, experts: dict[str, Path], work_dir: Path, log) -> tuple[dict[str, str], str]:
    """For a data-informed method: its statistics, collected once per kind on the family's
    validation tasks (never the test split) -> (recipe artifacts, note for the row's `how`)."""
    if not getattr(method, "stats", None):
        return {}, ""
    from mergecore.stats import collect_stats

    path = work_dir / f"stats-{method.stats}.safetensors"
    if not path.is_file():
        t = time.time()
        collect_stats(method.stats, fam.val_tasks_file, [str(p) for p in experts.values()], path, base=str(fam.base),
                      examples=STATS_EXAMPLES)
        log(f"  collected {method.stats} statistics on the validation split in {time.time() - t:.1f} s")
    return {"stats": str(path)}, f"; {method.stats} statistics from {STATS_EXAMPLES} validation examples per expert"


def tuned(m: MergeRow, fam, experts: dict[str, Path], artifacts: dict[str, str], work_dir: Path, threads: int,
          batch_size: int, seed: int, merge, log) -> tuple[MergeRow, str]:
    """`m` with its `tune` parameter set to the value of the method's grid (`@merge_method(grid=...)`,
    the one `mergecore leaderboard` tries) that scores best on a validation subset."""
    from mergecore.methods import get_method

    key = m.tune
    grid = dict(get_method(m.method).grid)[key]
    ev = fam.evaluator("val", subset=TUNE_SUBSET, seed=seed, batch_size=batch_size)
    ev.prepare(fam.base)
    scores = {}
    for v in grid:
        cand = replace(m, global_params={**m.global_params, key: v}, tune=None)
        out = work_dir / f"{m.method}-tune"
        shutil.rmtree(out, ignore_errors=True)
        merge(cand.recipe(fam.base, list(experts.values()), artifacts), out, threads=threads)
        scores[v] = ev.evaluate(out).mean
        shutil.rmtree(out, ignore_errors=True)
        log(f"    {m.method} {key}={v}: validation mean {scores[v]:.4f}")
    best = max(grid, key=lambda v: scores[v])
    grid_text = ", ".join(f"{v:g}: {scores[v]:.3f}" for v in grid)
    return (replace(m, global_params={**m.global_params, key: best}, tune=None),
            f"; {key} chosen on {TUNE_SUBSET:.0%} of validation ({grid_text})")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", help="family name, e.g. fmnist-vit")
    p.add_argument("--quick", action="store_true", help="use (and build if needed) the quick version of the family")
    p.add_argument("--split", default="test", choices=["test", "val"], help="task split to score (default test)")
    p.add_argument("--subset", default=None, help="score a subset of each task: ratio (0.1) or count (500)")
    p.add_argument("--seed", type=int, default=0, help="subset seed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all rows)")
    p.add_argument("--threads", type=int, default=2, help="merge threads")
    p.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    p.add_argument("--root", default=None, help="families folder (default <cache>/families)")
    p.add_argument("--out", default=None, help="CSV path (default <family folder>/quality-<split>.csv)")
    args = p.parse_args(argv)
    args.threads = check_threads(args.threads)

    from mergecore.eval.evaluator import parse_subset
    from mergecore.families import family_dir

    df, notes = run(args.family, quick=args.quick, split=args.split, subset=parse_subset(args.subset),
                    seed=args.seed, batch_size=args.batch_size,
                    methods=args.methods.split(",") if args.methods else None, threads=args.threads,
                    root=Path(args.root) if args.root else None)
    out = Path(args.out) if args.out else family_dir(args.family, Path(args.root) if args.root else None,
                                                     args.quick) / f"quality-{args.split}.csv"
    print_table(df, out)
    print_footer(df, notes, out)
    return 0


def print_table(df, out: Path, title: str = "") -> None:
    """Save a result table as CSV at `out` and print it (scores to 4 decimals, no `how` column)."""
    import pandas as pd

    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out)
    print()
    if title:
        print(title)
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print(df.drop(columns=["how"], errors="ignore").to_string(float_format=lambda v: f"{v:.4f}"))


def print_footer(df, notes: list[str], out: Path, width: int = 18) -> None:
    """How each row was made, the notes, and where the table was saved."""
    print()
    for label, how in df["how"].items():
        print(f"  {label:<{width}} {how}")
    for n in notes:
        print(f"note: {n}")
    print(f"saved {out}")


if __name__ == "__main__":
    from mergecore.cli import run_script

    sys.exit(run_script(main, "bench/quality.py"))
