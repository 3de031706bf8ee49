"""The Export tab: a merged checkpoint of this session as a zip that replays anywhere, its recipe
as a download, and a push to the Hugging Face Hub.

What an export ships (the engine decides: `mergecore.side_files.portable_checkpoint`): the
checkpoint, its recipe with Hub models by id, local models as `models/<folder name>` relative to
the recipe (the card and this tab say where to put them) and every artifact inside
(`artifacts/`), and a model card with the scores of the session's latest evaluation of the merge.
`mergecore merge <name>/mergecore_recipe.yml OUT` in the unzipped folder gives the same tensors.
A mixture of experts ships its config the same way (`mergecore.moe.portable.portable_moe`):
`mergecore moe <name>/mergecore_moe.yml OUT` builds it again.

Named API endpoints: /export, /push_hub, /poll_push.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import gradio as gr

from mergecore.errors import MergeError
from mergecore.io.adapter import source_folders
from mergecore.side_files import CARD_FILE, RECIPE_FILE, PortableCheckpoint, portable_checkpoint

from app import forms, moe_form
from app import state as st
from app.context import AppContext, Page, owner_of
from app.files import folder_bytes
from app.jobs import DONE
from app.render import error_md


class ExportTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def build(self, page: Page) -> None:
        with gr.Tab("Export", id="export"):
            gr.Markdown("Download a merged checkpoint as a zip that replays anywhere (its recipe names local models "
                        "relative to it and carries its artifacts; the model card has the recipe and the scores of "
                        "its latest evaluation), or push it to the Hugging Face Hub. Checkpoints over "
                        f"{st.human_bytes(self.ctx.workspace.zip_limit)} are not zipped: use their folder.")
            with gr.Row():
                page.comps["export_dd"] = self.merge_dd = gr.Dropdown(label="Merged checkpoint", choices=[],
                                                                      value=None, scale=3)
                self.export_btn = gr.Button("Prepare downloads", variant="primary", scale=1)
            self.status = gr.Markdown("", elem_id="export-status")
            with gr.Row():
                self.recipe_dl = gr.DownloadButton("Download recipe.yml", visible=False)
                self.ckpt_dl = gr.DownloadButton("Download checkpoint (.zip)", visible=False, elem_id="export-zip")
            gr.Markdown("### Push to the Hugging Face Hub\nUses `HF_TOKEN` or the login stored by `hf auth login` "
                        "where the app runs; the repository is created if it does not exist.")
            with gr.Row():
                self.repo_tb = gr.Textbox(label="Repository (org/name)", placeholder="your-name/my-merge", scale=3,
                                          elem_id="export-repo")
                self.private_cb = gr.Checkbox(label="Private", value=True, scale=1, elem_id="export-private")
                self.push_btn = gr.Button("Push", scale=1, elem_id="export-push")
            self.push_status = gr.Markdown("", elem_id="export-push-status")
            self.push_log = gr.Textbox(label="Push log", lines=4, max_lines=12, autoscroll=True,
                                       elem_id="export-push-log")
            self.push_timer = gr.Timer(0.5, active=False)
            self.push_job = gr.State("")

    def outputs(self, page: Page) -> list[Any]:
        return [self.merge_dd]

    def merges_view(self, state: dict[str, Any], owner: str):
        merges = list(self.ctx.merges(owner))
        return gr.Dropdown(choices=merges, value=merges[-1] if merges else None)

    def views(self, state: dict[str, Any], form: dict[str, Any], owner: str, **_: Any) -> list[Any]:
        return [self.merges_view(state, owner)]

    def wire(self, page: Page) -> None:
        ctx = self.ctx

        def on_export(name, state, form, request: gr.Request):
            try:
                return export(ctx, owner_of(request), name, state, form)
            except (MergeError, OSError) as err:
                return error_md(err), gr.DownloadButton(visible=False), gr.DownloadButton(visible=False)

        self.export_btn.click(on_export, [self.merge_dd, page.session_state, page.form_state],
                              [self.status, self.recipe_dl, self.ckpt_dl], api_name="export")

        def on_push(name, repo, private, request: gr.Request):
            try:
                job = start_push(ctx, owner_of(request), name, repo, bool(private))
            except MergeError as err:
                return error_md(err), gr.skip(), gr.Timer(active=False), "", gr.skip()
            return (f"Pushing `{job.meta['name']}` to `{job.meta['repo']}` ...", job.id, gr.Timer(active=True), "",
                    gr.Button(interactive=False))  # off until this push ends

        self.push_btn.click(on_push, [self.merge_dd, self.repo_tb, self.private_cb],
                            [self.push_status, self.push_job, self.push_timer, self.push_log, self.push_btn],
                            api_name="push_hub")

        def on_poll(job_id, request: gr.Request):
            owner = owner_of(request)
            job = ctx.jobs.find(owner, job_id)
            if job is None:
                return gr.skip(), gr.skip(), gr.Timer(active=False), gr.Button(interactive=True)
            log_text = "\n".join(ctx.jobs.snapshot(owner, job_id)["log"][-200:])
            if not job.done:
                return gr.skip(), log_text, gr.skip(), gr.skip()
            if job.status == DONE:
                status = f"Pushed `{job.meta['name']}` to [{job.result}]({job.result})."
            else:
                status = error_md(MergeError(job.error or job.status))
            return status, log_text, gr.Timer(active=False), gr.Button(interactive=True)

        self.push_timer.tick(on_poll, [self.push_job],
                             [self.push_status, self.push_log, self.push_timer, self.push_btn],
                             api_name="poll_push", concurrency_limit=None)


# ---------------------------------------------------------------------------------------------
# the handlers' work (plain functions)


def merge_folder(ctx: AppContext, owner: str, name: Optional[str]) -> Path:
    folder = ctx.merges(owner).get(name or "")
    if folder is None:
        raise MergeError(f"no finished merge called '{name}' in this session" if name else
                         "choose a merged checkpoint first (the Merge tab makes one)")
    return folder


def merge_scores(ctx: AppContext, owner: str, name: str) -> Optional[list[dict[str, Any]]]:
    """The rows of this session's latest evaluation that scored the merge `name` (Compare's
    Evaluate, or the scores of a search's replay), else those its merge history kept, or None."""
    found = None
    for job in ctx.jobs.jobs(owner, status=DONE):
        table = job.result if job.kind == "eval" else job.meta.get("scores") if job.kind == "merge" else None
        rows = table_rows(table)
        if any(r.get("model") == name for r in rows):
            found = rows
    return found if found is not None else recorded_scores(ctx, owner, name)


