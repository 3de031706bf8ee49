"""What a method says about itself (formula, endpoint labels, operator use, starting values) and
`resolve_params`, the parameter path RMM operators share with the executor."""

from __future__ import annotations

import pytest

from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.methods import all_methods, get_method
from mergecore.plan import plan_merge
from mergecore.recipe import recipe_from_dict


def test_every_method_has_a_formula_of_its_own():
    for name, m in all_methods().items():
        assert m.formula and m.formula_text == m.formula, name
        assert "θ" in m.formula, name


def test_endpoint_labels():
    t = get_method("slerp").param("t").end_labels
    assert (t.low, t.high) == ("0 = {base} (base)", "1 = {other}")
    t = get_method("nearswap").param("t").end_labels
    assert (t.low, t.high) == ("0 = keep {base}", "1 = swap in {other} where close")
    weight = get_method("ties").param("weight").end_labels  # the common label of its name
    assert weight.low == "0 = ignore {model}"
    assert get_method("karcher").param("tol").end_labels is None


def test_operators_and_their_starting_values():
    assert not get_method("passthrough").operator and not get_method("dam").operator
    assert all(m.operator for n, m in all_methods().items() if n not in ("passthrough", "dam"))
    assert get_method("ties").starting_params() == {"weight": 1.0, "density": 0.5}
    assert get_method("task_arithmetic").starting_params() == {"weight": 1.0, "density": 0.5, "lambda": 0.3}
    assert get_method("slerp").starting_params() == {"t": 0.5}  # a required float without one: 0.5
    assert get_method("karcher").starting_params() == {}


def test_cli_methods_lists_registered_methods(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in all_methods():
        assert f"\n{name} " in "\n" + text
    assert main(["methods", "linear"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("linear: ") and "weight (float, per-model, required)" in text


def test_cli_shows_the_formula(capsys):
    assert main(["methods", "slerp"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == f"formula: {get_method('slerp').formula}"


def test_resolve_params_coerces_fills_defaults_and_warns():
    ties = get_method("ties")
    values, warnings = ties.resolve_params({"weight": [1, "0.5"], "density": 0.5, "densty": 0.3}, 2, "operator 'a'")
    assert values == {"weight": [1.0, 0.5], "density": [0.5, 0.5], "normalize": True, "rescale": False,
                      "lambda": 1.0, "consensus": "sum", "int8_mask": False}
    assert len(warnings) == 1 and "operator 'a': parameter 'densty' is not used" in warnings[0]
    assert "did you mean 'density'?" in warnings[0]


@pytest.mark.parametrize("raw, n, message", [
    ({"weight": 1.0, "density": 1.5}, 2, r"parameter 'density' \(op\) = 1.5 is out of range \(0, 1\]"),
    ({"weight": [1.0]}, 2, "'weight' needs 2 values, one per model, got 1"),
    ({"density": 0.5, "wieght": 1}, 2, r"needs parameter 'weight' \(op\) \('wieght' in the recipe .*a typo\?\)"),
    ({"weight": 1.0, "lambda": float("inf")}, 2, "parameter 'lambda' \\(op\\) must be a finite number"),
    ({"weight": 1.0, "consensus": "most"}, 2, "is not one of sum, count"),
])
def test_resolve_params_refuses_like_the_executor(raw, n, message):
    with pytest.raises(MergeError, match=message):
        get_method("ties").resolve_params(raw, n, "op")


def test_resolve_params_gives_what_the_executor_gives_a_tensor(llama_family):
    recipe = recipe_from_dict({
        "merge_method": "ties", "base_model": str(llama_family["base"]),
        "models": [{"model": str(llama_family["a"]), "parameters": {"weight": 1.0}},
                   {"model": str(llama_family["b"]), "parameters": {"weight": 0.5}}],
        "parameters": {"density": 0.5, "lambda": 0.8}})
    job = next(j for j in plan_merge(recipe).jobs if j.layer == 1)
    values, _ = get_method("ties").resolve_params({"weight": [1.0, 0.5], "density": 0.5, "lambda": 0.8}, 2)
    assert job.params == values


def test_a_copy_tagged_method_at_its_defaults_is_planned_as_a_byte_copy(llama_family):
    a, b = str(llama_family["a"]), str(llama_family["b"])
    slices = [{"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": [{"model": b, "layer_range": [2, 4]}]}]
    plan = plan_merge(recipe_from_dict({"merge_method": "passthrough", "slices": slices}))
    assert "copy" in get_method("passthrough").tags
    assert plan.jobs and all(j.copy for j in plan.jobs)
    scaled = [dict(s, parameters={"scale": 0.5}) for s in slices]
    plan = plan_merge(recipe_from_dict({"merge_method": "passthrough", "slices": scaled}))
    layer_jobs = [j for j in plan.jobs if j.layer is not None]
    assert layer_jobs and not any(j.copy for j in layer_jobs)


def test_first_values_of_form_fields():
    ties, slerp = get_method("ties"), get_method("slerp")
    assert ties.param("weight").first_value(4) == 0.25  # required: an equal share
    assert ties.param("density").first_value(4) == ties.param("density").default  # optional: its default
    t = slerp.param("t")
    assert t.required and t.first_value(1) == 0.5  # the middle of [0, 1]
    consensus = ties.param("consensus")
    assert consensus.first_value(2) == consensus.default
