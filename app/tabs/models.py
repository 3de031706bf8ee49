"""The Models tab: the session's models (the demo family, local folders, Hub downloads), the
base model, and whether they can be merged tensor by tensor.

On first start the demo family is built in the background (`launch.py` serves the page at once,
`app.demo_family.DemoBuild`): the tab shows the build's stage, percent and seconds beside the
demo button, loads the demo into a session that has no models yet when it is done, and offers it
to the others. Models can be added meanwhile. Each action's message stays where it happened (the
Hub search's under the search box, the demo build's beside its button, the rest in the status
line), with a toast. A base + LoRA adapter (a PEFT folder or Hub id on a loaded model, a folder
or a Hub id) is added as one model, checked by the engine (`app.adapters`); so is a
`BASE+ADAPTER` reference typed as a model. The Hub search itself is `app.hub_search`.

Named API endpoints: /load_demo, /poll_demo, /add_model, /add_adapter, /poll_models, /hub_search,
/set_base, /remove_model.
"""

from __future__ import annotations

import copy
import os
import threading
from typing import Any, Callable, Optional

import gradio as gr

from mergecore.errors import MergeError

from app import adapters, forms
from app import state as st
from app.context import AppContext, Page, owner_of
from app.demo_family import DemoBuild, DemoFamily
from app.hub_search import HubSearches
from app.jobs import DONE, FAILED
from app.render import error_md, fmt_seconds, progress_html

# the table's columns (app.state.MODEL_COLUMNS) get room for their header on one line; the
# source (a folder or a Hub id) takes the rest and wraps
COLUMN_WIDTHS = ["180px", "60px", "235px", "75px", "105px", "90px", "90px", "330px"]
BUILDING = "The demo models are being built (first start); add a Hub model or a local folder meanwhile."


class ModelsTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.hub = HubSearches(lambda: ctx.hub_timeout, lambda: ctx.hub_search)
        self._build_lock = threading.Lock()

    def build(self, page: Page) -> None:
        with gr.Tab("Models", id="models"):
            with gr.Row():
                with gr.Column(scale=3):
                    with gr.Row():
                        self.ref_tb = gr.Textbox(label="Hub id or local folder", scale=4,
                                                 placeholder="org/name or /path/to/model", elem_id="models-ref")
                        self.add_btn = gr.Button("Add model", variant="secondary", scale=1, elem_id="models-add")
                    with gr.Row():
                        self.hub_q = gr.Textbox(label="Search the Hub", placeholder="e.g. tiny llama", scale=3)
                        self.hub_btn = gr.Button("Search", scale=1)
                        self.hub_dd = gr.Dropdown(label="Hub results", choices=[], scale=3, allow_custom_value=True)
                    self.hub_md = gr.Markdown("", elem_id="hub-status")
                with gr.Column(scale=2):
                    self.demo_btn = gr.Button("Load the built-in demo models", variant="primary", elem_id="demo-btn")
                    self.demo_progress = gr.HTML("", elem_id="demo-build")
                    self.trust_cb = gr.Checkbox(
                        label="trust remote code (run Python shipped with a model repo)", value=False,
                        info="Off: models whose architecture is not in transformers are refused.")
            with gr.Row(equal_height=True):  # base + LoRA adapter: one model, checked by the engine
                self.adapter_base = gr.Textbox(label="Base model of a LoRA adapter", scale=3, elem_id="adapter-base",
                                               placeholder="org/name or /path/to/model",
                                               info="a loaded model's name, a local folder or a Hub id")
                self.adapter_pick = gr.Dropdown(label="Loaded models", choices=[], value=None, scale=2,
                                                elem_id="adapter-pick", info="picks the base")
                self.adapter_tb = gr.Textbox(label="LoRA adapter (PEFT)", scale=4, elem_id="adapter-ref",
                                             placeholder="/path/to/adapter or org/adapter",
                                             info="a folder with adapter_config.json, or a Hub id")
                self.adapter_btn = gr.Button("Add base + adapter", scale=1, elem_id="adapter-add")
            page.comps["models_status"] = gr.Markdown("", elem_id="models-status")
            self.fetch_progress = gr.HTML("")
            self.models_df = gr.Dataframe(headers=st.MODEL_COLUMNS, value=[], interactive=False, label="Models",
                                          wrap=True, column_widths=COLUMN_WIDTHS, elem_id="models-table")
            self.compat_md = gr.Markdown("Add at least two models to merge.")
            with gr.Row():
                self.base_dd = gr.Dropdown(label="Base model", choices=[], value=None, interactive=True)
                self.remove_dd = gr.Dropdown(label="Remove a model", choices=[], value=None, interactive=True)
                self.remove_btn = gr.Button("Remove")
            self.fetch_timer = gr.Timer(0.5, active=False)
            self.fetch_job = gr.State("")
            self.demo_timer = gr.Timer(1.0, active=False)

    # -- the session's views ----------------------------------------------------------------------

    def outputs(self, page: Page) -> list[Any]:
        return [self.models_df, self.compat_md, self.base_dd, self.remove_dd, page.comps["family_md"],
                self.adapter_pick]

    def views(self, state: dict[str, Any], form: dict[str, Any], owner: str, **_: Any) -> list[Any]:
        names = st.model_names(state)
        try:
            _, compat = st.compatibility(state)
        except MergeError as err:
            compat = error_md(err)
        bases = [m["name"] for m in (state or {}).get("models", []) if not st.adapter_sides(m["path"])]
        return [st.models_table(state), compat, gr.Dropdown(choices=names, value=state.get("base")),
                gr.Dropdown(choices=names, value=None), family_text(self.ctx.demo) if state.get("family") else "",
                gr.Dropdown(choices=bases, value=None)]

    # -- the demo build ---------------------------------------------------------------------------

    def start_demo_build(self, name: Optional[str] = None, *, fallback: bool = False,
                         on_progress: Optional[Callable[[Any], None]] = None,
                         settings: Optional[dict[str, Any]] = None) -> DemoBuild:
        """Build the demo family in the background (once for the app, whichever page asks)."""
        return start_demo_build(self.ctx, name, fallback=fallback, on_progress=on_progress, settings=settings,
                                lock=self._build_lock)

    # -- events -----------------------------------------------------------------------------------

    def wire(self, page: Page) -> None:
        ctx, refresh = self.ctx, page.refresh
        session = [page.session_state, page.form_state, page.form_version]
        # the Add buttons are off while a Hub fetch runs (first, so the status stays third from the end)
        buttons = [self.add_btn, self.adapter_btn]
        fetch_outputs = buttons + page.status_outputs + [self.fetch_job, self.fetch_timer, self.fetch_progress]
        demo_outputs = page.status_outputs + [self.demo_timer, self.demo_progress]

        def said(msg: str, *rest: Any) -> tuple:
            """Only the status line (and `rest`): the session is left as it is."""
            return (*page.skip_refresh(), msg, *rest)

        def on_load_demo(state, form, version, request, toast: bool = False):
            """The demo into the session (a toast too when the user asked for it)."""
            try:
                state, form = load_demo(ctx, state)
            except MergeError as err:
                gr.Warning(str(err))
                return refresh(state, form, version, request, status=error_md(err))
            build = ctx.demo_build
            note = f" ({build.note})" if build is not None and build.note else ""
            if toast:
                gr.Info(f"Loaded the demo models ({ctx.demo.title}).")
            return refresh(state, form, version, request, status=f"Loaded the demo models ({ctx.demo.title}){note}.")

        def on_demo_button(state, form, version, request: gr.Request):
            if ctx.demo is not None:
                return (*on_load_demo(state, form, version, request, toast=True), gr.Timer(active=False), gr.skip())
            build = ctx.demo_build
            if build is None or (build.done and build.family is None):
                # started with --no-demo (or the last build failed): build it now, for every page
                build = self.start_demo_build(fallback=not os.environ.get("MERGECORE_DEMO_FAMILY"))
                msg = "Building the demo models ..."
            else:
                msg = "The demo models are still being built; they load here when they are ready."
            return said(msg, gr.Timer(active=True), demo_html(build))

        self.demo_btn.click(on_demo_button, session, demo_outputs, api_name="load_demo")

        def on_poll_demo(state, form, version, request: gr.Request):
            build = ctx.demo_build
            if build is None:
                return said(gr.skip(), gr.Timer(active=False), gr.skip())
            if not build.done:
                return said(gr.skip(), gr.skip(), demo_html(build))
            if build.family is None:
                gr.Warning(f"The demo models could not be built: {build.error}")
                return said(gr.skip(), gr.Timer(active=False), demo_html(build))
            if ctx.demo is None:
                ctx.demo = build.family
            if not (state or {}).get("models"):  # a page with no models yet opens on the demo
                return (*on_load_demo(state, form, version, request, toast=True), gr.Timer(active=False),
                        demo_html(build))
            gr.Info("The demo models are ready: 'Load the built-in demo models' adds them.")
            return said(gr.skip(), gr.Timer(active=False), demo_html(build, offer=True))

        self.demo_timer.tick(on_poll_demo, session, demo_outputs, api_name="poll_demo", concurrency_limit=None)

        def failed(err):
            gr.Warning(str(err))
            return said(error_md(err), gr.skip(), gr.skip(), "")

        def already(m: dict[str, Any], ref: str) -> str:
            gr.Info(f"{ref} is already loaded, as {m['name']}.")
            return f"`{ref}` is already loaded, as `{m['name']}` ({m['path']}); nothing changed."

        def added(ref: str, source: Any, state, form, version, request, what: str = "") -> tuple:
            """`source` (a folder, or both folders of a base + adapter) into the session as `ref`."""
            same = loaded(state, source)
            if same is not None:
                return said(already(same, ref), gr.skip(), gr.Timer(active=False), "")
            state = st.add_model(state, ref, source)  # the engine opens it (and checks an adapter)
            form = forms.sync_form(form, state)
            gr.Info(f"Added {ref}.")
            return (*refresh(state, form, version, request, status=f"Added `{ref}`{what}."), "",
                    gr.Timer(active=False), "")

        def fetching(ref: str, work: Callable[[Any], str], state, request) -> tuple:
            """A background fetch of `ref` from the Hub (`work` returns the source), unless loaded."""
            same = next((m for m in (state or {}).get("models", []) if m["ref"] == ref), None)
            if same is not None:
                return said(already(same, ref), gr.skip(), gr.Timer(active=False), "")
            job = ctx.jobs.submit(owner_of(request), "fetch", work, title=ref, meta={"ref": ref}, slot="fetch")
            return said(f"Fetching `{ref}` from the Hub ...", job.id, gr.Timer(active=True),
                        progress_html(None, f"fetching {ref} ..."))

        def add_pair(base, adapter, state, form, version, request) -> tuple:
            pair = adapters.pair(base, adapter, state, ctx.read_roots())
            if pair.local:
                return added(pair.ref, pair.source(), state, form, version, request, " (base + LoRA adapter)")
            return fetching(pair.ref, lambda jc: adapters.fetch(jc, pair), state, request)

        def add(ref, state, form, version, request: gr.Request):
            ref = (ref or "").strip()
            try:
                if not ref:
                    raise MergeError("give a Hub id (org/name) or a local folder")
                sides = adapters.split(ref)
                if sides is not None:  # BASE+ADAPTER typed as one model
                    return add_pair(*sides, state, form, version, request)
                from app.paths import local_model

                p = local_model(ref, ctx.read_roots())  # None: a Hub id
                if p is not None and p.is_dir():
                    return added(ref, p, state, form, version, request)
                if p is not None:
                    raise MergeError(f"'{ref}' is neither a local folder nor a Hub id (org/name)")
                return fetching(ref, lambda jc: fetch(jc, ref), state, request)
            except MergeError as err:
                return failed(err)

        def with_buttons(out: tuple) -> tuple:
            fetching = isinstance(out[-4], str) and out[-4].startswith("Fetching")  # the status (before job, timer, bar)
            return (gr.Button(interactive=not fetching), gr.Button(interactive=not fetching), *out)

        def on_add(ref, state, form, version, request: gr.Request):
            return with_buttons(add(ref, state, form, version, request))

        add_evt = dict(fn=on_add, inputs=[self.ref_tb, *session], outputs=fetch_outputs)
        self.add_btn.click(**add_evt, api_name="add_model")
        self.ref_tb.submit(**add_evt, api_visibility="private")

        def on_add_adapter(base, adapter, state, form, version, request: gr.Request):
            try:
                return with_buttons(add_pair(base, adapter, state, form, version, request))
            except MergeError as err:
                return with_buttons(failed(err))

        adapter_evt = dict(fn=on_add_adapter, inputs=[self.adapter_base, self.adapter_tb, *session],
                           outputs=fetch_outputs)
        self.adapter_btn.click(**adapter_evt, api_name="add_adapter")
        self.adapter_tb.submit(**adapter_evt, api_visibility="private")
        self.adapter_pick.input(lambda v: v or gr.skip(), [self.adapter_pick], [self.adapter_base],
                                api_visibility="private")

        def poll_fetch(job_id, state, form, version, request: gr.Request):
            job = ctx.jobs.find(owner_of(request), job_id)
            if job is None:
                return said(gr.skip(), gr.Timer(active=False), "")
            if not job.done:
                frac = (job.progress or {}).get("fraction")
                return said(gr.skip(), gr.skip(), progress_html(frac, f"fetching {job.meta.get('ref') or job.title} "
                                                                      f"· {fmt_seconds(job.elapsed)}"))
            ref = job.meta["ref"]
            if job.status != DONE:
                gr.Warning(job.error or job.status)
                return said(error_md(job.error or job.status), gr.Timer(active=False), "")
            try:
                from app.paths import confine_source

                folder = confine_source(job.result, ctx.read_roots())  # Hub snapshots: in the cache
                same = loaded(state, folder)
                if same is not None:
                    return said(already(same, ref), gr.Timer(active=False), "")
                state = st.add_model(state, ref, folder)
                form = forms.sync_form(form, state)
            except MergeError as err:
                gr.Warning(str(err))
                return said(error_md(err), gr.Timer(active=False), "")
            gr.Info(f"Added {ref}.")
            return (*refresh(state, form, version, request, status=f"Added `{ref}`."), gr.Timer(active=False), "")

        def on_poll_fetch(job_id, state, form, version, request: gr.Request):
            out = poll_fetch(job_id, state, form, version, request)
            job = ctx.jobs.find(owner_of(request), job_id)  # after: a fetch shown finished is finished here
            on = gr.skip() if job is not None and not job.done else gr.Button(interactive=True)
            return (on, on, *out)

        self.fetch_timer.tick(on_poll_fetch, [self.fetch_job, *session],
                              buttons + page.status_outputs + [self.fetch_timer, self.fetch_progress],
                              api_name="poll_models",
                              concurrency_limit=None)

        def on_hub_search(q, request: gr.Request):
            found = self.hub.search(owner_of(request), q)
            if found is None:  # a newer search of this page has started: its answer is the one shown
                return gr.skip(), gr.skip()
            names, msg, ok = found
            if not ok:
                gr.Warning(msg)
            return (gr.Dropdown(choices=names, value=names[0] if names else None),
                    msg if ok else error_md(msg))

        hub_evt = dict(fn=on_hub_search, inputs=[self.hub_q], outputs=[self.hub_dd, self.hub_md],
                       concurrency_limit=None)  # bounded by the timeout; never queued behind other searches
        self.hub_btn.click(**hub_evt, api_name="hub_search")
        self.hub_q.submit(**hub_evt, api_visibility="private")
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
            gr.Info(f"Removed {name}.")
            return refresh(state, form, version, request, status=f"Removed `{name}`.")

        self.remove_btn.click(on_remove, [self.remove_dd, *session], page.status_outputs, api_name="remove_model")

        def on_trust(v, state):
            state = copy.deepcopy(state)
            state["trust_remote_code"] = bool(v)
            return state

        self.trust_cb.input(on_trust, [self.trust_cb, page.session_state], [page.session_state],
                            api_visibility="private")

        # page load: a new session starts on the demo family if the app has one; while it is being
        # built, the page shows the build and loads the demo when it is done (if no model was added)
        def on_page_load(state, form, version, request: gr.Request):
            build = ctx.demo_build
            if ctx.demo is not None and not (state or {}).get("models"):
                return (*on_load_demo(state, form, version, request), gr.Timer(active=False),
                        demo_html(build) if build is not None else gr.skip())
            if build is not None and not build.done:
                return (*refresh(state, form, version, request, status=BUILDING), gr.Timer(active=True),
                        demo_html(build))
            return (*refresh(state, form, version, request), gr.Timer(active=False),
                    demo_html(build) if build is not None and build.family is None else gr.skip())

        page.on_load(on_page_load, session, demo_outputs, api_visibility="private")


