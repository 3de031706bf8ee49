"""Merge-method registry: a method is a small pure function whose signature is its schema.

A method module defines one function per method name and decorates it with `@merge_method`.
The decorator reads the function's keyword-only parameters and turns each into a `ParamSpec`:

* a parameter annotated `float`, `int`, `bool` or `str` is *global*: one value per tensor;
* a parameter annotated `PerModel[float]` (etc.) is *per-model*: the function receives a list
  with one value per entry of `tensors`;
* `Annotated[..., Range(lo, hi), "help text"]` adds a range check and a help line;
* a trailing underscore is dropped from the YAML name (`lambda_` is `lambda` in recipes);
* a parameter without a default is required;
* four keyword names are *context*, not parameters: `generator` (a `torch.Generator` seeded per
  tensor, for randomised methods), `tensor_name` (the output tensor's name), `artifacts`
  (the recipe's `artifacts:` as a dict name -> resolved file path, e.g. DAM's coefficients) and
  `input_models` (the model refs of `tensors`, in order: a data-informed method matches its
  statistics to its inputs by model, never by position).

Tag `streaming` (in `merge_method(..., tags=("streaming",))`) says the method reads each entry
of `tensors` once, in order. The executor then hands it an `OwnedInputs` sequence that reads
each tensor from disk when it is accessed, so only one model's tensor is in memory at a time,
and the method may overwrite it (`owns_inputs(tensors)` is True). Tag `copy` says the method is
the identity on its one input when every parameter is at its default: the planner then copies
the bytes (no float32 round trip), as passthrough slices need.

The function's positional arguments are always `(tensors, base)`: `tensors` is the list of
input tensors (float32, same shape) in recipe order, `base` the base model's tensor or None.
For methods with `base="required"` or `"optional"` the base model is *not* part of `tensors`
even if the recipe lists it under `models`; for `base="ignored"` every listed model is in
`tensors` and `base` is None.

Adding a method takes one new module in this package and nothing else: `mergecore.methods`
imports every module here at start-up, and its `get_method` / `all_methods` are the lookups
(this module never imports the package, so the registry has no import cycle).
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Literal, Mapping, Optional, Sequence, TypeVar

import torch

from mergecore.errors import MergeError, short
from mergecore.methods._grid import Grid, check_grid, grid_points

T = TypeVar("T")


class PerModel(list, Generic[T]):
    """Annotation marker: one value per input model (the function receives a list)."""


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()

CONTEXT_ARGS = ("generator", "tensor_name", "artifacts", "input_models")

# The two positional arguments of every method, as annotations: `def m(tensors: Tensors, base: BaseTensor, *, ...)`.
Tensors = list[torch.Tensor]  # the inputs: float tensors of one shape, in recipe order
BaseTensor = Optional[torch.Tensor]  # the base model's tensor; None when the method takes none


def need_base(method: str, base: BaseTensor) -> torch.Tensor:
    """`base`, or the one-line error of a call without one (recipes are checked when planned)."""
    if base is None:
        raise MergeError(f"{method} needs a base_model")
    return base


def need_count(method: str, tensors: Sequence[torch.Tensor], lo: int, hi: int | None, what: str) -> None:
    """Refuse a call with fewer than `lo` or more than `hi` inputs; `what` says what it takes."""
    n = len(tensors)
    if n < lo or (hi is not None and n > hi):
        raise MergeError(f"{method} takes {what}, got {n}")


@dataclass(frozen=True)
class Range:
    """Closed or half-open numeric interval used to validate parameter values."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return False
        return True

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


@dataclass(frozen=True)
class Ends:
    """What the two ends of a parameter's scale mean, for the app's curve editor:
    `Annotated[float, Range(0, 1), Ends("0 = {base} (base)", "1 = {other}")]`. Placeholders:
    `{base}` (the base model's name), `{model}` (the model a per-model value belongs to),
    `{other}` (the first model that is not the base)."""

    low: str
    high: str


