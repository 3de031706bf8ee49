"""Values a merge must refuse or warn about: parameters must be finite, a merged tensor that turns
non-finite from finite inputs is an error (unless --allow-nonfinite), and non-finite values
already in a source are a warning with counts. Every refusal follows the CLI contract: exit 2,
one `error:` line, nothing left at the output path.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _merge_helpers import linear, run_bad, run_cli, task_arithmetic
from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.io.source import ModelSource
from mergecore.methods import get_method
from mergecore.params import interpolate, resolve


# ------------------------------------------------------------------------------ finite parameters


@pytest.mark.parametrize("value, shown", [(float("inf"), "inf"), (float("-inf"), "-inf"), (float("nan"), "nan")])
def test_non_finite_weight_is_refused(tmp_path, capsys, llama_family, value, shown):
    """Before: exit 0 and a checkpoint whose every value was inf or NaN."""
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], llama_family["b"], weight=value))
    assert f"parameter 'weight' ({llama_family['a']}, " in msg
    assert f"must be a finite number, got {shown}" in msg


def test_non_finite_lambda_is_refused(tmp_path, capsys, llama_family):
    msg = run_bad(tmp_path, capsys, task_arithmetic(llama_family["base"], llama_family["a"], float("nan")))
    assert "parameter 'lambda'" in msg and "must be a finite number, got nan" in msg


def test_non_finite_yaml_literal(tmp_path, capsys, llama_family):
    rpath = tmp_path / "recipe.yml"
    rpath.write_text(f"merge_method: linear\nmodels:\n  - model: {llama_family['a']}\n    parameters: {{weight: .inf}}\n"
                     f"  - model: {llama_family['b']}\n    parameters: {{weight: 1}}\n")
    capsys.readouterr()
    assert main(["merge", str(rpath), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "parameter 'weight'" in err[0] and "finite number, got inf" in err[0]
    assert not (tmp_path / "out").exists()


def test_coerce_huge_and_string_values():
    spec = get_method("task_arithmetic").param("lambda")
    for value, shown in ((10**400, "1000"), ("1e400", "inf"), ("-inf", "-inf")):
        with pytest.raises(MergeError, match="parameter 'lambda' \\(t\\) must be a finite number, got " + re.escape(shown)):
            spec.coerce(value, "t")
    with pytest.raises(MergeError) as err:  # before: OverflowError from float(10**400)
        spec.coerce(10**400, "t")
    assert len(str(err.value)) < 200
    assert spec.coerce("2.5", "t") == 2.5 and spec.coerce(-1e308, "t") == -1e308
    max_iter = get_method("karcher").param("max_iter")  # an int parameter with a range
    with pytest.raises(MergeError, match=r"parameter 'max_iter' \(t\) = -1000.* is out of range \[0, inf\)"):
        max_iter.coerce(-(10**400), "t")  # before: OverflowError from float() in the range check


def test_curve_with_huge_int_anchor_is_named():
    assert interpolate([10**400, 0], 0.0) == math.inf  # before: OverflowError
    assert not math.isfinite(interpolate([0, -(10**400)], 1.0))
    spec = get_method("linear").param("weight")
    with pytest.raises(MergeError, match=r"parameter 'weight' \(m, t\) must be a finite number"):
        spec.coerce(interpolate([10**400, 0], 0.5), "m, t")


def test_param_messages_are_bounded():
    huge = [list(range(1000))] * 1000
    with pytest.raises(MergeError) as err:
        get_method("linear").param("weight").coerce(huge, "m")
    assert len(str(err.value)) < 250
    with pytest.raises(MergeError) as err:
        resolve({"x": huge}, "t", 0.0)
    assert len(str(err.value)) < 250
    with pytest.raises(MergeError) as err:
        resolve([{"filter": "t", "value": 1, "bad": huge}], "t", 0.0)
    assert len(str(err.value)) < 250


# ------------------------------------------------------------------------------ merged values


def _count_from(msg: str) -> tuple[str, int]:
    m = re.search(r"merged tensor '([^']+)' \((\w+)\) has (\d+) ", msg)
    assert m, msg
    return m.group(1), int(m.group(3))


def test_lambda_overflow_names_the_tensor(tmp_path, capsys, llama_family):
    """lambda: -1e308 is finite, but float32 math makes every value of every tensor inf/NaN.
    Before: exit 0 with such a checkpoint."""
    msg = run_bad(tmp_path, capsys, task_arithmetic(llama_family["base"], llama_family["a"], -1e308))
    name, count = _count_from(msg)
    assert "(task_arithmetic)" in msg and "although its inputs are finite" in msg and "--allow-nonfinite" in msg
    assert count == ModelSource(str(llama_family["a"])).info(name).numel


def test_allow_nonfinite_keeps_going(tmp_path, capsys, llama_family):
    out = tmp_path / "merged"
    rc, stdout, err = run_cli(tmp_path, capsys, task_arithmetic(llama_family["base"], llama_family["a"], -1e308),
                              "--allow-nonfinite", out=out)
    assert rc == 0, err
    assert "wrote" in stdout
    sd = load_file(out / "model.safetensors")
    a = load_file(llama_family["a"] / "model.safetensors")
    base = load_file(llama_family["base"] / "model.safetensors")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        tau = a[name] - base[name]
        assert (~torch.isfinite(sd[name])).sum().item() == sd[name].numel()
        assert torch.isnan(sd[name]).sum().item() == (tau == 0).sum().item()  # -inf * 0 is NaN


def test_cast_overflow_names_the_dtype(tmp_path, capsys, llama_family):
    """Finite in float32, beyond float16's 65504 after the cast: the output check runs after it."""
    lam = 1e7
    msg = run_bad(tmp_path, capsys, task_arithmetic(llama_family["base"], llama_family["a"], lam), "--dtype", "float16")
    name, count = _count_from(msg)
    assert "out of the range of float16, non-finite after the cast" in msg
    a = load_file(llama_family["a"] / "model.safetensors")[name]
    base = load_file(llama_family["base"] / "model.safetensors")[name]
    expected = (~torch.isfinite((base + lam * (a - base)).to(torch.float16))).sum().item()
    assert count == expected and count > 0
    rc, _, err = run_cli(tmp_path, capsys, task_arithmetic(llama_family["base"], llama_family["a"], lam))
    assert rc == 0, err  # the same merge in float32 is finite


