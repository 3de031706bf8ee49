"""The Gradio app: `build_app(ctx) -> gr.Blocks`. Tabs call the engine; no merge logic lives here.

Tabs: Models, Recipe, Merge, Search, Compare, Export. Long work (Hub downloads, merges,
searches, evaluations) runs as background jobs (`app.jobs`); a `gr.Timer` per tab polls the
job's snapshot while it runs. Per-session data lives in `gr.State` (models, the recipe form, job
ids); the job manager keys jobs by the session's id, so two browser sessions never see each
other's jobs. Searches are keyed by the browser instead (a random key in `gr.BrowserState`), so
a reload or a second tab shows the running search (`app.search_tab`).

The Search tab draws one form per entry of the search registry (`app.searches`: RMM today; DAM
and evolutionary search register a form, a runner and an event->plot mapping the same way).

Named API endpoints (for `gradio_client`): /load_demo, /add_model, /poll_models, /hub_search,
/set_base, /set_method, /import_yaml, /set_curve, /plan, /merge, /poll_merge, /cancel_merge,
/compare, /evaluate, /poll_eval, /export, and the Search tab's /start_search, /poll_search,
/stop_search, /resume_search, /attach_search, /use_search_recipe, /replay_search, /poll_replay.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import gradio as gr
import pandas as pd

from mergecore.errors import MergeError

from app import forms, plots
from app import state as st
from app.compare import CSS as COMPARE_CSS
from app.curve_editor import CurveEditor
from app.demo_family import DemoFamily
from app.files import Workspace, folder_bytes
from app.jobs import DONE, FAILED, CANCELLED, JobManager, one_line_error
from app.search_tab import SearchTab

log = logging.getLogger("mergecore.app")

DEFAULT_METHOD = "ties"
TASK_HEAD = "the task's head (as the evaluator scores it)"
OWN_HEAD = "each model's own"
PRESETS = {"flat": "flat", "ramp up": "ramp_up", "ramp down": "ramp_down", "U-shape": "u_shape", "bell": "bell"}


@dataclass
class AppContext:
    """What the app needs besides the browser: where to write, the jobs, the demo family."""

    workspace: Workspace
    demo: Optional[DemoFamily] = None
    jobs: JobManager = field(default_factory=JobManager)
    hub_search: bool = True
    hub_timeout: float = 6.0
    allowed_dirs: tuple[Path, ...] = ()  # --allow-dir: more folders a typed path may be in
    demo_dir: Optional[Path] = None  # --demo-dir (None: the default demo folder)

    def read_roots(self) -> list[Path]:
        """The folders a path typed into the app may be in (`app.paths.confine`): the work dir,
        the demo dir and the demo family's folders, the Hugging Face cache, --allow-dir."""
        from app.demo_family import demo_root
        from app.paths import hf_cache_dir

        roots = [self.workspace.root, demo_root(self.demo_dir), hf_cache_dir(), *self.allowed_dirs]
        fam = self.demo
        if fam is not None:  # where the family was built (its models' and tasks' folders)
            roots += [Path(p).parent for p in fam.models.values()]
            roots += [Path(t).parent for t in (fam.tasks, fam.val_tasks) if t]
        return roots


def owner_of(request: Optional[gr.Request]) -> str:
    return (getattr(request, "session_hash", None) or "anonymous") if request is not None else "anonymous"


# ---------------------------------------------------------------------------------------------
# small renderers


def progress_html(fraction: Optional[float], text: str, status: str = "running") -> str:
    pct = 0.0 if fraction is None else max(0.0, min(1.0, fraction)) * 100
    color = {"failed": "#dc2626", "cancelled": "#9ca3af", "done": "#16a34a"}.get(status, "var(--color-accent)")
    return (f'<div class="mc-progress" data-status="{status}"><div class="mc-bar"><div style="width:{pct:.1f}%;'
            f'background:{color}"></div></div><div class="mc-progress-text">{gr_escape(text)}</div></div>')


def gr_escape(s: str) -> str:
    import html

    return html.escape(str(s))


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(s % 60):02d} s"


def merge_progress_text(p: Optional[dict[str, Any]], status: str, elapsed: float) -> tuple[Optional[float], str]:
    if not p:
        return (0.0 if status != DONE else 1.0), f"{status} · {fmt_seconds(elapsed)}"
    eta = p.get("eta")
    text = (f"{p['tensors_done']}/{p['tensors_total']} tensors · {st.human_bytes(p['bytes_done'])} / "
            f"{st.human_bytes(p['bytes_total'])} · {fmt_seconds(p.get('elapsed', elapsed))} elapsed")
    if status == "running":
        text += f" · ETA {fmt_seconds(eta)}" if eta is not None else " · ETA ?"
    return p.get("fraction"), text


CSS = """
.mc-progress { margin: 4px 0 8px 0; }
.mc-bar { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.mc-bar > div { height: 100%; transition: width 0.3s; }
.mc-progress-text { font-family: var(--font-mono); font-size: 13px; margin-top: 3px; }
.mc-synthetic { background: #fef3c7; color: #92400e; padding: 2px 8px; border-radius: 8px; font-weight: 600; }
.mc-field-row { align-items: end !important; }
.mc-curve-btn { max-width: 90px !important; min-width: 60px !important; }
.mc-real { background: #dcfce7; color: #166534; padding: 2px 8px; border-radius: 8px; font-weight: 600; }
footer { display: none !important; }
""" + COMPARE_CSS


# ---------------------------------------------------------------------------------------------
# the app


