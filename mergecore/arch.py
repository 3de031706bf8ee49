"""Architecture knowledge, as data: one `Architecture` entry per family, and the questions the
engine, the searches and the app ask about tensor names.

An entry says, by substrings of *checkpoint* tensor names, where a family keeps its layer stack,
which non-layer tensors come before the layers (embeddings: *pre* weights; everything else
outside the layers, such as the final norm and the heads, is *post*), which recipe filter
selects its attention tensors and which its MLP tensors, and how its norm weights are named.
The entry is found by the config's `model_type`; a model of an unknown type gets `GENERIC`, with
its attention / MLP filters inferred from its tensor names (the first filters of the table
that occur in them), so unknown architectures keep working.

Adding an architecture is one entry in `ARCHITECTURES`. For example Falcon (its checkpoints
name tensors `transformer.word_embeddings.weight`, `transformer.h.3.self_attention.dense.weight`,
`transformer.h.3.mlp.dense_4h_to_h.weight`, `transformer.h.3.input_layernorm.weight`,
`transformer.ln_f.weight`):

    Architecture("falcon", model_types=("falcon",), stacks=("transformer.h",),
                 pre=("word_embeddings",), attn="self_attention", mlp=("mlp",),
                 norm=("layernorm", "ln_f")),

A stack whose last name is new (say `decoder.blocks`) also teaches `layer_of` that name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

GROUPS = ("attn", "mlp", "other")  # the tensor groups a value may differ by (curves per group)


@dataclass(frozen=True)
class Architecture:
    """One architecture family's tensor layout, by substrings of checkpoint tensor names."""

    name: str
    model_types: tuple[str, ...] = ()  # config.json `model_type` values of this family
    stacks: tuple[str, ...] = ()  # layer stacks, e.g. "model.layers" (tensors "model.layers.N.…")
    pre: tuple[str, ...] = ()  # non-layer tensors before the layers (embeddings); the rest are post
    attn: str = ""  # the recipe filter that selects every attention tensor of a layer
    mlp: tuple[str, ...] = ()  # the recipe filters that together select every MLP tensor
    norm: tuple[str, ...] = ("norm",)  # normalisation weights (matched case-insensitively)
    # token-indexed tensors (rows per vocabulary entry); see mergecore.vocab
    vocab_vectors: tuple[str, ...] = ("lm_head", "embed", "wte", "bias")  # 1-D ones (output biases)
    not_vocab: tuple[str, ...] = ("position", "wpe", "token_type")  # indexed by position, never by token


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"),
                 stacks=("model.layers",), pre=("embed_tokens",), attn="self_attn", mlp=("mlp",)),
    Architecture("internlm2", model_types=("internlm2",), stacks=("model.layers",), pre=("tok_embeddings",),
                 attn="attention", mlp=("feed_forward",)),
    Architecture("distilbert", model_types=("distilbert",), stacks=("distilbert.transformer.layer",),
                 pre=("embeddings",), attn="attention", mlp=("ffn",), norm=("layer_norm", "layernorm")),
    Architecture("bert", model_types=("bert", "roberta", "xlm-roberta"), stacks=("encoder.layer",),
                 pre=("embeddings",), attn="attention", mlp=("intermediate", "output.dense"), norm=("layernorm",)),
    Architecture("vit", model_types=("vit",), stacks=("vit.encoder.layer",), pre=("embeddings",),
                 attn="attention", mlp=("intermediate", "output.dense"), norm=("layernorm",)),
    Architecture("opt", model_types=("opt",), stacks=("model.decoder.layers",),
                 pre=("embed_tokens", "embed_positions", "project_in"), attn="self_attn", mlp=("fc1", "fc2"),
                 norm=("layer_norm",)),
    Architecture("gpt2", model_types=("gpt2",), stacks=("transformer.h", "h"), pre=("wte", "wpe"), attn="attn",
                 mlp=("mlp",), norm=("ln_",)),
)

# Any other model: today's name hints; attention / MLP filters are inferred from its names.
GENERIC = Architecture(
    "generic", stacks=("layers", "layer", "h", "blocks", "block"),
    pre=("embed", "wte", "wpe", "patch", "position", "cls_token", "mask_token", "token_type"),
    norm=("norm", "ln_"))

