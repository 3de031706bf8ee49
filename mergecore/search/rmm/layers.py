"""Layer bank, candidate assembly and the prefix cache that make RMM episodes cheap.

* `LayerBank`: the layer produced by (layer k, action a) is deterministic, so it is built once:
  a model action is a reference to that model's own layer module (no copy); an operator action
  is one copy of the base layer whose tensors are the engine's merge method applied to layer k
  of the models (same method code and seeds as the executor, so a replayed recipe matches).
* `Assembler`: a candidate is the base model with its layer stack replaced by a ModuleList of
  bank modules: no weights are copied per episode.
* `PrefixCache`: layers are wrapped so that the output of a shared prefix of emitted layers on
  the same input batch is computed once and reused across episodes.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from mergecore.arch import main_stack
from mergecore.errors import MergeError
from mergecore.executor import seed_for_tensor
from mergecore.methods import MergeMethod, get_method


@dataclass
class Operator:
    """A merge method with fixed parameters, applied to one layer of the models."""

    name: str
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)

    def resolved(self, n_models: int) -> tuple[MergeMethod, dict[str, Any]]:
        """The method and its call values for `n_models` inputs, coerced as the executor coerces a
        recipe's (`MergeMethod.resolve_params`); a parameter the method does not take is an error."""
        m = get_method(self.method)
        unknown = set(self.parameters) - {p.name for p in m.params}
        if unknown:
            raise MergeError(f"operator '{self.name}': unknown parameter(s) {sorted(unknown)} for method '{m.name}'")
        values, _ = m.resolve_params(self.parameters, n_models, f"operator '{self.name}'")
        return m, values


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Dotted path and module of a model's (single, deepest) layer stack."""
    found = main_stack(name for name, _ in model.named_parameters())
    if found is None:
        raise MergeError(f"{type(model).__name__} has no layer stack (layers.N / h.N / layer.N / block.N)")
    path, _ = found
    stack = model.get_submodule(path)
    if not isinstance(stack, nn.ModuleList):
        raise MergeError(f"{type(model).__name__}.{path} is not a ModuleList")
    return path, stack


class LayerBank:
    """Modules for every (layer, action) pair, built on first use and kept."""

    def __init__(self, models: list[nn.Module], base: nn.Module, operators: list[Operator], seed: int = 0,
                 names: Optional[dict[str, str]] = None, artifacts: Optional[dict[str, str]] = None,
                 model_refs: Optional[list[str]] = None):
        """`names` maps the base's in-memory parameter names to its checkpoint names
        (`mergecore.io.names.checkpoint_names`): randomised operators are seeded by checkpoint
        name, as the executor does, so a replayed recipe draws the same masks, and operators are
        told the checkpoint name of the tensor (a data-informed operator looks its statistics up
        by it). `artifacts` (name -> file) and `model_refs` (the models' refs, in order) are what
        a data-informed operator (regmean, fisher) reads, as a recipe's merge gives them."""
        if names is None:
            names = _names_from_checkpoint(base)
        self.names = names
        self.artifacts = dict(artifacts or {})
        self.model_refs = list(model_refs or [])
        self.models = models
        self.base = base
        self.operators = operators
        self.seed = seed
        self.path, base_stack = layer_stack(base)
        self.stacks = [layer_stack(m)[1] for m in models]
        self.n_layers = len(base_stack)
        for i, st in enumerate(self.stacks):
            if len(st) != self.n_layers:
                raise MergeError(f"model {i} has {len(st)} layers, the base has {self.n_layers}")
        self._built: dict[tuple[int, int], nn.Module] = {}
        self._resolved = [op.resolved(len(models)) for op in operators]

    @property
    def n_models(self) -> int:
        return len(self.models)

    def module(self, layer: int, action: int) -> nn.Module:
        if action < self.n_models:
            return self.stacks[action][layer]
        key = (layer, action)
        mod = self._built.get(key)
        if mod is None:
            mod = self._built[key] = self._merge_layer(layer, action - self.n_models)
        return mod

    @torch.no_grad()
    def merged_state(self, layer: int, op_index: int) -> dict[str, torch.Tensor]:
        """Tensors of layer `layer` merged by operator `op_index` (names relative to the layer)."""
        method, params = self._resolved[op_index]
        base_layer = layer_stack(self.base)[1][layer]
        prefix = f"{self.path}.{layer}."
        out = {}
        for rel, base_t in base_layer.state_dict().items():
            if not base_t.is_floating_point():
                out[rel] = base_t.clone()
                continue
            tensors = [st[layer].state_dict()[rel].float() for st in self.stacks]
            gen = None
            name = self.names.get(prefix + rel, prefix + rel)
            if method.randomized:
                gen = torch.Generator().manual_seed(seed_for_tensor(self.seed, name))
            b = base_t.float() if method.base != "ignored" else None
            merged = method(tensors, b, params, generator=gen, tensor_name=name, artifacts=self.artifacts,
                            input_models=self.model_refs)
            out[rel] = merged.to(base_t.dtype)
        return out

    def _merge_layer(self, layer: int, op_index: int) -> nn.Module:
        mod = copy.deepcopy(layer_stack(self.base)[1][layer])
        mod.load_state_dict(self.merged_state(layer, op_index))
        return mod


