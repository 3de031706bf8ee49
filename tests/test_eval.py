"""mergecore.eval: data loaders, YAML tasks, subsets, the four task kinds (checked against
numbers computed by hand on tiny models), head swapping, caching, progress, cancel and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergecore.cli import main
from mergecore.errors import Cancelled, MergeError
from mergecore.eval import (
    DataSpec,
    Evaluator,
    ImagePrep,
    load_data,
    load_tasks,
    parse_subset,
    parse_tasks,
    read_idx,
    write_idx,
)
from mergecore.eval.data import Arrays, Records
from mergecore.events import CancelToken

# ---------------------------------------------------------------------------------------------
# tiny models


def _tiny_vit(path: Path, seed: int, head_seed: int | None = None) -> Path:
    """A tiny ViT (8x8 grayscale, 3 classes) with a preprocessor config; `head_seed` redraws the head."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       image_size=8, patch_size=4, num_channels=1, num_labels=3)
    model = tf.ViTForImageClassification(cfg)
    if head_seed is not None:
        g = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g))
            model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=g))
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 8, "width": 8}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5], "image_std": [0.25]}))
    return path


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    root = tmp_path_factory.mktemp("vits")
    return {"a": _tiny_vit(root / "a", 0, head_seed=10), "b": _tiny_vit(root / "b", 1, head_seed=11),
            "b2": _tiny_vit(root / "b2", 0, head_seed=11)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    np.save(d / "x.npy", x)
    return d, x


def _manual_pixels(x: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(x).float()[:, None] / 255) - 0.5) / 0.25


def _load(path):
    import transformers as tf

    return tf.ViTForImageClassification.from_pretrained(str(path)).eval()


WORDS = ("the a cat dog sat on mat ran to park big small red blue green is was and then it he she "
         "one two three four five six seven eight nine ten yes no question answer what color").split()


@pytest.fixture(scope="module")
def lm(tmp_path_factory, model_factory):
    """The conftest tiny Llama (vocab 96) plus a WordLevel tokenizer built here, saved together."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS + [str(i) for i in range(10)] + ["?", ".", ":"]:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < 96:  # every id the model can produce decodes to a word
        vocab[f"w{len(vocab)}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import processors

    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    path = tmp_path_factory.mktemp("lm") / "llama"
    shutil.copytree(model_factory("llama", 0), path)
    tok.save_pretrained(path)
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(str(path)).eval()
    return path, model, tok


# ---------------------------------------------------------------------------------------------
# data loaders


def test_record_loaders_jsonl_json_csv_parquet_txt(tmp_path):
    rows = [{"text": "a cat", "label": 1}, {"text": "a dog", "label": 0}, {"text": "the mat", "label": 1}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("a cat\n\na dog\nthe mat\n")
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        d = load_data(DataSpec(path=name), tmp_path)
        assert isinstance(d, Records)
        assert d.rows == rows, name
    assert [r["text"] for r in load_data(DataSpec(path="d.txt"), tmp_path).rows] == ["a cat", "a dog", "the mat"]
    assert load_data(DataSpec(path="d.csv", range=(1, 3)), tmp_path).rows == rows[1:]
    assert load_data(DataSpec(path="d.csv", max_examples=2), tmp_path).rows == rows[:2]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(MergeError, match="bad.jsonl:2"):
        load_data(DataSpec(path="bad.jsonl"), tmp_path)
    with pytest.raises(MergeError, match="not found"):
        load_data(DataSpec(path="missing.csv"), tmp_path)
    with pytest.raises(MergeError, match="outside"):
        load_data(DataSpec(path="d.csv", range=(0, 10)), tmp_path)


def test_array_loaders_npy_npz_idx_and_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    write_idx(tmp_path / "x-idx3-ubyte.gz", x)
    write_idx(tmp_path / "y-idx1-ubyte", y.astype(np.uint8))
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), x)
    for spec in (DataSpec(images="x.npy", labels="y.npy"), DataSpec(path="d.npz"),
                 DataSpec(images="x-idx3-ubyte.gz", labels="y-idx1-ubyte")):
        d = load_data(spec, tmp_path)
        assert isinstance(d, Arrays)
        assert np.array_equal(d.images, x) and np.array_equal(d.labels, y)
    # idx with a bad magic number / truncated body
    (tmp_path / "bad-idx1-ubyte").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(MergeError, match="magic"):
        read_idx(tmp_path / "bad-idx1-ubyte")
    (tmp_path / "short-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(MergeError, match="truncated"):
        read_idx(tmp_path / "short-idx1-ubyte")
    # image folder: one sub-folder per class, sorted names give the labels
    for label, cls in enumerate(["cat", "dog"]):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(x[label * 2 + i]).save(tmp_path / "imgs" / cls / f"{i}.png")
    d = load_data(DataSpec(path="imgs"), tmp_path)
    assert list(d.labels) == [0, 0, 1, 1]
    assert np.array_equal(d.images, x[:4])
    d = load_data(DataSpec(path="imgs", class_names=["dog", "cat"]), tmp_path)
    assert list(d.labels) == [0, 0, 1, 1] and np.array_equal(d.images[0], x[2])
    with pytest.raises(MergeError, match="'images' needs 'labels'"):
        parse_tasks("- {name: t, data: {images: x.npy}}")


def test_image_prep_matches_formula_and_resizes():
    prep = ImagePrep.from_dicts({"size": {"height": 8, "width": 8}, "rescale_factor": 1 / 255,
                                 "image_mean": [0.5], "image_std": [0.25]}, {"num_channels": 1})
    x = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    assert torch.allclose(prep(x), _manual_pixels(x), atol=1e-6)
    rgb = ImagePrep(size=(4, 4), channels=3, mean=(0.5,), std=(0.5,))
    out = rgb(np.zeros((2, 8, 8), dtype=np.uint8))
    assert out.shape == (2, 3, 4, 4) and torch.allclose(out, torch.full_like(out, -1.0))


# ---------------------------------------------------------------------------------------------
# YAML tasks


def test_yaml_tasks_all_kinds_and_errors(tmp_path):
    text = """
