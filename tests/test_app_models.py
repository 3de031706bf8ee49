"""The Models tab: what it says about the session's models, the demo families (the miniature
fmnist-vit by default; built in the background, behind a page that is served at once), adding
models by folder or Hub id (confined, offline, failing in one line, a folder already loaded
left as it is), and the Hub search (one bounded attempt; a late answer never overwrites a newer
one)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from _app_helpers import client, find, free_port, poll
from app.state import MODEL_COLUMNS
from mergecore.errors import MergeError

ROOT = Path(__file__).resolve().parents[1]

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


def test_client_adding_a_loaded_folder_says_so_and_changes_nothing(app_server, demo_family):
    url, _ = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    base = Path(demo_family.models["base"])
    for spelling in (str(base), f"{base}/", str(base.parent / ".." / base.parent.name / "base")):  # resolved alike
        out = c.predict(spelling, api_name="/add_model")
        assert "is already loaded, as `base`" in out[-3] and "nothing changed" in out[-3], out[-3]
    out = c.predict("base", api_name="/set_base")  # the session's views, as they are now
    table = find(out, lambda o: isinstance(o, dict) and o.get("headers") == MODEL_COLUMNS)
    assert [r[0] for r in table["data"]] == list(demo_family.models)


@contextlib.contextmanager
def silent_hub(monkeypatch, ctx, timeout: float = 1.0):
    """The app's Hub search pointed at a local port that accepts connections and never answers;
    yields the list of connections made to it."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    conns: list = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conns.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(ctx, "hub_timeout", timeout)
    try:
        yield conns
    finally:
        server.close()
        for conn in conns:
            conn.close()


def test_client_hub_search_is_one_bounded_attempt(app_server, monkeypatch):
    url, ctx = app_server
    c = client(url)
    with silent_hub(monkeypatch, ctx) as conns:
        t0 = time.time()
        _, msg = c.predict("tiny llama", api_name="/hub_search")
        assert "did not answer within 1 s" in msg and time.time() - t0 < 4, msg
        time.sleep(2.5)  # no retry comes after the page was answered
        assert len(conns) == 1
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    _, msg = c.predict("tiny llama", api_name="/hub_search")
    assert msg.count("\n") == 0 and "The Hub cannot be reached" in msg, msg


def test_a_late_hub_answer_never_overwrites_a_newer_one(monkeypatch):
    from huggingface_hub import constants

    from app.tabs.models import HubSearches

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def find(q, timeout):
        time.sleep(0.6 if q == "slow" else 0.0)
        return [f"org/{q}"]

    hub = HubSearches(lambda: 5.0, find=find)
    late: list = []
    first = threading.Thread(target=lambda: late.append(hub.search("page-1", "slow")))
    first.start()
    time.sleep(0.2)
    assert hub.search("page-1", "fast") == (["org/fast"], "1 model(s) found; pick one, then **Add model**.", True)
    assert hub.search("page-2", "other")[0] == ["org/other"]  # another page's search does not count
    first.join()
    assert late == [None]  # answered after the newer search of its page: dropped
    assert hub.search("page-1", "  ")[1] == "Type something to search for."


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
        out = poll(lambda: c.predict(api_name="/poll_demo"),
                   lambda o: "Loaded the demo" in str(o[-3]) or "could not" in str(o[-1]), 60, 0.2, "the demo build")
        assert "Loaded the demo models" in out[-3] and "ready in" in out[-1]
        assert any("Compatible" in str(o) for o in out)
        assert ctx.demo is not None and ctx.demo.synthetic
    finally:
        ctx.demo, ctx.demo_build = saved, None