def test_merge_in_memory_applies_the_check(llama_family):
    from mergecore.executor import merge_in_memory
    from mergecore.plan import plan_merge
    from mergecore.recipe import recipe_from_dict

    recipe = recipe_from_dict(task_arithmetic(llama_family["base"], llama_family["a"], -1e308))
    with pytest.raises(MergeError, match=r"merged tensor '.+' \(task_arithmetic\) has \d+ non-finite values"):
        merge_in_memory(plan_merge(recipe))
    sd = merge_in_memory(plan_merge(recipe, allow_nonfinite=True))
    assert all(not torch.isfinite(t).any() for n, t in sd.items() if t.is_floating_point() and "norm" in n)


def _with_nan(tmp_path: Path, src: Path, name: str, n_nan: int, n_inf: int) -> Path:
    d = tmp_path / "withnan"
    shutil.copytree(src, d)
    sd = load_file(d / "model.safetensors")
    t = sd[name].clone()
    flat = t.view(-1)
    flat[:n_nan] = float("nan")
    flat[n_nan:n_nan + n_inf] = float("inf")
    sd[name] = t
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_source_nonfinite_is_a_warning_with_counts(tmp_path, capsys, llama_family):
    name = "model.layers.1.self_attn.q_proj.weight"
    bad = _with_nan(tmp_path, llama_family["a"], name, 3, 2)
    out = tmp_path / "merged"
    rc, stdout, err = run_cli(tmp_path, capsys, linear(bad, llama_family["b"]), out=out)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: model '{bad}' holds 5 non-finite values (NaN or inf) in 1 tensor ('{name}'); "
                        f"merged tensors that read them may be non-finite too"]
    assert "error" not in err
    merged = load_file(out / "model.safetensors")
    assert torch.isnan(merged[name]).sum().item() == 3 and torch.isinf(merged[name]).sum().item() == 2
    assert all(torch.isfinite(t).all() for n, t in merged.items() if n != name)


def test_source_nonfinite_in_a_copied_tensor(tmp_path, capsys, llama_family):
    name = "model.embed_tokens.weight"
    bad = _with_nan(tmp_path, llama_family["a"], name, 1, 0)
    rc, _, err = run_cli(tmp_path, capsys, {"merge_method": "passthrough", "models": [{"model": str(bad)}]})
    assert rc == 0, err
    assert f"warning: model '{bad}' holds 1 non-finite value (NaN or inf) in 1 tensor ('{name}')" in err
