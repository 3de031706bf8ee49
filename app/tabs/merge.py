"""The Merge tab: the form's recipe merged in the background (`mergecore.merge`, as the CLI
does), with progress, a log and a plot of the bytes written; the browser's merge history
(re-open a merge's recipe, merge it again, delete it) and its saved recipes.

Merges belong to the browser (`app.context.browser_owner`): a reload or a second tab finds the
running merge and follows it; one started while another runs waits in the browser's queue
(shown with its place) and starts when the one before it ends. Every merge is recorded in the
history (`app.history`) when it is submitted and when it ends, also with no page open.

With the Recipe tab on the mixture of experts, Merge builds it instead (`app.moe_job`: the
engine's `build_moe`, the call `mergecore moe` makes) in the same queue, and it is recorded,
re-opened, built again and deleted like a merge (its config in the place of the recipe).

Named API endpoints: /merge, /poll_merge, /cancel_merge, /attach_merge, /history_reopen,
/history_merge_again, /history_delete, /save_recipe, /load_recipe, /delete_recipe.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import gradio as gr

from mergecore.errors import MergeError

from app import forms, history, moe_form, moe_job, plots
from app import state as st
from app.context import AppContext, Page, browser_owner
from app.jobs import CANCELLED, DONE, FAILED, RUNNING, Job
from app.render import error_md, fmt_seconds, notes_md, progress_html

IDLE = progress_html(0, "idle", "idle")


# room for each header of app.history.HISTORY_COLUMNS on one line; the folder takes the rest and wraps
HISTORY_WIDTHS = ["130px", "90px", "170px", "130px", "90px", "80px", "70px", "110px", "330px"]

class MergeTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def build(self, page: Page) -> None:
        cpus = os.cpu_count() or 1
        with gr.Tab("Merge", id="merge"):
            with gr.Row():
                self.out_name = gr.Textbox(label="Output name", value="merge", scale=2)
                self.out_dtype = gr.Dropdown(label="Output dtype", choices=["as in recipe", "float32", "float16",
                                                                            "bfloat16"], value="as in recipe", scale=1)
                self.threads = gr.Slider(label="Threads", minimum=1, maximum=max(1, cpus), step=1, value=min(4, cpus),
                                         scale=1)
            with gr.Row():
                self.merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-btn")
                self.cancel_btn = gr.Button("Cancel", variant="stop", interactive=False, elem_id="merge-cancel")
            self.queue_md = gr.Markdown("", elem_id="merge-queue")
            self.progress = gr.HTML(IDLE, elem_id="merge-progress")
            self.summary = gr.Markdown("", elem_id="merge-summary")
            with gr.Row():
                self.log = gr.Textbox(label="Log", lines=12, max_lines=20, autoscroll=True, scale=3)
                self.plot = gr.LinePlot(value=plots.merge_frame([]), x="x", y="value", x_title="seconds",
                                        y_title="MB written", label="Written so far (MB against seconds)",
                                        height=320, scale=2)
            gr.Markdown("### History\nEvery merge of this browser (kept on disk): its recipe, when, size and "
                        "scores once evaluated (Compare tab).")
            page.comps["merge_history"] = self.history_df = gr.Dataframe(
                headers=history.HISTORY_COLUMNS, value=[], interactive=False, wrap=True, elem_id="merge-history",
                column_widths=HISTORY_WIDTHS)
            with gr.Row(equal_height=True):
                self.history_dd = gr.Dropdown(label="Merge", choices=[], value=None, scale=3, elem_id="history-pick")
                self.reopen_btn = gr.Button("Re-open its recipe", scale=1, elem_id="history-reopen")
                self.again_btn = gr.Button("Merge again", scale=1, elem_id="history-again")
                self.delete_btn = gr.Button("Delete", variant="stop", scale=1, elem_id="history-delete")
            self.history_md = gr.Markdown("", elem_id="history-status")
            with gr.Accordion("Saved recipes", open=False):
                with gr.Row(equal_height=True):
                    self.recipe_name = gr.Textbox(label="Save the current recipe as", scale=3,
                                                  elem_id="recipe-save-name")
                    self.save_btn = gr.Button("Save recipe", scale=1, elem_id="recipe-save")
                with gr.Row(equal_height=True):
                    self.saved_dd = gr.Dropdown(label="Saved recipes", choices=[], value=None, scale=3,
                                                elem_id="recipe-saved")
                    self.load_btn = gr.Button("Load into the Recipe tab", scale=1, elem_id="recipe-load")
                    self.forget_btn = gr.Button("Delete", scale=1, elem_id="recipe-delete")
                self.saved_md = gr.Markdown("", elem_id="recipe-saved-status")
            self.timer = gr.Timer(0.5, active=False)
            self.job = gr.State("")
            self.shown = gr.State("")  # what the history and the merges views show (their signature)

    # -- views --------------------------------------------------------------------------------------

    def history_views(self, owner: str) -> tuple[Any, Any, str]:
        """(history table, its dropdown, its signature) of an owner."""
        ctx = self.ctx
        recs = history.records(ctx.sessions, ctx.jobs, owner)
        shown = history.signature(recs) + "#" + ",".join(ctx.merges(owner))
        return history.table(recs), gr.Dropdown(choices=history.choices(recs), value=None), shown

    def saved_view(self, owner: str, value: Optional[str] = None):
        names = list(self.ctx.sessions.recipes(owner))
        return gr.Dropdown(choices=names, value=value if value in names else None)

    def queue_text(self, owner: str, current: Optional[Job]) -> str:
        waiting = [j for j in self.ctx.jobs.jobs(owner, kind="merge") if not j.done and j is not current
                   and j.status != RUNNING]
        if not waiting:
            return ""
        lines = [f"{i}. `{j.meta.get('name', j.title)}` — {self.ctx.jobs.position(j)} ahead"
                 for i, j in enumerate(waiting, 1)]
        return "**Queued** (they start one after the other):\n" + "\n".join(lines)

    # -- events -------------------------------------------------------------------------------------

    def wire(self, page: Page) -> None:
        self.wire_merge(page)
        self.wire_history(page)
        self.wire_library(page)

    def wire_merge(self, page: Page) -> None:
        ctx = self.ctx
        started_outputs = [self.job, self.timer, self.progress, self.summary, self.log, self.queue_md, self.cancel_btn]

        def started(owner: str, job: Job, out_dir: Path):
            ahead = ctx.jobs.position(job)
            msg = (f"{doing(job)} into `{out_dir}` ..." if not ahead else
                   f"Queued `{out_dir.name}` behind {ahead} merge{'s' if ahead > 1 else ''}; it starts when "
                   f"{'they end' if ahead > 1 else 'that one ends'}.")
            bar = progress_html(0, "starting ...") if not ahead else gr.skip()
            return (job.id if not ahead else gr.skip(), gr.Timer(active=True), bar, msg, "" if not ahead else gr.skip(),
                    self.queue_text(owner, None if ahead else job), gr.Button(interactive=True))

        def refused(owner: str, err: Any):
            busy = any(not j.done for j in ctx.jobs.jobs(owner, kind="merge"))
            bar = gr.skip() if busy else progress_html(0, f"error: {err}", FAILED)
            return (gr.skip(), gr.skip(), bar, f"**Failed:** {err}", gr.skip(), gr.skip(), gr.skip())

        def on_merge(state, form, name, dtype, nthreads, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            try:
                if moe_form.is_on(form):  # the Recipe tab's mixture of experts: built by the engine's build_moe
                    config = moe_job.with_dtype(moe_form.build_config(form, state), dtype)
                    job, out_dir = submit_moe(ctx, owner, config, name or "moe")
                    return started(owner, job, out_dir)
                recipe = forms.build_recipe(form, state)
                dirs = tuple(Path(d) for d in form.get("search_dirs") or ())
                job, out_dir = submit_merge(ctx, owner, recipe, name or "merge", dtype, nthreads, dirs)
            except MergeError as err:
                return refused(owner, err)
            return started(owner, job, out_dir)

        self.merge_btn.click(on_merge, [page.session_state, page.form_state, self.out_name, self.out_dtype,
                                        self.threads, page.browser_key], started_outputs, api_name="merge")

        poll_outputs = [self.progress, self.log, self.summary, self.timer, *page.merges_outputs, self.plot,
                        self.queue_md, self.cancel_btn, self.history_df, self.history_dd, self.job, self.shown]
        n_merges = len(page.merges_outputs)

        def on_poll(job_id, shown, state, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            job = ctx.jobs.find(owner, job_id)
            merges = ctx.jobs.jobs(owner, kind="merge")
            live = [j for j in merges if not j.done]
            if job is None or (job.done and live):  # follow the merge that runs now (or is next)
                job = next((j for j in live if j.status == RUNNING), live[0] if live else None)
            elif job.done and merges and merges[-1].seq > job.seq:  # the ones after it ended too: the last
                job = merges[-1]
            table, dd, now_shown = self.history_views(owner)
            changed = now_shown != shown
            views = page.merges_views(state, owner) if changed else [gr.skip()] * n_merges
            hist = (table, dd, now_shown) if changed else (gr.skip(), gr.skip(), gr.skip())
            queue = self.queue_text(owner, job)
            cancel = gr.Button(interactive=bool(live))
            if job is None:
                return (gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False), *views, gr.skip(), queue, cancel,
                        *hist[:2], gr.skip(), hist[2])
            snap = ctx.jobs.snapshot(owner, job.id)
            frac, text = merge_progress_text(snap["progress"], snap["status"], snap["elapsed"])
            log_text = "\n".join(snap["log"][-400:])
            frame = plots.merge_frame(snap["events"])
            if not job.done:
                doing_now = f"{doing(job)} into `{job.meta.get('out')}` ..."
                return (progress_html(frac, text), log_text, doing_now, gr.skip(),
                        *views, frame, queue, cancel, *hist[:2], job.id, hist[2])
            summary, bar = finished_text(job, frac, text)
            timer = gr.Timer(active=bool(live))
            return (bar, log_text, summary, timer, *views, frame, queue, cancel, *hist[:2], job.id, hist[2])

        self.timer.tick(on_poll, [self.job, self.shown, page.session_state, page.browser_key], poll_outputs,
                        api_name="poll_merge", concurrency_limit=None)

        def on_cancel(job_id, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            job = ctx.jobs.find(owner, job_id)
            if job is None or job.done:
                job = next((j for j in ctx.jobs.jobs(owner, kind="merge") if j.status == RUNNING), None)
            if job is None or job.done:
                return "Nothing to cancel."
            ctx.jobs.cancel(owner, job.id)
            return f"Cancelling `{job.meta.get('name', job.title)}` ..."

        self.cancel_btn.click(on_cancel, [self.job, page.browser_key], [self.summary], api_name="cancel_merge")

        def attach(key, request: gr.Request):
            """The page (re)opens: the history, the saved recipes, and the merge that runs now."""
            owner = browser_owner(key, request)
            table, dd, shown = self.history_views(owner)
            live = [j for j in ctx.jobs.jobs(owner, kind="merge") if not j.done]
            job = next((j for j in live if j.status == RUNNING), live[0] if live else None)
            saved = self.saved_view(owner)
            if job is None:
                return ("", gr.skip(), gr.skip(), gr.skip(), "", gr.Button(interactive=False), table, dd, saved,
                        shown)
            return (job.id, gr.Timer(active=True), progress_html(0, "following the running merge ..."),
                    f"{doing(job)} into `{job.meta.get('out')}` ...", self.queue_text(owner, job),
                    gr.Button(interactive=True), table, dd, saved, "")

        page.on_load(attach, [page.browser_key], [self.job, self.timer, self.progress, self.summary, self.queue_md,
                                                  self.cancel_btn, self.history_df, self.history_dd, self.saved_dd,
                                                  self.shown], api_name="attach_merge")

    def load_recipe(self, page: Page, text: Optional[str], where: str, search_dirs: Sequence[str], state, form,
                    version, request):
        """The page's refresh, the Recipe tab selected and a message, with `text` loaded (or the
        refresh and the error)."""
        refresh = page.refresh
        try:
            if not text:
                raise MergeError(f"{where} has no recipe to load")
            state, form, notes = forms.import_recipe(text, state, self.ctx.read_roots(), where, search_dirs, form=form)
        except MergeError as err:
            return (*refresh(state, form, version, request, status=error_md(err)), gr.skip(), error_md(err))
        msg = notes_md(f"Loaded {where} into the Recipe tab.", notes)
        return (*refresh(state, form, version, request, status=msg), gr.Tabs(selected="recipe"), msg)

    def again_started(self, owner: str, job: Job, out_dir: Path, rec: dict[str, Any]) -> tuple:
        """The outputs of "Merge again" once its job is queued."""
        ahead = self.ctx.jobs.position(job)
        what = "config" if job.meta.get("moe") else "recipe"
        msg = (f"{doing(job).split()[0]} `{rec['name']}`'s {what} again into `{out_dir.name}`"
               + (f" ({ahead} ahead)." if ahead else "."))
        first = job.id if not ahead else gr.skip()
        bar = progress_html(0, "starting ...") if not ahead else gr.skip()
        return (first, gr.Timer(active=True), bar, msg, gr.skip(), self.queue_text(owner, None if ahead else job),
                gr.Button(interactive=True), msg)

    def wire_history(self, page: Page) -> None:
        ctx = self.ctx
        session = [page.session_state, page.form_state, page.form_version]

        def on_reopen(rec_id, state, form, version, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            try:
                rec = history.find(ctx.sessions, ctx.jobs, owner, rec_id)
            except MergeError as err:  # the refresh's outputs, the status line and the tabs stay
                return (*page.skip_refresh(), gr.skip(), gr.skip(), error_md(err))
            return self.load_recipe(page, rec.get("recipe"), f"the recipe of `{rec['name']}`",
                                    rec.get("search_dirs") or (), state, form, version, request)

        self.reopen_btn.click(on_reopen, [self.history_dd, *session, page.browser_key],
                              page.status_outputs + [page.comps["tabs"], self.history_md], api_name="history_reopen")

        def on_again(rec_id, dtype, nthreads, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            try:
                rec = history.find(ctx.sessions, ctx.jobs, owner, rec_id)
                if rec.get("method") == moe_form.MOE:  # a mixture: built again from its config
                    config = moe_job.checked_config(rec.get("recipe"), ctx.read_roots(), rec["name"], dtype)
                    job, out_dir = submit_moe(ctx, owner, config, rec["name"])
                    return self.again_started(owner, job, out_dir, rec)
                recipe = checked_recipe(ctx, rec.get("recipe"), rec.get("search_dirs") or (), rec["name"])
                dirs = tuple(Path(d) for d in rec.get("search_dirs") or ())
                job, out_dir = submit_merge(ctx, owner, recipe, rec["name"], dtype, nthreads, dirs)
            except MergeError as err:
                return (gr.skip(),) * 7 + (error_md(err),)
            return self.again_started(owner, job, out_dir, rec)

        self.again_btn.click(on_again, [self.history_dd, self.out_dtype, self.threads, page.browser_key],
                             [self.job, self.timer, self.progress, self.summary, self.log, self.queue_md,
                              self.cancel_btn, self.history_md], api_name="history_merge_again")

        def on_delete(rec_id, state, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            try:
                msg = history.delete(ctx.sessions, ctx.workspace, ctx.jobs, owner, rec_id)
            except MergeError as err:
                return (error_md(err), *[gr.skip()] * (3 + len(page.merges_outputs)))
            table, dd, shown = self.history_views(owner)
            return (msg, table, dd, shown, *page.merges_views(state, owner))

        self.delete_btn.click(on_delete, [self.history_dd, page.session_state, page.browser_key],
                              [self.history_md, self.history_df, self.history_dd, self.shown, *page.merges_outputs],
                              api_name="history_delete")

    def wire_library(self, page: Page) -> None:
        ctx = self.ctx
        session = [page.session_state, page.form_state, page.form_version]

        def on_save(name, state, form, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            try:
                if moe_form.is_on(form):  # the mixture's config, saved and loaded back like a recipe
                    stored = ctx.sessions.save_recipe(owner, name, moe_form.config_yaml(form, state), moe_form.MOE)
                    return f"Saved the config as **{stored}**.", self.saved_view(owner, stored)
                recipe = forms.build_recipe(form, state)
                stored = ctx.sessions.save_recipe(owner, name, recipe.to_yaml(), recipe.merge_method)
            except MergeError as err:
                return error_md(err), gr.skip()
            return f"Saved the recipe as **{stored}**.", self.saved_view(owner, stored)

        self.save_btn.click(on_save, [self.recipe_name, page.session_state, page.form_state, page.browser_key],
                            [self.saved_md, self.saved_dd], api_name="save_recipe")

        def on_load(name, state, form, version, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            found = ctx.sessions.recipes(owner).get(name or "")
            if found is None:
                return (*page.skip_refresh(), gr.skip(), gr.skip(), error_md("choose a saved recipe first"))
            return self.load_recipe(page, found["yaml"], f"the saved recipe **{name}**", (), state, form, version,
                                    request)

        self.load_btn.click(on_load, [self.saved_dd, *session, page.browser_key],
                            page.status_outputs + [page.comps["tabs"], self.saved_md], api_name="load_recipe")

        def on_forget(name, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            try:
                ctx.sessions.delete_recipe(owner, name or "")
            except MergeError as err:
                return error_md(err), gr.skip()
            return f"Deleted the saved recipe **{name}**.", self.saved_view(owner)

        self.forget_btn.click(on_forget, [self.saved_dd, page.browser_key], [self.saved_md, self.saved_dd],
                              api_name="delete_recipe")


# ---------------------------------------------------------------------------------------------
# the handlers' work (plain functions)


def finished_text(job: Job, frac: Optional[float], text: str) -> tuple[str, str]:
    """(summary, progress bar) of a merge that ended."""
    if job.status == DONE and job.meta.get("moe"):
        return moe_job.done_text(job.result), progress_html(1.0, text, DONE)
    if job.status == DONE:
        res = job.result
        summary = (f"**Merged** in {fmt_seconds(res.seconds)}: {res.tensors} tensors, "
                   f"{st.human_bytes(res.bytes_written)} in {res.shards} shard{'s' if res.shards != 1 else ''}, "
                   f"written to `{res.out_dir}`")
        return summary, progress_html(1.0, text, DONE)
    if job.status == CANCELLED:
        return "Cancelled; nothing was written.", progress_html(frac, "cancelled", CANCELLED)
    return f"**Failed:** {job.error}", progress_html(frac, f"failed: {job.error}", FAILED)


_NAMING = threading.Lock()  # naming a merge's folder and queueing it happen together


def submit_merge(ctx: AppContext, owner: str, recipe, name: str, dtype: Optional[str], nthreads: Any,
                 search_dirs: Sequence[Path] = ()) -> tuple[Job, Path]:
    """Queue a merge of `recipe` for `owner` (it starts when the owner's earlier merges ended);
    (its job, its output folder). The recipe's YAML goes into the merge history."""
    nthreads = int(nthreads or 1)
    return submit_job(ctx, owner, name or "merge", recipe.to_yaml(),
                      lambda jc, out_dir: run_merge(jc, recipe, out_dir, dtype, nthreads, search_dirs),
                      {"search_dirs": [str(d) for d in search_dirs]})


def submit_moe(ctx: AppContext, owner: str, config, name: str) -> tuple[Job, Path]:
    """Queue the build of a mixture of experts (a checked `MoEConfig`) with the owner's merges; its
    config's YAML goes into the merge history as a merge's recipe does."""
    from mergecore.moe.config import moe_config_yaml

    return submit_job(ctx, owner, name or "moe", moe_config_yaml(config),
                      lambda jc, out_dir: moe_job.run_moe(jc, config, out_dir), {"moe": True})


def submit_job(ctx: AppContext, owner: str, name: str, yaml_text: str, work: Any,
               meta: Optional[dict[str, Any]] = None) -> tuple[Job, Path]:
    """Queue `work(jc, out_dir)` in the owner's merge queue, in a fresh folder of its merges named
    after `name`; (its job, the folder)."""
    # one at a time per process: two tabs (or Merge and Merge again) must not pick the same folder
    with _NAMING:
        reserved = {Path(j.meta.get("out", "")).name for j in ctx.jobs.jobs(owner, kind="merge") if not j.done}
        reserved |= {str(r.get("name")) for r in history.records(ctx.sessions, ctx.jobs, owner)}
        out_dir = ctx.workspace.merge_dir(owner, name, reserved=reserved)
        meta = {"name": out_dir.name, "out": str(out_dir), "recipe": yaml_text, "search_dirs": [], **(meta or {})}
        job = ctx.jobs.submit(owner, "merge", lambda jc: work(jc, out_dir), title=out_dir.name, meta=meta,
                              exclusive=False, queue=f"merge:{owner}")
    return job, out_dir


def doing(job: Job) -> str:
    """What a merge job does, as the tab says it ("Merging", or "Building the mixture of experts")."""
    return "Building the mixture of experts" if job.meta.get("moe") else "Merging"


def checked_recipe(ctx: AppContext, text: Optional[str], search_dirs: Sequence[str], name: str):
    """A history record's recipe, parsed as data, its local models and artifacts inside the folders
    the app may read (as an imported recipe's are)."""
    from mergecore.errors import short
    from mergecore.recipe import recipe_from_dict
    from mergecore.yamlio import load_yaml

    from app.paths import confine, local_sides

    if not text:
        raise MergeError(f"`{name}` has no recipe recorded")
    where = f"the recipe of {name}"
    recipe = recipe_from_dict(load_yaml(text, where), where)
    roots = ctx.read_roots()
    for ref in recipe.referenced_models():
        local_sides(ref, roots)  # a local folder outside them: one line; a Hub id: fetched by the merge
    for key, ref in (recipe.artifacts or {}).items():
        found = [Path(d) / ref for d in search_dirs if not Path(ref).is_absolute() and (Path(d) / ref).is_file()]
        confine(found[0] if found else ref, roots, f"artifact {short(key, 40)}")
    return recipe


def merge_progress_text(p: Optional[dict[str, Any]], status: str, elapsed: float) -> tuple[Optional[float], str]:
    if p and p.get("kind") == "moe.progress":
        return moe_job.progress_text(p, status, elapsed)
    if not p:
        return (0.0 if status != DONE else 1.0), f"{status} · {fmt_seconds(elapsed)}"
    eta = p.get("eta")
    text = (f"{p['tensors_done']}/{p['tensors_total']} tensors · {st.human_bytes(p['bytes_done'])} / "
            f"{st.human_bytes(p['bytes_total'])} · {fmt_seconds(p.get('elapsed', elapsed))} elapsed")
    if status == "running":
        text += f" · ETA {fmt_seconds(eta)}" if eta is not None else " · ETA ?"
    return p.get("fraction"), text


def run_merge(jc, recipe, out_dir: Path, dtype: Optional[str], nthreads: int, search_dirs: Sequence[Path] = ()):
    """The merge job: `mergecore.merge`, the one call the CLI makes too; the plan's summary and
    warnings and every tenth of the progress go to the job's log."""
    import mergecore

    out_dtype = None if dtype in (None, "", "as in recipe") else dtype
    jc.log(f"planning {recipe.merge_method} merge ...")

    def on_plan(plan) -> None:
        for line in plan.describe().splitlines():
            if line.startswith("per-layer parameters"):
                break
            jc.log(line)  # method, models, output size, peak memory, warnings

    last = [-1]

    def progress(p):
        jc.emit(p.as_event())
        tenth = int(p.fraction * 10)
        if tenth != last[0]:
            last[0] = tenth
            jc.log(f"{p.tensors_done}/{p.tensors_total} tensors, {st.human_bytes(p.bytes_done)} written")

    res = mergecore.merge(recipe, out_dir, progress=progress, cancel=jc.cancel, out_dtype=out_dtype,
                          threads=nthreads, search_dirs=tuple(search_dirs), on_plan=on_plan)
    jc.log(res.summary())
    return res
