"""Merge speed and memory: mergecore vs. mergekit on three ~1B-parameter Llama checkpoints.

    python bench/merge_speed.py [--mergekit PATH/TO/mergekit-yaml] [--models DIR] [--repeats N]

Builds (once, cached) a base and two "fine-tunes" (base + 0.01 N(0,1) noise), bf16, hidden 2048,
16 layers, intermediate 5632, vocab 32000; then times cold-cache merges (page cache dropped
before each run where allowed, else the input files are evicted with posix_fadvise) of
TIES (base + 2, density 0.5, weight 0.5) and linear (2 models, weight 0.5), and of any other
registered method named in --methods (base + 2 at its defaults; data-informed methods on
synthetic statistics of the real shapes, see `synthetic_stats`). Each run is a
separate process; wall time and its peak RSS (wait4) are printed as a table. With --mergekit
the same recipes run through mergekit, alternating with mergecore, and ratios are printed.
Outputs are checked against a plain reference implementation of the equations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _proc import run_measured  # noqa: E402
from mergecore.io.source import ModelSource, fadvise_dontneed  # noqa: E402
from mergecore.threads import check_threads  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def build_models(root: Path) -> dict[str, Path]:
    """Base (seed 0) and two noisy variants (seeds 1, 2), bf16, written tensor by tensor."""
    import transformers as tf
    from safetensors.torch import save_file

    paths = {n: root / n for n in ("base", "ft_a", "ft_b")}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        for p in paths.values():  # folders built before architectures were recorded
            cfg_file = p / "config.json"
            cfg = json.loads(cfg_file.read_text())
            if not cfg.get("architectures"):
                cfg["architectures"] = ["LlamaForCausalLM"]
                cfg_file.write_text(json.dumps(cfg, indent=2))
        return paths
    cfg = tf.LlamaConfig(**LLAMA_1B)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device("meta"):
        skeleton = tf.LlamaForCausalLM(cfg)
    names = [(n, tuple(p.shape)) for n, p in skeleton.state_dict().items()]
    for name, seed in (("base", None), ("ft_a", 1), ("ft_b", 2)):
        t0 = time.time()
        gen_base = torch.Generator().manual_seed(0)
        gen_noise = torch.Generator().manual_seed(seed or 0)
        sd = {}
        for tname, shape in names:
            if "norm" in tname:
                w = torch.ones(shape)
            else:
                w = torch.randn(shape, generator=gen_base) * 0.02
            if seed is not None:
                w += torch.randn(shape, generator=gen_noise) * 0.01
            sd[tname] = w.to(torch.bfloat16)
        paths[name].mkdir(parents=True, exist_ok=True)
        save_file(sd, str(paths[name] / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(paths[name])
        del sd
        print(f"built {name} in {time.time() - t0:.0f} s", flush=True)
    return paths


def method_recipe(method: str, models: dict[str, Path], stats: Optional[Path] = None) -> str:
    """A recipe for any other registered method: base + the two fine-tunes (as three models for a
    method without a base) at the method's own defaults (required parameters at their starting values), bf16 out; a data-informed method
    reads `stats`."""
    from mergecore.methods import get_method

    m = get_method(method)
    start = m.starting_params()
    per_model = {p.name: start[p.name] for p in m.per_model_params if p.required}
    glob = {p.name: start[p.name] for p in m.global_params if p.required}
    lines = [f"merge_method: {method}"]
    if m.base != "ignored":
        lines.append(f"base_model: {models['base']}")
    lines.append("models:")
    # a method that takes no base (CART) merges all three checkpoints: with two, CART is their average
    for name in ("ft_a", "ft_b") if m.base != "ignored" else ("base", "ft_a", "ft_b"):
        lines.append(f"  - model: {models[name]}")
        if per_model:
            lines.append(f"    parameters: {json.dumps(per_model)}")
    if glob:
        lines.append(f"parameters: {json.dumps(glob)}")
    if m.stats:
        lines.append(f"artifacts: {{stats: {stats}}}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def recipes(models: dict[str, Path]) -> dict[str, str]:
    return {
        "ties": f"""merge_method: ties
base_model: {models['base']}
models:
  - model: {models['ft_a']}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {models['ft_b']}
    parameters: {{density: 0.5, weight: 0.5}}
parameters:
  normalize: true
dtype: bfloat16
""",
        "linear": f"""merge_method: linear
models:
  - model: {models['ft_a']}
    parameters: {{weight: 0.5}}
  - model: {models['ft_b']}
    parameters: {{weight: 0.5}}
