"""LoRA extraction, BASE+ADAPTER recipes and mixtures of experts on `smollm2-domains` (issue 16).

    python bench/lora_moe.py [--threads 2] [--ranks 4,8,16,32] [--prompts 16] [--speed] [--no-family]

1. Extraction: each expert minus the base through `mergecore extract-lora` at each rank and the
   training rank (family.json's `lora_rank`), each a process (wall time, peak RSS from wait4);
   retained energy from its extract_report.csv. The adapter is folded into
   the base by a one-model `passthrough` recipe through `mergecore.merge` (the engine's streaming
   BASE+ADAPTER read), and that folder is scored on the expert's own `<domain>_ppl` test task.
   At the training rank, peft's `PeftModel.from_pretrained(...).merge_and_unload()` is compared too.
2. BASE+ADAPTER identity: weight averaging (`linear`, weight 1, normalize) of the three
   `base+adapter` references (training rank) against the same recipe over the experts, and over
   the passthrough-folded adapters: max |difference| over all tensors, and test scores.
3. MoE: `mergecore moe` (a process: time, peak RSS) from the base and the three experts,
   `gate_mode: hidden`, positive prompts = a window from the middle of N training files per domain
   (data/<domain>-train.jsonl; never validation or test text), experts_per_token 1 and 2
   (`--negatives`: also top-1 with the other domains' prompts negative; `--avg-base`: also top-1
   with the weight-averaged experts as base, so attention is averaged rather than the base's).
   Routing: forward hooks on every layer's router (`mlp.gate` in transformers 5's
   MixtralForCausalLM, `block_sparse_moe.gate` before) count each token's top-1 expert on each
   domain's test perplexity texts (the `_ppl` task's own token chunks). Test perplexity of the
   mixtures next to the base, each expert and weight averaging (`--next-line`: accuracy too).
4. `--speed`: `mergecore extract-lora --rank 16` (ft_a over base) and `mergecore moe` (base, ft_a,
   ft_b as experts, `gate_mode: random`: these random Llamas have no tokenizer) on the three 1B
   Llamas of bench/merge_speed.py (built once into --models), cold cache, as processes.

Tables are printed as markdown and saved in bench/results/ (lora_moe*.csv, lora_moe.md, lora_moe_speed.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _proc import run_measured  # noqa: E402
from mergecore.threads import check_threads  # noqa: E402

FAMILY = "smollm2-domains"
PY = [sys.executable, "-m", "mergecore.cli"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run cmd as a process; (wall s, its own peak RSS GiB, stdout + stderr). Fails loudly."""
    m = run_measured(cmd, env)
    if m.returncode != 0:
        raise SystemExit(f"command failed ({m.returncode}): {' '.join(cmd)}\n{m.output[-3000:]}")
    return m.wall_s, m.peak_rss_gib, m.output


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def save_csv(name: str, rows: list[dict[str, Any]]) -> None:
    with open(RESULTS / name, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def linear(models: list[str]):
    """Weight averaging (linear, weight 1 each, normalize) in float32; with one model and no weights,
    `passthrough`: a BASE+ADAPTER reference written out whole through the engine."""
    from mergecore.recipe import recipe_from_dict

    avg = len(models) > 1
    return recipe_from_dict({"merge_method": "linear" if avg else "passthrough", "dtype": "float32",
                             "models": [{"model": m, **({"parameters": {"weight": 1.0}} if avg else {})}
                                        for m in models], **({"parameters": {"normalize": True}} if avg else {})})


def max_diff(a: Path, b: Path) -> tuple[float, float, str]:
    """(max |a - b| over all tensors, largest relative Frobenius difference, the tensor of the max)."""
    from mergecore.io.source import ModelSource

    sa, sb = ModelSource(str(a)), ModelSource(str(b))
    try:
        if set(sa.tensors) != set(sb.tensors):
            raise SystemExit(f"{a} and {b} hold different tensors: {sorted(set(sa.tensors) ^ set(sb.tensors))[:5]}")
        worst, rel, where = 0.0, 0.0, "-"
        for n in sorted(sa.tensors):
            x, y = sa.read(n).double(), sb.read(n).double()
            d = float((x - y).abs().max())
            if d > worst:
                worst, where = d, n
            rel = max(rel, float((x - y).norm() / y.norm().clamp(min=1e-30)))
        return worst, rel, where
    finally:
        sa.close(), sb.close()


def peft_vs_fold(base: Path, adapter: Path, folded: Path) -> float:
    """max |peft's merge_and_unload of base + adapter - the engine's passthrough fold|."""
    from peft import PeftModel

    from mergecore.io.source import ModelSource
    from mergecore.models import load_model

    merged = PeftModel.from_pretrained(load_model(base), str(adapter)).merge_and_unload()
    sd = merged.state_dict()
    src = ModelSource(str(folded))
    try:
        return max(float((sd[n].double() - src.read(n).double()).abs().max()) for n in src.tensors if n in sd)
    finally:
        src.close()


def relative(x: float, ref: float) -> str:
    return f"{100 * (x - ref) / ref:+.2f}%, {'no worse' if x <= ref else 'WORSE'}"


def ppl(result, task: str) -> float:
    return result[task].metrics["perplexity"]


# -- part 1 ---------------------------------------------------------------------------------------

def extraction(fam, ev, ranks: dict[str, list[int]], train_rank: int, own: dict[str, float], work: Path,
               env: dict[str, str], threads: int, log) -> tuple[list[dict[str, Any]], dict[str, Path], dict[str, Path]]:
    from mergecore.merging import merge

    rows, adapters, folded = [], {}, {}
    for d, path in fam.experts.items():
        for r in ranks[d]:
            out = work / f"adapter-{d}-r{r}"
            wall, rss, text = timed(PY + ["extract-lora", "--model", str(path), "--base", str(fam.base), str(out),
                                          "--rank", str(r), "--quiet"], env)
            rep = list(csv.DictReader((out / "extract_report.csv").read_text().splitlines()))
            lora = [x for x in rep if x["kind"] == "lora"]
            energy = [float(x["retained_energy"]) for x in lora]
            f_out = merge(linear([f"{fam.base}+{out}"]), work / f"folded-{d}-r{r}", threads=threads).out_dir
            p = ppl(ev.evaluate(f_out, tasks=[f"{d}_ppl"]), f"{d}_ppl")
            diff, rel, _ = max_diff(f_out, path)
            row = {"expert": d, "rank": r, "training_rank": r == train_rank, "ppl_expert": own[d], "ppl_adapter": p,
                   "rel_diff_pct": 100 * (p - own[d]) / own[d], "energy_min": min(energy),
                   "energy_mean": sum(energy) / len(energy),
                   "rel_err_max": max(float(x["relative_error"]) for x in lora),
                   "max_abs_fold_vs_expert": diff, "rel_fro_fold_vs_expert": rel, "lora_layers": len(lora),
                   "whole_modules": sum(x["kind"] == "full" for x in rep),
                   "adapter_mib": (out / "adapter_model.safetensors").stat().st_size / 2**20,
                   "wall_s": wall, "peak_rss_gib": rss, "peft_vs_fold": float("nan")}
            if r == train_rank:
                row["peft_vs_fold"] = peft_vs_fold(fam.base, out, f_out)
                adapters[d], folded[d] = out, f_out
            else:
                shutil.rmtree(f_out)
            rows.append(row)
            log(f"  {d} rank {r}: ppl {p:.4f} (expert {own[d]:.4f}, {row['rel_diff_pct']:+.3f}%), energy mean "
                f"{row['energy_mean']:.6f}, {wall:.1f} s, {rss:.2f} GiB")
    return rows, adapters, folded


def extraction_table(rows: list[dict[str, Any]], train_rank: int) -> str:
    head = ["expert", "rank", "test ppl (adapter)", "expert's ppl", "difference", "retained energy (min / mean)",
            "max rel. error", "max abs(fold - expert)", "peft vs fold", "MiB", "extract s", "peak RSS GiB"]
    out = [[r["expert"], f"**{r['rank']}** (training)" if r["rank"] == train_rank else r["rank"],
            f"{r['ppl_adapter']:.4f}", f"{r['ppl_expert']:.4f}", f"{r['rel_diff_pct']:+.3f}%",
            f"{r['energy_min']:.6f} / {r['energy_mean']:.6f}", f"{r['rel_err_max']:.3g}",
            f"{r['max_abs_fold_vs_expert']:.3g}",
            "" if r["peft_vs_fold"] != r["peft_vs_fold"] else f"{r['peft_vs_fold']:.3g}",
            f"{r['adapter_mib']:.1f}", f"{r['wall_s']:.1f}", f"{r['peak_rss_gib']:.2f}"] for r in rows]
    return md_table(head, out)


# -- part 3 ---------------------------------------------------------------------------------------

def train_prompts(fam, domain: str, n: int, chars: int) -> list[str]:
    """A `chars`-long window (from a line start) in the middle of each of `n` training files spread
    evenly over the domain's training sample (data/<domain>-train.jsonl)."""
    with open(fam.root / "data" / f"{domain}-train.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    docs = [t for t in docs if t.strip()]
    k = min(n, len(docs))
    picked = [docs[i * len(docs) // k] for i in range(k)]
    out = []
    for t in picked:
        start = max(0, len(t) // 2 - chars // 2)
        nl = t.rfind("\n", 0, start + 1)
        start = nl + 1 if nl >= 0 else 0
        out.append(t[start:start + chars].strip() or t[:chars].strip())
    return out


def routing(folder: Path, ev, domains: list[str]) -> dict[str, dict[str, Any]]:
    """Per domain's test perplexity texts: top-1 (and top-2) expert counts per layer, from hooks on the routers."""
    from mergecore.models import load_model

    model = load_model(folder)
    layers = model.model.layers
    chosen: list[Optional[torch.Tensor]] = [None] * len(layers)

    def hook(i: int):
        def record(module, args, output) -> None:  # transformers 5: (logits, scores, indices); 4.x: logits
            logits = output[0] if isinstance(output, tuple) else output
            k = min(2, logits.shape[-1])
            chosen[i] = logits.detach().float().topk(k, dim=-1).indices.reshape(-1, k)
        return record

    handles = []
    for i, layer in enumerate(layers):
        block = getattr(layer, "block_sparse_moe", None) or layer.mlp
        handles.append(block.gate.register_forward_hook(hook(i)))
    n_exp = int(model.config.num_local_experts)
    res = ev.resources(model, folder)
    out: dict[str, dict[str, Any]] = {}
    try:
        with torch.inference_mode():
            for di, d in enumerate(domains):
                prep = ev.task(f"{d}_ppl").prepare(res)
                top1 = torch.zeros(len(layers), n_exp, dtype=torch.long)
                in_top2 = torch.zeros(len(layers), dtype=torch.long)
                tokens = 0
                for chunks in prep.data["chunks"]:
                    for c in chunks:
                        if len(c) < 2:
                            continue
                        model.model(input_ids=torch.tensor([c]), use_cache=False)
                        tokens += len(c)
                        for li, idx in enumerate(chosen):
                            top1[li] += torch.bincount(idx[:, 0], minlength=n_exp)
                            in_top2[li] += int((idx == di).any(-1).sum())
                out[d] = {"top1": top1, "in_top2": in_top2, "tokens": tokens}
    finally:
        for h in handles:
            h.remove()
    return out


def routing_rows(label: str, route: dict[str, dict[str, Any]], domains: list[str]):
    table, per_layer = [], []
    for di, d in enumerate(domains):
        top1, tokens = route[d]["top1"].double(), route[d]["tokens"]
        share = top1.sum(0) / top1.sum()
        own = (top1[:, di] / tokens).tolist()
        top2 = float(route[d]["in_top2"].sum() / (tokens * len(own)))
        table.append([label, d, tokens] + [f"{100 * float(s):.1f}%" for s in share] +
                     [f"**{100 * float(share[di]):.1f}%**",
                      f"{100 * min(own):.0f} / {100 * statistics.median(own):.0f} / {100 * max(own):.0f}%",
                      sum(o > 0.6 for o in own), f"{100 * top2:.1f}%"])
        for li in range(len(own)):
            per_layer.append({"moe": label, "domain": d, "layer": li, "tokens": tokens,
                              **{f"share_{e}": float(top1[li, ei] / tokens) for ei, e in enumerate(domains)},
                              "own_in_top2": float(route[d]["in_top2"][li] / tokens)})
    return table, per_layer


def moe_part(fam, ev, domains: list[str], args, work: Path, env: dict[str, str], log):
    prompts = {d: train_prompts(fam, d, args.prompts, args.prompt_chars) for d in domains}
    variants = [("hidden, top-1", 1, False, fam.base), ("hidden, top-2", 2, False, fam.base)]
    if args.negatives:
        variants.append(("hidden + negatives, top-1", 1, True, fam.base))
    if args.avg_base:
        variants.append(("hidden, top-1, averaged base", 1, False, work / "wa-experts"))
    builds, routes, folders = [], [], {}
    for label, k, neg, base in variants:
        experts = [{"source_model": str(fam.experts[d]), "positive_prompts": prompts[d]} for d in domains]
        if neg:
            for e, d in zip(experts, domains):
                e["negative_prompts"] = [p for o in domains if o != d for p in prompts[o]]
        cfg = {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": k,
               "experts": experts}
        cfg_file = work / f"moe-{k}{'-neg' if neg else ''}{'-avg' if base != fam.base else ''}.yml"
        cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        out = work / cfg_file.stem
        wall, rss, text = timed(PY + ["moe", str(cfg_file), str(out), "--quiet"], env)
        warns = [line.removeprefix("warning: ") for line in text.splitlines() if line.startswith("warning:")]
        arch = json.loads((out / "config.json").read_text())["architectures"][0]
        size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30
        builds.append([label, arch, f"{wall:.1f}", f"{rss:.2f}", f"{size:.2f}", "; ".join(warns) or "-"])
        log(f"  built {label}: {arch} in {wall:.1f} s, {rss:.2f} GiB peak RSS {' '.join(warns)}")
        routes.append((label, routing(out, ev, domains)))
        folders[label] = out
    return prompts, builds, routes, folders


# -- part 4 ---------------------------------------------------------------------------------------

def speed(models_dir: Path, threads: int, log) -> str:
    import merge_speed as ms

    models = ms.build_models(models_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    work = Path(tempfile.mkdtemp(prefix="lora-moe-speed-", dir=models_dir))
    rows = []
    try:
        cfg = work / "moe.yml"
        cfg.write_text(yaml.safe_dump({"base_model": str(models["base"]), "gate_mode": "random", "dtype": "bfloat16",
                                       "experts_per_token": 2,
                                       "experts": [{"source_model": str(models[m])}
                                                   for m in ("base", "ft_a", "ft_b")]}))
        runs = [("extract-lora --rank 16 (ft_a over base)", work / "adapter",
                 PY + ["extract-lora", "--model", str(models["ft_a"]), "--base", str(models["base"]),
                       str(work / "adapter"), "--rank", "16", "--quiet"], [models["ft_a"], models["base"]]),
                ("moe: base + ft_a + ft_b, random gates, top-2", work / "moe",
                 PY + ["moe", str(cfg), str(work / "moe"), "--quiet"], list(models.values()))]
        for label, out, cmd, inputs in runs:
            how = ms.drop_cache([p / "model.safetensors" for p in inputs])
            wall, rss, text = timed(cmd, env)
            size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**30
            own = re.search(r" in ([0-9.]+)s", text)
            rows.append({"command": label, "wall_s": round(wall, 1), "tool_s": float(own.group(1)) if own else None,
                         "peak_rss_gib": round(rss, 2),
                         "output_gib": round(size, 3), "cache": how, "summary": text.strip().splitlines()[-1]})
            log(json.dumps(rows[-1]))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_csv("lora_moe_speed.csv", rows)
    return md_table(["command", "process wall s", "its own s", "peak RSS GiB", "output GiB", "page cache"],
                    [[r["command"], r["wall_s"], r["tool_s"], r["peak_rss_gib"], r["output_gib"], r["cache"]]
                     for r in rows])


# -- main -----------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads here and in the processes (OMP_NUM_THREADS)")
    p.add_argument("--ranks", default="4,8,16,32", help="extraction ranks (the training rank is added)")
    p.add_argument("--other-ranks", default=None, help="ranks for experts after the first (default: --ranks)")
    p.add_argument("--prompts", type=int, default=16, help="gate prompts per domain (training files)")
    p.add_argument("--prompt-chars", type=int, default=600, help="characters per gate prompt")
    p.add_argument("--negatives", action="store_true", help="also a top-1 MoE with the other domains' prompts negative")
    p.add_argument("--avg-base", action="store_true",
                   help="also a top-1 MoE on the weight-averaged experts as its base (their attention averaged)")
    p.add_argument("--next-line", action="store_true", help="also score the next-line tasks (slow on a CPU)")
    p.add_argument("--speed", action="store_true", help="part 4 on the 1B Llamas of bench/merge_speed.py")
    p.add_argument("--no-family", action="store_true", help="skip parts 1-3")
    p.add_argument("--models", type=Path, default=Path(os.environ.get("MERGECORE_BENCH_DIR",
                                                                     Path.home() / ".cache/mergecore/bench-1b")))
    p.add_argument("--root", default=None, help="families folder (default <cache>/families)")
    p.add_argument("--quick", action="store_true", help="the quick family (trying the script out)")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. for a trial run)")
    p.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    threads = check_threads(args.threads) or 2
    torch.set_num_threads(threads)
    RESULTS.mkdir(parents=True, exist_ok=True)

    log = partial(print, flush=True)
    if not args.no_family:
        family(args, threads, log)
    if args.speed:
        table = speed(args.models, threads, log)
        text = (f"# LoRA extraction and MoE build on three 953M-parameter bf16 Llamas\n\n`python bench/lora_moe.py "
                f"{' '.join(args.argv)}` ({time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPU cores)\n\n{table}\n\n"
                "Each a separate process, page cache dropped first; peak RSS from wait4. The MoE uses random gates: "
                "these random Llamas have no tokenizer, so prompt gates cannot be computed. ft_a is base + "
                "0.01 N(0, 1) noise, so its difference is full rank and rank 16 keeps little of it (randomized "
                "SVD on the 2048-wide matrices): this measures time and memory, not quality.\n")
        (RESULTS / "lora_moe_speed.md").write_text(text)
        print("\n" + text)
    return 0


def family(args, threads: int, log) -> None:
    from mergecore.families import load_family
    from mergecore.merging import merge

    fam = load_family(FAMILY, root=Path(args.root) if args.root else None, quick=args.quick)
    info = fam.info
    train_rank = int(info["config"]["lora_rank"])
    domains = list(fam.experts)
    ranks = [int(r) for r in args.ranks.split(",")]
    other = [int(r) for r in args.other_ranks.split(",")] if args.other_ranks else ranks
    ranks_of = {d: sorted(set(ranks if i == 0 else other) | {train_rank}) for i, d in enumerate(domains)}
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    ev = fam.evaluator("test")
    tasks = [t.name for t in ev.tasks if args.next_line or t.name.endswith("_ppl")]
    log(f"family {fam.root}: experts {', '.join(domains)} trained as LoRA rank {train_rank}, alpha "
        f"{info['config']['lora_alpha']}, targets {info['config']['lora_targets']}; threads {threads}")
    md = [f"# LoRA extraction, BASE+ADAPTER recipes and MoE on {FAMILY}\n",
          f"`python bench/lora_moe.py {' '.join(args.argv)}` "
          f"({time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPU cores, torch {torch.__version__})\n"]
    work = Path(tempfile.mkdtemp(prefix="lora-moe-"))
    try:
        t0 = time.time()
        scores = {"base": ev.evaluate(fam.base, tasks=tasks)}
        for d, path in fam.experts.items():
            scores[f"expert {d}"] = ev.evaluate(path, tasks=tasks)
        own = {d: ppl(scores[f"expert {d}"], f"{d}_ppl") for d in domains}
        log(f"base and experts scored in {time.time() - t0:.0f} s")

        log("part 1: extraction")
        rows, adapters, folded = extraction(fam, ev, ranks_of, train_rank, own, work, env, threads, log)
        save_csv(f"lora_moe_extraction{args.tag}.csv", rows)
        md += ["## 1. Extraction (test perplexity on the expert's own domain)\n", extraction_table(rows, train_rank),
               ""]

        log("part 2: base+adapter recipe identity")
        refs = [f"{fam.base}+{adapters[d]}" for d in domains]
        t = time.time()
        merge(linear(refs), work / "wa-adapters", threads=threads)
        ref_s = time.time() - t
        t = time.time()
        merge(linear([str(fam.experts[d]) for d in domains]), work / "wa-experts", threads=threads)
        exp_s = time.time() - t
        merge(linear([str(folded[d]) for d in domains]), work / "wa-folded", threads=threads)
        scores["weight averaging (experts)"] = ev.evaluate(work / "wa-experts", tasks=tasks)
        scores["weight averaging (base+adapter refs)"] = ev.evaluate(work / "wa-adapters", tasks=tasks)
        ident = []
        for label, other_dir in (("folded experts (the family's)", "wa-experts"),
                                 ("passthrough-folded adapters", "wa-folded")):
            dmax, rel, where = max_diff(work / "wa-adapters", work / other_dir)
            ident.append({"versus": label, "max_abs_diff": dmax, "max_rel_fro_diff": rel, "worst_tensor": where})
        save_csv(f"lora_moe_identity{args.tag}.csv", ident)
        md += [f"## 2. BASE+ADAPTER references in a recipe (linear, weight 1, normalize; adapters at rank "
               f"{train_rank})\n",
               md_table(["weight averaging of base+adapter refs versus the same merge of", "max abs difference",
                         "max relative (Frobenius) difference", "tensor of the max"],
                        [[r["versus"], f"{r['max_abs_diff']:.3g}", f"{r['max_rel_fro_diff']:.3g}", r["worst_tensor"]]
                         for r in ident]),
               f"\nmerge time: {ref_s:.1f} s with base+adapter references, {exp_s:.1f} s over the experts' folders.\n"]

        log("part 3: MoE")
        prompts, builds, routes, folders = moe_part(fam, ev, domains, args, work, env, log)
        for label, folder in folders.items():
            scores[f"MoE {label}"] = ev.evaluate(folder, tasks=tasks)
        md += [f"## 3. MoE: base + 3 experts, hidden gates from {args.prompts} training-text windows of "
               f"{args.prompt_chars} characters per domain\n",
               md_table(["MoE", "architecture", "build s", "peak RSS GiB", "GiB", "warnings"], builds), "",
               "Routing: on each domain's test perplexity texts, the share of tokens whose top-1 expert is each "
               "domain's (over all layers); own-expert share per layer (min / median / max); layers over 60%; "
               "share of (token, layer) pairs with the domain's expert among the top 2.\n"]
        route_rows, per_layer = [], []
        for label, route in routes:
            tr, pl = routing_rows(label, route, domains)
            route_rows, per_layer = route_rows + tr, per_layer + pl
        md += [md_table(["MoE", "test text", "tokens"] + [f"→ {d}" for d in domains] +
                        ["own expert", "per layer min / med / max",
                         f"layers > 60% (of {len(per_layer) // len(domains) // len(routes)})",
                         "own in top-2"], route_rows), ""]
        save_csv(f"lora_moe_routing{args.tag}.csv", per_layer)
        score_rows, table = [], []
        for label, r in scores.items():
            row = {"row": label}
            for tname in tasks:
                row[tname] = ppl(r, tname) if tname.endswith("_ppl") else r[tname].score
            score_rows.append(row)
            table.append([label] + [f"{row[t]:.3f}" for t in tasks])
        save_csv(f"lora_moe_scores{args.tag}.csv", score_rows)
        wa = next(r for r in score_rows if r["row"] == "weight averaging (experts)")
        verdict = [[r["row"]] + [f"{r[f'{d}_ppl']:.3f} vs {wa[f'{d}_ppl']:.3f} "
                                 f"({relative(r[f'{d}_ppl'], wa[f'{d}_ppl'])})" for d in domains]
                   for r in score_rows if r["row"].startswith("MoE")]
        md += ["Test perplexity (lower is better)" + ("; `*_next_line`: accuracy" if args.next_line else "") + ":\n",
               md_table(["row"] + tasks, table), "",
               md_table(["MoE perplexity vs weight averaging"] + domains, verdict), "",
               "Gate prompts (first 80 characters of the first two per domain): " +
               "; ".join(f"{d}: " + " | ".join(repr(x[:80]) for x in prompts[d][:2]) for d in domains), ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(md) + "\n"
    (RESULTS / f"lora_moe{args.tag}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    from mergecore.cli import run_script

    sys.exit(run_script(main, "bench/lora_moe.py"))
