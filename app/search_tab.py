"""The Search tab: the form of each registered search (`app.searches`), Start / Stop / Resume,
live plotly plots from the job's events, and the best recipe when the search is done.

Searches outlive the page: their jobs belong to the *browser* (a random key kept in the
browser's localStorage through `gr.BrowserState`), not to the page's Gradio session, so a
reload or a second tab of the same browser finds the running search and keeps plotting it.
Closing the page does not stop a search; **Stop** does (the run keeps its checkpoint and
**Resume** continues it in the same folder, also after the app restarted).

Named API endpoints: /start_search, /poll_search, /stop_search, /resume_search,
/attach_search, /use_search_recipe, /replay_search, /poll_replay.
"""

from __future__ import annotations

import inspect
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from mergecore.errors import MergeError
from mergecore.events import Event

from app import plots
from app import searches as srch
from app.jobs import CANCELLED, DONE, FAILED, Job

KEY_RE = re.compile(r"^[0-9a-f]{32}$")
STATE_FILE = "app_search.json"
MIN_PLOTS = 4


def search_owner(key: Any, request: Optional[gr.Request]) -> str:
    """Who owns a search: the browser (its BrowserState key) or, without one, the page session."""
    if isinstance(key, str) and KEY_RE.match(key):
        return f"browser-{key}"
    from app.ui import owner_of

    return owner_of(request)


def new_key() -> str:
    return uuid.uuid4().hex


def _progress_html(fraction, text, status="running"):
    from app.ui import progress_html

    return progress_html(fraction, text, status)


# ---------------------------------------------------------------------------------------------
# jobs


