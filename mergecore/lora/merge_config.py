"""merge-adapters' config: a small YAML file, or the same fields from command-line flags.

```yaml
base_model: models/base          # optional: the base the adapters name (base_model_name_or_path)
method: ties                     # linear | cat | knots | a mergecore method (ties, dare_ties, dare_linear ...)
parameters: {density: 0.5}       # the method's parameters (knots: those of knots_merge)
knots_merge: ties                # knots only: how the aligned parts are merged (ties, linear, ...)
rank: 16                         # the merged adapter's rank (linear without it: exact concatenation)
energy: 0.95                     # or: per module, the fewest components keeping this share of ‖ΔW‖²
dtype: float32                   # of the saved factors (whole tensors keep the base's dtype)
seed: 0                          # of randomised methods (DARE), per module
adapters:
  - adapter: adapters/math       # a folder (relative to this file) or a Hub id
    weight: 0.6
    parameters: {density: 0.7}   # per-adapter values of the method's per-model parameters
  - adapters/code                # weight 1
```

Unknown keys are refused with a "did you mean" hint, values are checked before a model is read.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from mergecore.errors import MergeError, short
from mergecore.lora.adapters import AdapterSpec
from mergecore.lora.combine import OWN_METHODS
from mergecore.lora.factor import check_rank
from mergecore.yamlio import load_yaml_file

KEYS = ("base_model", "adapters", "method", "parameters", "knots_merge", "rank", "energy", "dtype", "seed")
ADAPTER_KEYS = ("adapter", "weight", "parameters")
CONFIG_FILE = "merge_adapters.yml"  # the config as run, saved in the output folder


@dataclass
class AdapterMergeConfig:
    """What to merge and how (see the module doc)."""

    adapters: list[AdapterSpec]
    base_model: Optional[str] = None
    method: str = "linear"
    parameters: dict[str, Any] = field(default_factory=dict)
    knots_merge: str = "ties"
    rank: Optional[int] = None
    energy: Optional[float] = None
    dtype: Optional[str] = None
    seed: int = 0

    def check(self) -> None:
        """Every value in range (one MergeError line otherwise); the method's own parameters are
        checked when the method is resolved, before a weight is read."""
        if not self.adapters:
            raise MergeError("give at least one adapter to merge (adapters: in the config, or --adapter)")
        if not isinstance(self.method, str) or not self.method:
            raise MergeError(f"method must be a name (linear, cat, knots or a mergecore method), got {short(self.method)}")
        check_rank(self.rank, self.energy)
        if self.method == "cat" and (self.rank is not None or self.energy is not None):
            raise MergeError("method cat keeps every adapter's rank (its rank is their sum); drop rank/energy, or use "
                             "linear to truncate the same sum")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MergeError(f"seed must be an integer, got {short(self.seed)}")
        if not isinstance(self.parameters, dict):
            raise MergeError(f"parameters must map parameter names to values, got {short(self.parameters)}")
        for spec in self.adapters:
            if isinstance(spec.weight, bool) or not isinstance(spec.weight, (int, float)) or not math.isfinite(spec.weight):
                raise MergeError(f"adapter '{short(spec.ref, 120)}': weight must be a finite number, got {short(spec.weight)}")

    def record(self) -> dict[str, Any]:
        """The config as plain data (what the output folder keeps as merge_adapters.yml)."""
        data = asdict(self)
        data["adapters"] = [{"adapter": a.ref, "weight": a.weight, **({"parameters": a.params} if a.params else {})}
                            for a in self.adapters]
        if self.method != "knots":
            data.pop("knots_merge")
        return {k: v for k, v in data.items() if v is not None and v != {}}


def _unknown(keys: Any, known: tuple[str, ...], where: str) -> None:
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
            raise MergeError(f"{where}: unknown key {short(key, 60)}{hint}")


def _adapter(item: Any, where: str) -> AdapterSpec:
    if isinstance(item, str) and item.strip():
        return AdapterSpec(item.strip())
    if not isinstance(item, dict) or not isinstance(item.get("adapter"), str) or not item["adapter"].strip():
        raise MergeError(f"{where}: an adapter is a folder or Hub id, or a mapping with 'adapter:' (and 'weight:', "
                         f"'parameters:'), got {short(item)}")
    _unknown(item, ADAPTER_KEYS, where)
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergeError(f"{where}: parameters must be a mapping, got {short(params)}")
    weight = item.get("weight", 1.0)
    return AdapterSpec(item["adapter"].strip(), weight if weight is not None else 1.0, dict(params))


def config_from_dict(data: Any, where: str = "config") -> AdapterMergeConfig:
    """An AdapterMergeConfig from parsed YAML; one MergeError line for anything malformed."""
    if not isinstance(data, dict):
        raise MergeError(f"{where}: a merge-adapters config is a mapping with 'adapters:' (and 'method:', 'rank:' ...)")
    _unknown(data, KEYS, where)
    adapters = data.get("adapters")
    if not isinstance(adapters, list):
        raise MergeError(f"{where}: 'adapters' must be a list of adapters, got {short(adapters)}")
    specs = [_adapter(item, f"{where}: adapters[{i}]") for i, item in enumerate(adapters)]
    base = data.get("base_model")
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise MergeError(f"{where}: base_model must be a folder or Hub id, got {short(base)}")
    config = AdapterMergeConfig(specs, base.strip() if base else None, data.get("method", "linear"),
                                data.get("parameters") or {}, data.get("knots_merge", "ties"), data.get("rank"),
                                data.get("energy"), data.get("dtype"), data.get("seed", 0))
    config.check()
    return config


def load_config(path: str | Path) -> AdapterMergeConfig:
    """The config in a YAML file (bounded like every YAML mergecore reads)."""
    return config_from_dict(load_yaml_file(path, "merge-adapters config"), str(path))


def method_names() -> str:
    """The names `method:` takes, for help and error lines."""
    return f"{', '.join(OWN_METHODS)}, or a mergecore method (ties, dare_ties, dare_linear, task_arithmetic, ...)"
