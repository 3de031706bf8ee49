"""`mergecore eval --init-tasks DIR` (mergecore.eval.scaffold) and the shuffled split of one file
(`data: {split: ...}`): the common cases from raw files to scores, on tiny models with a
word-level tokenizer (text classification from CSV with its expert's own head and from JSONL with
the evaluated model's own head, perplexity on a .txt file, exact match of a generation)."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from _text_helpers import greedy_by_hand, word_level_llama
from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.eval import DataSpec, load_data
from mergecore.eval.scaffold import init_tasks
from mergecore.eval.tasks import load_tasks

WORDS = "the a cat dog sat on mat ran to park big small red blue green is was and then it he she yes no what color".split()


@pytest.fixture(scope="module")
def tok_lm(tmp_path_factory, model_factory):
    """The conftest tiny Llama (vocab 96) with a word-level tokenizer saved beside it."""
    return word_level_llama(tmp_path_factory.mktemp("scaffold_lm") / "llama", model_factory("llama", 0),
                            WORDS + ["?", "."])


def _classifier(path: Path, lm_path: Path, tok, seed: int, id2label: dict[int, str]) -> torch.nn.Module:
    import transformers as tf

    cfg = tf.LlamaConfig.from_pretrained(str(lm_path))
    cfg.num_labels, cfg.pad_token_id = len(id2label), tok.pad_token_id
    cfg.id2label, cfg.label2id = id2label, {v: k for k, v in id2label.items()}
    torch.manual_seed(seed)
    model = tf.LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------
# the split of one file


def test_split_parts_partition_the_file_stratified_and_seeded(tmp_path):
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 7 + ["d"] * 1
    random.Random(1).shuffle(labels)
    _jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}", "label": v} for i, v in enumerate(labels)])

    def part(name: str, **kw) -> list[int]:
        spec = DataSpec(path="d.jsonl", split={"part": name, "val_fraction": 0.2, **kw})
        return [int(r["text"].split()[1]) for r in load_data(spec, tmp_path, "label").rows]

    for kw in ({"stratify": True}, {"stratify": False}, {"stratify": True, "seed": 7}):
        val, test = part("val", **kw), part("test", **kw)
        assert not set(val) & set(test) and sorted(val + test) == list(range(len(labels)))
        assert val == sorted(val) and test == sorted(test)  # file order kept
        assert (val, test) == (part("val", **kw), part("test", **kw))  # deterministic
        if kw["stratify"]:
            counts = Counter(labels[i] for i in val)  # 0.2 x (50, 30, 7, 1) = 10, 6, 1.4, 0.2; 18 in all
            assert counts == Counter({"a": 10, "b": 6, "c": 2})
    many = [f"l{i // 2}" for i in range(200)]  # 100 labels of 2 rows: still 40 rows to validation
    val = DataSpec(path="m.jsonl", split={"part": "val", "stratify": True})
    _jsonl(tmp_path / "m.jsonl", [{"text": str(i), "label": v} for i, v in enumerate(many)])
    assert len(load_data(val, tmp_path, "label").rows) == 40
    assert part("val", stratify=True) != part("val", stratify=True, seed=7)
    assert len(part("val", stratify=False)) == round(0.2 * len(labels))
    # range first, then the split, then max_examples
    spec = DataSpec(path="d.jsonl", range=[0, 40], split={"part": "test", "val_fraction": 0.25}, max_examples=5)
    rows = load_data(spec, tmp_path).rows
    assert len(rows) == 5 and all(int(r["text"].split()[1]) < 40 for r in rows)
    with pytest.raises(MergeError, match="stratify needs labels"):
        load_data(DataSpec(path="d.jsonl", split={"part": "val", "stratify": True}), tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        DataSpec(path="d.jsonl", split={"part": "val", "val_fraction": 1.0})
    # arrays (image tasks) stratify by their labels
    np.save(tmp_path / "x.npy", np.zeros((20, 2, 2), np.uint8))
    np.save(tmp_path / "y.npy", np.array([0] * 10 + [1] * 10))
    arr = load_data(DataSpec(images="x.npy", labels="y.npy", split={"part": "val", "val_fraction": 0.3,
                                                                   "stratify": True}), tmp_path)
    assert Counter(arr.labels.tolist()) == Counter({0: 3, 1: 3})


def test_txt_one_record_per_line_or_paragraph(tmp_path):
    (tmp_path / "t.txt").write_text("the cat\nsat on\n\n\nthe mat\n")
    assert [r["text"] for r in load_data(DataSpec(path="t.txt"), tmp_path).rows] == ["the cat", "sat on", "the mat"]
    para = load_data(DataSpec(path="t.txt", txt_unit="paragraph"), tmp_path).rows
    assert [r["text"] for r in para] == ["the cat\nsat on", "the mat"]


# ---------------------------------------------------------------------------------------------
# scaffolding


def _mixed_folder(d: Path) -> None:
    rng = random.Random(0)
    d.mkdir()
    with open(d / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review_text", "sentiment"])
        for i in range(40):
            w.writerow([i, _sentence(rng), rng.choice(["pos", "neg", "neu"])])
    for part in ("train", "val", "test"):
        _jsonl(d / "data" / f"topic-{part}.jsonl", [{"sentence": _sentence(rng), "label": rng.randrange(4)}
                                                    for _ in range(12)])
    (d / "notes.txt").write_text("".join(_sentence(rng) + "\n" for _ in range(20)))
    (d / "story.txt").write_text("the cat sat\non the mat\n\nthe dog ran\nto the park\n\nit was big\nand red\n")
    for part in ("val", "test"):
        _jsonl(d / f"qa.{part}.jsonl", [{"question": _sentence(rng), "answer": "red"} for _ in range(6)])
    for part in ("val", "test"):  # the split word inside the name: one task 'lines-next'
        _jsonl(d / f"lines-{part}-next.jsonl", [{"context": _sentence(rng), "choices": ["red", "blue"], "answer": 1}])
    (d / "config.json.bak").write_text("{}")
    (d / "meta.json").write_text('{"a": 1}')
    (d / "README.txt").write_text("how this folder was made")


def test_init_tasks_guesses_each_kind_and_groups_splits(tmp_path):
    d = tmp_path / "mine"
    _mixed_folder(d)
    found = {t.name: t for t in init_tasks(d)}
    assert set(found) == {"reviews", "topic", "notes", "story", "qa", "meta", "lines-next"}
    mc = found["lines-next"]
    assert mc.kind == "multiple_choice" and mc.files == {"test": "lines-test-next.jsonl", "val": "lines-val-next.jsonl"}
    assert (mc.fields["context_field"], mc.fields["choices_field"], mc.fields["answer_field"]) == (
        "context", "choices", "answer")
    meta = [t for t in found.values() if t.kind is None]
    assert [t.files for t in meta] == [{"whole": "meta.json"}] and "not a list of records" in meta[0].problem
    rv = found["reviews"]
    assert rv.kind == "classification" and rv.fields["text_field"] == "review_text"
    assert rv.fields["label_field"] == "sentiment" and rv.fields["label_names"] == ["neg", "neu", "pos"]
    assert "head_from" not in rv.fields
    assert rv.test["split"] == {"part": "test", "val_fraction": 0.2, "seed": 0, "stratify": True}
    assert rv.val["split"]["part"] == "val" and rv.val["path"] == rv.test["path"] == "reviews.csv"
    tp = found["topic"]
    assert tp.kind == "classification" and "label_names" not in tp.fields
    assert tp.files == {"test": "data/topic-test.jsonl", "train": "data/topic-train.jsonl", "val": "data/topic-val.jsonl"}
    assert (tp.test, tp.val) == ({"path": "data/topic-test.jsonl"}, {"path": "data/topic-val.jsonl"})
    assert found["notes"].kind == "lm" and found["notes"].test["txt_unit"] == "line"
    assert found["story"].test["txt_unit"] == "paragraph"
    qa = found["qa"]
    assert qa.kind == "generation" and (qa.fields["prompt_field"], qa.fields["answer_field"]) == ("question", "answer")
    assert qa.fields["stop"] == ["\n"] and (qa.test["path"], qa.val["path"]) == ("qa.test.jsonl", "qa.val.jsonl")
    text = (d / "tasks.yml").read_text()
    assert "# train data: data/topic-train.jsonl" in text and "# head_from: MODEL_FOLDER" in text
    assert "label_names: [neg, neu, pos]  # 3 labels, sorted" in text
    test_tasks, val_tasks = load_tasks(d / "tasks.yml"), load_tasks(d / "tasks-val.yml")
    assert [t.name for t in test_tasks] == [t.name for t in val_tasks] == [
        "lines-next", "notes", "qa", "reviews", "story", "topic"]
    for a, b in zip(test_tasks, val_tasks):  # every val/test pair shares no row
        rows_a, rows_b = a.data().rows, b.data().rows
        if a.spec.data.split:
            assert len(rows_a) + len(rows_b) == len(load_data(DataSpec(path=a.spec.data.path, txt_unit=a.spec.data.txt_unit), d))
    review_rows = {r["id"] for r in test_tasks[3].data().rows}, {r["id"] for r in val_tasks[3].data().rows}
    assert not review_rows[0] & review_rows[1] and len(review_rows[0] | review_rows[1]) == 40


def test_init_tasks_refuses_to_overwrite_and_bad_folders_exit_2(tmp_path, capsys):
    d = tmp_path / "mine"
    _mixed_folder(d)
    rc, out, err = _run(capsys, "eval", "--init-tasks", str(d))
    assert rc == 0 and "reviews: classification, text 'review_text' -> label 'sentiment'" in out
    assert "not understood: meta.json: a JSON object" in out and "wrote " in out and err == ""
    (d / "tasks.yml").write_text("# mine\n")
    rc, _, err = _run(capsys, "eval", "--init-tasks", str(d))
    assert rc == 2 and err.count("\n") == 1 and "exists; give --overwrite" in err
    assert (d / "tasks.yml").read_text() == "# mine\n"
    assert _run(capsys, "eval", "--init-tasks", str(d), "--overwrite")[0] == 0
    assert load_tasks(d / "tasks.yml")
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    for bad, why in ((tmp_path / "nowhere", "is not a folder"), (tmp_path / "empty", "no usable data files"),
                     (d / "notes.txt", "is not a folder")):
        rc, _, err = _run(capsys, "eval", "--init-tasks", str(bad))
        assert rc == 2 and why in err and err.count("\n") == 1
    assert not list((tmp_path / "empty").glob("tasks*"))
    rc, _, err = _run(capsys, "eval", str(d))
    assert rc == 2 and "--tasks" in err
    rc, _, err = _run(capsys, "eval", "--init-tasks", str(d), "--models", str(tmp_path / "empty"), "--overwrite")
    assert rc == 2 and "not a checkpoint folder" in err


# ---------------------------------------------------------------------------------------------
# from raw files to scores


def test_classification_from_csv_with_expert_head_and_jsonl_with_shared_head(tok_lm, tmp_path, capsys):
    lm_path, tok = tok_lm
    d = tmp_path / "mine"
    _mixed_folder(d)
    for f in ("notes.txt", "story.txt", "qa.val.jsonl", "qa.test.jsonl", "lines-val-next.jsonl", "lines-test-next.jsonl"):
        (d / f).unlink()
    names = {0: "pos", 1: "neg", 2: "neu", 3: "spare"}  # the expert's output order, not sorted
    expert = _classifier(d / "expert_reviews", lm_path, tok, 1, names)
    base = _classifier(tmp_path / "base", lm_path, tok, 2, names)
    rc, out, _ = _run(capsys, "eval", "--init-tasks", str(d))
    assert rc == 0 and "head_from expert_reviews" in out and "topic: classification" in out
    text = (d / "tasks.yml").read_text()
    assert "label_names: [pos, neg, neu]  # 3 labels, in the order of expert_reviews's id2label" in text
    assert "head_prefix: score." in text and "classes: [0, 1, 2]" in text

    def predict(texts: list[str], head: torch.Tensor, classes: int) -> list[int]:
        with torch.no_grad():
            return [int(torch.func.functional_call(base, {"score.weight": head}, args=(),
                                                   kwargs={"input_ids": torch.tensor([tok(t)["input_ids"]])}
                                                   ).logits[0, :classes].argmax()) for t in texts]

    tasks = {t.name: t for t in load_tasks(d / "tasks.yml")}
    rows = tasks["reviews"].data().rows
    pred = predict([r["review_text"] for r in rows], expert.score.weight, 3)
    own_head = np.mean([names[p] == r["sentiment"] for p, r in zip(pred, rows)])
    topic = tasks["topic"].data().rows
    pred = predict([r["sentence"] for r in topic], base.score.weight, 4)
    shared = np.mean([p == r["label"] for p, r in zip(pred, topic)])
    rc, out, _ = _run(capsys, "eval", str(tmp_path / "base"), "--tasks", str(d / "tasks.yml"), "--json", "--batch-size", "3")
    scores = {name: t["score"] for name, t in json.loads(out)["tasks"].items()}
    assert rc == 0 and scores == pytest.approx({"reviews": own_head, "topic": shared})
    assert len(rows) == 32 and len(topic) == 12  # 40 rows less the (stratified) 20% validation part


def test_perplexity_on_txt_and_generation_exact_match_from_jsonl(tok_lm, tmp_path, capsys):
    import transformers as tf

    lm_path, tok = tok_lm
    model = tf.LlamaForCausalLM.from_pretrained(str(lm_path)).eval()

    def greedy(prompt: str, n: int) -> str:
        return greedy_by_hand(model, tok, prompt, n)

    d = tmp_path / "text"
    d.mkdir()
    rng = random.Random(3)
    (d / "notes.txt").write_text("".join(_sentence(rng) + "\n" for _ in range(15)))
    prompts = [_sentence(rng) for _ in range(4)]
    rows = [{"prompt": p, "completion": greedy(p, 3) if i < 3 else "no"} for i, p in enumerate(prompts)]
    _jsonl(d / "gen-test.jsonl", rows)
    _jsonl(d / "gen-val.jsonl", rows[:2])
    rc, out, _ = _run(capsys, "eval", "--init-tasks", str(d))
    assert rc == 0 and "gen: generation, 'prompt' -> exact match of 'completion'" in out
    assert "notes: lm, perplexity of 'text'" in out
    text = (d / "tasks.yml").read_text()
    assert "max_new_tokens: 8" in text
    (d / "tasks.yml").write_text(text.replace("max_new_tokens: 8", "max_new_tokens: 3"))  # the adjusting step
    docs = [r["text"] for r in load_tasks(d / "tasks.yml")[1].data().rows]
    assert len(docs) == 12  # one document per line, 20% of 15 lines held out for validation
    total, count = 0.0, 0
    with torch.no_grad():
        for t in docs:
            ids = torch.tensor([tok(t)["input_ids"]])
            total -= float(model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    rc, out, _ = _run(capsys, "eval", str(lm_path), "--tasks", str(d / "tasks.yml"), "--json", "--batch-size", "2")
    res = json.loads(out)["tasks"]
    assert rc == 0 and res["gen"]["score"] == pytest.approx(0.75)
    assert res["notes"]["metrics"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_text_classification_example_loads():
    tasks = load_tasks(Path(__file__).resolve().parents[1] / "examples" / "tasks-textclass.yml")
    assert [(t.name, t.head_from is not None) for t in tasks] == [("man_section", True), ("licence", True)]
    assert tasks[1].spec.data.split.part == "test" and tasks[1].spec.data.split.stratify


def test_init_tasks_reads_a_bounded_part_of_each_file(tmp_path, monkeypatch):
    import pandas as pd

    from mergecore.eval import scaffold

    monkeypatch.setattr(scaffold, "LABEL_BYTES", 2000)
    d = tmp_path / "big"
    d.mkdir()
    with open(d / "big.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(400):
            w.writerow([f"row {i} with some words", "early" if i < 200 else "late"])
    (d / "big.json").write_text(json.dumps([{"text": "x" * 50, "label": "a"}] * 100))
    (d / "latin1.jsonl").write_bytes('{"text": "caf\xe9", "label": "a"}\n'.encode("latin-1"))
    pd.DataFrame({"prompt": ["what color", "the cat"], "completion": ["red", "sat"]}).to_parquet(d / "gen.parquet")
    found = {t.name: t for t in init_tasks(d)}
    big = found["big_csv"]  # big.csv and big.json: one task each
    assert big.fields["label_names"] == ["early"] and "read from the first 0.002 MB" in big.notes["label_names"]
    assert found["big_json"].kind is None and "over 0.002 MB is not inspected" in found["big_json"].problem
    assert "not UTF-8" in found["latin1"].problem
    assert found["gen"].kind == "generation" and found["gen"].fields["answer_field"] == "completion"
    assert load_tasks(d / "tasks.yml")


def test_csv_cells_are_read_as_written_and_bad_labels_are_one_line(tmp_path):
    from mergecore.eval.tasks import parse_tasks

    (tmp_path / "c.csv").write_text("text,label\nNA,1\nnull,0\nNone,1\n")
    rows = load_data(DataSpec(path="c.csv"), tmp_path).rows
    assert [r["text"] for r in rows] == ["NA", "null", "None"] and [r["label"] for r in rows] == [1, 0, 1]
    for bad, shown in (("null", "None"), ("1.5", "1.5"), ("[1]", "[1]")):
        (tmp_path / "j.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": %s}\n' % bad)
        task = parse_tasks("- {name: t, data: {path: j.jsonl}}", base_dir=tmp_path)[0]
        with pytest.raises(MergeError, match=rf"row 2: label {re.escape(shown)} is neither a class id"):
            task.data()


def test_a_null_text_is_an_error_naming_the_row(tok_lm, tmp_path):
    from mergecore.eval import Evaluator
    from mergecore.eval.tasks import parse_tasks

    lm_path, _ = tok_lm
    _jsonl(tmp_path / "t.jsonl", [{"text": "the cat", "label": 0}, {"text": None, "label": 1}])
    for spec in ("{name: t, kind: lm, data: {path: t.jsonl}}", "{name: t, input: text, data: {path: t.jsonl}}"):
        tasks = parse_tasks(f"- {spec}", base_dir=tmp_path)
        with pytest.raises(MergeError, match="row 2: 'text' is empty"):
            Evaluator(tasks).evaluate(lm_path)
