"""Which tensor belongs to which layer, how many layers a config declares, and renumbering.

Generic name patterns cover the common Hugging Face layouts without per-architecture tables:
``model.layers.N`` (Llama, Mistral, Qwen2), ``transformer.h.N`` (GPT-2), ``encoder.layer.N``
(BERT, ViT), ``block.N`` / ``blocks.N``. A tensor outside every layer stack is a *pre* weight
(embeddings, patch/position embeddings) or a *post* weight (final norm, lm_head, heads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks|block))\.(?P<idx>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_PRE_HINTS = ("embed", "wte", "wpe", "patch", "position", "cls_token", "mask_token", "token_type")


@dataclass(frozen=True)
class LayerRef:
    stack: str  # e.g. "model.layers"
    index: int
    rest: str  # e.g. "self_attn.q_proj.weight"

    def name(self, index: int | None = None) -> str:
        return f"{self.stack}.{self.index if index is None else index}.{self.rest}"


def layer_of(tensor_name: str) -> LayerRef | None:
    m = LAYER_RE.match(tensor_name)
    if not m:
        return None
    return LayerRef(m.group("prefix"), int(m.group("idx")), m.group("rest"))


def is_pre_weight(tensor_name: str) -> bool:
    return any(h in tensor_name for h in _PRE_HINTS)


def layer_stacks(names: Iterable[str]) -> dict[str, int]:
    """Layer stacks found in tensor names and their depth (max index + 1)."""
    stacks: dict[str, int] = {}
    for n in names:
        ref = layer_of(n)
        if ref is not None:
            stacks[ref.stack] = max(stacks.get(ref.stack, 0), ref.index + 1)
    return stacks


def main_stack(names: Iterable[str]) -> tuple[str, int] | None:
    """The single layer stack of a model, or None if it has none; the deepest if several."""
    stacks = layer_stacks(names)
    if not stacks:
        return None
    stack = max(stacks, key=lambda s: stacks[s])
    return stack, stacks[stack]


def config_num_layers(config: dict[str, Any]) -> int | None:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    for sub in ("text_config", "decoder"):
        if isinstance(config.get(sub), dict):
            n = config_num_layers(config[sub])
            if n is not None:
                return n
    return None


def relayer_config(config: dict[str, Any], source_layers: list[int], old_count: int) -> dict[str, Any]:
    """Config for a model whose layer i is the source model's layer `source_layers[i]`.

    Sets the layer-count key and rebuilds every per-layer list (e.g. Qwen2's `layer_types`) by
    the same mapping, so the config stays valid for transformers.
    """
    out = dict(config)
    new_count = len(source_layers)
    for key in LAYER_COUNT_KEYS:
        if isinstance(out.get(key), int) and out[key] == old_count:
            out[key] = new_count
    for key, value in list(out.items()):
        if "layer" in key and isinstance(value, list) and len(value) == old_count:
            out[key] = [value[i] for i in source_layers]
    if "max_window_layers" in out and isinstance(out["max_window_layers"], int):
        out["max_window_layers"] = min(out["max_window_layers"], new_count)
    return out
