"""The Recipe tab's statistics panel: what a data-informed method (`MergeMethod.stats` set) needs,
whether the recipe has it, and its collection over a tasks file as a background job.

Nothing here knows a method: the panel shows for any method whose `stats` names a kind of
statistics, collects that kind with `mergecore.stats.collect_stats` for the recipe's models, and
puts the file under the recipe's `artifacts` at the key the method's `stats` parameter names
(its default when the form has no value), so the YAML preview and the Merge tab's merge use it.
A collection writes a new file in the session's own folder (`stats/`), never over another file.

The job (`app.jobs`, kind 'stats') is polled by the panel's `gr.Timer`; its snapshot's latest
'stats.progress' event is the bar, its log the line under it. The tasks file is a typed path:
confined and checked like every other (`app.paths.tasks_file`), its error at the field.
"""

from __future__ import annotations

import copy
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import gradio as gr

from mergecore.errors import MergeError, short
from mergecore.events import Event

from app import forms
from app.context import AppContext, Page, browser_owner
from app.jobs import CANCELLED, DONE, FAILED, Job, JobContext
from app.render import error_md, fmt_seconds, progress_html

KIND = "stats"  # the jobs' kind
STATS_PARAM = "stats"  # the parameter of a data-informed method that names its artifact key
MAX_EXAMPLES = 100_000
DEFAULT_EXAMPLES = 256
TASKS_INFO = "a tasks YAML inside the folders this app may read; empty: the demo's validation tasks"
IDLE = progress_html(0, "no collection yet", "idle")


# ---------------------------------------------------------------------------------------------
# what the panel says (plain functions)


def stats_kind(form: Optional[dict[str, Any]]) -> Optional[str]:
    """The statistics the form's method needs (None: a data-free method, or no method yet)."""
    name = (form or {}).get("method")
    return forms.get_method(name).stats if name else None


def kind_needs(kind: str) -> str:
    """What statistics of `kind` are, in words (the engine says)."""
    from mergecore.stats.store import describe_kind

    return describe_kind(kind)


def stats_key(form: dict[str, Any], state: dict[str, Any]) -> str:
    """The artifact key the method reads (its `stats` parameter: the form's value, or its default)."""
    method = forms.get_method(form["method"])
    spec = method.param(STATS_PARAM)
    value = (form.get("values") or {}).get(STATS_PARAM)
    if value in (None, "") and spec is not None:
        value = spec.first_value(1)
    return str(value or STATS_PARAM)


def recipe_inputs(form: dict[str, Any], state: dict[str, Any]) -> list[dict[str, Any]]:
    """The session models the method merges (its inputs, in recipe order): the ones statistics are for."""
    method = forms.get_method(form["method"])
    by_name = {m["name"]: m for m in state.get("models", [])}
    return [by_name[n] for n in forms.per_model_targets(method, state, form) if n in by_name]


def _artifact_path(ref: str, form: dict[str, Any], roots: Sequence[Path]) -> Path:
    """The file an artifact reference names (relative ones in the form's search folders), confined."""
    from app.paths import confine

    found = [Path(d) / ref for d in form.get("search_dirs") or () if not Path(ref).is_absolute()
             and (Path(d) / ref).is_file()]
    return confine(found[0] if found else ref, roots, "statistics file")


def _model_names(refs: Sequence[str], state: dict[str, Any]) -> list[str]:
    from app.state import find_model

    out = []
    for ref in refs:
        m = find_model(state, ref)
        out.append(m["name"] if m else short(Path(ref).name or ref, 40))
    return out


