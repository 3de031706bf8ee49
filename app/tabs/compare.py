"""The Compare tab: one input (a prompt, or an image with a task's head) through the session's
models and merges side by side, and their evaluation on a tasks file (`app.compare` does the work).

Evaluations belong to the browser: a reload follows the running one, and the latest finished one
is shown again when the page opens (its scores also go into the merge history, `app.history`).
Compare and Evaluate are off while their work runs.

Named API endpoints: /compare, /evaluate, /poll_eval.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from mergecore.errors import MergeError

from app import compare as cmp
from app import history
from app import state as st
from app.context import AppContext, Page, browser_owner, owner_of
from app.jobs import DONE, FAILED
from app.render import error_md, fmt_seconds, progress_html

TASK_HEAD = "the task's head (as the evaluator scores it)"
OWN_HEAD = "each model's own"


class CompareTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def build(self, page: Page) -> None:
        fam = self.ctx.demo
        demo_img = fam is not None and fam.kind == "image-classification"
        demo_tasks = task_names(fam.tasks) if demo_img and fam.tasks else []
        first = fam.examples[0] if demo_img and fam.examples else None
        with gr.Tab("Compare", id="compare"):
            page.comps["cmp_models"] = self.models = gr.CheckboxGroup(
                label="Models (sources and this session's merges)", choices=[])
            with gr.Group(visible=True) as self.lm_group:
                with gr.Row():
                    self.prompt_tb = gr.Textbox(label="Prompt (text, or token ids separated by spaces)", scale=4,
                                                value="1 2 3 4 5 6 7 8")
                    self.new_tokens = gr.Slider(label="new tokens", minimum=1, maximum=32, step=1, value=8, scale=1)
            with gr.Column(visible=False) as self.cls_group:
                with gr.Row(equal_height=False):
                    self.image_in = gr.Image(label="Image", type="numpy", image_mode="RGB", height=210,
                                             elem_id="cmp-image", value=first["image"] if first else None)
                    with gr.Column():
                        self.task_dd = gr.Dropdown(label="Task", choices=demo_tasks,
                                                   value=first["task"] if first else None, allow_custom_value=True,
                                                   info="with the task's head: its expert's classifier and classes")
                        self.head_dd = gr.Dropdown(label="Classifier head", choices=[TASK_HEAD, OWN_HEAD],
                                                   value=TASK_HEAD if demo_tasks else OWN_HEAD,
                                                   info="score every body with one head (task heads), or each "
                                                        "model with its own")
                        self.truth_tb = gr.Textbox(label="True label (optional: marks right and wrong answers)",
                                                   value=first["label"] if first else "")
            if fam is not None and fam.examples:
                if demo_img:
                    gr.Examples(examples=[[e["image"], e["task"], e["label"]] for e in fam.examples],
                                inputs=[self.image_in, self.task_dd, self.truth_tb], examples_per_page=12,
                                visible_columns=[0],
                                label="Example images from each task's test data (click one: it sets the task "
                                      "and the true label)")
                else:
                    gr.Examples(examples=[[e] for e in fam.examples], inputs=[self.prompt_tb],
                                label=f"Example inputs ({fam.title})")
            self.cmp_btn = gr.Button("Compare", variant="primary", elem_id="cmp-btn")
            self.status = gr.Markdown("")
            self.html = gr.HTML("")
            self.df = gr.Dataframe(label="Side by side", interactive=False, wrap=True)
            with gr.Accordion("Evaluation on tasks", open=True):
                with gr.Row():
                    self.tasks_tb = gr.Textbox(label="Tasks YAML (mergecore.eval)", scale=3,
                                               placeholder="the demo family's tasks, or a path to a tasks file")
                    self.subset_tb = gr.Textbox(label="subset (ratio or count; empty = all)", value="", scale=1)
                    self.eval_btn = gr.Button("Evaluate", scale=1, elem_id="eval-btn")
                self.eval_progress = gr.HTML("", elem_id="eval-progress")
                self.eval_df = gr.Dataframe(label="Scores (one row per model)", interactive=False,
                                            value=pd.DataFrame(columns=["model", "mean"]), elem_id="eval-scores")
                self.eval_timer = gr.Timer(0.5, active=False)
            self.eval_job = gr.State("")

    # -- the session's views ----------------------------------------------------------------------

    def outputs(self, page: Page) -> list[Any]:
        return [self.models, self.lm_group, self.cls_group, self.head_dd, self.task_dd, self.tasks_tb]

    def merges_view(self, state: dict[str, Any], owner: str):
        choices = st.model_names(state) + list(self.ctx.merges(owner))
        return gr.CheckboxGroup(choices=choices, value=choices)

    def views(self, state: dict[str, Any], form: dict[str, Any], owner: str, **_: Any) -> list[Any]:
        kinds = set()
        for m in state.get("models", []):
            try:
                kinds.add(cmp.model_kind(m["path"]))
            except MergeError:
                pass
        is_cls = "image-classification" in kinds
        fam = state.get("family") or {}
        tasks = task_names(fam.get("tasks")) if is_cls and fam.get("tasks") else []
        heads = ([TASK_HEAD] if tasks else []) + [OWN_HEAD] + st.model_names(state)
        return [self.merges_view(state, owner), gr.Group(visible=not is_cls), gr.Column(visible=is_cls),
                gr.Dropdown(choices=heads, value=TASK_HEAD if tasks else OWN_HEAD),
                gr.Dropdown(choices=tasks, value=tasks[0]) if tasks else gr.skip(), fam.get("tasks") or ""]

    # -- events -----------------------------------------------------------------------------------

    def wire(self, page: Page) -> None:
        ctx = self.ctx

        def on_compare(selected, prompt, ntok, image, head, task, truth, tasks, state, request: gr.Request):
            try:
                result, merged = compare(ctx, owner_of(request), state, selected, prompt, ntok, image, head,
                                         task=task, truth=truth, tasks=tasks)
            except MergeError as err:
                return error_md(err), gr.skip(), gr.skip()
            return (f"Reference for the distances: **{result['reference']}**.", cmp.render_html(result, merged),
                    cmp.rows_frame(result["rows"]))

        # busy: the button is off while the comparison runs, and back on after it (also after an error)
        self.cmp_btn.click(lambda: gr.Button(interactive=False), None, [self.cmp_btn], api_visibility="private",
                           queue=False).then(
            on_compare, [self.models, self.prompt_tb, self.new_tokens, self.image_in, self.head_dd, self.task_dd,
                         self.truth_tb, self.tasks_tb, page.session_state],
            [self.status, self.html, self.df], api_name="compare").then(
            lambda: gr.Button(interactive=True), None, [self.cmp_btn], api_visibility="private", queue=False)
        self.image_in.upload(lambda: "", None, [self.truth_tb], api_visibility="private")  # a new image: truth unknown

        def on_eval(selected, tasks, subset, state, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            try:
                tasks = (tasks or "").strip()
                if not tasks:
                    raise MergeError("give a tasks YAML for mergecore.eval (the synthetic demo has none)")
                from app.paths import tasks_file

                tasks = str(tasks_file(tasks, ctx.read_roots()))  # confined, and a tasks file: checked now
                models = paths_for(ctx, owner, state, selected)
                from mergecore.eval import parse_subset

                sub = parse_subset(subset) if (subset or "").strip() else None
                job = ctx.jobs.submit(owner, "eval", lambda jc: run_eval(jc, models, tasks, sub), title="evaluation",
                                      meta={"tasks": tasks})
            except MergeError as err:
                running = any(not j.done for j in ctx.jobs.jobs(owner, kind="eval"))
                if running:  # the running evaluation keeps its bar, its poll and its disabled button
                    gr.Warning(str(err))
                    return gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return gr.skip(), gr.Timer(active=False), progress_html(0, f"error: {err}", FAILED), gr.skip()
            return job.id, gr.Timer(active=True), progress_html(0, "starting ..."), gr.Button(interactive=False)

        self.eval_btn.click(on_eval, [self.models, self.tasks_tb, self.subset_tb, page.session_state,
                                      page.browser_key],
                            [self.eval_job, self.eval_timer, self.eval_progress, self.eval_btn], api_name="evaluate")

        # the Merge tab's history shows the scores once an evaluation is done
        history_out = [page.comps["merge_history"]] if "merge_history" in page.comps else []

        def on_poll_eval(job_id, key=None, request: gr.Request = None):
            owner = browser_owner(key, request)
            job = ctx.jobs.find(owner, job_id)
            skip_history = [gr.skip()] * len(history_out)
            if job is None:
                return gr.skip(), gr.skip(), gr.Timer(active=False), gr.Button(interactive=True), *skip_history
            snap = ctx.jobs.snapshot(owner, job_id)
            p = snap["progress"] or {}
            text = f"{p.get('task', '')} · {snap['meta'].get('model', '')} · {fmt_seconds(snap['elapsed'])}"
            if not job.done:
                return progress_html(snap["meta"].get("fraction"), text), gr.skip(), gr.skip(), gr.skip(), *skip_history
            enable = gr.Button(interactive=True)
            if job.status == DONE:
                table = [history.table(history.records(ctx.sessions, ctx.jobs, owner))] if history_out else []
                return (progress_html(1.0, f"done in {fmt_seconds(job.elapsed)}", DONE), job.result,
                        gr.Timer(active=False), enable, *table)
            return (progress_html(0, job.error or job.status, job.status), gr.skip(), gr.Timer(active=False), enable,
                    *skip_history)

        self.eval_timer.tick(on_poll_eval, [self.eval_job, page.browser_key],
                             [self.eval_progress, self.eval_df, self.eval_timer, self.eval_btn, *history_out],
                             api_name="poll_eval", concurrency_limit=None)

        def attach_eval(key, request: gr.Request):
            """The page (re)opens: the running evaluation, else the latest one's scores."""
            owner = browser_owner(key, request)
            running = [j for j in ctx.jobs.jobs(owner, kind="eval") if not j.done]
            if running:
                return (running[-1].id, gr.Timer(active=True), progress_html(0, "following the running evaluation ..."),
                        gr.skip(), gr.Button(interactive=False))
            last = history.latest_evaluation(ctx.sessions, owner)
            if not last or not last.get("rows"):
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last.get("created") or 0))
            return ("", gr.skip(), progress_html(1.0, f"the latest evaluation, of {when}", DONE),
                    pd.DataFrame(last["rows"]), gr.skip())

        page.on_load(attach_eval, [page.browser_key],
                     [self.eval_job, self.eval_timer, self.eval_progress, self.eval_df, self.eval_btn],
                     api_visibility="private")


