"""The Recipe tab: the method, the models in its recipe, its parameter form (one widget per
schema field, each checked as it is typed, its error at the field), the per-layer curve editor,
the formula panel and the live recipe YAML (apply edits, import a file, check the plan).

Applying YAML checks it whole first (`app.recipe_yaml`): an error is shown beside the editor with
its line and column, and the text stays; a recipe that changes the session's models, or drops
parameters, is previewed with Apply / Cancel before anything changes.

"moe (mixture of experts)", the method dropdown's last choice, shows the mixture-of-experts form
(`app.moe_panel` over `app.moe_form`) instead of the parameter form, curve editor and formula,
and its mergekit-moe YAML in the same view (a config applied there goes to that form); the
merge method's form is kept for when a method is chosen again.

Named API endpoints: /set_method, /set_recipe_models, /import_yaml (apply, or preview), /confirm_yaml,
/set_curve, /preset, /plan; the statistics panel of data-informed methods (`app.stats_panel`):
/collect_stats, /poll_stats, /cancel_stats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import gradio as gr

from mergecore.errors import MergeError

from app import curves, forms, moe_form, moe_panel, recipe_yaml
from app.context import AppContext, Page
from app.curve_editor import CurveEditor
from app.recipe_views import (ANCHORS_INFO, curve_panel, field_error, field_ok, method_text, models_box,
                              parse_anchors, recipe_views)
from app.render import error_md
from app.stats_panel import StatsPanel
from app.values import check_value, is_raw, text_to_value, value_to_text

# Enter in a text field leaves it, so its value is taken once, by the blur handler (submit and blur
# both firing would check it twice, and a refused value would toast twice)
BLUR_ON_ENTER = "() => { if (document.activeElement) document.activeElement.blur(); }"

PRESETS = {"flat": "flat", "ramp up": "ramp_up", "ramp down": "ramp_down", "U-shape": "u_shape", "bell": "bell"}


class RecipeTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.stats = StatsPanel(ctx)  # shown for data-informed methods (`MergeMethod.stats`)

    def build(self, page: Page) -> None:
        method = forms.default_method()
        with gr.Tab("Recipe", id="recipe"):
            with gr.Row():
                choices = [(m, m) for m in forms.method_choices()] + [(moe_form.LABEL, moe_form.MOE)]
                self.method_dd = gr.Dropdown(label="Method", choices=choices, value=method, interactive=True, scale=1,
                                             elem_id="recipe-method")
                self.method_md = gr.Markdown(method_text(method))
            self.recipe_status = gr.Markdown("", elem_id="recipe-status")
            with gr.Column() as self.method_top:  # a merge method's; hidden for the mixture of experts
                self.stats.build()
                self.models_cb = gr.CheckboxGroup(label="Models in the recipe", choices=[], value=[], interactive=True,
                                                  visible=False, elem_id="recipe-models")

            @gr.render(inputs=[page.form_state, page.session_state], triggers=[page.form_version.change])
            def render_form(form, state):
                self.render_fields(form, state, page)

            with gr.Column() as self.method_bottom:  # the curve editor and the formula: a merge method's
                gr.Markdown("### Per-layer curve")
                with gr.Row():
                    self.curve_key_dd = gr.Dropdown(label="Curve for", choices=[], value=None, interactive=True,
                                                    scale=2)
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
                                                     info=ANCHORS_INFO, interactive=True, elem_id="curve-anchors")
                    with gr.Column(scale=1):
                        self.preset_dd = gr.Dropdown(label="Preset", choices=list(PRESETS), value="ramp up")
                        self.preset_lo = gr.Number(label="low", value=0.0)
                        self.preset_hi = gr.Number(label="high", value=1.0)
                        self.preset_n = gr.Slider(label="points", minimum=2, maximum=16, step=1, value=5)
                        self.preset_btn = gr.Button("Apply preset")
                self.formula_md = gr.Markdown("")
            with gr.Accordion("Recipe YAML (live; edit and apply, or import a file)", open=True):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        self.yaml_code = gr.Code(label="recipe.yml", language="yaml", interactive=True, lines=14,
                                                 elem_id="recipe-yaml")
                    with gr.Column(scale=2, min_width=260):
                        self.yaml_status = gr.Markdown("", elem_id="yaml-status")
                        with gr.Group(visible=False) as self.preview:
                            self.preview_md = gr.Markdown("", elem_id="yaml-preview")
                            with gr.Row():
                                self.confirm_btn = gr.Button("Apply", variant="primary", elem_id="yaml-confirm")
                                self.cancel_btn = gr.Button("Cancel", elem_id="yaml-cancel")
                        self.pending = gr.State(None)
                with gr.Row():
                    self.apply_yaml_btn = gr.Button("Apply YAML", elem_id="apply-yaml")
                    self.plan_btn = gr.Button("Check plan (dry run)", elem_id="check-plan")
                self.yaml_file = gr.File(label="Import a recipe file (.yml; mergekit recipes work)",
                                         file_types=[".yml", ".yaml"], type="filepath", height=120,
                                         elem_id="recipe-file")
                self.plan_tb = gr.Textbox(label="Plan", lines=8, max_lines=30, visible=False, elem_id="recipe-plan")
        self.curve_outputs = [self.curve, self.anchors_tb, self.curve_split, self.curve_group, self.curve_labels]

    # -- the session's views ----------------------------------------------------------------------

    def outputs(self, page: Page) -> list[Any]:
        return [self.method_dd, self.method_md, self.yaml_code, self.recipe_status, self.formula_md,
                self.curve_key_dd, *self.curve_outputs, self.models_cb, *self.stats.outputs(), self.method_top,
                self.method_bottom]

    def views(self, state: dict[str, Any], form: dict[str, Any], owner: str, *, key: Optional[str] = None,
              group: str = "attn") -> list[Any]:
        method = form.get("method") or forms.default_method()
        if moe_form.is_on(form):  # the mixture's form: its YAML and line; the method's parts hidden
            yaml_text, status = moe_form.views(form, state)
            return [moe_form.MOE, moe_form.method_text(), yaml_text, status, "", gr.Dropdown(choices=[], value=None),
                    *curve_panel({}, state, None), gr.CheckboxGroup(visible=False), *self.stats.views(state, form),
                    gr.Column(visible=False), gr.Column(visible=False)]
        targets = curves.curve_targets(form, state) if state.get("models") and form.get("values") else []
        keys = [k for _, k in targets]
        if key not in keys:
            key = next((k for k in keys if isinstance(form["values"].get(k), (list, dict))), keys[0] if keys else None)
        return [method, method_text(method), *recipe_views(form, state), gr.Dropdown(choices=targets, value=key),
                *curve_panel(form, state, key, group), models_box(form, state), *self.stats.views(state, form),
                gr.Column(visible=True), gr.Column(visible=True)]

    # -- the parameter form (inside gr.render) ----------------------------------------------------

    def render_fields(self, form, state, page: Page) -> None:
        if not form or not form.get("values") or not (state or {}).get("models"):
            gr.Markdown("Load the demo or add models on the **Models** tab to get a parameter form.")
            return
        if moe_form.is_on(form):
            moe_panel.render(form, state, page, self.yaml_code, self.recipe_status)
            return
        fields = forms.form_fields(form["method"], state, form)
        if not fields:
            gr.Markdown(f"*{form['method']} has no parameters.*")
            return
        if form.get("slices"):
            gr.Markdown("This recipe uses **slices** (layer ranges): edit them in the YAML below; "
                        "the form edits the global parameters.")
        by_model: dict[Optional[str], list[dict[str, Any]]] = {None: []}
        for f in fields:
            by_model.setdefault(f["model"], []).append(f)
        with gr.Row(equal_height=False, elem_id=f"form-{form['method']}"):  # whose form this is (tests wait for it)
            for model, group_fields in by_model.items():
                if (form.get("slices") and model is not None) or not group_fields:
                    continue
                with gr.Column(min_width=220):
                    gr.Markdown(f"**{'global parameters' if model is None else model}**")
                    for f in group_fields:
                        self.field_widget(f, form, page)

    def field_widget(self, f: dict[str, Any], form: dict[str, Any], page: Page) -> None:
        """One field, interactive (a field created inside `gr.render` that listens only to blur or
        submit is not, unless told), checked as it is typed."""
        value = form["values"].get(f["key"], f["default"])
        info = f["help"] or None
        key = f["key"]
        elem = "field-" + key.replace("@", "--").replace(".", "_")
        text = True
        if f["type"] == "bool":
            comp = gr.Checkbox(label=f["label"], value=bool(value), info=info, elem_id=elem, interactive=True)
            events, text = [comp.input], False
        elif f["choices"]:
            comp = gr.Dropdown(label=f["label"], choices=[str(c) for c in f["choices"]], value=str(value), info=info,
                               elem_id=elem, interactive=True)
            events, text = [comp.input], False
        elif f["numeric"]:
            with gr.Row(elem_classes=["mc-field-row"]):
                label = f["label"] + (f"  {f['range_text']}" if f["range_text"] else "")
                if is_raw(value):
                    label += " (imported filters)"
                    info = "kept as imported; type a value to replace it, or edit it in the YAML"
                comp = gr.Textbox(label=label, value=value_to_text(value), info=info, elem_id=elem, scale=4,
                                  interactive=True, placeholder="0.5, [0.2, 0.8] or attn: [0, 1]; mlp: [1, 0]; other: 0.5")
                btn = gr.Button("curve", size="sm", scale=1, elem_classes=["mc-curve-btn"], elem_id=elem + "-curve")
            events = [comp.blur]

            def pick(form, state, group, _key=key):
                return (gr.update(value=_key), *curve_panel(form, state, _key, group))

            btn.click(pick, [page.form_state, page.session_state, self.curve_group],
                      [self.curve_key_dd, *self.curve_outputs], api_visibility="private")
        else:
            comp = gr.Textbox(label=f["label"], value=str(value or ""), info=info, elem_id=elem, interactive=True)
            events = [comp.blur]
        if text:
            comp.submit(None, None, None, js=BLUR_ON_ENTER)
        inputs = [comp, page.form_state, page.session_state, self.curve_key_dd, self.curve_group]
        outputs = [comp, page.form_state, self.yaml_code, self.recipe_status, self.formula_md, self.curve_key_dd,
                   *self.curve_outputs]
        for ev in events:
            ev(on_field(key, text), inputs, outputs, api_visibility="private")

    # -- events -----------------------------------------------------------------------------------

    def refreshed(self, page: Page, state, form, version, request) -> tuple:
        """The session's views, without the Models tab's status line (messages stay on this tab)."""
        return page.refresh(state, form, version, request)[:-1]

    def wire(self, page: Page) -> None:
        ctx = self.ctx
        session = [page.session_state, page.form_state, page.form_version]

        def on_method(method, state, form, version, request: gr.Request):
            moe = moe_form.is_on(form)
            if (method == moe_form.MOE and moe) or (not moe and (form or {}).get("method") == method and (
                    (form or {}).get("values") or not state.get("models"))):
                return page.skip_refresh()  # the dropdown reports a choice twice (on select, on close)
            if method == moe_form.MOE:  # the mixture's own form; the method's stays as it was
                return self.refreshed(page, state, moe_form.switch(forms.filled(form, state), state, True), version,
                                      request)
            form = moe_form.switch(form, state, False) if (form or {}).get("moe") else form
            try:
                form = forms.new_form(method, state, form) if state.get("models") else {"method": method}
            except MergeError as err:
                gr.Warning(str(err))
                return self.refreshed(page, state, form, version, request)
            for problem in forms.constraint_problems(form, state):
                gr.Warning(problem)  # and under the method, and at "Models in the recipe"
            return self.refreshed(page, state, form, version, request)

        self.method_dd.input(on_method, [self.method_dd, *session], page.outputs, api_name="set_method")

        def on_models(selected, state, form, version, request: gr.Request):
            form = forms.filled(form, state)
            if not form.get("method") or moe_form.is_on(form):
                return self.refreshed(page, state, form, version, request)
            method = forms.get_method(form["method"])
            left_out = [n for n in forms.per_model_targets(method, state) if n not in (selected or [])]
            form = forms.new_form(method.name, state, {**form, "left_out": left_out})
            for problem in forms.constraint_problems(form, state):
                gr.Warning(problem)
            return self.refreshed(page, state, form, version, request)

        self.models_cb.input(on_models, [self.models_cb, *session], page.outputs, api_name="set_recipe_models")
        self.wire_yaml(page)

        def on_plan(state, form):
            try:
                if moe_form.is_on(form):  # no dry run for a mixture: the engine's check of its config
                    c = moe_form.build_config(form, state)
                    return gr.Textbox(value=f"moe: {len(c.experts)} experts ({c.experts_per_token} per token), "
                                            f"{c.gate_mode} gates, base {c.base_model}: the config passes the "
                                            f"engine's checks; the models' shapes are checked when it is built",
                                      visible=True)
                from mergecore.plan import plan_merge

                plan = plan_merge(forms.build_recipe(form, state),
                                  search_dirs=tuple(Path(d) for d in form.get("search_dirs") or ()))
                return gr.Textbox(value=plan.describe(), visible=True)
            except MergeError as err:
                return gr.Textbox(value=f"error: {err}", visible=True)

        self.plan_btn.click(on_plan, [page.session_state, page.form_state], [self.plan_tb], api_name="plan")
        self.wire_curve(page)
        self.stats.wire(page, lambda state, form, version, request: self.refreshed(page, state, form, version, request))

    def wire_yaml(self, page: Page) -> None:
        """Apply YAML (typed, or a file): checked whole; an error beside the editor, the text kept; a
        recipe that changes the session's models or drops parameters is previewed first."""
        ctx = self.ctx
        session = [page.session_state, page.form_state, page.form_version]
        outputs = [*page.outputs, self.preview, self.preview_md, self.pending, self.yaml_status]
        at_yaml = next(i for i, c in enumerate(page.outputs) if c is self.yaml_code)

        def apply_text(text, where, search_dirs, state, form, version, request, *, confirmed=False, shown=None):
            skip = list(page.skip_refresh())
            if shown is not None:
                skip[at_yaml] = shown  # an uploaded file's text goes into the editor: errors point into it
            try:
                prep = recipe_yaml.prepare(text, state, form, ctx.read_roots(), where, search_dirs)
            except MergeError as err:
                gr.Warning(str(err))
                return (*skip, gr.Group(visible=False), "", None, error_md(err))
            if prep.needs_confirm and not confirmed:
                pending = {"text": text if isinstance(text, str) else shown, "where": where,
                           "search_dirs": [str(d) for d in search_dirs]}
                return (*skip, gr.Group(visible=True), prep.preview_md(), pending,
                        "Nothing has changed yet: applying this recipe changes the session (below).")
            gr.Info("Recipe applied.")
            for w in prep.warnings:
                gr.Warning(w)
            return (*self.refreshed(page, prep.state, prep.form, version, request), gr.Group(visible=False), "",
                    None, prep.applied_md())

        def on_apply(text, state, form, version, request: gr.Request):
            return apply_text(text or "", "recipe", (form or {}).get("search_dirs") or (), state, form, version,
                              request)

        self.apply_yaml_btn.click(on_apply, [self.yaml_code, *session], outputs, api_name="import_yaml")

        def on_confirm(pending, state, form, version, request: gr.Request):
            if not pending:
                return (*page.skip_refresh(), gr.Group(visible=False), "", None, "Nothing to apply.")
            return apply_text(pending["text"], pending["where"], pending["search_dirs"], state, form, version,
                              request, confirmed=True)

        self.confirm_btn.click(on_confirm, [self.pending, *session], outputs, api_name="confirm_yaml")

        def on_cancel():
            return (gr.Group(visible=False), "", None,
                    "Cancelled: the session is as it was; your text is still in the editor.")

        self.cancel_btn.click(on_cancel, None, [self.preview, self.preview_md, self.pending, self.yaml_status],
                              api_name="cancel_yaml")

        def on_import_file(path, state, form, version, request: gr.Request):
            if not path:
                return (*page.skip_refresh(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
            from app.paths import read_upload

            where = f"recipe file {Path(path).name}"
            try:
                data = read_upload(path, "recipe file")  # over the YAML size limit: refused unread
            except MergeError as err:
                gr.Warning(str(err))
                return (*page.skip_refresh(), gr.Group(visible=False), "", None, error_md(err))
            shown = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)
            return apply_text(data, where, (), state, form, version, request, shown=shown)

        self.yaml_file.upload(on_import_file, [self.yaml_file, *session], outputs, api_visibility="private")
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
            except MergeError as err:  # said above the curve, where it happened (and as a toast)
                gr.Warning(str(err))
                editor, anchors, split, radio, _ = curve_panel(form, state, key, group)
                return (form, version, *recipe_views(form, state), editor, anchors, split, radio, error_md(err))

        outputs = [page.form_state, page.form_version, self.yaml_code, self.recipe_status, self.formula_md,
                   *self.curve_outputs]
        inputs = [self.curve_key_dd, self.curve_group, self.curve_split, page.session_state, page.form_state,
                  page.form_version]

        def on_curve_edit(anchors, key, group, split, state, form, version):
            return changed(lambda f: curves.set_curve(f, state, key, anchors, group if split else "all"),
                           key, group, state, form, version)

        self.curve.edit(on_curve_edit, [self.curve, *inputs], outputs, api_name="set_curve")

        def on_anchors(text, key, group, split, state, form, version):
            """Typed anchors, each checked against the parameter's range: an error at the box, not clamped."""
            try:
                if not key:
                    raise MergeError("choose a parameter under 'Curve for' first")
                anchors = parse_anchors(text, forms.field_by_key(form, state, key))
            except MergeError as err:
                editor, _, split_cb, radio, labels = curve_panel(form, state, key, group)
                return (form, version, *recipe_views(form, state), editor, field_error(err), split_cb, radio, labels)
            return on_curve_edit(anchors, key, group, split, state, form, version)

        self.anchors_tb.submit(None, None, None, js=BLUR_ON_ENTER)
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
                check_value(forms.field_by_key(f, state, key), [round(a, 4) for a in anchors])  # not clamped
                return curves.set_curve(f, state, key, anchors, group if split else "all")

            return changed(apply, key, group, state, form, version)

        self.preset_btn.click(on_preset, [self.preset_dd, self.preset_lo, self.preset_hi, self.preset_n, *inputs],
                              outputs, api_name="preset")


def on_field(key: str, text: bool = True):
    """The handler of one form field: the value checked and stored (or its error at the field, the
    form unchanged), the views that follow it; a curve typed into a field shows in the curve panel."""

    def handler(raw, form, state, curve_key, group):
        skip = (gr.skip(),) * 10
        try:
            field = forms.field_by_key(form, state, key)
            value = text_to_value(field, raw, forms.model_filters(state)) if isinstance(raw, str) else raw
            if value == form["values"].get(key) and key in form.get("explicit", []):
                return (field_ok(field, value, text=text), *skip)  # as it was (a dropdown reports twice)
            form = forms.set_value(form, state, key, value)
        except MergeError as err:
            return (field_error(err), *skip)
        value = form["values"][key]
        yaml_text, status, formula = recipe_views(form, state)
        if curve_key == key or (field["numeric"] and isinstance(value, (list, dict))):
            panel = (gr.update(value=key), *curve_panel(form, state, key, group))
        else:
            panel = (gr.skip(),) * 6
        return (field_ok(field, value, text=text), form, yaml_text, status, formula, *panel)

    return handler
