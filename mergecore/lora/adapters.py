"""The adapters of one merge-adapters run, each opened against the base (io/adapter.py checks it
fits: every module a tensor of the base, of the shape its factors imply) and sorted per base tensor.

* LoRA modules: the union over the adapters; a module an adapter lacks has no change there.
* Whole tensors (modules_to_save, trained biases, changed embeddings): kept whole in the output,
  merged linearly as task vectors, T = base + Σ w_i (T_i − base), with T_i what adapter i makes of
  the tensor (the base's where it leaves it). A saved tensor equal to the base's (peft saves the
  embedding beside an embedding LoRA) is no change. A module whose weight one adapter saves whole
  and another factorises is kept whole (its merge cannot be a LoRA of the others' rank).
* A factorised module's bias saved by an adapter (bias="lora_only"/"all") stays that module's
  bias (peft's base_layer.bias, bias="lora_only" in the output).

Refused in one line: DoRA and LoRA-bias adapters (their change is not B·A alone), adapters that
differ in fan_in_fan_out, and an adapter that does not fit the base. Adapters that name another
base (base_model_name_or_path) but fit its shapes are merged with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mergecore.errors import MergeError, clip
from mergecore.io.adapter import AdapterSource
from mergecore.io.lora_config import CONFIG_FILE, split_adapter_ref
from mergecore.io.source import ModelSource, read_json_object, resolve_model_path
from mergecore.lora.combine import Term
from mergecore.lora.plan import module_of


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of the run as given: its reference, weight and per-adapter parameters."""

    ref: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeInputs:
    """The base and the opened adapters, sorted: `lora` (base weight -> whether an embedding),
    `whole` (base tensors merged whole), `biases` (biases of LoRA modules some adapter changed)."""

    base: ModelSource
    sources: list[AdapterSource]
    specs: list[AdapterSpec]
    lora: dict[str, bool]
    whole: list[str]
    biases: list[str]
    fan_in_fan_out: bool
    task_type: Optional[str]  # the adapters' peft task type, when they agree
    warnings: list[str]

    @property
    def folders(self) -> list[Path]:
        return [self.base.path, *(s.adapter_path for s in self.sources)]

    @property
    def max_rank(self) -> int:
        return max(p.a.shape[0] for s in self.sources for p in s.patches.values() if p.a is not None)

    @property
    def tied_embedding(self) -> Optional[str]:
        """The base's input embedding when its config ties the head to it (and it saves no head)."""
        return self.sources[0].tied_embedding

    def terms(self, name: str) -> list[Optional[Term]]:
        """Each adapter's LoRA of base weight `name` (None where it has none), in float32."""
        out: list[Optional[Term]] = []
        for spec, src in zip(self.specs, self.sources):
            if name in src.patches:
                b, a, scale = src.lora(name)
                out.append(Term(b.float(), a.float(), scale, spec.weight))
            else:
                out.append(None)
        return out

    def merged_whole(self, name: str) -> torch.Tensor:
        """Base tensor `name` merged linearly: base + Σ w_i (T_i − base), in float32."""
        base = self.base.read(name).float()
        out = base.clone()
        for spec, src in zip(self.specs, self.sources):
            if name in src.adapted:
                out.add_(src.read(name).float() - base, alpha=spec.weight)
        return out

    def close(self) -> None:
        for s in (self.base, *self.sources):
            s.close()


def _config_text(folder: Path, key: str) -> Optional[str]:
    """A text field of the adapter's adapter_config.json (base_model_name_or_path, task_type)."""
    path = folder / CONFIG_FILE
    cfg = read_json_object(path, f"adapter {folder}: {CONFIG_FILE}") if path.is_file() else {}
    value = cfg.get(key)
    return value if isinstance(value, str) and value else None


def _base_name(folder: Path) -> Optional[str]:
    return _config_text(folder, "base_model_name_or_path")


def default_base(specs: Sequence[AdapterSpec], search_dirs: tuple[Path, ...]) -> str:
    """The base the adapters name (base_model_name_or_path), when they agree on one."""
    names = {}
    for spec in specs:
        names[spec.ref] = _base_name(resolve_model_path(spec.ref, search_dirs))
    found = set(names.values())
    if len(found) != 1 or None in found:
        shown = ", ".join(f"{clip(k, 80)}: {clip(v, 80) if v else 'none'}" for k, v in names.items())
        raise MergeError(f"give the base model (--base or base_model:): the adapters do not name one base "
                         f"(base_model_name_or_path: {shown})")
    return str(found.pop())


