"""The per-layer side of the Recipe tab: the curves of numeric fields (whole, or split into
attention / MLP / other tensors), what the ends of a parameter's scale mean, and the formula
panel (the method's formula with the values at the first, middle and last layer).

The formula and the scale ends come from the method (`MergeMethod.formula_text`,
`ParamSpec.end_labels`); the app fills in the session's model names.
"""

from __future__ import annotations

from typing import Any, Optional

from mergecore.errors import MergeError

from app.forms import field_by_key, form_fields, get_method, recipe_models, set_value
from app.values import fmt, groups, is_number, is_raw, is_split, value_to_text


def curve_targets(form: dict[str, Any], state: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, key) of every numeric field: what the curve editor can edit."""
    return [(f["label"], f["key"]) for f in form_fields(form["method"], state, form) if f["numeric"]]


def effective(value: Any, state: Optional[dict[str, Any]]) -> Any:
    """What a value kept as imported (a filter list) gives on the session's models: one value, or
    one per tensor group (attention / MLP / other) when that is what it means here; None when
    tensors of one group get different values (or none: the value falls through)."""
    from mergecore.arch import find_architecture, tensor_group
    from mergecore.params import UNSET

    from app.state import tensor_names

    if not is_raw(value):
        return value
    try:
        names = tensor_names(state or {})
    except MergeError:
        return None
    arch = find_architecture(names=names)
    per_group: dict[str, set[str]] = {}
    found: dict[str, Any] = {}
    for n in names:
        g = tensor_group(n, arch)
        try:
            v = _first_match(value["raw"], n, UNSET)
        except MergeError:
            return None
        if v is UNSET or not (is_number(v) or (isinstance(v, list) and v and all(is_number(x) for x in v))):
            return None
        per_group.setdefault(g, set()).add(repr(v))
        found[g] = v
    if not found or any(len(vs) > 1 for vs in per_group.values()):
        return None
    if len({repr(v) for v in found.values()}) == 1:
        return next(iter(found.values()))
    return {g: found[g] for g in groups() if g in found}


def _first_match(raw: Any, name: str, unset: Any) -> Any:
    """The value (a number or a curve, unresolved over the layers) a filter list gives tensor `name`."""
    from mergecore.params import filter_matches, is_filter_list

    if not is_filter_list(raw):
        return unset
    for entry in raw:
        if "value" in entry and filter_matches(entry.get("filter"), name):
            return entry["value"]
    return unset


def get_curve(form: dict[str, Any], key: str, group: str = "all", points: int = 5,
              state: Optional[dict[str, Any]] = None) -> list[float]:
    """The anchors the curve editor shows for a field (and tensor group); a value kept as
    imported shows what it gives on the session's models (`effective`)."""
    value = form["values"].get(key)
    if is_raw(value):
        value = effective(value, state)
        if value is None:
            raise MergeError(f"'{key}' holds imported filters that give tensors of one group different values: "
                             f"edit them in the YAML, or type a value in the form to replace them")
    if is_split(value):
        value = value.get(group if group in groups() else "attn", value.get("other", 0.0))
    if isinstance(value, list):
        return [float(v) for v in value]
    v = float(value) if is_number(value) else 0.0
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
    if is_raw(cur):  # imported filters: edited as what they give on these models
        cur = effective(cur, state)
    if group == "all":
        new: Any = anchors
    else:
        if is_split(cur):
            new = dict(cur)
        else:
            base = cur if (isinstance(cur, list) or is_number(cur)) else anchors
            new = {"attn": base, "mlp": base, "other": base[0] if isinstance(base, list) else base}
        new[group] = anchors
    return set_value(form, state, key, new)


def set_split(form: dict[str, Any], state: dict[str, Any], key: str, split: bool) -> dict[str, Any]:
    """Turn separate attention / MLP curves on (copying the current curve) or off (keeping attn's)."""
    cur = form["values"].get(key)
    if is_raw(cur):
        cur = effective(cur, state)
        if cur is None:
            raise MergeError(f"'{key}' holds imported filters the curve editor cannot show; edit them in the YAML")
        if split == is_split(cur):
            return set_value(form, state, key, cur)
    if split and not is_split(cur):
        new: Any = {"attn": cur, "mlp": cur, "other": cur[0] if isinstance(cur, list) else cur}
    elif not split and is_split(cur):
        new = cur.get("attn", cur.get("other"))
    else:
        return form
    return set_value(form, state, key, new)


def endpoint_labels(field: dict[str, Any], state: dict[str, Any], form: Optional[dict[str, Any]] = None
                    ) -> tuple[str, str]:
    """What the bottom and top of a parameter's scale mean, in words (the method's labels with
    the session's names; the range's ends when it has none)."""
    if field.get("ends"):
        base = state.get("base") or "base"
        others = [m["name"] for m in state.get("models", []) if m["name"] != base
                  and m["name"] not in (form or {}).get("left_out", ())]
        names = {"base": base, "model": field["model"] or "each model",
                 "other": others[0] if others else "the other model"}
        low, high = field["ends"]
        return low.format(**names), high.format(**names)
    lo, hi = field["range"] or (None, None)
    return (f"{lo:g}" if lo is not None else "0"), (f"{hi:g}" if hi is not None else "1")


def formula_markdown(form: dict[str, Any], state: dict[str, Any]) -> str:
    """The method's formula, then its current values at the first, middle and last layer."""
    from mergecore.params import interpolate, layer_position

    from app.state import num_layers

    method = get_method(form["method"])
    n = num_layers(state)
    layers = sorted({0, (n - 1) // 2, n - 1})
    lines = [f"**{method.name}**: `{method.formula_text}`"]
    base = state.get("base")
    names = [n for n in recipe_models(state, form) if n != base or method.base == "ignored"]
    if method.base != "ignored" and base:
        lines.append(f"θ₀ = **{base}** (base)" + "".join(f", θ{_sub(i + 1)} = **{m}**" for i, m in enumerate(names)))
    else:
        lines.append(", ".join(f"θ{_sub(i + 1)} = **{m}**" for i, m in enumerate(names)))
    fields = [f for f in form_fields(form["method"], state, form) if f["numeric"]]
    if fields:
        head = "| parameter | " + " | ".join(f"layer {i}" for i in layers) + " |"
        rows = [head, "|---|" + "---|" * len(layers)]
        for f in fields:
            v = form["values"].get(f["key"], f["default"])
            shown = effective(v, state)  # imported filters: what they give here
            v = v if shown is None else shown
            cells = []
            for i in layers:
                t = layer_position(i, n)
                cells.append(_at(v, t, interpolate))
            rows.append(f"| {f['label']} | " + " | ".join(cells) + " |")
        lines.append("\n".join(rows))
        lines.append("Curves: anchors are spread evenly over the layers and interpolated linearly; "
                     "embeddings and heads take a curve's first value.")
    others = [f for f in form_fields(form["method"], state, form) if not f["numeric"]]
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
        return fmt(float(interpolate(v, t)))
    if is_number(v):
        return fmt(float(v))
    return str(v)


def _sub(i: int) -> str:
    return "".join("₀₁₂₃₄₅₆₇₈₉"[int(c)] for c in str(i))
