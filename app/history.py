"""A browser's merge history and evaluations, kept in its session file (`app.session`).

Every merge job (the Merge tab's, "Merge again", a search's replay) is recorded when it is
submitted and again when it ends, by the job manager's listener (`on_job`), so a merge that
finishes while no page is open is still recorded. A record::

    {"id": job id, "name": folder name, "out": folder, "recipe": YAML | None, "method": "ties",
     "search_dirs": [...], "created": epoch, "finished": epoch | None,
     "status": "queued" | "running" | "done" | "failed" | "cancelled" | "interrupted",
     "error": one line | None, "bytes": int, "tensors": int, "seconds": float,
     "scores": {"mean": ..., "<task>": ...} | None}

A record whose job the app no longer knows (it restarted) and that never ended is shown as
"interrupted". Finished evaluations are kept too (the latest few), and the scores of each merge
they scored are written into its record.

Deleting a merge removes its record and its folder, and only a folder inside the owner's
merges folder that mergecore marked as a merge's or a mixture of experts' (`mergecore.io.outdir.read_marker`).
A mixture of experts built on the Merge tab is recorded as a merge, its config as the recipe and
`moe` as the method.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from mergecore.errors import MergeError
from mergecore.io.outdir import read_marker

from app.files import Workspace
from app.jobs import DONE, FINISHED, Job, JobManager, one_line_error
from app.session import MAX_RECIPE_CHARS, SessionStore

INTERRUPTED = "interrupted"
HISTORY_COLUMNS = ["merge", "status", "when", "method", "size", "tensors", "took", "mean score", "folder"]
RECIPE_IN_FOLDER = "mergecore_recipe.yml"  # what mergecore.merge writes beside the weights
MAX_EVAL_ROWS = 200


# ---------------------------------------------------------------------------------------------
# recording (the job manager's listener)


def method_of(yaml_text: Optional[str]) -> Optional[str]:
    if not yaml_text:
        return None
    try:
        from mergecore.yamlio import load_yaml

        data = load_yaml(yaml_text, "recipe")
    except MergeError:
        return None
    from mergecore.moe.config import is_moe_config

    if is_moe_config(data):
        return "moe"  # a mixture of experts' config (app.moe_form.MOE)
    method = data.get("merge_method") if isinstance(data, dict) else None
    return method if isinstance(method, str) else None


def _folder_recipe(out: Path) -> Optional[str]:
    p = out / RECIPE_IN_FOLDER
    try:
        if p.is_file() and not p.is_symlink() and p.stat().st_size <= MAX_RECIPE_CHARS:
            return p.read_text()
    except (OSError, UnicodeDecodeError):
        pass
    return None


def _scores_of(rows: Any, name: str) -> Optional[dict[str, float]]:
    """The scores of the model `name` in an evaluation table (DataFrame or list of row dicts)."""
    if hasattr(rows, "to_dict"):
        rows = rows.to_dict("records")
    for row in rows or []:
        if isinstance(row, dict) and row.get("model") == name:
            return {str(k): _number(v) for k, v in row.items() if k != "model"}
    return None


def _number(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _record_submit(job: Job) -> dict[str, Any]:
    meta = job.meta
    recipe = meta.get("recipe") if isinstance(meta.get("recipe"), str) else None
    return {"id": job.id, "name": meta.get("name") or job.title, "out": meta.get("out"), "recipe": recipe,
            "method": method_of(recipe), "search_dirs": [str(d) for d in meta.get("search_dirs") or ()],
            "created": job.created, "finished": None, "status": job.status, "error": None, "bytes": None,
            "tensors": None, "seconds": None, "scores": None}


def _record_finish(rec: dict[str, Any], job: Job) -> None:
    rec.update(status=job.status, finished=job.finished or time.time(), error=job.error)
    res = job.result
    if job.status == DONE and res is not None:
        rec.update(bytes=getattr(res, "bytes_written", None), tensors=getattr(res, "tensors", None),
                   seconds=getattr(res, "seconds", None))
        if rec.get("out") is None and getattr(res, "out_dir", None):
            rec["out"] = str(res.out_dir)
    if rec.get("recipe") is None and rec.get("out"):
        rec["recipe"] = _folder_recipe(Path(rec["out"]))
        rec["method"] = method_of(rec["recipe"])
    if job.meta.get("scores") is not None:  # a search's replay scores what it merged
        rec["scores"] = _scores_of(job.meta["scores"], rec["name"])


def on_job(store: SessionStore, event: str, job: Job) -> None:
    """The job manager's listener: merge jobs are recorded, finished evaluations kept."""
    if job.kind == "merge":

        def change(data: dict[str, Any]) -> None:
            merges = data["merges"]
            rec = next((r for r in merges if r.get("id") == job.id), None)
            if rec is None:
                rec = _record_submit(job)
                merges.append(rec)
            if event == "finish":
                _record_finish(rec, job)

        store.update(job.owner, change)
    elif job.kind == "eval" and event == "finish" and job.status == DONE:
        record_evaluation(store, job.owner, job.result, tasks=job.meta.get("tasks"), when=job.finished)


