"""Parameter values (curves, filters, presets, precedence) and the recipe schema / YAML format."""

from __future__ import annotations

import math

import pytest

from mergecore.errors import MergeError
from mergecore.params import (
    UNSET,
    filter_matches,
    interpolate,
    layer_position,
    preset_curve,
    resolve,
    sample_curve,
)
from mergecore.plan import plan_merge
from mergecore.recipe import Recipe, parse_recipe, recipe_from_dict, validate_parameters

ATTN = "model.layers.2.self_attn.q_proj.weight"
MLP = "model.layers.2.mlp.down_proj.weight"
NORM = "model.layers.2.input_layernorm.weight"

# ------------------------------------------------------------------------------ curves


@pytest.mark.parametrize(
    "anchors, t, expected",
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.0, 0.5, 1.0], 0.75, 0.75),
        ([1, 3, 2], 0.25, 2.0),  # halfway between anchors 0 and 1
        ([1, 3, 2], 0.5, 3.0),  # exactly on the middle anchor
        ([1, 3, 2], 0.75, 2.5),
        ([1, 3, 2], 1.0, 2.0),
        ([0.2, 0.8], 1 / 3, 0.4),
        ([0.0, 1.0], -0.5, 0.0),  # clamped
        ([0.0, 1.0], 1.5, 1.0),  # clamped
        ([0.7], 0.9, 0.7),  # a single anchor is a constant
    ],
)
def test_interpolate_numeric(anchors, t, expected):
    assert interpolate(anchors, t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "t, expected",
    [(0.0, "a"), (0.25, "a"), (0.49, "a"), (0.5, "b"), (0.99, "b"), (1.0, "c")],
)
def test_interpolate_non_numeric_is_stepped(t, expected):
    assert interpolate(["a", "b", "c"], t) == expected


def test_interpolate_bools_are_stepped_not_averaged():
    assert interpolate([True, False], 0.4) is True
    assert interpolate([True, False], 1.0) is False
    # a mixed list is not numeric either
    assert interpolate([0, "x"], 0.6) == 0