tasks:
  - name: img
    data: {images: x.npy, labels: y.npy}
    classes: [0, 2]
    head_from: expert_a
  - name: ppl
    kind: lm
    data: {path: t.jsonl}
    max_length: 64
  - name: mc
    kind: multiple_choice
    data: {path: mc.jsonl}
    context_template: "Q: {question} A:"
  - name: gen
    kind: generation
    data: {path: g.csv}
    stop: [".", "\\n"]
"""
    tasks = parse_tasks(text, base_dir=tmp_path)
    assert [(t.name, t.kind, t.metric) for t in tasks] == [
        ("img", "classification", "accuracy"), ("ppl", "lm", "inv_perplexity"),
        ("mc", "multiple_choice", "accuracy"), ("gen", "generation", "exact_match")]
    assert tasks[0].classes == [0, 2] and tasks[3].spec.stop == [".", "\n"]
    (tmp_path / "tasks.yml").write_text(text)
    assert [t.base_dir for t in load_tasks(tmp_path / "tasks.yml")] == [tmp_path] * 4
    bad = {
        "kind: regression": "'kind' must be one of",
        "nme: x": "unknown key 'nme'",
        "batch_size: 0": "batch_size",
    }
    for line, msg in bad.items():
        with pytest.raises(MergeError, match=msg) as e:
            parse_tasks(f"- name: t\n  data: {{path: a.csv}}\n  {line}\n")
        assert "\n" not in str(e.value)
    with pytest.raises(MergeError, match="unique"):
        parse_tasks("- {name: t, data: {path: a.csv}}\n- {name: t, data: {path: b.csv}}\n")
    with pytest.raises(MergeError, match="malformed YAML"):
        parse_tasks("tasks: [unclosed\n")
    with pytest.raises(MergeError, match="not found"):
        load_tasks(tmp_path / "nope.yml")


# ---------------------------------------------------------------------------------------------
# subsets


def test_subset_sampling_is_seeded_and_cycles(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"w{i}"}) + "\n" for i in range(103)))
    tasks = parse_tasks("- {name: t, kind: lm, data: {path: t.jsonl}}\n- {name: u, kind: lm, data: {path: t.jsonl}}",
                        base_dir=tmp_path)
    ev = Evaluator(tasks, subset=0.1, seed=3)
    t = tasks[0]
    a = ev.indices(t, 0)
    assert len(a) == 10 and list(a) == sorted(a)
    assert np.array_equal(a, Evaluator(tasks, subset=0.1, seed=3).indices(t, 0))
    assert not np.array_equal(a, Evaluator(tasks, subset=0.1, seed=4).indices(t, 0))
    assert not np.array_equal(a, ev.indices(tasks[1], 0))  # each task has its own permutation
    assert ev.num_subsets() == 11
    chunks = [set(ev.indices(t, k)) for k in range(11)]
    assert set().union(*chunks) == set(range(103))  # the subsets cover the data
    assert all(not (chunks[i] & chunks[j]) for i in range(10) for j in range(i + 1, 10))  # disjoint (last wraps)
    assert all(len(c) == 10 for c in chunks)
    assert np.array_equal(ev.indices(t, 11), ev.indices(t, 0))  # cycles
    assert len(Evaluator(tasks, subset=7).indices(t)) == 7
    assert len(Evaluator(tasks, subset=1.0).indices(t)) == 103
    assert parse_subset("10%") == 0.1 and parse_subset("0.05") == 0.05 and parse_subset("200") == 200
    for bad in (0.0, 1.5, 0, -3):
        with pytest.raises(MergeError):
            Evaluator(tasks, subset=bad)
    with pytest.raises(MergeError):
        parse_subset("ten")


# ---------------------------------------------------------------------------------------------
# classification


def test_classification_accuracy_by_hand_and_classes(vits, images, tmp_path):
    d, x = images
    model = _load(vits["a"])
    with torch.no_grad():
        logits = model(pixel_values=_manual_pixels(x)).logits
    pred = logits.argmax(-1).numpy()
    labels = pred.copy()
    labels[:13] = (labels[:13] + 1) % 3  # 13 of 40 wrong
    np.save(d / "y.npy", labels)
    tasks = parse_tasks(f"""
