"""`generation`: greedy decoding, cut at ``stop`` strings, exact match against the answer(s)."""

from __future__ import annotations

import string
from typing import Literal, Optional

import torch
from pydantic import Field

from mergecore.eval.kind import (Prepared, Resources, Task, TaskSpec, TrainingInputs, batches, fill_template,
                                 model_device, register_kind)
from mergecore.eval.prep import pad_batch, pad_id_of


class GenerationSpec(TaskSpec):
    kind: Literal["generation"]
    prompt_field: str = "prompt"
    prompt_template: Optional[str] = None
    answer_field: str = "answer"
    max_new_tokens: int = Field(default=32, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    ignore_case: bool = False
    ignore_punctuation: bool = False
    strip: bool = True  # compare with surrounding whitespace removed and inner runs collapsed
    max_length: int = Field(default=1024, ge=1)
    tokenizer: Optional[str] = None


def _normalize_answer(text: str, spec: GenerationSpec) -> str:
    if spec.ignore_case:
        text = text.lower()
    if spec.ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split()) if spec.strip else text


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class GenerationTask(Task):
    kind = "generation"
    metric = "exact_match"
    spec_class = GenerationSpec

    def _prepare(self, res: Resources) -> Prepared:
        s = self.spec
        rows = self.records()
        self.require_fields(rows, None if s.prompt_template else s.prompt_field, s.answer_field)
        tok = res.tokenizer(self.tokenizer_override())
        prompts, answers = [], []
        for r in rows:
            p = fill_template(s.prompt_template, s.prompt_field, r, self.where())
            prompts.append(tok(p)["input_ids"][-s.max_length:])
            a = r[s.answer_field]
            answers.append([str(x) for x in a] if isinstance(a, (list, tuple)) else [str(a)])
        return Prepared(len(rows), {"prompts": prompts, "answers": answers, "tokenizer": tok})

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], tok) -> list[str]:
        """Greedy continuations (decoded, cut at the stop strings) of a batch of prompts."""
        from transformers import GenerationConfig

        dev = model_device(model)
        pad = pad_id_of(tok)
        ids, mask = pad_batch(prompts, pad, "left")
        eos = getattr(tok, "eos_token_id", None)
        cfg = GenerationConfig(max_new_tokens=self.spec.max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=pad, eos_token_id=eos, bos_token_id=getattr(tok, "bos_token_id", None))
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg)
        new = out[:, ids.shape[1]:].cpu()
        texts = []
        for row in new:
            toks = row.tolist()
            if eos is not None and eos in toks:
                toks = toks[:toks.index(eos)]
            texts.append(cut_at_stop(tok.decode(toks, skip_special_tokens=True), self.spec.stop))
        return texts

    def score(self, model, prepared, indices, res, batch_size, on_batch=None):
        tok = prepared.data["tokenizer"]
        hits = 0
        done = 0
        for b in batches(indices, batch_size):
            texts = self.generate(model, [prepared.data["prompts"][i] for i in b], tok)
            for i, t in zip(b, texts):
                got = _normalize_answer(t, self.spec)
                hits += int(any(got == _normalize_answer(a, self.spec) for a in prepared.data["answers"][i]))
            done += len(b)
            if on_batch:
                on_batch(done)
        return {"exact_match": hits / max(1, len(indices))}

    def training_inputs(self, res: Resources, model: torch.nn.Module) -> TrainingInputs:
        """The prompts, as causal-LM rows (one per token)."""
        prepared = self.prepare(res)
        items = [p for p in prepared.data["prompts"] if len(p) >= 1]
        return TrainingInputs("token", items, pad_id_of(prepared.data["tokenizer"]))


register_kind(GenerationTask)
