"""Shared fixtures for the app tests: the app launched in-process on a demo family.

- `demo_family` / `app_server`: the synthetic tiny Llamas (causal-LM paths of the app).
- `fmnist_demo` / `fmnist_server`: the default demo, the miniature fmnist-vit family, built with
  the tiny settings of tests/test_families.py (a few seconds). With $MERGECORE_SCREENSHOTS set
  (the browser test writes the README's screenshots), the real demo is used instead: the quick
  preset `launch.py` builds, cached under the usual demo folder.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

SCREENSHOT_DIR = Path(os.environ.get("MERGECORE_SCREENSHOTS", "")) if os.environ.get("MERGECORE_SCREENSHOTS") else None


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


def _serve(ctx):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.ui import build_app, launch_kwargs

    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                            server_port=free_port(), **launch_kwargs(ctx))
    return demo, url.rstrip("/") + "/"


@pytest.fixture(scope="session")
def demo_family(tmp_path_factory):
    from app.demo_family import build_demo_family

    return build_demo_family("synthetic-llama", tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def app_server(demo_family, tmp_path_factory):
    """(url, ctx) of the app running in this process on the synthetic demo."""
    from app.ui import make_context

    ctx = make_context(tmp_path_factory.mktemp("work"), demo=demo_family, zip_limit=50_000_000)
    demo, url = _serve(ctx)
    try:
        yield url, ctx
    finally:
        demo.close()


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
    from app.ui import make_context

    ctx = make_context(tmp_path_factory.mktemp("work-fmnist"), demo=fmnist_demo, zip_limit=50_000_000)
    demo, url = _serve(ctx)
    try:
        yield url, ctx
    finally:
        demo.close()