def record_evaluation(store: SessionStore, owner: str, table: Any, tasks: Optional[str] = None,
                      when: Optional[float] = None) -> None:
    """Keep an evaluation (one row per model) and write each scored merge's scores into its record."""
    rows = table.to_dict("records") if hasattr(table, "to_dict") else list(table or [])
    rows = [{str(k): (v if k == "model" else _number(v)) for k, v in r.items()} for r in rows[:MAX_EVAL_ROWS]
            if isinstance(r, dict)]

    def change(data: dict[str, Any]) -> None:
        data["evaluations"].append({"created": when or time.time(), "tasks": tasks, "rows": rows})
        for rec in data["merges"]:
            scores = _scores_of(rows, rec.get("name"))
            if scores is not None:
                rec["scores"] = scores

    store.update(owner, change)


# ---------------------------------------------------------------------------------------------
# reading


def records(store: SessionStore, jobs: JobManager, owner: str) -> list[dict[str, Any]]:
    """The owner's merge records, oldest first, with the live status of the jobs still known."""
    out = []
    for rec in store.read(owner)["merges"]:
        rec = dict(rec)
        job = jobs.find(owner, rec.get("id"))
        if job is not None:
            rec["status"] = job.status
        elif rec.get("status") not in FINISHED:
            rec["status"] = INTERRUPTED  # the app stopped while it ran
        out.append(rec)
    return out


def find(store: SessionStore, jobs: JobManager, owner: str, rec_id: Any) -> dict[str, Any]:
    for rec in records(store, jobs, owner):
        if rec.get("id") == rec_id:
            return rec
    raise MergeError("choose a merge from the history first")


def finished(store: SessionStore, jobs: JobManager, owner: str) -> dict[str, Path]:
    """The owner's merges that are on disk, in its merges folder: name -> folder, oldest first
    (the history's, then any merge job the history does not know yet)."""
    found: dict[str, Path] = {}
    root = store.ws.merges_dir(owner).resolve()
    for rec in records(store, jobs, owner):
        out = Path(str(rec.get("out") or ""))
        if rec["status"] == DONE and rec.get("out") and out.is_dir() and out.resolve().parent == root:
            found.setdefault(str(rec["name"]), out)
    for j in jobs.jobs(owner, kind="merge", status=DONE):
        out = Path(getattr(j.result, "out_dir", None) or j.meta.get("out") or "")
        if j.meta.get("name") and j.meta["name"] not in found and out.is_dir():
            found[j.meta["name"]] = out
    return found


def latest_evaluation(store: SessionStore, owner: str) -> Optional[dict[str, Any]]:
    evals = store.read(owner)["evaluations"]
    return evals[-1] if evals else None


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else ""


def _size(n: Any) -> str:
    from app.state import human_bytes

    return human_bytes(n) if isinstance(n, (int, float)) else ""


def table(recs: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the history table (newest first)."""
    rows = []
    for r in reversed(recs):
        scores = r.get("scores") or {}
        mean = scores.get("mean") if isinstance(scores, dict) else None
        took = f"{r['seconds']:.1f} s" if isinstance(r.get("seconds"), (int, float)) else ""
        status = r["status"] + (f": {r['error']}" if r.get("error") and r["status"] != DONE else "")
        rows.append([r.get("name"), status, _when(r.get("finished") or r.get("created")), r.get("method") or "",
                     _size(r.get("bytes")), r.get("tensors") or "", took,
                     f"{mean:.4f}" if isinstance(mean, (int, float)) else "", r.get("out") or ""])
    return rows


def choices(recs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, record id) for the history's dropdown, newest first."""
    return [(f"{r.get('name')} · {r['status']} · {_when(r.get('finished') or r.get('created'))}", r["id"])
            for r in reversed(recs) if r.get("id")]


def signature(recs: list[dict[str, Any]]) -> str:
    """Changes when a record is added, removed or changes status (the page redraws then)."""
    return "|".join(f"{r.get('id')}:{r['status']}:{bool(r.get('scores'))}" for r in recs)


# ---------------------------------------------------------------------------------------------
# deleting


def delete(store: SessionStore, ws: Workspace, jobs: JobManager, owner: str, rec_id: Any) -> str:
    """Delete a merge: its folder (only one mergecore marked as a merge's, in this owner's merges
    folder) and its record. Returns what was done, in one line; MergeError when refused."""
    rec = find(store, jobs, owner, rec_id)
    name = rec.get("name")
    if rec["status"] not in (*FINISHED, INTERRUPTED):
        raise MergeError(f"'{name}' is still {rec['status']}; cancel it first")
    folder = Path(rec["out"]) if rec.get("out") else None
    removed = False
    if folder is not None and (folder.exists() or folder.is_symlink()):
        root = ws.merges_dir(owner).resolve()
        if folder.is_symlink() or folder.resolve().parent != root or not folder.is_dir():
            raise MergeError(f"'{name}': {folder} is not a folder of this browser's merges; not deleting it")
        if read_marker(folder) not in ("merge", "moe"):  # a merge's, or a mixture of experts' (build_moe)
            raise MergeError(f"'{name}': {folder} has no mergecore merge marker; not deleting it")
        try:
            shutil.rmtree(folder)
        except OSError as err:
            raise MergeError(f"'{name}': could not delete {folder} ({one_line_error(err)})") from None
        removed = True

    def change(data: dict[str, Any]) -> None:
        data["merges"] = [r for r in data["merges"] if r.get("id") != rec["id"]]

    store.update(owner, change)
    return f"Deleted `{name}`" + (f" and its folder `{folder}`." if removed else " (it had no folder).")
