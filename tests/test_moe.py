"""`mergecore moe`: dense tiny Llamas / Qwen2s into Mixtral / Qwen2-MoE checkpoints.

The experts share a base and differ in their MLPs only. Outputs are loaded by transformers (no
missing or unexpected tensor) and generate; expert tensors are the source MLPs byte for byte;
hidden gates are compared with MLP inputs recorded by hand (a hook on post_attention_layernorm),
and a mixture whose experts are all the base reproduces the base's logits (which also pins the
w1/w2/w3 naming). Refusals, cancel and output folders: test_moe_errors.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _moe_helpers import (PROMPTS, family, llama, load_checked, mlp_inputs, moe_dict, qwen,  # noqa: F401
                          tok, tokenizer, unit, write_yaml)
from mergecore.cli import main
from mergecore.io.outdir import read_marker
from mergecore.moe.build import CONFIG_FILE, build_moe
from mergecore.moe.config import parse_moe_config


# ---------------------------------------------------------------------------------------------
# Mixtral from Llama experts


@pytest.fixture(scope="module")
def mixtral(llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixtral")
    cfg = write_yaml(root / "moe.yml", moe_dict(llama, PROMPTS, experts_per_token=1))
    assert main(["moe", str(cfg), str(root / "out"), "-q"]) == 0
    return root / "out"


def test_mixtral_loads_generates_and_keeps_every_source_tensor(llama, mixtral):
    model = load_checked(mixtral)
    assert type(model).__name__ == "MixtralForCausalLM"
    cfg = json.loads((mixtral / "config.json").read_text())
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (3, 1, 48)
    ids = tokenizer()("python code", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape == (1, 7)
    out = load_file(mixtral / "model.safetensors")
    base = load_file(llama["base"] / "model.safetensors")
    for e in range(3):
        src = load_file(llama[f"e{e}"] / "model.safetensors")
        for layer in range(2):
            for part, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                got = out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                want = src[f"model.layers.{layer}.mlp.{part}.weight"]
                assert got.dtype == want.dtype and got.numpy().tobytes() == want.numpy().tobytes()
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(out[name], t), name
    assert out["model.layers.0.block_sparse_moe.gate.weight"].shape == (3, 32)
    assert not any(".mlp." in n for n in out)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", CONFIG_FILE, "README.md"):
        assert (mixtral / f).is_file(), f
    assert read_marker(mixtral) == "moe"


def test_hidden_gate_rows_are_the_mean_mlp_inputs_of_the_prompts(llama, mixtral, tmp_path):
    out = load_file(mixtral / "model.safetensors")
    for e, (word,) in enumerate(PROMPTS):
        want = unit(mlp_inputs(llama["base"], word)[:, 0])  # the word itself (not <s>)
        for layer in range(2):
            got = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e]
            assert torch.allclose(got, want[layer], atol=1e-5), (e, layer)
    # several prompts: their mean; negative prompts: minus their mean; several tokens: their mean
    cfg = moe_dict(llama, [["python", "code"], ["story"], ["sum plus"]])
    cfg["experts"][1]["negative_prompts"] = ["king"]
    result = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    h = {w: mlp_inputs(llama["base"], w)[:, 0] for w in ("python", "code", "story", "king")}
    two = mlp_inputs(llama["base"], "sum plus").mean(1)
    wants = [unit((h["python"] + h["code"]) / 2), unit(h["story"] - h["king"]), unit(two)]
    for e, want in enumerate(wants):
        assert torch.allclose(result.gates[:, e], want, atol=1e-5), e


def test_a_prompt_is_routed_to_its_own_expert(llama, mixtral):
    gates = load_file(mixtral / "model.safetensors")
    model = load_checked(mixtral)
    words = tokenizer()
    for e, (word,) in enumerate(PROMPTS):
        h = mlp_inputs(llama["base"], word)[:, 0]  # the base's MLP inputs, as the gates were made
        for layer in range(2):
            logits = gates[f"model.layers.{layer}.block_sparse_moe.gate.weight"] @ h[layer]
            assert int(logits.argmax()) == e, (e, layer)
        with torch.no_grad():  # in the mixture itself, layer 0 sees the base's MLP input exactly
            router = model(**words(word, return_tensors="pt"), output_router_logits=True).router_logits
        assert int(router[0][1].argmax()) == e


def test_a_mixture_of_copies_of_the_base_computes_the_base(llama, tmp_path):
    """Every expert the base: routing weights sum to 1, so the logits are the base's (a swapped
    w1/w3 or a misnamed tensor would change them)."""
    cfg = moe_dict(llama, PROMPTS[:2], experts_per_token=2)
    for e in cfg["experts"]:
        e["source_model"] = str(llama["base"])
    result = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    assert any("same model" in w for w in result.warnings)
    import transformers as tf

    ids = tokenizer()("python code story", return_tensors="pt")
    with torch.no_grad():
        want = tf.AutoModelForCausalLM.from_pretrained(str(llama["base"]))(**ids).logits
        got = load_checked(tmp_path / "out")(**ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_top1_output_is_the_chosen_experts_mlp(llama, mixtral):
    """With one expert per token the MoE block's output at layer 0 is that expert's dense MLP."""
    import transformers as tf

    model = load_checked(mixtral)
    for e, (word,) in enumerate(PROMPTS):
        seen = {}
        block = model.model.layers[0].mlp
        hook = block.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
        with torch.no_grad():
            model(**tokenizer()(word, return_tensors="pt"))
        hook.remove()
        dense = tf.AutoModelForCausalLM.from_pretrained(str(llama[f"e{e}"])).model.layers[0].mlp
        with torch.no_grad():
            assert torch.allclose(seen["y"][0, 1], dense(seen["x"][0, 1]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Qwen2-MoE


def test_qwen2_moe_with_a_shared_expert(qwen, tmp_path):
    cfg = moe_dict(qwen, [["python"], ["story"]], experts_per_token=1,
               shared_experts=[{"source_model": str(qwen["base"]), "positive_prompts": ["hello"],
                                "residual_scale": 0.5}])
    result = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    assert result.architecture == "Qwen2MoeForCausalLM" and result.shared
    model = load_checked(tmp_path / "out")
    c = model.config
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size,
            c.decoder_sparse_step, list(c.mlp_only_layers), c.norm_topk_prob) == (2, 1, 48, 48, 1, [], True)
    assert model.generate(**tok(qwen["base"])("python", return_tensors="pt"), max_new_tokens=3,
                          do_sample=False).shape[1] == 4
    out = load_file(tmp_path / "out" / "model.safetensors")
    base, e1 = load_file(qwen["base"] / "model.safetensors"), load_file(qwen["e1"] / "model.safetensors")
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp."
        assert torch.equal(out[pre + "experts.1.up_proj.weight"], e1[pre + "up_proj.weight"])
        assert torch.equal(out[pre + "shared_expert.gate_proj.weight"], base[pre + "gate_proj.weight"])
        assert torch.equal(out[pre + "shared_expert.down_proj.weight"], base[pre + "down_proj.weight"] * 0.5)
        want = unit(mlp_inputs(qwen["base"], "hello")[layer, 0])
        assert torch.allclose(out[pre + "shared_expert_gate.weight"][0], want, atol=1e-5)
        assert out[pre + "gate.weight"].shape == (2, 32)
    assert "model.layers.0.self_attn.q_proj.bias" in out


def test_qwen2_moe_from_llama_experts_with_a_silent_shared_expert_is_the_base(llama, tmp_path):
    """residual_scale 0 silences the shared expert; with every routed expert the base, the
    Qwen2-MoE made from Llamas (no q/k/v biases) computes the base's logits."""
    cfg = moe_dict(llama, PROMPTS[:2], experts_per_token=2,
               shared_experts=[{"source_model": str(llama["e2"]), "positive_prompts": ["hello"], "residual_scale": 0}])
    for e in cfg["experts"]:
        e["source_model"] = str(llama["base"])
    build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    import transformers as tf

    model = load_checked(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.qkv_bias is False
    ids = tokenizer()("python code story", return_tensors="pt")
    with torch.no_grad():
        want = tf.AutoModelForCausalLM.from_pretrained(str(llama["base"]))(**ids).logits
        assert torch.allclose(model(**ids).logits, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the other gate modes


def test_cheap_embed_gates_are_the_mean_prompt_embedding_at_every_layer(llama, tmp_path):
    cfg = moe_dict(llama, [["python code"], ["story"]], gate_mode="cheap_embed")
    result = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    emb = load_file(llama["base"] / "model.safetensors")["model.embed_tokens.weight"]
    ids = [tokenizer()(w)["input_ids"][1:] for w in ("python code", "story")]
    for e, row in enumerate(ids):
        want = unit(emb[row].mean(0))
        for layer in range(2):
            assert torch.allclose(result.gates[layer, e], want, atol=1e-6)
    load_checked(tmp_path / "out")


def test_hidden_last_takes_each_prompts_last_token(llama, tmp_path):
    cfg = moe_dict(llama, [["python code"], ["story king"]], gate_mode="hidden_last")
    result = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    for e, text in enumerate(("python code", "story king")):
        assert torch.allclose(result.gates[:, e], unit(mlp_inputs(llama["base"], text)[:, -1]), atol=1e-5)


def test_random_gates_are_seeded_and_need_no_prompts(llama, tmp_path):
    cfg = {"base_model": str(llama["base"]), "gate_mode": "random", "seed": 3,
           "experts": [{"source_model": str(llama[f"e{i}"])} for i in range(2)]}
    a = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "a")
    b = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "b", shard_size="40KB")
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()  # sharded, and loads the same
    assert torch.equal(load_checked(tmp_path / "b").model.layers[1].mlp.gate.weight, b.gates[1])
    c = build_moe(parse_moe_config(yaml.safe_dump({**cfg, "seed": 4})), tmp_path / "c")
    assert torch.equal(a.gates, b.gates) and not torch.equal(a.gates, c.gates) and a.gates.shape == (2, 2, 32)
    assert torch.equal(load_file(tmp_path / "a" / "model.safetensors")["model.layers.1.block_sparse_moe.gate.weight"],
                       a.gates[1])
    u = build_moe(parse_moe_config(yaml.safe_dump({**cfg, "gate_mode": "uniform_random"})), tmp_path / "u")
    assert float(u.gates.abs().max()) <= 32 ** -0.5
    ids = tokenizer()("python", return_tensors="pt")
    load_checked(tmp_path / "a").generate(**ids, max_new_tokens=2, do_sample=False)


