"""`mergecore moe`: dense tiny Llamas / Qwen2s into Mixtral / Qwen2-MoE checkpoints.

The experts share a base and differ in their MLPs only. Outputs are loaded by transformers (no
missing or unexpected tensor) and generate; expert tensors are the source MLPs byte for byte;
hidden gates are compared with MLP inputs recorded by hand (a hook on post_attention_layernorm),
and a mixture whose experts are all the base reproduces the base's logits (which also pins the
w1/w2/w3 naming).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergecore.cli import main
from mergecore.errors import Cancelled, MergeError
from mergecore.events import CancelToken
from mergecore.io.outdir import MARKER, read_marker, write_marker
from mergecore.moe import build as build_mod
from mergecore.moe.build import CONFIG_FILE, build_moe
from mergecore.moe.config import parse_moe_config

WORDS = "python code def return story once upon time king sum plus number hello world".split()


def _tokenizer(arch: str = "llama"):
    """Llama: a WordLevel tokenizer that puts <s> first. Qwen2: a byte-level BPE (transformers
    loads any tokenizer beside a qwen2 config as Qwen2's BPE, so it must be one), no BOS."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if arch == "qwen2":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<|endoftext|>"], show_progress=False)
        tk.train_from_iterator([" ".join(WORDS)] * 20 + WORDS * 20, trainer)  # every word one token
        return tf.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < 64:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")


def _tok(folder: Path):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(str(folder))


def _config(arch: str, intermediate: int = 48):
    import transformers as tf

    kw = dict(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**{**kw, "vocab_size": 320}, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**kw, sliding_window=None)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    return tf.LlamaForCausalLM, tf.LlamaConfig(**kw, tie_word_embeddings=False)


def _family(root: Path, arch: str, experts: int = 3, intermediate: int = 48) -> dict[str, Path]:
    """A base (with a tokenizer) and `experts` models that differ from it in their MLPs only."""
    cls, cfg = _config(arch, intermediate)
    torch.manual_seed(0)
    base = cls(cfg)
    base.save_pretrained(root / "base")
    _tokenizer(arch).save_pretrained(root / "base")
    out = {"base": root / "base"}
    for i in range(experts):
        torch.manual_seed(100 + i)
        m = cls(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".mlp." in n:
                    p.add_(torch.randn_like(p) * 0.2)
        m.save_pretrained(root / f"e{i}")
        out[f"e{i}"] = root / f"e{i}"
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    return _family(tmp_path_factory.mktemp("moe-llama"), "llama")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    return _family(tmp_path_factory.mktemp("moe-qwen"), "qwen2", experts=2)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _cfg(fam: dict[str, Path], prompts: list[list[str]], **extra) -> dict:
    return {"base_model": str(fam["base"]), "dtype": "float32",
            "experts": [{"source_model": str(fam[f"e{i}"]), "positive_prompts": p} for i, p in enumerate(prompts)],
            **extra}


PROMPTS = [["python"], ["story"], ["sum"]]  # one word each: one token after <s>


def _load(path: Path):
    import transformers as tf

    model, info = tf.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _mlp_inputs(model_dir: Path, text: str) -> torch.Tensor:
    """By hand: each layer's post_attention_layernorm output at `text`'s own tokens (not <s>),
    [layers, tokens, hidden]."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    enc = _tok(model_dir)(text, return_tensors="pt", return_special_tokens_mask=True)
    own = enc.pop("special_tokens_mask")[0] == 0
    seen = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out[0].detach()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    return torch.stack(seen)[:, own]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Mixtral from Llama experts


@pytest.fixture(scope="module")
def mixtral(llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixtral")
    cfg = _write(root / "moe.yml", _cfg(llama, PROMPTS, experts_per_token=1))
    assert main(["moe", str(cfg), str(root / "out"), "-q"]) == 0
    return root / "out"


def test_mixtral_loads_generates_and_keeps_every_source_tensor(llama, mixtral):
    model = _load(mixtral)
    assert type(model).__name__ == "MixtralForCausalLM"
    cfg = json.loads((mixtral / "config.json").read_text())
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (3, 1, 48)
    ids = _tokenizer()("python code", return_tensors="pt")
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
        want = _unit(_mlp_inputs(llama["base"], word)[:, 0])  # token 1: the word after <s>
        for layer in range(2):
            got = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e]
            assert torch.allclose(got, want[layer], atol=1e-5), (e, layer)
    # several prompts: their mean; negative prompts: minus their mean; several tokens: their mean
    cfg = _cfg(llama, [["python", "code"], ["story"], ["sum plus"]])
    cfg["experts"][1]["negative_prompts"] = ["king"]
    result = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    h = {w: _mlp_inputs(llama["base"], w)[:, 0] for w in ("python", "code", "story", "king")}
    two = _mlp_inputs(llama["base"], "sum plus").mean(1)
    wants = [_unit((h["python"] + h["code"]) / 2), _unit(h["story"] - h["king"]), _unit(two)]
    for e, want in enumerate(wants):
        assert torch.allclose(result.gates[:, e], want, atol=1e-5), e


def test_a_prompt_is_routed_to_its_own_expert(llama, mixtral):
    gates = load_file(mixtral / "model.safetensors")
    model = _load(mixtral)
    tok = _tokenizer()
    for e, (word,) in enumerate(PROMPTS):
        h = _mlp_inputs(llama["base"], word)[:, 0]  # the base's MLP inputs, as the gates were made
        for layer in range(2):
            logits = gates[f"model.layers.{layer}.block_sparse_moe.gate.weight"] @ h[layer]
            assert int(logits.argmax()) == e, (e, layer)
        with torch.no_grad():  # in the mixture itself, layer 0 sees the base's MLP input exactly
            router = model(**tok(word, return_tensors="pt"), output_router_logits=True).router_logits
        assert int(router[0][1].argmax()) == e


def test_a_mixture_of_copies_of_the_base_computes_the_base(llama, tmp_path):
    """Every expert the base: routing weights sum to 1, so the logits are the base's (a swapped
    w1/w3 or a misnamed tensor would change them)."""
    cfg = _cfg(llama, PROMPTS[:2], experts_per_token=2)
    for e in cfg["experts"]:
        e["source_model"] = str(llama["base"])
    result = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    assert any("same model" in w for w in result.warnings)
    import transformers as tf

    ids = _tokenizer()("python code story", return_tensors="pt")
    with torch.no_grad():
        want = tf.AutoModelForCausalLM.from_pretrained(str(llama["base"]))(**ids).logits
        got = _load(tmp_path / "out")(**ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_top1_output_is_the_chosen_experts_mlp(llama, mixtral):
    """With one expert per token the MoE block's output at layer 0 is that expert's dense MLP."""
    import transformers as tf

    model = _load(mixtral)
    for e, (word,) in enumerate(PROMPTS):
        seen = {}
        block = model.model.layers[0].mlp
        hook = block.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
        with torch.no_grad():
            model(**_tokenizer()(word, return_tensors="pt"))
        hook.remove()
        dense = tf.AutoModelForCausalLM.from_pretrained(str(llama[f"e{e}"])).model.layers[0].mlp
        with torch.no_grad():
            assert torch.allclose(seen["y"][0, 1], dense(seen["x"][0, 1]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Qwen2-MoE


def test_qwen2_moe_with_a_shared_expert(qwen, tmp_path):
    cfg = _cfg(qwen, [["python"], ["story"]], experts_per_token=1,
               shared_experts=[{"source_model": str(qwen["base"]), "positive_prompts": ["hello"],
                                "residual_scale": 0.5}])
    result = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    assert result.architecture == "Qwen2MoeForCausalLM" and result.shared
    model = _load(tmp_path / "out")
    c = model.config
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size,
            c.decoder_sparse_step, list(c.mlp_only_layers), c.norm_topk_prob) == (2, 1, 48, 48, 1, [], True)
    assert model.generate(**_tok(qwen["base"])("python", return_tensors="pt"), max_new_tokens=3,
                          do_sample=False).shape[1] == 4
    out = load_file(tmp_path / "out" / "model.safetensors")
    base, e1 = load_file(qwen["base"] / "model.safetensors"), load_file(qwen["e1"] / "model.safetensors")
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp."
        assert torch.equal(out[pre + "experts.1.up_proj.weight"], e1[pre + "up_proj.weight"])
        assert torch.equal(out[pre + "shared_expert.gate_proj.weight"], base[pre + "gate_proj.weight"])
        assert torch.equal(out[pre + "shared_expert.down_proj.weight"], base[pre + "down_proj.weight"] * 0.5)
        want = _unit(_mlp_inputs(qwen["base"], "hello")[layer, 0])
        assert torch.allclose(out[pre + "shared_expert_gate.weight"][0], want, atol=1e-5)
        assert out[pre + "gate.weight"].shape == (2, 32)
    assert "model.layers.0.self_attn.q_proj.bias" in out


def test_qwen2_moe_from_llama_experts_with_a_silent_shared_expert_is_the_base(llama, tmp_path):
    """residual_scale 0 silences the shared expert; with every routed expert the base, the
    Qwen2-MoE made from Llamas (no q/k/v biases) computes the base's logits."""
    cfg = _cfg(llama, PROMPTS[:2], experts_per_token=2,
               shared_experts=[{"source_model": str(llama["e2"]), "positive_prompts": ["hello"], "residual_scale": 0}])
    for e in cfg["experts"]:
        e["source_model"] = str(llama["base"])
    build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    import transformers as tf

    model = _load(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.qkv_bias is False
    ids = _tokenizer()("python code story", return_tensors="pt")
    with torch.no_grad():
        want = tf.AutoModelForCausalLM.from_pretrained(str(llama["base"]))(**ids).logits
        assert torch.allclose(model(**ids).logits, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the other gate modes


def test_cheap_embed_gates_are_the_mean_prompt_embedding_at_every_layer(llama, tmp_path):
    cfg = _cfg(llama, [["python code"], ["story"]], gate_mode="cheap_embed")
    result = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    emb = load_file(llama["base"] / "model.safetensors")["model.embed_tokens.weight"]
    ids = [_tokenizer()(w)["input_ids"][1:] for w in ("python code", "story")]
    for e, row in enumerate(ids):
        want = _unit(emb[row].mean(0))
        for layer in range(2):
            assert torch.allclose(result.gates[layer, e], want, atol=1e-6)
    _load(tmp_path / "out")


def test_random_gates_are_seeded_and_need_no_prompts(llama, tmp_path):
    cfg = {"base_model": str(llama["base"]), "gate_mode": "random", "seed": 3,
           "experts": [{"source_model": str(llama[f"e{i}"])} for i in range(2)]}
    a = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "a")
    b = build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "b")
    c = build_moe(parse_moe_config(yaml.safe_dump({**cfg, "seed": 4})), tmp_path / "c")
    assert torch.equal(a.gates, b.gates) and not torch.equal(a.gates, c.gates) and a.gates.shape == (2, 2, 32)
    assert torch.equal(load_file(tmp_path / "a" / "model.safetensors")["model.layers.1.block_sparse_moe.gate.weight"],
                       a.gates[1])
    u = build_moe(parse_moe_config(yaml.safe_dump({**cfg, "gate_mode": "uniform_random"})), tmp_path / "u")
    assert float(u.gates.abs().max()) <= 32 ** -0.5
    _load(tmp_path / "a").generate(**_tokenizer()("python", return_tensors="pt"), max_new_tokens=2, do_sample=False)


def test_mistral_experts_and_a_bfloat16_output(tmp_path):
    fam = _family(tmp_path, "mistral", experts=2)
    cfg = {"base_model": str(fam["base"]), "gate_mode": "random", "dtype": "bfloat16",
           "experts": [{"source_model": str(fam[f"e{i}"])} for i in range(2)]}
    build_moe(parse_moe_config(yaml.safe_dump(cfg)), tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    src = load_file(fam["e1"] / "model.safetensors")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                       src["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    _load(tmp_path / "out").generate(**_tokenizer()("python", return_tensors="pt"), max_new_tokens=2, do_sample=False)


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
    cfg = _cfg(llama, PROMPTS[:2])
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


# ---------------------------------------------------------------------------------------------
# refusals: one line, exit status 2, nothing written


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, Path]:
    """Models that do not fit the llama family: another MLP width, a gpt2."""
    root = tmp_path_factory.mktemp("moe-odd")
    return {"wide": _family(root / "wide", "llama", experts=0, intermediate=40)["base"],
            "gpt2": _family(root / "gpt2", "gpt2", experts=0)["base"]}


def _bad(llama, qwen, odd) -> dict[str, tuple[object, str]]:
    good = _cfg(llama, PROMPTS)

    def with_(**kw) -> dict:
        return {**good, **kw}

    def expert(i: int, **kw) -> dict:
        experts = [dict(e) for e in good["experts"]]
        experts[i].update(kw)
        return with_(experts=experts)

    return {
        "shape": (expert(1, source_model=str(odd["wide"])), "is [40, 32], the base's is [48, 32]"),
        "architecture": (expert(0, source_model=str(qwen["e0"])), "is a qwen2 model and the base a llama one"),
        "unsupported": (with_(base_model=str(odd["gpt2"])), "is a gpt2 model; mergecore moe builds Mixtral from llama"),
        "k=0": (with_(experts_per_token=0), "experts_per_token must be between 1 and the number of experts (3), got 0"),
        "k>n": (with_(experts_per_token=4), "experts_per_token must be between 1 and the number of experts (3), got 4"),
        "k not int": (with_(experts_per_token="two"), "experts_per_token: Input should be a valid integer"),
        "no prompts": (expert(2, positive_prompts=None), "has no positive_prompts; gate_mode hidden builds"),
        "one expert": (with_(experts=good["experts"][:1], experts_per_token=1), "needs at least 2 experts, got 1"),
        "same prompts": (with_(experts=[{**e, "positive_prompts": ["x"]} for e in good["experts"]]),
                         "every expert has the same prompts"),
        "unknown key": (with_(gate_modes="hidden"), "unknown key 'gate_modes'"),
        "gate mode": (with_(gate_mode="learned"), "unknown gate_mode 'learned'"),
        "mixtral shared": (with_(architecture="mixtral", shared_experts=[good["experts"][0]]),
                           "Mixtral has no shared experts"),
        "qwen no shared": ({**_cfg(qwen, [["python"], ["story"]])}, "exactly one shared expert"),
        "missing": (expert(0, source_model=str(llama["base"]) + "-nope"), "not found"),
        "no tokenizer": (with_(base_model=str(llama["e0"]), gate_mode="cheap_embed"),
                         "tokenized with the base model's tokenizer"),
        "yaml": ("base_model: [unclosed\nexperts: []\n", "line 2, column 8: malformed YAML"),
        "top": ("- just a list\n", "expected a mapping at the top level"),
    }


CASES = ["shape", "architecture", "unsupported", "k=0", "k>n", "k not int", "no prompts", "one expert",
         "same prompts", "unknown key", "gate mode", "mixtral shared", "qwen no shared", "missing", "no tokenizer",
         "yaml", "top"]


def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, llama, qwen, odd, tmp_path, capsys):
    data, expected = _bad(llama, qwen, odd)[case]
    cfg = tmp_path / "moe.yml"
    cfg.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["moe", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    _nothing_at(tmp_path / "out")


def test_bad_device_and_bad_output_folder_are_refused(llama, tmp_path, capsys):
    cfg = _write(tmp_path / "moe.yml", _cfg(llama, PROMPTS))
    assert main(["moe", str(cfg), str(tmp_path / "out"), "--device", "tpu9", "-q"]) == 2
    assert "unknown device 'tpu9'; use cpu or cuda" in capsys.readouterr().err
    _nothing_at(tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["moe", str(cfg), str(tmp_path / "mine"), "-q"]) == 2
    assert "not empty and was not written by mergecore" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["moe", str(cfg), str(llama["e1"] / "sub"), "-q"]) == 2
    assert "inside the source model folder" in capsys.readouterr().err


def test_overwrite_replaces_only_an_earlier_mixture(llama, tmp_path, capsys):
    cfg = _write(tmp_path / "moe.yml", {**_cfg(llama, PROMPTS), "gate_mode": "random"})
    out = tmp_path / "out"
    assert main(["moe", str(cfg), str(out), "-q"]) == 0
    assert main(["moe", str(cfg), str(out), "-q"]) == 2
    assert "already holds a mixture of experts; pass --overwrite" in capsys.readouterr().err
    assert main(["moe", str(cfg), str(out), "-q", "--overwrite"]) == 0 and read_marker(out) == "moe"
    merged = tmp_path / "merged"
    merged.mkdir()
    write_marker(merged, "merge")
    (merged / "model.safetensors").write_bytes(b"x")
    assert main(["moe", str(cfg), str(merged), "-q", "--overwrite"]) == 2
    assert "holds a merge, not a mixture of experts" in capsys.readouterr().err
    assert (merged / "model.safetensors").read_bytes() == b"x"


@pytest.mark.parametrize("stage", ["gates", "writing"])
def test_cancel_leaves_nothing(llama, tmp_path, stage):
    cancel = CancelToken()
    seen = []

    def progress(p) -> None:
        seen.append(p.stage)
        if p.stage == stage:
            cancel.cancel()

    with pytest.raises(Cancelled):
        build_moe(parse_moe_config(yaml.safe_dump(_cfg(llama, PROMPTS))), tmp_path / "new" / "out",
                  progress=progress, cancel=cancel)
    assert stage in seen
    assert not (tmp_path / "new").exists()  # the parent it made is gone too


def test_a_failure_while_writing_leaves_nothing(llama, tmp_path, monkeypatch, capsys):
    calls = []
    real = build_mod._expert_tensor

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "_expert_tensor", failing)
    cfg = _write(tmp_path / "moe.yml", _cfg(llama, PROMPTS))
    assert main(["moe", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "moe failed: No space left on device" in err[0]
    _nothing_at(tmp_path / "out")
