"""Searches as background jobs: start, resume, find a finished one, and replay its recipe.

Searches outlive the page: their jobs belong to the *browser* (a random key kept in the
browser's localStorage through `gr.BrowserState`), not to the page's Gradio session, so a
reload or a second tab of the same browser finds the running search. Each run writes into its
own folder (`Workspace.search_dir`), with `app_search.json` (the search, its config and the
form), so **Resume** continues it there, also after the app restarted.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from mergecore.errors import MergeError
from mergecore.events import Event
from mergecore.search.base import RECIPE_FILE, RESULT_FILE

from app.context import AppContext, owner_of
from app.jobs import DONE, Job
from app.searches.base import SearchSpec, get_search

KEY_RE = re.compile(r"^[0-9a-f]{32}$")
STATE_FILE = "app_search.json"


def search_owner(key: Any, request: Any) -> str:
    """Who owns a search: the browser (its BrowserState key) or, without one, the page session."""
    if isinstance(key, str) and KEY_RE.match(key):
        return f"browser-{key}"
    return owner_of(request)


def new_key() -> str:
    return uuid.uuid4().hex


def start_search(ctx: AppContext, owner: str, spec: SearchSpec, config: Any, meta: dict[str, Any], out_dir: Path,
                 resume: bool = False) -> Job:
    """Submit the search as a background job of `owner` (kind 'search') writing into `out_dir`."""
    state = {"search": spec.name, "config": spec.dump_config(config), "meta": meta, "created": time.time()}
    (out_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def fn(jc):
        from mergecore.search.report import event_line

        def emit(ev: Event) -> None:
            jc.emit(ev)
            line = event_line(ev, every=spec.log_every)  # the CLI's line
            if line:
                jc.log(line)

        jc.log(f"{'resuming' if resume else 'starting'} {spec.title} in {out_dir}")
        result = spec.run(config, out_dir, emit, jc.cancel, resume)
        jc.log(f"finished; recipe: {out_dir / RECIPE_FILE}")
        return result

    # searches have their own slot: two may run at once without holding up merges and evaluations
    return ctx.jobs.submit(owner, "search", fn, title=f"{spec.name}: {out_dir.name}", slot="search",
                           meta={**meta, "search": spec.name, "out": str(out_dir), "resumed": resume})


def checked_paths(spec: SearchSpec, form: dict[str, Any], roots) -> dict[str, Any]:
    """The form with each typed tasks file confined to `roots` and checked as a tasks file
    (`app.paths.tasks_file`) before the search's own code reads it: a server file outside them is
    refused, and one that is no tasks file is named without showing what it holds."""
    from app.paths import tasks_file

    out = dict(form)
    for f in spec.fields:
        if f.kind == "tasks" and str(out.get(f.key) or "").strip():
            out[f.key] = str(tasks_file(str(out[f.key]), roots))
    return out


def latest_search(ctx: AppContext, owner: str) -> Optional[Job]:
    jobs = ctx.jobs.jobs(owner, kind="search")
    return jobs[-1] if jobs else None


def finished_search(ctx: AppContext, owner: str, job_id: Any, missing: str) -> tuple[Job, SearchSpec, Path]:
    """(job, spec, recipe path) of this owner's finished search `job_id`, or MergeError(`missing`)."""
    job = ctx.jobs.find(owner, job_id)
    if job is None or job.status != DONE:
        raise MergeError(missing)
    spec = get_search(job.meta["search"])
    return job, spec, Path(job.meta["out"]) / RECIPE_FILE


def resumable(ctx: AppContext, owner: str) -> tuple[SearchSpec, Any, dict[str, Any], Path]:
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
        if (out / RESULT_FILE).is_file():
            raise MergeError("the last search finished; start a new one")
    try:  # written by the app, but a crash or an older version may have left it unreadable
        data = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
        spec = get_search(data["search"])
        config = spec.load_config(data["config"])
        meta = dict(data.get("meta") or {})
    except MergeError:
        raise
    except Exception as err:  # noqa: BLE001 - any damage: one line, not a traceback in the page
        raise MergeError(f"cannot resume the search in {out}: its {STATE_FILE} is unreadable "
                         f"({type(err).__name__}); start a new search") from None
    return spec, config, meta, out


def jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


def replay(jc, recipe: Path, out_dir: Path, tasks: Optional[str], base: Optional[str]):
    """The replay job: `mergecore.merge` of a search's recipe file (its artifacts are found next to
    it), then the checkpoint (and the base, for reference) scored on the tasks."""
    import mergecore
    from app.compare import evaluate_models

    def on_plan(plan) -> None:
        for w in plan.warnings:
            jc.log(f"warning: {w}")

    jc.meta["stage"] = "merge"
    res = mergecore.merge(recipe, out_dir, progress=jc.progress_callback(), cancel=jc.cancel, on_plan=on_plan)
    jc.log(res.summary())
    if tasks and Path(tasks).is_file():
        jc.meta["stage"] = "evaluating on the test tasks"
        models = {out_dir.name: str(out_dir)}
        if base:
            models = {"base (no merge)": base, **models}
        jc.meta["scores"] = evaluate_models(models, tasks, cancel=jc.cancel, log=jc.log)
    return res