def recorded_scores(ctx: AppContext, owner: str, name: str) -> Optional[list[dict[str, Any]]]:
    """The scores the merge history keeps for `name` (once the app restarted, the jobs are gone)."""
    try:
        from app import history

        recs = history.records(ctx.sessions, ctx.jobs, owner)
    except (ImportError, AttributeError, MergeError, OSError):  # no history (yet) to ask
        return None
    scores = next((r.get("scores") for r in reversed(recs) if r.get("name") == name and r.get("scores")), None)
    return [{"model": name, **scores}] if isinstance(scores, dict) else None


def table_rows(table: Any) -> list[dict[str, Any]]:
    """A DataFrame (or Gradio's {headers, data}) as a list of row dicts."""
    if table is None:
        return []
    if hasattr(table, "to_dict"):
        return [dict(r) for r in table.to_dict("records")]
    if isinstance(table, dict) and "headers" in table:
        return [dict(zip(table["headers"], row)) for row in table.get("data") or []]
    return [dict(r) for r in table if isinstance(r, dict)] if isinstance(table, list) else []


def portable(ctx: AppContext, owner: str, name: str, folder: Path, *, hub_only: bool = False) -> PortableCheckpoint:
    """The engine's export of the merge `name`: where its merge found models and artifacts (the
    merge job's plan, while the app runs), the scores of its latest evaluation."""
    job = next((j for j in reversed(ctx.jobs.jobs(owner, kind="merge", status=DONE)) if j.meta.get("name") == name),
               None)
    plan = getattr(getattr(job, "result", None), "plan", None)
    paths = source_folders(plan.sources) if plan is not None else None
    if not (folder / RECIPE_FILE).is_file():
        raise MergeError(f"the merge '{name}' has no {RECIPE_FILE} in its folder; merge it again to export it")
    return portable_checkpoint(folder, paths=paths, artifacts=plan.artifacts if plan is not None else None,
                               scores=merge_scores(ctx, owner, name), title=name, hub_only=hub_only)


