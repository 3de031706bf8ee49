"""The Recipe tab's form, generated from a method's parameter schema, and its recipe.

Nothing here is written per method: `form_fields` reads `MergeMethod.params` (`ParamSpec`:
name, type, per_model, default, range, choices, help) and the session's models, and the UI
draws one widget per field. The form's state is a plain dict::

    {"method": "ties",
     "values": {"normalize": True, "weight@variant_a": 0.5, "density@variant_a": [0.3, 0.7],
                "t": {"attn": [0, 1], "mlp": [1, 0], "other": 0.5}, ...},
     "extra": {"dtype": "float32", ...},    # other recipe keys, kept as they are
     "slices": None}                        # an imported `slices:` layout (edited as YAML)

A value is a scalar, a curve (a list of anchors interpolated over the layers), a split curve
(`attn` / `mlp` / `other`: separate values for attention tensors, MLP tensors and the rest), or
`{"raw": ...}` for anything imported that the form cannot edit (passed through unchanged).
`build_recipe_dict` turns the form into a mergekit recipe; `form_from_recipe` does the reverse
for imported YAML.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import yaml

from mergecore.errors import MergeError, short
from mergecore.yamlio import load_yaml

# substrings that select attention and MLP tensors, tried in order (first match in the names wins)
ATTN_PATTERNS = ("self_attn", "attention", "attn")
MLP_PATTERN_SETS = (("mlp",), ("feed_forward",), ("ffn",), ("intermediate", "output.dense"), ("fc1", "fc2"))
GROUPS = ("attn", "mlp", "other")
GROUP_LABELS = {"all": "all tensors", "attn": "attention tensors", "mlp": "MLP tensors",
                "other": "other tensors (norms, embeddings, heads)"}
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


def per_model_targets(method, state: dict[str, Any]) -> list[str]:
    """The models that get per-model parameters: all but the base when the method uses one."""
    names = [m["name"] for m in state.get("models", [])]
    base = state.get("base")
    if method.base in ("required", "optional") and base in names:
        return [n for n in names if n != base]
    return names


def _type_name(t: type) -> str:
    return t.__name__


def field_key(param: str, model: Optional[str] = None) -> str:
    return f"{param}@{model}" if model else param


def split_key(key: str) -> tuple[str, Optional[str]]:
    param, _, model = key.partition("@")
    return param, (model or None)


def default_value(spec, n_models: int) -> Any:
    """A starting value for a parameter (its default, or a sensible one if it is required)."""
    if not spec.required:
        return spec.default
    if spec.choices:
        return spec.choices[0]
    if spec.type is bool:
        return False
    if spec.type is str:
        return ""
    if spec.name == "weight":
        return round(1.0 / max(1, n_models), 4)
    rng = spec.range
    if rng is not None and rng.lo is not None and rng.hi is not None:
        v = (rng.lo + rng.hi) / 2
        return int(v) if spec.type is int else v
    return 1 if spec.type is int else 0.5


def form_fields(method_name: str, state: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per widget: key, param, model, type, numeric, default, range, choices, help, label."""
    method = get_method(method_name)
    targets = per_model_targets(method, state)
    out = []
    for spec in method.params:
        models = targets if spec.per_model else [None]
        for model in models:
            numeric = spec.type in (float, int)
            rng = spec.range
            out.append({
                "key": field_key(spec.name, model),
                "param": spec.name,
                "model": model,
                "type": _type_name(spec.type),
                "numeric": numeric,
                "required": spec.required,
                "default": default_value(spec, len(targets)),
                "range": None if rng is None else [rng.lo, rng.hi],
                "range_text": str(rng) if rng else "",
                "choices": list(spec.choices) if spec.choices else None,
                "help": spec.help,
                "label": spec.name + (f" · {model}" if model else ""),
            })
    return out


