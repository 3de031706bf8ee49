"""What the Recipe tab shows, as plain functions its handlers call: the method's line, the checks
(method rules, filters that match nothing), the YAML and formula of the form, the curve panel,
one field's update after a value was typed, and the "Models in the recipe" box.

Messages stay where the action happened: a field's error is shown at the field (its `info` line,
marked `mc-field-error`) and as a toast; the checks under the method.
"""

from __future__ import annotations

from typing import Any, Optional

import gradio as gr

from mergecore.errors import MergeError

from app import curves, forms
from app import state as st
from app.render import error_md
from app.values import GROUP_LABELS, fmt, is_raw, is_split, value_to_text

ANCHORS_INFO = "numbers separated by commas, e.g. 0.2, 0.5, 0.8 (Enter applies)"


def method_text(name: str) -> str:
    m = forms.get_method(name)
    base = {"required": "needs a base model", "optional": "base model optional", "ignored": "no base model"}[m.base]
    return f"**{m.name}** — {m.summary} ({base}; {forms.model_rule(m).removeprefix(m.name + ' ')})"


def field_error(err: Any) -> dict[str, Any]:
    """A field's update for a value that was refused: the message at the field (and a toast)."""
    gr.Warning(str(err))
    return gr.update(info=f"⚠ {err}", elem_classes=["mc-field-error"])


def field_ok(field: dict[str, Any], value: Any = None, *, text: bool = False) -> dict[str, Any]:
    """A field's update for a value that was taken: its help back, and the value as it is kept."""
    upd = gr.update(info=field["help"] or None, elem_classes=[])
    if text:
        upd["value"] = value_to_text(value) if field["numeric"] or is_raw(value) else str(value or "")
    return upd


def checks(form: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """What is wrong or suspicious with the form's recipe: the method's rules (a base it needs, the
    number of models it takes), filters that match no tensor of the models."""
    try:
        return forms.constraint_problems(form, state) + forms.recipe_warnings(form, state)
    except MergeError as err:
        return [str(err)]


def recipe_views(form: dict[str, Any], state: dict[str, Any], status: str = "") -> tuple[Any, Any, Any]:
    """(yaml, status, formula) for the current form; the status adds the checks."""
    if not form or not form.get("values") and not state.get("models"):
        return "", status or "Add models on the Models tab (or load the demo).", ""
    found = checks(form, state)
    try:
        text = forms.recipe_yaml(form, state)
        problem = ""
    except MergeError as err:
        text, problem = gr.skip(), "" if found else error_md(err)  # the checks say why
    try:
        formula = curves.formula_markdown(form, state)
    except MergeError as err:
        formula = error_md(err)
    lines = [x for x in (status, problem) if x] + [f"⚠ {c}" for c in found]
    return text, "\n\n".join(lines), formula


def models_box(form: dict[str, Any], state: dict[str, Any]):
    """The "Models in the recipe" box: the models the method could take (ticked: those the recipe
    lists), the method's rule, and what breaks it."""
    if not form or not form.get("method") or not state.get("models") or form.get("slices"):
        return gr.CheckboxGroup(choices=[], value=[], visible=False)
    method = forms.get_method(form["method"])
    candidates = forms.per_model_targets(method, state)
    used = forms.per_model_targets(method, state, form)
    base = state.get("base") if method.base != "ignored" else None
    problems = [p for p in forms.constraint_problems(form, state) if "takes" in p]
    info = f"⚠ {problems[0]}" if problems else forms.model_rule(method, base) + "; the others stay loaded"
    return gr.CheckboxGroup(choices=candidates, value=used, visible=True, info=info,
                            elem_classes=["mc-field-error"] if problems else [])


def _y_range(field: dict[str, Any], anchors: list[float]) -> tuple[float, float]:
    lo, hi = field["range"] or (None, None)
    vmin, vmax = min(anchors + [0.0]), max(anchors + [1.0])
    lo = lo if lo is not None else vmin - 0.5
    hi = hi if hi is not None else vmax + 0.5
    if field["type"] == "int" and hi - lo > 50:
        hi = lo + max(10, vmax - lo + 5)
    return float(lo), float(hi)


def curve_panel(form: dict[str, Any], state: dict[str, Any], key: Optional[str], group: str = "attn"):
    """(editor, anchors box, split checkbox, group radio, labels) for the curve target `key`. A
    value kept as imported (a filter list) shows what it gives on these models."""
    anchors_box = gr.update(value="", info=ANCHORS_INFO, elem_classes=[])
    if not form or not key or key not in form.get("values", {}):
        return (gr.update(value=[0.5, 0.5], title="choose a parameter under 'Curve for'", label_low="",
                          label_high="", layers=st.num_layers(state or {})), anchors_box, False,
                gr.Radio(visible=False), "")
    try:
        field = forms.field_by_key(form, state, key)
        value = form["values"][key]
        imported = is_raw(value)
        split = is_split(curves.effective(value, state))
        g = group if split else "all"
        anchors = curves.get_curve(form, key, g, state=state)
    except MergeError as err:
        return (gr.update(value=[0.5, 0.5], title=f"{key}: kept as imported"), anchors_box, False,
                gr.Radio(visible=False), error_md(err))
    low, high = curves.endpoint_labels(field, state, form)
    y_min, y_max = _y_range(field, anchors)
    editor = gr.update(value=anchors, layers=st.num_layers(state), y_min=y_min, y_max=y_max, label_low=low,
                       label_high=high, title=f"{field['label']} — {GROUP_LABELS[g]}")
    labels = (f"**{field['label']}** ({GROUP_LABELS[g]}): bottom line **{low}**, top line **{high}**. "
              f"Drag the round points; squares show the value each layer gets."
              + (f" Range {field['range_text']}." if field["range_text"] else ""))
    if imported:
        labels += (" Its value is an imported filter list, shown as it applies to these models; "
                   "editing the curve replaces it.")
    radio = gr.Radio(visible=split, value=group if split else "attn")
    anchors_box["value"] = ", ".join(fmt(a) for a in anchors)
    return editor, anchors_box, split, radio, labels


def parse_anchors(text: str, field: dict[str, Any]) -> list[float]:
    """Anchors typed into the anchors box, each in the field's range (MergeError if not)."""
    from app.values import check_value

    parts = (text or "").replace("[", " ").replace("]", " ").replace(",", " ").split()
    try:
        anchors = [float(x) for x in parts]
    except ValueError:
        anchors = []
    if not anchors:
        raise MergeError("anchors: write numbers like 0.2, 0.5, 0.8")
    return check_value(field, anchors)
