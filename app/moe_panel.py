"""The mixture-of-experts form in the Recipe tab (drawn inside its `gr.render` instead of the merge
method's parameter form): the base model, the experts (the session's models, ticked), a
positive-prompts box (one prompt per line) and an optional negative one per expert, gate_mode,
experts_per_token, dtype and, for Qwen2 bases, the shared expert. Each field is checked as it is
typed (`app.moe_form.set_field`; an error at the field), and the YAML view and the line under the
method follow; the engine checks the config whole there (`app.moe_form.views`). Every session
model has its prompt boxes, shown while it is ticked: changing the base, the experts or the shared
expert shows and hides fields (`layout`) and never draws the form again under the user's clicks."""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import gradio as gr

from mergecore.errors import MergeError

from app import moe_form
from app.moe_form import AS_BASE, DTYPES, NO_SHARED, SHARED
from app.recipe_views import field_error
from app.render import error_md

# Enter in a one-line field leaves it, so its value is taken once, by the blur handler
BLUR_ON_ENTER = "() => { if (document.activeElement) document.activeElement.blur(); }"
LAYOUT = ("base", "experts", "shared")  # fields that show or hide other fields (`layout`)
PROMPTS_INFO = "one prompt per line; \\n inside a line is a line break"
GATE_INFO = ("hidden: mean hidden states of the prompts at each layer (the base runs them); cheap_embed: their "
             "token embeddings; random: no prompts needed")
HELP = {"base": "attention, norms and embeddings come from it; it runs the prompts for hidden gates",
        "experts": "each ticked model's MLPs become one expert of every layer, in this order",
        "gate_mode": GATE_INFO, "experts_per_token": "how many experts each token goes through (top-k)",
        "dtype": "of the written checkpoint", "shared": "Qwen2-MoE: every token also goes through it"}


def elem_id(key: str) -> str:
    """The element id of a field (`moe-positive--code` for positive@code)."""
    return "moe-" + re.sub(r"[^\w-]", "_", key.replace("@", "--"))


def layout(moe: dict[str, Any], state: dict[str, Any]) -> list[Any]:
    """Updates of what the base, the experts and the shared expert decide: the shared expert's
    dropdown and prompt boxes (Qwen2 bases), a hint when no expert is ticked, and each session
    model's prompt boxes, shown with its place among the experts when it is one."""
    names = [m["name"] for m in state.get("models", [])]
    offered = moe_form.shared_offered(moe, state)
    shared = moe["shared"] if offered else None
    out = [gr.Dropdown(visible=offered, value=moe["shared"] or NO_SHARED), gr.Column(visible=shared is not None),
           f"**shared expert · {shared}**" if shared else "", gr.Markdown(visible=not moe["experts"])]
    for name in names:
        i = moe["experts"].index(name) if name in moe["experts"] else None
        out += [gr.Column(visible=i is not None), f"**expert {i} · {name}**" if i is not None else ""]
    return out