def build_app(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="mergecore", delete_cache=(3600, 3600 * 6)) as demo:
        session_state = gr.State(st.new_session())
        form_state = gr.State({})
        merge_job = gr.State("")
        eval_job = gr.State("")
        fetch_job = gr.State("")
        browser_key = gr.BrowserState("", storage_key="mergecore-browser", secret=ctx.workspace.secret())

        gr.Markdown("# mergecore\nMerge models from recipes: pick models, shape the parameters per layer, "
                    "merge in the background, search for merges, compare the outputs and export.")
        family_md = gr.Markdown(_family_text(None))
        search_tab = SearchTab(ctx)

        with gr.Tabs() as tabs:
            # ---------------------------------------------------------------- Models
            with gr.Tab("Models", id="models"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            ref_tb = gr.Textbox(label="Hub id or local folder", placeholder="org/name or /path/to/model",
                                                scale=4)
                            add_btn = gr.Button("Add model", variant="secondary", scale=1)
                        with gr.Row():
                            hub_q = gr.Textbox(label="Search the Hub", placeholder="e.g. tiny llama", scale=3)
                            hub_btn = gr.Button("Search", scale=1)
                            hub_dd = gr.Dropdown(label="Hub results", choices=[], scale=3, allow_custom_value=True)
                    with gr.Column(scale=2):
                        demo_btn = gr.Button("Load the built-in demo models", variant="primary")
                        trust_cb = gr.Checkbox(label="trust remote code (run Python shipped with a model repo)",
                                               value=False,
                                               info="Off: models whose architecture is not in transformers are refused.")
                models_status = gr.Markdown("")
                fetch_progress = gr.HTML("")
                models_df = gr.Dataframe(headers=st.MODEL_COLUMNS, value=[], interactive=False, label="Models",
                                         wrap=True)
                compat_md = gr.Markdown("Add at least two models to merge.")
                with gr.Row():
                    base_dd = gr.Dropdown(label="Base model", choices=[], value=None, interactive=True)
                    remove_dd = gr.Dropdown(label="Remove a model", choices=[], value=None, interactive=True)
                    remove_btn = gr.Button("Remove")
                fetch_timer = gr.Timer(0.5, active=False)

            # ---------------------------------------------------------------- Recipe
            with gr.Tab("Recipe", id="recipe"):
                with gr.Row():
                    method_dd = gr.Dropdown(label="Method", choices=forms.method_choices(), value=DEFAULT_METHOD,
                                            interactive=True, scale=1)
                    method_md = gr.Markdown(_method_text(DEFAULT_METHOD))
                form_version = gr.Number(value=0, visible=False)
                recipe_status = gr.Markdown("")

                @gr.render(inputs=[form_state, session_state], triggers=[form_version.change])
                def render_form(form, state):
                    _render_fields(form, state, refs)

                gr.Markdown("### Per-layer curve")
                with gr.Row():
                    curve_key_dd = gr.Dropdown(label="Curve for", choices=[], value=None, interactive=True, scale=2)
                    curve_split = gr.Checkbox(label="separate curves for attention and MLP tensors", value=False,
                                              scale=2)
                    curve_group = gr.Radio(label="Editing", choices=[("attention", "attn"), ("MLP", "mlp"),
                                                                     ("other tensors", "other")],
                                           value="attn", visible=False, scale=2)
                with gr.Row():
                    with gr.Column(scale=3):
                        curve_labels = gr.Markdown("")
                        curve = CurveEditor([0.5, 0.5], layers=8, elem_id="curve-editor")
                        anchors_tb = gr.Textbox(label="Anchors (numbers, kept in sync with the points)",
                                                elem_id="curve-anchors")
                    with gr.Column(scale=1):
                        preset_dd = gr.Dropdown(label="Preset", choices=list(PRESETS), value="ramp up")
                        preset_lo = gr.Number(label="low", value=0.0)
                        preset_hi = gr.Number(label="high", value=1.0)
                        preset_n = gr.Slider(label="points", minimum=2, maximum=16, step=1, value=5)
                        preset_btn = gr.Button("Apply preset")
                formula_md = gr.Markdown("")
                with gr.Accordion("Recipe YAML (live; edit and apply, or import a file)", open=True):
                    yaml_code = gr.Code(label="recipe.yml", language="yaml", interactive=True, lines=14)
                    with gr.Row():
                        apply_yaml_btn = gr.Button("Apply YAML", elem_id="apply-yaml")
                        plan_btn = gr.Button("Check plan (dry run)")
                    yaml_file = gr.File(label="Import a recipe file (.yml; mergekit recipes work)",
                                        file_types=[".yml", ".yaml"], type="filepath", height=120)
                    plan_tb = gr.Textbox(label="Plan", lines=8, max_lines=30, visible=False)

            # ---------------------------------------------------------------- Merge
            with gr.Tab("Merge", id="merge"):
                with gr.Row():
                    out_name = gr.Textbox(label="Output name", value="merge", scale=2)
                    out_dtype = gr.Dropdown(label="Output dtype", choices=["as in recipe", "float32", "float16",
                                                                           "bfloat16"], value="as in recipe", scale=1)
                    threads = gr.Slider(label="Threads", minimum=1, maximum=max(1, os.cpu_count() or 1), step=1,
                                        value=min(4, os.cpu_count() or 1), scale=1)
                with gr.Row():
                    merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
                    cancel_btn = gr.Button("Cancel", variant="stop")
                merge_progress = gr.HTML(progress_html(0, "idle", "idle"), elem_id="merge-progress")
                merge_summary = gr.Markdown("", elem_id="merge-summary")
                with gr.Row():
                    merge_log = gr.Textbox(label="Log", lines=12, max_lines=20, autoscroll=True, scale=3)
                    merge_plot = gr.LinePlot(value=plots.merge_frame([]), x="x", y="value", x_title="seconds",
                                             y_title="MB written", label="Written so far (MB against seconds)",
                                             height=320, scale=2)
                merge_timer = gr.Timer(0.5, active=False)

            # ---------------------------------------------------------------- Search
            search_tab.build()

            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                cmp_models = gr.CheckboxGroup(label="Models (sources and this session's merges)", choices=[])
                with gr.Group(visible=True) as lm_group:
                    with gr.Row():
                        prompt_tb = gr.Textbox(label="Prompt (text, or token ids separated by spaces)", scale=4,
                                               value="1 2 3 4 5 6 7 8")
                        new_tokens = gr.Slider(label="new tokens", minimum=1, maximum=32, step=1, value=8, scale=1)
                demo_img = ctx.demo is not None and ctx.demo.kind == "image-classification"
                demo_tasks = _task_names(ctx.demo.tasks) if demo_img and ctx.demo.tasks else []
                first_ex = ctx.demo.examples[0] if demo_img and ctx.demo.examples else None
                with gr.Column(visible=False) as cls_group:
                    with gr.Row(equal_height=False):
                        image_in = gr.Image(label="Image", type="numpy", image_mode="RGB", height=210,
                                            elem_id="cmp-image", value=first_ex["image"] if first_ex else None)
                        with gr.Column():
                            task_dd = gr.Dropdown(label="Task", choices=demo_tasks,
                                                  value=first_ex["task"] if first_ex else None, allow_custom_value=True,
                                                  info="with the task's head: its expert's classifier and classes")
                            head_dd = gr.Dropdown(label="Classifier head", choices=[TASK_HEAD, OWN_HEAD],
                                                  value=TASK_HEAD if demo_tasks else OWN_HEAD,
                                                  info="score every body with one head (task heads), or each "
                                                       "model with its own")
                            truth_tb = gr.Textbox(label="True label (optional: marks right and wrong answers)",
                                                  value=first_ex["label"] if first_ex else "")
                if ctx.demo is not None and ctx.demo.examples:
                    if demo_img:
                        gr.Examples(examples=[[e["image"], e["task"], e["label"]] for e in ctx.demo.examples],
                                    inputs=[image_in, task_dd, truth_tb], examples_per_page=12, visible_columns=[0],
                                    label="Example images from each task's test data (click one: it sets the task "
                                          "and the true label)")
                    else:
                        gr.Examples(examples=[[e] for e in ctx.demo.examples], inputs=[prompt_tb],
                                    label=f"Example inputs ({ctx.demo.title})")
                cmp_btn = gr.Button("Compare", variant="primary", elem_id="cmp-btn")
                cmp_status = gr.Markdown("")
                cmp_html = gr.HTML("")
                cmp_df = gr.Dataframe(label="Side by side", interactive=False, wrap=True)
                with gr.Accordion("Evaluation on tasks", open=True):
                    with gr.Row():
                        tasks_tb = gr.Textbox(label="Tasks YAML (mergecore.eval)", scale=3,
                                              placeholder="the demo family's tasks, or a path to a tasks file")
                        subset_tb = gr.Textbox(label="subset (ratio or count; empty = all)", value="", scale=1)
                        eval_btn = gr.Button("Evaluate", scale=1)
                    eval_progress = gr.HTML("")
                    eval_df = gr.Dataframe(label="Scores (one row per model)", interactive=False,
                                           value=pd.DataFrame(columns=["model", "mean"]))
                    eval_timer = gr.Timer(0.5, active=False)

            # ---------------------------------------------------------------- Export
            with gr.Tab("Export", id="export"):
                gr.Markdown("Download the recipe and a merged checkpoint (files this app wrote). Checkpoints "
                            f"over {st.human_bytes(ctx.workspace.zip_limit)} are not zipped: use their folder.")
                with gr.Row():
                    export_dd = gr.Dropdown(label="Merged checkpoint", choices=[], value=None, scale=3)
                    export_btn = gr.Button("Prepare downloads", variant="primary", scale=1)
                export_md = gr.Markdown("", elem_id="export-status")
                with gr.Row():
                    recipe_dl = gr.DownloadButton("Download recipe.yml", visible=False)
                    ckpt_dl = gr.DownloadButton("Download checkpoint (.zip)", visible=False)

        # -------------------------------------------------------------------------------------
        # wiring

        field_outputs = [form_state, yaml_code, recipe_status, formula_md, curve, anchors_tb, curve_labels]
        refs = {"form_state": form_state, "session_state": session_state, "curve_key_dd": curve_key_dd,
                "curve_group": curve_group, "curve_split": curve_split, "curve": curve, "anchors_tb": anchors_tb,
                "curve_labels": curve_labels, "field_outputs": field_outputs}
        curve_outputs = [curve, anchors_tb, curve_split, curve_group, curve_labels]
        all_outputs = [session_state, form_state, form_version, models_df, compat_md, base_dd, remove_dd, family_md,
                       method_dd, method_md, yaml_code, recipe_status, formula_md, curve_key_dd, *curve_outputs,
                       cmp_models, lm_group, cls_group, head_dd, task_dd, tasks_tb, export_dd]

        def refresh(state, form, version, request, *, key=None, group="attn", status=None):
            return _refresh_all(ctx, state, form, version, owner_of(request), key=key, group=group, status=status)

        # Models tab
        def on_load_demo(state, form, version, request: gr.Request):
            try:
                state, form = _load_demo(ctx, state)
            except MergeError as err:
                return refresh(state, form, version, request, status=f"**Error:** {err}")
            return refresh(state, form, version, request, status=f"Loaded the demo models ({ctx.demo.title}).")

        def on_demo_button(state, form, version, request: gr.Request):
            if ctx.demo is not None:
                return (*on_load_demo(state, form, version, request), gr.skip(), gr.skip(), "")
            # started with --no-demo: build the demo family in the background first
            from app.demo_family import build_demo_family

            try:
                job = ctx.jobs.submit(owner_of(request), "demo",
                                      lambda jc: build_demo_family(progress=jc.emit, cancel=jc.cancel),
                                      title="demo models", slot="heavy")
            except MergeError as err:
                return (*refresh(state, form, version, request, status=f"**Error:** {err}"), gr.skip(), gr.skip(), "")
            return (*refresh(state, form, version, request, status="Building the demo models ..."), job.id,
                    gr.Timer(active=True), progress_html(0, "building the demo models ..."))

        demo_btn.click(on_demo_button, [session_state, form_state, form_version],
                       all_outputs + [models_status, fetch_job, fetch_timer, fetch_progress], api_name="load_demo")

        def on_add(ref, state, form, version, request: gr.Request):
            ref = (ref or "").strip()
            try:
                if not ref:
                    raise MergeError("give a Hub id (org/name) or a local folder")
                from app.paths import local_model

                p = local_model(ref, ctx.read_roots())  # None: a Hub id
                if p is not None and p.is_dir():
                    state = st.add_model(state, ref, p)
                    form = forms.sync_form(form, state, DEFAULT_METHOD)
                    return (*refresh(state, form, version, request, status=f"Added `{ref}`."), "",
                            gr.Timer(active=False), "")
                if p is not None:
                    raise MergeError(f"'{ref}' is neither a local folder nor a Hub id (org/name)")
                job = ctx.jobs.submit(owner_of(request), "fetch", lambda jc: _fetch(jc, ref), title=ref,
                                      meta={"ref": ref}, slot="fetch")
                return (*refresh(state, form, version, request, status=f"Fetching `{ref}` from the Hub ..."),
                        job.id, gr.Timer(active=True), progress_html(None, f"fetching {ref} ..."))
            except MergeError as err:
                return (*refresh(state, form, version, request, status=f"**Error:** {err}"), gr.skip(), gr.skip(), "")

        add_evt = dict(fn=on_add, inputs=[ref_tb, session_state, form_state, form_version],
                       outputs=all_outputs + [models_status, fetch_job, fetch_timer, fetch_progress])
        add_btn.click(**add_evt, api_name="add_model")
        ref_tb.submit(**add_evt, api_visibility="private")

        def on_poll_fetch(job_id, state, form, version, request: gr.Request):
            job = ctx.jobs.find(owner_of(request), job_id)
            if job is None:
                return (*[gr.skip()] * len(all_outputs), gr.skip(), gr.Timer(active=False), "")
            if not job.done:
                what = job.meta.get("ref") or job.title
                frac = (job.progress or {}).get("fraction")
                if job.kind == "demo" and (job.progress or {}).get("stage"):
                    what = f"{what} ({job.progress['stage']})"
                return (*[gr.skip()] * len(all_outputs), gr.skip(), gr.skip(),
                        progress_html(frac, f"{job.kind}: {what} · {fmt_seconds(job.elapsed)}"))
            if job.kind == "demo":
                if job.status == DONE:
                    ctx.demo = job.result
                    return (*on_load_demo(state, form, version, request), gr.Timer(active=False), "")
                return (*refresh(state, form, version, request, status=f"**Error:** {job.error}"),
                        gr.Timer(active=False), "")
            if job.status == DONE:
                try:
                    from app.paths import confine

                    folder = confine(job.result, ctx.read_roots(), "model folder")  # a Hub snapshot: in the cache
                    state = st.add_model(state, job.meta["ref"], folder)
                    form = forms.sync_form(form, state, DEFAULT_METHOD)
                    msg = f"Added `{job.meta['ref']}`."
                except MergeError as err:
                    msg = f"**Error:** {err}"
            else:
                msg = f"**Error:** {job.error}"
            return (*refresh(state, form, version, request, status=msg), gr.Timer(active=False), "")

        fetch_timer.tick(on_poll_fetch, [fetch_job, session_state, form_state, form_version],
                         all_outputs + [models_status, fetch_timer, fetch_progress], api_name="poll_models",
                         concurrency_limit=None)

        def on_hub_search(q):
            return _hub_search(ctx, q)

        hub_btn.click(on_hub_search, [hub_q], [hub_dd, models_status], api_name="hub_search")
        hub_q.submit(on_hub_search, [hub_q], [hub_dd, models_status], api_visibility="private")
        hub_dd.input(lambda v: v or "", [hub_dd], [ref_tb], api_visibility="private")

        def on_base(name, state, form, version, request: gr.Request):
            state = copy.deepcopy(state)
            state["base"] = name or None
            form = forms.sync_form(form, state, DEFAULT_METHOD)
            return refresh(state, form, version, request, status=f"Base model: `{name}`." if name else "No base model.")

        base_dd.input(on_base, [base_dd, session_state, form_state, form_version], all_outputs + [models_status],
                      api_name="set_base")

        def on_remove(name, state, form, version, request: gr.Request):
            if not name:
                return refresh(state, form, version, request, status="Choose a model to remove.")
            state = st.remove_model(state, name)
            form = forms.sync_form(form, state, DEFAULT_METHOD) if state["models"] else {}
            return refresh(state, form, version, request, status=f"Removed `{name}`.")

        remove_btn.click(on_remove, [remove_dd, session_state, form_state, form_version],
                         all_outputs + [models_status], api_name="remove_model")

        def on_trust(v, state):
            state = copy.deepcopy(state)
            state["trust_remote_code"] = bool(v)
            return state

        trust_cb.input(on_trust, [trust_cb, session_state], [session_state], api_visibility="private")

        # Recipe tab
        def on_method(method, state, form, version, request: gr.Request):
            try:
                form = forms.new_form(method, state, form) if state.get("models") else {"method": method}
            except MergeError as err:
                return refresh(state, form, version, request, status=f"**Error:** {err}")
            return refresh(state, form, version, request)

        method_dd.input(on_method, [method_dd, session_state, form_state, form_version],
                        all_outputs + [models_status], api_name="set_method")

        def import_recipe(text: str | bytes, where: str, state, form, version, request):
            try:
                state, form, notes = _import_yaml(text, state, ctx.read_roots(), where)
            except MergeError as err:
                return refresh(state, form, version, request, status=f"**Error:** {err}")
            msg = "Recipe loaded." + "".join(f"\n- {n}" for n in notes)
            return refresh(state, form, version, request, status=msg)

        def on_import_text(text, state, form, version, request: gr.Request):
            return import_recipe(text, "recipe", state, form, version, request)

        apply_yaml_btn.click(on_import_text, [yaml_code, session_state, form_state, form_version],
                             all_outputs + [models_status], api_name="import_yaml")

        def on_import_file(path, state, form, version, request: gr.Request):
            if not path:
                return (*[gr.skip()] * len(all_outputs), gr.skip())
            from app.paths import read_upload

            try:
                data = read_upload(path, "recipe file")  # over the YAML size limit: refused unread
            except MergeError as err:
                return refresh(state, form, version, request, status=f"**Error:** {err}")
            return import_recipe(data, f"recipe file {Path(path).name}", state, form, version, request)

        yaml_file.upload(on_import_file, [yaml_file, session_state, form_state, form_version],
                         all_outputs + [models_status], api_visibility="private")

        def on_plan(state, form):
            try:
                from mergecore.plan import plan_merge

                plan = plan_merge(forms.build_recipe(form, state))
                return gr.Textbox(value=plan.describe(), visible=True)
            except MergeError as err:
                return gr.Textbox(value=f"error: {err}", visible=True)

        plan_btn.click(on_plan, [session_state, form_state], [plan_tb], api_name="plan")

        # curve editor
        def on_curve_key(key, group, state, form):
            return _curve_panel(form, state, key, group)

        curve_key_dd.input(on_curve_key, [curve_key_dd, curve_group, session_state, form_state], curve_outputs,
                           api_visibility="private")
        curve_group.input(on_curve_key, [curve_key_dd, curve_group, session_state, form_state], curve_outputs,
                          api_visibility="private")

        def after_curve_change(state, form, version, key, group, status=""):
            """Outputs after the curve of `key` changed: the form is re-rendered to show it."""
            return (form, version + 1, *_recipe_views(form, state, status), *_curve_panel(form, state, key, group))

        curve_change_outputs = [form_state, form_version, yaml_code, recipe_status, formula_md] + curve_outputs

        def on_curve_edit(anchors, key, group, split, state, form, version):
            try:
                if not key:
                    raise MergeError("choose a parameter under 'Curve for' first")
                form = forms.set_curve(form, state, key, anchors, group if split else "all")
                return after_curve_change(state, form, version, key, group)
            except MergeError as err:
                return (form, version, *_recipe_views(form, state, f"**Error:** {err}"), *_curve_panel(form, state, key, group))

        curve_inputs = [curve_key_dd, curve_group, curve_split, session_state, form_state, form_version]
        curve.edit(on_curve_edit, [curve] + curve_inputs, curve_change_outputs, api_name="set_curve")

        def on_anchors(text, *rest):
            try:
                anchors = [float(x) for x in (text or "").replace("[", " ").replace("]", " ").replace(",", " ").split()]
                if not anchors:
                    raise ValueError
            except ValueError:
                key, group, split, state, form, version = rest
                return (form, version, *_recipe_views(form, state, f"**Error:** anchors: write numbers like 0.2, 0.5, 0.8"),
                        *_curve_panel(form, state, key, group))
            return on_curve_edit(anchors, *rest)

        anchors_tb.submit(on_anchors, [anchors_tb] + curve_inputs, curve_change_outputs, api_visibility="private")
        anchors_tb.blur(on_anchors, [anchors_tb] + curve_inputs, curve_change_outputs, api_visibility="private")

        def on_split(split, key, group, state, form, version):
            try:
                if not key:
                    raise MergeError("choose a parameter under 'Curve for' first")
                form = forms.set_split(form, state, key, bool(split))
                return after_curve_change(state, form, version, key, group)
            except MergeError as err:
                return (form, version, *_recipe_views(form, state, f"**Error:** {err}"), *_curve_panel(form, state, key, group))

        curve_split.input(on_split, [curve_split, curve_key_dd, curve_group, session_state, form_state, form_version],
                          curve_change_outputs, api_visibility="private")

        def on_preset(name, lo, hi, n, key, group, split, state, form, version):
            from mergecore.params import preset_curve

            try:
                anchors = preset_curve(PRESETS.get(name, "flat"), float(lo or 0), float(hi or 0), int(n or 5))
                if len(anchors) == 1:
                    anchors = anchors * int(n or 5)
            except MergeError as err:
                return (form, version, *_recipe_views(form, state, f"**Error:** {err}"), *_curve_panel(form, state, key, group))
            return on_curve_edit(anchors, key, group, split, state, form, version)

        preset_btn.click(on_preset, [preset_dd, preset_lo, preset_hi, preset_n] + curve_inputs, curve_change_outputs,
                         api_name="preset")

        # Merge tab
        def on_merge(state, form, name, dtype, nthreads, request: gr.Request):
            owner = owner_of(request)
            try:
                recipe = forms.build_recipe(form, state)
                out_dir = ctx.workspace.merge_dir(owner, name or "merge")
                job = ctx.jobs.submit(owner, "merge", lambda jc: _run_merge(jc, recipe, out_dir, dtype, int(nthreads)),
                                      title=out_dir.name, meta={"name": out_dir.name, "out": str(out_dir)})
            except MergeError as err:
                return (gr.skip(), gr.Timer(active=False), progress_html(0, f"error: {err}", FAILED),
                        f"**Failed:** {err}", "")
            return (job.id, gr.Timer(active=True), progress_html(0, "starting ..."),
                    f"Merging into `{out_dir}` ...", "")

        merge_btn.click(on_merge, [session_state, form_state, out_name, out_dtype, threads],
                        [merge_job, merge_timer, merge_progress, merge_summary, merge_log], api_name="merge")

        def on_poll_merge(job_id, state, request: gr.Request):
            owner = owner_of(request)
            job = ctx.jobs.find(owner, job_id)
            if job is None:
                return (gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False), gr.skip(), gr.skip(), gr.skip())
            snap = ctx.jobs.snapshot(owner, job_id)
            frac, text = merge_progress_text(snap["progress"], snap["status"], snap["elapsed"])
            log_text = "\n".join(snap["log"][-400:])
            frame = plots.merge_frame(snap["events"])
            if not job.done:
                return (progress_html(frac, text), log_text, gr.skip(), gr.skip(), gr.skip(), gr.skip(), frame)
            if job.status == DONE:
                res = job.result
                summary = (f"**Merged** in {fmt_seconds(res.seconds)}: {res.tensors} tensors, "
                           f"{st.human_bytes(res.bytes_written)} in {res.shards} shard{'s' if res.shards != 1 else ''}, "
                           f"written to `{res.out_dir}`")
                bar = progress_html(1.0, text, DONE)
            elif job.status == CANCELLED:
                summary, bar = "Cancelled; nothing was written.", progress_html(frac, "cancelled", CANCELLED)
            else:
                summary, bar = f"**Failed:** {job.error}", progress_html(frac, f"failed: {job.error}", FAILED)
            merges = _merge_names(ctx, owner)
            choices = st.model_names(state) + merges
            return (bar, log_text, summary, gr.Timer(active=False),
                    gr.CheckboxGroup(choices=choices, value=choices),
                    gr.Dropdown(choices=merges, value=merges[-1] if merges else None), frame)

        merge_timer.tick(on_poll_merge, [merge_job, session_state],
                         [merge_progress, merge_log, merge_summary, merge_timer, cmp_models, export_dd, merge_plot],
                         api_name="poll_merge", concurrency_limit=None)

        def on_cancel(job_id, request: gr.Request):
            job = ctx.jobs.find(owner_of(request), job_id)
            if job is None or job.done:
                return "Nothing to cancel."
            ctx.jobs.cancel(owner_of(request), job_id)
            return "Cancelling ..."

        cancel_btn.click(on_cancel, [merge_job], [merge_summary], api_name="cancel_merge")

        # Compare tab
        def on_compare(selected, prompt, ntok, image, head, task, truth, tasks, state, request: gr.Request):
            owner = owner_of(request)
            try:
                result, merged = _compare(ctx, owner, state, selected, prompt, ntok, image, head, task=task,
                                          truth=truth, tasks=tasks)
            except MergeError as err:
                return f"**Error:** {err}", gr.skip(), gr.skip()
            from app.compare import render_html, rows_frame

            ref = result["reference"]
            return (f"Reference for the distances: **{ref}**.", render_html(result, merged), rows_frame(result["rows"]))

        cmp_btn.click(on_compare, [cmp_models, prompt_tb, new_tokens, image_in, head_dd, task_dd, truth_tb, tasks_tb,
                                   session_state], [cmp_status, cmp_html, cmp_df], api_name="compare")
        image_in.upload(lambda: "", None, [truth_tb], api_visibility="private")  # a new image: truth unknown

        def on_eval(selected, tasks, subset, state, request: gr.Request):
            owner = owner_of(request)
            try:
                tasks = (tasks or "").strip()
                if not tasks:
                    raise MergeError("give a tasks YAML for mergecore.eval (the synthetic demo has none)")
                from app.paths import tasks_file

                tasks = str(tasks_file(tasks, ctx.read_roots()))  # confined, and a tasks file: checked now
                models = _paths_for(ctx, owner, state, selected)
                from mergecore.eval import parse_subset

                sub = parse_subset(subset) if (subset or "").strip() else None
                job = ctx.jobs.submit(owner, "eval", lambda jc: _run_eval(jc, models, tasks, sub), title="evaluation")
            except MergeError as err:
                return gr.skip(), gr.Timer(active=False), progress_html(0, f"error: {err}", FAILED)
            return job.id, gr.Timer(active=True), progress_html(0, "starting ...")

        eval_btn.click(on_eval, [cmp_models, tasks_tb, subset_tb, session_state], [eval_job, eval_timer, eval_progress],
                       api_name="evaluate")

        def on_poll_eval(job_id, request: gr.Request):
            owner = owner_of(request)
            job = ctx.jobs.find(owner, job_id)
            if job is None:
                return gr.skip(), gr.skip(), gr.Timer(active=False)
            snap = ctx.jobs.snapshot(owner, job_id)
            p = snap["progress"] or {}
            text = f"{p.get('task', '')} · {snap['meta'].get('model', '')} · {fmt_seconds(snap['elapsed'])}"
            if not job.done:
                frac = snap["meta"].get("fraction")
                return progress_html(frac, text), gr.skip(), gr.skip()
            if job.status == DONE:
                return progress_html(1.0, f"done in {fmt_seconds(job.elapsed)}", DONE), job.result, gr.Timer(active=False)
            return progress_html(0, job.error or job.status, job.status), gr.skip(), gr.Timer(active=False)

        eval_timer.tick(on_poll_eval, [eval_job], [eval_progress, eval_df, eval_timer], api_name="poll_eval",
                        concurrency_limit=None)

        # Export tab
        def on_export(name, state, form, request: gr.Request):
            owner = owner_of(request)
            try:
                return _export(ctx, owner, name, state, form)
            except MergeError as err:
                return f"**Error:** {err}", gr.DownloadButton(visible=False), gr.DownloadButton(visible=False)

        export_btn.click(on_export, [export_dd, session_state, form_state], [export_md, recipe_dl, ckpt_dl],
                         api_name="export")

        # page load: every new session starts on the demo family, if the app has one
        def on_page_load(state, form, version, request: gr.Request):
            if ctx.demo is not None and not state.get("models"):
                return on_load_demo(state, form, version, request)
            return refresh(state, form, version, request)

        demo.load(on_page_load, [session_state, form_state, form_version], all_outputs + [models_status],
                  api_visibility="private")

        search_tab.wire({"demo": demo, "session_state": session_state, "form_state": form_state,
                         "form_version": form_version, "all_outputs": all_outputs, "refresh": refresh,
                         "models_status": models_status, "tabs": tabs, "cmp_models": cmp_models,
                         "export_dd": export_dd, "browser_key": browser_key})

        def on_unload(request: gr.Request):
            ctx.jobs.cancel_owner(owner_of(request))

        demo.unload(on_unload)
    return demo


