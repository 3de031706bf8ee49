"""The Models tab: what it says about the session's models, the demo families (the miniature
fmnist-vit by default; built in the background when the app started without one), and adding
models by folder or Hub id (confined, offline, failing in one line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _app_helpers import client, poll
from mergecore.errors import MergeError

pytest_plugins = ("_app_helpers",)


def test_compatibility_says_what_differs(model_factory, tmp_path):
    import transformers as tf

    from app import state as st

    llama = model_factory("llama", 0)
    gpt2 = model_factory("gpt2", 0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide-vocab")
    s = st.add_model(st.add_model(st.new_session(), str(llama), llama, name="llama"),
                     str(tmp_path / "wide-vocab"), tmp_path / "wide-vocab")
    ok, text = st.compatibility(s)
    assert not ok and "`model.embed_tokens.weight` is [96, 32] in `llama` but [100, 32] in `wide-vocab`" in text
    s = st.add_model(s, str(gpt2), gpt2, name="gpt2")
    ok, text = st.compatibility(s)
    assert "architectures differ" in text and "`gpt2` is GPT2LMHeadModel" in text
    rows = st.models_table(s)
    assert rows[0][:4] == ["llama", "base", "LlamaForCausalLM", 4]
    with pytest.raises(MergeError):
        st.add_model(s, str(tmp_path), tmp_path)  # no weights there


def test_client_adds_models_and_searches_the_hub_offline(app_server, demo_family, monkeypatch):
    url, _ = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, msg = c.predict("llama", api_name="/hub_search")
    assert "offline" in msg
    # a Hub id that cannot be fetched: a background job that fails with one line
    out = c.predict("nobody-here/no-such-model", api_name="/add_model")
    assert "Fetching" in out[-3]
    out = poll(lambda: c.predict(api_name="/poll_models"), lambda o: "Error" in str(o[-3]), 30, 0.2, "fetch")
    assert "cannot fetch 'nobody-here/no-such-model'" in out[-3] and "\n" not in out[-3]
    out = c.predict("/no/such/folder", api_name="/add_model")
    assert "outside the folders this app may read" in out[-3]  # typed paths are confined (app.paths)
    out = c.predict(str(Path(demo_family.models["base"]).parent / "no-such-folder"), api_name="/add_model")
    assert "neither a local folder nor a Hub id" in out[-3]


def test_client_builds_the_demo_when_started_without_it(app_server, demo_family, monkeypatch):
    url, ctx = app_server
    saved = ctx.demo
    monkeypatch.setenv("MERGECORE_DEMO_DIR", str(Path(demo_family.models["base"]).parents[2]))
    monkeypatch.setenv("MERGECORE_DEMO_FAMILY", "synthetic-llama")
    ctx.demo = None  # as with `launch.py --no-demo`
    try:
        c = client(url)
        out = c.predict(api_name="/load_demo")
        assert "Building the demo models" in out[-3]
        out = poll(lambda: c.predict(api_name="/poll_models"),
                   lambda o: "Loaded the demo" in str(o[-3]) or "Error" in str(o[-3]), 60, 0.2, "the demo build")
        assert "Loaded the demo models" in out[-3]
        assert any("Compatible" in str(o) for o in out)
        assert ctx.demo is not None and ctx.demo.synthetic
    finally:
        ctx.demo = saved


def test_demo_family_is_the_miniature_fmnist_vit(fmnist_demo):
    from PIL import Image

    from app.demo_family import DEFAULT_PROVIDER, PROVIDERS

    fam = fmnist_demo
    assert DEFAULT_PROVIDER == "fmnist-vit-mini" and "synthetic-llama" in PROVIDERS
    assert list(fam.models) == ["base", "fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"]
    assert fam.kind == "image-classification" and not fam.synthetic and fam.base == "base"
    assert fam.tasks.name == "tasks.yml" and fam.val_tasks.name == "tasks-val.yml"
    tasks = {e["task"] for e in fam.examples}
    assert tasks == {"fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"} and len(fam.examples) == 8
    for e in fam.examples:
        assert Image.open(e["image"]).size == (28, 28) and e["label"]
    assert {e["label"] for e in fam.examples if e["task"] == "fmnist_footwear"} <= {"Sandal", "Sneaker", "Ankle boot"}
    from mergecore.methods import DEFAULT_METHOD

    assert fam.recipe["merge_method"] == DEFAULT_METHOD and len(fam.recipe["models"]) == 4
