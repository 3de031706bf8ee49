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
    c.predict(api_name="/load_demo")
    m = {k: str(v) for k, v in demo_family.models.items()}
    # naming one of the two variants: previewed first (variant_a leaves the recipe, not the session)
    out = c.predict(MERGEKIT_SLERP.format(a=m["base"], b=m["variant_b"]), api_name="/import_yaml")
    assert "Nothing has changed yet" in out[-1]
    assert "leave out of the recipe (they stay loaded): variant_a" in out[-2]
    out = c.predict(api_name="/confirm_yaml")
    assert out[-1].startswith("**Applied**: slerp of base, variant_b")
    assert "merge_method: slerp" in recipe_text(out)
    out = c.predict("merge_method: ties\nmodels: [", api_name="/import_yaml")
    assert out[-1].startswith("**Error:** recipe: line 2, column 10: malformed YAML")
    assert all(not (isinstance(o, str) and "merge_method" in o) for o in out)  # the editor keeps its text
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


# ---------------------------------------------------------------------------------------------
# issue 14: every field checked as typed, method rules in the tab, YAML applied whole, curves


def test_method_rules_and_the_models_in_the_recipe(demo_state):
    from app import forms
    from app.recipe_views import models_box
    from mergecore.plan import plan_merge

    form = forms.new_form("slerp", demo_state)  # slerp takes one model besides the base; the demo has two
    assert forms.constraint_problems(form, demo_state) == [
        "slerp takes exactly 1 model besides the base (base); the recipe has 2 (variant_a, variant_b): "
        "untick all but 1 under 'Models in the recipe' (e.g. keep variant_a)"]
    box = models_box(form, demo_state)
    assert box.value == ["variant_a", "variant_b"] and box.info.startswith("⚠ slerp takes exactly 1 model")
    form = forms.new_form("slerp", demo_state, {**form, "left_out": ["variant_b"]})
    assert forms.constraint_problems(form, demo_state) == [] and models_box(form, demo_state).value == ["variant_a"]
    recipe = forms.build_recipe(form, demo_state)
    assert [m.model for m in recipe.models] == [demo_state["models"][1]["ref"]]
    assert plan_merge(recipe).method.name == "slerp"
    from app.session import clean_form

    assert clean_form(form, demo_state, [])[0]["left_out"] == ["variant_b"]  # kept through a reload
    # the left-out model stays out for another method, and is back when it leaves the session
    ties = forms.new_form("ties", demo_state, form)
    assert [f["model"] for f in forms.form_fields("ties", demo_state, ties) if f["model"]] == ["variant_a"] * 2
    fewer = {**demo_state, "models": demo_state["models"][:2]}
    assert forms.sync_form(ties, fewer)["left_out"] == []
    no_base = {**demo_state, "base": None}
    assert forms.constraint_problems(forms.new_form("ties", no_base), no_base) == [
        "method 'ties' needs a base model: choose one on the Models tab"]
    assert forms.model_rule(forms.get_method("nuslerp")) == "nuslerp takes exactly 2 models besides the base"
    assert forms.model_rule(forms.get_method("linear")) == "linear takes at least 1 model"


