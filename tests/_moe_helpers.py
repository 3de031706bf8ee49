"""Tiny dense families for the `mergecore moe` tests: a base with a tokenizer and experts that
differ from it in their MLPs only (Llama, Mistral, Qwen2), and what the tests compute by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

WORDS = "python code def return story once upon time king sum plus number hello world".split()


def tokenizer(arch: str = "llama"):
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


def tok(folder: Path):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(str(folder))


def model_config(arch: str, intermediate: int = 48):
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


def family(root: Path, arch: str, experts: int = 3, intermediate: int = 48) -> dict[str, Path]:
    """A base (with a tokenizer) and `experts` models that differ from it in their MLPs only."""
    cls, cfg = model_config(arch, intermediate)
    torch.manual_seed(0)
    base = cls(cfg)
    base.save_pretrained(root / "base")
    tokenizer(arch).save_pretrained(root / "base")
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
    return family(tmp_path_factory.mktemp("moe-llama"), "llama")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    return family(tmp_path_factory.mktemp("moe-qwen"), "qwen2", experts=2)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def moe_dict(fam: dict[str, Path], prompts: list[list[str]], **extra) -> dict:
    return {"base_model": str(fam["base"]), "dtype": "float32",
            "experts": [{"source_model": str(fam[f"e{i}"]), "positive_prompts": p} for i, p in enumerate(prompts)],
            **extra}


PROMPTS = [["python"], ["story"], ["sum"]]  # one word each: one token after <s>


def load_checked(path: Path):
    import transformers as tf

    model, info = tf.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def mlp_inputs(model_dir: Path, text: str) -> torch.Tensor:
    """By hand: each layer's post_attention_layernorm output at `text`'s own tokens (not <s>),
    [layers, tokens, hidden]."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    enc = tok(model_dir)(text, return_tensors="pt", return_special_tokens_mask=True)
    own = enc.pop("special_tokens_mask")[0] == 0
    seen = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out[0].detach()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    return torch.stack(seen)[:, own]


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)