# ---------------------------------------------------------------------------------------------
# the handlers' work (plain functions)


def family_text(fam: Optional[DemoFamily]) -> str:
    if fam is None:
        return ""
    tag = ' <span class="mc-synthetic">SYNTHETIC</span>' if fam.synthetic else ' <span class="mc-real">trained here</span>'
    return f"**Demo family: {fam.title}**{tag} — {fam.description}"


def start_demo_build(ctx: AppContext, name: Optional[str] = None, *, fallback: bool = False,
                     on_progress: Optional[Callable[[Any], None]] = None, settings: Optional[dict[str, Any]] = None,
                     lock: Optional[threading.Lock] = None) -> DemoBuild:
    """Start building the demo family `name` into the app's demo dir on a background thread (one
    build at a time: a running one is returned as it is); `ctx.demo` is set when it is ready."""

    def ready(fam: DemoFamily) -> None:
        ctx.demo = fam

    with lock or threading.Lock():
        build = ctx.demo_build
        if build is not None and not build.done:
            return build
        build = ctx.demo_build = DemoBuild(name, ctx.demo_dir, fallback=fallback, on_progress=on_progress,
                                           settings=settings)
        return build.start(ready)


def demo_html(build: Optional[DemoBuild], offer: bool = False) -> str:
    """The demo build as a progress bar: stage, percent and seconds; then ready, or its one-line error."""
    if build is None:
        return ""
    s = build.snapshot()
    note = f" · {s['note']}" if s["note"] else ""
    if not s["done"]:
        return progress_html(s["fraction"], f"building the demo models: {s['stage']} · {100 * s['fraction']:.0f}% · "
                                            f"{fmt_seconds(s['elapsed'])}{note}")
    if s["error"]:
        return progress_html(s["fraction"], f"the demo models could not be built: {s['error']}", FAILED)
    then = "; 'Load the built-in demo models' adds them to this session" if offer else ""
    return progress_html(1.0, f"{s['title']}: ready in {fmt_seconds(s['elapsed'])}{note}{then}", DONE)


def loaded(state: Optional[dict[str, Any]], folder: Any) -> Optional[dict[str, Any]]:
    """The session's model whose source is `folder` (a folder, or both folders of a base + adapter,
    compared resolved), if there is one."""
    try:
        path = st.source_path(folder)
    except (OSError, MergeError):
        return None
    return next((m for m in (state or {}).get("models", []) if m["path"] == path), None)


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
