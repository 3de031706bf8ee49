"""Browser test of the Recipe tab (Playwright drives Debian's chromium against the app on the
miniature fmnist-vit demo, one page for the whole test): every method of the registry is chosen
and a field of it typed into, and across them every field kind (number, choice, flag, text,
curve anchors) is, with the YAML preview and the plan following; an out-of-range value is
refused at its field; a method given more models than it takes says so and is fixed under
"Models in the recipe"; broken YAML is refused beside the editor with its line and column and
the text kept; a mergekit slerp recipe is previewed, applied, and its `t` is in the curve panel
with a warning that its Llama filters match no tensor of the ViT.
"""

from __future__ import annotations

import re
import time

import pytest

from _app_helpers import CHROMIUM_ARGS, chromium, playwright

pytest_plugins = ("_app_helpers",)

KINDS = ("number", "choice", "flag", "text")


@pytest.fixture(scope="module")
def page(fmnist_server):
    from playwright.sync_api import expect

    url, _ = fmnist_server
    with playwright()() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1360, "height": 1000})
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(url)
            expect(pg.get_by_text("Compatible", exact=False).first).to_be_visible(timeout=30_000)
            pg.get_by_role("tab", name="Recipe").click()
            expect(pg.locator("#recipe-yaml .cm-content")).to_contain_text("merge_method: ties", timeout=15_000)
            yield pg
            assert not errors, errors
        finally:
            browser.close()


def _kind(f: dict) -> str:
    return "flag" if f["type"] == "bool" else "choice" if f["choices"] else "number" if f["numeric"] else "text"


def _elem(key: str) -> str:
    return "#field-" + key.replace("@", "--").replace(".", "_")


def _number(f: dict) -> str:
    lo, hi = f["range"] or (None, None)
    v = lo + 0.25 * (hi - lo) if lo is not None and hi is not None else 0.25 if lo is None or lo <= 0.25 else lo + 1
    return str(3 if f["type"] == "int" else round(v, 4))