# Labels for parameter names shared by many methods; a method's own `Ends` wins.
COMMON_ENDS: dict[str, Ends] = {
    "weight": Ends("0 = ignore {model}", "1 = full weight for {model}"),
    "density": Ends("0 = keep none of {model}'s changes", "1 = keep all of them"),
    "lambda": Ends("0 = {base} only", "1 = task vectors at full scale"),
    "gamma": Ends("0 = drop no outliers", "1 = drop everything"),
    "select_topk": Ends("0 = keep no entries", "1 = keep all entries"),
    "scale": Ends("0 = zero the tensors", "1 = unchanged"),
}


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter of a method."""

    name: str  # name in recipes
    arg: str  # python argument name
    type: type  # float, int, bool or str
    per_model: bool
    default: Any = REQUIRED
    range: Range | None = None
    choices: tuple | None = None
    help: str = ""
    ends: Ends | None = None  # what the scale's ends mean (falls back to COMMON_ENDS by name)

    def first_value(self, n_models: int) -> Any:
        """The value a form field starts at: the default, or for a required parameter its first
        choice, False, "", an equal share for a weight (1/n), the middle of its range, 0.5 or 1."""
        if not self.required:
            return self.default
        if self.choices:
            return self.choices[0]
        if self.type is bool:
            return False
        if self.type is str:
            return ""
        if self.name == "weight":
            return round(1.0 / max(1, n_models), 4)
        rng = self.range
        if rng is not None and rng.lo is not None and rng.hi is not None:
            v = (rng.lo + rng.hi) / 2
            return int(v) if self.type is int else v
        return 1 if self.type is int else 0.5

    @property
    def end_labels(self) -> Ends | None:
        """The labels of this parameter's scale ends (its own, else the common ones for its name)."""
        return self.ends or COMMON_ENDS.get(self.name)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, where: str = "") -> Any:
        """Convert a resolved recipe value to this parameter's type, or raise MergeError."""
        at = f" ({where})" if where else ""
        if value is None and not self.required:
            return self.default
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    value = low in ("true", "1", "yes")
                elif isinstance(value, (int, float, bool)):
                    value = bool(value)
                else:
                    raise ValueError(value)
            elif self.type is float:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError(value)
                value = float(value)
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                value = int(value)
            elif self.type is str:
                value = str(value)
        except (TypeError, ValueError, OverflowError):
            if self.type in (float, int) and _non_finite(value):
                raise MergeError(f"parameter '{self.name}'{at} must be a finite number, got {short(value)}") from None
            raise MergeError(
                f"parameter '{self.name}'{at} must be a {self.type.__name__}, got {short(value)}"
            ) from None
        if self.type is float and not math.isfinite(value):
            # inf / nan (YAML .inf, .nan, "1e400") would turn every merged value non-finite
            raise MergeError(f"parameter '{self.name}'{at} must be a finite number, got {short(value)}")
        if self.range is not None and not self.range.contains(value):
            raise MergeError(
                f"parameter '{self.name}'{at} = {short(value)} is out of range {self.range}"
            )
        if self.choices is not None and value not in self.choices:
            raise MergeError(
                f"parameter '{self.name}'{at} = {short(value)} is not one of {', '.join(map(str, self.choices))}"
            )
        return value

    def describe(self) -> str:
        kind = "per-model" if self.per_model else "global"
        default = "required" if self.required else f"default {self.default!r}"
        extra = f", range {self.range}" if self.range else ""
        if self.choices:
            extra += f", one of {'/'.join(map(str, self.choices))}"
        return f"{self.name} ({self.type.__name__}, {kind}, {default}{extra})"