- name: all
  data: {{images: {d}/x.npy, labels: {d}/y.npy}}
- name: sub
  data: {{images: {d}/x.npy, labels: {d}/y.npy}}
  classes: [0, 2]
""")
    ev = Evaluator(tasks, batch_size=7)
    r_folder = ev.evaluate(vits["a"])
    r_memory = Evaluator(tasks, batch_size=64, processor_from=vits["a"]).evaluate(model)
    assert r_folder["all"].score == pytest.approx(27 / 40)
    keep = np.isin(labels, [0, 2])
    sub_pred = np.array([0, 2])[logits[:, [0, 2]].argmax(-1).numpy()]
    expected = float((sub_pred[keep] == labels[keep]).mean())
    assert r_folder["sub"].score == pytest.approx(expected) and r_folder["sub"].n == keep.sum()
    assert r_memory.scores == pytest.approx(r_folder.scores)
    assert r_folder.mean == pytest.approx((27 / 40 + expected) / 2)
    df = r_folder.to_frame()
    assert list(df.index) == ["all", "sub", "mean"]


def test_head_from_scores_with_the_named_experts_head(vits, images):
    d, x = images
    body, donor = _load(vits["a"]), _load(vits["b"])
    pix = _manual_pixels(x)
    with torch.no_grad():
        feats = body.vit(pixel_values=pix).last_hidden_state[:, 0]
        swapped = donor.classifier(feats).argmax(-1).numpy()  # body a, head b -- by hand
        own = body(pixel_values=pix).logits.argmax(-1).numpy()
    assert (swapped != own).any()
    np.save(d / "y_swap.npy", swapped)
    (d / "tasks.yml").write_text(f"""
- name: swapped
  data: {{images: x.npy, labels: y_swap.npy}}
  head_from: {vits['b']}
- name: own
  data: {{images: x.npy, labels: y_swap.npy}}