def test_mistral_experts_and_a_bfloat16_output(tmp_path):
    fam = family(tmp_path, "mistral", experts=2)
    cfg = {"base_model": str(fam["base"]), "gate_mode": "random", "dtype": "bfloat16",
           "experts": [{"source_model": str(fam[f"e{i}"])} for i in range(2)]}
    build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    src = load_file(fam["e1"] / "model.safetensors")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                       src["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    ids = tokenizer()("python", return_tensors="pt")
    load_checked(tmp_path / "out").generate(**ids, max_new_tokens=2, do_sample=False)


def test_lora_adapters_as_experts_and_as_the_base(llama, tmp_path):
    """`BASE+ADAPTER` models are folded as they are read: an expert is PEFT's merge_and_unload, and
    a base with an adapter gives the gates (and attention) of the folded model."""
    peft = pytest.importorskip("peft")
    import shutil
    import warnings

    import transformers as tf

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(str(llama["base"])),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj",
                                                                                       "down_proj"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape) * 0.1)
        model.save_pretrained(tmp_path / "adapter")
        model.merge_and_unload().save_pretrained(tmp_path / "folded")
    shutil.copy(llama["base"] / "tokenizer.json", tmp_path / "folded")
    shutil.copy(llama["base"] / "tokenizer_config.json", tmp_path / "folded")
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    adapted = f"{llama['base']}+{tmp_path / 'adapter'}"
    cfg = moe_dict(llama, PROMPTS[:2])
    cfg["experts"][1]["source_model"] = adapted
    build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    for part, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
        assert torch.allclose(out[f"model.layers.1.block_sparse_moe.experts.1.{w}.weight"],
                              folded[f"model.layers.1.mlp.{part}.weight"], atol=1e-6)
    on_adapter = build_moe(parse_moe_config(yaml.safe_dump({**cfg, "base_model": adapted})), tmp_path / "a")
    on_folded = build_moe(parse_moe_config(yaml.safe_dump({**cfg, "base_model": str(tmp_path / "folded")})),
                          tmp_path / "f")
    assert torch.allclose(on_adapter.gates, on_folded.gates, atol=1e-5)
    assert not torch.allclose(on_adapter.gates, build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "b").gates)
    a = load_file(tmp_path / "a" / "model.safetensors")
    assert torch.allclose(a["model.layers.0.self_attn.q_proj.weight"], folded["model.layers.0.self_attn.q_proj.weight"],
                          atol=1e-6)


