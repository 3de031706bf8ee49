"""The Gradio app: `build_app(ctx) -> gr.Blocks` puts the tabs (`app.tabs.*`) on one page.

Tabs: Models, Recipe, Merge, Search, Compare, Export; each is one module that builds its
components and connects its events over the shared `app.context.Page`. Long work (Hub
downloads, merges, searches, evaluations) runs as background jobs (`app.jobs`); a `gr.Timer`
per tab polls the job's snapshot while it runs. Per-session data lives in `gr.State` (models,
the recipe form, job ids); the job manager keys jobs by the session's id, so two browser
sessions never see each other's jobs. Searches are keyed by the browser instead (a random key
in `gr.BrowserState`), so a reload or a second tab shows the running search.

When the session changes (models, base, recipe), every tab's views follow: the page's refresh
asks each tab for the values of its components (`outputs` / `views`), in tab order.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import forms
from app import state as st
from app.context import AppContext, Page, make_context, owner_of
from app.render import CSS
from app.tabs.compare import CompareTab
from app.tabs.export import ExportTab
from app.tabs.merge import MergeTab
from app.tabs.models import ModelsTab, family_text
from app.tabs.recipe import RecipeTab
from app.tabs.search import SearchTab

def build_app(ctx: AppContext) -> gr.Blocks:
    models, recipe, merge, search, compare, export = (ModelsTab(ctx), RecipeTab(ctx), MergeTab(ctx), SearchTab(ctx),
                                                      CompareTab(ctx), ExportTab(ctx))
    with gr.Blocks(title="mergecore", delete_cache=(3600, 3600 * 6)) as blocks:
        page = Page(ctx, blocks=blocks, session_state=gr.State(st.new_session()), form_state=gr.State({}),
                    form_version=gr.Number(value=0, visible=False),
                    browser_key=gr.BrowserState("", storage_key="mergecore-browser", secret=ctx.workspace.secret()))
        gr.Markdown("# mergecore\nMerge models from recipes: pick models, shape the parameters per layer, "
                    "merge in the background, search for merges, compare the outputs and export.")
        page.comps["family_md"] = gr.Markdown(family_text(None))
        with gr.Tabs() as tabs:
            page.comps["tabs"] = tabs
            for tab in (models, recipe, merge, search, compare, export):
                tab.build(page)

        views = (models, recipe, compare, export)  # the tabs that show the session, in the refresh's order
        page.outputs = [page.session_state, page.form_state, page.form_version]
        for tab in views:
            page.outputs += tab.outputs(page)
        page.merges_outputs = [compare.models, export.merge_dd]

        def refresh(state, form, version, request, *, key=None, group="attn", status=None):
            """Values for every output of the session's views, in `page.outputs` order (+ status)."""
            state = state or st.new_session()
            form = forms.filled(form, state)
            owner = owner_of(request)
            values: list[Any] = []
            for tab in views:
                values += tab.views(state, form, owner, key=key, group=group)
            return (state, form, (version or 0) + 1, *values, status if status is not None else "")

        page.refresh = refresh
        page.merges_views = lambda state, owner: (compare.merges_view(state, owner), export.merges_view(state, owner))
        for tab in (models, recipe, merge, search, compare, export):
            tab.wire(page)

        def on_unload(request: gr.Request):
            ctx.jobs.cancel_owner(owner_of(request))

        blocks.unload(on_unload)
    return blocks


def launch_kwargs(ctx: AppContext) -> dict[str, Any]:
    """Arguments for `demo.launch` (Gradio 6 takes theme and css there). Uploads are capped at
    the YAML size limit: the app takes recipe files and images, nothing larger."""
    from mergecore.yamlio import MAX_YAML_BYTES

    gr.set_static_paths([str(ctx.workspace.exports)])
    return {"css": CSS, "theme": gr.themes.Soft(), "allowed_paths": [str(ctx.workspace.exports)],
            "max_file_size": MAX_YAML_BYTES}


__all__ = ["AppContext", "build_app", "launch_kwargs", "make_context"]
