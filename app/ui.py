"""The Gradio app: `build_app(ctx) -> gr.Blocks` puts the tabs (`app.tabs.*`) on one page.

Tabs: Models, Recipe, Merge, Search, Compare, Export; each is one module that builds its
components and connects its events over the shared `app.context.Page`. Long work (Hub
downloads, merges, searches, evaluations) runs as background jobs (`app.jobs`); a `gr.Timer`
per tab polls the job's snapshot while it runs.

The session belongs to the browser (a random key in `gr.BrowserState`), not to the page: when
the page opens, its first event gives the browser a key if it has none, binds the page to it
and restores the browser's saved session (`app.session`: models, the recipe form; the tabs read
the merge history and evaluations themselves); every change of the models or the form is saved
back. Jobs, merges and searches belong to the browser too, so a reload, a second tab or a
restarted app shows the same session, and a running merge or search goes on through a reload.
Another browser sees none of it. The page's own state (`gr.State`) is a copy for its handlers.

When the session changes (models, base, recipe), every tab's views follow: the page's refresh
asks each tab for the values of its components (`outputs` / `views`), in tab order.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import forms
from app import state as st
from app.context import (AppContext, Page, bind_browser, make_context, new_browser_key, owner_of, page_of, unbind_page,
                         valid_key)
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
        wire_session(ctx, page)
        for tab in (models, recipe, merge, search, compare, export):
            tab.wire(page)

        def on_unload(request: gr.Request):
            # what belongs to the browser goes on (another tab, or this one after a reload, follows it);
            # only jobs of a page that never got a browser key end with it
            unbind_page(request)
            ctx.jobs.cancel_owner(page_of(request))

        blocks.unload(on_unload)
    return blocks


def wire_session(ctx: AppContext, page: Page) -> None:
    """The page's first event (the browser's key, the page bound to it, its saved session), and
    the saving of every change of the models or the recipe form."""

    def restore(key, request: gr.Request):
        from app.session import restore_page

        if not valid_key(key):
            key = new_browser_key()
        owner = bind_browser(request, key)
        state, form, warning = restore_page(ctx.sessions, owner, ctx.read_roots())
        if warning:
            gr.Warning(warning)
        if state is None:
            return key, gr.skip(), gr.skip()
        return key, state, form

    page.load_event = page.blocks.load(restore, [page.browser_key],
                                       [page.browser_key, page.session_state, page.form_state],
                                       api_visibility="private")

    def save(key, state, form, request: gr.Request):
        if valid_key(key) and state is not None:
            ctx.sessions.save_page(bind_browser(request, key), state, form or {})

    for comp in (page.session_state, page.form_state):
        comp.change(save, [page.browser_key, page.session_state, page.form_state], None,
                    api_visibility="private", trigger_mode="always_last", concurrency_limit=None)


def launch_kwargs(ctx: AppContext) -> dict[str, Any]:
    """Arguments for `demo.launch` (Gradio 6 takes theme and css there). Uploads are capped at
    the YAML size limit: the app takes recipe files and images, nothing larger."""
    from mergecore.yamlio import MAX_YAML_BYTES

    gr.set_static_paths([str(ctx.workspace.exports)])
    return {"css": CSS, "theme": gr.themes.Soft(), "allowed_paths": [str(ctx.workspace.exports)],
            "max_file_size": MAX_YAML_BYTES}


__all__ = ["AppContext", "build_app", "launch_kwargs", "make_context"]
