"""The genome of an evolutionary merge search: the free parameters of a recipe template.

A template fixes the method, the models and some parameters, and names the parameters to
search with their bounds. Each searched parameter gets one gene per

    (model if the parameter is per-model) x (tensor filter, plus "the rest") x (layer group)

in that nesting order (parameters in the order given). Genes live in [0, 1] (CMA-ES works on
that cube, sigma0 = 1/6 as in mergekit-evolve) and map linearly onto each parameter's bounds.
A genome decodes to a plain recipe:

* `layer_groups: G > 1` makes each value a curve of G anchors (interpolated over the layers,
  as every mergecore / mergekit curve; tensors outside the layers take the first anchor);
  `G = 1` gives a scalar;
* `filters: [self_attn, mlp]` gives a filter list `[{filter: self_attn, value: ...},
  {filter: mlp, value: ...}, {value: ...}]`, the last entry for every other tensor;
* per-model parameters go under each model, global ones under `parameters`, next to `fixed`.

Values are rounded to 5 significant digits; the search scores the decoded (rounded) recipe,
so the recipe it writes replays to the score it reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from mergecore.errors import MergeError
from mergecore.methods import get_method
from mergecore.recipe import Recipe, recipe_from_dict


@dataclass(frozen=True)
class Bounds:
    min: float
    max: float
    init: Optional[float] = None  # starting value (default: the middle of the bounds)

    def x0(self) -> float:
        v = (self.min + self.max) / 2 if self.init is None else self.init
        return (v - self.min) / (self.max - self.min)

    def value(self, x: float) -> float:
        x = min(max(float(x), 0.0), 1.0)
        return _round(self.min + x * (self.max - self.min))


def _round(v: float, digits: int = 5) -> float:
    if v == 0 or not math.isfinite(v):
        return float(v)
    return float(f"{v:.{digits}g}")


@dataclass(frozen=True)
class Gene:
    param: str
    model: Optional[int]  # index into models for per-model parameters, None for global ones
    filter: Optional[str]  # tensor filter, None for "every other tensor" (or no filters)
    group: int  # curve anchor

    def label(self, models: list[str]) -> str:
        parts = [self.param]
        if self.model is not None:
            parts.append(models[self.model].rstrip("/").rsplit("/", 1)[-1])
        if self.filter is not None:
            parts.append(self.filter)
        parts.append(f"g{self.group}")
        return ".".join(parts)


@dataclass(frozen=True)
class Genome:
    """A recipe template and its genes (picklable: search workers build candidates from it)."""

    method: str
    models: tuple[str, ...]
    parameters: tuple[tuple[str, Bounds], ...]
    base_model: Optional[str] = None
    layer_groups: int = 1
    filters: tuple[str, ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()
    dtype: Optional[str] = "float32"
    seed: Optional[int] = None  # recipe seed (randomised methods: DARE, DELLA)
    name: str = "evo"
    artifacts: tuple[tuple[str, str], ...] = ()  # files a data-informed template reads (statistics)
    genes: tuple[Gene, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        m = get_method(self.method)
        if not self.models:
            raise MergeError("models must list at least one model")
        if self.layer_groups < 1:
            raise MergeError("layer_groups must be at least 1")
        if not self.parameters:
            raise MergeError("parameters: name at least one parameter to search")
        fixed = dict(self.fixed)
        genes: list[Gene] = []
        for name, b in self.parameters:
            spec = m.param(name)
            if spec is None:
                valid = ", ".join(p.name for p in m.params) or "(none)"
                raise MergeError(f"parameters: '{name}' is not a parameter of method '{m.name}'; valid: {valid}")
            if spec.type not in (float, int) or spec.choices:
                raise MergeError(f"parameters: '{name}' of '{m.name}' is a {spec.type.__name__}; only numbers can be "
                                 f"searched (give it under 'fixed')")
            if spec.type is int:
                raise MergeError(f"parameters: '{name}' of '{m.name}' is an integer; only real parameters can be "
                                 f"searched")
            if not b.min < b.max:
                raise MergeError(f"parameters: '{name}': min ({b.min}) must be below max ({b.max})")
            if b.init is not None and not b.min <= b.init <= b.max:
                raise MergeError(f"parameters: '{name}': init ({b.init}) is outside [{b.min}, {b.max}]")
            if spec.range is not None and not (spec.range.contains(b.min) and spec.range.contains(b.max)):
                raise MergeError(f"parameters: '{name}': bounds [{b.min}, {b.max}] leave the method's range "
                                 f"{spec.range}")
            if name in fixed:
                raise MergeError(f"'{name}' is both searched (parameters) and fixed")
            owners = range(len(self.models)) if spec.per_model else [None]
            sets = list(self.filters) + [None] if self.filters else [None]
            for owner in owners:
                for f in sets:
                    for g in range(self.layer_groups):
                        genes.append(Gene(name, owner, f, g))
        for name in fixed:
            if m.param(name) is None:
                valid = ", ".join(p.name for p in m.params) or "(none)"
                raise MergeError(f"fixed: '{name}' is not a parameter of method '{m.name}'; valid: {valid}")
        if len(set(self.filters)) != len(self.filters):
            raise MergeError("filters must be distinct")
        if m.base == "required" and not self.base_model:
            raise MergeError(f"method '{m.name}' needs a base_model")
        object.__setattr__(self, "genes", tuple(genes))

    # -- genes ---------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return len(self.genes)

    @property
    def bounds(self) -> dict[str, Bounds]:
        return dict(self.parameters)

    def labels(self) -> list[str]:
        return [g.label(list(self.models)) for g in self.genes]

    def x0(self) -> list[float]:
        b = self.bounds
        return [b[g.param].x0() for g in self.genes]

    def values(self, x: list[float]) -> list[float]:
        """The parameter value of each gene (bounds applied, rounded)."""
        if len(x) != self.dim:
            raise MergeError(f"a genome of this template has {self.dim} genes, got {len(x)}")
        b = self.bounds
        return [b[g.param].value(v) for g, v in zip(self.genes, x)]

    # -- decoding --------------------------------------------------------------------------------

    def _value(self, vals: dict[tuple, float], param: str, model: Optional[int]) -> Any:
        def curve(f: Optional[str]) -> Any:
            anchors = [vals[(param, model, f, g)] for g in range(self.layer_groups)]
            return anchors[0] if len(anchors) == 1 else anchors

        if not self.filters:
            return curve(None)
        return [{"filter": f, "value": curve(f)} for f in self.filters] + [{"value": curve(None)}]

    def recipe_dict(self, x: list[float]) -> dict[str, Any]:
        m = get_method(self.method)
        values = self.values(x)
        vals = {(g.param, g.model, g.filter, g.group): v for g, v in zip(self.genes, values)}
        searched = [name for name, _ in self.parameters]
        per_model = [p for p in searched if m.param(p).per_model]
        global_ = [p for p in searched if not m.param(p).per_model]
        models = []
        for i, ref in enumerate(self.models):
            entry: dict[str, Any] = {"model": ref}
            if per_model:
                entry["parameters"] = {p: self._value(vals, p, i) for p in per_model}
            models.append(entry)
        data: dict[str, Any] = {"merge_method": self.method}
        if self.base_model:
            data["base_model"] = self.base_model
        data["models"] = models
        params = dict(self.fixed)
        params.update({p: self._value(vals, p, None) for p in global_})
        if params:
            data["parameters"] = params
        if self.dtype:
            data["dtype"] = self.dtype
        if self.seed is not None:
            data["seed"] = self.seed
        if self.artifacts:
            data["artifacts"] = dict(self.artifacts)
        data["name"] = self.name
        return data

    def recipe(self, x: list[float]) -> Recipe:
        return recipe_from_dict(self.recipe_dict(x), where="evo genome")

    @property
    def refs(self) -> list[str]:
        """Every model the recipes read, base first."""
        return list(dict.fromkeys(([self.base_model] if self.base_model else []) + list(self.models)))

    @property
    def reference(self) -> str:
        """The model whose layout the merged model has (loaded once as the resident model)."""
        return self.base_model or self.models[0]

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed with this template."""
        return {"method": self.method, "models": list(self.models), "base_model": self.base_model,
                "parameters": [[n, [b.min, b.max, b.init]] for n, b in self.parameters],
                "layer_groups": self.layer_groups, "filters": list(self.filters),
                "fixed": [[k, v] for k, v in self.fixed], "dtype": self.dtype, "seed": self.seed,
                **({"artifacts": [list(a) for a in self.artifacts]} if self.artifacts else {})}


def template_methods() -> list[str]:
    """Merge methods a template can use: operator methods with a real-valued parameter to search."""
    from mergecore.methods import all_methods

    return [name for name, m in all_methods().items()
            if m.operator and any(p.type is float and not p.choices for p in m.params)]


def default_bounds(method_name: str) -> dict[str, dict[str, float]]:
    """The method's required real parameters, searched within [0, 1] (cut to their range)."""
    from mergecore.methods import get_method

    out = {}
    for p in get_method(method_name).params:
        if p.type is float and not p.choices and p.required:
            lo, hi, r = 0.0, 1.0, p.range
            if r is not None and r.lo is not None and r.lo >= lo:
                lo = r.lo + (0.01 if r.lo_open else 0.0)
            if r is not None and r.hi is not None and r.hi <= hi:
                hi = r.hi - (0.01 if r.hi_open else 0.0)
            if lo < hi:
                out[p.name] = {"min": lo, "max": hi}
    return out
