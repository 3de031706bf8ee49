"""The Models tab: the session's models (the demo family, local folders, Hub downloads), the
base model, and whether they can be merged tensor by tensor.

Named API endpoints: /load_demo, /add_model, /poll_models, /hub_search, /set_base, /remove_model.
"""

from __future__ import annotations

import copy
import os
import threading
from typing import Any, Optional

import gradio as gr

from mergecore.errors import MergeError

from app import forms
from app import state as st
from app.context import AppContext, Page, owner_of
from app.demo_family import DemoFamily
from app.jobs import DONE, one_line_error
from app.render import error_md, fmt_seconds, progress_html


class ModelsTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def build(self, page: Page) -> None:
        with gr.Tab("Models", id="models"):
            with gr.Row():
                with gr.Column(scale=3):
                    with gr.Row():
                        self.ref_tb = gr.Textbox(label="Hub id or local folder", scale=4,
                                                 placeholder="org/name or /path/to/model")
                        self.add_btn = gr.Button("Add model", variant="secondary", scale=1)
                    with gr.Row():
                        self.hub_q = gr.Textbox(label="Search the Hub", placeholder="e.g. tiny llama", scale=3)
                        self.hub_btn = gr.Button("Search", scale=1)
                        self.hub_dd = gr.Dropdown(label="Hub results", choices=[], scale=3, allow_custom_value=True)
                with gr.Column(scale=2):
                    self.demo_btn = gr.Button("Load the built-in demo models", variant="primary")
                    self.trust_cb = gr.Checkbox(
                        label="trust remote code (run Python shipped with a model repo)", value=False,
                        info="Off: models whose architecture is not in transformers are refused.")
            page.comps["models_status"] = gr.Markdown("")
            self.fetch_progress = gr.HTML("")
            self.models_df = gr.Dataframe(headers=st.MODEL_COLUMNS, value=[], interactive=False, label="Models",
                                          wrap=True)
            self.compat_md = gr.Markdown("Add at least two models to merge.")
            with gr.Row():
                self.base_dd = gr.Dropdown(label="Base model", choices=[], value=None, interactive=True)
                self.remove_dd = gr.Dropdown(label="Remove a model", choices=[], value=None, interactive=True)
                self.remove_btn = gr.Button("Remove")
            self.fetch_timer = gr.Timer(0.5, active=False)
            self.fetch_job = gr.State("")

    # -- the session's views ----------------------------------------------------------------------

    def outputs(self, page: Page) -> list[Any]:
        return [self.models_df, self.compat_md, self.base_dd, self.remove_dd, page.comps["family_md"]]

    def views(self, state: dict[str, Any], form: dict[str, Any], owner: str, **_: Any) -> list[Any]:
        names = st.model_names(state)
        try:
            _, compat = st.compatibility(state)
        except MergeError as err:
            compat = error_md(err)
        return [st.models_table(state), compat, gr.Dropdown(choices=names, value=state.get("base")),
                gr.Dropdown(choices=names, value=None), family_text(self.ctx.demo) if state.get("family") else ""]

    # -- events -----------------------------------------------------------------------------------

    def wire(self, page: Page) -> None:
        ctx, refresh = self.ctx, page.refresh
        session = [page.session_state, page.form_state, page.form_version]
        fetch_outputs = page.status_outputs + [self.fetch_job, self.fetch_timer, self.fetch_progress]

        def on_load_demo(state, form, version, request: gr.Request):
            try:
                state, form = load_demo(ctx, state)
            except MergeError as err:
                return refresh(state, form, version, request, status=error_md(err))
            return refresh(state, form, version, request, status=f"Loaded the demo models ({ctx.demo.title}).")

        def failed(state, form, version, request, err):
            return (*refresh(state, form, version, request, status=error_md(err)), gr.skip(), gr.skip(), "")

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
                return failed(state, form, version, request, err)
            return (*refresh(state, form, version, request, status="Building the demo models ..."), job.id,
                    gr.Timer(active=True), progress_html(0, "building the demo models ..."))

        self.demo_btn.click(on_demo_button, session, fetch_outputs, api_name="load_demo")

        def on_add(ref, state, form, version, request: gr.Request):
            ref = (ref or "").strip()
            try:
                if not ref:
                    raise MergeError("give a Hub id (org/name) or a local folder")
                from app.paths import local_model

                p = local_model(ref, ctx.read_roots())  # None: a Hub id
                if p is not None and p.is_dir():
                    state = st.add_model(state, ref, p)
                    form = forms.sync_form(form, state)
                    return (*refresh(state, form, version, request, status=f"Added `{ref}`."), "",
                            gr.Timer(active=False), "")
                if p is not None:
                    raise MergeError(f"'{ref}' is neither a local folder nor a Hub id (org/name)")
                job = ctx.jobs.submit(owner_of(request), "fetch", lambda jc: fetch(jc, ref), title=ref,
                                      meta={"ref": ref}, slot="fetch")
                return (*refresh(state, form, version, request, status=f"Fetching `{ref}` from the Hub ..."),
                        job.id, gr.Timer(active=True), progress_html(None, f"fetching {ref} ..."))
            except MergeError as err:
                return failed(state, form, version, request, err)

        add_evt = dict(fn=on_add, inputs=[self.ref_tb, *session], outputs=fetch_outputs)
        self.add_btn.click(**add_evt, api_name="add_model")
        self.ref_tb.submit(**add_evt, api_visibility="private")

        def on_poll_fetch(job_id, state, form, version, request: gr.Request):
            job = ctx.jobs.find(owner_of(request), job_id)
            if job is None:
                return (*page.skip_refresh(), gr.skip(), gr.Timer(active=False), "")
            if not job.done:
                what = job.meta.get("ref") or job.title
                frac = (job.progress or {}).get("fraction")
                if job.kind == "demo" and (job.progress or {}).get("stage"):
                    what = f"{what} ({job.progress['stage']})"
                return (*page.skip_refresh(), gr.skip(), gr.skip(),
                        progress_html(frac, f"{job.kind}: {what} · {fmt_seconds(job.elapsed)}"))
            if job.kind == "demo" and job.status == DONE:
                ctx.demo = job.result
                return (*on_load_demo(state, form, version, request), gr.Timer(active=False), "")
            msg = error_md(job.error)
            if job.kind != "demo" and job.status == DONE:
                try:
                    from app.paths import confine

                    folder = confine(job.result, ctx.read_roots(), "model folder")  # a Hub snapshot: in the cache
                    state = st.add_model(state, job.meta["ref"], folder)
                    form = forms.sync_form(form, state)
                    msg = f"Added `{job.meta['ref']}`."
                except MergeError as err:
                    msg = error_md(err)
            return (*refresh(state, form, version, request, status=msg), gr.Timer(active=False), "")

        self.fetch_timer.tick(on_poll_fetch, [self.fetch_job, *session],
                              page.status_outputs + [self.fetch_timer, self.fetch_progress], api_name="poll_models",
                              concurrency_limit=None)

        def on_hub_search(q):
            return hub_search(ctx, q)

        status = page.comps["models_status"]
        self.hub_btn.click(on_hub_search, [self.hub_q], [self.hub_dd, status], api_name="hub_search")
        self.hub_q.submit(on_hub_search, [self.hub_q], [self.hub_dd, status], api_visibility="private")
        self.hub_dd.input(lambda v: v or "", [self.hub_dd], [self.ref_tb], api_visibility="private")

        def on_base(name, state, form, version, request: gr.Request):
            state = copy.deepcopy(state)
            state["base"] = name or None
            form = forms.sync_form(form, state)
            return refresh(state, form, version, request, status=f"Base model: `{name}`." if name else "No base model.")

        self.base_dd.input(on_base, [self.base_dd, *session], page.status_outputs, api_name="set_base")

        def on_remove(name, state, form, version, request: gr.Request):
            if not name:
                return refresh(state, form, version, request, status="Choose a model to remove.")
            state = st.remove_model(state, name)
            form = forms.sync_form(form, state) if state["models"] else {}
            return refresh(state, form, version, request, status=f"Removed `{name}`.")

        self.remove_btn.click(on_remove, [self.remove_dd, *session], page.status_outputs, api_name="remove_model")

        def on_trust(v, state):
            state = copy.deepcopy(state)
            state["trust_remote_code"] = bool(v)
            return state

        self.trust_cb.input(on_trust, [self.trust_cb, page.session_state], [page.session_state],
                            api_visibility="private")

        # page load: every new session starts on the demo family, if the app has one
        def on_page_load(state, form, version, request: gr.Request):
            if ctx.demo is not None and not state.get("models"):
                return on_load_demo(state, form, version, request)
            return refresh(state, form, version, request)

        page.blocks.load(on_page_load, session, page.status_outputs, api_visibility="private")