def test_layer_position_and_sample_curve():
    assert [layer_position(i, 4) for i in range(4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert sample_curve([0, 1], 4) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert sample_curve([0.2, 1.0, 0.2], 5) == pytest.approx([0.2, 0.6, 1.0, 0.6, 0.2])
    assert sample_curve(0.3, 3) == [0.3, 0.3, 0.3]
    # interpolation happens at layer/(n-1) exactly: layer 1 of 4 with [0, 1] is 1/3
    assert interpolate([0, 1], layer_position(1, 4)) == 1 / 3


# ------------------------------------------------------------------------------ filters


def test_resolve_scalar_none_and_curve():
    assert resolve(0.5, ATTN, 0.3) == 0.5
    assert resolve("sum", ATTN, 0.3) == "sum"
    assert resolve(None, ATTN, 0.3) is UNSET
    assert resolve([0.0, 1.0], ATTN, 0.25) == pytest.approx(0.25)


def test_first_matching_filter_wins():
    value = [
        {"filter": "self_attn", "value": 1.0},
        {"filter": "attn", "value": 2.0},
        {"filter": "q_proj", "value": 3.0},
        {"value": 4.0},
    ]
    assert resolve(value, ATTN, 0.0) == 1.0  # all of the first three match; the first wins
    assert resolve(value, "transformer.h.0.attn.c_attn.weight", 0.0) == 2.0
    assert resolve(value, MLP, 0.0) == 4.0  # catch-all
    # order matters: the catch-all first shadows everything after it
    assert resolve([{"value": 9.0}] + value, ATTN, 0.0) == 9.0


def test_star_and_missing_filter_match_everything():
    assert filter_matches("*", "anything") and filter_matches(None, "anything")
    assert resolve([{"filter": "*", "value": 0.3}], MLP, 0.0) == 0.3
    assert resolve([{"value": 0.4}], "lm_head.weight", 0.0) == 0.4
    assert not filter_matches("mlp", ATTN)


def test_filter_value_may_be_a_curve():
    value = [{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "self_attn", "value": [1.0, 0.0, 1.0]}, {"value": 0.5}]
    assert resolve(value, MLP, 0.25) == pytest.approx(0.25)
    assert resolve(value, MLP, 1.0) == pytest.approx(1.0)
    assert resolve(value, ATTN, 0.25) == pytest.approx(0.5)
    assert resolve(value, ATTN, 0.5) == pytest.approx(0.0)
    assert resolve(value, NORM, 0.25) == 0.5


def test_no_matching_filter_is_unset():
    assert resolve([{"filter": "mlp", "value": 0.3}], ATTN, 0.0) is UNSET


def test_bad_filter_entries_raise():
    with pytest.raises(MergeError, match="needs 'value'"):
        resolve([{"filter": "mlp"}], MLP, 0.0)
    with pytest.raises(MergeError, match="needs 'value'"):
        resolve([{"filter": "mlp", "value": 1, "extra": 2}], MLP, 0.0)
    with pytest.raises(MergeError, match="scalar, a list or a list of filters"):
        resolve({"a": 1}, MLP, 0.0)


# ------------------------------------------------------------------------------ presets


def test_preset_curves():
    assert preset_curve("ramp_up", 0.0, 1.0, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert preset_curve("ramp_up", 0.2, 0.6, 3) == [0.2, 0.4, 0.6]
    assert preset_curve("ramp_down", 0.0, 1.0, 3) == [1.0, 0.5, 0.0]
    assert preset_curve("u_shape", 0.0, 1.0, 5) == [1.0, 0.25, 0.0, 0.25, 1.0]
    assert preset_curve("u_shape", 0.2, 0.6, 3) == [0.6, 0.2, 0.6]
    bell_edge = round(math.exp(-0.5 * (0.5 / 0.2) ** 2), 4)  # 0.0439
    bell_quarter = round(math.exp(-0.5 * (0.25 / 0.2) ** 2), 4)  # 0.4578
    assert preset_curve("bell", 0.0, 1.0, 5) == [bell_edge, bell_quarter, 1.0, bell_quarter, bell_edge]
    assert bell_edge == 0.0439 and bell_quarter == 0.4578
    # flat is constant at `low` (one anchor, the same at every layer)
    flat = preset_curve("flat", 0.3, 0.9, 5)
    assert flat == [0.3]
    assert sample_curve(flat, 4) == [0.3] * 4
    # values are rounded to 4 decimals
    assert preset_curve("ramp_up", 0.0, 1.0, 4) == [0.0, 0.3333, 0.6667, 1.0]


def test_preset_errors():
    with pytest.raises(MergeError, match="unknown curve preset 'zigzag'.*ramp_up"):
        preset_curve("zigzag", 0, 1)
    with pytest.raises(MergeError, match="at least one point"):
        preset_curve("ramp_up", 0, 1, 0)


# ------------------------------------------------------------------------------ recipes

FULL_RECIPE = """\
merge_method: ties
base_model: org/base
models:
  - model: org/fine-tune-a
    parameters:
      weight: 0.5
      density: [0.3, 0.7]
  - model: org/fine-tune-b
    parameters:
      weight:
        - filter: self_attn
          value: 0.7
        - filter: mlp
          value: [0.2, 0.8]
        - value: 0.5
      density: 0.5
parameters:
  normalize: true
dtype: bfloat16
tokenizer_source: base
seed: 7
"""

MERGEKIT_SLICES = """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""


def test_recipe_parses_readme_example():
    r = parse_recipe(FULL_RECIPE)
    assert r.merge_method == "ties" and r.base_model == "org/base"
    assert [m.model for m in r.models] == ["org/fine-tune-a", "org/fine-tune-b"]
    assert r.models[0].parameters == {"weight": 0.5, "density": [0.3, 0.7]}
    assert r.models[1].parameters["weight"][1] == {"filter": "mlp", "value": [0.2, 0.8]}
    assert r.parameters == {"normalize": True}
    assert r.dtype == "bfloat16" and r.tokenizer_source == "base" and r.seed == 7
    assert r.referenced_models() == ["org/base", "org/fine-tune-a", "org/fine-tune-b"]
    validate_parameters(r)


@pytest.mark.parametrize("text", [FULL_RECIPE, MERGEKIT_SLICES])
def test_yaml_round_trip(text):
    r = parse_recipe(text)
    again = parse_recipe(r.to_yaml())
    assert again == r
    assert again.to_yaml() == r.to_yaml()


def test_round_trip_of_extensions():
    r = recipe_from_dict({
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": [0.1, 0.9]}},
                         {"model": "b", "layer_range": [2, 4]}],
             "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]},
             "merge_method": "linear"},
        ],
        "parameters": {"weight": 0.5, "normalize": False},
        "non_layer_from": "a",
        "out_dtype": "float16",
        "chat_template": "chatml",
        "name": "x",
    })
    assert parse_recipe(r.to_yaml()) == r


def test_mergekit_slices_recipe_parses():
    r = parse_recipe(MERGEKIT_SLICES)
    assert r.models is None and len(r.slices) == 1
    srcs = r.slices[0].sources
    assert [s.model for s in srcs] == ["psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B"]
    assert [s.layer_range for s in srcs] == [(0, 40), (0, 40)]
    assert r.parameters["t"][2] == {"value": 0.5}
    assert r.referenced_models() == ["psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B"]
    validate_parameters(r)
    # the filter resolves like mergekit: layer 10 of 40 on the self_attn curve
    t = layer_position(10, 40)
    assert resolve(r.parameters["t"], "model.layers.10.self_attn.q_proj.weight", t) == pytest.approx(
        interpolate([0, 0.5, 0.3, 0.7, 1], 10 / 39))
    assert resolve(r.parameters["t"], "model.norm.weight", 0.0) == 0.5


def test_validate_parameters_unused_parameter_is_a_warning():
    # mergekit ignores parameters a method does not read; so do we, but we say so
    r = parse_recipe("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weigth: 1.0}\n")
    [msg] = validate_parameters(r)
    assert msg.startswith("models[0] (a): parameter 'weigth' is not used by method 'linear'")
    assert "did you mean 'weight'?" in msg
    r = parse_recipe("merge_method: linear\nmodels: [{model: a}]\nparameters: {density: 0.5}\n")
    [msg] = validate_parameters(r)
    assert msg.startswith("parameters: parameter 'density' is not used by method 'linear'")
    assert "did you mean" not in msg and "normalize, weight" in msg
    # one line per key, however many models carry it
    r = parse_recipe("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nmodels:\n"
                     "  - {model: a, parameters: {weight: 1}}\n  - {model: b, parameters: {weight: 1}}\n")
    assert validate_parameters(r) == ["models[0] (a) and 1 more: parameter 'weight' is not used by method "
                                      "'slerp' and is ignored (its parameters: t)"]
    assert validate_parameters(parse_recipe("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n")) == []


def test_validate_parameters_bad_filter_entry():
    r = parse_recipe("merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: [{filter: mlp}]}\n")
    with pytest.raises(MergeError, match="each filter entry needs 'value'"):
        validate_parameters(r)


def test_validate_parameters_unknown_method():
    r = parse_recipe("merge_method: blend\nmodels: [{model: a}]\n")
    with pytest.raises(MergeError, match="unknown merge method 'blend'; valid methods: .*linear"):
        validate_parameters(r)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("merge_method: linear\n", "exactly one of 'models', 'slices' or 'modules'"),
        ("merge_method: linear\nmodels: []\n", "'models' is empty"),
        ("merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n",
         "exactly one of"),
        ("merge_method: linear\nmodels: [{model: a}]\nmodel_typo: 1\n", "unknown key 'model_typo' \\(valid keys: merge_method"),
        ("merge_method: linear\nslices: [{sources: []}]\n", "at least one source"),
        ("- a\n- b\n", "expected a mapping at the top level, got list"),
        ("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n", "line 4, column"),
    ],
)
def test_recipe_schema_errors(text, pattern):
    with pytest.raises(MergeError, match=pattern):
        parse_recipe(text)


def test_recipe_error_is_one_line():
    with pytest.raises(MergeError) as err:
        parse_recipe("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n", where="r.yml")
    assert "\n" not in str(err.value) and str(err.value).startswith("r.yml: line 4")


# ------------------------------------------------------------------------------ precedence


def _weights_by_tensor(plan) -> dict[str, list[float]]:
    return {j.out_name: j.params["weight"] for j in plan.jobs}


def test_precedence_slice_source_then_slice_then_global(llama_family):
    a, b = str(llama_family["a"]), str(llama_family["b"])
    recipe = recipe_from_dict({
        "merge_method": "linear",
        "slices": [{
            "sources": [
                {"model": a, "layer_range": [0, 4], "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}]}},
                {"model": b, "layer_range": [0, 4]},
            ],
            "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]},
        }],
        "parameters": {"weight": 0.1},
    })
    plan = plan_merge(recipe)
    w = _weights_by_tensor(plan)
    for i in range(4):
        # a: its own filter for self_attn; slice filter for mlp; global for the rest
        assert w[f"model.layers.{i}.self_attn.q_proj.weight"] == [0.9, 0.1]
        assert w[f"model.layers.{i}.mlp.up_proj.weight"] == [0.3, 0.3]
        assert w[f"model.layers.{i}.input_layernorm.weight"] == [0.1, 0.1]
    assert w["model.embed_tokens.weight"] == [0.1, 0.1]
    assert w["lm_head.weight"] == [0.1, 0.1]


def test_precedence_with_models_recipe_and_curves(llama_family):
    a, b = str(llama_family["a"]), str(llama_family["b"])
    recipe = recipe_from_dict({
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 0.6]}]}},
            {"model": b},
        ],
        "parameters": {"weight": [{"filter": "self_attn", "value": [1.0, 0.0]}, {"value": 0.25}], "normalize": False},
    })
    plan = plan_merge(recipe)
    w = _weights_by_tensor(plan)
    for i in range(4):
        t = i / 3
        assert w[f"model.layers.{i}.mlp.gate_proj.weight"] == pytest.approx([0.6 * t, 0.25])
        assert w[f"model.layers.{i}.self_attn.k_proj.weight"] == pytest.approx([1 - t, 1 - t])
        assert w[f"model.layers.{i}.post_attention_layernorm.weight"] == [0.25, 0.25]
    # embeddings and heads take the first value of a curve (t = 0)
    assert w["model.embed_tokens.weight"] == [0.25, 0.25]
    assert all(j.params["normalize"] is False for j in plan.jobs)


def test_unresolved_required_parameter_names_model_and_tensor(llama_family):
    a, b = str(llama_family["a"]), str(llama_family["b"])
    recipe = recipe_from_dict({
        "merge_method": "linear",
        "models": [{"model": a, "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}}, {"model": b, "parameters": {"weight": 1.0}}],
    })
    with pytest.raises(MergeError, match=f"needs parameter 'weight' for model '{a}'"):
        plan_merge(recipe)


def test_recipe_constructed_in_python_validates():
    r = Recipe(merge_method="linear", models=[{"model": "a"}])
    assert r.models[0].model == "a" and r.models[0].parameters is None
    assert parse_recipe(r.to_yaml()) == r