def _non_finite(value: Any) -> bool:
    """True for a value that names infinity or NaN, or an integer too large for a float."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, int):
        return abs(value) > 2**1023
    if isinstance(value, str) and len(value) < 64:
        try:
            return not math.isfinite(float(value))
        except ValueError:
            return False
    return False


def unused_warning(key: str, places: list[str], names: list[str], valid: set[str]) -> str:
    """The warning for a parameter no method of `names` reads (mergekit ignores such keys too)."""
    where = places[0] if len(places) == 1 else f"{places[0]} and {len(places) - 1} more"
    close = difflib.get_close_matches(key, sorted(valid), n=1) if len(key) <= 64 else []
    hint = f"; did you mean '{close[0]}'?" if close else f" (its parameters: {', '.join(sorted(valid)) or 'none'})"
    return (f"{where}: parameter {short(key, 60)} is not used by method '{'/'.join(names)}' and is "
            f"ignored{hint}")


BaseRule = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the function plus what the executor needs to call it."""

    name: str
    func: Callable[..., torch.Tensor]
    params: tuple[ParamSpec, ...]
    base: BaseRule
    summary: str
    paper: str
    doc: str
    min_models: int = 1
    max_models: int | None = None
    context: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default=())
    # what the app and the searches need to know, kept on the method (no method name elsewhere):
    formula: str = ""  # one line of math shown beside the form (falls back to `summary`)
    operator: bool = True  # usable as an RMM layer operator and as an evolutionary template
    starting: tuple[tuple[str, Any], ...] = ()  # parameter values a new operator/template starts from
    cost: Optional[Callable[..., Any]] = None  # (shape, n_models, params) -> methods._cost.Cost, for --dry-run
    # the statistics a data-informed method reads from its artifact ("gram", "fisher", "gram_plusplus"),
    # so the CLI and the app know it needs a tasks file and which collection to run; None: none
    stats: Optional[str] = None
    grid: Grid = ()  # a few values of its scale parameters (lambda, alpha, density): what leaderboards try

    @property
    def formula_text(self) -> str:
        return self.formula or self.summary

    def starting_params(self) -> dict[str, Any]:
        """The parameters a new RMM operator or evolutionary template starts from: `starting`,
        and every other required parameter at 0.5 (a float), its first choice, or 1."""
        start = dict(self.starting)
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in start:
                out[p.name] = start[p.name]
            elif p.required:
                out[p.name] = 0.5 if p.type is float else (p.choices[0] if p.choices else 1)
        return out

    def grid_points(self) -> list[dict[str, Any]]:  # every combination of the grid's values ([] without one)
        return grid_points(self.grid)

    def accepts(self, n_models: int) -> bool:
        """Whether the method takes `n_models` inputs (the base not counted when it takes one)."""
        return self.min_models <= n_models and (self.max_models is None or n_models <= self.max_models)

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def per_model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def randomized(self) -> bool:
        return "generator" in self.context

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def missing_param(self, spec: ParamSpec, given: Iterable[Any], *, model: str = "", at: str = "",
                      fix: str = "set it in the parameters") -> MergeError:
        """The error for a required parameter without a value; names a likely typo among `given` keys."""
        who = f" for model '{model}'" if spec.per_model and model else ""
        known = {p.name for p in self.params}
        unknown = [k for k in given if isinstance(k, str) and k not in known and len(k) <= 64]
        typo = difflib.get_close_matches(spec.name, unknown, n=1)
        hint = f" ('{typo[0]}' in the recipe is not a parameter of '{self.name}': a typo?)" if typo else ""
        return MergeError(f"method '{self.name}' needs parameter '{spec.name}'{who}{f' ({at})' if at else ''}"
                          f"{hint}; {fix}")

    def resolve_params(self, raw: Mapping[str, Any], n_models: int, where: str = "") -> tuple[dict[str, Any], list[str]]:
        """Plain recipe-named values (one per parameter; a list for a per-model parameter gives one
        value per model, a single value is shared) -> the values a call takes, coerced and range
        checked as the executor does per tensor, defaults filled in; plus a warning per name the
        method does not read (ignored, as recipes ignore them). Raises a one-line MergeError."""
        known = {p.name for p in self.params}
        warnings = [unused_warning(str(k), [where or "parameters"], [self.name], known) for k in raw if k not in known]
        out: dict[str, Any] = {}
        for spec in self.params:
            value = raw.get(spec.name)
            values = value if spec.per_model and isinstance(value, list) else [value] * (n_models if spec.per_model else 1)
            if len(values) != (n_models if spec.per_model else 1):
                raise MergeError(f"{where}: '{spec.name}' needs {n_models} values, one per model, got {len(values)}")
            for v in values:
                if v is None and spec.required:
                    raise self.missing_param(spec, raw, at=where)
            coerced = [spec.coerce(v, where) for v in values]
            out[spec.name] = coerced if spec.per_model else coerced[0]
        return out, warnings

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        params: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        tensor_name: str = "",
        artifacts: dict[str, Any] | None = None,
        input_models: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Call the method with recipe-named parameters (already resolved and coerced)."""
        kwargs = {p.arg: params[p.name] for p in self.params if p.name in params}
        if "generator" in self.context:
            kwargs["generator"] = generator
        if "tensor_name" in self.context:
            kwargs["tensor_name"] = tensor_name
        if "artifacts" in self.context:
            kwargs["artifacts"] = dict(artifacts or {})
        if "input_models" in self.context:
            kwargs["input_models"] = list(input_models or ())
        if not owns_inputs(tensors):
            tensors = list(tensors)
        return self.func(tensors, base, **kwargs)


class OwnedInputs(Sequence[torch.Tensor]):
    """Input tensors loaded on access: each `[i]` returns a fresh float tensor the method owns."""

    owned = True

    def __init__(self, loaders: list[Callable[[], torch.Tensor]]):
        self._loaders = loaders

    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._loaders[j]() for j in range(*i.indices(len(self)))]
        return self._loaders[i]()


def owns_inputs(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the method may overwrite the tensors it reads from `tensors`."""
    return bool(getattr(tensors, "owned", False))