def test_fields_are_checked_as_typed_with_the_error_at_the_field(demo_state):
    import gradio as gr

    from app import forms
    from app.recipe_views import parse_anchors
    from app.tabs.recipe import on_field

    form = forms.new_form("ties", demo_state)
    # out of range: the error at the field, the form and everything else as it was
    out = on_field("density@variant_a")("2.5", form, demo_state, None, "attn")
    assert out[0]["info"] == "⚠ density · variant_a = 2.5 is out of range (0, 1]"
    assert out[0]["elem_classes"] == ["mc-field-error"] and all(o == gr.skip() for o in out[1:])
    # a curve typed as anchors: taken, the YAML follows, and the curve panel moves to it
    out = on_field("density@variant_a")("0.2, 0.8", form, demo_state, "weight@variant_a", "attn")
    assert out[0]["value"] == "[0.2, 0.8]" and out[0]["elem_classes"] == []
    assert out[1]["values"]["density@variant_a"] == [0.2, 0.8] and "density: [0.2, 0.8]" in out[2]
    assert out[5]["value"] == "density@variant_a" and out[7]["value"] == "0.2, 0.8"
    # separate curves, and a recipe filter list that means the same on these models (Llamas)
    split = on_field("weight@variant_a")("attn: [0, 1]; mlp: [1, 0]; other: 0.5", form, demo_state, None, "attn")
    assert split[1]["values"]["weight@variant_a"] == {"attn": [0, 1], "mlp": [1, 0], "other": 0.5}
    assert split[0]["value"] == "attn: [0, 1]; mlp: [1, 0]; other: 0.5"  # anchors, not a dict literal
    typed = on_field("weight@variant_a")("[{filter: self_attn, value: 1}, {value: 0}]", form, demo_state, None, "attn")
    assert typed[1]["values"]["weight@variant_a"] == {"attn": 1, "other": 0}
    kept = on_field("weight@variant_a")("[{filter: q_proj, value: 1}, {value: 0}]", form, demo_state, None, "attn")
    assert kept[1]["values"]["weight@variant_a"] == {"raw": [{"filter": "q_proj", "value": 1}, {"value": 0}]}
    bad = on_field("density@variant_a")("[{filter: mlp, value: 3}]", form, demo_state, None, "attn")
    assert "out of range" in bad[0]["info"]
    # a flag and a choice
    out = on_field("normalize", text=False)(False, form, demo_state, None, "attn")
    assert out[1]["values"]["normalize"] is False and "normalize: false" in out[2]
    out = on_field("consensus", text=False)("count", form, demo_state, None, "attn")
    assert "consensus: count" in out[2]
    assert "not one of sum, count" in on_field("consensus", text=False)("median", form, demo_state, None, "attn")[0]["info"]
    # the anchors box: out of range is refused, not clamped
    field = forms.field_by_key(form, demo_state, "density@variant_a")
    assert parse_anchors("0.2, 0.9", field) == [0.2, 0.9]
    with pytest.raises(MergeError, match="out of range"):
        parse_anchors("0, 2", field)


def _recipe(m: dict, method: str, models: list[tuple[str, str]], base: str | None = "base", extra: str = "") -> str:
    lines = [f"merge_method: {method}"] + ([f"base_model: {m[base]}"] if base else []) + ["models:"]
    for name, params in models:
        lines += [f"  - model: {m[name]}"] + ([f"    parameters: {{{params}}}"] if params else [])
    return "\n".join(lines) + "\n" + extra


def test_apply_yaml_is_checked_whole_with_line_and_column(demo_family, demo_state):
    from app import forms, recipe_yaml

    m = {k: str(v) for k, v in demo_family.models.items()}
    roots = list(demo_family.models.values())
    form = forms.new_form("ties", demo_state)
    for text, want in [
        ("merge_method: ties\nmodels: [", "recipe: line 2, column 10: malformed YAML"),
        (_recipe(m, "ties", [("variant_a", "weight: 1.0"), ("variant_b", "weight: 1.0, density: 2.5")]),
         "recipe: line 7, column 31: parameter 'density' (models[1]) = 2.5 is out of range (0, 1]"),
        ("merge_method: tie\nmodels: [{model: x}]", "recipe: line 1, column 1: unknown merge method 'tie'"),
        ("merge_method: ties\nmodels:\n  - modl: x\n", "recipe: line 3, column 5: models.0.model: Field required"),
        (_recipe(m, "slerp", [("variant_a", "")], extra="parameters:\n  t: [{filter: mlp, value: [0, 2]}]\n"),
         "recipe: line 6, column 32: parameter 't' (parameters) = 2.0 is out of range [0, 1]"),
        ("merge_method: linear\nmodels:\n  - model: /etc\n", "recipe: line 3, column 12: model folder /etc is outside"),
    ]:
        with pytest.raises(MergeError) as err:
            recipe_yaml.prepare(text, demo_state, form, roots)
        assert str(err.value).startswith(want), str(err.value)

    # a recipe naming one expert: the other stays loaded, out of the recipe; said before applying
    prep = recipe_yaml.prepare(_recipe(m, "ties", [("variant_a", "weight: 0.7")]), demo_state, form, roots)
    assert [x["name"] for x in prep.state["models"]] == ["base", "variant_a", "variant_b"]
    assert prep.form["left_out"] == ["variant_b"] and prep.needs_confirm
    assert prep.changes == ["leave out of the recipe (they stay loaded): variant_b"]
    assert "leave out of the recipe" in prep.preview_md()
    # a parameter the method does not read: the engine's warning, which names it
    prep = recipe_yaml.prepare(_recipe(m, "ties", [("variant_a", "weight: 0.7"), ("variant_b", "weight: 0.3")],
                                       extra="parameters: {nomalize: true}\n"), demo_state, form, roots)
    assert prep.changes == [] and prep.needs_confirm
    assert any("nomalize" in w and "did you mean 'normalize'" in w for w in prep.warnings)
    # linear without a base: exactly the recipe's models (the session's base is not added at 0.5)
    prep = recipe_yaml.prepare(_recipe(m, "linear", [("variant_a", "weight: 0.3"), ("variant_b", "weight: 0.7")],
                                       base=None), demo_state, form, roots)
    d = forms.build_recipe_dict(prep.form, prep.state)
    assert "base_model" not in d and d["models"] == [{"model": m["variant_a"], "parameters": {"weight": 0.3}},
                                                     {"model": m["variant_b"], "parameters": {"weight": 0.7}}]
    # only values changed: applied at once; a global value of a per-model parameter is each model's
    prep = recipe_yaml.prepare(_recipe(m, "ties", [("variant_a", ""), ("variant_b", "density: 0.4")],
                                       extra="parameters: {weight: 0.25}\n"), demo_state, form, roots)
    assert not prep.needs_confirm and prep.applied_md().startswith("**Applied**: ties of base, variant_a, variant_b")
    assert prep.form["values"]["weight@variant_a"] == prep.form["values"]["weight@variant_b"] == 0.25


