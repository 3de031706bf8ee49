"""The `mergecore moe` config: mergekit-moe's YAML format, checked whole before a model is opened.

    base_model: org/base                 # attention, norms, embeddings and the hidden-state gates
    gate_mode: hidden                    # hidden | cheap_embed | random (| uniform_random, hidden_last)
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: org/code-expert    # its MLPs become expert 0 of every layer
        positive_prompts: ["def fib(n):"]
        negative_prompts: ["Once upon a time"]
    shared_experts:                      # Qwen2-MoE output: one shared expert
      - source_model: org/base
        positive_prompts: ["hello"]
        residual_scale: 0.5

mergekit's keys keep their meaning (`noise_scale`, `residual_scale`, `architecture`); `seed`
(random gates and noise) is mergecore's. Each problem is one line naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError, field_validator

from mergecore.errors import MergeError, clip
from mergecore.io.source import dtype_from_name
from mergecore.yamlio import load_yaml, load_yaml_file

HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")  # hidden_avg: mergekit's name for the mean
PROMPT_MODES = (*HIDDEN_MODES, "cheap_embed")
GATE_MODES = (*PROMPT_MODES, "random", "uniform_random")
OUTPUTS = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen2_moe": "qwen2_moe", "qwen_moe": "qwen2_moe"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    """One dense model whose MLPs become an expert of every layer."""

    source_model: str
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None  # mergekit: Gaussian noise of this std added to the expert's MLP weights
    residual_scale: Optional[float] = None  # mergekit: down_proj (the residual write) scaled by this

    @field_validator("positive_prompts", "negative_prompts")
    @classmethod
    def _prompts(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        for i, p in enumerate(v or []):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty")
        return v

    @field_validator("noise_scale", "residual_scale")
    @classmethod
    def _finite(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not (abs(v) < float("inf")):
            raise ValueError(f"must be a finite number, got {v}")
        return v


class MoEConfig(_Strict):
    """mergekit-moe's `MoEMergeConfig`, plus `seed`."""

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: StrictInt = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None
    seed: StrictInt = 0

    @field_validator("gate_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in GATE_MODES:
            raise ValueError(f"unknown gate_mode '{clip(v, 40)}'; use one of {', '.join(GATE_MODES)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                dtype_from_name(v)
            except MergeError as err:
                raise ValueError(str(err)) from None
        return v

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v.lower() not in OUTPUTS:
            raise ValueError(f"unknown architecture '{clip(v, 40)}'; supported outputs: mixtral, qwen2_moe")
        return v

    @property
    def output(self) -> Optional[str]:
        """The output asked for by `architecture` ('mixtral', 'qwen2_moe'), or None to choose."""
        return OUTPUTS[self.architecture.lower()] if self.architecture else None

    def referenced_models(self) -> list[str]:
        """Every model the config names, once each: the base, then the experts (as a recipe's)."""
        return list(dict.fromkeys([self.base_model, *(e.source_model for e in self.all_experts)]))

    @property
    def all_experts(self) -> list[Expert]:
        """Routed experts, then the shared ones (the gate step computes a row for each)."""
        return [*self.experts, *(self.shared_experts or [])]


def _validation_line(err: ValidationError, where: str) -> str:
    problems = err.errors(include_url=False, include_input=False)
    first = problems[0]
    loc = [clip(p, 60) for p in first["loc"]]
    msg = clip(first["msg"].removeprefix("Value error, "), 300)
    if first["type"] == "extra_forbidden" and loc:
        msg = f"unknown key '{loc.pop()}'" + (f" (valid keys: {', '.join(MoEConfig.model_fields)})" if not loc else "")
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{where}: {'.'.join(loc) + ': ' if loc else ''}{msg}{more}"


def check_config(config: MoEConfig, where: str = "moe config") -> None:
    """What can be refused before any model is opened: counts, experts_per_token, prompts."""
    n = len(config.experts)
    if n < 1:
        raise MergeError(f"{where}: experts: give at least one expert (each with source_model and prompts)")
    k = config.experts_per_token
    if not 1 <= k <= n:
        raise MergeError(f"{where}: experts_per_token must be between 1 and the number of experts ({n}), got {k}")
    if config.gate_mode in PROMPT_MODES:
        for what, group in (("experts", config.experts), ("shared_experts", config.shared_experts or [])):
            for i, e in enumerate(group):
                if not e.positive_prompts:
                    raise MergeError(f"{where}: {what}.{i} ({clip(e.source_model, 80)}) has no positive_prompts; "
                                     f"gate_mode {config.gate_mode} builds each gate from its expert's prompts "
                                     f"(or use gate_mode: random)")
        first = (config.experts[0].positive_prompts, config.experts[0].negative_prompts or [])
        if n > 1 and all((e.positive_prompts, e.negative_prompts or []) == first for e in config.experts[1:]):
            raise MergeError(f"{where}: every expert has the same prompts, so every gate would be the same and "
                             f"routing would not tell them apart; give each expert prompts of its own domain")


def moe_config_from_dict(data: Any, where: str = "moe config") -> MoEConfig:
    """A config from parsed YAML (a mapping), checked whole: the schema, then `check_config`.
    Each problem is one `MergeError` line starting with `where`."""
    if not isinstance(data, dict):
        raise MergeError(f"{where}: expected a mapping at the top level (base_model, experts, ...), "
                         f"got {type(data).__name__}")
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as err:
        raise MergeError(_validation_line(err, where)) from None
    check_config(config, where)
    return config


def is_moe_config(data: Any) -> bool:
    """Whether parsed YAML is a mergekit-moe config rather than a merge recipe: a mapping with
    `experts` (or `base_model` and no `merge_method`, `models` or `slices`)."""
    if not isinstance(data, dict) or "merge_method" in data:
        return False
    return "experts" in data or ("base_model" in data and not {"models", "slices"} & set(data))


def moe_config_yaml(config: MoEConfig) -> str:
    """The config as YAML (what `build_moe` writes beside the weights; `parse_moe_config` reads
    it back to the same config)."""
    return yaml.safe_dump(config.model_dump(exclude_none=True), sort_keys=False, allow_unicode=True)


def parse_moe_config(text: str | bytes, where: str = "moe config") -> MoEConfig:
    """A config from YAML text, within the bounded loader's limits."""
    return moe_config_from_dict(load_yaml(text, where), where)


def load_moe_config(path: str | Path) -> MoEConfig:
    """A config file (size checked before reading, UTF-8 only, aliases bounded)."""
    return moe_config_from_dict(load_yaml_file(path, "moe config file"), str(Path(path).expanduser()))