def new_form(method_name: str, state: dict[str, Any], old: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A form for `method_name`, keeping values of `old` whose keys still exist."""
    old_values = (old or {}).get("values", {})
    values = {}
    for f in form_fields(method_name, state):
        values[f["key"]] = old_values.get(f["key"], f["default"])
    explicit = [k for k in (old or {}).get("explicit", []) if k in values]
    return {"method": method_name, "values": values, "explicit": explicit,
            "extra": dict((old or {}).get("extra") or {}), "slices": (old or {}).get("slices"),
            "slices_base": (old or {}).get("slices_base")}


def sync_form(form: Optional[dict[str, Any]], state: dict[str, Any], default_method: str = "ties") -> dict[str, Any]:
    """The form after models or the base changed: fields added or dropped, values kept."""
    method = (form or {}).get("method") or default_method
    return new_form(method, state, form)


# ---------------------------------------------------------------------------------------------
# values


def is_split(value: Any) -> bool:
    return isinstance(value, dict) and set(value) <= set(GROUPS) and bool(value)


def is_raw(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"raw"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def value_to_text(value: Any) -> str:
    """How a value is shown in its text field: YAML flow style (`0.5`, `[0.3, 0.7]`, ...)."""
    if is_raw(value):
        value = value["raw"]
    if isinstance(value, float):
        return _fmt(value)
    text = yaml.safe_dump(_round(value), default_flow_style=True, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return float(_fmt(v))
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e-4 or v == 0 else f"{v:.3e}"


def _check_number(field: dict[str, Any], v: Any) -> float:
    if not _is_number(v):
        raise MergeError(f"{field['label']}: expected a number or a list of numbers, got {short(v)}")
    if field["type"] == "int" and float(v) != int(v):
        raise MergeError(f"{field['label']}: expected a whole number, got {short(v)}")
    lo, hi = field["range"] or (None, None)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise MergeError(f"{field['label']} = {v} is out of range {field['range_text']}")
    return int(v) if field["type"] == "int" else float(v)


def check_value(field: dict[str, Any], value: Any) -> Any:
    """Validate a value against its field; returns it normalised (MergeError if invalid)."""
    if is_raw(value):
        return value
    t = field["type"]
    if t == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise MergeError(f"{field['label']}: expected true or false, got {short(value)}")
    if t == "str":
        value = "" if value is None else str(value)
        if field["choices"] and value not in field["choices"]:
            raise MergeError(f"{field['label']}: {short(value)} is not one of {', '.join(map(str, field['choices']))}")
        return value
    if is_split(value):
        return {g: check_value(field, v) for g, v in value.items()}
    if isinstance(value, list):
        if not value:
            raise MergeError(f"{field['label']}: a curve needs at least one anchor")
        return [_check_number(field, v) for v in value]
    return _check_number(field, value)


def text_to_value(field: dict[str, Any], text: str) -> Any:
    """Parse what the user typed: a number, `[anchors]`, or `{attn: ..., mlp: ..., other: ...}`."""
    text = (text or "").strip()
    if field["type"] == "str":
        return check_value(field, text)
    if not text:
        raise MergeError(f"{field['label']}: give a value")
    try:
        value = load_yaml(text, field["label"])  # size and alias limits: typed in the browser
    except MergeError:
        raise MergeError(f"{field['label']}: cannot read {short(text)}; write a number, [0.2, 0.8] or "
                         f"{{attn: [0, 1], mlp: [1, 0], other: 0.5}}") from None
    if isinstance(value, dict) and not is_split(value):
        raise MergeError(f"{field['label']}: separate curves use the keys attn, mlp and other, "
                         f"got {short(list(value))}")
    return check_value(field, value)


def field_by_key(form: dict[str, Any], state: dict[str, Any], key: str) -> dict[str, Any]:
    for f in form_fields(form["method"], state):
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
# curves


def curve_targets(form: dict[str, Any], state: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, key) of every numeric field: what the curve editor can edit."""
    return [(f["label"], f["key"]) for f in form_fields(form["method"], state) if f["numeric"]]


def get_curve(form: dict[str, Any], key: str, group: str = "all", points: int = 5) -> list[float]:
    """The anchors the curve editor shows for a field (and tensor group)."""
    value = form["values"].get(key)
    if is_raw(value):
        raise MergeError(f"'{key}' holds an imported value the curve editor cannot edit; change it in the form")
    if is_split(value):
        value = value.get(group if group in GROUPS else "attn", value.get("other", 0.0))
    if isinstance(value, list):
        return [float(v) for v in value]
    v = float(value) if _is_number(value) else 0.0
    return [v] * max(2, points)


def set_curve(form: dict[str, Any], state: dict[str, Any], key: str, anchors: list[float],
              group: str = "all") -> dict[str, Any]:
    """Store anchors for a field: for all tensors, or one group of a split curve."""
    field = field_by_key(form, state, key)
    anchors = [float(a) for a in anchors]
    if field["type"] == "int":
        anchors = [round(a) for a in anchors]
    lo, hi = field["range"] or (None, None)
    anchors = [min(hi, a) if hi is not None else a for a in anchors]
    anchors = [max(lo, a) if lo is not None else a for a in anchors]
    anchors = [round(a, 4) for a in anchors]
    cur = form["values"].get(key)
    if group == "all":
        new: Any = anchors
    else:
        if is_split(cur):
            new = dict(cur)
        else:
            base = cur if (isinstance(cur, list) or _is_number(cur)) else anchors
            new = {"attn": base, "mlp": base, "other": base[0] if isinstance(base, list) else base}
        new[group] = anchors
    return set_value(form, state, key, new)


def set_split(form: dict[str, Any], state: dict[str, Any], key: str, split: bool) -> dict[str, Any]:
    """Turn separate attention / MLP curves on (copying the current curve) or off (keeping attn's)."""
    cur = form["values"].get(key)
    if is_raw(cur):
        raise MergeError(f"'{key}' holds an imported value the curve editor cannot edit")
    if split and not is_split(cur):
        new: Any = {"attn": cur, "mlp": cur, "other": cur[0] if isinstance(cur, list) else cur}
    elif not split and is_split(cur):
        new = cur.get("attn", cur.get("other"))
    else:
        return form
    return set_value(form, state, key, new)


def group_filters(tensor_names: list[str]) -> tuple[Optional[str], tuple[str, ...]]:
    """The filter substrings that select attention and MLP tensors in these models."""
    from mergecore.arch import layer_of

    layer_names = [n for n in tensor_names if layer_of(n) is not None]
    attn = next((p for p in ATTN_PATTERNS if any(p in n for n in layer_names)), None)
    rest = [n for n in layer_names if not (attn and attn in n)]
    mlp: tuple[str, ...] = ()
    for pats in MLP_PATTERN_SETS:
        if any(pats[0] in n for n in rest):
            mlp = tuple(p for p in pats if any(p in n for n in rest))
            break
    return attn, mlp


def value_to_recipe(value: Any, filters: tuple[Optional[str], tuple[str, ...]]) -> Any:
    if is_raw(value):
        return value["raw"]
    if is_split(value):
        attn, mlp = filters
        if attn is None and not mlp:
            raise MergeError("these models have no attention or MLP tensors to give separate curves")
        entries = []
        if attn is not None and "attn" in value:
            entries.append({"filter": attn, "value": value["attn"]})
        for p in mlp:
            if "mlp" in value:
                entries.append({"filter": p, "value": value["mlp"]})
        if "other" in value:
            entries.append({"value": value["other"]})
        return entries
    return value


def value_from_recipe(value: Any, filters: tuple[Optional[str], tuple[str, ...]]) -> Any:
    """A recipe value as a form value. A filter list becomes a split curve only when writing it
    back gives the same result for every tensor (the same filters, attention first); anything
    else is kept as imported (`{"raw": ...}`)."""
    from mergecore.params import is_curve, is_filter_list

    if is_filter_list(value):
        attn, mlp = filters
        split: dict[str, Any] = {}
        mlp_seen: dict[str, Any] = {}
        ok = True
        for e in value:
            f, v = e.get("filter"), e.get("value")
            if "other" in split:
                break  # entries after a catch-all never match
            if not (_is_number(v) or (isinstance(v, list) and v and all(_is_number(x) for x in v))):
                ok = False
            elif f in (None, "*"):
                split["other"] = v
            elif attn is not None and f == attn and "attn" not in split and not mlp_seen:
                split["attn"] = v
            elif f in mlp and f not in mlp_seen:
                mlp_seen[f] = v
            else:
                ok = False
        if mlp_seen:
            values = list(mlp_seen.values())
            if set(mlp_seen) != set(mlp) or any(x != values[0] for x in values):
                ok = False
            else:
                split["mlp"] = values[0]
        return split if ok and split else {"raw": value}
    if is_curve(value):
        return list(value) if all(_is_number(x) for x in value) else {"raw": value}
    if isinstance(value, dict):
        return {"raw": value}
    return value


# ---------------------------------------------------------------------------------------------
# recipe


def _differs(value: Any, default: Any) -> bool:
    if value is None:
        return False
    if _is_number(value) and _is_number(default):
        return not math.isclose(float(value), float(default), rel_tol=0, abs_tol=1e-12)
    return value != default


def build_recipe_dict(form: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The mergekit recipe (a dict) the form describes; models are written by reference."""
    method = get_method(form["method"])
    refs = {m["name"]: m["ref"] for m in state.get("models", [])}
    if not refs:
        raise MergeError("add models first (Models tab)")
    filters = group_filters(_names_for_filters(state))
    fields = form_fields(form["method"], state)
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
        targets = per_model_targets(method, state)
        entries = []
        for name in targets:
            entry: dict[str, Any] = {"model": refs[name]}
            p = params_for(name)
            if p:
                entry["parameters"] = p
            entries.append(entry)
        if not entries:
            raise MergeError(f"method '{method.name}' needs models besides the base")
        recipe["models"] = entries
    g = params_for(None)
    if g:
        recipe["parameters"] = g
    for k, v in (form.get("extra") or {}).items():
        if v not in (None, ""):
            recipe[k] = v
    return recipe


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


def form_from_recipe(recipe, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(state, form, notes) for an imported recipe; its models must already be in `state`
    (see `app.state.find_model`). Parameters of the base model's own entry are dropped (the
    engine ignores them too)."""
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
    elif method.base == "ignored":
        pass
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
        # models not named in the recipe are left in the session but out of the recipe's model list
        keep = set(listed) | ({state["base"]} if state.get("base") else set())
        dropped = [m["name"] for m in state["models"] if m["name"] not in keep]
        if dropped:
            state["models"] = [m for m in state["models"] if m["name"] in keep]
            notes.append(f"models not in the recipe were removed from the list: {', '.join(dropped)}")
    extra = {k: getattr(recipe, k) for k in PASSTHROUGH_KEYS if getattr(recipe, k, None) is not None}
    if "tokenizer" in extra and hasattr(extra["tokenizer"], "model_dump"):
        extra["tokenizer"] = extra["tokenizer"].model_dump(exclude_none=True)
    form = new_form(method.name, state, {"values": values, "extra": extra, "slices": slices,
                                         "explicit": list(values),
                                         "slices_base": bool(slices and recipe.base_model)})
    # keep values for keys the form does not have (e.g. per-model params in a slices recipe)
    for k, v in values.items():
        form["values"].setdefault(k, v)
    unknown = [k for k in form["values"] if k not in {f["key"] for f in form_fields(method.name, state)}]
    for k in unknown:
        form["values"].pop(k)
    form["explicit"] = [k for k in form["values"] if k in values]
    return state, form, notes


# ---------------------------------------------------------------------------------------------
# labels and formulas


def endpoint_labels(field: dict[str, Any], method_name: str, state: dict[str, Any]) -> tuple[str, str]:
    """What the bottom and top of a parameter's scale mean, in words."""
    p, model = field["param"], field["model"]
    base = state.get("base") or "base"
    others = [n for n in (m["name"] for m in state.get("models", [])) if n != base]
    other = others[0] if others else "the other model"
    if p == "t" and method_name == "slerp":
        return f"0 = {base} (base)", f"1 = {other}"
    if p == "t" and method_name == "nearswap":
        return f"0 = keep {base}", f"1 = swap in {other} where close"
    if p == "weight":
        who = model or "the model"
        return f"0 = ignore {who}", f"1 = full weight for {who}"
    if p == "density":
        who = model or "each model"
        return f"0 = keep none of {who}'s changes", f"1 = keep all of them"
    if p == "lambda":
        return f"0 = {base} only", "1 = task vectors at full scale"
    if p == "gamma":
        return "0 = drop no outliers", "1 = drop everything"
    if p == "select_topk":
        return "0 = keep no entries", "1 = keep all entries"
    if p == "scale":
        return "0 = zero the tensors", "1 = unchanged"
    lo, hi = field["range"] or (None, None)
    return (f"{lo:g}" if lo is not None else "0"), (f"{hi:g}" if hi is not None else "1")


_FORMULAS = {
    "linear": "θ = Σᵢ wᵢ·θᵢ / Σᵢ wᵢ",
    "task_arithmetic": "θ = θ₀ + λ·Σᵢ wᵢ·τᵢ,  τᵢ = θᵢ − θ₀",
    "ties": "θ = θ₀ + λ·Σᵢ wᵢ·mᵢ⊙trim(τᵢ, dᵢ) / Σᵢ wᵢ·mᵢ,  mᵢ = entries agreeing with the elected sign",
    "dare_linear": "θ = θ₀ + λ·Σᵢ wᵢ·drop(τᵢ, 1−dᵢ)/dᵢ",
    "dare_ties": "θ = θ₀ + λ·TIES-merge(drop(τᵢ, 1−dᵢ)/dᵢ, wᵢ)",
    "breadcrumbs": "θ = θ₀ + λ·Σᵢ wᵢ·crumbs(τᵢ; keep dᵢ, drop top γᵢ)",
    "breadcrumbs_ties": "θ = θ₀ + λ·TIES-merge(crumbs(τᵢ; keep dᵢ, drop top γᵢ), wᵢ)",
    "della": "θ = θ₀ + λ·TIES-merge(magprune(τᵢ; dᵢ ± εᵢ), wᵢ)",
    "della_linear": "θ = θ₀ + λ·Σᵢ wᵢ·magprune(τᵢ; dᵢ ± εᵢ)",
    "slerp": "θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁,  cos Ω = θ̂₀·θ̂₁",
    "nearswap": "θ = θ₀ + clamp(t / |θ₁ − θ₀|, 0, 1)·(θ₁ − θ₀)",
    "model_stock": "θ = r·mean(θᵢ) + (1 − r)·θ₀,  r from the angle between the fine-tunes",
    "passthrough": "θ = sᵢ·θᵢ (copy)",
    "multislerp": "θ = spherical barycentre of θᵢ with weights wᵢ",
    "nuslerp": "θ = slerp(θ₁, θ₂; w₂ / (w₁ + w₂))",
    "karcher": "θ = Karcher mean of θᵢ/|θᵢ| · mean |θᵢ|",
    "sce": "θ = θ₀ + Σᵢ eᵢ·mᵢ⊙select(τᵢ, topk)",
}


def formula_markdown(form: dict[str, Any], state: dict[str, Any]) -> str:
    """The method's formula, then its current values at the first, middle and last layer."""
    from mergecore.params import interpolate, layer_position

    from app.state import num_layers

    method = get_method(form["method"])
    n = num_layers(state)
    layers = sorted({0, (n - 1) // 2, n - 1})
    lines = [f"**{method.name}**: `{_FORMULAS.get(method.name, method.summary)}`"]
    base = state.get("base")
    if method.base != "ignored" and base:
        lines.append(f"θ₀ = **{base}** (base)" + "".join(
            f", θ{_sub(i + 1)} = **{m}**" for i, m in enumerate(per_model_targets(method, state))))
    else:
        lines.append(", ".join(f"θ{_sub(i + 1)} = **{m}**" for i, m in enumerate(per_model_targets(method, state))))
    fields = [f for f in form_fields(form["method"], state) if f["numeric"]]
    if fields:
        head = "| parameter | " + " | ".join(f"layer {i}" for i in layers) + " |"
        rows = [head, "|---|" + "---|" * len(layers)]
        for f in fields:
            v = form["values"].get(f["key"], f["default"])
            cells = []
            for i in layers:
                t = layer_position(i, n)
                cells.append(_at(v, t, interpolate))
            rows.append(f"| {f['label']} | " + " | ".join(cells) + " |")
        lines.append("\n".join(rows))
        lines.append("Curves: anchors are spread evenly over the layers and interpolated linearly; "
                     "embeddings and heads take a curve's first value.")
    others = [f for f in form_fields(form["method"], state) if not f["numeric"]]
    if others:
        lines.append("; ".join(f"{f['label']} = `{value_to_text(form['values'].get(f['key'], f['default']))}`"
                               for f in others))
    return "\n\n".join(lines)


def _at(v: Any, t: float, interpolate) -> str:
    if is_raw(v):
        return "(imported)"
    if is_split(v):
        return " / ".join(f"{g[:4]} {_at(x, t, interpolate)}" for g, x in v.items())
    if isinstance(v, list):
        return _fmt(float(interpolate(v, t)))
    if _is_number(v):
        return _fmt(float(v))
    return str(v)


def _sub(i: int) -> str:
    return "".join("₀₁₂₃₄₅₆₇₈₉"[int(c)] for c in str(i))
