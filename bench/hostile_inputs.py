"""Hostile and careless inputs to the CLI, each run in its own process: what happens.

    python bench/hostile_inputs.py [--python PY] [--repo DIR] [--markdown]

Every case builds its own files in a temporary folder (tiny random Llamas saved with
transformers), runs `python -m mergecore.cli ...` from `--repo` (default: this checkout; point it
at another checkout to compare versions side by side), and reports the exit status, the number of
stderr lines and the first `error:`/last line, the peak memory of the process, and what it left:
files of the user's that are gone, temporary folders beside the output, non-finite values in the
output. It asserts nothing: the tests assert the contract; this prints the table for a release
note (`--markdown`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    case: str
    rc: Optional[int]
    lines: int
    message: str
    peak_mb: float
    seconds: float
    left: str


def tiny_llama(path: Path, seed: int, hidden: int = 32, layers: int = 2) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                         tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def run_cli(repo: Path, python: str, args: list[str], cwd: Path, *, timeout: float = 60,
            on_start: Optional[Callable[[subprocess.Popen], None]] = None) -> tuple[Optional[int], str, float, float]:
    """Run the CLI; returns (exit status or None if killed, stderr, peak RSS in MB, seconds)."""
    import threading

    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.time()
    proc = subprocess.Popen([python, "-m", "mergecore.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    if on_start:
        on_start(proc)
    killed = False
    peak_kb = 0
    while True:
        try:  # VmHWM is the high-water mark of this process image (ru_maxrss would include the parent's at fork)
            status_text = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kb = max(peak_kb, int(next(ln.split()[1] for ln in status_text.splitlines() if ln.startswith("VmHWM"))))
        except (OSError, StopIteration, ValueError):
            pass
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.time() - t0 > timeout:
            proc.kill()
            killed = True
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    err = "".join(chunks)
    rc = None if killed else proc.returncode
    if killed:
        err = f"(killed after {timeout:.0f} s) " + err
    return rc, err, peak_kb / 1024, time.time() - t0


def summarize(err: str) -> tuple[int, str]:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("merging", "\r"))]
    errs = [ln for ln in lines if ln.startswith("error:")]
    first = errs[0] if errs else (lines[-1] if lines else "")
    return len(lines), first[:150]


def leftovers(folder: Path, keep: dict[str, bytes]) -> str:
    notes = []
    gone = [k for k, v in keep.items() if not (folder / k).is_file() or (folder / k).read_bytes() != v]
    if gone:
        notes.append(f"LOST {len(gone)} user files ({', '.join(sorted(gone)[:3])})")
    tmp = [p.name for p in folder.rglob(".*.tmp-*")]
    if tmp:
        notes.append(f"left {len(tmp)} temp folder(s)")
    return "; ".join(notes)


def nonfinite(out: Path) -> str:
    from safetensors import safe_open
    import torch

    bad = total = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k).float()
                bad += int((~torch.isfinite(t)).sum())
                total += t.numel()
    return f"output {bad}/{total} values non-finite" if bad else ""


def cases(work: Path) -> list[tuple[str, Callable[[Path], tuple[list[str], Path, dict[str, bytes], Optional[Path], dict]]]]:
    """(name, setup(dir) -> (cli args, cwd, folder of user files to watch, those files, output folder to
    inspect, options))."""
    models = work / "models"
    a = tiny_llama(models / "a", 1)
    b = tiny_llama(models / "b", 2)

    def recipe(d: Path, text: str) -> Path:
        p = d / "r.yml"
        p.write_text(text)
        return p

    linear = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"

    def project(d: Path):
        proj = d / "proj"
        shutil.copytree(a, proj / "model-a")
        shutil.copytree(b, proj / "model-b")
        (proj / "notes.txt").write_text("my notes\n")
        (proj / "r.yml").write_text(linear.replace(str(a), "model-a").replace(str(b), "model-b"))
        keep = {str(p.relative_to(proj)): p.read_bytes() for p in proj.rglob("*") if p.is_file()}
        return ["merge", "r.yml", "."], proj, proj, keep, None, {}

    def into_source(d: Path):
        m = d / "a"
        shutil.copytree(a, m)
        r = recipe(d, linear.replace(str(a), str(m)))
        keep = {p.name: p.read_bytes() for p in m.iterdir()}
        return ["merge", str(r), str(m)], d, m, keep, None, {}

    def foreign_dir(d: Path):
        out = d / "out"
        out.mkdir()
        (out / "thesis.tex").write_text("years of work\n")
        return ["merge", str(recipe(d, linear)), str(out)], d, out, {"thesis.tex": b"years of work\n"}, None, {}

    def alias_bomb(d: Path):
        # anchors in a filter entry that matches nothing; the catch-all entry names the last one,
        # which expands to 9**9 numbers
        anchors = ["&x0 [1,1,1,1,1,1,1,1,1]"] + [f"&x{i} [" + ",".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)]
        text = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight:\n"
                f"        - {{filter: no-such-tensor, value: [{', '.join(anchors)}]}}\n        - {{value: *x8}}\n")
        return ["merge", str(recipe(d, text)), str(d / "out")], d, d, {}, None, {"timeout": 60}

    def weight(value: str, param: str = "weight", method: str = "linear", extra: str = ""):
        def setup(d: Path):
            text = (f"merge_method: {method}\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{{param}: {value}}}\n{extra}"
                    if method != "linear" else linear.replace("weight: 0.5}\n  - model", f"weight: {value}}}\n  - model", 1))
            return ["merge", str(recipe(d, text)), str(d / "out")], d, d, {}, d / "out", {}
        return setup

    def corrupt_header(kind: str):
        def setup(d: Path):
            m = d / "a"
            shutil.copytree(a, m)
            f = m / "model.safetensors"
            raw = f.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + n])
            name = next(k for k in header if k != "__metadata__" and "embed" in k)
            lo, hi = header[name]["data_offsets"]
            if kind == "negative offsets":
                header[name]["data_offsets"] = [lo - 64, hi - 64] if lo >= 64 else [-64, hi - lo - 64]
            elif kind == "reversed offsets":
                header[name]["data_offsets"] = [hi, lo]
            else:  # shape too big for its bytes
                header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
            hb = json.dumps(header).encode()
            hb += b" " * (-len(hb) % 8)
            f.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
            return ["merge", str(recipe(d, linear.replace(str(a), str(m)))), str(d / "out")], d, d, {}, d / "out", {}
        return setup

    def sigterm(d: Path):
        big_a = tiny_llama(d / "big-a", 3, hidden=512, layers=8)
        big_b = tiny_llama(d / "big-b", 4, hidden=512, layers=8)
        r = recipe(d, f"merge_method: ties\nbase_model: {big_a}\nmodels:\n  - model: {big_b}\n"
                      f"    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {big_a}\n")
        return ["merge", str(r), str(d / "out"), "--threads", "1"], d, d, {}, None, {"sigterm": True}

    def threads(d: Path):
        return ["merge", str(recipe(d, linear)), str(d / "out"), "--threads", "100000"], d, d, {}, None, {}

    def non_utf8(d: Path):
        p = d / "r.yml"
        p.write_bytes(linear.encode() + b"# caf\xe9\n")
        return ["merge", str(p), str(d / "out")], d, d, {}, None, {}

    def config_list(d: Path):
        m = d / "a"
        shutil.copytree(a, m)
        (m / "config.json").write_text("[1, 2, 3]")
        return ["merge", str(recipe(d, linear.replace(str(a), str(m)))), str(d / "out")], d, d, {}, None, {}

    def shard_inf(d: Path):
        return ["merge", str(recipe(d, linear)), str(d / "out"), "--shard-size", "inf"], d, d, {}, None, {}

    def slerp_weight(d: Path):
        text = (f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                f"  - model: {b}\n    parameters: {{weight: 0.5}}\nparameters: {{t: 0.5}}\n")
        return ["merge", str(recipe(d, text)), str(d / "out")], d, d, {}, None, {}

    return [
        ("`merge r.yml .` in a project folder", project),
        ("output = a source model's folder", into_source),
        ("output = a non-empty folder mergecore did not write", foreign_dir),
        ("546-byte-class alias bomb recipe", alias_bomb),
        ("`weight: .inf`", weight(".inf")),
        ("`weight: .nan`", weight(".nan")),
        ("`lambda: -1e308` (task_arithmetic)", weight("1.0", "weight", "task_arithmetic", "parameters: {lambda: -1e308}\n")),
        ("safetensors: negative data_offsets", corrupt_header("negative offsets")),
        ("safetensors: reversed data_offsets", corrupt_header("reversed offsets")),
        ("safetensors: shape too big for its bytes", corrupt_header("shape")),
        ("SIGTERM mid-merge", sigterm),
        ("`--threads 100000`", threads),
        ("non-UTF-8 recipe", non_utf8),
        ("config.json is a list", config_list),
        ("`--shard-size inf`", shard_inf),
        ("slerp recipe with `weight:` per model (mergekit runs it)", slerp_weight),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose mergecore runs (default: this one)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args()
    repo = Path(args.repo).resolve()
    rows: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="mergecore-hostile-") as tmp:
        work = Path(tmp)
        for i, (name, setup) in enumerate(cases(work)):
            d = work / f"case{i}"
            d.mkdir()
            cli_args, cwd, watch, keep, out, opts = setup(d)

            def kill_when_writing(proc: subprocess.Popen) -> None:
                deadline = time.time() + 60
                while time.time() < deadline and proc.poll() is None:
                    if list(d.glob(".out.tmp-*")) and any(p.stat().st_size for p in d.glob(".out.tmp-*/*.safetensors")):
                        proc.send_signal(signal.SIGTERM)
                        return
                    time.sleep(0.05)

            rc, err, peak, secs = run_cli(repo, args.python, cli_args, cwd, timeout=opts.get("timeout", 120),
                                          on_start=kill_when_writing if opts.get("sigterm") else None)
            n, msg = summarize(err)
            left = leftovers(watch, keep) if keep else leftovers(d, {})
            if out is not None and out.is_dir() and rc == 0:
                left = "; ".join(x for x in (left, nonfinite(out)) if x)
            rows.append(Outcome(name, rc, n, msg, peak, secs, left))
            print(f"[{i + 1:>2}] {name}: rc={rc} lines={n} {secs:.1f}s {left} | {msg}", file=sys.stderr, flush=True)
    if args.markdown:
        print("| case | exit | stderr lines | s | peak MB | message | left behind |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r.case} | {r.rc} | {r.lines} | {r.seconds:.1f} | {r.peak_mb:.0f} | {r.message.replace('|', '/')} "
                  f"| {r.left or '-'} |")
    else:
        for r in rows:
            print(f"{r.case:<58} rc={r.rc!s:<4} lines={r.lines:<3} {r.seconds:5.1f}s  {r.left or '-'}\n    {r.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
