"""Architecture tables (`mergecore.arch`): every entry agrees with the generic name rules on real
checkpoints, and the groups / filters / norms the app, describe and DAM read come from it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergecore import arch
from mergecore.io.source import ModelSource

# what the app's attention / MLP filters were for these models before the tables
FILTERS = {
    "llama": ("self_attn", ("mlp",)),
    "gpt2": ("attn", ("mlp",)),
    "bert": ("attention", ("intermediate", "output.dense")),
    "vit": ("attention", ("intermediate", "output.dense")),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_each_entry_matches_the_generic_rules_on_a_real_checkpoint(model_factory, name):
    src = ModelSource(str(model_factory(name)))
    entry = arch.find_architecture(src.config, src.tensors)
    assert entry.name == name
    non_layer = [n for n in src.tensors if arch.layer_of(n) is None]
    assert non_layer and all(arch.is_pre_weight(n, entry) == arch.is_pre_weight(n) for n in non_layer)
    assert arch.group_filters(src.tensors) == arch.group_filters(src.tensors, entry) == FILTERS[name]
    inferred = arch.find_architecture(names=src.tensors)  # no config: inferred from the names
    assert (inferred.name, inferred.attn, inferred.mlp) == ("generic", *FILTERS[name])


def test_groups_follow_the_recipe_filters():
    bert = arch.find_architecture({"model_type": "bert"})
    assert arch.groups() == ("attn", "mlp", "other")
    assert arch.tensor_group("encoder.layer.0.attention.output.dense.weight", bert) == "attn"
    assert arch.tensor_group("encoder.layer.0.output.dense.weight", bert) == "mlp"
    assert arch.tensor_group("encoder.layer.0.output.LayerNorm.weight", bert) == "other"
    llama = arch.find_architecture({"model_type": "qwen2"})
    assert arch.tensor_group("model.layers.3.post_attention_layernorm.weight", llama) == "other"
    assert arch.tensor_group("model.layers.3.self_attn.q_proj.weight") == "attn"  # any known filter
    assert arch.tensor_group("model.layers.3.mlp.up_proj.weight") == "mlp"


def test_unknown_architectures_infer_their_filters_in_table_order():
    names = ["model.layers.0.attention.wqkv.weight", "model.layers.0.feed_forward.w1.weight",
             "model.layers.0.ffn_norm.weight", "model.tok_embeddings.weight"]
    assert arch.group_filters(names) == ("attention", ("feed_forward",))
    assert arch.group_filters(["x.weight"]) == (None, ())


def test_norms_by_module_class_and_by_name():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for module in (nn.LayerNorm(4), nn.RMSNorm(4), nn.GroupNorm(2, 4), LlamaRMSNorm(4)):
        assert arch.is_norm("", module)
    assert not arch.is_norm("norm", nn.Linear(2, 2))  # a module is judged by its class

    class FancyNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2, 2))

    assert not arch.is_norm("", FancyNorm())  # a *Norm class needs a 1-D weight
    gpt2 = arch.find_architecture({"model_type": "gpt2"})
    assert arch.is_norm("transformer.h.0.ln_1.weight", arch=gpt2) and arch.is_norm("transformer.ln_f.bias")
    assert arch.is_norm("encoder.layer.0.output.LayerNorm.weight")
    assert not arch.is_norm("transformer.h.0.mlp.c_fc.weight")


def test_layer_names_of_every_entry_are_recognised():
    for entry in arch.ARCHITECTURES:
        for stack in entry.stacks:
            ref = arch.layer_of(f"{stack}.7.x.weight")
            assert ref is not None and (ref.stack, ref.index, ref.rest) == (stack, 7, "x.weight")
    assert arch.layer_of("encoder.block.2.x.weight").stack == "encoder.block"
    assert arch.layer_of("model.embed_tokens.weight") is None


def test_model_kind_from_the_config():
    from mergecore.arch import model_kind

    assert model_kind({"architectures": ["LlamaForCausalLM"]}) == "causal-lm"
    assert model_kind({"architectures": ["GPT2LMHeadModel"]}) == "causal-lm"
    assert model_kind({"architectures": ["ViTForImageClassification"]}) == "image-classification"
    assert model_kind({"architectures": ["BertModel"]}) == model_kind({}) == model_kind({"architectures": [3]}) == "other"