def _choose(page, elem: str, option: str) -> None:
    page.locator(f"{elem} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _type(page, elem: str, text: str) -> None:
    box = page.locator(f"{elem} textarea, {elem} input[type=text]").first
    box.fill(text)
    box.press("Enter")


def _set_yaml(page, text: str) -> None:
    editor = page.locator("#recipe-yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    editor.fill(text)


def type_field(page, f: dict, yaml) -> None:
    """Type a new value into field `f` (of its kind) and see the YAML preview follow."""
    from playwright.sync_api import expect

    elem, kind, name = _elem(f["key"]), _kind(f), f["param"]
    expect(page.locator(elem).first).to_be_visible(timeout=10_000)
    if kind == "number":
        value = _number(f)
        _type(page, elem, value)
        want = f"{name}: {value}"
    elif kind == "choice":
        value = str(f["choices"][1])
        _choose(page, elem, value)
        want = f"{name}: {value}"
    elif kind == "flag":
        box = page.locator(f"{elem} input[type=checkbox]")
        expect(box).to_be_enabled()
        was = box.is_checked()
        box.click()
        want = f"{name}: {'false' if was else 'true'}"
    else:
        _type(page, elem, "coeffs")
        want = f"{name}: coeffs"
    expect(yaml).to_contain_text(want, timeout=10_000)
    expect(page.locator(elem).first).not_to_contain_text("⚠")


def type_anchors(page, f: dict, yaml) -> None:
    """The field's curve, typed into the anchors box, in the YAML."""
    from playwright.sync_api import expect

    page.locator(_elem(f["key"]) + "-curve").click()
    anchors = "2, 4" if f["type"] == "int" else "0.2, 0.4"
    expect(page.locator("#curve-editor")).to_contain_text(f["label"], timeout=10_000)
    _type(page, "#curve-anchors", anchors)
    expect(yaml).to_contain_text(f"{f['param']}: [{anchors}]", timeout=10_000)


def test_every_method_and_field_kind_in_a_browser(page, fmnist_demo):
    from playwright.sync_api import expect

    from app import forms
    from app import state as st
    from mergecore.methods import all_methods

    state = st.new_session()
    for name, path in fmnist_demo.models.items():
        state = st.add_model(state, str(path), path, name=name)
    state["base"] = fmnist_demo.base
    yaml, plan, status = page.locator("#recipe-yaml .cm-content"), page.locator("#recipe-plan textarea"), \
        page.locator("#recipe-status")

    # every field is enabled (fields made inside gr.render came up disabled)
    fields = page.locator("[id^=field-] textarea, [id^=field-] input")
    expect(fields.first).to_be_visible()
    assert fields.count() > 10 and all(fields.nth(i).is_enabled() for i in range(fields.count()))

    # an out-of-range value is refused at its field; the recipe keeps the old one
    _type(page, "#field-density--fmnist_tops", "2.5")
    expect(page.locator("#field-density--fmnist_tops")).to_contain_text("out of range (0, 1]", timeout=10_000)
    expect(yaml).to_contain_text("density: [0.3, 0.7]")
    _type(page, "#field-density--fmnist_tops", "0.2, 0.8")  # anchors without brackets: a curve
    expect(yaml).to_contain_text("density: [0.2, 0.8]", timeout=10_000)
    expect(page.locator("#field-density--fmnist_tops")).not_to_contain_text("out of range")
    expect(page.locator("#curve-anchors textarea")).to_have_value("0.2, 0.8")  # the curve panel follows

    # every method: chosen, one field typed (each kind, and curve anchors, covered across them)
    timings, covered = {}, set()
    for name, method in all_methods().items():
        t0 = time.time()
        _choose(page, "#recipe-method", name)
        expect(yaml).to_contain_text(f"merge_method: {name}", timeout=15_000)
        fs = forms.form_fields(name, state)
        if fs:  # the form re-rendered for this method (typing earlier would hit the last method's field)
            expect(page.locator(f"#form-{name}")).to_be_visible(timeout=15_000)
        todo = list({_kind(f): f for f in reversed(fs) if _kind(f) not in covered}.values()) or fs[:1]
        for f in todo:
            type_field(page, f, yaml)
            covered.add(_kind(f))
        numeric = [f for f in fs if f["numeric"]]
        if numeric and "anchors" not in covered:
            type_anchors(page, numeric[-1], yaml)
            covered.add("anchors")
        n = len(forms.per_model_targets(method, state))
        if not method.accepts(n):  # said under the method; the plan refuses it too
            expect(status).to_contain_text(forms.model_rule(method), timeout=10_000)
        page.locator("#check-plan").click()  # the dry run follows: the method, the typed parameter
        if method.accepts(n) and "artifacts" not in method.context:
            expect(plan).to_have_value(re.compile(f"^method: {name} .*{todo[-1]['param'] + '=' if todo else ''}",
                                                  re.S), timeout=15_000)
        else:
            expect(plan).to_have_value(re.compile(f"^error: .*{name}"), timeout=15_000)
        timings[name] = round(time.time() - t0, 1)
    assert covered == {*KINDS, "anchors"}, covered
    print("seconds per method:", timings)

    # slerp with four experts: the rule is said at "Models in the recipe"; keeping one fixes it
    _choose(page, "#recipe-method", "slerp")
    box = page.locator("#recipe-models")
    expect(box).to_contain_text("slerp takes exactly 1 model besides the base", timeout=10_000)
    for other in ("fmnist_footwear", "fmnist_other", "digits"):
        box.get_by_label(other).uncheck()
        expect(box.get_by_label(other)).not_to_be_checked(timeout=10_000)
    expect(status).not_to_contain_text("takes exactly", timeout=10_000)
    page.locator("#check-plan").click()
    expect(plan).to_have_value(re.compile("method: slerp"), timeout=15_000)
    expect(yaml).not_to_contain_text("expert_digits")


def test_apply_yaml_errors_preview_and_curves(page, fmnist_demo, tmp_path):
    from playwright.sync_api import expect

    yaml, yaml_status = page.locator("#recipe-yaml .cm-content"), page.locator("#yaml-status")
    _choose(page, "#recipe-method", "ties")
    expect(yaml).to_contain_text("merge_method: ties", timeout=15_000)
    for name in ("fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"):  # all four experts
        page.locator("#recipe-models").get_by_label(name).check()
    expect(yaml).to_contain_text("expert_digits", timeout=10_000)

    # broken YAML: the error beside the editor, with its line and column; the text stays
    _set_yaml(page, "merge_method: ties\nmodels: [")
    page.locator("#apply-yaml").click()
    expect(yaml_status).to_contain_text(re.compile(r"line 2, column \d+"), timeout=10_000)
    expect(yaml).to_contain_text("models: [")
    assert "malformed" not in page.locator("#models-status").inner_text()  # not on the Models tab

    # an out-of-range value is an error when applied, at its line
    m = {k: str(v) for k, v in fmnist_demo.models.items()}
    _set_yaml(page, f"merge_method: ties\nbase_model: {m['base']}\nmodels:\n  - model: {m['fmnist_tops']}\n"
                    f"    parameters: {{weight: 1.0, density: 2.5}}\n")
    page.locator("#apply-yaml").click()
    expect(yaml_status).to_contain_text(re.compile(r"line 5, column \d+: .*density.* out of range"), timeout=10_000)
    expect(yaml).to_contain_text("density: 2.5")

    # a mergekit slerp recipe: previewed (the other experts would leave the recipe, not the session);
    # Cancel keeps everything as it was, the text included
    slerp = (f"slices:\n  - sources:\n      - {{model: {m['base']}, layer_range: [0, 2]}}\n"
             f"      - {{model: {m['fmnist_tops']}, layer_range: [0, 2]}}\nmerge_method: slerp\n"
             f"base_model: {m['base']}\nparameters:\n  t: [{{filter: self_attn, value: [0, 1]}}, "
             f"{{filter: mlp, value: [1, 0]}}, {{value: 0.5}}]\ndtype: float32\n")
    _set_yaml(page, slerp)
    page.locator("#apply-yaml").click()
    preview = page.locator("#yaml-preview")
    expect(preview).to_contain_text("leave out of the recipe (they stay loaded): fmnist_footwear", timeout=10_000)
    expect(preview).to_contain_text("match no tensor")
    page.locator("#yaml-cancel").click()
    expect(yaml_status).to_contain_text("Cancelled", timeout=10_000)
    expect(preview).to_be_hidden()
    expect(yaml).to_contain_text("merge_method: slerp")
    expect(page.get_by_label("Curve for")).not_to_have_value("t")
    # imported as a file: the same preview, applied; its t is in the curve panel, and its Llama
    # filters are said to match nothing here
    (tmp_path / "slerp.yml").write_text(slerp)
    page.locator("#recipe-file input[type=file]").set_input_files(str(tmp_path / "slerp.yml"))
    expect(preview).to_contain_text("leave out of the recipe (they stay loaded): fmnist_footwear", timeout=10_000)
    page.locator("#yaml-confirm").click()
    expect(yaml_status).to_contain_text("Applied", timeout=10_000)
    expect(page.locator("#recipe-status")).to_contain_text("'self_attn', 'mlp' match no tensor", timeout=10_000)
    expect(page.get_by_label("Curve for")).to_have_value("t")
    expect(page.locator("#curve-anchors textarea")).to_have_value(re.compile(r"^0\.5(, 0\.5)+$"))
    expect(page.locator("#curve-editor")).to_contain_text("t — all tensors")