def test_a_portable_config_rebuilds_the_same_mixture(llama, mixtral, tmp_path):
    """`portable_moe`: Hub ids kept, local models as models/<folder name> beside the config; built
    there, the config gives the same tensors. The config round-trips through its YAML, and a
    recipe is not taken for a config."""
    import shutil

    from mergecore.moe.config import is_moe_config, moe_config_yaml
    from mergecore.moe.portable import portable_moe

    exp = portable_moe(mixtral)
    assert exp.config.base_model == "models/base" and [e.source_model for e in exp.config.experts] == [
        "models/e0", "models/e1", "models/e2"]
    assert exp.local_models == {f"models/{n}": str(llama[n]) for n in ("base", "e0", "e1", "e2")}
    assert exp.config_text.startswith("# Rebuild: `mergecore moe mergecore_moe.yml OUT`")
    assert "`models/e2`" in exp.card and "# Mixtral mixture of experts" in exp.card
    assert parse_moe_config(moe_config_yaml(exp.config)) == exp.config
    folder = tmp_path / "unzipped"
    for ref, where in exp.local_models.items():
        shutil.copytree(where, folder / ref)
    (folder / CONFIG_FILE).write_text(exp.config_text)
    again = build_moe(folder / CONFIG_FILE, tmp_path / "again")
    a, b = load_file(mixtral / "model.safetensors"), load_file(again.out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert is_moe_config(yaml.safe_load(exp.config_text)) and not is_moe_config(
        {"merge_method": "linear", "models": [{"model": "a"}]}) and not is_moe_config(["experts"])
    from mergecore.errors import MergeError

    with pytest.raises(MergeError, match="not a mixture built by mergecore moe"):
        portable_moe(tmp_path)
