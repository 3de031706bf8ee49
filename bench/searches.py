"""Every search with one set of defaults on every family, in one table (issue 17).

    python bench/searches.py [--families fmnist-vit,minilm-textclass,smollm2-domains]
                             [--searches rmm,dam,adamerging,evo] [--variant "rmm:episodes=300"] ...
                             [--work DIR] [--out bench/results/searches.csv] [--threads 2]
                             [--budget-scale F] [--root FAMILIES_DIR]

Each search's config is built from the family alone, and every other field is left at its
config class's default (no per-family tuning):

| search     | config                                                                             |
|------------|------------------------------------------------------------------------------------|
| rmm        | base_model, models (the experts), tasks = tasks-val.yml, final_tasks = tasks.yml   |
| dam        | base_model, models, train_tasks (below), eval_tasks = tasks-val.yml, final_tasks   |
| adamerging | dam's, plus what defines layer-wise AdaMerging (bench/dam.py's row, Yang et al.    |
|            | 2024): granularity layer, form task_vectors, loss entropy, optimizer clamp [0, 1]  |
| evo        | the task-arithmetic template of examples/evo-fmnist-vit.yml: one weight per model  |
|            | in [0, 1] starting at 0.3, lambda 1.0 fixed; layer_groups = the base's layer count |
|            | (config.json: 4 for fmnist-vit, 6 for minilm-textclass, 30 for smollm2-domains),   |
|            | one weight per model per layer, derived from the model as no one number fits all   |

DAM's training tasks are each expert's own inputs from the family's *training* split (labels are
never used), paired with the experts in order and each scored with its expert's head: a family's
tasks-train.yml if it ships one; fmnist-vit's training rows and an LM family's
data/<expert>-train.jsonl as bench/dam.py builds them; for a text-classification family
(minilm-textclass) its validation tasks pointed at the data/<task>-train.jsonl files.

`--variant "SEARCH:FIELD=VALUE[,FIELD=VALUE...]"` (repeatable) adds an ablation row: that search's
config with these fields overridden (dotted names reach nested fields: `dam:loss.kind=mse`; values
are YAML: `adamerging:optimizer.clamp=[0, 2]`). `--budget-scale F` multiplies every search's budget
(RMM episodes, DAM steps, evo max_evals; defaults read from the config classes; a variant's own
budget too) for smoke runs only: rows record it and the markdown marks them. The budget column
also says what ran (evo runs whole generations, so a budget below the population runs one).

Each search runs as its own process (`mergecore search KIND CONFIG OUT`, which goes through
`mergecore.search.base.run_search` and, as the config names final_tasks, replays the result into
OUT/model and scores it on the test split); wall seconds and peak RSS (wait4) are that process's.
This process imports no torch, so a child's peak RSS is its own. Outputs go to
WORK/<family>/<search>[+variant][@xF] (config, log and timings next to it); a finished result.json
whose config is unchanged is reused, an unfinished one resumes from its checkpoint (its wall time
is then that of the last process only; `resumed` says so).

Rows are keyed by family + search + variant and merged into `--out` (CSV), so families can run in
separate invocations; the markdown next to it (`.md`) is rewritten from the whole CSV. The best
data-free row on test is read from bench/results/quality_<family>_test.csv (bench/quality.py), or
the older <prefix>-quality-test.csv (smollm2-domains), or `--baseline-csv FAMILY=PATH`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergecore.arch import config_num_layers  # noqa: E402  (no torch: keeps children's peak RSS their own)
from mergecore.demo import cache_root  # noqa: E402
from mergecore.errors import MergeError  # noqa: E402

SEARCHES = ("rmm", "dam", "adamerging", "evo")
KIND = {"rmm": "rmm", "dam": "dam", "adamerging": "dam", "evo": "evo"}
BUDGET = {"rmm": "episodes", "dam": "steps", "evo": "max_evals"}
ADAMERGING = {"granularity": "layer", "form": "task_vectors", "loss": {"kind": "entropy"},
              "optimizer": {"clamp": [0.0, 1.0]}}
DEFAULT_VARIANT = "defaults"
COLUMNS = ["family", "search", "variant", "overrides", "budget_scale", "budget", "val_mean", "val_source",
           "val_chosen", "search_best_val", "data_free_best_val", "data_free_best_val_label", "test_mean",
           "test_scores", "data_free_test_row", "data_free_test_mean", "beats_data_free_test", "wall_s",
           "peak_rss_gib", "resumed", "work", "finished_at"]
SEARCH_ROWS = re.compile(r"^(RMM|DAM|evo|layer-wise AdaMerging|AdaMerging)", re.I)


class Fam:
    """A built family read from its folder (no torch): what bench/dam.py's `train_tasks` needs."""

    def __init__(self, name: str, root: Optional[Path]):
        self.name = name
        self.root = (Path(root) if root else cache_root() / "families") / name
        if not (self.root / "family.json").is_file():
            raise MergeError(f"family '{name}' is not built at {self.root}; run: mergecore bench build-family {name}")
        self.info = json.loads((self.root / "family.json").read_text())
        self.base = self.root / "base"
        self.experts = {n: self.root / e["path"] for n, e in self.info["experts"].items()}
        self.val_tasks_file = self.root / "tasks-val.yml"
        self.tasks_file = self.root / "tasks.yml"

    def layers(self) -> int:
        n = config_num_layers(json.loads((self.base / "config.json").read_text()))
        return max(1, n or 1)