def start_search(ctx, owner: str, spec: srch.SearchSpec, config: Any, meta: dict[str, Any], out_dir: Path,
                 resume: bool = False) -> Job:
    """Submit the search as a background job of `owner` (kind 'search') writing into `out_dir`."""
    state = {"search": spec.name, "config": spec.dump_config(config), "meta": meta, "created": time.time()}
    (out_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def fn(jc):
        def emit(ev: Event) -> None:
            jc.emit(ev)
            line = spec.log_line(ev)
            if line:
                jc.log(line)

        jc.log(f"{'resuming' if resume else 'starting'} {spec.title} in {out_dir}")
        result = spec.run(config, out_dir, emit, jc.cancel, resume)
        jc.log(f"finished; recipe: {out_dir / spec.recipe_file}")
        return result

    # searches have their own slot: two may run at once without holding up merges and evaluations
    return ctx.jobs.submit(owner, "search", fn, title=f"{spec.name}: {out_dir.name}", slot="search",
                           meta={**meta, "search": spec.name, "out": str(out_dir), "resumed": resume})


def checked_paths(spec: srch.SearchSpec, form: dict[str, Any], roots) -> dict[str, Any]:
    """The form with each typed tasks file confined to `roots` and checked as a tasks file
    (`app.paths.tasks_file`) before the search's own code reads it: a server file outside them is
    refused, and one that is no tasks file is named without showing what it holds."""
    from app.paths import tasks_file

    out = dict(form)
    for f in spec.fields:
        if f.kind == "tasks" and str(out.get(f.key) or "").strip():
            out[f.key] = str(tasks_file(str(out[f.key]), roots))
    return out


def latest_search(ctx, owner: str) -> Optional[Job]:
    jobs = ctx.jobs.jobs(owner, kind="search")
    return jobs[-1] if jobs else None


def finished_search(ctx, owner: str, job_id: Any, missing: str) -> tuple[Job, srch.SearchSpec, Path]:
    """(job, spec, recipe path) of this owner's finished search `job_id`, or MergeError(`missing`)."""
    job = ctx.jobs.find(owner, job_id)
    if job is None or job.status != DONE:
        raise MergeError(missing)
    spec = srch.get_search(job.meta["search"])
    return job, spec, Path(job.meta["out"]) / spec.recipe_file


def resumable(ctx, owner: str) -> tuple[srch.SearchSpec, Any, dict[str, Any], Path]:
    """(spec, config, meta, out dir) of this owner's newest unfinished search, or MergeError."""
    job = latest_search(ctx, owner)
    if job is not None:
        if not job.done:
            raise MergeError("a search is running; stop it first")
        if job.status == DONE:
            raise MergeError("the last search finished; start a new one")
        out = Path(job.meta["out"])
    else:  # e.g. the app restarted: look on disk
        root = ctx.workspace.searches_dir(owner)
        runs = sorted((d for d in root.iterdir() if (d / STATE_FILE).is_file()), key=lambda d: d.stat().st_mtime)
        if not runs:
            raise MergeError("nothing to resume: no stopped search in this browser")
        out = runs[-1]
        if (out / "result.json").is_file():
            raise MergeError("the last search finished; start a new one")
    data = json.loads((out / STATE_FILE).read_text())
    spec = srch.get_search(data["search"])
    return spec, spec.load_config(data["config"]), dict(data.get("meta") or {}), out


# ---------------------------------------------------------------------------------------------
# the tab


def _component(spec: srch.SearchSpec, f: srch.Field, n_models: int = 2):
    elem = f"search-{spec.name}-{f.key}"
    info = f.info or None
    # model fields take any value (the session's models change per page); make_config checks them
    if f.kind == "models":
        return gr.Dropdown(label=f.label, choices=[], value=[], multiselect=True, allow_custom_value=True, info=info,
                           elem_id=elem, interactive=True)
    if f.kind == "base":
        return gr.Dropdown(label=f.label, choices=[], value=None, allow_custom_value=True, info=info, elem_id=elem,
                           interactive=True)
    if f.kind == "tasks" or f.kind == "text":
        return gr.Textbox(label=f.label, value=f.default or "", info=info, elem_id=elem)
    if f.kind in ("operators", "yaml"):
        return gr.Code(label=f.label, value=f.default or "", language="yaml", lines=3, elem_id=elem,
                       interactive=True)
    if f.kind == "bool":
        return gr.Checkbox(label=f.label, value=bool(f.default), info=info, elem_id=elem)
    if f.kind == "choice":
        return gr.Dropdown(label=f.label, choices=f.choices or [], value=f.default, info=info, elem_id=elem)
    return gr.Number(label=f.label, value=f.default, minimum=f.minimum, maximum=f.maximum, info=info,
                     precision=0 if f.kind == "int" else None, elem_id=elem)


def _render_fields(spec: srch.SearchSpec, fields: list[srch.Field], comps: list, session_comps: list,
                   adders: list) -> None:
    session = [f for f in fields if f.kind in ("models", "base")]
    scalars = [f for f in fields if f.kind in ("float", "int", "bool", "choice", "text")]
    wide = [f for f in fields if f.kind in ("operators", "yaml", "tasks")]
    # scalars listed before the first wide field (e.g. the method a YAML field is about) come before it
    first_wide = fields.index(wide[0]) if wide else len(fields)
    lead = [f for f in scalars if fields.index(f) < first_wide]
    scalars = [f for f in scalars if f not in lead]
    if session:
        with gr.Row():
            for f in session:
                c = _component(spec, f)
                c.scale = 3 if f.kind == "models" else 1
                comps.append((spec.name, f.key, c))
                session_comps.append((f, c))
    for i in range(0, len(lead), 4):
        with gr.Row():
            for f in lead[i:i + 4]:
                comps.append((spec.name, f.key, _component(spec, f)))
    for f in wide:
        c = _component(spec, f)
        comps.append((spec.name, f.key, c))
        if f.kind == "tasks":
            session_comps.append((f, c))
        if f.kind == "operators":
            with gr.Row(equal_height=False, elem_classes=["mc-field-row"]):
                dd = gr.Dropdown(label="Add an operator (from the method registry)", choices=srch.operator_methods(2),
                                 value="dare_ties" if "dare_ties" in srch.operator_methods(2) else None, scale=3,
                                 elem_id=f"search-{spec.name}-{f.key}-add")
                btn = gr.Button("Add operator", scale=1)
            adders.append((spec, f, c, dd, btn))
    for i in range(0, len(scalars), 4):
        with gr.Row():
            for f in scalars[i:i + 4]:
                comps.append((spec.name, f.key, _component(spec, f)))


class SearchTab:
    """`build()` inside `gr.Tabs` creates the components; `wire(shared)` connects them once the
    rest of the app exists. `shared` holds the app's demo (the Blocks), session_state,
    form_state, form_version, all_outputs, refresh, models_status, tabs, cmp_models, export_dd
    and browser_key."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.specs = list(srch.SEARCHES.values())

    def build(self) -> None:
        specs = self.specs
        if not specs:
            return
        first = specs[0]
        n_plots = max([MIN_PLOTS] + [len(s.plots) for s in specs])
        comps: list[tuple[str, str, Any]] = []
        session_comps: list[tuple[srch.Field, Any]] = []
        adders: list = []
        groups = {}
        with gr.Tab("Search", id="search"):
            with gr.Row():
                kind_dd = gr.Dropdown(label="Search", choices=[(s.title, s.name) for s in specs], value=first.name,
                                      scale=1, elem_id="search-kind")
                about_md = gr.Markdown(first.summary)
            for spec in specs:
                with gr.Column(visible=spec is first) as col:
                    groups[spec.name] = col
                    basic = [f for f in spec.fields if not f.advanced]
                    adv = [f for f in spec.fields if f.advanced]
                    _render_fields(spec, basic, comps, session_comps, adders)
                    if adv:
                        with gr.Accordion("Advanced settings", open=False):
                            _render_fields(spec, adv, comps, session_comps, adders)
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="search-start")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="search-stop")
                resume_btn = gr.Button("Resume", elem_id="search-resume")
            status_md = gr.Markdown("", elem_id="search-status")
            progress = gr.HTML(_progress_html(0, "no search yet", "idle"), elem_id="search-progress")
            plot_slots = []
            for i in range(0, n_plots, 2):
                with gr.Row():
                    for j in range(i, min(i + 2, n_plots)):
                        title = first.plots[j].title if j < len(first.plots) else ""
                        plot_slots.append(gr.Plot(value=plots.empty_figure(title, "start a search to see it live"),
                                                  label=title or f"plot {j + 1}", show_label=False,
                                                  visible=j < len(first.plots), elem_id=f"search-plot-{j}"))
            result_md = gr.Markdown("", elem_id="search-result")
            recipe_code = gr.Code(label="Best recipe (recipe.yml)", language="yaml", interactive=False, visible=False,
                                  elem_id="search-recipe")
            with gr.Row(visible=False) as result_row:
                use_btn = gr.Button("Use this recipe (Recipe and Merge tabs)", variant="primary", elem_id="search-use")
                replay_btn = gr.Button("Merge it and evaluate the checkpoint", elem_id="search-replay")
            replay_progress = gr.HTML("", elem_id="replay-progress")
            replay_df = gr.Dataframe(label="Replayed checkpoint on the test tasks (with the base for reference)",
                                     interactive=False, visible=False, elem_id="replay-scores")
            with gr.Accordion("Search log", open=False):
                log_tb = gr.Textbox(label="Log", lines=10, max_lines=20, autoscroll=True, show_label=False)
            data_json = gr.JSON(visible=False)
            search_job = gr.State("")
            cursor = gr.State(-1)
            replay_job = gr.State("")
            timer = gr.Timer(1.0, active=False)
            replay_timer = gr.Timer(0.7, active=False)
        for name, value in list(locals().items()):  # the components, for wire()
            if name != "self":
                setattr(self, name, value)

    def wire(self, shared: dict[str, Any]) -> None:
        if not self.specs:
            return
        ctx = self.ctx
        (first, n_plots, comps, session_comps, adders, groups, kind_dd, about_md, start_btn, stop_btn, resume_btn,
         status_md, progress, plot_slots, result_md, recipe_code, result_row, use_btn, replay_btn, replay_progress,
         replay_df, log_tb, data_json, search_job, cursor, replay_job, timer, replay_timer) = (
            self.first, self.n_plots, self.comps, self.session_comps, self.adders, self.groups, self.kind_dd,
            self.about_md, self.start_btn, self.stop_btn, self.resume_btn, self.status_md, self.progress,
            self.plot_slots, self.result_md, self.recipe_code, self.result_row, self.use_btn, self.replay_btn,
            self.replay_progress, self.replay_df, self.log_tb, self.data_json, self.search_job, self.cursor,
            self.replay_job, self.timer, self.replay_timer)
        session_state = shared["session_state"]
        browser_key = shared["browser_key"]
        field_comps = [c for _, _, c in comps]

        def values_for(name: str, values: tuple) -> dict[str, Any]:
            return {key: v for (sname, key, _), v in zip(comps, values) if sname == name}

        # form switching ---------------------------------------------------------------------------
        def on_kind(name):
            spec = srch.get_search(name)
            return (spec.summary, *[gr.Column(visible=n == name) for n in groups])

        kind_dd.input(on_kind, [kind_dd], [about_md, *groups.values()], api_visibility="private")

        # session-aware fields follow the Models tab
        def on_session(state):
            session = srch.SearchSession.from_state(state)
            names = list(session.models)
            others = [n for n in names if n != session.base]
            out = []
            for f, _ in session_comps:
                if f.kind == "models":
                    out.append(gr.Dropdown(choices=names, value=srch.field_default(f, session)))
                elif f.kind == "base":
                    out.append(gr.Dropdown(choices=names, value=session.base))
                else:
                    out.append(gr.Textbox(value=srch.field_default(f, session)))
            out += [gr.Dropdown(choices=srch.operator_methods(max(1, len(others)))) for _ in adders]
            return out

        session_state.change(on_session, [session_state], [c for _, c in session_comps] + [a[3] for a in adders],
                             api_visibility="private")

        for spec, f, code, dd, btn in adders:
            models_comp = next((c for s, k, c in comps if s == spec.name and spec.field(k).kind == "models"), None)

            def add(text, method, chosen=None, _spec=spec):
                if not method:
                    return gr.skip()
                return srch.add_operator(text, method, max(1, len(chosen or []) or 2))

            btn.click(add, [code, dd] + ([models_comp] if models_comp is not None else []), [code],
                      api_visibility="private")

        # start / stop / resume --------------------------------------------------------------------
        poll_outputs = [progress, log_tb, *plot_slots, result_md, recipe_code, result_row, status_md, timer, cursor,
                        data_json]

        def started(job: Job, spec: srch.SearchSpec, msg: str):
            figs = [gr.Plot(value=plots.empty_figure(p.title), visible=True) for p in spec.plots]
            figs += [gr.Plot(visible=False) for _ in range(n_plots - len(spec.plots))]
            return (job.id, -1, gr.Timer(active=True), _progress_html(0, "starting ..."), msg, *figs, "",
                    gr.Code(visible=False), gr.Row(visible=False), gr.DataFrame(visible=False), "")

        start_outputs = [search_job, cursor, timer, progress, status_md, *plot_slots, result_md, recipe_code,
                         result_row, replay_df, replay_progress]

        def failed(msg: str):
            return (gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"**Error:** {msg}",
                    *[gr.skip()] * n_plots, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())

        def on_start(name, key, state, request: gr.Request, *values):
            owner = search_owner(key, request)
            try:
                spec = srch.get_search(name)
                session = srch.SearchSession.from_state(state)
                form = values_for(name, values)
                config = spec.make_config(checked_paths(spec, form, ctx.read_roots()), session)
                meta = {**spec.meta(config, session), "form": _jsonable(form)}
                if any(not j.done for j in ctx.jobs.jobs(owner, kind="search")):
                    raise MergeError("a search is already running in this browser; stop it first")
                out_dir = ctx.workspace.search_dir(owner, spec.name)
                job = start_search(ctx, owner, spec, config, meta, out_dir)
            except MergeError as err:
                return failed(str(err))
            return started(job, spec, f"Started **{spec.title}** in `{out_dir}`.")

        # named parameters for the API (/start_search): name, key, then <search>_<field> for each field;
        # all optional (a field without a starting value, e.g. the base, defaults to None: the session's)
        on_start.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("name", "key", "state")]
            + [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)]
            + [inspect.Parameter(f"{sname}_{key}", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
               for sname, key, _ in comps])
        start_btn.click(on_start, [kind_dd, browser_key, session_state] + field_comps, start_outputs,
                        api_name="start_search")

        def on_stop(job_id, key, request: gr.Request):
            owner = search_owner(key, request)
            job = ctx.jobs.find(owner, job_id) or latest_search(ctx, owner)
            if job is None or job.done:
                return "Nothing to stop."
            ctx.jobs.cancel(owner, job.id)
            name = (job.meta or {}).get("search")
            waits = srch.get_search(name).stops_after if name in srch.search_names() else "the current evaluation"
            return f"Stopping after {waits}; **Resume** continues from the last checkpoint."

        stop_btn.click(on_stop, [search_job, browser_key], [status_md], api_name="stop_search")

        def on_resume(key, request: gr.Request):
            owner = search_owner(key, request)
            try:
                spec, config, meta, out = resumable(ctx, owner)
                job = start_search(ctx, owner, spec, config, meta, out, resume=True)
            except MergeError as err:
                return failed(str(err))
            return started(job, spec, f"Resuming **{spec.title}** in `{out}` from its last checkpoint.")

        resume_btn.click(on_resume, [browser_key], start_outputs, api_name="resume_search")

        # polling ----------------------------------------------------------------------------------
        def poll(job_id, seen, key, request: gr.Request):
            owner = search_owner(key, request)
            job = ctx.jobs.find(owner, job_id)
            if job is None:
                return (*[gr.skip()] * (len(poll_outputs) - 3), gr.Timer(active=False), gr.skip(), gr.skip())
            snap = ctx.jobs.snapshot(owner, job.id)
            spec = srch.get_search(snap["meta"]["search"])
            meta = snap["meta"]
            events = snap["events"]
            frac, text = spec.progress(events, meta)
            redraw = snap["cursor"] != seen or job.done
            if redraw:
                figs = [gr.Plot(value=p.figure(events, meta), visible=True) for p in spec.plots]
                figs += [gr.Plot(visible=False) for _ in range(n_plots - len(spec.plots))]
            else:
                figs = [gr.skip()] * n_plots
            log_text = "\n".join(snap["log"][-300:])
            data = {"id": job.id, "search": spec.name, "status": job.status, "events": snap["cursor"],
                    "episodes": len([e for e in events if e["kind"].endswith(".episode")]), "fraction": frac,
                    "out": meta.get("out"), "error": job.error}
            if not job.done:
                return (_progress_html(frac, f"{text} · {_fmt(job.elapsed)}"), log_text, *figs, gr.skip(), gr.skip(),
                        gr.skip(), gr.skip(), gr.skip(), snap["cursor"], data)
            out = Path(meta["out"])
            if job.status == DONE:
                recipe = out / spec.recipe_file
                summary = spec.summary_md(job.result, meta) + f"\n\nFolder: `{out}`"
                bar = _progress_html(1.0, f"done in {_fmt(job.elapsed)} · {text}", DONE)
                return (bar, log_text, *figs, summary,
                        gr.Code(value=recipe.read_text() if recipe.is_file() else "", visible=True),
                        gr.Row(visible=True), "", gr.Timer(active=False), snap["cursor"], data)
            if job.status == CANCELLED:
                bar = _progress_html(frac, f"stopped · {text}", CANCELLED)
                msg = f"Stopped. **Resume** continues from the last checkpoint in `{out}`."
            else:
                bar = _progress_html(frac, f"failed: {job.error}", FAILED)
                msg = f"**Failed:** {job.error}"
            return (bar, log_text, *figs, "", gr.Code(visible=False), gr.Row(visible=False), msg,
                    gr.Timer(active=False), snap["cursor"], data)

        timer.tick(poll, [search_job, cursor, browser_key], poll_outputs, api_name="poll_search",
                   concurrency_limit=None)

        # the page (re)opens: give the browser a key, and show its latest search
        def attach(key, request: gr.Request):
            if not (isinstance(key, str) and KEY_RE.match(key)):
                key = new_key()
            owner = search_owner(key, request)
            job = latest_search(ctx, owner)
            if job is None:
                return (key, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                        *[gr.Column(visible=n == first.name) for n in groups], *[gr.skip()] * len(field_comps))
            name = job.meta.get("search", first.name)
            form = job.meta.get("form") or {}
            # the form shows the settings the search runs with
            values = [form[k] if s == name and k in form else gr.skip() for s, k, _ in comps]
            return (key, job.id, -1, gr.Timer(active=True), gr.Dropdown(value=name), srch.get_search(name).summary,
                    *[gr.Column(visible=n == name) for n in groups], *values)

        shared["demo"].load(attach, [browser_key], [browser_key, search_job, cursor, timer, kind_dd, about_md,
                                                    *groups.values(), *field_comps], api_name="attach_search")

        # results ----------------------------------------------------------------------------------
        refresh = shared["refresh"]
        all_outputs = shared["all_outputs"]

        def on_use(job_id, key, state, form, version, request: gr.Request):
            from app.ui import _import_yaml

            try:
                job, spec, recipe = finished_search(ctx, search_owner(key, request), job_id,
                                                    "no finished search to take the recipe from")
                text = _absolute_artifacts(recipe)
                state, form, notes = _import_yaml(text, state, ctx.read_roots(), "the search's recipe")
            except (MergeError, OSError) as err:
                return (*refresh(state, form, version, request, status=f"**Error:** {err}"), gr.skip())
            msg = f"Loaded the best {job.meta['search']} recipe." + "".join(f"\n- {n}" for n in notes)
            return (*refresh(state, form, version, request, status=msg), gr.Tabs(selected="recipe"))

        use_btn.click(on_use, [search_job, browser_key, session_state, shared["form_state"], shared["form_version"]],
                      all_outputs + [shared["models_status"], shared["tabs"]], api_name="use_search_recipe")

        def on_replay(job_id, key, state, request: gr.Request):
            from app.ui import owner_of

            try:
                job, spec, recipe = finished_search(ctx, search_owner(key, request), job_id,
                                                    "no finished search to replay")
                session = srch.SearchSession.from_state(state)
                tasks = session.tasks or (job.result or {}).get("config", {}).get("tasks")
                base = session.models.get(session.base) if session.base else None
                me = owner_of(request)
                out_dir = ctx.workspace.merge_dir(me, f"{spec.name}-best")
                rj = ctx.jobs.submit(me, "merge", lambda jc: _replay(jc, recipe, out_dir, tasks, base),
                                     title=out_dir.name, meta={"name": out_dir.name, "out": str(out_dir)})
            except MergeError as err:
                return gr.skip(), gr.Timer(active=False), _progress_html(0, f"error: {err}", FAILED)
            return rj.id, gr.Timer(active=True), _progress_html(0, "merging the best recipe ...")

        replay_btn.click(on_replay, [search_job, browser_key, session_state], [replay_job, replay_timer, replay_progress],
                         api_name="replay_search")

        def poll_replay(job_id, state, request: gr.Request):
            from app import state as st
            from app.ui import _merge_names, owner_of

            me = owner_of(request)
            job = ctx.jobs.find(me, job_id)
            if job is None:
                return gr.skip(), gr.skip(), gr.Timer(active=False), gr.skip(), gr.skip()
            if not job.done:
                frac = (job.progress or {}).get("fraction") if job.meta.get("stage") == "merge" else None
                return (_progress_html(frac, f"{job.meta.get('stage', 'merging')} · {_fmt(job.elapsed)}"), gr.skip(),
                        gr.skip(), gr.skip(), gr.skip())
            merges = _merge_names(ctx, me)
            choices = st.model_names(state) + merges
            if job.status == DONE:
                bar = _progress_html(1.0, f"merged into `{job.result.out_dir}` and evaluated in {_fmt(job.elapsed)}; "
                                          f"it is '{job.meta['name']}' on the Compare and Export tabs", DONE)
                scores = job.meta.get("scores")
                df = gr.DataFrame(value=scores, visible=True) if scores is not None else gr.DataFrame(visible=False)
            else:
                bar, df = _progress_html(0, job.error or job.status, job.status), gr.skip()
            return (bar, df, gr.Timer(active=False), gr.CheckboxGroup(choices=choices, value=choices),
                    gr.Dropdown(choices=merges, value=merges[-1] if merges else None))

        replay_timer.tick(poll_replay, [replay_job, session_state],
                          [replay_progress, replay_df, replay_timer, shared["cmp_models"], shared["export_dd"]],
                          api_name="poll_replay", concurrency_limit=None)



def _absolute_artifacts(recipe: Path) -> str:
    """The recipe's text, its `artifacts:` (e.g. DAM coefficients, next to the recipe) made absolute
    so the recipe still finds them from the Recipe and Merge tabs."""
    import yaml

    from mergecore.yamlio import load_yaml

    text = recipe.read_text()
    try:
        data = load_yaml(text, str(recipe))
    except MergeError:
        return text  # the import reports it, with its line
    arts = data.get("artifacts") if isinstance(data, dict) else None
    if not isinstance(arts, dict):
        return text
    for key, ref in arts.items():
        p = Path(str(ref)).expanduser()
        if not p.is_absolute() and (recipe.parent / p).is_file():
            arts[key] = str((recipe.parent / p).resolve())
    return yaml.safe_dump(data, sort_keys=False)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def _fmt(s: float) -> str:
    from app.ui import fmt_seconds

    return fmt_seconds(s)


def _replay(jc, recipe: Path, out_dir: Path, tasks: Optional[str], base: Optional[str]):
    """Merge a search's recipe (the same plan_merge / execute_plan as the Merge tab), then score
    the checkpoint (and the base, for reference) on the tasks."""
    from app.compare import evaluate_models
    from mergecore.executor import execute_plan
    from mergecore.plan import plan_merge
    from mergecore.io.writer import prepare_output_dir
    from mergecore.recipe import load_recipe

    jc.meta["stage"] = "merge"
    prepare_output_dir(out_dir)
    plan = plan_merge(load_recipe(recipe), search_dirs=(recipe.parent.resolve(),))  # artifacts next to it
    res = execute_plan(plan, out_dir, progress=jc.progress_callback(), cancel=jc.cancel)
    jc.log(res.summary())
    if tasks and Path(tasks).is_file():
        jc.meta["stage"] = "evaluating on the test tasks"
        models = {out_dir.name: str(out_dir)}
        if base:
            models = {"base (no merge)": base, **models}
        jc.meta["scores"] = evaluate_models(models, tasks, cancel=jc.cancel, log=jc.log)
    return res


__all__ = ["SearchTab", "search_owner", "start_search", "resumable", "latest_search"]
