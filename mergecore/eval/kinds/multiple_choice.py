"""`multiple_choice`: the option with the largest log-likelihood of its tokens given the context
wins (``normalize``: none | tokens | chars); accuracy.
"""

from __future__ import annotations

import json
import string
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from mergecore.errors import MergeError, short
from mergecore.eval.kind import (Prepared, Resources, Task, TaskSpec, TrainingInputs, fill_template, model_device,
                                 register_kind)
from mergecore.eval.prep import pad_batch, pad_id_of


class MultipleChoiceSpec(TaskSpec):
    kind: Literal["multiple_choice"]
    context_field: str = "question"
    context_template: Optional[str] = None  # e.g. "Question: {question}\nAnswer:" (row fields)
    choices_field: Optional[str] = "choices"
    choice_fields: Optional[list[str]] = None  # one column per option (CSV style)
    answer_field: str = "answer"
    choice_prefix: str = " "
    normalize: Literal["none", "tokens", "chars"] = "none"
    max_length: int = Field(default=1024, ge=2)
    tokenizer: Optional[str] = None


def _sequence_logprobs(model: torch.nn.Module, seqs: list[list[int]], cont_lens: list[int], pad_id: int) -> list[float]:
    """Sum of log p(token) over the last `cont_len` tokens of each sequence (one forward pass)."""
    dev = model_device(model)
    ids, mask = pad_batch(seqs, pad_id, "right")
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
    out = []
    for i, (s, c) in enumerate(zip(seqs, cont_lens)):
        n = len(s)
        rows = logits[i, n - c - 1:n - 1].float()
        target = ids[i, n - c:n].to(rows.device)
        out.append(float(rows.log_softmax(-1).gather(-1, target[:, None]).sum()))
    return out


class MultipleChoiceTask(Task):
    kind = "multiple_choice"
    metric = "accuracy"
    spec_class = MultipleChoiceSpec

    def _choices(self, row: dict[str, Any]) -> list[str]:
        s = self.spec
        if s.choice_fields:
            return [str(row[f]) for f in s.choice_fields]
        v = row[s.choices_field]
        if isinstance(v, str):  # a JSON list stored in a CSV cell
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                raise MergeError(f"{self.where()}: field '{s.choices_field}' must be a list of options") from None
        if not isinstance(v, (list, tuple)) or len(v) < 2:
            raise MergeError(f"{self.where()}: field '{s.choices_field}' must be a list of at least 2 options")
        return [str(x) for x in v]

    def _answer(self, row: dict[str, Any], choices: list[str]) -> int:
        v = row[self.spec.answer_field]
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer()):
            i = int(v)
        elif isinstance(v, str) and v in choices:
            i = choices.index(v)
        elif isinstance(v, str) and v.strip().isdigit():
            i = int(v.strip())
        elif isinstance(v, str) and len(v.strip()) == 1 and v.strip().upper() in string.ascii_uppercase:
            i = string.ascii_uppercase.index(v.strip().upper())
        else:
            raise MergeError(f"{self.where()}: answer {short(v)} is neither an option index, a letter nor one of the options")
        if not 0 <= i < len(choices):
            raise MergeError(f"{self.where()}: answer index {i} is outside the {len(choices)} options")
        return i

    def _prepare(self, res: Resources) -> Prepared:
        s = self.spec
        rows = self.records()
        self.require_fields(rows, None if s.context_template else s.context_field, s.answer_field,
                             None if s.choice_fields else s.choices_field, *(s.choice_fields or []))
        tok = res.tokenizer(self.tokenizer_override())
        examples = []
        for r in rows:
            ctx = fill_template(s.context_template, s.context_field, r, self.where())
            choices = self._choices(r)
            ctx_ids = tok(ctx)["input_ids"]
            opts = []
            for c in choices:
                cont = tok(s.choice_prefix + c, add_special_tokens=False)["input_ids"]
                if not cont:
                    raise MergeError(f"{self.where()}: option {short(c)} has no tokens")
                seq = (ctx_ids + cont)[-s.max_length:]
                opts.append((seq, min(len(cont), len(seq) - 1), len(s.choice_prefix + c)))
            examples.append((opts, self._answer(r, choices)))
        return Prepared(len(rows), {"examples": examples, "pad_id": pad_id_of(tok)})

    def score(self, model, prepared, indices, res, batch_size, on_batch=None):
        exs = prepared.data["examples"]
        flat = [(k, j, seq, c, nchar) for k in indices for j, (seq, c, nchar) in enumerate(exs[k][0])]
        lps: dict[tuple[int, int], float] = {}
        finished = 0
        for start in range(0, len(flat), batch_size):
            part = flat[start:start + batch_size]
            vals = _sequence_logprobs(model, [p[2] for p in part], [p[3] for p in part], prepared.data["pad_id"])
            for p, v in zip(part, vals):
                lps[(p[0], p[1])] = v
                finished += int(p[1] == len(exs[p[0]][0]) - 1)  # an example's last option: it is done
            if on_batch:
                on_batch(finished)
        correct = {"none": 0, "tokens": 0, "chars": 0}
        for k in indices:
            opts, ans = exs[k]
            raw = [lps[(k, j)] for j in range(len(opts))]
            scores = {"none": raw, "tokens": [v / c for v, (_, c, _) in zip(raw, opts)],
                      "chars": [v / max(1, n) for v, (_, _, n) in zip(raw, opts)]}
            for mode, vals in scores.items():
                correct[mode] += int(int(np.argmax(vals)) == ans)
        n = max(1, len(indices))
        return {"accuracy": correct[self.spec.normalize] / n, "accuracy_raw": correct["none"] / n,
                "accuracy_token_norm": correct["tokens"] / n, "accuracy_char_norm": correct["chars"] / n}

    def training_inputs(self, res: Resources, model: torch.nn.Module) -> TrainingInputs:
        """Each question's context with its correct option, as causal-LM rows (one per token)."""
        prepared = self.prepare(res)
        items = [opts[ans][0] for opts, ans in prepared.data["examples"]]
        return TrainingInputs("token", items, prepared.data["pad_id"])


register_kind(MultipleChoiceTask)
