"""Helpers shared by the engine tests: reading checkpoints, writing recipes, running the CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergecore.cli import main

ROOT = Path(__file__).resolve().parents[1]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (single file or sharded), via safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(path / f))
        return out
    return load_file(path / "model.safetensors")


def linear_recipe(a: Path, b: Path, wa=0.5, wb=0.5, **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": wa}}, {"model": str(b), "parameters": {"weight": wb}}],
        **extra,
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def leftovers(out: Path) -> list[str]:
    """Hidden temporary / old folders the writer may have left beside `out`."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", atol: float = 1e-6) -> None:
    assert actual.shape == expected.shape, name
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def run_forward(path: Path, arch: str) -> torch.Tensor:
    import transformers as tf

    torch.manual_seed(0)
    if arch == "vit":
        model = tf.AutoModelForImageClassification.from_pretrained(path)
        with torch.no_grad():
            out = model(pixel_values=torch.randn(2, 1, 16, 16)).logits
        assert out.shape == (2, 3)
    elif arch == "bert":
        model = tf.AutoModel.from_pretrained(path)
        with torch.no_grad():
            out = model(input_ids=torch.randint(0, 96, (2, 7))).last_hidden_state
        assert out.shape == (2, 7, 32)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            out = model(input_ids=torch.randint(0, 96, (2, 7))).logits
        assert out.shape == (2, 7, 96)
    assert torch.isfinite(out).all()
    return out


def cli(*args) -> int:
    """`mergecore merge ARGS --quiet`; the exit status."""
    return main(["merge", *map(str, args), "--quiet"])


def frankenmerge(base: Path) -> dict:
    """A passthrough recipe that stacks layers 0-2 and 1-3 of `base` (6 layers out of 4)."""
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(base), "layer_range": [0, 3]}]},
                       {"sources": [{"model": str(base), "layer_range": [1, 4]}]}]}


def run_cli(tmp_path: Path, capsys, recipe: dict, *extra: str, out: Path | None = None) -> tuple[int, str, str]:
    """`mergecore merge` on `recipe` (written to tmp_path/recipe.yml): status, stdout, stderr."""
    rpath = tmp_path / "recipe.yml"
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = out or tmp_path / "merged"
    capsys.readouterr()
    rc = main(["merge", str(rpath), str(out), "--quiet", "--threads", "1", *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_bad(tmp_path: Path, capsys, recipe: dict, *extra: str) -> str:
    """The CLI contract for bad input: exit 2, one `error:` line, nothing at or beside the output."""
    out = tmp_path / "merged"
    rc, stdout, err = run_cli(tmp_path, capsys, recipe, *extra, out=out)
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")] == []
    return lines[0]


def linear(*models: Path, weight: Any = 0.5) -> dict:
    """A linear recipe giving every model the same weight."""
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": weight}} for m in models]}


def task_arithmetic(base: Path, model: Path, lam: float) -> dict:
    """Task arithmetic of one model onto `base`, scaled by `lam`."""
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(model), "parameters": {"weight": 1.0}}], "parameters": {"lambda": lam}}


def run_mergekit(jobs: list[dict[str, str]], work: Path, timeout: int = 900) -> tuple[dict[str, dict], str]:
    """Run mergekit 0.1.5 (its own virtualenv: $MERGEKIT_PYTHON or .venv-mergekit) on `jobs`
    ({recipe, out, ...}); returns each job's status by recipe file stem, and the end of its stderr.
    Skips the test without mergekit; fails it instead when MERGECORE_REQUIRE_MERGEKIT is set."""
    env_py = os.environ.get("MERGEKIT_PYTHON")
    local = ROOT / ".venv-mergekit" / "bin" / "python"
    py = env_py if env_py and Path(env_py).exists() else (str(local) if local.exists() else None)
    if py is None:
        if os.environ.get("MERGECORE_REQUIRE_MERGEKIT"):
            pytest.fail("MERGECORE_REQUIRE_MERGEKIT is set but no mergekit virtualenv was found")
        pytest.skip("mergekit is not installed (scripts/test.sh installs it into .venv-mergekit)")
    (work / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([py, str(ROOT / "tests/tools/mergekit_driver.py"), str(work / "jobs.json")],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    status = {Path(rec["recipe"]).stem: rec for rec in
              (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    return status, proc.stderr[-3000:]
