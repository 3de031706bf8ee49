"""The Recipe tab: the form generated from each method's schema, typed values, split curves that
reach attention and MLP tensors, mergekit recipes imported into the form and written back, and
recipe YAML applied in the running app."""

from __future__ import annotations

import pytest

from _app_helpers import client, poll_merge, recipe_text
from mergecore.errors import MergeError

pytest_plugins = ("_app_helpers",)


@pytest.fixture(scope="module")
def demo_state(demo_family):
    from app import state as st

    s = st.new_session()
    for name, path in demo_family.models.items():
        s = st.add_model(s, str(path), path, name=name)
    s["base"] = "base"
    return s


def test_every_method_gets_a_form_from_its_schema(demo_state):
    from app import forms
    from mergecore.methods import all_methods
    from mergecore.recipe import recipe_from_dict, validate_parameters

    for name, method in all_methods().items():
        fields = forms.form_fields(name, demo_state)
        per_model = [p for p in method.params if p.per_model]
        targets = 2 if method.base in ("required", "optional") else 3
        assert len(fields) == len(method.params) - len(per_model) + targets * len(per_model), name
        form = forms.new_form(name, demo_state)
        recipe = recipe_from_dict(forms.build_recipe_dict(form, demo_state))
        validate_parameters(recipe)
        assert recipe.merge_method == name
        assert (recipe.base_model is not None) == (method.base in ("required", "optional")), name


def test_values_parse_and_validate(demo_state):
    from app import forms, values

    form = forms.new_form("ties", demo_state)
    f = forms.field_by_key(form, demo_state, "density@variant_a")
    assert values.text_to_value(f, "0.4") == 0.4
    assert values.text_to_value(f, "[0.2, 0.8]") == [0.2, 0.8]
    assert values.text_to_value(f, "{attn: [0, 1], mlp: 0.5}") == {"attn": [0, 1], "mlp": 0.5}
    with pytest.raises(MergeError, match="out of range"):
        values.text_to_value(f, "1.5")
    with pytest.raises(MergeError, match="attn, mlp and other"):
        values.text_to_value(f, "{foo: 1}")
    with pytest.raises(MergeError):
        values.text_to_value(f, "[0.2, banana]")
    text = values.value_to_text({"attn": [0.0, 1.0], "mlp": [1.0, 0.0], "other": 0.5})
    assert values.text_to_value(f, text) == {"attn": [0.0, 1.0], "mlp": [1.0, 0.0], "other": 0.5}


def test_split_curves_reach_attention_and_mlp_tensors(demo_state):
    from app import curves, forms
    from mergecore.plan import plan_merge

    form = forms.new_form("ties", demo_state)
    form = curves.set_split(form, demo_state, "weight@variant_a", True)
    form = curves.set_curve(form, demo_state, "weight@variant_a", [0.0, 1.0], group="attn")
    form = curves.set_curve(form, demo_state, "weight@variant_a", [1.0, 0.0], group="mlp")
    d = forms.build_recipe_dict(form, demo_state)
    w = d["models"][0]["parameters"]["weight"]
    assert w == [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": [1.0, 0.0]},
                 {"value": 0.5}]
    plan = plan_merge(forms.build_recipe(form, demo_state))
    got = {(j.layer, "attn" if "self_attn" in j.out_name else "mlp" if "mlp" in j.out_name else "other"):
           j.params["weight"][0] for j in plan.jobs if j.layer in (0, 5)}
    assert got[(0, "attn")] == 0.0 and got[(5, "attn")] == 1.0
    assert got[(0, "mlp")] == 1.0 and got[(5, "mlp")] == 0.0
    assert got[(0, "other")] == 0.5
    # a preset through the curve editor's path, then back to one curve for all tensors
    from mergecore.params import preset_curve

    form = curves.set_curve(form, demo_state, "density@variant_b", preset_curve("bell", 0.2, 0.9, 5))
    assert curves.get_curve(form, "density@variant_b") == preset_curve("bell", 0.2, 0.9, 5)
    form = curves.set_split(form, demo_state, "weight@variant_a", False)
    assert form["values"]["weight@variant_a"] == [0.0, 1.0]
    md = curves.formula_markdown(form, demo_state)
    assert "θ₀ = **base**" in md and "| density · variant_b |" in md


MERGEKIT_SLERP = """
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 6]}}
      - {{model: {b}, layer_range: [0, 6]}}
merge_method: slerp
base_model: {a}
parameters:
  t: [{{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}, {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}, {{value: 0.5}}]
dtype: float32
"""

MERGEKIT_TIES = """
models:
  - model: {base}
  - model: {a}
    parameters: {{density: 0.53, weight: 0.4}}
  - model: {b}
    parameters: {{density: [0.2, 0.8], weight: 0.6}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
"""


