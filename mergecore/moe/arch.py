"""Which dense models make which mixture, and the mixture's config and tensor names.

Inputs are Llama, Mistral and Qwen2 checkpoints (model.layers.N.mlp.{gate,up,down}_proj). Two
outputs, in the tensor names transformers saves them by (`save_pretrained` of transformers 5
writes the per-expert names below and fuses them into `experts.gate_up_proj` / `down_proj`
only in memory, when it loads them; older transformers, vLLM and llama.cpp read these names):

* Mixtral (`MixtralForCausalLM`) from Llama / Mistral experts, no shared expert:
  `model.layers.N.block_sparse_moe.gate.weight` [experts, hidden] and
  `block_sparse_moe.experts.E.{w1,w2,w3}.weight` = expert E's gate_proj, down_proj, up_proj;
* Qwen2-MoE (`Qwen2MoeForCausalLM`) from Qwen2 (or Llama / Mistral) experts and exactly one
  shared expert: `mlp.gate.weight`, `mlp.experts.E.{gate,up,down}_proj.weight`,
  `mlp.shared_expert.{gate,up,down}_proj.weight` and `mlp.shared_expert_gate.weight` [1, hidden];
  every layer sparse (decoder_sparse_step 1), top-k weights renormalised (norm_topk_prob, as in
  Mixtral and in mergekit's Qwen output).

Everything outside the MLPs (embeddings, attention, norms, head) is the base model's, under the
same names. Every expert must have the base's layer count, activation and MLP shapes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from mergecore.errors import MergeError, clip
from mergecore.io.source import ModelSource, dtype_name
from mergecore.moe.config import MoEConfig

INPUTS = ("llama", "mistral", "qwen2")
FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # same tensors, same config meaning
PARTS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# config keys of the dense model that the mixture's config class must not inherit
_DROP = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map", "torch_dtype", "dtype",
         "mlp_bias", "attention_bias", "pretraining_tp", "quantization_config")
SUPPORTED = ("mergecore moe builds Mixtral from llama or mistral models and Qwen2-MoE from qwen2 (or llama / "
             "mistral) models with one shared expert")


@dataclass(frozen=True)
class Output:
    """The mixture being written: its kind ('mixtral' | 'qwen2_moe') and sizes."""

    kind: str
    layers: int
    experts: int
    hidden: int
    shared: bool

    @property
    def architecture(self) -> str:
        return {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[self.kind]

    def gate(self, layer: int) -> str:
        block = "block_sparse_moe" if self.kind == "mixtral" else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    def expert(self, layer: int, expert: int, part: str) -> str:
        if self.kind == "mixtral":
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL_W[part]}.weight"
        return f"model.layers.{layer}.mlp.experts.{expert}.{part}.weight"

    def shared_expert(self, layer: int, part: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{part}.weight"

    def shared_gate(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def mlp_name(layer: int, part: str) -> str:
    """A dense model's MLP weight."""
    return f"model.layers.{layer}.mlp.{part}.weight"


def is_mlp(name: str) -> bool:
    m = _LAYER.match(name)
    return bool(m) and m.group(2).startswith("mlp.")


def model_type(src: ModelSource) -> str:
    mt = src.config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise MergeError(f"model '{clip(src.ref, 120)}' has no model_type in its config.json; {SUPPORTED}")
    return mt


