"""A tiny Llama with a word-level tokenizer, for text tests that compute scores by hand."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence


def word_level_llama(dest: Path, llama_dir: Path, words: Sequence[str], vocab_size: int = 96) -> tuple[Path, Any]:
    """Copy the conftest tiny Llama (`llama_dir`) to `dest` with a WordLevel tokenizer over `words`
    (ids 0-3 are <pad> <s> </s> <unk>; every id up to `vocab_size` decodes to a word; each text
    starts with <s>). Returns (folder, tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    shutil.copytree(llama_dir, dest)
    tok.save_pretrained(dest)
    return dest, tok


def greedy_by_hand(model: Any, tok: Any, prompt: str, n: int) -> str:
    """Up to `n` greedy tokens after `prompt`, one full forward each (no cache), stopping at </s>:
    the reference the generation task's exact match is checked against."""
    import torch

    ids, out = tok(prompt)["input_ids"], []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()
