"""The Recipe tab's mixture-of-experts form (`mergecore moe` in the app), as plain functions: its
state, each field's value checked as it is typed, the mergekit-moe config it gives (checked by the
engine: `mergecore.moe.config.moe_config_from_dict`), and a config imported from YAML. No Gradio
here; `app.moe_panel` draws it, the Merge tab builds it (`app.moe_job`).

It lives in the recipe form (`app.forms`) under "moe", beside the merge method's form, which it
leaves as it is (choosing a method again goes back to that)::

    form["moe"] = {"on": True, "base": "base", "experts": ["code", "story"],
                   "prompts": {"code": {"positive": ["def f():"], "negative": [], "extra": {}}, ...},
                   "gate_mode": "hidden", "experts_per_token": 2, "dtype": None,   # None: the base's
                   "shared": None, "shared_prompts": {"positive": [], "negative": [], "extra": {}},
                   "extra": {}}   # other keys of an imported config (seed, architecture)

Models are the session's, by name, each at most once as an expert (an expert's `extra`: an imported
config's noise_scale / residual_scale); the config names them by reference. Prompts are typed one
per line; `\\n` inside a line is a line break of the prompt (and `\\\\` a backslash).
"""

from __future__ import annotations

import copy
import re
from typing import Any, Optional, Sequence

from mergecore.errors import MergeError, short

MOE = "moe"
LABEL = "moe (mixture of experts)"
GATE_MODES = ("hidden", "cheap_embed", "random")  # offered; an imported config may use the engine's others
DTYPES = ("float32", "float16", "bfloat16")
AS_BASE = "as the base"
NO_SHARED = "none"
SHARED = "shared"  # the prompt fields of the shared expert: positive@shared / negative@shared
KEPT_KEYS = ("architecture", "seed")  # config keys the form keeps as imported
EXPERT_KEPT = ("noise_scale", "residual_scale")


def is_on(form: Optional[dict[str, Any]]) -> bool:
    """Whether the recipe form is on the mixture of experts (rather than its merge method)."""
    moe = (form or {}).get("moe")
    return isinstance(moe, dict) and moe.get("on") is True


def text_prompts(text: Any) -> list[str]:
    """Prompts typed one per line (blank lines skipped; `\\n` a line break, `\\\\` a backslash)."""
    out = []
    for line in str(text or "").splitlines():
        if line.strip():
            out.append(re.sub(r"\\([\\n])", lambda m: "\n" if m.group(1) == "n" else "\\", line))
    return out


def prompts_text(prompts: Sequence[str]) -> str:
    """`text_prompts`' inverse: one prompt per line."""
    return "\n".join(p.replace("\\", "\\\\").replace("\n", "\\n") for p in prompts)


def _strings(v: Any) -> list[str]:
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []


def _entry(v: Any) -> dict[str, Any]:
    v = v if isinstance(v, dict) else {}
    extra = v.get("extra") if isinstance(v.get("extra"), dict) else {}
    return {"positive": _strings(v.get("positive")), "negative": _strings(v.get("negative")),
            "extra": {k: x for k, x in extra.items() if k in EXPERT_KEPT and isinstance(x, (int, float))}}


def _names(state: dict[str, Any]) -> list[str]:
    return [m["name"] for m in (state or {}).get("models", [])]


def base_type(state: dict[str, Any], name: Optional[str]) -> Optional[str]:
    """The `model_type` of the session model `name` (None when it cannot be read)."""
    from app.state import model_by_name, open_source

    try:
        mt = open_source(model_by_name(state, name or "")["path"]).config.get("model_type")
    except MergeError:
        return None
    return mt if isinstance(mt, str) else None


def needs_shared(state: dict[str, Any], base: Optional[str]) -> bool:
    """Whether the base makes a mixture with one shared expert (the engine's rule: Qwen2 bases)."""
    from mergecore.moe.arch import needs_shared_expert

    mt = base_type(state, base)
    return mt is not None and needs_shared_expert(mt)


def shared_offered(moe: dict[str, Any], state: dict[str, Any]) -> bool:
    """The form shows the shared expert for Qwen2 bases, and when one was chosen (an import)."""
    return moe.get("shared") is not None or needs_shared(state, moe.get("base"))