def _int(cfg: dict[str, Any], key: str, ref: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise MergeError(f"model '{clip(ref, 120)}': config.json has no valid {key} ({clip(v, 40)})")
    return v


def needs_shared_expert(base_model_type: str) -> bool:
    """Whether a base of this `model_type` makes a Qwen2-MoE mixture (exactly one shared expert)
    when the config asks for no architecture: qwen2 bases do (Mixtral lacks their attention biases)."""
    return base_model_type == "qwen2"


def choose_output(config: MoEConfig, base: ModelSource) -> Output:
    """The mixture for this base and config, or one line saying why none fits."""
    mt = model_type(base)
    if mt not in INPUTS:
        raise MergeError(f"base model '{clip(base.ref, 120)}' is a {clip(mt, 40)} model; {SUPPORTED}")
    cfg = base.config
    kind = config.output or ("qwen2_moe" if config.shared_experts or needs_shared_expert(mt) else "mixtral")
    shared = len(config.shared_experts or [])
    n = len(config.experts)
    if kind == "mixtral":
        if shared:
            raise MergeError("Mixtral has no shared experts; drop shared_experts, or set architecture: qwen2_moe "
                             "for a Qwen2-MoE model with one shared expert")
        if mt == "qwen2":
            raise MergeError("qwen2 models have attention biases that Mixtral lacks; their mixture is Qwen2-MoE, "
                             "which needs one shared expert (shared_experts: [{source_model: ..., positive_prompts: "
                             "[...]}]; the base model is the usual choice)")
        if n < 2:
            raise MergeError(f"a Mixtral model needs at least 2 experts, got {n}")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise MergeError(f"base model '{clip(base.ref, 120)}' has {key}: true; Mixtral has no such biases")
    else:
        if shared != 1:
            raise MergeError(f"a Qwen2-MoE model has exactly one shared expert (shared_experts: [{{source_model: "
                             f"..., positive_prompts: [...]}}]; the base model is the usual choice), got {shared}")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise MergeError(f"base model '{clip(base.ref, 120)}' has attention or MLP biases that Qwen2-MoE's "
                             f"layers lack (it has q/k/v biases only)")
    if cfg.get("tie_word_embeddings") and not base.has("model.embed_tokens.weight"):
        raise MergeError(f"base model '{clip(base.ref, 120)}' ties its embeddings but has no model.embed_tokens.weight")
    return Output(kind, _int(cfg, "num_hidden_layers", base.ref), n, _int(cfg, "hidden_size", base.ref), bool(shared))


def check_expert(src: ModelSource, base: ModelSource, out: Output, what: str) -> None:
    """An expert must be of the base's family and have the base's layers, activation and MLP
    shapes, with bias-free MLPs (one line naming the first difference)."""
    who = f"{what} '{clip(src.ref, 120)}'"
    mt, bt = model_type(src), model_type(base)
    if mt not in INPUTS:
        raise MergeError(f"{who} is a {clip(mt, 40)} model; {SUPPORTED}")
    if FAMILY[mt] != FAMILY[bt]:
        raise MergeError(f"{who} is a {mt} model and the base a {bt} one; the experts must be of the base's "
                         f"architecture")
    for key in ("num_hidden_layers", "hidden_size", "hidden_act"):
        a, b = src.config.get(key), base.config.get(key)
        if a != b:
            raise MergeError(f"{who} has {key} {clip(a, 40)}, the base {clip(b, 40)}; the experts must have the "
                             f"base's shape")
    for name in src.tensors:
        if is_mlp(name) and not name.endswith(tuple(f".mlp.{p}.weight" for p in PARTS)):
            raise MergeError(f"{who} has the MLP tensor '{clip(name, 120)}' (a bias?); an expert is bias-free "
                             f"gate_proj, up_proj and down_proj weights")
    for layer in range(out.layers):
        for part in PARTS:
            name = mlp_name(layer, part)
            if not src.has(name):
                raise MergeError(f"{who} has no tensor '{name}'; {SUPPORTED}")
            got, want = src.info(name).shape, base.info(name).shape if base.has(name) else None
            if want is not None and got != want:
                raise MergeError(f"{who}: '{name}' is {list(got)}, the base's is {list(want)}; the experts must "
                                 f"have the base's shape")
            if not src.info(name).dtype.is_floating_point:
                raise MergeError(f"{who}: '{name}' is {dtype_name(src.info(name).dtype)}, not floating point "
                                 f"(a quantised checkpoint?)")


def output_config(out: Output, base: ModelSource, config: MoEConfig, intermediate: int,
                  dtype: torch.dtype) -> str:
    """config.json of the mixture, built by transformers' own config class from the base's."""
    import transformers as tf

    d = {k: v for k, v in base.config.items() if k not in _DROP}
    if d.get("head_dim") is None:
        d.pop("head_dim", None)
    common = dict(architectures=[out.architecture], num_experts_per_tok=config.experts_per_token,
                  intermediate_size=intermediate, dtype=dtype_name(dtype))
    try:
        if out.kind == "mixtral":
            for key in ("use_sliding_window", "max_window_layers", "layer_types"):
                d.pop(key, None)
            cfg = tf.MixtralConfig(**{**d, **common, "num_local_experts": out.experts})
        else:
            cfg = tf.Qwen2MoeConfig(**{**d, **common, "num_experts": out.experts, "moe_intermediate_size": intermediate,
                                       "shared_expert_intermediate_size": intermediate, "decoder_sparse_step": 1,
                                       "mlp_only_layers": [], "norm_topk_prob": True,
                                       "qkv_bias": model_type(base) == "qwen2"})
    except (TypeError, ValueError) as err:
        raise MergeError(f"cannot make a {out.architecture} config from the base's config.json: "
                         f"{clip(err, 200)}") from None
    return cfg.to_json_string()  # what save_pretrained writes


def base_tensors(base: ModelSource) -> list[str]:
    """The base's tensors the mixture takes as they are: everything but the MLPs (and the
    rotary inv_freq buffers old checkpoints saved, which transformers recomputes)."""
    return [n for n in base.tensors if not is_mlp(n) and not n.endswith("rotary_emb.inv_freq")]


def layer_of(name: str) -> Optional[int]:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None
