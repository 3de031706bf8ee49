"""A PEFT LoRA adapter's `adapter_config.json`, read as data and checked before a weight is read.

Only what PEFT's own `merge_and_unload` folds into plain weights, and only what this package
folds exactly, is accepted: peft_type LORA with `r`, `lora_alpha`, `use_rslora`, `rank_pattern` /
`alpha_pattern`, `fan_in_fan_out`, `lora_bias`, DoRA (`use_dora`) and any `bias` mode (the
biases it trains are saved in the adapter and replace the base's). Everything else -- another
adapter type, a LoRA variant, an initialisation that rewrote the base weights -- is refused in one
line naming it, since applying it as plain LoRA would give other weights than PEFT's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mergecore.errors import MergeError, clip, short
from mergecore.io.source import read_json_object

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILE = "adapter_model.bin"

# config keys that change what the adapter computes beyond W + scale·B·A: refused when set
UNSUPPORTED_KEYS = {
    "layer_replication": "repeats base layers",
    "target_parameters": "adapts raw parameters (e.g. MoE experts), not modules",
    "trainable_token_indices": "trains single token embeddings",
    "arrow_config": "is the Arrow routing variant",
    "use_bdlora": "is the BD-LoRA variant",
    "alora_invocation_tokens": "is an activated LoRA (aLoRA)",
    "velora_config": "is the VeLoRA variant",
    "monteclora_config": "is the MonteCLoRA variant",
    "kasa_config": "is the KaSA variant",
    "use_qalora": "is a QA-LoRA adapter for a quantized base",
}
# initialisations that rewrite the base weights (the adapter then belongs to a residual model)
RESIDUAL_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")
BIAS_MODES = ("none", "all", "lora_only")


def split_adapter_ref(ref: str, search_dirs: tuple[Path, ...] = ()) -> Optional[tuple[str, str]]:
    """(base, adapter) for mergekit's `BASE+ADAPTER` reference, None for a plain one.

    A folder that exists under the name as written (here or in `search_dirs`) is a plain model
    even with a '+' in its name, as before adapters were read. Exactly one '+' (mergekit's rule).
    """
    if "+" not in ref or any(c.exists() for c in [Path(ref).expanduser()] + [d / ref for d in search_dirs]):
        return None
    parts = [p.strip() for p in ref.split("+")]
    if len(parts) != 2 or not all(parts):
        raise MergeError(f"model '{clip(ref)}': a base+adapter reference is BASE+ADAPTER, one model and one "
                         f"adapter (local folders or Hub ids) joined by a single '+'")
    return parts[0], parts[1]


def join_adapter_ref(base: str, adapter: str) -> str:
    """The `BASE+ADAPTER` reference of a base model and an adapter (each a folder or a Hub id),
    the inverse of `split_adapter_ref`; one line when a side is empty or has a '+' of its own."""
    sides = []
    for side, what in ((base, "base model"), (adapter, "adapter")):
        text = str(side).strip()
        if not text:
            raise MergeError(f"give the {what} of a base+adapter model (a local folder or a Hub id)")
        if "+" in text:
            raise MergeError(f"{what} '{clip(text)}' has a '+' in its name, which a BASE+ADAPTER reference cannot "
                             f"hold (the two are joined by a single '+'); rename or link the folder")
        sides.append(text)
    return "+".join(sides)


def _pattern_value(patterns: dict[str, Any], module: str, where: str) -> Any:
    """The value of the first pattern matching `module`, as PEFT's `get_pattern_key` picks it."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as err:
            raise MergeError(f"{where}: pattern {short(key)} is not a valid regular expression ({err})") from None
    return None


@dataclass(frozen=True)
class LoraSettings:
    """The parts of a LoRA config that decide each adapted tensor's W + scale·B·A."""

    r: int
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    dora: bool = False
    lora_bias: bool = False
    ensure_weight_tying: bool = False  # peft ties a tied head's saved module or LoRA to the embedding's
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    where: str = CONFIG_FILE

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, lora_alpha) of one module: its `rank_pattern` / `alpha_pattern` entry, else the defaults."""
        r = _pattern_value(self.rank_pattern, module, f"{self.where}: rank_pattern")
        alpha = _pattern_value(self.alpha_pattern, module, f"{self.where}: alpha_pattern")
        return (self.r if r is None else r), (self.alpha if alpha is None else alpha)

    def scale(self, r: int, alpha: float) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _number(cfg: dict[str, Any], key: str, default: Any, where: str, *, integer: bool = False) -> Any:
    v = cfg.get(key, default)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or not math.isfinite(v) or v <= 0 and integer:
        kind = "a positive integer" if integer else "a finite number"
        raise MergeError(f"{where}: '{key}' must be {kind}, got {short(v)}")
    return v


def _flag(cfg: dict[str, Any], key: str, where: str) -> bool:
    v = cfg.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise MergeError(f"{where}: '{key}' must be true or false, got {short(v)}")
    return v


def _patterns(cfg: dict[str, Any], key: str, where: str, integer: bool) -> dict[str, Any]:
    v = cfg.get(key) or {}
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise MergeError(f"{where}: '{key}' must map module name patterns to values, got {short(v)}")
    return {k: _number(v, k, None, f"{where}: {key}", integer=integer) for k in v}


def read_lora_config(folder: Path, ref: str) -> LoraSettings:
    """The adapter's settings from `folder/adapter_config.json`; one MergeError for anything
    missing, malformed or not folded exactly (see the module doc)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise MergeError(f"model '{ref}': adapter folder {folder} has no {CONFIG_FILE}, so it is not a PEFT "
                         f"adapter; give BASE+ADAPTER with the adapter's folder (or Hub id) after the '+'")
    where = f"model '{ref}': {CONFIG_FILE}"
    cfg = read_json_object(path, where)
    kind = cfg.get("peft_type")
    if kind is None:
        raise MergeError(f"{where} has no 'peft_type'; it was not written by PEFT")
    if kind != "LORA":
        raise MergeError(f"{where}: the adapter is {clip(kind, 40)} (peft_type), not LoRA; only LoRA adapters "
                         f"are applied (fold it with PEFT's merge_and_unload and merge that folder)")
    for key, what in UNSUPPORTED_KEYS.items():
        if cfg.get(key):
            raise MergeError(f"{where}: '{key}' is set: the adapter {what}, which mergecore does not apply; "
                             f"fold it with PEFT's merge_and_unload and merge that folder")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise MergeError(f"{where}: init_lora_weights '{clip(init, 40)}' rewrote the base weights, so the adapter "
                         f"only fits that residual model; save it converted to plain LoRA "
                         f"(save_pretrained(path_initial_model_for_weight_conversion=...)) first")
    bias = cfg.get("bias", "none")
    if bias not in BIAS_MODES:
        raise MergeError(f"{where}: 'bias' must be one of {', '.join(BIAS_MODES)}, got {short(bias)}")
    return LoraSettings(
        r=_number(cfg, "r", None, where, integer=True), alpha=_number(cfg, "lora_alpha", None, where),
        rslora=_flag(cfg, "use_rslora", where), fan_in_fan_out=_flag(cfg, "fan_in_fan_out", where),
        dora=_flag(cfg, "use_dora", where), lora_bias=_flag(cfg, "lora_bias", where),
        ensure_weight_tying=_flag(cfg, "ensure_weight_tying", where),
        rank_pattern=_patterns(cfg, "rank_pattern", where, True),
        alpha_pattern=_patterns(cfg, "alpha_pattern", where, False), where=where)


def weights_file(folder: Path, ref: str) -> Path:
    """The adapter's adapter_model.safetensors; a pickled adapter_model.bin is refused unread."""
    path = folder / WEIGHTS_FILE
    if path.is_file():
        return path
    if (folder / PICKLED_FILE).is_file():
        raise MergeError(f"model '{ref}': adapter {folder} has only {PICKLED_FILE}, a pickle, which mergecore never "
                         f"loads; save the adapter with safetensors (save_pretrained, the default) and use that")
    raise MergeError(f"model '{ref}': adapter folder {folder} has no {WEIGHTS_FILE}")