def _names_from_checkpoint(model: nn.Module) -> dict[str, str]:
    """Checkpoint names of a model loaded from a local folder ({} when it has none)."""
    from pathlib import Path

    from mergecore.io.names import checkpoint_names
    from mergecore.io.source import ModelSource

    folder = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not folder or not Path(str(folder)).is_dir():
        return {}
    return checkpoint_names(model, ModelSource(str(folder)))


class PrefixCache:
    """LRU map (emitted prefix, input batch) -> layer output, bounded in bytes."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.batch_key: Optional[str] = None  # the current model call's inputs (None: do not cache)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (tuple, list)):
            return sum(PrefixCache._size(v) for v in value)
        return 0

    def get(self, key: tuple) -> Any:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return value

    def put(self, key: tuple, value: Any) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes and self.entries:
            _, old = self.entries.popitem(last=False)
            self.bytes -= self._size(old)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def input_fingerprint(args: tuple, kwargs: dict[str, Any]) -> Optional[str]:
    """Key of one model call's inputs (input ids / pixels / masks), or None when the call must not
    be cached: it carries a KV cache (generation), whose state the layers read and update, or an
    input this function cannot key. Hashing the inputs instead of the first layer's hidden
    states is what makes keying cheap: for an LM, one int per token instead of hidden_size floats."""
    if kwargs.get("past_key_values") is not None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for name, value in [(str(i), v) for i, v in enumerate(args)] + sorted(kwargs.items()):
        h.update(name.encode() + b"=")
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu().reshape(-1)
            h.update(f"{t.dtype}{tuple(value.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())
        elif value is None or isinstance(value, (bool, int, float, str)):
            h.update(repr(value).encode())
        else:
            return None
        h.update(b";")
    return h.hexdigest()


class CachedLayer(nn.Module):
    """Runs `inner` unless the output for this prefix on this batch is cached.

    The batch is named by the candidate's inputs (`PrefixCache.batch_key`, set by the
    Assembler's hook on every model call). The output of a prefix of emitted layers is a function
    of those inputs alone because everything before the stack (embeddings, position encodings)
    is the base model's and fixed for the whole search."""

    def __init__(self, inner: nn.Module, prefix: tuple, cache: PrefixCache):
        super().__init__()
        self.inner = inner
        self.prefix = prefix
        self.cache = cache
        # attributes transformers reads from layers (e.g. attention_type in Qwen2/Mistral)
        for attr in ("attention_type",):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    def forward(self, *args, **kwargs):
        if self.cache.batch_key is None:
            return self.inner(*args, **kwargs)
        key = (self.prefix, self.cache.batch_key)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        out = self.inner(*args, **kwargs)
        self.cache.put(key, out)
        return out


class Assembler:
    """Builds candidates: the base model with its layer stack replaced by bank modules."""

    def __init__(self, base: nn.Module, bank: LayerBank, cache: Optional[PrefixCache] = None):
        self.model = copy.copy(base)  # shallow: shares every submodule with the base
        self.model._modules = dict(base._modules)
        self.model.config = copy.deepcopy(base.config)
        self.bank = bank
        self.cache = cache
        self._owner, self._attr = self._split(bank.path)
        self._detach_path(bank.path)
        # hooks of its own (a shallow copy shares the base's hook dicts), then key each call's batch
        for attr, value in list(vars(self.model).items()):
            if attr.startswith("_forward") and isinstance(value, dict):
                setattr(self.model, attr, type(value)(value))
        if cache is not None:
            self.model.register_forward_pre_hook(self._key_batch, with_kwargs=True)
            self.model.register_forward_hook(self._end_batch)

    def _key_batch(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.cache.batch_key = input_fingerprint(args, kwargs)

    def _end_batch(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.cache.batch_key = None

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        owner, _, attr = path.rpartition(".")
        return owner, attr

    def _detach_path(self, path: str) -> None:
        """Give the candidate its own copies of the modules on the path to the stack (shallow),
        so replacing the stack does not touch the base model."""
        parts = path.split(".")
        node = self.model
        for part in parts[:-1]:
            child = node._modules[part]
            clone = copy.copy(child)
            clone._modules = dict(child._modules)
            node._modules[part] = clone
            node = clone
        if hasattr(node, "config"):
            node.config = self.model.config

    def build(self, emitted: list[tuple[int, int]]) -> nn.Module:
        mods: list[nn.Module] = []
        for pos, (layer, action) in enumerate(emitted):
            mod = self.bank.module(layer, action)
            if self.cache is not None:
                mod = CachedLayer(mod, tuple(emitted[: pos + 1]), self.cache)
            mods.append(mod)
        owner = self.model.get_submodule(self._owner) if self._owner else self.model
        owner._modules[self._attr] = nn.ModuleList(mods)
        _set_depth(self.model.config, len(mods))
        return self.model


def _set_depth(config: Any, n: int) -> None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key) and isinstance(getattr(config, key), int):
            setattr(config, key, n)
    lt = getattr(config, "layer_types", None)
    if isinstance(lt, list) and lt:
        setattr(config, "layer_types", (lt * (n // len(lt) + 1))[:n])