def attached_text(form: dict[str, Any], state: dict[str, Any], roots: Sequence[Path]) -> str:
    """Whether the recipe has the statistics its method needs, and for which models; a ⚠ line
    when they are missing, unreadable, of another kind, or no longer for the recipe's models."""
    kind = stats_kind(form)
    if not kind:
        return ""
    key = stats_key(form, state)
    ref = ((form.get("extra") or {}).get("artifacts") or {}).get(key)
    if not ref:
        return (f"⚠ No statistics attached (`artifacts: {{{key}: ...}}`): a merge would fail. "
                f"Collect them below.")
    from mergecore.stats.store import open_stats

    try:
        sf = open_stats(_artifact_path(str(ref), form, roots))
    except MergeError as err:
        return f"⚠ Statistics `{short(str(ref), 80)}`: {err}"
    names = _model_names([m["name"] for m in sf.models], state)
    where = f"`{Path(str(ref)).name}` ({sf.kind}, for {', '.join(names)})"
    if sf.kind != kind:
        return f"⚠ Attached {where} holds {sf.kind} statistics; {form['method']} needs {kind}: collect them again."
    refs = [m["ref"] for m in recipe_inputs(form, state)]
    try:
        used = sf.match(refs, form["method"])
    except MergeError as err:
        return f"⚠ Attached {where} no longer match the recipe's models ({err}): collect them again."
    if len(used) != len(sf.models):  # collected with models the recipe no longer has (their merge shaped them)
        gone = [n for i, n in enumerate(names) if i not in used]
        return (f"⚠ Attached {where} no longer match the recipe's models (they were collected with "
                f"{', '.join(gone)} too): collect them again.")
    return f"✓ Statistics attached: {where}."


def panel_text(form: dict[str, Any], state: dict[str, Any], roots: Sequence[Path]) -> str:
    """The panel's head: what the method needs (one line), then whether the recipe has it."""
    kind = stats_kind(form)
    if not kind:
        return ""
    need = f"**Statistics** — {form['method']} needs {kind_needs(kind)}, collected over a tasks file."
    if not state.get("models"):
        return need + "\n\nAdd models first (Models tab)."
    return need + "\n\n" + attached_text(form, state, roots)


def with_stats(form: dict[str, Any], key: str, path: str | Path) -> dict[str, Any]:
    """The form with `path` under its recipe's `artifacts` at `key` (the other artifacts kept)."""
    form = copy.deepcopy(form)
    extra = form.setdefault("extra", {})
    extra["artifacts"] = {**(extra.get("artifacts") or {}), key: str(path)}
    return form


