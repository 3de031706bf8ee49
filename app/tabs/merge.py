"""The Merge tab: the form's recipe merged in the background (`mergecore.merge`, as the CLI
does), with progress, a log and a plot of the bytes written.

Named API endpoints: /merge, /poll_merge, /cancel_merge.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import gradio as gr

from mergecore.errors import MergeError

from app import forms, plots
from app import state as st
from app.context import AppContext, Page, owner_of
from app.jobs import CANCELLED, DONE, FAILED
from app.render import fmt_seconds, progress_html


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
                self.cancel_btn = gr.Button("Cancel", variant="stop")
            self.progress = gr.HTML(progress_html(0, "idle", "idle"), elem_id="merge-progress")
            self.summary = gr.Markdown("", elem_id="merge-summary")
            with gr.Row():
                self.log = gr.Textbox(label="Log", lines=12, max_lines=20, autoscroll=True, scale=3)
                self.plot = gr.LinePlot(value=plots.merge_frame([]), x="x", y="value", x_title="seconds",
                                        y_title="MB written", label="Written so far (MB against seconds)",
                                        height=320, scale=2)
            self.timer = gr.Timer(0.5, active=False)
            self.job = gr.State("")

    def wire(self, page: Page) -> None:
        ctx = self.ctx

        def on_merge(state, form, name, dtype, nthreads, request: gr.Request):
            owner = owner_of(request)
            try:
                recipe = forms.build_recipe(form, state)
                out_dir = ctx.workspace.merge_dir(owner, name or "merge")
                dirs = tuple(Path(d) for d in form.get("search_dirs") or ())
                job = ctx.jobs.submit(owner, "merge", lambda jc: run_merge(jc, recipe, out_dir, dtype, int(nthreads),
                                                                           dirs),
                                      title=out_dir.name, meta={"name": out_dir.name, "out": str(out_dir)})
            except MergeError as err:
                return (gr.skip(), gr.Timer(active=False), progress_html(0, f"error: {err}", FAILED),
                        f"**Failed:** {err}", "")
            return (job.id, gr.Timer(active=True), progress_html(0, "starting ..."),
                    f"Merging into `{out_dir}` ...", "")

        self.merge_btn.click(on_merge, [page.session_state, page.form_state, self.out_name, self.out_dtype,
                                        self.threads], [self.job, self.timer, self.progress, self.summary, self.log],
                             api_name="merge")

        def on_poll(job_id, state, request: gr.Request):
            owner = owner_of(request)
            job = ctx.jobs.find(owner, job_id)
            if job is None:
                return (gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False),
                        *[gr.skip()] * len(page.merges_outputs), gr.skip())
            snap = ctx.jobs.snapshot(owner, job_id)
            frac, text = merge_progress_text(snap["progress"], snap["status"], snap["elapsed"])
            log_text = "\n".join(snap["log"][-400:])
            frame = plots.merge_frame(snap["events"])
            if not job.done:
                return (progress_html(frac, text), log_text, gr.skip(), gr.skip(),
                        *[gr.skip()] * len(page.merges_outputs), frame)
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
            return (bar, log_text, summary, gr.Timer(active=False), *page.merges_views(state, owner), frame)

        self.timer.tick(on_poll, [self.job, page.session_state],
                        [self.progress, self.log, self.summary, self.timer, *page.merges_outputs, self.plot],
                        api_name="poll_merge", concurrency_limit=None)

        def on_cancel(job_id, request: gr.Request):
            job = ctx.jobs.find(owner_of(request), job_id)
            if job is None or job.done:
                return "Nothing to cancel."
            ctx.jobs.cancel(owner_of(request), job_id)
            return "Cancelling ..."

        self.cancel_btn.click(on_cancel, [self.job], [self.summary], api_name="cancel_merge")


def merge_progress_text(p: Optional[dict[str, Any]], status: str, elapsed: float) -> tuple[Optional[float], str]:
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
    import torch

    import mergecore

    out_dtype = None if dtype in (None, "", "as in recipe") else dtype
    jc.log(f"planning {recipe.merge_method} merge ...")

    def on_plan(plan) -> None:
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

    res = mergecore.merge(recipe, out_dir, progress=progress, cancel=jc.cancel, out_dtype=out_dtype,
                          threads=nthreads, search_dirs=tuple(search_dirs), on_plan=on_plan)
    jc.log(res.summary())
    return res