# ---------------------------------------------------------------------------------------------
# the handlers' work (plain functions)


def paths_for(ctx: AppContext, owner: str, state: dict[str, Any], selected: list[str]) -> dict[str, str]:
    """Folders of the chosen models: the session's merges by name, else its source models."""
    if not selected:
        raise MergeError("choose the models to compare")
    merges = ctx.merges(owner)
    return {name: str(merges[name]) if name in merges else whole_model(state, name) for name in selected}


def whole_model(state: dict[str, Any], name: str) -> str:
    """The folder of a session model loaded whole; a base + adapter model is refused with the
    engine's one line (only merges apply an adapter: fold it with a passthrough merge first)."""
    from mergecore.io.source import adapter_ref_refused

    m = st.model_by_name(state, name)
    if st.adapter_sides(m["path"]):
        raise adapter_ref_refused(m["ref"])
    return m["path"]


def task_names(tasks: Any) -> list[str]:
    try:
        return list(cmp.task_heads(tasks)) if tasks else []
    except MergeError:
        return []


def compare(ctx: AppContext, owner: str, state, selected, prompt, ntok, image, head, *, task=None, truth=None,
            tasks=None):
    """(the comparison, the names of the merges among the models)."""
    models = paths_for(ctx, owner, state, selected)
    merged = {n for n in models if n in ctx.merges(owner)}
    merged_sel = [n for n in models if n in merged]
    ref = merged_sel[-1] if merged_sel else (state.get("base") if state.get("base") in models else None)
    kinds = {cmp.model_kind(p) for p in models.values()}
    trust = bool(state.get("trust_remote_code"))
    if kinds == {"image-classification"}:
        head_path, classes, prefix, note = None, None, None, ""
        if head == TASK_HEAD:
            if (tasks or "").strip():  # typed: confined, and checked as a tasks file first
                from app.paths import tasks_file

                tasks = str(tasks_file(tasks, ctx.read_roots()))
            heads = cmp.task_heads(tasks or (state.get("family") or {}).get("tasks") or "")
            if not task or task not in heads:
                raise MergeError("choose a task (its expert's head scores every body), or another classifier head"
                                 + (f"; tasks: {', '.join(heads)}" if heads else ": the tasks file names no heads"))
            head_path, classes, prefix = heads[task]["head"], heads[task]["classes"], heads[task]["prefix"]
            note = (f"Every model scored with the {task} head ({Path(head_path).name}) over the task's "
                    f"{len(classes) if classes else 'all'} classes, as the evaluator scores the task.")
        elif head and head != OWN_HEAD:
            head_path = whole_model(state, head)
            note = f"Every model scored with {head}'s classifier head."
        result = cmp.compare_classifiers(models, image, head_from=head_path, classes=classes, reference=ref,
                                         truth=(truth or "").strip() or None, trust_remote_code=trust, prefix=prefix)
        result["head_note"] = note
    elif kinds == {"causal-lm"}:
        result = cmp.compare_lms(models, prompt or "", new_tokens=int(ntok or 8), reference=ref,
                                 trust_remote_code=trust)
    else:
        raise MergeError("Compare handles causal LMs and image classifiers, one kind at a time; "
                         f"these models are: {', '.join(sorted(kinds))}")
    return result, merged


def run_eval(jc, models: dict[str, str], tasks: str, subset):
    """The evaluation job: every model scored on the tasks, one row each."""
    done, current = [0], [""]

    def progress(p):
        jc.emit(p.as_event())
        jc.meta["fraction"] = (done[0] + p.fraction) / len(models)
        jc.meta["model"] = current[0]

    rows = []
    for name, path in models.items():
        current[0] = name
        rows.append(cmp.evaluate_models({name: path}, tasks, subset=subset, progress=progress, cancel=jc.cancel,
                                        log=jc.log))
        done[0] += 1
    return pd.concat(rows, ignore_index=True)