def checked_examples(value: Any) -> int:
    """Examples per model, a whole number in [1, MAX_EXAMPLES] (one-line error otherwise)."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        n = float("nan")
    if not n.is_integer():
        raise MergeError(f"examples per model: give a whole number from 1 to {MAX_EXAMPLES}")
    if not 1 <= n <= MAX_EXAMPLES:
        raise MergeError(f"examples per model: {n:g} is out of range [1, {MAX_EXAMPLES}]")
    return int(n)


def checked_tasks(text: Optional[str], state: dict[str, Any], roots: Sequence[Path]) -> Path:
    """The typed tasks file (empty: the session's demo validation tasks), confined and checked."""
    from app.paths import tasks_file

    text = (text or "").strip()
    if not text:
        fam = state.get("family") or {}
        text = fam.get("val_tasks") or fam.get("tasks") or ""
        if not text:
            raise MergeError("give a tasks file: each model's inputs are taken from its task")
    return tasks_file(text, roots)


def stats_path(ctx: AppContext, owner: str, kind: str) -> Path:
    """A new file for a collection in the session's own folder (never one that exists)."""
    folder = ctx.workspace.session_dir(owner) / "stats"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        p = folder / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.safetensors"
        if not p.exists():
            return p


def start_collection(ctx: AppContext, owner: str, form: dict[str, Any], state: dict[str, Any], tasks: Path,
                     examples: int) -> Job:
    """Submit the collection of the form's method's statistics for the recipe's models (one per
    session at a time); the job's result is the file written."""
    kind = stats_kind(form)
    if not kind:
        raise MergeError(f"method '{form.get('method')}' needs no statistics")
    models = recipe_inputs(form, state)
    if not models:
        raise MergeError("the recipe has no models: tick some under 'Models in the recipe'")
    out = stats_path(ctx, owner, kind)
    base = state.get("base")
    base_path = next((m["path"] for m in state.get("models", []) if m["name"] == base), None)
    meta = {"kind": kind, "key": stats_key(form, state), "method": form["method"], "out": str(out),
            "models": [m["name"] for m in models], "tasks": str(tasks), "examples": examples}

    def run(jc: JobContext) -> Path:
        from mergecore.stats import collect_stats

        jc.log(f"collecting {kind} statistics of {', '.join(meta['models'])} over {tasks.name} "
               f"({examples} examples per model) ...")
        path = collect_stats(kind, tasks, [str(m["path"]) for m in models], out, base=base_path,
                             examples=examples, progress=progress_callback(jc), cancel=jc.cancel)
        jc.log(f"wrote {Path(path).name}")
        return Path(path)

    return ctx.jobs.submit(owner, KIND, run, title=f"{kind} statistics", meta=meta)


def progress_callback(jc: JobContext):
    """The engine's `progress(stage, done, total, message)` as 'stats.progress' events (the bar),
    and each new stage's message as a log line."""
    seen: list[Optional[str]] = [None]

    def on_progress(stage: str, done: int, total: int, message: str = "") -> None:
        jc.emit(Event("stats.progress", {"stage": stage, "done": done, "total": total, "message": message}))
        if stage != seen[0] or stage == "load":
            seen[0] = stage
            jc.log(message or stage)

    return on_progress


def progress_view(snap: dict[str, Any]) -> tuple[str, str]:
    """(progress bar, log line) of a collection's snapshot."""
    p = snap.get("progress") or {}
    done, total = p.get("done"), p.get("total")
    frac = (done / total) if isinstance(done, (int, float)) and total else None
    text = " · ".join(str(x) for x in (p.get("message") or p.get("stage"), f"{done}/{total}" if total else None,
                                       fmt_seconds(snap.get("elapsed"))) if x)
    status = snap["status"]
    line = (snap.get("log") or [""])[-1]
    if status == DONE:
        return progress_html(1.0, f"done · {fmt_seconds(snap.get('elapsed'))}", DONE), line
    if status == FAILED:
        return progress_html(frac, f"failed: {snap.get('error')}", FAILED), f"**Failed:** {snap.get('error')}"
    if status == CANCELLED:
        return progress_html(frac, "cancelled", CANCELLED), "Cancelled; nothing was attached."
    return progress_html(frac if status != "queued" else 0, text or status), line


# ---------------------------------------------------------------------------------------------
# the panel in the page


class StatsPanel:
    """The components and events of the statistics panel (built inside the Recipe tab)."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def build(self) -> None:
        with gr.Column(visible=False, variant="panel", elem_id="stats-panel") as self.group:
            self.head = gr.Markdown("", elem_id="stats-head")
            with gr.Row(equal_height=True):
                self.tasks_tb = gr.Textbox(label="Tasks file (each model's inputs)", info=TASKS_INFO, scale=4,
                                           elem_id="stats-tasks", interactive=True)
                self.examples = gr.Number(label="Examples per model", value=DEFAULT_EXAMPLES, minimum=1,
                                          maximum=MAX_EXAMPLES, precision=0, scale=1, elem_id="stats-examples")
            with gr.Row():
                self.collect_btn = gr.Button("Collect statistics", variant="primary", elem_id="stats-collect")
                self.cancel_btn = gr.Button("Cancel", variant="stop", interactive=False, elem_id="stats-cancel")
            self.progress = gr.HTML(IDLE, elem_id="stats-progress")
            self.log = gr.Markdown("", elem_id="stats-log")
            self.job = gr.State("")
            self.timer = gr.Timer(0.5, active=False)

    def outputs(self) -> list[Any]:
        return [self.group, self.head, self.tasks_tb]

    def views(self, state: dict[str, Any], form: dict[str, Any]) -> list[Any]:
        kind = stats_kind(form) if form.get("method") else None
        fam = (state or {}).get("family") or {}
        default = fam.get("val_tasks") or fam.get("tasks")
        placeholder = f"empty: {default}" if default else "path of a tasks YAML"
        return [gr.Column(visible=bool(kind)), panel_text(form, state, self.ctx.read_roots()) if kind else "",
                gr.update(placeholder=placeholder)]

    def wire(self, page: Page, refreshed) -> None:
        """`refreshed(state, form, version, request)`: the session's views after a collection is attached."""
        ctx = self.ctx
        buttons = [self.cancel_btn, self.collect_btn]

        def running(on: bool) -> list[Any]:
            return [gr.Button(interactive=on), gr.Button(interactive=not on)]

        def on_tasks(text, state):
            """The typed path checked as it is left: refused paths are said at the field."""
            from app.recipe_views import field_error

            if not (text or "").strip():
                return gr.update(info=TASKS_INFO, elem_classes=[])
            try:
                checked_tasks(text, state or {}, ctx.read_roots())
            except MergeError as err:
                return field_error(err)
            return gr.update(info=TASKS_INFO, elem_classes=[])

        self.tasks_tb.submit(None, None, None, js="() => { if (document.activeElement) document.activeElement.blur(); }")
        self.tasks_tb.blur(on_tasks, [self.tasks_tb, page.session_state], [self.tasks_tb], api_visibility="private")

        def on_collect(text, examples, state, form, key=None, request: gr.Request = None):
            from app.recipe_views import field_error

            owner = browser_owner(key, request)
            try:
                tasks = checked_tasks(text, state or {}, ctx.read_roots())
            except MergeError as err:  # said at the field (and as a toast); nothing else changes
                return (field_error(err), *[gr.skip()] * 7)
            try:
                job = start_collection(ctx, owner, forms.filled(form, state or {}), state or {}, tasks,
                                       checked_examples(examples))
            except MergeError as err:
                gr.Warning(str(err))
                return (gr.update(info=TASKS_INFO, elem_classes=[]), gr.skip(), gr.skip(), gr.skip(),
                        progress_html(0, f"error: {err}", FAILED), error_md(err), *running(False))
            return (gr.update(info=TASKS_INFO, elem_classes=[]), gr.skip(), job.id, gr.Timer(active=True),
                    progress_html(0, "starting ..."), "", *running(True))

        self.collect_btn.click(on_collect, [self.tasks_tb, self.examples, page.session_state, page.form_state,
                                            page.browser_key],
                               [self.tasks_tb, self.examples, self.job, self.timer, self.progress, self.log, *buttons],
                               api_name="collect_stats")

        def on_poll(job_id, state, form, version, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            job = ctx.jobs.find(owner, job_id)
            idle = [gr.skip()] * len(page.outputs)
            if job is None:
                return (gr.skip(), gr.skip(), gr.Timer(active=False), "", *running(False), *idle)
            bar, line = progress_view(ctx.jobs.snapshot(owner, job.id))
            if not job.done:
                return (bar, line, gr.skip(), gr.skip(), *running(True), *idle)
            views = idle
            if job.status == DONE:
                form = with_stats(forms.filled(form, state), job.meta["key"], job.result)
                views = list(refreshed(state, form, version, request))
                line = f"Attached `{Path(job.result).name}` to the recipe as `artifacts: {job.meta['key']}`."
            return (bar, line, gr.Timer(active=False), "", *running(False), *views)

        self.timer.tick(on_poll, [self.job, page.session_state, page.form_state, page.form_version, page.browser_key],
                        [self.progress, self.log, self.timer, self.job, *buttons, *page.outputs],
                        api_name="poll_stats", concurrency_limit=None)

        def on_cancel(job_id, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            job = ctx.jobs.find(owner, job_id) or next((j for j in ctx.jobs.jobs(owner, kind=KIND) if not j.done), None)
            if job is None or job.done:
                return "Nothing to cancel."
            ctx.jobs.cancel(owner, job.id)
            return "Cancelling the collection ..."

        self.cancel_btn.click(on_cancel, [self.job, page.browser_key], [self.log], api_name="cancel_stats")

        def attach(key, request: gr.Request):
            """The page (re)opens: follow the session's running collection, if any."""
            owner = browser_owner(key, request)
            live = [j for j in ctx.jobs.jobs(owner, kind=KIND) if not j.done]
            if not live:
                return (gr.skip(),) * 5
            return (live[-1].id, gr.Timer(active=True), progress_html(0, "following the running collection ..."),
                    *running(True))

        page.on_load(attach, [page.browser_key], [self.job, self.timer, self.progress, *buttons],
                     api_visibility="private")