dtype: bfloat16
""",
    }


def synthetic_stats(method: str, models: dict[str, Path], root: Path) -> Optional[Path]:
    """Statistics for a data-informed method on the random Llamas (which have no tokenizer or
    data): Gram matrices of 256 random activations per linear input, or Fisher values as squares
    of random gradients, written with the engine's own statistics writer and cached. The merge's
    time and memory do not depend on the values, only on the shapes, which are the real ones."""
    from mergecore.methods import get_method

    kind = get_method(method).stats
    if not kind:
        return None
    path = root / f"stats-{kind}.safetensors"
    if not path.is_file():
        t0 = time.time()
        write_synthetic_stats(kind, [models["ft_a"], models["ft_b"]], path, rows=256, seed=0)
        print(f"wrote synthetic {kind} statistics in {time.time() - t0:.0f} s ({path.stat().st_size / 2**30:.1f} GiB)",
              flush=True)
    return path


def write_synthetic_stats(kind: str, folders: list[Path], path: Path, rows: int = 256, seed: int = 0) -> None:
    """Statistics of `kind` for the models in `folders`, in the engine's format (`mergecore.stats.store`):
    per model, one Gram (XᵀX/N of `rows` random activations) per distinct linear input of each
    layer (q/k/v share the attention input, gate/up the MLP input, as the collector stores them),
    or a Fisher value per parameter (squares of random gradients)."""
    from mergecore.stats.store import tensor_key, write_stats

    gen = torch.Generator().manual_seed(seed)
    src = ModelSource(str(folders[0]))
    names = [n for n in src.tensors if n.endswith(".weight")]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"kind": kind, "models": [{"name": str(f), "path": str(f.resolve())} for f in folders],
                            "tasks": ["synthetic"] * len(folders), "examples": [rows] * len(folders),
                            "rows": [rows] * len(folders), "seed": seed}
    if kind == "fisher":
        norms = []
        for i in range(len(folders)):
            total = 0.0
            for n in src.tensors:
                f = torch.randn(src.info(n).shape, generator=gen).pow_(2)
                total += float(f.pow(2).sum())
                tensors[tensor_key(i, n)] = f
            norms.append(total ** 0.5)
        meta.update(fisher_norm=norms, estimator=["sampled"] * len(folders))
    else:
        share = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
        inputs = {}
        for n in names:
            if len(src.info(n).shape) != 2 or "embed_tokens" in n:
                continue
            key = n
            for leaf, first in share.items():
                if f".{leaf}." in n:
                    key = n.replace(f".{leaf}.", f".{first}.")
            inputs[n] = key
        for i in range(len(folders)):
            for key in sorted(set(inputs.values())):
                d = src.info(key).shape[1]
                x = torch.randn(rows, d, generator=gen)
                tensors[tensor_key(i, key)] = x.T @ x / rows
        meta.update(inputs=inputs, transposed=[])
        if kind == "gram_plusplus":
            from mergecore.methods.regmean import DEFAULT_RATIO

            meta.update(ratio=DEFAULT_RATIO, stack="model.layers")
    src.close()
    write_stats(path, tensors, meta)


def drop_cache(files: list[Path]) -> str:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fadvise_dontneed(f)
        return "fadvise"


def timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Run cmd; return (wall seconds, its own peak RSS GiB, exit status)."""
    m = run_measured(cmd, env)
    if m.returncode != 0:
        print(f"command failed ({m.returncode}): {' '.join(cmd)}\n{m.output[-2000:]}", file=sys.stderr)
    return m.wall_s, m.peak_rss_gib, m.returncode


def reference_ties(base: torch.Tensor, fts: list[torch.Tensor], density: float, weights: list[float]) -> torch.Tensor:
    """Plain TIES from the paper's equations (float32): trim, elect sign by sum, disjoint mean."""
    base = base.float()
    deltas = []
    for ft in fts:
        d = ft.float() - base
        k = int(density * d.numel())
        mask = torch.zeros(d.numel(), dtype=torch.bool)
        mask[torch.topk(d.abs().flatten(), k).indices] = True
        deltas.append(d * mask.view_as(d))
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    stacked = torch.stack(deltas) * w
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    num = (stacked * agree).sum(0)
    den = (w * agree).sum(0).clamp(min=1e-8)
    return base + num / den