def test_mergekit_recipes_import_into_the_form(demo_family):
    from app import forms, values
    from app import state as st
    from app.forms import import_recipe
    from mergecore.recipe import parse_recipe

    m = {k: str(v) for k, v in demo_family.models.items()}
    roots = list(demo_family.models.values())  # where the imported recipe's models may be (app.paths)
    text = MERGEKIT_TIES.format(base=m["base"], a=m["variant_a"], b=m["variant_b"])
    state, form, notes = import_recipe(text, st.new_session(), roots)
    assert state["base"] == "base" and form["method"] == "ties"
    assert form["values"]["density@variant_b"] == [0.2, 0.8] and form["values"]["int8_mask"] is True
    again = parse_recipe(forms.recipe_yaml(form, state))
    orig = parse_recipe(text)
    assert again.parameters == orig.parameters
    assert [x.parameters for x in again.models] == [x.parameters for x in orig.models if x.parameters]

    text = MERGEKIT_SLERP.format(a=m["base"], b=m["variant_a"])
    state, form, notes = import_recipe(text, st.new_session(), roots)
    assert form["slices"] and any("slices" in n for n in notes)
    assert form["values"]["t"] == {"attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "other": 0.5}
    again = parse_recipe(forms.recipe_yaml(form, state))
    assert again.parameters == parse_recipe(text).parameters and again.slices == parse_recipe(text).slices
    llama = ("self_attn", ("mlp",))
    assert values.value_from_recipe([{"filter": "self_attn", "value": 1}, {"value": 0}], llama) == {"attn": 1, "other": 0}
    for kept in ([{"filter": "attention", "value": 1}],  # matches no Llama tensor: keep it as it is
                 [{"filter": "mlp", "value": 1}, {"filter": "self_attn", "value": 0}],  # order matters
                 [{"filter": "self_attn", "value": "x"}]):
        assert values.value_from_recipe(kept, llama) == {"raw": kept}
    vit = ("attention", ("intermediate", "output.dense"))
    assert values.value_from_recipe([{"filter": "intermediate", "value": 1}], vit) == {"raw": [{"filter": "intermediate", "value": 1}]}
    with pytest.raises(MergeError, match="line"):
        import_recipe("merge_method: ties\nmodels: [", st.new_session(), roots)
    with pytest.raises(MergeError, match="unknown merge method"):
        import_recipe("merge_method: nope\nmodels: [{model: x}]", st.new_session(), roots)



def test_client_applies_recipe_yaml_and_merges_it(app_server, demo_family):
    url, _ = app_server
    c = client(url)
    m = {k: str(v) for k, v in demo_family.models.items()}
    out = c.predict(MERGEKIT_SLERP.format(a=m["base"], b=m["variant_b"]), api_name="/import_yaml")
    assert "Recipe loaded" in out[-1]
    assert "merge_method: slerp" in recipe_text(out)
    out = c.predict("merge_method: ties\nmodels: [", api_name="/import_yaml")
    assert out[-1].startswith("**Error:**") and "line" in out[-1]
    c.predict(api_name="/merge")
    assert "Merged" in poll_merge(c)[2]


def test_scale_ends_and_formula_come_from_the_method(demo_state):
    from app import curves, forms
    from mergecore.methods import get_method

    form = forms.new_form("ties", demo_state)
    field = forms.field_by_key(form, demo_state, "weight@variant_a")
    ends = get_method("ties").param("weight").end_labels
    names = {"base": "base", "model": "variant_a", "other": "variant_a"}
    assert curves.endpoint_labels(field, demo_state) == (ends.low.format(**names), ends.high.format(**names))
    assert f"`{get_method('ties').formula_text}`" in curves.formula_markdown(form, demo_state)


def test_relative_artifacts_are_taken_in_the_search_folder(demo_family, tmp_path):
    from app import forms
    from app import state as st

    (tmp_path / "coefficients.safetensors").write_bytes(b"")
    text = (f"merge_method: linear\nmodels:\n  - model: {demo_family.models['base']}\n    parameters: {{weight: 1.0}}\n"
            f"artifacts: {{coefficients: coefficients.safetensors}}\n")
    roots = [*demo_family.models.values(), tmp_path]
    state, form, _ = forms.import_recipe(text, st.new_session(), roots, search_dirs=[tmp_path])
    assert form["search_dirs"] == [str(tmp_path)] and "coefficients: coefficients.safetensors" in forms.recipe_yaml(
        form, state)  # the recipe keeps its relative path; the merge looks for it in the search folder
    assert forms.sync_form(form, state)["search_dirs"] == [str(tmp_path)]
    with pytest.raises(MergeError, match="outside the folders"):  # elsewhere it is not the search's file
        forms.import_recipe(text, st.new_session(), roots[:-1], search_dirs=[tmp_path])