def test_llama_filters_on_a_vit_warn_and_show_in_the_curve_panel(model_factory):
    from app import curves, forms, recipe_yaml
    from app import state as st
    from app.recipe_views import curve_panel
    from app.tabs.recipe import RecipeTab

    paths = {"base": model_factory("vit", 0), "a": model_factory("vit", 1, base_seed=0),
             "b": model_factory("vit", 2, base_seed=0)}
    state = st.new_session()
    for name, p in paths.items():
        state = st.add_model(state, str(p), p, name=name)
    form = forms.new_form("ties", state)
    text = MERGEKIT_SLERP.format(a=paths["base"], b=paths["a"]).replace("[0, 6]", "[0, 4]")
    prep = recipe_yaml.prepare(text, state, form, list(paths.values()))
    assert prep.warnings == ["t: filters 'self_attn', 'mlp' match no tensor of the loaded models, so their values "
                             "never apply (here attention tensors match 'attention'; MLP tensors match "
                             "'intermediate', 'output.dense')"]
    assert prep.changes == ["leave out of the recipe (they stay loaded): b"]
    # the curve panel moves to t (it stayed on the previous parameter) and shows what t gives here
    views = RecipeTab(None).views(prep.state, prep.form, "owner", key="density@a")
    assert views[5].value == "t" and views[6]["value"] == [0.5] * 5 and views[6]["title"] == "t — all tensors"
    assert views[7]["value"] == "0.5, 0.5, 0.5, 0.5, 0.5" and "imported filter list" in views[10]
    assert "match no tensor" in views[3]  # said under the method too
    # filters that do select ViT tensors show as separate curves; editing one replaces the import
    vit = [{"filter": "attention", "value": [0, 1]}, {"filter": "output.dense", "value": 0.2}, {"value": 0.7}]
    f2 = {**prep.form, "values": {"t": {"raw": vit}}}
    assert curves.effective(f2["values"]["t"], prep.state) is None  # output.dense is in attention too
    f2["values"]["t"] = {"raw": [vit[0], {"value": 0.7}]}
    assert curves.effective(f2["values"]["t"], prep.state) == {"attn": [0, 1], "mlp": 0.7, "other": 0.7}
    editor, anchors, split, _, _ = curve_panel(f2, prep.state, "t", "attn")
    assert split and editor["value"] == [0.0, 1.0]
    f3 = curves.set_curve(f2, prep.state, "t", [0.5, 0.6], "mlp")
    assert f3["values"]["t"] == {"attn": [0, 1], "mlp": [0.5, 0.6], "other": 0.7}
