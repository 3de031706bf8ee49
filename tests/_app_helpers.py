"""Shared fixtures and helpers of the app tests (`pytest_plugins = ("_app_helpers",)` in each
module, so the fixtures are built once per test session).

- `demo_family` / `app_server`: the synthetic tiny Llamas (causal-LM paths of the app).
- `fmnist_demo` / `fmnist_server`: the default demo, the miniature fmnist-vit family, built with
  the tiny settings of tests/test_families.py (a few seconds). With $MERGECORE_SCREENSHOTS set
  (the browser test writes the README's screenshots), the real demo is used instead: the quick
  preset `launch.py` builds, cached under the usual demo folder.
- `client(url)` and the polling helpers drive the running app through `gradio_client`;
  `chromium()` / `playwright()` find the browser and Playwright (a failure with
  MERGECORE_REQUIRE_BROWSER=1, a skip otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

SCREENSHOT_DIR = Path(os.environ.get("MERGECORE_SCREENSHOTS", "")) if os.environ.get("MERGECORE_SCREENSHOTS") else None
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
EXPERTS = ["fmnist_tops", "fmnist_footwear", "fmnist_other", "digits"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_settings() -> dict:
    """The miniature family build of the families tests (wherever TINY lives), two layers deep so
    a search has layers to choose between, and without the linear probes."""
    try:
        from conftest import TINY  # type: ignore[attr-defined]
    except ImportError:
        from test_families import TINY
    return {**TINY, "num_layers": 2, "probe_steps": 0}


def fashion_dir_or_standin(tmp: Path) -> str | None:
    """None when Debian's Fashion-MNIST is installed (the default path); otherwise stand-in idx
    files of the same format, with a class-dependent bar to learn."""
    from mergecore.eval.data import write_idx
    from mergecore.families.fmnist_vit import FASHION_DEFAULT_DIR, FASHION_FILES

    real = Path(os.environ.get("MERGECORE_FASHION_MNIST") or FASHION_DEFAULT_DIR)
    if all((real / f).is_file() for f in FASHION_FILES.values()):
        return None
    rng = np.random.default_rng(0)
    for split, n in (("train", 60000), ("test", 10000)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for c in range(10):
            images[labels == c, 2 + 2 * c:5 + 2 * c, 4:24] = 200
        write_idx(tmp / FASHION_FILES[f"{split}_images"], images)
        write_idx(tmp / FASHION_FILES[f"{split}_labels"], labels)
    return str(tmp)


def _served(work: Path, family):
    """(url, ctx) of the app launched in this process on `family`, closed afterwards."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.ui import build_app, launch_kwargs, make_context

    ctx = make_context(work, demo=family, zip_limit=50_000_000)
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                            server_port=free_port(), **launch_kwargs(ctx))
    try:
        yield url.rstrip("/") + "/", ctx
    finally:
        demo.close()