# ---------------------------------------------------------------------------------------------
# handlers' helpers (plain functions, testable without a browser)


def _family_text(fam: Optional[DemoFamily]) -> str:
    if fam is None:
        return ""
    tag = ' <span class="mc-synthetic">SYNTHETIC</span>' if fam.synthetic else ' <span class="mc-real">trained here</span>'
    return f"**Demo family: {fam.title}**{tag} — {fam.description}"


def _method_text(name: str) -> str:
    m = forms.get_method(name)
    base = {"required": "needs a base model", "optional": "base model optional", "ignored": "no base model"}[m.base]
    return f"**{m.name}** — {m.summary} ({base})"


def _load_demo(ctx: AppContext, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    fam = ctx.demo
    if fam is None:
        raise MergeError("this app was started without a demo family")
    state = st.new_session() | {"trust_remote_code": bool((state or {}).get("trust_remote_code"))}
    for name, path in fam.models.items():
        state = st.add_model(state, str(path), path, name=name)
    state["base"] = fam.base
    state["family"] = {"name": fam.name, "title": fam.title, "kind": fam.kind,
                       "tasks": str(fam.tasks) if fam.tasks else None,
                       "val_tasks": str(fam.val_tasks) if fam.val_tasks else None, "synthetic": fam.synthetic}
    if fam.recipe:
        rec = copy.deepcopy(fam.recipe)
        refs = {n: str(p) for n, p in fam.models.items()}
        if rec.get("base_model") in refs:
            rec["base_model"] = refs[rec["base_model"]]
        for m in rec.get("models") or []:
            m["model"] = refs.get(m["model"], m["model"])
        from mergecore.recipe import recipe_from_dict

        state, form, _ = forms.form_from_recipe(recipe_from_dict(rec), state)
    else:
        form = forms.new_form(DEFAULT_METHOD, state)
    return state, form


def _fetch(jc, ref: str) -> str:
    jc.log(f"resolving {ref} (Hub download if it is not cached) ...")
    path = st.resolve_ref(ref)
    jc.log(f"local folder: {path}")
    return str(path)


def _hub_search(ctx: AppContext, q: str):
    q = (q or "").strip()
    if not q:
        return gr.Dropdown(choices=[]), "Type something to search for."
    if not ctx.hub_search or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return gr.Dropdown(choices=[]), "The Hub search is off (offline mode); add a local folder instead."
    found: list[str] = []
    err: list[str] = []

    def work():
        try:
            from huggingface_hub import HfApi

            for m in HfApi().list_models(search=q, limit=25, sort="downloads"):
                found.append(m.id)
        except Exception as e:  # offline, rate-limited ...
            err.append(one_line_error(e))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(ctx.hub_timeout)
    if t.is_alive():
        return gr.Dropdown(choices=[]), "**Error:** The Hub did not answer in time (offline?); add a local folder instead."
    if err:
        return gr.Dropdown(choices=[]), f"**Error:** Hub search failed ({err[0][:160]}); add a local folder instead."
    return (gr.Dropdown(choices=found, value=found[0] if found else None),
            f"{len(found)} model(s) found; pick one, then **Add model**." if found else "No models found.")


def _import_yaml(text: str | bytes, state: dict[str, Any], roots: Sequence[Path],
                 where: str = "recipe") -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Parse YAML as data (never executed; within `mergecore.yamlio`'s size and alias limits,
    so a small hostile upload cannot blow up), load its models into the session, fill the form.
    Local models and artifacts it names must lie in `roots` (`app.paths`), as typed paths do."""
    from mergecore.errors import short
    from mergecore.io.source import resolve_model_path
    from mergecore.recipe import recipe_from_dict
    from mergecore.yamlio import load_yaml

    from app.paths import confine, local_model

    recipe = recipe_from_dict(load_yaml(text or "", where), where)
    forms.get_method(recipe.merge_method)
    for key, ref in (recipe.artifacts or {}).items():
        confine(ref, roots, f"artifact {short(key, 40)}")
    state = copy.deepcopy(state or st.new_session())
    for ref in recipe.referenced_models():
        if st.find_model(state, ref) is None:
            local = local_model(ref, roots)  # None: a Hub id
            p = resolve_model_path(str(local) if local is not None else ref)  # cached Hub snapshot, or one line
            state = st.add_model(state, ref, confine(p, roots, "model folder"))
    return forms.form_from_recipe(recipe, state)


def _recipe_views(form: dict[str, Any], state: dict[str, Any], status: str = "") -> tuple[Any, Any, Any]:
    """(yaml, status, formula) for the current form."""
    if not form or not form.get("values") and not state.get("models"):
        return "", status or "Add models on the Models tab (or load the demo).", ""
    try:
        text = forms.recipe_yaml(form, state)
        problem = ""
    except MergeError as err:
        text, problem = gr.skip(), f"**Error:** {err}"
    try:
        formula = forms.formula_markdown(form, state)
    except MergeError as err:
        formula = f"**Error:** {err}"
    return text, status or problem, formula


def _y_range(field: dict[str, Any], anchors: list[float]) -> tuple[float, float]:
    lo, hi = field["range"] or (None, None)
    vmin, vmax = min(anchors + [0.0]), max(anchors + [1.0])
    lo = lo if lo is not None else vmin - 0.5
    hi = hi if hi is not None else vmax + 0.5
    if field["type"] == "int" and hi - lo > 50:
        hi = lo + max(10, vmax - lo + 5)
    return float(lo), float(hi)


def _curve_panel(form: dict[str, Any], state: dict[str, Any], key: Optional[str], group: str = "attn"):
    """(editor, anchors text, split checkbox, group radio, labels) for the curve target `key`."""
    if not form or not key or key not in form.get("values", {}):
        return (gr.update(value=[0.5, 0.5], title="choose a parameter under 'Curve for'", label_low="",
                          label_high="", layers=st.num_layers(state or {})), "", False, gr.Radio(visible=False), "")
    try:
        field = forms.field_by_key(form, state, key)
        value = form["values"][key]
        split = forms.is_split(value)
        g = group if split else "all"
        anchors = forms.get_curve(form, key, g)
    except MergeError as err:
        return (gr.skip(), "", False, gr.Radio(visible=False), f"**Error:** {err}")
    low, high = forms.endpoint_labels(field, form["method"], state)
    y_min, y_max = _y_range(field, anchors)
    title = f"{field['label']} — {forms.GROUP_LABELS[g]}"
    editor = gr.update(value=anchors, layers=st.num_layers(state), y_min=y_min, y_max=y_max, label_low=low,
                       label_high=high, title=title)
    labels = (f"**{field['label']}** ({forms.GROUP_LABELS[g]}): bottom line **{low}**, top line **{high}**. "
              f"Drag the round points; squares show the value each layer gets."
              + (f" Range {field['range_text']}." if field["range_text"] else ""))
    text = ", ".join(forms._fmt(a) for a in anchors)
    return editor, text, split, gr.Radio(visible=split, value=group if split else "attn"), labels


def _refresh_all(ctx: AppContext, state, form, version, owner: str, *, key=None, group="attn", status=None):
    """Values for every output of the model/recipe views, in `all_outputs` order (+ status)."""
    state = state or st.new_session()
    names = st.model_names(state)
    has_models = bool(names)
    if has_models and not (form or {}).get("values") and (form or {}).get("method") is not None:
        form = forms.new_form(form["method"], state, form)
    method = (form or {}).get("method") or DEFAULT_METHOD
    rows = st.models_table(state)
    try:
        ok, compat = st.compatibility(state)
    except MergeError as err:
        ok, compat = False, f"**Error:** {err}"
    targets = forms.curve_targets(form, state) if has_models and form and form.get("values") else []
    keys = [k for _, k in targets]
    if key not in keys:
        key = next((k for k in keys if isinstance(form["values"].get(k), (list, dict))), keys[0] if keys else None)
    yaml_text, rstatus, formula = _recipe_views(form or {}, state)
    merges = _merge_names(ctx, owner)
    cmp_choices = names + merges
    from app.compare import model_kind

    kinds = set()
    for m in state.get("models", []):
        try:
            kinds.add(model_kind(m["path"]))
        except MergeError:
            pass
    is_cls = "image-classification" in kinds
    fam = state.get("family") or {}
    task_names = _task_names(fam.get("tasks")) if is_cls and fam.get("tasks") else []
    return (
        state,
        form or {},
        (version or 0) + 1,
        rows,
        compat,
        gr.Dropdown(choices=names, value=state.get("base")),
        gr.Dropdown(choices=names, value=None),
        _family_text(ctx.demo) if fam else "",
        method,
        _method_text(method),
        yaml_text,
        rstatus,
        formula,
        gr.Dropdown(choices=targets, value=key),
        *_curve_panel(form or {}, state, key, group),
        gr.CheckboxGroup(choices=cmp_choices, value=cmp_choices),
        gr.Group(visible=not is_cls),
        gr.Column(visible=is_cls),
        gr.Dropdown(choices=([TASK_HEAD] if task_names else []) + [OWN_HEAD] + names,
                    value=TASK_HEAD if task_names else OWN_HEAD),
        gr.Dropdown(choices=task_names, value=task_names[0] if task_names else None) if task_names else gr.skip(),
        fam.get("tasks") or "",
        gr.Dropdown(choices=merges, value=merges[-1] if merges else None),
        status if status is not None else "",
    )


def _render_fields(form, state, refs: dict[str, Any]) -> None:
    """The parameter form, one widget per schema field (called inside `gr.render`)."""
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
    groups: dict[Optional[str], list[dict[str, Any]]] = {None: []}
    for f in fields:
        groups.setdefault(f["model"], []).append(f)
    with gr.Row(equal_height=False):
        for model, group_fields in groups.items():
            if (form.get("slices") and model is not None) or not group_fields:
                continue
            with gr.Column(min_width=220):
                gr.Markdown(f"**{'global parameters' if model is None else model}**")
                for f in group_fields:
                    _field_widget(f, form, refs)


def _field_widget(f: dict[str, Any], form: dict[str, Any], refs: dict[str, Any]) -> None:
    value = form["values"].get(f["key"], f["default"])
    info = f["help"] or None
    key = f["key"]
    elem = "field-" + key.replace("@", "--").replace(".", "_")
    outputs = refs["field_outputs"]
    if forms.is_raw(value):
        gr.Textbox(label=f["label"] + " (imported)", value=forms.value_to_text(value), interactive=False,
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
            comp = gr.Textbox(label=label, value=forms.value_to_text(value), info=info, elem_id=elem, scale=4,
                              placeholder="0.5, [0.2, 0.8] or {attn: [0, 1], mlp: [1, 0], other: 0.5}")
            btn = gr.Button("curve", size="sm", scale=1, elem_classes=["mc-curve-btn"], elem_id=elem + "-curve")
        events = [comp.submit, comp.blur]

        def pick(form, state, group, _key=key):
            return (gr.Dropdown(value=_key), *_curve_panel(form, state, _key, group))

        btn.click(pick, [refs["form_state"], refs["session_state"], refs["curve_group"]],
                  [refs["curve_key_dd"], refs["curve"], refs["anchors_tb"], refs["curve_split"], refs["curve_group"],
                   refs["curve_labels"]], api_visibility="private")
    else:
        comp = gr.Textbox(label=f["label"], value=str(value or ""), info=info, elem_id=elem)
        events = [comp.submit, comp.blur]
    inputs = [comp, refs["form_state"], refs["session_state"], refs["curve_key_dd"], refs["curve_group"]]
    for ev in events:
        ev(_on_field(key), inputs, outputs, api_visibility="private")


def _on_field(key: str):
    def handler(raw, form, state, curve_key, group):
        try:
            field = forms.field_by_key(form, state, key)
            value = forms.text_to_value(field, raw) if isinstance(raw, str) else raw
            form = forms.set_value(form, state, key, value)
            status = ""
        except MergeError as err:
            status = f"**Error:** {err}"
        yaml_text, rstatus, formula = _recipe_views(form, state, status)
        if curve_key == key:
            editor, text, _, _, labels = _curve_panel(form, state, key, group)
        else:
            editor, text, labels = gr.skip(), gr.skip(), gr.skip()
        return form, yaml_text, rstatus, formula, editor, text, labels

    return handler


def _merge_names(ctx: AppContext, owner: str) -> list[str]:
    return [j.meta["name"] for j in ctx.jobs.jobs(owner, kind="merge", status=DONE)]


def _merge_path(ctx: AppContext, owner: str, name: str) -> Optional[Path]:
    for j in ctx.jobs.jobs(owner, kind="merge", status=DONE):
        if j.meta["name"] == name:
            return Path(j.result.out_dir)
    return None


def _paths_for(ctx: AppContext, owner: str, state: dict[str, Any], selected: list[str]) -> dict[str, str]:
    if not selected:
        raise MergeError("choose the models to compare")
    out = {}
    for name in selected:
        p = _merge_path(ctx, owner, name)
        if p is None:
            p = Path(st.model_by_name(state, name)["path"])
        out[name] = str(p)
    return out


def _task_names(tasks: Any) -> list[str]:
    from app.compare import task_heads

    try:
        return list(task_heads(tasks)) if tasks else []
    except MergeError:
        return []


def _compare(ctx: AppContext, owner: str, state, selected, prompt, ntok, image, head, *, task=None, truth=None,
             tasks=None):
    from app import compare as cmp

    models = _paths_for(ctx, owner, state, selected)
    merged = {n for n in models if _merge_path(ctx, owner, n) is not None}
    merged_sel = [n for n in models if n in merged]
    ref = merged_sel[-1] if merged_sel else (state.get("base") if state.get("base") in models else None)
    kinds = {cmp.model_kind(p) for p in models.values()}
    trust = bool(state.get("trust_remote_code"))
    if kinds == {"image-classification"}:
        head_path, classes, note = None, None, ""
        if head == TASK_HEAD:
            if (tasks or "").strip():  # typed: confined, and checked as a tasks file first
                from app.paths import tasks_file

                tasks = str(tasks_file(tasks, ctx.read_roots()))
            heads = cmp.task_heads(tasks or (state.get("family") or {}).get("tasks") or "")
            if not task or task not in heads:
                raise MergeError("choose a task (its expert's head scores every body), or another classifier head"
                                 + (f"; tasks: {', '.join(heads)}" if heads else ": the tasks file names no heads"))
            head_path, classes = heads[task]["head"], heads[task]["classes"]
            note = (f"Every model scored with the {task} head ({Path(head_path).name}) over the task's "
                    f"{len(classes) if classes else 'all'} classes, as the evaluator scores the task.")
        elif head and head != OWN_HEAD:
            head_path = st.model_by_name(state, head)["path"]
            note = f"Every model scored with {head}'s classifier head."
        result = cmp.compare_classifiers(models, image, head_from=head_path, classes=classes, reference=ref,
                                         truth=(truth or "").strip() or None, trust_remote_code=trust)
        result["head_note"] = note
    elif kinds == {"causal-lm"}:
        result = cmp.compare_lms(models, prompt or "", new_tokens=int(ntok or 8), reference=ref,
                                 trust_remote_code=trust)
    else:
        raise MergeError("Compare handles causal LMs and image classifiers, one kind at a time; "
                         f"these models are: {', '.join(sorted(kinds))}")
    return result, merged


def _run_merge(jc, recipe, out_dir: Path, dtype: str, nthreads: int):
    """The merge job: the same plan_merge + execute_plan the CLI runs."""
    import torch

    from mergecore.executor import execute_plan
    from mergecore.plan import plan_merge
    from mergecore.io.writer import prepare_output_dir

    prepare_output_dir(out_dir)
    out_dtype = None if dtype in (None, "", "as in recipe") else dtype
    jc.log(f"planning {recipe.merge_method} merge ...")
    plan = plan_merge(recipe, out_dtype=out_dtype)
    for line in plan.describe().splitlines():
        if line.startswith("per-layer parameters"):
            break
        jc.log(line)  # method, models, output size, peak memory, warnings
    torch.set_num_threads(max(1, nthreads))
    last = [-1]

    def progress(p):
        jc.emit(p.as_event())
        tenth = int(p.fraction * 10)
        if tenth != last[0]:
            last[0] = tenth
            jc.log(f"{p.tensors_done}/{p.tensors_total} tensors, {st.human_bytes(p.bytes_done)} written")

    res = execute_plan(plan, out_dir, threads=nthreads, progress=progress, cancel=jc.cancel)
    jc.log(res.summary())
    return res


def _run_eval(jc, models: dict[str, str], tasks: str, subset):
    from app.compare import evaluate_models

    n = len(models)
    done = [0]

    def progress(p):
        jc.emit(p.as_event())
        jc.meta["fraction"] = (done[0] + p.fraction) / n
        jc.meta["model"] = current[0]

    current = [""]
    rows = []
    import pandas as pd

    for name, path in models.items():
        current[0] = name
        df = evaluate_models({name: path}, tasks, subset=subset, progress=progress, cancel=jc.cancel, log=jc.log)
        rows.append(df)
        done[0] += 1
    return pd.concat(rows, ignore_index=True)


def _export(ctx: AppContext, owner: str, name: Optional[str], state, form):
    ws = ctx.workspace
    lines = []
    if name:
        folder = _merge_path(ctx, owner, name)
        if folder is None:
            raise MergeError(f"no finished merge called '{name}' in this session")
        recipe_file = folder / "mergecore_recipe.yml"
        text = recipe_file.read_text() if recipe_file.is_file() else forms.recipe_yaml(form, state)
        rpath = ws.write_recipe(text, f"{name}-recipe")
        z = ws.zip_checkpoint(folder, name)
        if z is None:
            lines.append(f"The checkpoint is {st.human_bytes(folder_bytes(folder))}, "
                         f"over the zip limit: it is in the folder `{folder}`.")
            ckpt = gr.DownloadButton(visible=False)
        else:
            lines.append(f"Checkpoint `{name}` zipped ({st.human_bytes(z.stat().st_size)}); folder: `{folder}`.")
            ckpt = gr.DownloadButton(f"Download {z.name}", value=str(z), visible=True)
    else:
        rpath = ws.write_recipe(forms.recipe_yaml(form, state), "recipe")
        lines.append("No merged checkpoint chosen: the recipe is the current form's.")
        ckpt = gr.DownloadButton(visible=False)
    return ("\n\n".join(lines), gr.DownloadButton(f"Download {rpath.name}", value=str(rpath), visible=True), ckpt)


# ---------------------------------------------------------------------------------------------
# launching


def launch_kwargs(ctx: AppContext) -> dict[str, Any]:
    """Arguments for `demo.launch` (Gradio 6 takes theme and css there). Uploads are capped at
    the YAML size limit: the app takes recipe files and images, nothing larger."""
    from mergecore.yamlio import MAX_YAML_BYTES

    gr.set_static_paths([str(ctx.workspace.exports)])
    return {"css": CSS, "theme": gr.themes.Soft(), "allowed_paths": [str(ctx.workspace.exports)],
            "max_file_size": MAX_YAML_BYTES}


def make_context(work_dir: str | Path, demo: Optional[DemoFamily] = None, allowed_dirs: Sequence[str | Path] = (),
                 demo_dir: Optional[str | Path] = None, **kwargs: Any) -> AppContext:
    """The app's context; `allowed_dirs` (`--allow-dir`) are folders besides the work dir, the demo
    dir and the Hugging Face cache that paths typed into the app may name."""
    from app.files import Workspace

    ws_kwargs = {k: kwargs.pop(k) for k in ("zip_limit",) if k in kwargs}
    allowed = []
    for d in allowed_dirs:
        p = Path(d).expanduser()
        if not p.is_dir():
            raise MergeError(f"--allow-dir {p}: not a folder")
        allowed.append(p.resolve())
    return AppContext(workspace=Workspace(work_dir, **ws_kwargs), demo=demo, allowed_dirs=tuple(allowed),
                      demo_dir=Path(demo_dir).expanduser() if demo_dir else None, **kwargs)