def _open(base_ref: str, base_path: Path, spec: AdapterSpec, search_dirs: tuple[Path, ...]) -> AdapterSource:
    if split_adapter_ref(spec.ref, search_dirs) is not None:
        raise MergeError(f"adapter '{clip(spec.ref, 200)}' is a BASE+ADAPTER reference; name the adapter's folder "
                         f"or Hub id alone (the base is given once)")
    try:
        path = resolve_model_path(spec.ref, search_dirs)
    except MergeError as err:
        raise MergeError(f"adapter '{clip(spec.ref, 200)}': {err}") from None
    src = AdapterSource(f"{base_ref}+{spec.ref}", base_ref, spec.ref, base_path, path)
    for name, p in src.patches.items():
        if p.magnitude is not None or p.a is None:
            src.close()
            what = "a DoRA adapter (use_dora)" if p.magnitude is not None else "a LoRA with trained biases (lora_bias)"
            raise MergeError(f"adapter '{clip(spec.ref, 200)}' is {what}, whose change is not B·A alone; merge-adapters "
                             f"merges plain LoRA (fold it with a passthrough merge of BASE+ADAPTER and extract-lora it)")
    return src


def open_inputs(base_ref: str, specs: Sequence[AdapterSpec], search_dirs: tuple[Path, ...] = ()) -> MergeInputs:
    """Open the base and every adapter, check them (see the module doc) and sort their tensors."""
    if split_adapter_ref(base_ref, search_dirs) is not None:
        raise MergeError(f"base '{clip(base_ref, 200)}' is a BASE+ADAPTER reference; the base of merged adapters "
                         f"is a model (fold an adapter into it with a passthrough merge first)")
    base_path = resolve_model_path(base_ref, search_dirs)
    base = ModelSource(base_ref, path=base_path)
    sources: list[AdapterSource] = []
    try:
        for spec in specs:
            sources.append(_open(base_ref, base_path, spec, search_dirs))
        return _sort(base, base_ref, sources, list(specs))
    except BaseException:
        for s in (base, *sources):
            s.close()
        raise


def _sort(base: ModelSource, base_ref: str, sources: list[AdapterSource], specs: list[AdapterSpec]) -> MergeInputs:
    warnings: list[str] = []
    fan = {s.settings.fan_in_fan_out for s in sources}
    if len(fan) > 1:
        raise MergeError("the adapters differ in fan_in_fan_out, so they are not adapters of one base's layers")
    named = {spec.ref: _base_name(s.adapter_path) for spec, s in zip(specs, sources)}
    if len({n for n in named.values() if n}) > 1:
        shown = ", ".join(f"{clip(k, 60)}: {clip(v, 60)}" for k, v in named.items() if v)
        warnings.append(f"the adapters name different bases (base_model_name_or_path: {shown}); they fit the shapes "
                        f"of '{clip(base_ref, 120)}', so they are merged on it")
    lora: dict[str, bool] = {}
    for s in sources:
        for name, p in s.patches.items():
            lora[name] = lora.get(name, False) or "lora_embedding" in p.a.name  # type: ignore[union-attr]
    changed: set[str] = set()
    for s in sources:
        for name in s.replaced:
            if name not in changed and not torch.equal(s.unpatched(name).float(), base.read(name).float()):
                changed.add(name)
    whole_modules = {module_of(n) for n in changed if not (n.endswith(".bias") and module_of(n) + ".weight" in lora)}
    for name in list(lora):
        if module_of(name) in whole_modules:
            del lora[name]  # factorised in one adapter, saved whole in another: kept whole
    whole = [n for n in base.tensors if module_of(n) in whole_modules]
    biases = sorted(n for n in changed if n.endswith(".bias") and module_of(n) not in whole_modules)
    if not lora:
        raise MergeError("the adapters hold no LoRA module to merge (only tensors saved whole); a LoRA adapter needs "
                         "at least one factorised layer")
    tasks = {_config_text(s.adapter_path, "task_type") for s in sources}
    return MergeInputs(base, sources, specs, {n: lora[n] for n in base.tensors if n in lora}, whole, biases,
                       fan.pop(), tasks.pop() if len(tasks) == 1 else None, warnings)
