"""Token batches: padding lists of token ids, the pad id of a tokenizer.

(Image preprocessing and tokenizer loading live with the other loaders in `mergecore.models`.)
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into (input_ids, attention_mask) tensors."""
    n = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[i, :len(s)] = t
            mask[i, :len(s)] = 1
        else:
            ids[i, n - len(s):] = t
            mask[i, n - len(s):] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0
