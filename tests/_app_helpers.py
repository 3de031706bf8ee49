"""Shared fixtures for the app tests: the app launched in-process on the synthetic demo family."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_family(tmp_path_factory):
    from app.demo_family import build_demo_family

    return build_demo_family("synthetic-llama", tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def app_server(demo_family, tmp_path_factory):
    """(url, ctx) of the app running in this process on a free port."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.ui import build_app, launch_kwargs, make_context

    ctx = make_context(tmp_path_factory.mktemp("work"), demo=demo_family, zip_limit=50_000_000)
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                            server_port=free_port(), **launch_kwargs(ctx))
    try:
        yield url.rstrip("/") + "/", ctx
    finally:
        demo.close()


SCREENSHOT_DIR = Path(os.environ.get("MERGECORE_SCREENSHOTS", "")) if os.environ.get("MERGECORE_SCREENSHOTS") else None
