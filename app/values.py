"""The values of the Recipe tab's form: how one is typed, shown, checked, and written to a recipe.

A value is a scalar, a curve (a list of anchors interpolated over the layers), a split curve
(`attn` / `mlp` / `other`: separate values for attention tensors, MLP tensors and the rest), or
`{"raw": ...}` for anything imported that the form cannot edit (passed through unchanged). A
split curve becomes a recipe's filter list with the filters the engine's architecture table
gives for the models (`mergecore.arch.group_filters`), and a filter list comes back as a split
curve only when writing it again gives the same result for every tensor.

A field (what `app.forms.form_fields` gives) is a dict with at least label, type, range and
range_text.
"""

from __future__ import annotations

from typing import Any, Optional

import yaml

from mergecore.errors import MergeError, short
from mergecore.yamlio import load_yaml

GROUP_LABELS = {"all": "all tensors", "attn": "attention tensors", "mlp": "MLP tensors",
                "other": "other tensors (norms, embeddings, heads)"}
Filters = tuple[Optional[str], tuple[str, ...]]  # the attention filter (or None) and the MLP filters


def groups() -> tuple[str, ...]:
    """The tensor groups a value may differ by (the engine's: attention, MLP, the rest)."""
    from mergecore.arch import groups as arch_groups

    return arch_groups()


def is_split(value: Any) -> bool:
    return isinstance(value, dict) and set(value) <= set(groups()) and bool(value)


def is_raw(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"raw"}


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e-4 or v == 0 else f"{v:.3e}"


def value_to_text(value: Any) -> str:
    """How a value is shown in its text field: a number (`0.5`), a curve's anchors (`[0.3, 0.7]`),
    separate curves as `attn: [0, 1]; mlp: [1, 0]; other: 0.5`, an imported filter list in the
    recipe's own (YAML flow) syntax."""
    if is_raw(value):
        value = value["raw"]
    if isinstance(value, float):
        return fmt(value)
    if is_split(value):
        return "; ".join(f"{g}: {value_to_text(v)}" for g, v in value.items())
    text = yaml.safe_dump(_round(value), default_flow_style=True, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _round(v: Any) -> Any:
    if isinstance(v, float):
        r = float(fmt(v))
        return int(r) if r.is_integer() and abs(r) < 1e15 else r  # [0, 1], not [0.0, 1.0]
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def _check_number(field: dict[str, Any], v: Any) -> float:
    if not is_number(v):
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


def text_to_value(field: dict[str, Any], text: str, filters: Optional[Filters] = None) -> Any:
    """Parse what the user typed: a number, anchors (`[0.2, 0.8]` or `0.2, 0.8`), separate curves
    (`attn: [0, 1]; mlp: [1, 0]; other: 0.5`, or the same in braces), or a recipe filter list
    (`[{filter: self_attn, value: 1}, {value: 0}]`: with the models' `filters` it becomes separate
    curves when it means the same, else it is kept as typed). Checked against the field's range."""
    text = (text or "").strip()
    if field["type"] == "str":
        return check_value(field, text)
    if not text:
        raise MergeError(f"{field['label']}: give a value")
    if ";" in text or (text.split(":", 1)[0].strip() in groups() and not text.startswith("{")):
        text = "{" + text.replace(";", ",") + "}"
    try:
        value = load_yaml(text, field["label"])  # size and alias limits: typed in the browser
    except MergeError:
        raise MergeError(f"{field['label']}: cannot read {short(text)}; write a number, [0.2, 0.8] or "
                         f"attn: [0, 1]; mlp: [1, 0]; other: 0.5") from None
    if isinstance(value, str) and "," in value:  # anchors without brackets: 0.2, 0.8
        try:
            value = [float(x) for x in value.split(",")]
        except ValueError:
            pass
    from mergecore.params import is_filter_list

    if is_filter_list(value):
        return check_filter_list(field, value, filters)
    if isinstance(value, dict) and not is_split(value):
        raise MergeError(f"{field['label']}: separate curves use the keys {', '.join(groups()[:-1])} and "
                         f"{groups()[-1]}, got {short(list(value))}")
    return check_value(field, value)


def check_filter_list(field: dict[str, Any], value: list, filters: Optional[Filters] = None) -> Any:
    """A recipe filter list typed or imported for a field: every entry a `filter` (text, optional)
    and a `value` in the field's range. Separate curves when it means the same for these models
    (`filters`), else kept as it is (`{"raw": ...}`)."""
    for entry in value:
        if "value" not in entry or set(entry) - {"filter", "value"}:
            raise MergeError(f"{field['label']}: each filter entry needs 'value' and optionally 'filter', "
                             f"got {short(entry)}")
        if entry.get("filter") is not None and not isinstance(entry["filter"], str):
            raise MergeError(f"{field['label']}: a filter is a piece of a tensor name, got {short(entry['filter'])}")
        if isinstance(entry["value"], dict):
            raise MergeError(f"{field['label']}: a filter's value is a number or a curve, got {short(entry['value'])}")
        check_value(field, entry["value"])
    return value_from_recipe(value, filters) if filters is not None else {"raw": value}


def unmatched_filters(value: Any, names: list[str]) -> list[str]:
    """The filters of a recipe value (a filter list, or one kept as imported) that match none of
    the tensor `names` (their entries never apply)."""
    from mergecore.params import filter_matches, is_filter_list

    value = value["raw"] if is_raw(value) else value
    if not is_filter_list(value) or not names:
        return []
    pats = [str(e["filter"]) for e in value if e.get("filter") not in (None, "*")]
    return [p for p in dict.fromkeys(pats) if not any(filter_matches(p, n) for n in names)]


def filter_warning(label: str, missed: list[str], filters: Filters) -> str:
    """The warning for filters of `label`'s value that match no tensor (`unmatched_filters`), with
    the filters that do select these models' attention and MLP tensors (`group_filters`)."""
    attn, mlp = filters
    these = "; ".join(x for x in (f"attention tensors match '{attn}'" if attn else "",
                                  f"MLP tensors match {', '.join(repr(m) for m in mlp)}" if mlp else "") if x)
    one = len(missed) == 1
    return (f"{label}: filter{'' if one else 's'} {', '.join(repr(m) for m in missed)} match{'es' if one else ''} "
            f"no tensor of the loaded models, so {'its value' if one else 'their values'} never appl"
            f"{'ies' if one else 'y'}" + (f" (here {these})" if these else ""))


def group_filters(tensor_names: list[str]) -> Filters:
    """The recipe filters that select attention and MLP tensors in these models (the engine's)."""
    from mergecore.arch import group_filters as arch_filters

    return arch_filters(tensor_names)


def value_to_recipe(value: Any, filters: Filters) -> Any:
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


def value_from_recipe(value: Any, filters: Filters) -> Any:
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
            if not (is_number(v) or (isinstance(v, list) and v and all(is_number(x) for x in v))):
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
        return list(value) if all(is_number(x) for x in value) else {"raw": value}
    if isinstance(value, dict):
        return {"raw": value}
    return value
