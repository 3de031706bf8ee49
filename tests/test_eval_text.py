"""mergecore.eval on text: causal-LM perplexity, multiple choice, generation and text
classification, checked against numbers computed by hand on a tiny Llama with a word-level
tokenizer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _text_helpers import greedy_by_hand, word_level_llama
from mergecore.errors import MergeError
from mergecore.eval import Evaluator, parse_tasks

WORDS = ("the a cat dog sat on mat ran to park big small red blue green is was and then it he she "
         "one two three four five six seven eight nine ten yes no question answer what color").split()


@pytest.fixture(scope="module")
def lm(tmp_path_factory, model_factory):
    """The conftest tiny Llama (vocab 96) plus a WordLevel tokenizer built here, saved together."""
    path, tok = word_level_llama(tmp_path_factory.mktemp("lm") / "llama", model_factory("llama", 0),
                                 WORDS + [str(i) for i in range(10)] + ["?", ".", ":"])
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(str(path)).eval()
    return path, model, tok


# ---------------------------------------------------------------------------------------------
# causal LM, multiple choice, generation


def test_lm_perplexity_is_exp_mean_nll_by_hand(lm, tmp_path):
    path, model, tok = lm
    texts = ["the cat sat on the mat", "a dog ran to the big park and then it sat", "red", "one two three four five"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    expected = math.exp(total / count)
    tasks = parse_tasks("- {name: ppl, kind: lm, data: {path: t.jsonl}}", base_dir=tmp_path)
    r = Evaluator(tasks, batch_size=3).evaluate(path)  # padded batches
    assert r["ppl"].metrics["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert r["ppl"].score == pytest.approx(1 / expected, rel=1e-4)
    assert r["ppl"].metrics["tokens"] == count
    # in memory, with the tokenizer handed over
    r2 = Evaluator(tasks, batch_size=1, tokenizer=tok).evaluate(model)
    assert r2["ppl"].metrics["perplexity"] == pytest.approx(expected, rel=1e-4)
    # long texts are cut into max_length chunks, each scored on its own
    chunked = parse_tasks("- {name: ppl, kind: lm, data: {path: t.jsonl}, max_length: 4}", base_dir=tmp_path)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"]
            for i in range(0, len(ids), 4):
                c = torch.tensor([ids[i:i + 4]])
                if c.shape[1] < 2:
                    continue
                total -= float(model(input_ids=c).logits[0, :-1].log_softmax(-1).gather(-1, c[0, 1:, None]).sum())
                count += c.shape[1] - 1
    r3 = Evaluator(chunked, batch_size=4).evaluate(path)
    assert r3["ppl"].metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_multiple_choice_picks_max_loglikelihood(lm, tmp_path):
    path, model, tok = lm
    qs = [("what color is the cat ?", ["red", "blue", "green"]),
          ("the dog ran to the", ["park", "big red mat", "cat"]),
          ("one two three", ["four", "five six", "ten"]),
          ("he sat on the", ["mat", "dog"])]

    def ll(ctx: str, choice: str) -> float:
        c = tok(ctx)["input_ids"]
        cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([c + cont])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
        return float(sum(logp[len(c) + j - 1, t] for j, t in enumerate(cont)))

    best = [int(np.argmax([ll("Q: " + q + " A:", o) for o in opts])) for q, opts in qs]
    answers = [best[0], (best[1] + 1) % 3, best[2], best[3]]  # 3 of 4 right
    rows = [{"question": q, "choices": opts, "answer": a} for (q, opts), a in zip(qs, answers)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = parse_tasks('- {name: mc, kind: multiple_choice, data: {path: mc.jsonl}, context_template: "Q: {question} A:"}',
                        base_dir=tmp_path)
    r = Evaluator(tasks, batch_size=2).evaluate(path)
    assert r["mc"].score == pytest.approx(0.75)
    # answers given as the option text or a letter work too
    rows[0]["answer"] = qs[0][1][best[0]]
    rows[2]["answer"] = "ABC"[best[2]]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = parse_tasks('- {name: mc, kind: multiple_choice, data: {path: mc.jsonl}, context_template: "Q: {question} A:"}',
                        base_dir=tmp_path)
    assert Evaluator(tasks, batch_size=5).evaluate(path)["mc"].score == pytest.approx(0.75)


def test_generation_exact_match_greedy(lm, tmp_path):
    path, model, tok = lm
    prompts = ["the cat sat on", "one two three four five six", "what color"]

    def greedy(prompt: str, n: int = 3) -> str:
        return greedy_by_hand(model, tok, prompt, n)

    expected = [greedy(p) for p in prompts]
    assert all(expected)
    rows = [{"prompt": prompts[0], "answer": expected[0]},
            {"prompt": prompts[1], "answer": ["no such answer", expected[1].upper()]},
            {"prompt": prompts[2], "answer": "definitely wrong"}]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = parse_tasks("- {name: g, kind: generation, data: {path: g.jsonl}, max_new_tokens: 3, ignore_case: true}",
                        base_dir=tmp_path)
    r = Evaluator(tasks, batch_size=3).evaluate(path)  # left-padded batch of different lengths
    assert r["g"].score == pytest.approx(2 / 3)
    strict = parse_tasks("- {name: g, kind: generation, data: {path: g.jsonl}, max_new_tokens: 3}", base_dir=tmp_path)
    assert Evaluator(strict, batch_size=1).evaluate(path)["g"].score == pytest.approx(1 / 3)


def test_text_tasks_need_a_tokenizer(lm, tmp_path):
    _, model, _ = lm
    (tmp_path / "t.jsonl").write_text('{"text": "the cat"}\n')
    tasks = parse_tasks("- {name: ppl, kind: lm, data: {path: t.jsonl}}", base_dir=tmp_path)
    import copy

    m = copy.deepcopy(model)
    m.name_or_path = ""
    m.config._name_or_path = ""
    with pytest.raises(MergeError, match="tokenizer"):
        Evaluator(tasks).evaluate(m)


def test_text_classification_with_label_names(lm, tmp_path):
    """A sequence classifier on CSV rows whose labels are names; padded batches match one-by-one."""
    import transformers as tf

    path, _, tok = lm
    cfg = tf.LlamaConfig.from_pretrained(str(path))
    cfg.num_labels, cfg.pad_token_id = 3, tok.pad_token_id
    torch.manual_seed(0)
    clf = tf.LlamaForSequenceClassification(cfg).eval()
    clf_dir = tmp_path / "clf"
    clf.save_pretrained(clf_dir)
    tok.save_pretrained(clf_dir)
    texts = ["the cat sat", "a big red dog ran to the park", "yes", "what color is it", "one two", "he was small"]
    with torch.no_grad():
        pred = [int(clf(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0].argmax()) for t in texts]
    names = ["neg", "neu", "pos"]
    labels = [names[p] for p in pred]
    labels[1] = names[(pred[1] + 1) % 3]
    import pandas as pd

    pd.DataFrame({"sentence": texts, "gold": labels}).to_csv(tmp_path / "c.csv", index=False)
    tasks = parse_tasks("""
- name: sst
  data: {path: c.csv}
  input: text
  text_field: sentence
  label_field: gold
  label_names: [neg, neu, pos]
""", base_dir=tmp_path)
    r = Evaluator(tasks, batch_size=4).evaluate(clf_dir)
    assert r["sst"].score == pytest.approx(5 / 6)
    bad = parse_tasks("- {name: sst, data: {path: c.csv}, text_field: sentence, label_field: gold}", base_dir=tmp_path)
    with pytest.raises(MergeError, match="label_names"):
        Evaluator(bad).evaluate(clf_dir)