def _bench_dam():
    spec = importlib.util.spec_from_file_location("bench_dam", ROOT / "bench" / "dam.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_tasks(fam: Fam) -> tuple[Any, str]:
    """Each expert's task on the family's training split, paired with the experts in order."""
    val = yaml.safe_load(fam.val_tasks_file.read_text())["tasks"]
    by_name = {t["name"]: t for t in val}
    text_cls = (not (fam.root / "tasks-train.yml").is_file() and fam.name != "fmnist-vit"
                and all(n in by_name and by_name[n].get("kind") == "classification"
                        and "-val." in str(by_name[n].get("data", {}).get("path", "")) for n in fam.experts))
    if not text_cls:  # bench/dam.py's: tasks-train.yml, fmnist-vit's training rows, an LM family's texts
        return _bench_dam().train_tasks(fam)
    out = []
    for name in fam.experts:
        t = {k: v for k, v in by_name[name].items() if k != "description"}
        path = fam.root / str(t["data"]["path"]).replace("-val.", "-train.")
        if not path.is_file():
            raise MergeError(f"{fam.name}: no training split for task '{name}' (looked for {path})")
        t["data"] = {**t["data"], "path": str(path)}
        if t.get("head_from") and not Path(t["head_from"]).is_absolute():
            t["head_from"] = str(fam.root / t["head_from"])
        out.append(t)
    return out, "training split (data/<task>-train.jsonl, each task with its expert's head)"


def base_config(search: str, fam: Fam) -> dict[str, Any]:
    """The config from the family alone; every other field is the config class's default."""
    models = [str(p) for p in fam.experts.values()]
    common = {"base_model": str(fam.base), "models": models, "final_tasks": str(fam.tasks_file)}
    if search == "rmm":
        return {**common, "tasks": str(fam.val_tasks_file)}
    if search in ("dam", "adamerging"):
        cfg = {**common, "train_tasks": train_tasks(fam)[0], "eval_tasks": str(fam.val_tasks_file)}
        return {**cfg, **(ADAMERGING if search == "adamerging" else {})}
    if search == "evo":
        return {**common, "method": "task_arithmetic", "layer_groups": fam.layers(),
                "parameters": {"weight": {"min": 0.0, "max": 1.0, "init": 0.3}}, "fixed": {"lambda": 1.0},
                "tasks": str(fam.val_tasks_file)}
    raise MergeError(f"unknown search '{search}'; known: {', '.join(SEARCHES)}")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'SEARCH:FIELD=VALUE,FIELD=VALUE' -> (search, {field: value}); values parsed as YAML."""
    search, sep, rest = text.partition(":")
    search = search.strip()
    if not sep or search not in SEARCHES or not rest.strip():
        raise MergeError(f"--variant '{text}': expected SEARCH:FIELD=VALUE[,FIELD=VALUE...] with SEARCH one of "
                         f"{', '.join(SEARCHES)}")
    out: dict[str, Any] = {}
    for part in re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", rest):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise MergeError(f"--variant '{text}': '{part}' is not FIELD=VALUE")
        out[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else ""
    return search, out


def apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = cfg
        for p in path:
            if not isinstance(node.get(p, {}), dict):
                raise MergeError(f"override '{key}': '{p}' is not a mapping")
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def budget_defaults() -> dict[str, int]:
    """The config classes' default budgets, read in a child process (the classes import torch)."""
    code = ("import json\nfrom mergecore.search.base import search_class\n"
            f"b = {BUDGET!r}\n"
            "print(json.dumps({k: search_class(k).config_class.model_fields[f].default for k, f in b.items()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    if out.returncode != 0:
        raise MergeError(f"could not read the searches' default budgets: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slug(search: str, variant: str, scale: float) -> str:
    s = search if variant == DEFAULT_VARIANT else f"{search}+{re.sub(r'[^A-Za-z0-9.=_-]+', '_', variant)}"
    return s if scale == 1 else f"{s}@x{scale:g}"


def run_one(kind: str, cfg: dict[str, Any], out: Path, threads: int, log) -> dict[str, Any]:
    """Run (or reuse, or resume) one search; returns result.json plus wall seconds and peak RSS."""
    cfg_path, log_path, stats_path = (out.parent / f"{out.name}{ext}" for ext in (".yml", ".log", ".bench.json"))
    text = yaml.safe_dump(cfg, sort_keys=False)
    result_path = out / "result.json"
    if cfg_path.is_file() and cfg_path.read_text() != text and out.exists():
        raise MergeError(f"{out} holds a search of another config ({cfg_path} differs); remove it "
                         f"(rm -r {out} {cfg_path}) or use another --work")
    if result_path.is_file() and stats_path.is_file():
        result = json.loads(result_path.read_text())
        if "final" in result:
            log(f"    reusing {out}")
            return {**result, **json.loads(stats_path.read_text())}
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(text)
    resumed = out.is_dir() and any(out.glob("*_checkpoint.safetensors"))
    cmd = [sys.executable, "-m", "mergecore.cli", "search", kind, str(cfg_path), str(out), "--threads", str(threads)]
    cmd += ["--log-every", "20"] if kind == "dam" else []
    t0 = time.time()
    with open(log_path, "a") as logf:
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise MergeError(f"{kind} search failed (exit {proc.returncode}; log {log_path}): {' | '.join(tail)}")
    stats = {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "resumed": resumed}
    stats_path.write_text(json.dumps(stats))
    return {**json.loads(result_path.read_text()), **stats}


def best_data_free_test(family: str, explicit: dict[str, str]) -> tuple[str, Optional[float], str]:
    """(row, mean, file) of the best data-free row on test from bench/quality.py's CSV."""
    prefix = family.split("-")[0]
    paths = ([Path(explicit[family])] if family in explicit else
             [ROOT / "bench" / "results" / f"quality_{family}_test.csv", ROOT / "bench" / "results" /
              f"{prefix}-quality-test.csv", cache_root() / "families" / family / "quality-test.csv"])
    for path in paths:
        if path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("row") not in ("pretrained", "individual")
                        and not SEARCH_ROWS.match(r.get("row", "")) and r.get("mean")]
            if rows:
                best = max(rows, key=lambda r: float(r["mean"]))
                return best["row"], float(best["mean"]), str(path.relative_to(ROOT) if path.is_relative_to(ROOT)
                                                             else path)
    return "", None, "none found (run bench/quality.py " + family + ")"


def make_row(fam: Fam, search: str, variant: str, overrides: dict[str, Any], scale: float, budget: str,
             result: dict[str, Any], df_test: tuple[str, Optional[float], str], out: Path) -> dict[str, Any]:
    v = result.get("validation") or {}
    sb, fb = v.get("search_best") or {}, v.get("data_free_best") or {}
    final = result.get("final") or {}
    test = final.get("mean")
    ran = result.get({"rmm": "episodes", "dam": "steps", "evo": "evaluations"}[KIND[search]])
    budget = budget if ran is None else f"{budget} (ran {ran})"
    beats = "" if test is None or df_test[1] is None else ("yes" if test > df_test[1] else "no")
    return {"family": fam.name, "search": search, "variant": variant, "overrides": json.dumps(overrides),
            "budget_scale": scale, "budget": budget, "val_mean": v.get("mean"),
            "val_source": "data-free fallback" if v.get("data_free") else "search", "val_chosen": v.get("chosen", ""),
            "search_best_val": sb.get("mean"), "data_free_best_val": fb.get("mean"),
            "data_free_best_val_label": fb.get("label", ""), "test_mean": test,
            "test_scores": json.dumps(final.get("scores") or {}), "data_free_test_row": df_test[0],
            "data_free_test_mean": df_test[1], "beats_data_free_test": beats, "wall_s": result.get("wall_s"),
            "peak_rss_gib": result.get("peak_rss_gib"), "resumed": result.get("resumed", False), "work": str(out),
            "finished_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime(result_mtime(out)))}


def result_mtime(out: Path) -> float:
    p = out / "result.json"
    return p.stat().st_mtime if p.is_file() else time.time()


def merge_csv(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `path` updated with `rows` (keyed by family + search + variant); written back."""
    old: list[dict[str, Any]] = []
    if path.is_file():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    key = lambda r: (r["family"], r["search"], r["variant"])  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    order = {s: i for i, s in enumerate(SEARCHES)}
    out = sorted(merged.values(), key=lambda r: (r["family"], order.get(r["search"], 9),
                                                 r["variant"] != DEFAULT_VARIANT, r["variant"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(out)
    return out


def _f(v: Any, digits: int = 4) -> str:
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return ""


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["family", "search", "variant", "val", "val source", "search best val", "data-free best val",
            "test", "best data-free test", "beats data-free on test", "wall s", "peak RSS GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    smoke = False
    for r in rows:
        scale = float(r["budget_scale"] or 1)
        variant = r["variant"] + (f" ({r['budget']}; smoke run, budget x{scale:g})" if scale != 1 else "")
        smoke |= scale != 1
        resumed = " (resumed)" if str(r.get("resumed")) == "True" else ""
        lines.append("| " + " | ".join([
            r["family"], r["search"], variant, _f(r["val_mean"]), r["val_source"], _f(r["search_best_val"]),
            f"{_f(r['data_free_best_val'])} ({r['data_free_best_val_label']})", _f(r["test_mean"]),
            f"{r['data_free_test_row']} {_f(r['data_free_test_mean'])}", r["beats_data_free_test"] or "",
            f"{_f(r['wall_s'], 0)}{resumed}", _f(r["peak_rss_gib"], 2)]) + " |")
    notes: list[str] = []
    for s in SEARCHES:
        mine = [r for r in rows if r["search"] == s and r["variant"] == DEFAULT_VARIANT
                and float(r["budget_scale"] or 1) == 1]
        if mine:
            wins = [r["family"] for r in mine if r["beats_data_free_test"] == "yes"]
            ok = all(r["data_free_best_val"] in (None, "") or float(r["val_mean"]) >= float(r["data_free_best_val"])
                     for r in mine)
            notes.append(f"- {s}: beats data-free on test in {len(wins)} of {len(mine)} families "
                         f"({', '.join(wins) or 'none'}); val >= data-free val: {'yes' if ok else 'NO'}")
    if notes:
        notes = ["", "Per search (default rows, full budget): families where the result beats the best data-free "
                     "row on test, and whether its validation score is at least the best data-free candidate it "
                     "scored there (by construction):", ""] + notes
    if smoke:
        notes += ["", "Rows marked 'smoke run' ran a scaled-down budget (`--budget-scale`): they check the bench, "
                      "not the searches."]
    intro = ["# Searches with one set of defaults on every family", "",
             "`bench/searches.py`: each search's config from the family alone (models, base, tasks-val.yml for "
             "validation, tasks.yml as final tasks, DAM's training split), every other field at its default. "
             "val: the chosen result's score on the full validation split; test: the replayed checkpoint on "
             "the test split; best data-free test: bench/quality.py's best data-free row.", ""]
    return "\n".join(intro + lines + notes) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="fmnist-vit,minilm-textclass,smollm2-domains")
    p.add_argument("--searches", default=",".join(SEARCHES), help="default rows to run ('' for variants only)")
    p.add_argument("--variant", action="append", default=[], metavar="SEARCH:FIELD=VALUE[,...]",
                   help="an ablation row overriding config fields (repeatable)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget (smoke runs only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="search outputs (default: a new temporary folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "searches.csv"))
    p.add_argument("--baseline-csv", action="append", default=[], metavar="FAMILY=PATH",
                   help="the data-free test table of a family (default: bench/results/quality_<family>_test.csv)")
    p.add_argument("--root", default=None, help="families folder (default <cache>/families)")
    p.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    if args.budget_scale <= 0:
        raise MergeError("--budget-scale must be positive")
    if args.threads < 1:
        raise MergeError("--threads must be at least 1")
    rows_wanted = [(s.strip(), DEFAULT_VARIANT, {}) for s in args.searches.split(",") if s.strip()]
    for s, _, _ in rows_wanted:
        if s not in SEARCHES:
            raise MergeError(f"unknown search '{s}'; known: {', '.join(SEARCHES)}")
    for text in args.variant:
        s, overrides = parse_variant(text)
        name = ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items())
        rows_wanted.append((s, name, overrides))
    baselines = dict(b.split("=", 1) for b in args.baseline_csv)
    families = [Fam(f.strip(), Path(args.root) if args.root else None) for f in args.families.split(",") if f.strip()]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mergecore-searches-"))
    print(f"work folder: {work} (pass --work {work} to resume)", flush=True)
    defaults = budget_defaults()
    out_csv = Path(args.out)
    done: list[dict[str, Any]] = []
    failed = 0
    for fam in families:
        df_test = best_data_free_test(fam.name, baselines)
        print(f"{fam.name}: best data-free row on test: {df_test[0]} {_f(df_test[1])} ({df_test[2]})", flush=True)
        for search, variant, overrides in rows_wanted:
            kind = KIND[search]
            field = BUDGET[kind]
            cfg = apply_overrides(base_config(search, fam), overrides)
            if args.budget_scale != 1:  # after the overrides: a variant's own budget is scaled too
                cfg[field] = max(1, round(cfg.get(field, defaults[kind]) * args.budget_scale))
            budget = f"{field}={cfg.get(field, defaults[kind])}"
            out = work / fam.name / slug(search, variant, args.budget_scale)
            print(f"  {search} [{variant}] {budget} -> {out}", flush=True)
            try:
                result = run_one(kind, cfg, out, args.threads, lambda m: print(m, flush=True))
            except MergeError as err:
                print(f"    FAILED: {err}", flush=True)
                failed += 1
                continue
            row = make_row(fam, search, variant, overrides, args.budget_scale, budget, result, df_test, out)
            print(f"    val {_f(row['val_mean'])} ({row['val_source']}), test {_f(row['test_mean'])}, "
                  f"beats data-free: {row['beats_data_free_test']}, {row['wall_s']} s, "
                  f"{row['peak_rss_gib']} GiB", flush=True)
            done.append(row)
            all_rows = merge_csv(out_csv, [row])  # after every row: an interrupted run keeps what finished
            out_csv.with_suffix(".md").write_text(markdown(all_rows))
    if done:
        print()
        print(markdown([r for r in merge_csv(out_csv, []) if any(r["family"] == f.name for f in families)]))
        print(f"saved {out_csv} and {out_csv.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    from mergecore.cli import run_script

    sys.exit(run_script(main, "bench/searches.py"))