def test_a_failed_demo_build_says_why_in_one_line_and_falls_back(monkeypatch, tmp_path):
    from app import demo_family as df
    from app.tabs.models import demo_html

    def broken(root, progress=None, cancel=None, settings=None):
        raise MergeError("Fashion-MNIST is not installed")

    monkeypatch.setitem(df.PROVIDERS, df.DEFAULT_PROVIDER, broken)
    monkeypatch.delenv("MERGECORE_DEMO_FAMILY", raising=False)
    ready: list = []
    build = df.DemoBuild(None, tmp_path, fallback=True).start(ready.append)  # the default family, as launch.py
    assert build.wait(60) and build.error is None and build.family is not None and build.family.synthetic
    assert ready == [build.family] and "could not be built (Fashion-MNIST is not installed)" in build.note
    assert "Synthetic tiny Llamas" in demo_html(build) and "Fashion-MNIST is not installed" in demo_html(build)
    chosen = df.DemoBuild(df.DEFAULT_PROVIDER, tmp_path).start(ready.append)  # asked for by name: no fallback
    assert chosen.wait(60) and chosen.family is None and chosen.error == "Fashion-MNIST is not installed"
    assert 'data-status="failed"' in demo_html(chosen) and "could not be built: Fashion-MNIST" in demo_html(chosen)


# launch.py with a demo family whose build waits for a file the test creates (registered by this
# wrapper, so launch.py and the builder have no switch for tests)
GATED_LAUNCH = """
import os, sys, time
from pathlib import Path
import app.demo_family as df
from mergecore.events import Event

def gated(root, progress=None, cancel=None, settings=None):
    gate, start, i = Path(os.environ["MC_TEST_DEMO_GATE"]), time.time(), 0
    while not gate.exists():
        if progress:
            progress(Event("demo.progress", {"stage": "gated stage", "fraction": min(0.9, i / 100),
                                             "elapsed": time.time() - start}))
        i += 1
        time.sleep(0.2)
    return df.PROVIDERS["synthetic-llama"](root, progress=progress, cancel=cancel)

df.PROVIDERS["gated"] = gated
import launch
sys.exit(launch.main(sys.argv[1:]))
"""


@contextlib.contextmanager
def gated_app(tmp: Path, *extra: str):
    """(url, gate file) of `launch.py` serving in a subprocess while its demo build waits for the gate."""
    port, gate = free_port(), tmp / "gate"
    env = dict(os.environ, MC_TEST_DEMO_GATE=str(gate), GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT))
    env.pop("MERGECORE_DEMO_FAMILY", None)
    log = open(tmp / "launch.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", GATED_LAUNCH, "--port", str(port), "--demo-family", "gated",
                             "--demo-dir", str(tmp / "demo"), "--work-dir", str(tmp / "work"), *extra],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        end = time.time() + 90
        while True:
            assert proc.poll() is None, (tmp / "launch.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < end, "the page was not served in 90 s"
            time.sleep(0.2)
        yield url, gate
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_launch_serves_the_page_before_the_demo_is_built(tmp_path, model_factory):
    local = model_factory("llama", 0)
    with gated_app(tmp_path, "--allow-dir", str(local.parent)) as (url, gate):
        assert not gate.exists() and not (tmp_path / "demo" / "synthetic-llama").exists()  # still building
        busy, idle = client(url), client(url)
        out = poll(lambda: busy.predict(api_name="/poll_demo"), lambda o: "gated stage" in str(o[-1]), 30, 0.2)
        assert "building the demo models: gated stage" in out[-1] and "%" in out[-1]
        out = busy.predict(api_name="/load_demo")
        assert "still being built" in out[-3]
        out = busy.predict(str(local), api_name="/add_model")  # models can be added meanwhile
        assert f"Added `{local}`" in out[-3]
        gate.touch()
        # a page with no models gets the demo when it is ready; one with models is offered it
        out = poll(lambda: idle.predict(api_name="/poll_demo"), lambda o: "Loaded the demo" in str(o[-3]), 60, 0.3)
        assert "ready in" in out[-1] and any("Compatible" in str(o) for o in out)
        out = busy.predict(api_name="/poll_demo")
        assert "adds them to this session" in out[-1] and "Loaded" not in str(out[-3])
        assert "Loaded the demo models" in busy.predict(api_name="/load_demo")[-3]


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
