"""The Recipe tab's form, generated from a method's parameter schema, and its recipe.

Nothing here is written per method: `form_fields` reads `MergeMethod.params` (`ParamSpec`:
name, type, per_model, default, range, choices, help, end labels) and the session's models, and
the UI draws one widget per field. The form's state is a plain dict::

    {"method": "<a method name>",
     "values": {"normalize": True, "weight@variant_a": 0.5, "density@variant_a": [0.3, 0.7],
                "t": {"attn": [0, 1], "mlp": [1, 0], "other": 0.5}, ...},
     "extra": {"dtype": "float32", ...},    # other recipe keys, kept as they are
     "slices": None,                        # an imported `slices:` layout (edited as YAML)
     "left_out": ["variant_c"],             # session models the recipe does not use (a recipe may
                                            # name only some of them; new models join the recipe)
     "search_dirs": [...],                  # where relative artifact paths resolve (a search's folder)
     "moe": {...} | None}                   # the mixture-of-experts form (app.moe_form), on or off

Values are `app.values`' (scalars, curves, split curves, raw imports); `app.curves` edits the
curves. `build_recipe_dict` turns the form into a mergekit recipe; `form_from_recipe` does the
reverse, and `import_recipe` takes YAML typed or uploaded into the page.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from mergecore.errors import MergeError, short

from app.values import (check_value, filter_warning, group_filters, is_number, unmatched_filters, value_from_recipe,
                        value_to_recipe)

PASSTHROUGH_KEYS = ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name", "seed", "artifacts",
                    "non_layer_from")


# ---------------------------------------------------------------------------------------------
# fields


def get_method(name: str):
    from mergecore.methods import get_method as _get

    return _get(name)


def method_choices() -> list[str]:
    from mergecore.methods import all_methods

    return list(all_methods())


def default_method() -> str:
    """The method a new form starts on (the engine's default)."""
    from mergecore.methods import DEFAULT_METHOD

    return DEFAULT_METHOD


def per_model_targets(method, state: dict[str, Any], form: Optional[dict[str, Any]] = None) -> list[str]:
    """The models of the recipe's list (they get per-model parameters): the session's models but
    the base when the method uses one, and but those the form leaves out."""
    names = [m["name"] for m in state.get("models", [])]
    base = state.get("base")
    if method.base in ("required", "optional") and base in names:
        names = [n for n in names if n != base]
    left_out = set((form or {}).get("left_out") or ())
    return [n for n in names if n not in left_out]


def recipe_models(state: dict[str, Any], form: dict[str, Any]) -> list[str]:
    """The session models the form's recipe names: its base (when the method uses one) and its
    list of models (a slices layout: its sources)."""
    if not form or not form.get("method") or not state.get("models"):
        return []
    from app import moe_form
    from app.state import find_model

    if moe_form.is_on(form):
        return moe_form.models_used(form, state)
    method = get_method(form["method"])
    base = [state["base"]] if state.get("base") and (method.base != "ignored" or form.get("slices_base")) else []
    if form.get("slices"):
        refs = [src["model"] for s in form["slices"] for src in s["sources"]]
        return list(dict.fromkeys(base + [m["name"] for m in (find_model(state, r) for r in refs) if m]))
    return list(dict.fromkeys(base + per_model_targets(method, state, form)))


def model_rule(method, base: Optional[str] = None) -> str:
    """How many models the method takes, in words (`MergeMethod.min_models` / `max_models`)."""
    lo, hi = method.min_models, method.max_models
    count = (f"exactly {lo}" if lo == hi else f"{lo} to {hi}" if hi is not None else
             f"at least {lo}" if lo > 0 else "any number of")
    noun = "model" if hi == 1 or (hi is None and lo == 1) else "models"
    besides = f" besides the base{f' ({base})' if base else ''}" if method.base != "ignored" else ""
    return f"{method.name} takes {count} {noun}{besides}"


def constraint_problems(form: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """What keeps the form's recipe from merging, by the method's rules: a base it needs, the
    number of models it takes (`MergeMethod.accepts`). A slices layout is checked by the plan."""
    if not form or form.get("slices") or not state.get("models"):
        return []
    method = get_method(form["method"])
    names = [m["name"] for m in state["models"]]
    base = state.get("base") if state.get("base") in names else None
    out = []
    if method.base == "required" and not base:
        out.append(f"method '{method.name}' needs a base model: choose one on the Models tab")
    targets = per_model_targets(method, state, form)
    if not method.accepts(len(targets)):
        has = f"the recipe has {len(targets)}" + (f" ({', '.join(targets)})" if targets else "")
        n = method.max_models if method.max_models is not None and len(targets) > method.max_models else None
        fix = (f"untick all but {n} under 'Models in the recipe' (e.g. keep {', '.join(targets[:n])})" if n else
               "tick more under 'Models in the recipe' or add models on the Models tab")
        out.append(f"{model_rule(method, base)}; {has}: {fix}")
    return out


def field_key(param: str, model: Optional[str] = None) -> str:
    return f"{param}@{model}" if model else param


def form_fields(method_name: str, state: dict[str, Any], form: Optional[dict[str, Any]] = None
                ) -> list[dict[str, Any]]:
    """One dict per widget: key, param, model, type, numeric, default, range, choices, help, label,
    ends (what the low and high ends of the scale mean, with `{base}` / `{model}` / `{other}`);
    per-model ones for the models of the recipe (`form`'s)."""
    method = get_method(method_name)
    targets = per_model_targets(method, state, form)
    out = []
    for spec in method.params:
        models = targets if spec.per_model else [None]
        for model in models:
            rng, ends = spec.range, spec.end_labels
            out.append({
                "key": field_key(spec.name, model),
                "param": spec.name,
                "model": model,
                "type": spec.type.__name__,
                "numeric": spec.type in (float, int),
                "required": spec.required,
                "default": spec.first_value(len(targets)),
                "range": None if rng is None else [rng.lo, rng.hi],
                "range_text": str(rng) if rng else "",
                "choices": list(spec.choices) if spec.choices else None,
                "help": spec.help,
                "label": spec.name + (f" · {model}" if model else ""),
                "ends": None if ends is None else (ends.low, ends.high),
            })
    return out


def new_form(method_name: str, state: dict[str, Any], old: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A form for `method_name`, keeping values of `old` whose keys still exist."""
    old_values = (old or {}).get("values", {})
    names = [m["name"] for m in state.get("models", [])]
    left_out = [n for n in (old or {}).get("left_out") or [] if n in names]
    values = {}
    for f in form_fields(method_name, state, {"left_out": left_out}):
        values[f["key"]] = old_values.get(f["key"], f["default"])
    explicit = [k for k in (old or {}).get("explicit", []) if k in values]
    return {"method": method_name, "values": values, "explicit": explicit, "left_out": left_out,
            "extra": dict((old or {}).get("extra") or {}), "slices": (old or {}).get("slices"),
            "slices_base": (old or {}).get("slices_base"), "search_dirs": list((old or {}).get("search_dirs") or []),
            "moe": copy.deepcopy((old or {}).get("moe"))}  # the mixture-of-experts form (app.moe_form), kept


def sync_form(form: Optional[dict[str, Any]], state: dict[str, Any]) -> dict[str, Any]:
    """The form after models or the base changed: fields added or dropped, values kept."""
    return new_form((form or {}).get("method") or default_method(), state, form)


def filled(form: Optional[dict[str, Any]], state: dict[str, Any]) -> dict[str, Any]:
    """The form with its fields, once the session has models (a method chosen before they came)."""
    form = form or {}
    if state.get("models") and not form.get("values") and form.get("method") is not None:
        return new_form(form["method"], state, form)
    return form


def field_by_key(form: dict[str, Any], state: dict[str, Any], key: str) -> dict[str, Any]:
    for f in form_fields(form["method"], state, form):
        if f["key"] == key:
            return f
    raise MergeError(f"parameter '{key}' is not part of the {form['method']} form")


def set_value(form: dict[str, Any], state: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    field = field_by_key(form, state, key)
    form = copy.deepcopy(form)
    form["values"][key] = check_value(field, value)
    form.setdefault("explicit", [])
    if key not in form["explicit"]:
        form["explicit"].append(key)
    return form


# ---------------------------------------------------------------------------------------------
# recipe


def _differs(value: Any, default: Any) -> bool:
    if value is None:
        return False
    if is_number(value) and is_number(default):
        return not math.isclose(float(value), float(default), rel_tol=0, abs_tol=1e-12)
    return value != default


def build_recipe_dict(form: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The mergekit recipe (a dict) the form describes; models are written by reference."""
    method = get_method(form["method"])
    refs = {m["name"]: m["ref"] for m in state.get("models", [])}
    if not refs:
        raise MergeError("add models first (Models tab)")
    filters = group_filters(_names_for_filters(state))
    fields = form_fields(form["method"], state, form)
    values = form.get("values", {})
    explicit = set(form.get("explicit", []))

    def params_for(model: Optional[str]) -> dict[str, Any]:
        out = {}
        for f in fields:
            if f["model"] != model:
                continue
            v = values.get(f["key"], f["default"])
            if f["required"] or f["key"] in explicit or _differs(v, f["default"]) or isinstance(v, (list, dict)):
                out[f["param"]] = value_to_recipe(v, filters)
        return out

    recipe: dict[str, Any] = {"merge_method": method.name}
    base = state.get("base") if state.get("base") in refs else None
    if form.get("slices"):
        # a slices recipe keeps the base_model it was imported with (per-slice methods may need it)
        if base and (method.base != "ignored" or form.get("slices_base")):
            recipe["base_model"] = refs[base]
        recipe["slices"] = copy.deepcopy(form["slices"])
    else:
        if method.base == "required" and not base:
            raise MergeError(f"method '{method.name}' needs a base model: choose one on the Models tab")
        if method.base in ("required", "optional") and base:
            recipe["base_model"] = refs[base]
        targets = per_model_targets(method, state, form)
        entries = []
        for name in targets:
            entry: dict[str, Any] = {"model": refs[name]}
            p = params_for(name)
            if p:
                entry["parameters"] = p
            entries.append(entry)
        if not entries:
            raise MergeError(f"method '{method.name}' needs models{' besides the base' if base else ''}: "
                             f"tick some under 'Models in the recipe'")
        recipe["models"] = entries
    g = params_for(None)
    if g:
        recipe["parameters"] = g
    for k, v in (form.get("extra") or {}).items():
        if v not in (None, ""):
            recipe[k] = v
    return recipe


def model_filters(state: dict[str, Any]):
    """The recipe filters of the session's attention and MLP tensors (`app.values.group_filters`)."""
    return group_filters(_names_for_filters(state))


def _names_for_filters(state: dict[str, Any]) -> list[str]:
    from app.state import tensor_names

    try:
        return tensor_names(state)
    except MergeError:
        return []


def build_recipe(form: dict[str, Any], state: dict[str, Any]):
    from mergecore.recipe import recipe_from_dict

    return recipe_from_dict(build_recipe_dict(form, state))


def recipe_yaml(form: dict[str, Any], state: dict[str, Any]) -> str:
    return build_recipe(form, state).to_yaml()


def form_from_recipe(recipe, state: dict[str, Any], search_dirs: Sequence[str | Path] = ()
                     ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(state, form, notes) for an imported recipe; its models must already be in `state`
    (see `app.state.find_model`). The session's other models stay in it, left out of the recipe
    (`left_out`). Parameters of the base model's own entry are dropped (the engine ignores them
    too), and so are those the method does not read (both named in the notes). `search_dirs`:
    where its relative artifact paths resolve."""
    from app.state import find_model

    notes: list[str] = []
    method = get_method(recipe.merge_method)
    state = copy.deepcopy(state)

    def name_of(ref: str) -> str:
        m = find_model(state, ref)
        if m is None:
            raise MergeError(f"model {short(ref)} of the recipe is not loaded")
        return m["name"]

    if recipe.base_model:
        state["base"] = name_of(recipe.base_model)
    filters = group_filters(_names_for_filters(state))
    values: dict[str, Any] = {}
    for k, v in (recipe.parameters or {}).items():
        values[k] = value_from_recipe(v, filters)
    slices = None
    if recipe.slices is not None:
        slices = [s.model_dump(exclude_none=True, mode="json") for s in recipe.slices]
        for s in slices:
            for src in s["sources"]:
                src["layer_range"] = list(src["layer_range"])
        notes.append("this recipe uses slices (layer ranges): the form edits its global parameters; "
                     "edit the slices in the YAML")
    else:
        listed = [name_of(m.model) for m in recipe.models or []]
        for m, name in zip(recipe.models or [], listed):
            if method.base != "ignored" and name == state.get("base"):
                if m.parameters:
                    notes.append(f"parameters given for the base model '{name}' are not used by {method.name}")
                continue
            for k, v in (m.parameters or {}).items():
                values[field_key(k, name)] = value_from_recipe(v, filters)
        # models the recipe does not name stay in the session, left out of the recipe's list
        left_out = [n for n in per_model_targets(method, state) if n not in listed]
        if left_out:
            notes.append(f"models not in the recipe are left out of it (still loaded): {', '.join(left_out)}")
    extra = {k: getattr(recipe, k) for k in PASSTHROUGH_KEYS if getattr(recipe, k, None) is not None}
    if "tokenizer" in extra and hasattr(extra["tokenizer"], "model_dump"):
        extra["tokenizer"] = extra["tokenizer"].model_dump(exclude_none=True)
    form = new_form(method.name, state, {"values": values, "extra": extra, "slices": slices,
                                         "explicit": list(values), "left_out": [] if slices else left_out,
                                         "slices_base": bool(slices and recipe.base_model),
                                         "search_dirs": [str(d) for d in search_dirs]})
    keys = {f["key"]: f for f in form_fields(method.name, state, form)}
    if not slices:  # a global value of a per-model parameter is every model's default (as in mergekit)
        for k, v in list(values.items()):
            spec = method.param(k)
            if spec is not None and spec.per_model:
                del values[k]
                for key in [key for key, f in keys.items() if f["param"] == k]:
                    values.setdefault(key, v)
                    form["values"][key] = values[key]
    # values the form has no field for are dropped; those the method does not read at all are
    # the engine's warnings (`validate_parameters`), the others are named here
    unread = [k for k in values if k not in keys and method.param(k.split("@")[0]) is not None]
    if unread and not slices:
        notes.append(f"parameters without a place in the {method.name} form were dropped: {', '.join(unread)}")
    form["explicit"] = [k for k in form["values"] if k in values]
    return state, form, notes


def recipe_warnings(form: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """Filters in the form's values (and its slices' parameters) that match no tensor of the
    session's models: their values never apply (a Llama recipe's `self_attn` on a ViT)."""
    names = _names_for_filters(state)
    blocks = [("", (form or {}).get("values") or {})]
    for i, s in enumerate((form or {}).get("slices") or []):
        blocks.append((f"slices[{i}] ", s.get("parameters") or {}))
        blocks += [(f"slices[{i}].sources[{j}] ", src.get("parameters") or {}) for j, src in enumerate(s["sources"])]
    out = []
    for where, params in blocks:
        for key, v in params.items():
            missed = unmatched_filters(v, names)
            if missed:
                out.append(filter_warning(f"{where}{key}", missed, group_filters(names)))
    return out


def import_recipe(text: str | bytes, state: dict[str, Any], roots: Sequence[Path], where: str = "recipe",
                  search_dirs: Sequence[str | Path] = (), form: Optional[dict[str, Any]] = None
                  ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(state, form, notes) for recipe YAML typed or uploaded into the page: parsed as data (never
    executed; within `mergecore.yamlio`'s size and alias limits, so a small hostile upload cannot
    blow up), its models loaded into the session, the form filled. Local models and artifacts it
    names must lie in `roots` (`app.paths`), as typed paths do; a relative artifact path is taken
    in `search_dirs` (e.g. the folder of the search that wrote the recipe), where the merge finds it.
    A mergekit-moe config fills the mixture-of-experts form instead (`app.moe_form`; `form`: the
    form it joins)."""
    from mergecore.moe.config import is_moe_config
    from mergecore.recipe import recipe_from_dict
    from mergecore.yamlio import load_yaml

    data = load_yaml(text or "", where)
    if is_moe_config(data):
        from mergecore.moe.config import moe_config_from_dict

        from app import moe_form

        config = moe_config_from_dict(data, where)
        state = load_models(config.referenced_models(), state, roots)
        new, notes = moe_form.config_form(config, state, filled(form or {"method": default_method()}, state), where)
        return state, new, notes
    recipe = recipe_from_dict(data, where)
    state = load_recipe_models(recipe, state, roots, search_dirs)
    state, new, notes = form_from_recipe(recipe, state, search_dirs)
    if (form or {}).get("moe"):  # the mixture's form stays, off
        new["moe"] = {**form["moe"], "on": False}
    return state, new, notes


def load_recipe_models(recipe, state: dict[str, Any], roots: Sequence[Path], search_dirs: Sequence[str | Path] = ()
                       ) -> dict[str, Any]:
    """The session with the recipe's models loaded (a copy); its artifacts and local models must
    lie in `roots`. A MergeError about one reference carries it as `err.ref`."""
    from app.paths import confine

    get_method(recipe.merge_method)
    for key, ref in (recipe.artifacts or {}).items():
        found = [Path(d) / ref for d in search_dirs if not Path(ref).is_absolute() and (Path(d) / ref).is_file()]
        try:
            confine(found[0] if found else ref, roots, f"artifact {short(key, 40)}")
        except MergeError as err:
            err.ref = ref
            raise
    return load_models(recipe.referenced_models(), state, roots)


def load_models(refs: Sequence[str], state: dict[str, Any], roots: Sequence[Path]) -> dict[str, Any]:
    """The session with the models `refs` (folders, Hub ids, `BASE+ADAPTER`) loaded when they are
    not (a copy); local folders must lie in `roots`. A MergeError about one carries it as `err.ref`."""
    from mergecore.io.source import resolve_model_path

    from app import adapters
    from app import state as st
    from app.paths import confine, local_model

    state = copy.deepcopy(state or st.new_session())
    for ref in refs:
        if st.find_model(state, ref) is None:
            try:
                if adapters.split(ref) is not None:  # BASE+ADAPTER: each side, then the engine's check
                    state = adapters.load_ref(state, ref, roots)
                    continue
                local = local_model(ref, roots)  # None: a Hub id
                p = resolve_model_path(str(local) if local is not None else ref)  # cached Hub snapshot, or one line
                state = st.add_model(state, ref, confine(p, roots, "model folder"))
            except MergeError as err:
                err.ref = ref
                raise
    return state