def export(ctx: AppContext, owner: str, name: Optional[str], state, form):
    """(status, recipe download, checkpoint download) for the merge `name` (None: the form's recipe)."""
    ws = ctx.workspace
    if not name:
        on = moe_form.is_on(form)
        text = moe_form.config_yaml(form, state) if on else forms.recipe_yaml(form, state)
        rpath = ws.write_recipe(text, "moe" if on else "recipe")
        return ("No merged checkpoint chosen: the recipe is the current form's (paths as on this machine).",
                gr.DownloadButton(f"Download {rpath.name}", value=str(rpath), visible=True),
                gr.DownloadButton(visible=False))
    folder = merge_folder(ctx, owner, name)
    if moe_folder(folder):
        return export_moe(ctx, name, folder)
    exp = portable(ctx, owner, name, folder)
    rpath = ws.write_recipe(exp.recipe_text, f"{name}-recipe")
    z = ws.zip_checkpoint(folder, name, replace={RECIPE_FILE: exp.recipe_text, CARD_FILE: exp.card}, extra=exp.files)
    if z is None:
        status = (f"The checkpoint is {st.human_bytes(folder_bytes(folder))}, "
                  f"over the zip limit: it is in the folder `{folder}`.")
        ckpt = gr.DownloadButton(visible=False)
    else:
        status = (f"Checkpoint `{name}` zipped ({st.human_bytes(z.stat().st_size)}); folder: `{folder}`. "
                  f"Replay it with `mergecore merge {z.stem}/{RECIPE_FILE} OUT` where it is unzipped"
                  + (" (its artifacts are inside)" if exp.recipe.artifacts else "") + ".")
        ckpt = gr.DownloadButton(f"Download {z.name}", value=str(z), visible=True)
    if exp.local_models:
        status += ("\n\nIts recipe names local models relative to itself; put (or link) each folder there first:\n"
                   + "\n".join(f"- `{ref}` ← `{where}`" for ref, where in exp.local_models.items()))
    return status, gr.DownloadButton(f"Download {rpath.name}", value=str(rpath), visible=True), ckpt


def moe_folder(folder: Path) -> bool:
    """Whether `folder` holds a mixture of experts (its config beside the weights)."""
    from mergecore.moe.build import CONFIG_FILE

    return (folder / CONFIG_FILE).is_file() and not (folder / RECIPE_FILE).is_file()


def moe_files(folder: Path) -> tuple[Any, dict[str, str]]:
    """(the engine's portable export of a mixture, the files it replaces in the folder's copy)."""
    from mergecore.moe.build import CONFIG_FILE
    from mergecore.moe.portable import portable_moe

    exp = portable_moe(folder)
    return exp, {CONFIG_FILE: exp.config_text, CARD_FILE: exp.card}


def export_moe(ctx: AppContext, name: str, folder: Path):
    """(status, config download, checkpoint download) for a mixture of experts: its config with
    local models relative to it (`models/<name>`), zipped with the weights."""
    from mergecore.moe.build import CONFIG_FILE

    ws = ctx.workspace
    exp, replace = moe_files(folder)
    cpath = ws.write_recipe(exp.config_text, f"{name}-moe")
    z = ws.zip_checkpoint(folder, name, replace=replace)
    if z is None:
        status = (f"The checkpoint is {st.human_bytes(folder_bytes(folder))}, over the zip limit: it is in the "
                  f"folder `{folder}`.")
        ckpt = gr.DownloadButton(visible=False)
    else:
        status = (f"Mixture of experts `{name}` zipped ({st.human_bytes(z.stat().st_size)}); folder: `{folder}`. "
                  f"Build it again with `mergecore moe {z.stem}/{CONFIG_FILE} OUT` where it is unzipped.")
        ckpt = gr.DownloadButton(f"Download {z.name}", value=str(z), visible=True)
    if exp.local_models:
        status += ("\n\nIts config names local models relative to itself; put (or link) each folder there first:\n"
                   + "\n".join(f"- `{ref}` ← `{where}`" for ref, where in exp.local_models.items()))
    return status, gr.DownloadButton(f"Download {cpath.name}", value=str(cpath), visible=True), ckpt


def start_push(ctx: AppContext, owner: str, name: Optional[str], repo: Optional[str], private: bool):
    """Check the input and the token now (one line each), then push the export in the background."""
    from app import hub

    folder = merge_folder(ctx, owner, name)
    repo_id = hub.check_repo_id(repo)
    token = hub.hub_token()

    def run(jc):
        jc.log(f"preparing {name} (recipe with relative paths, artifacts, model card) ...")
        if moe_folder(folder):  # a mixture of experts: its config made portable
            staged = ctx.workspace.stage_checkpoint(folder, name, replace=moe_files(folder)[1])
        else:
            exp = portable(ctx, owner, name, folder, hub_only=True)
            staged = ctx.workspace.stage_checkpoint(folder, name, replace={RECIPE_FILE: exp.recipe_text,
                                                                           CARD_FILE: exp.card}, extra=exp.files)
        try:
            jc.check()
            return hub.push_folder(staged, repo_id, private=private, token=token, log=jc.log)
        finally:
            ctx.workspace.remove_staged(staged)

    return ctx.jobs.submit(owner, "push", run, title=f"push {name} to {repo_id}", slot="hub",
                           meta={"name": name, "repo": repo_id})
