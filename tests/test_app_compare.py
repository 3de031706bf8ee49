"""The Compare tab: image classifiers side by side (a task's head on every body, as the evaluator
scores it), remote code never run unless asked, and the tab in the running app."""

from __future__ import annotations

import json

import pytest

from _app_helpers import client
from mergecore.errors import MergeError

pytest_plugins = ("_app_helpers",)


def test_classifier_compare_with_a_tiny_vit(model_factory):
    import numpy as np

    from app import compare as cmp

    a = model_factory("vit", 1, base_seed=0)
    b = model_factory("vit", 2, base_seed=0, noise=0.5)
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    res = cmp.compare_classifiers({"a": a, "b": b}, img, reference="b")
    assert set(res["outputs"]) == {"a", "b"} and res["reference"] == "b"
    top = res["outputs"]["a"]["top"]
    assert len(top) == 3 and all(0 <= p <= 1 for _, _, p in top) and top[0][2] >= top[-1][2]
    assert top[0][1].startswith("LABEL_") or top[0][1].startswith("class")
    assert {r["model"] for r in res["rows"]} == {"a", "b"}
    own = cmp.classify(a, img)["probs"]
    swapped = cmp.classify(a, img, head_from=b)["probs"]
    assert not np.allclose(own.numpy(), swapped.numpy())
    assert np.allclose(cmp.classify(a, img)["probs"].numpy(), own.numpy())  # the head was put back
    html = cmp.render_html(res, merged={"b"})
    assert html.count('class="cmp-card"') == 2 and "merged" in html


def test_remote_code_is_never_run_unless_asked(tmp_path, model_factory):
    import shutil

    from app import compare as cmp

    src = model_factory("llama", 0)
    dst = tmp_path / "custom"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["SneakyModelForCausalLM"]
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_sneaky.SneakyModelForCausalLM"}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "modeling_sneaky.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(MergeError, match="trust remote code"):
        cmp.load_model(dst)


def test_task_head_compare_scores_every_body_like_the_evaluator(fmnist_demo):
    from app import compare as cmp

    fam = fmnist_demo
    heads = cmp.task_heads(fam.tasks)
    assert list(heads) == ["fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"]
    assert heads["fmnist_footwear"]["classes"] == [5, 7, 9] and heads["digits"]["classes"] is None
    ex = next(e for e in fam.examples if e["task"] == "fmnist_footwear")
    h = heads["fmnist_footwear"]
    res = cmp.compare_classifiers({k: str(v) for k, v in fam.models.items()}, ex["image"], head_from=h["head"],
                                  classes=h["classes"], truth=ex["label"], reference="base")
    for name, r in res["outputs"].items():
        assert {label for _, label, _ in r["top"]} == {"Sandal", "Sneaker", "Ankle boot"}, name
        assert abs(sum(p for _, _, p in r["top"]) - 1.0) < 1e-5  # a softmax over the task's classes
    assert all(row["correct"] in ("yes", "no") for row in res["rows"])
    html = cmp.render_html(res)
    assert html.count('class="cmp-card"') == 5 and "cmp-verdict" in html
    # the same as the evaluator: the footwear expert's prediction with its own head on its classes
    own = cmp.classify(fam.models["fmnist_footwear"], ex["image"], classes=[5, 7, 9])
    assert own["top"][0][1] == res["outputs"]["fmnist_footwear"]["top"][0][1]


def test_client_compare_on_the_fmnist_demo(fmnist_server, fmnist_demo):
    from app.tabs.compare import TASK_HEAD

    url, _ = fmnist_server
    c = client(url)
    out = c.predict(api_name="/load_demo")
    assert any("Compatible" in str(o) for o in out) and any("trained here" in str(o) for o in out)
    ex = next(e for e in fmnist_demo.examples if e["task"] == "digits")
    from gradio_client import handle_file

    names = list(fmnist_demo.models)
    status, html, table = c.predict(names, "", 8, handle_file(ex["image"]), TASK_HEAD, "digits", ex["label"],
                                    str(fmnist_demo.tasks), api_name="/compare")
    assert "digits head" in html and html.count('class="cmp-card"') == 5
    assert {r[0] for r in table["data"]} == set(names) and "correct" in table["headers"]
    status, _, _ = c.predict(names, "", 8, handle_file(ex["image"]), TASK_HEAD, None, "", str(fmnist_demo.tasks),
                             api_name="/compare")
    assert status.startswith("**Error:**") and "choose a task" in status
