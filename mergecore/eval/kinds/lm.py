"""`lm` (causal-LM loss / perplexity; `perplexity` is the same kind): perplexity = exp(total NLL /
predicted tokens) over all texts; long texts are cut into ``max_length`` chunks. The score
(higher is better, in (0, 1]) is 1 / perplexity.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from mergecore.errors import MergeError
from mergecore.eval.kind import (Prepared, Resources, Task, TaskSpec, TrainingInputs, model_device, register_kind,
                                 row_text)
from mergecore.eval.prep import pad_batch, pad_id_of


class LMSpec(TaskSpec):
    kind: Literal["lm", "perplexity"]
    text_field: str = "text"
    max_length: int = Field(default=512, ge=2)
    add_special_tokens: bool = True
    tokenizer: Optional[str] = None


class LMTask(Task):
    kind = "lm"
    metric = "inv_perplexity"
    spec_class = LMSpec
    aliases = ("perplexity",)

    def _prepare(self, res: Resources) -> Prepared:
        rows = self.records()
        self.require_fields(rows, self.spec.text_field)
        tok = res.tokenizer(self.tokenizer_override())
        L = self.spec.max_length
        chunks: list[list[list[int]]] = []
        for i, r in enumerate(rows):
            text = row_text(r, self.spec.text_field, i, self.where())
            ids = tok(text, add_special_tokens=self.spec.add_special_tokens)["input_ids"]
            chunks.append([ids[i:i + L] for i in range(0, len(ids), L)] or [[]])
        return Prepared(len(rows), {"chunks": chunks, "pad_id": pad_id_of(tok)})

    def score(self, model, prepared, indices, res, batch_size, on_batch=None):
        dev = model_device(model)
        seqs = [(k, c) for k in indices for c in prepared.data["chunks"][k] if len(c) >= 2]
        total_nll = 0.0
        total_tokens = 0
        done_texts: set[int] = set()
        pad = prepared.data["pad_id"]
        for start in range(0, len(seqs), batch_size):
            part = seqs[start:start + batch_size]
            ids, mask = pad_batch([c for _, c in part], pad, "right")
            ids, mask = ids.to(dev), mask.to(dev)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            tmask = mask[:, 1:].bool()
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none").view(tmask.shape)
            total_nll += float(nll[tmask].sum())
            total_tokens += int(tmask.sum())
            done_texts.update(k for k, _ in part)
            if on_batch:
                on_batch(len(done_texts))
        if on_batch:
            on_batch(len(indices))
        if total_tokens == 0:
            raise MergeError(f"{self.where()}: the texts give no token to predict (each needs at least 2 tokens)")
        loss = total_nll / total_tokens
        return {"inv_perplexity": math.exp(-loss), "perplexity": math.exp(loss), "loss": loss, "tokens": float(total_tokens)}

    def training_inputs(self, res: Resources, model: torch.nn.Module) -> TrainingInputs:
        """The token chunks of the texts, each an example; every non-pad position is a row."""
        prepared = self.prepare(res)
        items = [c for chunks in prepared.data["chunks"] for c in chunks if len(c) >= 2]
        return TrainingInputs("token", items, prepared.data["pad_id"])


register_kind(LMTask)
