"""mergecore.eval: data loaders, YAML tasks and the kind registry, subsets, classification (checked
against numbers computed by hand on tiny ViTs), head swapping, caching, the model pool, progress,
cancel and the CLI. Text kinds: test_eval_text.py."""

from __future__ import annotations

import json
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


def test_the_model_pool_loads_each_thing_once(vits, images, tmp_path):
    from mergecore.models import ModelPool

    pool = ModelPool()
    a = pool.model(vits["a"])
    assert pool.model(str(vits["a"]) + "/") is a and pool.model(vits["a"].parent / "." / "a") is a
    assert pool.fresh_model(vits["a"]) is not a and pool.model(vits["b"]) is not a
    assert pool.image_prep(vits["a"]) is pool.image_prep(vits["a"])
    head = pool.head(vits["a"], "classifier.")
    assert set(head) == {"classifier.weight", "classifier.bias"} and pool.head(vits["a"], "classifier.") is head
    with pytest.raises(MergeError, match="no tensors under 'nothing.'"):
        pool.head(vits["a"], "nothing.")
    pool.release(vits["a"])
    assert pool.model(vits["a"]) is not a
    light = ModelPool(keep_models=False)  # an evaluator's own pool: models are not kept
    assert light.model(vits["a"]) is not light.model(vits["a"])
    # an evaluator given a pool loads a checkpoint folder once, however often it scores it
    d, x = images
    np.save(tmp_path / "y.npy", np.arange(len(x)) % 3)
    tasks = parse_tasks(f"- {{name: t, data: {{images: {d}/x.npy, labels: {tmp_path}/y.npy}}}}")
    ev = Evaluator(tasks, pool=pool)
    first, again = ev.evaluate(vits["b"]), ev.evaluate(vits["b"])
    assert first.scores == again.scores and len([k for k in pool._models if k[0] == vits["b"].resolve()]) == 1


def test_a_new_task_kind_is_one_registered_class(tmp_path, monkeypatch, vits, images):
    """What a kind module in mergecore/eval/kinds does: a spec, a Task, register_kind. Task files
    use it at once; a search that trains on inputs (DAM) is told when a kind has none."""
    from typing import Literal

    from mergecore.eval import kind as kinds
    from mergecore.eval.kind import Prepared, Task, TaskSpec, register_kind
    from mergecore.models import load_model

    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))  # the registry as it was, after the test

    class FirstLogitSpec(TaskSpec):
        kind: Literal["first_logit"]
        target: float = 0.0

    class FirstLogitTask(Task):
        kind = "first_logit"
        metric = "neg_error"
        spec_class = FirstLogitSpec

        def _prep_key(self, res):
            return ("image", res.image_prep()), None

        def _prepare(self, res):
            return Prepared(self.num_examples(), {"pixel_values": res.image_prep()(self.data().images)})

        def score(self, model, prepared, indices, res, batch_size, on_batch=None):
            logits = model(pixel_values=prepared.data["pixel_values"][indices]).logits[:, 0]
            return {"neg_error": -float((logits - self.spec.target).abs().mean())}

    register_kind(FirstLogitTask)
    d, x = images
    np.save(tmp_path / "y.npy", np.zeros(len(x), dtype=np.int64))
    tasks = parse_tasks(f"- {{name: f, kind: first_logit, target: 0.5, data: {{images: {d}/x.npy, "
                        f"labels: {tmp_path}/y.npy}}}}")
    r = Evaluator(tasks).evaluate(vits["a"])
    with torch.no_grad():
        want = -float((load_model(vits["a"])(pixel_values=_manual_pixels(x)).logits[:, 0] - 0.5).abs().mean())
    assert r["f"].kind == "first_logit" and r["f"].score == pytest.approx(want, rel=1e-5)
    with pytest.raises(MergeError, match="'kind' must be one of .*first_logit"):
        parse_tasks("- {name: t, kind: nope, data: {path: a.csv}}")
    with pytest.raises(MergeError, match="DAM cannot train on 'first_logit' tasks"):
        tasks[0].training_inputs(None, None)
    with pytest.raises(MergeError, match=r"tasks\[0\] \(f\): unknown key 'targt'"):
        parse_tasks(f"- {{name: f, kind: first_logit, targt: 1, data: {{path: {d}/x.npy}}}}")


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
    d, x = images
    np.save(d / "cli_y.npy", np.arange(len(x)) % 3)  # its own labels: the test runs alone too
    (d / "cli_tasks.yml").write_text("""
tasks:
  - {name: all, data: {images: x.npy, labels: cli_y.npy}}
  - {name: sub, data: {images: x.npy, labels: cli_y.npy}, classes: [0, 1]}
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