# ---------------------------------------------------------------------------------------------
# the handlers' work (plain functions)


def family_text(fam: Optional[DemoFamily]) -> str:
    if fam is None:
        return ""
    tag = ' <span class="mc-synthetic">SYNTHETIC</span>' if fam.synthetic else ' <span class="mc-real">trained here</span>'
    return f"**Demo family: {fam.title}**{tag} — {fam.description}"


def load_demo(ctx: AppContext, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new session on the demo family's models, its recipe in the form."""
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
    if not fam.recipe:
        return state, forms.new_form(forms.default_method(), state)
    rec = copy.deepcopy(fam.recipe)
    refs = {n: str(p) for n, p in fam.models.items()}
    if rec.get("base_model") in refs:
        rec["base_model"] = refs[rec["base_model"]]
    for m in rec.get("models") or []:
        m["model"] = refs.get(m["model"], m["model"])
    from mergecore.recipe import recipe_from_dict

    state, form, _ = forms.form_from_recipe(recipe_from_dict(rec), state)
    return state, form


def fetch(jc, ref: str) -> str:
    """The fetch job: a Hub id's local snapshot (downloaded if it is not cached)."""
    jc.log(f"resolving {ref} (Hub download if it is not cached) ...")
    path = st.resolve_ref(ref)
    jc.log(f"local folder: {path}")
    return str(path)


def hub_search(ctx: AppContext, q: str):
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
        return gr.Dropdown(choices=[]), error_md("The Hub did not answer in time (offline?); add a local folder instead.")
    if err:
        return gr.Dropdown(choices=[]), error_md(f"Hub search failed ({err[0][:160]}); add a local folder instead.")
    return (gr.Dropdown(choices=found, value=found[0] if found else None),
            f"{len(found)} model(s) found; pick one, then **Add model**." if found else "No models found.")