_REGISTRY: dict[str, MergeMethod] = {}


def _param_from_signature(p: inspect.Parameter, hint: Any) -> ParamSpec:
    rng: Range | None = None
    ends: Ends | None = None
    help_text = ""
    choices: tuple | None = None
    if typing.get_origin(hint) is typing.Annotated:
        hint, *meta = typing.get_args(hint)
        for m in meta:
            if isinstance(m, Range):
                rng = m
            elif isinstance(m, Ends):
                ends = m
            elif isinstance(m, str):
                help_text = m
    per_model = False
    if typing.get_origin(hint) is PerModel or hint is PerModel:
        per_model = True
        args = typing.get_args(hint)
        hint = args[0] if args else float
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        hint = type(choices[0])
    if hint not in (float, int, bool, str):
        raise TypeError(f"parameter {p.name}: unsupported annotation {hint!r}")
    default = REQUIRED if p.default is inspect.Parameter.empty else p.default
    return ParamSpec(name=p.name.rstrip("_"), arg=p.name, type=hint, per_model=per_model, default=default,
                     range=rng, choices=choices, help=help_text, ends=ends)


def merge_method(
    name: str | None = None,
    *,
    base: BaseRule = "ignored",
    summary: str,
    paper: str = "",
    min_models: int = 1,
    max_models: int | None = None,
    tags: Sequence[str] = (),
    formula: str = "",
    operator: bool = True,
    starting: dict[str, Any] | None = None,
    cost: Optional[Callable[..., Any]] = None,
    stats: Optional[str] = None,
    grid: Optional[Mapping[str, Sequence[Any]]] = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register `func` as merge method `name` (default: the function's name); its keyword-only
    parameters are its schema.

    `min_models`/`max_models` count the entries of `tensors` (the base excluded when the method
    takes a base). `summary` is the one line shown by `mergecore methods`; the function's
    docstring (equation and paper) is the long description. `formula` is one line of math for
    the app; `operator=False` keeps the method out of RMM operators and evolutionary templates;
    `starting` gives the values a new operator or template starts from (required parameters
    without one start at 0.5 / their first choice). `cost` estimates the extra work of one
    tensor for `--dry-run` (see `methods._cost`). `stats` names the statistics a data-informed
    method reads ("gram", "fisher", "gram_plusplus"; `mergecore collect-stats`). `grid` ({"lambda":
    (0.5, 1.0)}): values a leaderboard and bench/quality.py choose among on validation.
    """

    def decorate(func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        key = name or func.__name__
        if key in _REGISTRY:
            raise ValueError(f"merge method {key!r} registered twice")
        sig = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)
        params: list[ParamSpec] = []
        context: list[str] = []
        for p in sig.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.name in CONTEXT_ARGS:
                context.append(p.name)
                continue
            params.append(_param_from_signature(p, hints.get(p.name, float)))
        _REGISTRY[key] = MergeMethod(
            name=key,
            func=func,
            params=tuple(params),
            base=base,
            summary=summary,
            paper=paper,
            doc=inspect.cleandoc(func.__doc__ or ""),
            min_models=min_models,
            max_models=max_models,
            context=tuple(context),
            tags=tuple(tags),
            formula=formula,
            operator=operator,
            starting=tuple((starting or {}).items()),
            cost=cost,
            stats=stats,
            grid=check_grid(key, params, grid),
        )
        return func

    return decorate


def registered() -> dict[str, MergeMethod]:
    """The methods registered so far, by name (`mergecore.methods` imports every module first)."""
    return dict(sorted(_REGISTRY.items()))