def render(form: dict[str, Any], state: dict[str, Any], page: Any, yaml_code: Any, status: Any) -> None:
    """The form's widgets, each wired to `on_field` (interactive: fields made inside `gr.render` are
    not unless told). Every session model has its prompt boxes, shown while it is an expert, so a
    change of the experts shows and hides them (`layout`) instead of drawing the form again."""
    moe = moe_form.sync(form.get("moe"), state)
    names = [m["name"] for m in state.get("models", [])]
    outputs = [page.form_state, yaml_code, status]
    placed: list[Any] = []  # layout's outputs, in its order

    def wire(comp: Any, key: str, events: list[Callable[..., Any]], text: bool = False) -> None:
        if text:
            comp.submit(None, None, None, js=BLUR_ON_ENTER)
        shown = [*outputs, *placed] if key in LAYOUT else [comp, *outputs]
        for ev in events:
            ev(on_field(key, len(placed)), [comp, page.form_state, page.session_state], shown,
               api_visibility="private")

    def prompts(key: str, entry: Optional[dict[str, Any]]) -> None:
        entry = entry or {"positive": [], "negative": []}
        pos = gr.Textbox(label="positive prompts", value=moe_form.prompts_text(entry["positive"]), lines=3,
                         max_lines=12, info=PROMPTS_INFO, elem_id=elem_id(f"positive@{key}"), interactive=True,
                         placeholder="text this expert should handle, one per line")
        neg = gr.Textbox(label="negative prompts (optional)", value=moe_form.prompts_text(entry["negative"]), lines=2,
                         max_lines=12, elem_id=elem_id(f"negative@{key}"), interactive=True,
                         placeholder="text it should not handle, one per line")
        wire(pos, f"positive@{key}", [pos.blur])
        wire(neg, f"negative@{key}", [neg.blur])

    with gr.Column(elem_id="form-moe"):  # whose form this is (tests wait for it)
        with gr.Row(equal_height=False):
            base = gr.Dropdown(label="Base model", choices=names, value=moe["base"], info=HELP["base"],
                               elem_id=elem_id("base"), interactive=True, scale=2)
            modes = list(moe_form.GATE_MODES) + ([moe["gate_mode"]] if moe["gate_mode"] not in moe_form.GATE_MODES
                                                 else [])
            gate = gr.Dropdown(label="gate_mode", choices=modes, value=moe["gate_mode"], info=GATE_INFO,
                               elem_id=elem_id("gate_mode"), interactive=True, scale=2)
            k = gr.Textbox(label="experts_per_token", value=str(moe["experts_per_token"]),
                           info=HELP["experts_per_token"], elem_id=elem_id("experts_per_token"), interactive=True,
                           scale=1)
            dtype = gr.Dropdown(label="dtype", choices=[AS_BASE, *DTYPES], value=moe["dtype"] or AS_BASE,
                                info=HELP["dtype"], elem_id=elem_id("dtype"), interactive=True, scale=1)
        experts = gr.CheckboxGroup(label="Experts", choices=names, value=moe["experts"], info=HELP["experts"],
                                   elem_id=elem_id("experts"), interactive=True)
        offered = moe_form.shared_offered(moe, state)
        shared = gr.Dropdown(label="Shared expert", choices=[NO_SHARED, *names], value=moe["shared"] or NO_SHARED,
                             info=HELP["shared"], elem_id=elem_id("shared"), interactive=True, visible=offered)
        with gr.Row(equal_height=False):
            with gr.Column(min_width=260, visible=offered and moe["shared"] is not None) as shared_group:
                shared_title = gr.Markdown(f"**shared expert · {moe['shared']}**" if moe["shared"] else "")
                prompts(SHARED, moe["shared_prompts"])
            hint = gr.Markdown("Tick the models that become experts.", visible=not moe["experts"])
            placed += [shared, shared_group, shared_title, hint]
            for name in names:
                i = moe["experts"].index(name) if name in moe["experts"] else None
                with gr.Column(min_width=260, visible=i is not None) as group:
                    title = gr.Markdown(f"**expert {i} · {name}**" if i is not None else "")
                    prompts(name, moe["prompts"].get(name))
                placed += [group, title]
        wire(base, "base", [base.input])
        wire(gate, "gate_mode", [gate.input])
        wire(k, "experts_per_token", [k.blur], text=True)
        wire(dtype, "dtype", [dtype.input])
        wire(experts, "experts", [experts.input])
        wire(shared, "shared", [shared.input])


def on_field(key: str, n_layout: int) -> Callable[..., tuple]:
    """The handler of one field: the value checked and stored (or its error at the field, the form
    unchanged), the YAML and the line under the method following; the base, the experts and the
    shared expert also show and hide the fields they decide (`layout`, `n_layout` outputs)."""
    placed = key in LAYOUT

    def handler(raw, form, state):
        skip = (gr.skip(),) * 3
        info = HELP.get(key.split("@")[0], PROMPTS_INFO if key.startswith("positive") else None)
        try:
            new = moe_form.set_field(form, state, key, raw)
        except MergeError as err:
            if placed:  # said under the method (and as a toast)
                gr.Warning(str(err))
                return (*skip[:2], error_md(err), *(gr.skip(),) * n_layout)
            return (field_error(err), *skip)
        ok = () if placed else (gr.update(info=info, elem_classes=[]),)
        rest = tuple(layout(new["moe"], state)) if placed else ()
        if new["moe"] == moe_form.sync((form or {}).get("moe"), state):
            return (*ok, *skip, *rest)  # as it was (a dropdown reports twice)
        yaml_text, status = moe_form.views(new, state)
        return (*ok, new, yaml_text, status, *rest)

    return handler