""")
    ev = Evaluator(load_tasks(d / "tasks.yml"), batch_size=16)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    r = Evaluator(load_tasks(d / "tasks.yml"), processor_from=vits["a"]).evaluate(body)  # in memory
    assert r["swapped"].score == 1.0
    assert r["own"].score == pytest.approx(float((own == swapped).mean()))
    after = body.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the head is swapped in functionally
    # the same task file evaluated on the checkpoint folder gives the same numbers
    r2 = ev.evaluate(vits["a"])
    assert r2.scores == r.scores
    # a head that does not fit the model is a clear error
    import transformers as tf

    big = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=8, patch_size=4,
                                                    num_channels=1, num_labels=3))
    with pytest.raises(MergeError, match="shape"):
        Evaluator(load_tasks(d / "tasks.yml"), processor_from=vits["a"]).evaluate(big, tasks=["swapped"])


def test_inputs_are_cached_between_evaluations(vits, images):
    d, _ = images
    tasks = parse_tasks(f"- {{name: t, data: {{images: {d}/x.npy, labels: {d}/y.npy}}}}")
    ev = Evaluator(tasks)
    ev.evaluate(vits["a"])
    first = tasks[0]._prepared
    (key, (_, prepared)), = first.items()
    ev.evaluate(vits["b"])
    assert len(tasks[0]._prepared) == 1 and tasks[0]._prepared[key][1] is prepared


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
        ids = tok(prompt)["input_ids"]
        out = []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
        return tok.decode(out, skip_special_tokens=True).strip()

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


# ---------------------------------------------------------------------------------------------
# progress, cancel


def test_progress_and_cancel(vits, images):
    d, _ = images
    tasks = parse_tasks(f"""
- {{name: t1, data: {{images: {d}/x.npy, labels: {d}/y.npy}}}}
- {{name: t2, data: {{images: {d}/x.npy, labels: {d}/y.npy}}}}
""")
    events = []
    ev = Evaluator(tasks, batch_size=8)
    ev.evaluate(vits["a"], progress=events.append)
    fr = [e.fraction for e in events]
    assert fr == sorted(fr) and fr[-1] == pytest.approx(1.0) and fr[0] == 0.0
    assert {e.task for e in events} == {"t1", "t2"} and events[-1].as_event().kind == "eval.progress"

    model = _load(vits["a"])
    model.train()
    cancel = CancelToken()
    seen = []

    def stop_after_first_batch(p):
        seen.append(p)
        if p.examples_done > 0:
            cancel.cancel()

    with pytest.raises(Cancelled):
        Evaluator(tasks, batch_size=8, processor_from=vits["a"]).evaluate(model, progress=stop_after_first_batch,
                                                                         cancel=cancel)
    assert max(p.examples_done for p in seen) == 8 and {p.task for p in seen} == {"t1"}
    assert model.training  # mode restored
    pre = CancelToken()
    pre.cancel()
    with pytest.raises(Cancelled):
        ev.evaluate(vits["a"], cancel=pre)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_eval_table_json_recipe_and_errors(vits, images, capsys):
    d, _ = images
    (d / "cli_tasks.yml").write_text("""
tasks:
  - {name: all, data: {images: x.npy, labels: y.npy}}
  - {name: sub, data: {images: x.npy, labels: y.npy}, classes: [0, 1]}
""")
    assert main(["eval", str(vits["a"]), "--tasks", str(d / "cli_tasks.yml"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "all" in out and "sub" in out and "mean score" in out and "accuracy" in out
    assert main(["eval", str(vits["a"]), "--tasks", str(d / "cli_tasks.yml"), "--json", "--subset", "0.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["tasks"]) == {"all", "sub"} and data["tasks"]["all"]["n"] == 20
    assert data["mean"] == pytest.approx(np.mean([t["score"] for t in data["tasks"].values()]))
    # a recipe is merged first, then scored
    recipe = d / "avg.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(vits["a"]), "parameters": {"weight": 1.0}},
        {"model": str(vits["b2"]), "parameters": {"weight": 1.0}}]}))
    assert main(["eval", str(recipe), "--tasks", str(d / "cli_tasks.yml"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert set(merged["tasks"]) == {"all", "sub"}
    # bad input: one line, exit 2
    assert main(["eval", str(vits["a"]), "--tasks", str(d / "missing.yml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert main(["eval", str(d / "nothing"), "--tasks", str(d / "cli_tasks.yml")]) == 2
    assert main(["eval", str(vits["a"]), "--tasks", str(d / "cli_tasks.yml"), "--subset", "2.5"]) == 2


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
