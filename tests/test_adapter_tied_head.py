"""`BASE+ADAPTER` on a base whose head is tied to its embedding (tied Qwen2, GPT-2): the base saves
no `lm_head.weight`, but an adapter that changed the embedding saves the head too (extract-lora
and peft's `ensure_weight_tying`). The head is read as the embedding's twin, as peft loads it;
a head peft would untie from the embedding is refused in one line.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _merge_helpers import assert_close, run_bad
from mergecore.io.adapter import AdapterSource, open_source
from mergecore.lora.extract import extract_lora

peft = pytest.importorskip("peft")

KEY = "base_model.model."
IDS = torch.tensor([[1, 5, 9, 20, 33, 47, 60, 2]])


def _load(path: Path):
    from mergecore.models import load_model

    return load_model(path)


def _peft_adapter(base: Path, out: Path, **kw) -> Path:
    """A peft LoRA on `base` (every trainable tensor moved off its init), saved at `out`."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_load(base), peft.LoraConfig(r=4, lora_alpha=8, **kw))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape) * 0.1)
        model.save_pretrained(out)
    return out


def _peft_model(base: Path, adapter: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(_load(base), adapter).eval()


def _edit(adapter: Path, out: Path, edit) -> Path:
    shutil.copytree(adapter, out)
    sd = load_file(out / "adapter_model.safetensors")
    edit(sd)
    save_file(sd, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _model_from(src: AdapterSource, base: Path):
    """The base model carrying the tensors `src` reads (the head re-tied to the embedding)."""
    model = _load(base)
    model.load_state_dict({n: src.read(n) for n in src.tensors}, strict=False)
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_extract_lora_adapter_of_a_tied_model_reads_back(model_factory, tmp_path, arch):
    """extract-lora saves the changed embedding and its tied head (equal): the reference reads
    as the fine-tune and as peft's fold."""
    base = model_factory(arch, 0)
    ft = model_factory(arch, 1, base_seed=0)
    extract_lora(str(ft), str(base), tmp_path / "out", rank=32)
    keys = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert f"{KEY}lm_head.weight" in keys
    src = open_source(f"{base}+{tmp_path / 'out'}")
    want = load_file(ft / "model.safetensors")
    folded = _peft_model(base, tmp_path / "out").merge_and_unload().state_dict()
    for name in src.tensors:
        assert_close(src.read(name), want[name], name, atol=1e-5)
        assert_close(src.read(name), folded[name], name, atol=1e-6)


def test_peft_ensure_weight_tying_adapters_read_as_peft_loads_them(model_factory, tmp_path):
    base = model_factory("qwen2", 0)
    saved = _peft_adapter(base, tmp_path / "saved", target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                          ensure_weight_tying=True)
    assert {f"{KEY}lm_head.weight", f"{KEY}model.embed_tokens.weight"} <= set(load_file(saved / "adapter_model.safetensors"))
    # a head that differs from the saved embedding: peft loads both into one weight, the head last
    differs = _edit(saved, tmp_path / "differs", lambda sd: sd[f"{KEY}lm_head.weight"].add_(0.5))
    for adapter in (saved, differs):
        src = open_source(f"{base}+{adapter}")
        folded = _peft_model(base, adapter).merge_and_unload().state_dict()
        for name in src.tensors:
            assert_close(src.read(name), folded[name], f"{adapter.name}: {name}", atol=1e-6)
    head = load_file(differs / "adapter_model.safetensors")[f"{KEY}lm_head.weight"]
    assert torch.equal(open_source(f"{base}+{differs}").read("model.embed_tokens.weight"), head)


def test_a_lora_on_the_tied_embedding_is_applied_once(model_factory, tmp_path):
    """target_modules=[embed_tokens] with ensure_weight_tying: peft shares the LoRA with the head
    (saved as lm_head.lora_A/B). The reference computes what the PeftModel computes."""
    base = model_factory("qwen2", 0)
    adapter = _peft_adapter(base, tmp_path / "lora", target_modules=["q_proj", "embed_tokens"],
                            ensure_weight_tying=True)
    assert f"{KEY}lm_head.lora_A.weight" in load_file(adapter / "adapter_model.safetensors")
    src = open_source(f"{base}+{adapter}")
    with torch.no_grad():
        want, got = _peft_model(base, adapter)(IDS).logits, _model_from(src, base)(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    sd = load_file(adapter / "adapter_model.safetensors")
    e0 = _load(base).state_dict()["model.embed_tokens.weight"]
    delta = (sd[f"{KEY}model.embed_tokens.lora_embedding_B"] @ sd[f"{KEY}model.embed_tokens.lora_embedding_A"]).T * 2
    assert_close(src.read("model.embed_tokens.weight"), e0 + delta, "embedding", atol=1e-6)


def test_a_head_peft_would_untie_is_refused(model_factory, tmp_path, capsys):
    base = model_factory("qwen2", 0)
    untied = _peft_adapter(base, tmp_path / "untied", target_modules=["q_proj"],
                           modules_to_save=["lm_head", "embed_tokens"])
    head_lora = _peft_adapter(base, tmp_path / "head-lora", target_modules=["q_proj", "lm_head"])
    for adapter, expected in ((untied, "saves 'lm_head' whole"), (head_lora, "trains a LoRA on 'lm_head'")):
        line = run_bad(tmp_path, capsys, {"merge_method": "linear",
                                          "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]})
        assert expected in line and "tie_word_embeddings" in line and "model.embed_tokens" in line
    # the same untied adapter whose head equals the saved embedding is a tied model after all
    equal = _edit(untied, tmp_path / "equal", lambda sd: sd.__setitem__(
        f"{KEY}lm_head.weight", sd[f"{KEY}model.embed_tokens.weight"].clone()))
    src = open_source(f"{base}+{equal}")
    saved = load_file(equal / "adapter_model.safetensors")[f"{KEY}model.embed_tokens.weight"]
    assert torch.equal(src.read("model.embed_tokens.weight"), saved)
