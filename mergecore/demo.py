"""Built-in demo models, built locally on first use (no download).

Until the offline model families land, the demo is three tiny Llama checkpoints: a base and two
variants of it (base + seeded noise). They are labelled as synthetic everywhere they appear.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("MERGECORE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mergecore")
    return Path(root)


def build_synthetic_llamas(root: Path | None = None) -> dict[str, Path]:
    """Three tiny synthetic Llama checkpoints (base, variant_a, variant_b); cached."""
    import torch
    import transformers as tf

    root = (root or cache_root()) / "demo-synthetic-llama"
    names = {"base": None, "variant_a": 1, "variant_b": 2}
    out = {n: root / n for n in names}
    if all((p / "model.safetensors").is_file() for p in out.values()):
        return out
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    for name, seed in names.items():
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(cfg)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(out[name])
    return out
