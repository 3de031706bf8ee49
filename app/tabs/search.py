"""The Search tab: the form of each registered search (`app.searches`), Start / Stop / Resume,
live plotly plots from the job's events (and a live table for a search that has one, e.g. the
leaderboard's ranking), and the best recipe when the search is done.

Searches belong to the browser (`app.searches.runs`): a reload or a second tab of the same
browser finds the running search and keeps plotting it. Closing the page does not stop a
search; **Stop** does (the run keeps its checkpoint and **Resume** continues it in the same
folder, also after the app restarted).

Named API endpoints: /start_search, /poll_search, /stop_search, /resume_search,
/attach_search, /use_search_recipe, /replay_search, /poll_replay.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import gradio as gr

from mergecore.errors import MergeError

from app import forms, plots
from app import searches as srch
from app.context import AppContext, Page, owner_of
from app.jobs import CANCELLED, DONE, FAILED, FINISHED, Job
from app.render import error_md, fmt_seconds, notes_md, progress_html
from app.searches import runs

MIN_PLOTS = 4
SESSION_KINDS = ("models", "base")
SCALAR_KINDS = ("float", "int", "bool", "choice", "multichoice", "text")
WIDE_KINDS = ("operators", "yaml", "tasks")


def _component(spec: srch.SearchSpec, f: srch.Field):
    elem = f"search-{spec.name}-{f.key}"
    info = f.info or None
    # model fields take any value (the session's models change per page); make_config checks them
    if f.kind == "models":
        return gr.Dropdown(label=f.label, choices=[], value=[], multiselect=True, allow_custom_value=True, info=info,
                           elem_id=elem, interactive=True)
    if f.kind == "base":
        return gr.Dropdown(label=f.label, choices=[], value=None, allow_custom_value=True, info=info, elem_id=elem,
                           interactive=True)
    if f.kind in ("tasks", "text"):
        return gr.Textbox(label=f.label, value=f.default or "", info=info, elem_id=elem)
    if f.kind in ("operators", "yaml"):
        return gr.Code(label=f.label, value=f.default or "", language="yaml", lines=3, elem_id=elem,
                       interactive=True)
    if f.kind == "bool":
        return gr.Checkbox(label=f.label, value=bool(f.default), info=info, elem_id=elem)
    if f.kind == "choice":
        return gr.Dropdown(label=f.label, choices=f.choices or [], value=f.default, info=info, elem_id=elem)
    if f.kind == "multichoice":
        return gr.Dropdown(label=f.label, choices=f.choices or [], value=list(f.default or []), multiselect=True,
                           info=info, elem_id=elem, interactive=True)
    return gr.Number(label=f.label, value=f.default, minimum=f.minimum, maximum=f.maximum, info=info,
                     precision=0 if f.kind == "int" else None, elem_id=elem)


class SearchTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.specs = list(srch.SEARCHES.values())
        self.comps: list[tuple[str, str, Any]] = []  # (search, field key, component) of every form
        self.session_comps: list[tuple[srch.Field, Any]] = []  # the fields that follow the session
        self.adders: list[tuple[srch.SearchSpec, Any, Any, Any]] = []  # (spec, operators code, dropdown, button)
        self.groups: dict[str, Any] = {}  # search -> its form's column

    def _fields(self, spec: srch.SearchSpec, fields: list[srch.Field]) -> None:
        """One search's fields: the session's, the scalars before the first wide field, the wide
        fields, then the other scalars in rows of four."""
        wide = [f for f in fields if f.kind in WIDE_KINDS]
        first_wide = fields.index(wide[0]) if wide else len(fields)
        scalars = [f for f in fields if f.kind in SCALAR_KINDS]
        lead = [f for f in scalars if fields.index(f) < first_wide]
        session = [f for f in fields if f.kind in SESSION_KINDS]
        if session:
            with gr.Row():
                for f in session:
                    c = _component(spec, f)
                    c.scale = 3 if f.kind == "models" else 1
                    self._add(spec, f, c)
        self._rows(spec, lead)
        for f in wide:
            c = self._add(spec, f, _component(spec, f))
            if f.kind == "operators":
                with gr.Row(equal_height=False, elem_classes=["mc-field-row"]):
                    choices = srch.operator_methods(2)
                    dd = gr.Dropdown(label="Add an operator (from the method registry)", choices=choices,
                                     value=choices[0] if choices else None, scale=3,
                                     elem_id=f"search-{spec.name}-{f.key}-add")
                    btn = gr.Button("Add operator", scale=1)
                self.adders.append((spec, c, dd, btn))
        self._rows(spec, [f for f in scalars if f not in lead])

    def _rows(self, spec: srch.SearchSpec, fields: list[srch.Field]) -> None:
        for i in range(0, len(fields), 4):
            with gr.Row():
                for f in fields[i:i + 4]:
                    self._add(spec, f, _component(spec, f))

    def _add(self, spec: srch.SearchSpec, f: srch.Field, c: Any) -> Any:
        self.comps.append((spec.name, f.key, c))
        if f.kind in ("models", "base", "tasks"):
            self.session_comps.append((f, c))
        return c

    def build(self, page: Page) -> None:
        if not self.specs:
            return
        first = self.specs[0]
        self.n_plots = n_plots = max([MIN_PLOTS] + [len(s.plots) for s in self.specs])
        with gr.Tab("Search", id="search"):
            with gr.Row():
                self.kind_dd = gr.Dropdown(label="Search", choices=[(s.title, s.name) for s in self.specs],
                                           value=first.name, scale=1, elem_id="search-kind")
                self.about_md = gr.Markdown(first.summary)
            for spec in self.specs:
                with gr.Column(visible=spec is first) as col:
                    self.groups[spec.name] = col
                    self._fields(spec, [f for f in spec.fields if not f.advanced])
                    if any(f.advanced for f in spec.fields):
                        with gr.Accordion("Advanced settings", open=False):
                            self._fields(spec, [f for f in spec.fields if f.advanced])
            with gr.Row():
                self.start_btn = gr.Button("Start", variant="primary", elem_id="search-start")
                self.stop_btn = gr.Button("Stop", variant="stop", elem_id="search-stop")
                self.resume_btn = gr.Button("Resume", elem_id="search-resume")
            self.status_md = gr.Markdown("", elem_id="search-status")
            self.progress = gr.HTML(progress_html(0, "no search yet", "idle"), elem_id="search-progress")
            self.table = gr.Dataframe(label=first.table.title if first.table else "", interactive=False,
                                      visible=first.table is not None, elem_id="search-table")
            self.plots = []
            for i in range(0, n_plots, 2):
                with gr.Row():
                    for j in range(i, min(i + 2, n_plots)):
                        title = first.plots[j].title if j < len(first.plots) else ""
                        self.plots.append(gr.Plot(value=plots.empty_figure(title, "start a search to see it live"),
                                                  label=title or f"plot {j + 1}", show_label=False,
                                                  visible=j < len(first.plots), elem_id=f"search-plot-{j}"))
            self.result_md = gr.Markdown("", elem_id="search-result")
            self.recipe_code = gr.Code(label="Best recipe (recipe.yml)", language="yaml", interactive=False,
                                       visible=False, elem_id="search-recipe")
            with gr.Row(visible=False) as self.result_row:
                self.use_btn = gr.Button("Use this recipe (Recipe and Merge tabs)", variant="primary",
                                         elem_id="search-use")
                self.replay_btn = gr.Button("Merge it and evaluate the checkpoint", elem_id="search-replay")
            self.replay_progress = gr.HTML("", elem_id="replay-progress")
            self.replay_df = gr.Dataframe(label="Replayed checkpoint on the test tasks (with the base for reference)",
                                          interactive=False, visible=False, elem_id="replay-scores")
            with gr.Accordion("Search log", open=False):
                self.log_tb = gr.Textbox(label="Log", lines=10, max_lines=20, autoscroll=True, show_label=False)
            self.data_json = gr.JSON(visible=False)
            self.job = gr.State("")
            self.cursor = gr.State(-1)
            self.replay_job = gr.State("")
            self.timer = gr.Timer(1.0, active=False)
            self.replay_timer = gr.Timer(0.7, active=False)

    def figures(self, spec: srch.SearchSpec, figure) -> list[Any]:
        """A plot update per slot: `figure(plot spec)` in the search's slots, the others hidden."""
        return ([gr.Plot(value=figure(p), visible=True) for p in spec.plots]
                + [gr.Plot(visible=False) for _ in range(self.n_plots - len(spec.plots))])

    def table_update(self, spec: srch.SearchSpec, events=None, meta=None) -> Any:
        """The table of a search that has one (empty before its first events), hidden for the others."""
        if spec.table is None:
            return gr.Dataframe(visible=False)
        headers, rows = spec.table.rows(events or [], meta or {})
        return gr.Dataframe(value={"headers": headers, "data": rows}, label=spec.table.title, visible=True)

    def wire(self, page: Page) -> None:
        if not self.specs:
            return
        self.wire_form(page)
        self.wire_runs(page)
        self.wire_results(page)

    # -- the forms --------------------------------------------------------------------------------

    def wire_form(self, page: Page) -> None:
        def on_kind(name):
            return (srch.get_search(name).summary, *[gr.Column(visible=n == name) for n in self.groups])

        self.kind_dd.input(on_kind, [self.kind_dd], [self.about_md, *self.groups.values()], api_visibility="private")

        def on_session(state):  # session-aware fields follow the Models tab
            session = srch.SearchSession.from_state(state)
            names = list(session.models)
            out = []
            for f, _ in self.session_comps:
                if f.kind == "models":
                    out.append(gr.Dropdown(choices=names, value=srch.field_default(f, session)))
                elif f.kind == "base":
                    out.append(gr.Dropdown(choices=names, value=session.base))
                else:
                    out.append(gr.Textbox(value=srch.field_default(f, session)))
            n = max(1, len([n for n in names if n != session.base]))
            return out + [gr.Dropdown(choices=srch.operator_methods(n)) for _ in self.adders]

        page.session_state.change(on_session, [page.session_state],
                                  [c for _, c in self.session_comps] + [a[2] for a in self.adders],
                                  api_visibility="private")

        for spec, code, dd, btn in self.adders:
            models_comp = next((c for s, k, c in self.comps if s == spec.name and spec.field(k).kind == "models"), None)

            def add(text, method, chosen=None):
                if not method:
                    return gr.skip()
                return srch.add_operator(text, method, max(1, len(chosen or []) or 2))

            btn.click(add, [code, dd] + ([models_comp] if models_comp is not None else []), [code],
                      api_visibility="private")

    # -- start / stop / resume / poll -------------------------------------------------------------

    def wire_runs(self, page: Page) -> None:
        ctx, n_plots = self.ctx, self.n_plots
        field_comps = [c for _, _, c in self.comps]
        start_outputs = [self.job, self.cursor, self.timer, self.progress, self.status_md, *self.plots, self.table,
                         self.result_md, self.recipe_code, self.result_row, self.replay_df, self.replay_progress]

        def started(job: Job, spec: srch.SearchSpec, msg: str):
            return (job.id, -1, gr.Timer(active=True), progress_html(0, "starting ..."), msg,
                    *self.figures(spec, lambda p: plots.empty_figure(p.title)), self.table_update(spec), "",
                    gr.Code(visible=False), gr.Row(visible=False), gr.DataFrame(visible=False), "")

        def failed(msg: str):
            return (*[gr.skip()] * 4, error_md(msg), *[gr.skip()] * (len(start_outputs) - 5))

        def on_start(name, key, state, request: gr.Request, *values):
            owner = runs.search_owner(key, request)
            try:
                spec = srch.get_search(name)
                session = srch.SearchSession.from_state(state)
                form = {k: v for (sname, k, _), v in zip(self.comps, values) if sname == name}
                config = spec.make_config(runs.checked_paths(spec, form, ctx.read_roots()), session)
                meta = {**spec.meta(config, session), "form": runs.jsonable(form)}
                if any(not j.done for j in ctx.jobs.jobs(owner, kind="search")):
                    raise MergeError("a search is already running in this browser; stop it first")
                out_dir = ctx.workspace.search_dir(owner, spec.name)
                job = runs.start_search(ctx, owner, spec, config, meta, out_dir)
            except MergeError as err:
                return failed(str(err))
            return started(job, spec, f"Started **{spec.title}** in `{out_dir}`.")

        # named parameters for the API (/start_search): name, key, then <search>_<field> for each field;
        # all optional (a field without a starting value, e.g. the base, defaults to None: the session's)
        on_start.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("name", "key", "state")]
            + [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)]
            + [inspect.Parameter(f"{sname}_{key}", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
               for sname, key, _ in self.comps])
        self.start_btn.click(on_start, [self.kind_dd, page.browser_key, page.session_state] + field_comps,
                             start_outputs, api_name="start_search")

        def on_stop(job_id, key, request: gr.Request):
            owner = runs.search_owner(key, request)
            job = ctx.jobs.find(owner, job_id) or runs.latest_search(ctx, owner)
            if job is None or job.done:
                return "Nothing to stop."
            ctx.jobs.cancel(owner, job.id)
            name = (job.meta or {}).get("search")
            waits = srch.get_search(name).stops_after if name in srch.search_names() else "the current evaluation"
            return f"Stopping after {waits}; **Resume** continues from the last checkpoint."

        self.stop_btn.click(on_stop, [self.job, page.browser_key], [self.status_md], api_name="stop_search")

        def on_resume(key, request: gr.Request):
            owner = runs.search_owner(key, request)
            try:
                spec, config, meta, out = runs.resumable(ctx, owner)
                job = runs.start_search(ctx, owner, spec, config, meta, out, resume=True)
            except MergeError as err:
                return failed(str(err))
            return started(job, spec, f"Resuming **{spec.title}** in `{out}` from its last checkpoint.")

        self.resume_btn.click(on_resume, [page.browser_key], start_outputs, api_name="resume_search")

        poll_outputs = [self.progress, self.log_tb, *self.plots, self.table, self.result_md, self.recipe_code,
                        self.result_row, self.status_md, self.start_btn, self.stop_btn, self.resume_btn, self.timer,
                        self.cursor, self.data_json]

        def buttons(running: bool) -> tuple[Any, Any, Any]:
            """Start and Resume while nothing runs, Stop while the search runs."""
            return (gr.Button(interactive=not running), gr.Button(interactive=running),
                    gr.Button(interactive=not running))

        def poll(job_id, seen, key, request: gr.Request):
            owner = runs.search_owner(key, request)
            job = ctx.jobs.find(owner, job_id)
            if job is None:
                return (*[gr.skip()] * (len(poll_outputs) - 3), gr.Timer(active=False), gr.skip(), gr.skip())
            # the status before the events: a job seen finished has all its events in the snapshot
            # (its last one, e.g. rmm.done, names the result the plots show); one that finishes
            # meanwhile is shown finished on the next poll
            status = job.status
            done = status in FINISHED
            snap = ctx.jobs.snapshot(owner, job.id)
            meta, events = snap["meta"], snap["events"]
            spec = srch.get_search(meta["search"])
            frac, text = spec.progress(events, meta)
            redraw = snap["cursor"] != seen or done
            figs = self.figures(spec, lambda p: p.figure(events, meta)) if redraw else [gr.skip()] * n_plots
            figs.append(self.table_update(spec, events, meta) if redraw else gr.skip())
            log_text = "\n".join(snap["log"][-300:])
            data = {"id": job.id, "search": spec.name, "status": status, "events": snap["cursor"],
                    "episodes": len([e for e in events if e["kind"].endswith(".episode")]), "fraction": frac,
                    "out": meta.get("out"), "error": job.error}
            if not done:
                return (progress_html(frac, f"{text} · {fmt_seconds(job.elapsed)}"), log_text, *figs,
                        *[gr.skip()] * 4, *buttons(True), gr.skip(), snap["cursor"], data)
            out = Path(meta["out"])
            if status == DONE:
                recipe = out / runs.RECIPE_FILE
                summary = spec.summary_md(job.result, meta) + f"\n\nFolder: `{out}`"
                bar = progress_html(1.0, f"done in {fmt_seconds(job.elapsed)} · {text}", DONE)
                return (bar, log_text, *figs, summary,
                        gr.Code(value=recipe.read_text() if recipe.is_file() else "", visible=True),
                        gr.Row(visible=True), "", *buttons(False), gr.Timer(active=False), snap["cursor"], data)
            if status == CANCELLED:
                bar = progress_html(frac, f"stopped · {text}", CANCELLED)
                msg = f"Stopped. **Resume** continues from the last checkpoint in `{out}`."
            else:
                bar = progress_html(frac, f"failed: {job.error}", FAILED)
                msg = f"**Failed:** {job.error}"
            return (bar, log_text, *figs, "", gr.Code(visible=False), gr.Row(visible=False), msg, *buttons(False),
                    gr.Timer(active=False), snap["cursor"], data)

        self.timer.tick(poll, [self.job, self.cursor, page.browser_key], poll_outputs, api_name="poll_search",
                        concurrency_limit=None)

        def attach(key, request: gr.Request):  # the page (re)opens: a key for the browser, its latest search
            if not (isinstance(key, str) and runs.KEY_RE.match(key)):
                key = runs.new_key()
            job = runs.latest_search(ctx, runs.search_owner(key, request))
            if job is None:
                return (key, *[gr.skip()] * 5, *[gr.Column(visible=n == self.specs[0].name) for n in self.groups],
                        *[gr.skip()] * len(field_comps))
            name = job.meta.get("search", self.specs[0].name)
            form = job.meta.get("form") or {}  # the form shows the settings the search runs with
            values = [form[k] if s == name and k in form else gr.skip() for s, k, _ in self.comps]
            return (key, job.id, -1, gr.Timer(active=True), gr.Dropdown(value=name), srch.get_search(name).summary,
                    *[gr.Column(visible=n == name) for n in self.groups], *values)

        page.on_load(attach, [page.browser_key], [page.browser_key, self.job, self.cursor, self.timer,
                                                  self.kind_dd, self.about_md, *self.groups.values(),
                                                  *field_comps], api_name="attach_search")

    # -- the result: to the Recipe tab, or merged and scored --------------------------------------

    def wire_results(self, page: Page) -> None:
        ctx, refresh = self.ctx, page.refresh

        def on_use(job_id, key, state, form, version, request: gr.Request):
            try:
                job, spec, recipe = runs.finished_search(ctx, runs.search_owner(key, request), job_id,
                                                         "no finished search to take the recipe from")
                state, form, notes = forms.import_recipe(recipe.read_text(), state, ctx.read_roots(),
                                                         "the search's recipe", search_dirs=[recipe.parent],
                                                         form=form)  # a mixture's form stays (off)
            except (MergeError, OSError) as err:
                return (*refresh(state, form, version, request, status=error_md(err)), gr.skip())
            msg = notes_md(f"Loaded the best {job.meta['search']} recipe.", notes)
            return (*refresh(state, form, version, request, status=msg), gr.Tabs(selected="recipe"))

        self.use_btn.click(on_use, [self.job, page.browser_key, page.session_state, page.form_state,
                                    page.form_version], page.status_outputs + [page.comps["tabs"]],
                           api_name="use_search_recipe")

        def on_replay(job_id, key, state, request: gr.Request):
            try:
                job, spec, recipe = runs.finished_search(ctx, runs.search_owner(key, request), job_id,
                                                         "no finished search to replay")
                session = srch.SearchSession.from_state(state)
                tasks = session.tasks or (job.result or {}).get("config", {}).get("tasks")
                base = session.models.get(session.base) if session.base else None
                me = owner_of(request)
                out_dir = ctx.workspace.merge_dir(me, f"{spec.name}-best")
                rj = ctx.jobs.submit(me, "merge", lambda jc: runs.replay(jc, recipe, out_dir, tasks, base),
                                     title=out_dir.name, meta={"name": out_dir.name, "out": str(out_dir)})
            except MergeError as err:
                return gr.skip(), gr.Timer(active=False), progress_html(0, f"error: {err}", FAILED)
            return rj.id, gr.Timer(active=True), progress_html(0, "merging the best recipe ...")

        self.replay_btn.click(on_replay, [self.job, page.browser_key, page.session_state],
                              [self.replay_job, self.replay_timer, self.replay_progress], api_name="replay_search")

        def poll_replay(job_id, state, request: gr.Request):
            me = owner_of(request)
            job = ctx.jobs.find(me, job_id)
            if job is None:
                return gr.skip(), gr.skip(), gr.Timer(active=False), *[gr.skip()] * len(page.merges_outputs)
            if not job.done:
                frac = (job.progress or {}).get("fraction") if job.meta.get("stage") == "merge" else None
                return (progress_html(frac, f"{job.meta.get('stage', 'merging')} · {fmt_seconds(job.elapsed)}"),
                        gr.skip(), gr.skip(), *[gr.skip()] * len(page.merges_outputs))
            if job.status == DONE:
                bar = progress_html(1.0, f"merged into `{job.result.out_dir}` and evaluated in "
                                         f"{fmt_seconds(job.elapsed)}; it is '{job.meta['name']}' on the Compare "
                                         f"and Export tabs", DONE)
                scores = job.meta.get("scores")
                df = gr.DataFrame(value=scores, visible=True) if scores is not None else gr.DataFrame(visible=False)
            else:
                bar, df = progress_html(0, job.error or job.status, job.status), gr.skip()
            return (bar, df, gr.Timer(active=False), *page.merges_views(state, me))

        self.replay_timer.tick(poll_replay, [self.replay_job, page.session_state],
                               [self.replay_progress, self.replay_df, self.replay_timer, *page.merges_outputs],
                               api_name="poll_replay", concurrency_limit=None)