@pytest.fixture(scope="session")
def demo_family(tmp_path_factory):
    from app.demo_family import build_demo_family

    return build_demo_family("synthetic-llama", tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def app_server(demo_family, tmp_path_factory):
    """(url, ctx) of the app running in this process on the synthetic demo."""
    yield from _served(tmp_path_factory.mktemp("work"), demo_family)


@pytest.fixture(scope="session")
def fmnist_demo(tmp_path_factory):
    """The default demo family (fmnist-vit-mini): tiny settings, or the real one for screenshots."""
    from app.demo_family import build_demo_family

    if SCREENSHOT_DIR is not None:
        return build_demo_family("fmnist-vit-mini")
    settings = tiny_settings()
    standin = fashion_dir_or_standin(tmp_path_factory.mktemp("fashion"))
    if standin:
        settings["fashion_dir"] = standin
    return build_demo_family("fmnist-vit-mini", tmp_path_factory.mktemp("fmnist-demo"), settings=settings)


@pytest.fixture(scope="session")
def fmnist_server(fmnist_demo, tmp_path_factory):
    """(url, ctx) of the app running in this process on the fmnist-vit-mini demo."""
    yield from _served(tmp_path_factory.mktemp("work-fmnist"), fmnist_demo)


# ---------------------------------------------------------------------------------------------
# the running app, through gradio_client


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def find(out, pred):
    """The first output that `pred` takes."""
    for o in out:
        if pred(o):
            return o
    raise AssertionError(f"no matching output in {[str(o)[:80] for o in out]}")


def recipe_text(out) -> str:
    """The recipe YAML among a refresh's outputs."""
    return find(out, lambda o: isinstance(o, str) and "merge_method" in o)


def poll(call: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 60, every: float = 0.1,
         what: str = "it"):
    """`call()` until `done(its output)`; the last output."""
    end, out = time.time() + timeout, None
    while time.time() < end:
        out = call()
        if done(out):
            return out
        time.sleep(every)
    raise AssertionError(f"{what} did not get there in {timeout} s: {str(out)[:300]}")


def poll_merge(c, timeout=60):
    return poll(lambda: c.predict(api_name="/poll_merge"),
                lambda out: any(w in str(out[2]) for w in ("Merged", "Failed", "Cancelled")), timeout, 0.2, "merge")


def poll_search(c, key, pred=lambda d: False, timeout=120, episodes=None):
    """/poll_search until the search ended, ran `episodes`, or `pred(its data)`."""

    def done(d) -> bool:
        return pred(d) or d["status"] not in ("queued", "running") or (episodes is not None and d["episodes"] >= episodes)

    return poll(lambda: c.predict(key, api_name="/poll_search"),
                lambda out: isinstance(out[-1], dict) and "status" in out[-1] and done(out[-1]), timeout, 0.1, "search")


def figure(plot) -> dict:
    plot = plot.get("value", plot) if plot.get("__type__") == "update" else plot
    return json.loads(plot["plot"]) if isinstance(plot["plot"], str) else plot["plot"]


def replay_scores(c, key, name):
    """Merge a finished search's recipe and score it (/replay_search): the scores table and output."""
    out = c.predict(key, api_name="/replay_search")
    assert "merging the best recipe" in out[-1], out[-1]
    out = poll(lambda: c.predict(api_name="/poll_replay"),
               lambda o: "merged into" in str(o[0]) or "error" in str(o[0]).lower(), 60, 0.2, "replay")
    assert "merged into" in out[0], out[0]
    scores = out[1]["value"] if isinstance(out[1], dict) and "value" in out[1] else out[1]
    assert [r[0] for r in scores["data"]] == ["base (no merge)", f"{name}-best"]
    return scores, out


def search_args(name: str, fam, key: str, **fields) -> dict[str, Any]:
    """/start_search's arguments: search `name` on the demo's experts and validation tasks, plus `fields`."""
    return {"name": name, "key": key, f"{name}_models": EXPERTS, f"{name}_base": "base",
            f"{name}_tasks": str(fam.val_tasks), **{f"{name}_{k}": v for k, v in fields.items()}}


def demo_session(fam):
    from app import searches as srch

    state = {"models": [{"name": n, "path": str(p)} for n, p in fam.models.items()], "base": "base",
             "family": {"tasks": str(fam.tasks), "val_tasks": str(fam.val_tasks)}}
    return srch.SearchSession.from_state(state)


def saved_config(name: str, out_dir: Path):
    """A search's config as Resume reads it back (app_search.json in its folder)."""
    from app import searches as srch

    data = json.loads((out_dir / "app_search.json").read_text())
    assert data["search"] == name
    return srch.get_search(name).load_config(data["config"])


# ---------------------------------------------------------------------------------------------
# the browser


def _missing(what: str) -> None:
    if os.environ.get("MERGECORE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what} is not installed (scripts/setup.sh installs it)")
    pytest.skip(f"{what} is not installed")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        _missing("chromium")
    return exe


def playwright():
    """Playwright's `sync_playwright` (and the browser it will drive)."""
    chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright")
    return sync_playwright


# the number of lines each header cell's label of a table is laid out on (distinct line tops of
# its text), with the label and the cell's width
_HEADER_LINES = """(id) => Array.from(document.querySelectorAll('#' + id + ' thead th')).map(th => {
  const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
  const tops = new Set();
  let text = '';
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (!n.textContent.trim() || n.parentElement.offsetParent === null) continue;
    text += n.textContent.trim();
    const range = document.createRange();
    range.selectNodeContents(n);
    for (const r of range.getClientRects()) if (r.width > 0) tops.add(Math.round(r.top));
  }
  return [text, tops.size, Math.round(th.getBoundingClientRect().width)];
})"""


def header_lines(page: Any, elem_id: str) -> list[list[Any]]:
    """[label, lines it is laid out on, width] for each header cell of table `elem_id` in the page."""
    return page.evaluate(_HEADER_LINES, elem_id)


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium driven by Playwright, one per test module (a failure with
    MERGECORE_REQUIRE_BROWSER=1 when either is missing, a skip otherwise)."""
    with playwright()() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def start_dam_in_page(page: Any, settings: dict[str, str]) -> None:
    """In the Search tab: choose DAM, wait for its form on the session's models, type `settings`
    (field key -> text) and press Start."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Search").click()
    page.locator("#search-kind input").click()
    page.get_by_role("option", name="DAM: trained merge coefficients").click()
    expect(page.locator("#search-dam-models")).to_contain_text("fmnist_tops", timeout=10_000)
    for key, value in settings.items():
        box = page.locator(f"#search-dam-{key} input")
        box.fill(value)
        box.press("Tab")
    page.locator("#search-start").click()