def sync(moe: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The form over the session's models as they are now (of any data: a saved session's is read
    back through it): models that left are dropped, a missing base is the session's base (or its
    first model), and a new form takes every other model as an expert, the base as the shared one
    where the base needs one."""
    from mergecore.moe.config import GATE_MODES as ENGINE_MODES

    names = _names(state)
    moe = moe if isinstance(moe, dict) else {}
    fresh = not isinstance(moe.get("experts"), list)
    base = next((b for b in (moe.get("base"), (state or {}).get("base"), *names[:1]) if b in names), None)
    experts = list(dict.fromkeys(n for n in _strings(moe.get("experts")) if n in names))
    if fresh:
        experts = [n for n in names if n != base]
    prompts = moe.get("prompts") if isinstance(moe.get("prompts"), dict) else {}
    k = moe.get("experts_per_token")
    extra = moe.get("extra") if isinstance(moe.get("extra"), dict) else {}
    shared = moe.get("shared") if moe.get("shared") in names else None
    if fresh and shared is None and needs_shared(state, base):
        shared = base  # the usual choice
    return {"on": moe.get("on") is True, "base": base, "experts": experts,
            "prompts": {n: _entry(p) for n, p in prompts.items() if n in names},
            "gate_mode": moe.get("gate_mode") if moe.get("gate_mode") in ENGINE_MODES else "hidden",
            "experts_per_token": k if isinstance(k, int) and not isinstance(k, bool) else min(2, max(1, len(experts))),
            "dtype": moe.get("dtype") if moe.get("dtype") in DTYPES else None, "shared": shared,
            "shared_prompts": _entry(moe.get("shared_prompts")),
            "extra": {k: v for k, v in extra.items() if k in KEPT_KEYS and isinstance(v, (str, int))}}


def switch(form: Optional[dict[str, Any]], state: dict[str, Any], on: bool) -> dict[str, Any]:
    """The recipe form on the mixture (`on`) or back on its merge method; the other part kept."""
    form = copy.deepcopy(form or {})
    form["moe"] = {**sync(form.get("moe"), state), "on": on}
    return form


def models_used(form: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """The session models the mixture takes: its base, experts and shared expert."""
    moe = sync(form.get("moe"), state)
    used = [moe["base"], *moe["experts"], moe["shared"] if shared_offered(moe, state) else None]
    return list(dict.fromkeys(n for n in used if n))


def _whole(raw: Any) -> int:
    try:
        f = float(str(raw).strip())
    except ValueError:
        f = float("nan")
    if not f.is_integer() or f < 1:
        raise MergeError(f"experts_per_token: give a whole number of at least 1, got '{short(raw, 20)}'")
    return int(f)


def set_field(form: dict[str, Any], state: dict[str, Any], key: str, raw: Any) -> dict[str, Any]:
    """The form with one field's typed value, checked (a MergeError at the field if refused):
    base, experts, gate_mode, experts_per_token, dtype, shared, positive@<expert> / negative@<expert>
    (`shared` for the shared expert's prompts)."""
    from mergecore.moe.config import GATE_MODES as ENGINE_MODES

    moe = sync(form.get("moe"), state)
    names = _names(state)
    if key in ("base", "shared"):
        if raw in (None, "", NO_SHARED) and key == "shared":
            moe["shared"] = None
        elif raw not in names:
            raise MergeError(f"{key}: '{short(raw, 60)}' is not a model of this session (Models tab)")
        else:
            moe[key] = raw
            if key == "base" and moe["shared"] is None and needs_shared(state, raw):
                moe["shared"] = raw
    elif key == "experts":
        chosen = list(raw or [])
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise MergeError(f"experts: '{short(unknown[0], 60)}' is not a model of this session (Models tab)")
        moe["experts"] = [n for n in moe["experts"] if n in chosen] + [n for n in chosen if n not in moe["experts"]]
    elif key == "gate_mode":
        if raw not in ENGINE_MODES:
            raise MergeError(f"gate_mode: '{short(raw, 40)}' is not one of {', '.join(GATE_MODES)}")
        moe["gate_mode"] = raw
    elif key == "experts_per_token":
        moe["experts_per_token"] = _whole(raw)
    elif key == "dtype":
        if raw not in (None, "", AS_BASE, *DTYPES):
            raise MergeError(f"dtype: '{short(raw, 40)}' is not one of {', '.join(DTYPES)}")
        moe["dtype"] = raw if raw in DTYPES else None
    elif key.split("@")[0] in ("positive", "negative") and "@" in key:
        kind, name = key.split("@", 1)
        entry = moe["shared_prompts"] if name == SHARED else moe["prompts"].setdefault(name, _entry(None))
        entry[kind] = text_prompts(raw)
    else:
        raise MergeError(f"'{short(key, 40)}' is not a field of the mixture-of-experts form")
    form = copy.deepcopy(form)
    form["moe"] = moe
    return form


def config_dict(form: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The mergekit-moe config the form describes (models by reference), not yet checked."""
    moe = sync(form.get("moe"), state)
    refs = {m["name"]: m["ref"] for m in (state or {}).get("models", [])}
    if not refs:
        raise MergeError("add models first (Models tab)")
    if moe["base"] is None:
        raise MergeError("choose the mixture's base model")

    def expert(name: str, entry: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"source_model": refs[name]}
        if entry["positive"]:
            out["positive_prompts"] = list(entry["positive"])
        if entry["negative"]:
            out["negative_prompts"] = list(entry["negative"])
        return {**out, **entry["extra"]}

    data: dict[str, Any] = {"base_model": refs[moe["base"]],
                            "experts": [expert(n, moe["prompts"].get(n) or _entry(None)) for n in moe["experts"]],
                            "gate_mode": moe["gate_mode"]}
    if moe["dtype"]:
        data["dtype"] = moe["dtype"]
    data["experts_per_token"] = moe["experts_per_token"]
    if moe["shared"] is not None and shared_offered(moe, state):
        data["shared_experts"] = [expert(moe["shared"], moe["shared_prompts"])]
    data.update(moe["extra"])
    return data


def build_config(form: dict[str, Any], state: dict[str, Any]):
    """The form's config checked whole by the engine (a `MoEConfig`; one MergeError line if not)."""
    from mergecore.moe.config import moe_config_from_dict

    return moe_config_from_dict(config_dict(form, state))


def config_yaml(form: dict[str, Any], state: dict[str, Any]) -> str:
    """The form's config as YAML (the engine's, as `build_moe` writes it beside the weights)."""
    from mergecore.moe.config import moe_config_yaml

    return moe_config_yaml(build_config(form, state))


def method_text() -> str:
    return ("**moe** — a mixture of experts (`mergecore moe`, mergekit-moe's config): the base's attention, norms "
            "and embeddings, each expert's MLPs in every layer, and a router whose rows come from each expert's "
            "prompts. Build it on the **Merge** tab.")


def views(form: dict[str, Any], state: dict[str, Any]) -> tuple[Any, str]:
    """(YAML, status line) of the form: the config as the engine writes it, or, while the engine
    refuses it, the form's YAML as it stands and the engine's one line."""
    import yaml

    from mergecore.moe.config import moe_config_from_dict, moe_config_yaml

    from app.render import error_md

    if not (state or {}).get("models"):
        return "", "Add models on the Models tab (or load the demo)."
    try:
        data = config_dict(form, state)
    except MergeError as err:
        return "", error_md(err)
    try:
        config = moe_config_from_dict(data)
    except MergeError as err:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True), error_md(err)
    moe = sync(form.get("moe"), state)
    shared = f" + shared expert `{moe['shared']}`" if config.shared_experts else ""
    return moe_config_yaml(config), (f"Mixture of {len(config.experts)} experts{shared} on `{moe['base']}` "
                                     f"({config.experts_per_token} per token, {config.gate_mode} gates): build it "
                                     f"on the **Merge** tab.")


def config_form(config, state: dict[str, Any], form: dict[str, Any], where: str = "moe config"
                ) -> tuple[dict[str, Any], list[str]]:
    """(form, notes): `form` on the mixture a checked `MoEConfig` describes, whose models are in
    `state` already (`app.forms.import_recipe` loads them)."""
    from app.state import find_model

    def name_of(ref: str) -> str:
        m = find_model(state, ref)
        if m is None:
            raise MergeError(f"model {short(ref)} of the config is not loaded")
        return m["name"]

    def entry(e) -> dict[str, Any]:
        return _entry({"positive": e.positive_prompts or [], "negative": e.negative_prompts or [],
                       "extra": {k: getattr(e, k) for k in EXPERT_KEPT if getattr(e, k) is not None}})

    experts = [name_of(e.source_model) for e in config.experts]
    for i, name in enumerate(experts):
        if name in experts[:i]:
            raise MergeError(f"{where}: experts.{i} is {name} again (experts.{experts.index(name)}); the form takes "
                             f"each model once as an expert (build such a mixture with mergecore moe)")
    notes = []
    shared = (config.shared_experts or [None])[0]
    if len(config.shared_experts or []) > 1:
        notes.append("only the first shared expert is kept (a Qwen2-MoE model has one)")
    moe = {"on": True, "base": name_of(config.base_model), "experts": experts,
           "prompts": {n: entry(e) for n, e in zip(experts, config.experts)}, "gate_mode": config.gate_mode,
           "experts_per_token": config.experts_per_token, "dtype": config.dtype,
           "shared": name_of(shared.source_model) if shared else None,
           "shared_prompts": entry(shared) if shared else _entry(None),
           "extra": {k: getattr(config, k) for k in KEPT_KEYS if getattr(config, k)}}
    form = copy.deepcopy(form)
    form["moe"] = sync(moe, state)
    return form, notes


def error_path(data: Any, err: MergeError) -> tuple:
    """Where in a config (parsed YAML) the engine's first problem is: its schema's location, or
    the expert a check names (() when neither)."""
    from pydantic import ValidationError

    from mergecore.moe.config import MoEConfig

    try:
        MoEConfig.model_validate(data)
    except ValidationError as e:
        return tuple(e.errors(include_url=False, include_input=False)[0]["loc"])
    except Exception:  # not a mapping: no place to point at
        return ()
    m = re.search(r": (experts|shared_experts)\.(\d+) ", str(err))
    return (m.group(1), int(m.group(2))) if m else ()
