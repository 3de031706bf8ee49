"""The Recipe tab: the method, its parameter form (one widget per schema field), the per-layer
curve editor, the formula panel and the live recipe YAML (apply edits, import a file, check the
plan).

Named API endpoints: /set_method, /import_yaml, /set_curve, /preset, /plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import gradio as gr

from mergecore.errors import MergeError

from app import curves, forms
from app import state as st
from app.context import AppContext, Page
from app.curve_editor import CurveEditor
from app.render import error_md, notes_md
from app.values import GROUP_LABELS, fmt, is_raw, is_split, text_to_value, value_to_text

PRESETS = {"flat": "flat", "ramp up": "ramp_up", "ramp down": "ramp_down", "U-shape": "u_shape", "bell": "bell"}


class RecipeTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def build(self, page: Page) -> None:
        method = forms.default_method()
        with gr.Tab("Recipe", id="recipe"):
            with gr.Row():
                self.method_dd = gr.Dropdown(label="Method", choices=forms.method_choices(), value=method,
                                             interactive=True, scale=1)
                self.method_md = gr.Markdown(method_text(method))
            self.recipe_status = gr.Markdown("")

            @gr.render(inputs=[page.form_state, page.session_state], triggers=[page.form_version.change])
            def render_form(form, state):
                self.render_fields(form, state, page)

            gr.Markdown("### Per-layer curve")
            with gr.Row():
                self.curve_key_dd = gr.Dropdown(label="Curve for", choices=[], value=None, interactive=True, scale=2)
                self.curve_split = gr.Checkbox(label="separate curves for attention and MLP tensors", value=False,
                                               scale=2)
                self.curve_group = gr.Radio(label="Editing", choices=[("attention", "attn"), ("MLP", "mlp"),
                                                                      ("other tensors", "other")],
                                            value="attn", visible=False, scale=2)
            with gr.Row():
                with gr.Column(scale=3):
                    self.curve_labels = gr.Markdown("")
                    self.curve = CurveEditor([0.5, 0.5], layers=8, elem_id="curve-editor")
                    self.anchors_tb = gr.Textbox(label="Anchors (numbers, kept in sync with the points)",
                                                 elem_id="curve-anchors")
                with gr.Column(scale=1):
                    self.preset_dd = gr.Dropdown(label="Preset", choices=list(PRESETS), value="ramp up")
                    self.preset_lo = gr.Number(label="low", value=0.0)
                    self.preset_hi = gr.Number(label="high", value=1.0)
                    self.preset_n = gr.Slider(label="points", minimum=2, maximum=16, step=1, value=5)
                    self.preset_btn = gr.Button("Apply preset")
            self.formula_md = gr.Markdown("")
            with gr.Accordion("Recipe YAML (live; edit and apply, or import a file)", open=True):
                self.yaml_code = gr.Code(label="recipe.yml", language="yaml", interactive=True, lines=14)
                with gr.Row():
                    self.apply_yaml_btn = gr.Button("Apply YAML", elem_id="apply-yaml")
                    self.plan_btn = gr.Button("Check plan (dry run)")
                self.yaml_file = gr.File(label="Import a recipe file (.yml; mergekit recipes work)",
                                         file_types=[".yml", ".yaml"], type="filepath", height=120)
                self.plan_tb = gr.Textbox(label="Plan", lines=8, max_lines=30, visible=False)
        self.curve_outputs = [self.curve, self.anchors_tb, self.curve_split, self.curve_group, self.curve_labels]

    # -- the session's views ----------------------------------------------------------------------

    def outputs(self, page: Page) -> list[Any]:
        return [self.method_dd, self.method_md, self.yaml_code, self.recipe_status, self.formula_md,
                self.curve_key_dd, *self.curve_outputs]

    def views(self, state: dict[str, Any], form: dict[str, Any], owner: str, *, key: Optional[str] = None,
              group: str = "attn") -> list[Any]:
        method = form.get("method") or forms.default_method()
        targets = curves.curve_targets(form, state) if state.get("models") and form.get("values") else []
        keys = [k for _, k in targets]
        if key not in keys:
            key = next((k for k in keys if isinstance(form["values"].get(k), (list, dict))), keys[0] if keys else None)
        return [method, method_text(method), *recipe_views(form, state), gr.Dropdown(choices=targets, value=key),
                *curve_panel(form, state, key, group)]

    # -- the parameter form (inside gr.render) ----------------------------------------------------

    def render_fields(self, form, state, page: Page) -> None:
        if not form or not form.get("values") or not (state or {}).get("models"):
            gr.Markdown("Load the demo or add models on the **Models** tab to get a parameter form.")
            return
        fields = forms.form_fields(form["method"], state)
        if not fields:
            gr.Markdown(f"*{form['method']} has no parameters.*")
            return
        if form.get("slices"):
            gr.Markdown("This recipe uses **slices** (layer ranges): edit them in the YAML below; "
                        "the form edits the global parameters.")
        by_model: dict[Optional[str], list[dict[str, Any]]] = {None: []}
        for f in fields:
            by_model.setdefault(f["model"], []).append(f)
        with gr.Row(equal_height=False):
            for model, group_fields in by_model.items():
                if (form.get("slices") and model is not None) or not group_fields:
                    continue
                with gr.Column(min_width=220):
                    gr.Markdown(f"**{'global parameters' if model is None else model}**")
                    for f in group_fields:
                        self.field_widget(f, form, page)

    def field_widget(self, f: dict[str, Any], form: dict[str, Any], page: Page) -> None:
        value = form["values"].get(f["key"], f["default"])
        info = f["help"] or None
        key = f["key"]
        elem = "field-" + key.replace("@", "--").replace(".", "_")
        if is_raw(value):
            gr.Textbox(label=f["label"] + " (imported)", value=value_to_text(value), interactive=False,
                       info="kept as imported; edit it in the YAML", elem_id=elem)
            return
        if f["type"] == "bool":
            comp = gr.Checkbox(label=f["label"], value=bool(value), info=info, elem_id=elem)
            events = [comp.input]
        elif f["choices"]:
            comp = gr.Dropdown(label=f["label"], choices=[str(c) for c in f["choices"]], value=str(value), info=info,
                               elem_id=elem)
            events = [comp.input]
        elif f["numeric"]:
            with gr.Row(elem_classes=["mc-field-row"]):
                label = f["label"] + (f"  {f['range_text']}" if f["range_text"] else "")
                comp = gr.Textbox(label=label, value=value_to_text(value), info=info, elem_id=elem, scale=4,
                                  placeholder="0.5, [0.2, 0.8] or {attn: [0, 1], mlp: [1, 0], other: 0.5}")
                btn = gr.Button("curve", size="sm", scale=1, elem_classes=["mc-curve-btn"], elem_id=elem + "-curve")
            events = [comp.submit, comp.blur]

            def pick(form, state, group, _key=key):
                return (gr.Dropdown(value=_key), *curve_panel(form, state, _key, group))

            btn.click(pick, [page.form_state, page.session_state, self.curve_group],
                      [self.curve_key_dd, *self.curve_outputs], api_visibility="private")
        else:
            comp = gr.Textbox(label=f["label"], value=str(value or ""), info=info, elem_id=elem)
            events = [comp.submit, comp.blur]
        inputs = [comp, page.form_state, page.session_state, self.curve_key_dd, self.curve_group]
        outputs = [page.form_state, self.yaml_code, self.recipe_status, self.formula_md, self.curve, self.anchors_tb,
                   self.curve_labels]
        for ev in events:
            ev(on_field(key), inputs, outputs, api_visibility="private")

    # -- events -----------------------------------------------------------------------------------

    def wire(self, page: Page) -> None:
        ctx, refresh = self.ctx, page.refresh
        session = [page.session_state, page.form_state, page.form_version]

        def on_method(method, state, form, version, request: gr.Request):
            try:
                form = forms.new_form(method, state, form) if state.get("models") else {"method": method}
            except MergeError as err:
                return refresh(state, form, version, request, status=error_md(err))
            return refresh(state, form, version, request)

        self.method_dd.input(on_method, [self.method_dd, *session], page.status_outputs, api_name="set_method")

        def import_recipe(text: str | bytes, where: str, state, form, version, request):
            try:
                state, form, notes = forms.import_recipe(text, state, ctx.read_roots(), where,
                                                         (form or {}).get("search_dirs") or ())
            except MergeError as err:
                return refresh(state, form, version, request, status=error_md(err))
            return refresh(state, form, version, request, status=notes_md("Recipe loaded.", notes))

        def on_import_text(text, state, form, version, request: gr.Request):
            return import_recipe(text, "recipe", state, form, version, request)

        self.apply_yaml_btn.click(on_import_text, [self.yaml_code, *session], page.status_outputs,
                                  api_name="import_yaml")

        def on_import_file(path, state, form, version, request: gr.Request):
            if not path:
                return (*page.skip_refresh(), gr.skip())
            from app.paths import read_upload

            try:
                data = read_upload(path, "recipe file")  # over the YAML size limit: refused unread
            except MergeError as err:
                return refresh(state, form, version, request, status=error_md(err))
            return import_recipe(data, f"recipe file {Path(path).name}", state, form, version, request)

        self.yaml_file.upload(on_import_file, [self.yaml_file, *session], page.status_outputs,
                              api_visibility="private")

        def on_plan(state, form):
            try:
                from mergecore.plan import plan_merge

                plan = plan_merge(forms.build_recipe(form, state),
                                  search_dirs=tuple(Path(d) for d in form.get("search_dirs") or ()))
                return gr.Textbox(value=plan.describe(), visible=True)
            except MergeError as err:
                return gr.Textbox(value=f"error: {err}", visible=True)

        self.plan_btn.click(on_plan, [page.session_state, page.form_state], [self.plan_tb], api_name="plan")
        self.wire_curve(page)

    def wire_curve(self, page: Page) -> None:
        def on_curve_key(key, group, state, form):
            return curve_panel(form, state, key, group)

        for comp in (self.curve_key_dd, self.curve_group):
            comp.input(on_curve_key, [self.curve_key_dd, self.curve_group, page.session_state, page.form_state],
                       self.curve_outputs, api_visibility="private")

        def changed(change, key, group, state, form, version):
            """Outputs after `change(form)` changed the curve of `key`: the form is re-rendered to show it."""
            try:
                if not key:
                    raise MergeError("choose a parameter under 'Curve for' first")
                form = change(form)
                return (form, version + 1, *recipe_views(form, state), *curve_panel(form, state, key, group))
            except MergeError as err:
                return (form, version, *recipe_views(form, state, error_md(err)), *curve_panel(form, state, key, group))

        outputs = [page.form_state, page.form_version, self.yaml_code, self.recipe_status, self.formula_md,
                   *self.curve_outputs]
        inputs = [self.curve_key_dd, self.curve_group, self.curve_split, page.session_state, page.form_state,
                  page.form_version]

        def on_curve_edit(anchors, key, group, split, state, form, version):
            return changed(lambda f: curves.set_curve(f, state, key, anchors, group if split else "all"),
                           key, group, state, form, version)

        self.curve.edit(on_curve_edit, [self.curve, *inputs], outputs, api_name="set_curve")

        def on_anchors(text, key, group, split, state, form, version):
            try:
                anchors = [float(x) for x in (text or "").replace("[", " ").replace("]", " ").replace(",", " ").split()]
            except ValueError:
                anchors = []
            if not anchors:
                problem = error_md("anchors: write numbers like 0.2, 0.5, 0.8")
                return (form, version, *recipe_views(form, state, problem), *curve_panel(form, state, key, group))
            return on_curve_edit(anchors, key, group, split, state, form, version)

        self.anchors_tb.submit(on_anchors, [self.anchors_tb, *inputs], outputs, api_visibility="private")
        self.anchors_tb.blur(on_anchors, [self.anchors_tb, *inputs], outputs, api_visibility="private")

        def on_split(split, key, group, state, form, version):
            return changed(lambda f: curves.set_split(f, state, key, bool(split)), key, group, state, form, version)

        self.curve_split.input(on_split, [self.curve_split, self.curve_key_dd, self.curve_group, page.session_state,
                                          page.form_state, page.form_version], outputs, api_visibility="private")

        def on_preset(name, lo, hi, n, key, group, split, state, form, version):
            from mergecore.params import preset_curve

            def apply(f):
                anchors = preset_curve(PRESETS.get(name, "flat"), float(lo or 0), float(hi or 0), int(n or 5))
                anchors = anchors * int(n or 5) if len(anchors) == 1 else anchors
                return curves.set_curve(f, state, key, anchors, group if split else "all")

            return changed(apply, key, group, state, form, version)

        self.preset_btn.click(on_preset, [self.preset_dd, self.preset_lo, self.preset_hi, self.preset_n, *inputs],
                              outputs, api_name="preset")


# ---------------------------------------------------------------------------------------------
# the handlers' work (plain functions)


def method_text(name: str) -> str:
    m = forms.get_method(name)
    base = {"required": "needs a base model", "optional": "base model optional", "ignored": "no base model"}[m.base]
    return f"**{m.name}** — {m.summary} ({base})"


def on_field(key: str):
    """The handler of one form field: the value checked and stored, the views that follow it."""

    def handler(raw, form, state, curve_key, group):
        try:
            field = forms.field_by_key(form, state, key)
            value = text_to_value(field, raw) if isinstance(raw, str) else raw
            form = forms.set_value(form, state, key, value)
            status = ""
        except MergeError as err:
            status = error_md(err)
        yaml_text, rstatus, formula = recipe_views(form, state, status)
        if curve_key == key:
            editor, text, _, _, labels = curve_panel(form, state, key, group)
        else:
            editor, text, labels = gr.skip(), gr.skip(), gr.skip()
        return form, yaml_text, rstatus, formula, editor, text, labels

    return handler


def recipe_views(form: dict[str, Any], state: dict[str, Any], status: str = "") -> tuple[Any, Any, Any]:
    """(yaml, status, formula) for the current form."""
    if not form or not form.get("values") and not state.get("models"):
        return "", status or "Add models on the Models tab (or load the demo).", ""
    try:
        text = forms.recipe_yaml(form, state)
        problem = ""
    except MergeError as err:
        text, problem = gr.skip(), error_md(err)
    try:
        formula = curves.formula_markdown(form, state)
    except MergeError as err:
        formula = error_md(err)
    return text, status or problem, formula


def _y_range(field: dict[str, Any], anchors: list[float]) -> tuple[float, float]:
    lo, hi = field["range"] or (None, None)
    vmin, vmax = min(anchors + [0.0]), max(anchors + [1.0])
    lo = lo if lo is not None else vmin - 0.5
    hi = hi if hi is not None else vmax + 0.5
    if field["type"] == "int" and hi - lo > 50:
        hi = lo + max(10, vmax - lo + 5)
    return float(lo), float(hi)


def curve_panel(form: dict[str, Any], state: dict[str, Any], key: Optional[str], group: str = "attn"):
    """(editor, anchors text, split checkbox, group radio, labels) for the curve target `key`."""
    if not form or not key or key not in form.get("values", {}):
        return (gr.update(value=[0.5, 0.5], title="choose a parameter under 'Curve for'", label_low="",
                          label_high="", layers=st.num_layers(state or {})), "", False, gr.Radio(visible=False), "")
    try:
        field = forms.field_by_key(form, state, key)
        split = is_split(form["values"][key])
        g = group if split else "all"
        anchors = curves.get_curve(form, key, g)
    except MergeError as err:
        return (gr.skip(), "", False, gr.Radio(visible=False), error_md(err))
    low, high = curves.endpoint_labels(field, state)
    y_min, y_max = _y_range(field, anchors)
    editor = gr.update(value=anchors, layers=st.num_layers(state), y_min=y_min, y_max=y_max, label_low=low,
                       label_high=high, title=f"{field['label']} — {GROUP_LABELS[g]}")
    labels = (f"**{field['label']}** ({GROUP_LABELS[g]}): bottom line **{low}**, top line **{high}**. "
              f"Drag the round points; squares show the value each layer gets."
              + (f" Range {field['range_text']}." if field["range_text"] else ""))
    radio = gr.Radio(visible=split, value=group if split else "attn")
    return editor, ", ".join(fmt(a) for a in anchors), split, radio, labels
