"""The Export tab: the recipe and a merged checkpoint of this session as downloads (files the
app wrote, served from its exports folder).

Named API endpoint: /export.
"""

from __future__ import annotations

from typing import Any, Optional

import gradio as gr

from mergecore.errors import MergeError

from app import forms
from app import state as st
from app.context import AppContext, Page, owner_of
from app.files import folder_bytes
from app.render import error_md


class ExportTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def build(self, page: Page) -> None:
        with gr.Tab("Export", id="export"):
            gr.Markdown("Download the recipe and a merged checkpoint (files this app wrote). Checkpoints "
                        f"over {st.human_bytes(self.ctx.workspace.zip_limit)} are not zipped: use their folder.")
            with gr.Row():
                page.comps["export_dd"] = self.merge_dd = gr.Dropdown(label="Merged checkpoint", choices=[],
                                                                      value=None, scale=3)
                self.export_btn = gr.Button("Prepare downloads", variant="primary", scale=1)
            self.status = gr.Markdown("", elem_id="export-status")
            with gr.Row():
                self.recipe_dl = gr.DownloadButton("Download recipe.yml", visible=False)
                self.ckpt_dl = gr.DownloadButton("Download checkpoint (.zip)", visible=False)

    def outputs(self, page: Page) -> list[Any]:
        return [self.merge_dd]

    def merges_view(self, state: dict[str, Any], owner: str):
        merges = list(self.ctx.merges(owner))
        return gr.Dropdown(choices=merges, value=merges[-1] if merges else None)

    def views(self, state: dict[str, Any], form: dict[str, Any], owner: str, **_: Any) -> list[Any]:
        return [self.merges_view(state, owner)]

    def wire(self, page: Page) -> None:
        def on_export(name, state, form, request: gr.Request):
            try:
                return export(self.ctx, owner_of(request), name, state, form)
            except MergeError as err:
                return error_md(err), gr.DownloadButton(visible=False), gr.DownloadButton(visible=False)

        self.export_btn.click(on_export, [self.merge_dd, page.session_state, page.form_state],
                              [self.status, self.recipe_dl, self.ckpt_dl], api_name="export")


def export(ctx: AppContext, owner: str, name: Optional[str], state, form):
    """(status, recipe download, checkpoint download) for the merge `name` (None: the form's recipe)."""
    ws = ctx.workspace
    if not name:
        rpath = ws.write_recipe(forms.recipe_yaml(form, state), "recipe")
        return ("No merged checkpoint chosen: the recipe is the current form's.",
                gr.DownloadButton(f"Download {rpath.name}", value=str(rpath), visible=True),
                gr.DownloadButton(visible=False))
    folder = ctx.merges(owner).get(name)
    if folder is None:
        raise MergeError(f"no finished merge called '{name}' in this session")
    recipe_file = folder / "mergecore_recipe.yml"
    text = recipe_file.read_text() if recipe_file.is_file() else forms.recipe_yaml(form, state)
    rpath = ws.write_recipe(text, f"{name}-recipe")
    z = ws.zip_checkpoint(folder, name)
    if z is None:
        status = (f"The checkpoint is {st.human_bytes(folder_bytes(folder))}, "
                  f"over the zip limit: it is in the folder `{folder}`.")
        ckpt = gr.DownloadButton(visible=False)
    else:
        status = f"Checkpoint `{name}` zipped ({st.human_bytes(z.stat().st_size)}); folder: `{folder}`."
        ckpt = gr.DownloadButton(f"Download {z.name}", value=str(z), visible=True)
    return status, gr.DownloadButton(f"Download {rpath.name}", value=str(rpath), visible=True), ckpt
