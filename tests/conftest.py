"""Shared fixtures: tiny random checkpoints built from transformers configs, once per session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                              tie_word_embeddings=False), tf.LlamaForCausalLM
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                                sliding_window=None), tf.MistralForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                              tie_word_embeddings=True), tf.Qwen2ForCausalLM
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=96, n_positions=64), tf.GPT2LMHeadModel
    if arch == "bert":
        return tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             vocab_size=96, max_position_embeddings=64), tf.BertModel
    if arch == "vit":
        return tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            image_size=16, patch_size=8, num_channels=1, num_labels=3), tf.ViTForImageClassification
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "gpt2", "bert", "vit")


def build_tiny_model(path: Path, arch: str = "llama", seed: int = 0, base_seed: int | None = None,
                     noise: float = 0.02, shard_size: str | None = None, safe: bool = True) -> Path:
    """Save a tiny random model of `arch` at `path`.

    With `base_seed`, the weights are the base model's (seed `base_seed`) plus `noise`-scaled
    Gaussian noise drawn with `seed`: a stand-in for a fine-tune of that base.
    """
    import torch

    config, cls = _tiny_config(arch)
    torch.manual_seed(base_seed if base_seed is not None else seed)
    model = cls(config)
    if base_seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    kwargs = {"safe_serialization": safe}
    if shard_size:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory) -> Callable[..., Path]:
    """`model_factory(arch, seed, base_seed=None, ...)` -> a cached tiny checkpoint folder."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", seed: int = 0, base_seed: int | None = None, **kw) -> Path:
        key = (arch, seed, base_seed, tuple(sorted(kw.items())))
        if key not in cache:
            name = f"{arch}-s{seed}" + (f"-b{base_seed}" if base_seed is not None else "") + "".join(
                f"-{k}{v}" for k, v in sorted(kw.items()))
            cache[key] = build_tiny_model(root / name, arch, seed, base_seed, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_family(model_factory) -> dict[str, Path]:
    """A base and two 'fine-tunes' (base + noise) of a tiny Llama."""
    return {
        "base": model_factory("llama", 0),
        "a": model_factory("llama", 1, base_seed=0),
        "b": model_factory("llama", 2, base_seed=0),
    }


# ---------------------------------------------------------------------------------------------
# Miniature fmnist-vit family (real loaders and training code, tiny sizes), shared by the
# family, search and app tests.

# a miniature build: same code path as the full one, a few steps on a few hundred images
TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "batch_size": 32,
        "pretrain_steps": 4, "expert_steps": 3, "warmup_steps": 1, "train_limit": 300, "eval_limit": 200,
        "probe_steps": 5, "probe_train": 100, "eval_batch_size": 128}


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> str:
    """Debian's Fashion-MNIST when installed (apt-get install dataset-fashion-mnist); otherwise
    small stand-in idx files in the same format, made here, so the loaders still run for real."""
    import numpy as np

    from mergecore.eval.data import write_idx
    from mergecore.families.fmnist_vit import FASHION_DEFAULT_DIR, FASHION_FILES

    real = Path(FASHION_DEFAULT_DIR)
    if all((real / f).is_file() for f in FASHION_FILES.values()):
        return str(real)
    d = tmp_path_factory.mktemp("fashion-standin")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60000), ("test", 10000)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for c in range(10):  # a class-dependent bar, so there is something to learn
            images[labels == c, 2 + 2 * c:5 + 2 * c, 4:24] = 200
        write_idx(d / FASHION_FILES[f"{split}_images"], images)
        write_idx(d / FASHION_FILES[f"{split}_labels"], labels)
    return str(d)




@pytest.fixture(scope="session")
def tiny_fmnist_family(tmp_path_factory, fashion_dir):
    """A miniature fmnist-vit family built once per session through the real builder."""
    from mergecore.families import build_family

    root = tmp_path_factory.mktemp("tiny-families")
    return build_family("fmnist-vit", root=root, quick=True, overrides={**TINY, "fashion_dir": fashion_dir})