_BY_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}
_ATTN_FILTERS = tuple(dict.fromkeys(a.attn for a in ARCHITECTURES))  # tried in table order
_MLP_FILTERS = tuple(dict.fromkeys(a.mlp for a in ARCHITECTURES))
_STACK_NAMES = sorted({s.rpartition(".")[2] for a in (*ARCHITECTURES, GENERIC) for s in a.stacks})
LAYER_RE = re.compile(rf"^(?P<prefix>(?:.*\.)?(?:{'|'.join(_STACK_NAMES)}))\.(?P<idx>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def find_architecture(config: Optional[dict[str, Any]] = None, names: Iterable[str] = ()) -> Architecture:
    """The entry of a model: by its config's `model_type`, else `GENERIC` with the attention and
    MLP filters that occur in its tensor `names`."""
    known = _BY_TYPE.get(str((config or {}).get("model_type", "")))
    if known is not None:
        return known
    layer_names = [n for n in names if layer_of(n) is not None]
    attn = next((f for f in _ATTN_FILTERS if any(f in n for n in layer_names)), "")
    rest = [n for n in layer_names if not (attn and attn in n)]
    mlp = next((fs for fs in _MLP_FILTERS if any(fs[0] in n for n in rest)), ())
    return dataclasses.replace(GENERIC, attn=attn, mlp=mlp)


def groups() -> tuple[str, ...]:
    """The tensor groups a parameter value may differ by: attention, MLP and the rest."""
    return GROUPS


def tensor_group(name: str, arch: Optional[Architecture] = None) -> str:
    """"attn", "mlp" or "other": the group whose recipe filter selects `name` (any known filter
    when the architecture is not given)."""
    attn = (arch.attn,) if arch is not None else _ATTN_FILTERS
    mlp = arch.mlp if arch is not None else tuple(f for fs in _MLP_FILTERS for f in fs)
    if any(f and f in name for f in attn):
        return "attn"
    if any(f in name for f in mlp):
        return "mlp"
    return "other"


def group_filters(names: Iterable[str], arch: Optional[Architecture] = None) -> tuple[Optional[str], tuple[str, ...]]:
    """The recipe filters that select these models' attention tensors (None when they have none)
    and their MLP tensors (attention is matched first, so its filter wins where both occur)."""
    names = list(names)
    arch = arch or find_architecture(names=names)
    layer_names = [n for n in names if layer_of(n) is not None]
    attn = arch.attn if arch.attn and any(arch.attn in n for n in layer_names) else None
    rest = [n for n in layer_names if not (attn and attn in n)]
    return attn, tuple(f for f in arch.mlp if any(f in n for n in rest))


def is_norm(name: str, module: Any = None, arch: Optional[Architecture] = None) -> bool:
    """Whether a tensor or module is a normalisation weight: a module by its class (torch's
    LayerNorm / GroupNorm / RMSNorm, or a `*Norm` class with a 1-D weight), else by name."""
    if module is not None:  # by class names, so this module needs no torch
        if any(c.__name__ in ("LayerNorm", "GroupNorm", "RMSNorm") and c.__module__.startswith("torch.nn")
               for c in type(module).__mro__):
            return True
        weight = getattr(module, "weight", None)
        is_parameter = any(c.__name__ == "Parameter" for c in type(weight).__mro__)
        return "norm" in type(module).__name__.lower() and is_parameter and getattr(weight, "ndim", 0) == 1
    low = name.lower()
    return any(p.lower() in low for p in (arch or GENERIC).norm)


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


def is_pre_weight(tensor_name: str, arch: Optional[Architecture] = None) -> bool:
    """Whether a non-layer tensor comes before the layers (embeddings) rather than after them."""
    return any(h in tensor_name for h in (arch or GENERIC).pre)


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


def model_kind(config: dict[str, Any]) -> str:
    """What a checkpoint's head does, from config.json's `architectures`: 'causal-lm',
    'image-classification' or 'other' (the app compares and evaluates each kind its own way)."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else ""
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "causal-lm"
    if arch.endswith("ForImageClassification"):
        return "image-classification"
    return "other"