def check_outputs(kind: str, out: Path, models: dict[str, Path], names: list[str]) -> str:
    res = ModelSource(str(out))
    src = {k: ModelSource(str(v)) for k, v in models.items()}
    worst = 0.0
    agree = []
    for n in names:
        got = res.read(n).float()
        if kind == "linear":
            ref = (0.5 * src["ft_a"].read(n).float() + 0.5 * src["ft_b"].read(n).float()).to(torch.bfloat16).float()
            worst = max(worst, (got - ref).abs().max().item())
        else:
            ref = reference_ties(src["base"].read(n), [src["ft_a"].read(n), src["ft_b"].read(n)], 0.5, [0.5, 0.5])
            ref = ref.to(torch.bfloat16).float()
            agree.append(((got - ref).abs() <= 1e-2 * ref.abs().clamp(min=1e-3)).float().mean().item())
    if kind == "linear":
        return f"max |out - bf16(0.5a+0.5b)| = {worst:.3g}"
    return f"agreement with reference TIES: {min(agree) * 100:.2f}% (min over {len(names)} tensors)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path(os.environ.get("MERGECORE_BENCH_DIR", Path.home() / ".cache/mergecore/bench-1b")))
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml for side-by-side runs")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", default="ties,linear")
    ap.add_argument("--threads", type=int, default=None, help="mergecore --threads (default: its own)")
    ap.add_argument("--keep", action="store_true", help="keep outputs")
    ap.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    args = ap.parse_args()
    args.threads = check_threads(args.threads)

    models = build_models(args.models)
    files = [p / "model.safetensors" for p in models.values()]
    work = Path(tempfile.mkdtemp(prefix="mergebench-", dir=args.models))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    rows = []
    check_names = ["model.layers.3.mlp.down_proj.weight", "model.layers.10.self_attn.q_proj.weight", "model.norm.weight"]
    try:
        for kind in args.methods.split(","):
            rfile = work / f"{kind}.yml"
            known = recipes(models)
            rfile.write_text(known[kind] if kind in known else
                             method_recipe(kind, models, synthetic_stats(kind, models, args.models)))
            mc_out, mk_out = work / f"mc-{kind}", work / f"mk-{kind}"
            tools = [("mergecore", mc_out, [sys.executable, "-m", "mergecore.cli", "merge", str(rfile), str(mc_out), "--quiet"]
                      + (["--threads", str(args.threads)] if args.threads else []))]
            if args.mergekit:
                tools.append(("mergekit", mk_out, [args.mergekit, str(rfile), str(mk_out), "--device", "cpu", "--no-cuda"]))
            for rep in range(args.repeats):
                for tool, out, cmd in tools:
                    shutil.rmtree(out, ignore_errors=True)
                    how = drop_cache(files + [out])
                    wall, rss, rc = timed_run(cmd, env)
                    note = (f"FAILED ({rc})" if rc != 0 else check_outputs(kind, out, models, check_names)
                            if kind in known else "output checked by the method's unit tests")
                    rows.append({"method": kind, "tool": tool, "run": rep + 1, "wall_s": wall, "peak_rss_gib": rss, "cache": how, "check": note})
                    print(json.dumps(rows[-1]), flush=True)
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    ties = [r["wall_s"] for r in rows if r["method"] == "ties" and r["tool"] == "mergecore"]
    print(f"{'method':<17} {'tool':<10} {'wall s':>8} {'peak RSS GiB':>13} {'wall ratio':>11} {'RSS ratio':>10} "
          f"{'vs TIES':>8}  check")
    for kind in args.methods.split(","):
        for tool in ("mergecore", "mergekit"):
            rs = [r for r in rows if r["method"] == kind and r["tool"] == tool]
            if not rs:
                continue
            wall = min(r["wall_s"] for r in rs)
            rss = max(r["peak_rss_gib"] for r in rs)
            mk = [r for r in rows if r["method"] == kind and r["tool"] == "mergekit"]
            ratio_w = f"{wall / min(r['wall_s'] for r in mk):.2f}x" if mk else "-"
            ratio_r = f"{rss / max(r['peak_rss_gib'] for r in mk):.2f}x" if mk else "-"
            vs_ties = f"{wall / min(ties):.2f}x" if ties and tool == "mergecore" else "-"
            print(f"{kind:<17} {tool:<10} {wall:>8.1f} {rss:>13.2f} {ratio_w:>11} {ratio_r:>10} {vs_ties:>8}  "
                  f"{rs[-1]['check']}")
    return 0


if __name__ == "__main__":
    from mergecore.cli import run_script

    sys.exit(run_script(main, "bench/merge_speed.py"))
