"""Same recipe, same result: every method against mergekit 0.1.5 on tiny float32 Llamas.

mergekit runs in its own virtualenv (scripts/test.sh creates `.venv-mergekit` and sets
MERGEKIT_PYTHON); all recipes go through one mergekit process (tests/tools/mergekit_driver.py).
Deterministic methods must agree to float32 round-off; randomised ones (DARE, DELLA) draw
different random masks, so for them the size of the change from the base must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _merge_helpers import run_mergekit
from mergecore.io.source import ModelSource
from mergecore.merging import merge
from mergecore.recipe import parse_recipe

RANDOMIZED = {"dare_linear", "dare_ties", "della", "della_linear"}


def _recipes(m: dict[str, Path]) -> dict[str, str]:
    base, a, b, c = (str(m[k]) for k in ("base", "a", "b", "c"))
    two = f"""models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {b}
    parameters: {{weight: [0.2, 0.9], density: [0.4, 0.8]}}
base_model: {base}
dtype: float32
"""
    return {
        "linear": f"""merge_method: linear
models:
  - model: {a}
    parameters: {{weight: [0.3, 0.7]}}
  - model: {b}
    parameters:
      weight: [{{filter: self_attn, value: 0.9}}, {{filter: mlp, value: [0.1, 0.5]}}, {{value: 0.4}}]
dtype: float32
""",
        "linear_slices": f"""merge_method: linear
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 0.25}}}}
      - {{model: {b}, layer_range: [2, 4], parameters: {{weight: 0.75}}}}
  - sources:
      - {{model: {a}, layer_range: [2, 4], parameters: {{weight: [0.5, 1.0]}}}}
      - {{model: {b}, layer_range: [0, 2], parameters: {{weight: 0.5}}}}
dtype: float32
""",
        "task_arithmetic": "merge_method: task_arithmetic\nparameters: {lambda: 0.8}\n" + two,
        "ties": "merge_method: ties\n" + two,
        "ties_unnormalized": "merge_method: ties\nparameters: {normalize: false, lambda: 0.7}\n" + two,
        "dare_linear": "merge_method: dare_linear\n" + two,
        "dare_ties": "merge_method: dare_ties\n" + two,
        "dare_ties_dense": f"""merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 1.0}}
  - model: {b}
    parameters: {{weight: 0.5, density: 1.0}}
dtype: float32
""",
        "breadcrumbs": "merge_method: breadcrumbs\nparameters: {gamma: 0.05}\n" + two,
        "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nparameters: {gamma: 0.05}\n" + two,
        "della": "merge_method: della\nparameters: {epsilon: 0.1}\n" + two,
        "della_linear": "merge_method: della_linear\nparameters: {epsilon: 0.1}\n" + two,
        "sce": f"""merge_method: sce
base_model: {base}
models: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]
parameters: {{select_topk: 0.5}}
dtype: float32
""",
        "slerp": f"""merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {a}}}]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
        "nuslerp": f"""merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
dtype: float32
""",
        "multislerp": f"""merge_method: multislerp
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 2.0}}
  - model: {c}
    parameters: {{weight: 1.0}}
dtype: float32
""",
        "karcher": f"""merge_method: karcher
models: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]
dtype: float32
""",
        "model_stock": f"""merge_method: model_stock
base_model: {base}
models: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]
dtype: float32
""",
        "nearswap": f"""merge_method: nearswap
base_model: {base}
models: [{{model: {base}}}, {{model: {a}}}]
parameters: {{t: 0.01}}
dtype: float32
""",
        "arcee_fusion": f"""merge_method: arcee_fusion
base_model: {base}
models: [{{model: {base}}}, {{model: {a}}}]
dtype: float32
""",
        "ram": f"""merge_method: ram
base_model: {base}
models: [{{model: {a}}}, {{model: {b}}}]
dtype: float32
""",
        "ramplus_tl": f"""merge_method: ramplus_tl
base_model: {base}
models: [{{model: {a}}}, {{model: {b}}}]
parameters: {{r: 0.2, alpha: 0.3}}
dtype: float32
""",
        "passthrough": f"""merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [1, 4], parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}}}]
dtype: float32
""",
    }


@pytest.fixture(scope="module")
def parity_runs(model_factory, tmp_path_factory):
    models = {
        "base": model_factory("llama", 0),
        "a": model_factory("llama", 1, base_seed=0),
        "b": model_factory("llama", 2, base_seed=0),
        "c": model_factory("llama", 3, base_seed=0),
    }
    work = tmp_path_factory.mktemp("parity")
    jobs = []
    for name, text in _recipes(models).items():
        path = work / f"{name}.yml"
        path.write_text(text)
        jobs.append({"recipe": str(path), "out": str(work / f"mk-{name}"), "name": name})
    status, stderr = run_mergekit(jobs, work)
    return models, work, status, stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_recipes({k: Path(k) for k in ("base", "a", "b", "c")})))
def test_same_result_as_mergekit(parity_runs, name):
    models, work, status, stderr = parity_runs
    rec = status.get(name)
    assert rec is not None, f"mergekit produced no result for {name}: {stderr}"
    assert rec["ok"], f"mergekit failed on {name}: {rec['error']}"
    recipe = parse_recipe((work / f"{name}.yml").read_text())
    ours = merge(recipe, work / f"mc-{name}", threads=1).out_dir
    mine, theirs = ModelSource(str(ours)), ModelSource(str(work / f"mk-{name}"))
    assert set(mine.tensors) == set(theirs.tensors)
    ours_cfg = json.loads((ours / "config.json").read_text())
    theirs_cfg = json.loads((work / f"mk-{name}" / "config.json").read_text())
    assert ours_cfg["num_hidden_layers"] == theirs_cfg["num_hidden_layers"]
    base = ModelSource(str(models["base"]))
    method = recipe.merge_method
    randomized = method in RANDOMIZED and name != "dare_ties_dense"
    moved = [0.0, 0.0]
    for tname in mine.tensors:
        x, y = mine.read(tname).float(), theirs.read(tname).float()
        assert x.shape == y.shape, tname
        if randomized:
            # different random masks: compare how far the whole model moved from the base
            b = base.read(tname).float()
            moved[0] += (x - b).pow(2).sum().item()
            moved[1] += (y - b).pow(2).sum().item()
        else:
            diff = (x - y).abs().max().item()
            assert diff <= 1e-5 + 1e-5 * y.abs().max().item(), f"{name} {tname}: max |diff| {diff}"
    if randomized:
        assert moved[0] ** 0.5 == pytest.approx(moved[1] ** 0.5, rel=0.05), f"|Δ| {moved[0] ** 0.5} vs {moved[1] ** 0.5}"
