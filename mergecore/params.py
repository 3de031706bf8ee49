"""Parameter values: a scalar, a curve over the layers, or per-tensor-name overrides.

The three forms, all mergekit-compatible YAML:

* scalar: ``density: 0.5``
* curve: ``t: [0, 0.5, 1]`` -- anchors spread evenly over the layers of a slice and
  interpolated linearly at ``t = layer / (num_layers - 1)`` (non-numeric lists are stepped);
* filters: ``t: [{filter: self_attn, value: [0, 1]}, {filter: mlp, value: 0.3}, {value: 0.5}]``
  -- the first entry whose ``filter`` is a plain substring of the tensor name wins; an entry
  without a filter (or ``*``) matches everything; each value may itself be a curve.

A value that resolves to nothing (no filter matched) falls through to the next level of the
recipe (slice source > slice > global), exactly as in mergekit.

Curve presets (flat, ramp up/down, U-shape, bell) live here too. They expand into plain anchor
lists, so a recipe written by the app stays a plain mergekit recipe.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from mergecore.errors import MergeError, short

UNSET: Any = object()


def is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, dict) for v in value)


def is_curve(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and not is_filter_list(value)


def interpolate(anchors: Sequence[Any], t: float) -> Any:
    """Sample a curve at t in [0, 1]: numbers are interpolated linearly, anything else stepped."""
    if len(anchors) == 1:
        return anchors[0]
    t = min(max(float(t), 0.0), 1.0)
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in anchors)
    if not numeric:
        return anchors[int(t * (len(anchors) - 1))]
    scaled = t * (len(anchors) - 1)
    lo = int(math.floor(scaled))
    hi = min(lo + 1, len(anchors) - 1)
    frac = scaled - lo
    return _as_float(anchors[lo]) * (1.0 - frac) + _as_float(anchors[hi]) * frac


def _as_float(x: int | float) -> float:
    """float(x), with integers beyond float range as +-inf: the parameter check then refuses
    the value by name instead of an OverflowError escaping from here."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def filter_matches(pattern: Any, tensor_name: str) -> bool:
    return pattern is None or pattern == "*" or str(pattern) in tensor_name


def resolve(value: Any, tensor_name: str, t: float) -> Any:
    """Resolve a recipe value for one tensor at layer position t; UNSET if no filter matched."""
    if value is None:
        return UNSET
    if is_filter_list(value):
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise MergeError(
                    f"a filtered parameter entry needs 'value' (and optionally 'filter'); got {short(entry)}"
                )
            if filter_matches(entry.get("filter"), tensor_name):
                return resolve(entry["value"], tensor_name, t)
        return UNSET
    if is_curve(value):
        return interpolate(value, t)
    if isinstance(value, dict):
        raise MergeError(f"a parameter value must be a scalar, a list or a list of filters; got {short(value)}")
    return value


def layer_position(index: int, num_layers: int) -> float:
    """mergekit's t for layer `index` of a slice with `num_layers` layers."""
    return index / (num_layers - 1) if num_layers > 1 else 1.0


# ---------------------------------------------------------------------------------------------
# Curve presets (used by the app's curve editor and the CLI's `--curve` helpers).


def _flat(x: float) -> float:
    return 0.0


def _ramp_up(x: float) -> float:
    return x


def _ramp_down(x: float) -> float:
    return 1.0 - x


def _u_shape(x: float) -> float:
    return (2.0 * x - 1.0) ** 2


def _bell(x: float) -> float:
    return math.exp(-0.5 * ((x - 0.5) / 0.2) ** 2)


CURVE_PRESETS: dict[str, Callable[[float], float]] = {
    "flat": _flat,
    "ramp_up": _ramp_up,
    "ramp_down": _ramp_down,
    "u_shape": _u_shape,
    "bell": _bell,
}


def preset_curve(name: str, low: float, high: float, points: int = 5) -> list[float]:
    """Anchors for a preset: low + (high - low) * shape(x) at `points` evenly spaced x in [0, 1].

    `flat` is constant at `low`. Values are rounded to 4 decimals so YAML stays readable.
    """
    try:
        shape = CURVE_PRESETS[name]
    except KeyError:
        raise MergeError(
            f"unknown curve preset {short(name)}; valid presets: {', '.join(CURVE_PRESETS)}"
        ) from None
    if points < 1:
        raise MergeError("a curve needs at least one point")
    if points == 1 or name == "flat":
        return [round(float(low), 4)] * (1 if name == "flat" else points)
    xs = [i / (points - 1) for i in range(points)]
    return [round(low + (high - low) * shape(x), 4) for x in xs]


def sample_curve(value: Any, num_layers: int) -> list[Any]:
    """The per-layer values a curve (or scalar) takes on a model of `num_layers` layers."""
    return [resolve(value, "", layer_position(i, num_layers)) for i in range(num_layers)]
