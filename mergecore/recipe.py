"""Recipe schema and YAML load/save, compatible with mergekit's merge configurations.

A recipe names a method, its models (or layer slices of them) and parameters. Everything that
makes a checkpoint -- a hand-written YAML, the app's form, a search -- produces one of these,
and the executor is the only thing that turns it into files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergecore.errors import MergeError, clip, short
from mergecore.params import is_filter_list
from mergecore.yamlio import load_yaml, load_yaml_file

ParamDict = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputModel(_Strict):
    model: str
    parameters: Optional[ParamDict] = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[ParamDict] = None


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: Optional[ParamDict] = None
    # mergecore extension: this slice uses its own method (searches mix methods per layer)
    merge_method: Optional[str] = None

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, v: list[InputSlice]) -> list[InputSlice]:
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class TokenizerConfig(_Strict):
    source: Optional[str] = None
    tokens: Optional[dict[str, Any]] = None
    pad_to_multiple_of: Optional[int] = None


class Recipe(_Strict):
    """A merge recipe (mergekit's `MergeConfiguration` plus mergecore extras)."""

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    modules: Optional[dict[str, Any]] = None
    parameters: Optional[ParamDict] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None
    # mergecore extras
    seed: Optional[int] = Field(default=None, description="seed for randomised methods (DARE, DELLA)")
    non_layer_from: Optional[str] = Field(
        default=None, description="copy tensors outside the layer stack (embeddings, final norm, heads) from this model"
    )
    artifacts: Optional[dict[str, str]] = Field(
        default=None, description="extra files a method reads (e.g. DAM coefficients)"
    )

    @model_validator(mode="after")
    def _one_layout(self) -> "Recipe":
        given = [k for k in ("models", "slices", "modules") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a recipe needs exactly one of 'models', 'slices' or 'modules'")
        if self.modules is not None:
            raise ValueError("multi-module recipes ('modules:') are not supported yet; use 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either 'tokenizer' or 'tokenizer_source', not both")
        return self

    # -- helpers -----------------------------------------------------------------------------

    @property
    def effective_tokenizer_source(self) -> Optional[str]:
        if self.tokenizer is not None:
            return self.tokenizer.source or "union"
        return self.tokenizer_source

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, without duplicates, in recipe order."""
        seen: list[str] = []
        if self.base_model:
            seen.append(self.base_model)
        if self.models:
            seen += [m.model for m in self.models]
        for s in self.slices or []:
            if s.base_model:
                seen.append(s.base_model)
            seen += [src.model for src in s.sources]
        if self.non_layer_from:
            seen.append(self.non_layer_from)
        tok = self.effective_tokenizer_source
        if tok and tok not in ("base", "union"):
            seen.append(tok)
        return list(dict.fromkeys(seen))

    def parameter_dicts(self) -> list[tuple[str, ParamDict, list[str]]]:
        """(where, dict, methods that read it) for every parameter block, for validation."""
        all_methods = [self.merge_method] + [s.merge_method for s in self.slices or [] if s.merge_method]
        out: list[tuple[str, ParamDict, list[str]]] = []
        if self.parameters:
            out.append(("parameters", self.parameters, all_methods))
        for i, m in enumerate(self.models or []):
            if m.parameters:
                out.append((f"models[{i}] ({clip(m.model, 80)})", m.parameters, [self.merge_method]))
        for i, s in enumerate(self.slices or []):
            methods = [s.merge_method or self.merge_method]
            if s.parameters:
                out.append((f"slices[{i}]", s.parameters, methods))
            for j, src in enumerate(s.sources):
                if src.parameters:
                    out.append((f"slices[{i}].sources[{j}] ({clip(src.model, 80)})", src.parameters, methods))
        return out

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, mode="json")
        for s in data.get("slices", []):
            for src in s["sources"]:
                src["layer_range"] = list(src["layer_range"])
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def _format_validation_error(err: ValidationError, where: str) -> str:
    """First problem only, without pydantic's `input` (which may be an alias-expanded giant)."""
    problems = err.errors(include_url=False, include_input=False)
    first = problems[0]
    loc = ".".join(clip(p, 60) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    msg = clip(msg, 300)
    if first["type"] == "extra_forbidden":
        fields = ", ".join(Recipe.model_fields) if len(first["loc"]) == 1 else None
        msg = f"unknown key {short(first['loc'][-1], 60)}" + (f" (valid keys: {fields})" if fields else "")
        loc = ".".join(clip(p, 60) for p in first["loc"][:-1])
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{where}: {loc + ': ' if loc else ''}{msg}{more}"


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise MergeError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise MergeError(_format_validation_error(err, where)) from None


def parse_recipe(text: str | bytes, where: str = "recipe") -> Recipe:
    """Parse YAML text into a Recipe within `yamlio`'s limits; errors name the line and column."""
    return recipe_from_dict(load_yaml(text, where), where)


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file: size checked before reading, UTF-8 only."""
    return recipe_from_dict(load_yaml_file(path, "recipe file"), str(Path(path).expanduser()))


def validate_parameters(recipe: Recipe) -> list[str]:
    """Check the recipe's parameter blocks against the methods' schemas and return warnings.

    A parameter the method does not read is a warning, not an error: mergekit ignores such
    keys, and recipes copied from model cards often carry them (`weight:` under each model of a
    `slerp`). Values are checked per tensor by the executor, where filters are resolved.
    """
    from mergecore.methods import get_method
    from mergecore.methods.base import unused_warning

    get_method(recipe.merge_method)
    unused: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    valid_for: dict[tuple[str, ...], set[str]] = {}
    for where, params, names in recipe.parameter_dicts():
        methods = tuple(dict.fromkeys(names))
        valid = valid_for.setdefault(methods, {p.name for n in methods for p in get_method(n).params})
        for key, value in params.items():
            if key not in valid:
                unused.setdefault((str(key), methods), []).append(where)
                continue
            if is_filter_list(value):
                for entry in value:
                    if "value" not in entry or set(entry) - {"filter", "value"}:
                        raise MergeError(
                            f"{where}: parameter '{key}': each filter entry needs 'value' and "
                            f"optionally 'filter', got {short(entry)}"
                        )
    return [unused_warning(key, places, list(methods), valid_for[methods])
            for (key, methods), places in unused.items()]
