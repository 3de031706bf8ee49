"""Browser test: the session belongs to the browser and is kept on disk (Chromium via Playwright,
on the miniature fmnist-vit demo).

One browser context (one localStorage, so one browser key): change the models and the recipe,
start a merge and queue a second one behind it, reload the page while the first runs (the Merge
tab follows it, with the queue; both finish and are in the history), evaluate them (their scores
go into the history), open a second tab (the same models, recipe, history and evaluation), then
restart the app on the same work dir and port (the history, models and recipe are still there).
The merges and the evaluation are held at their start (gates around `mergecore.merge` and the
app's `evaluate_models`, in this process) so the reload really happens mid-merge and the busy
Evaluate button is seen.
"""

from __future__ import annotations

import os
import re
import threading
import time

from _app_helpers import free_port, header_lines

pytest_plugins = ("_app_helpers",)


class Server:
    """The app on a fixed port and work dir, so it can be restarted where the browser left it."""

    def __init__(self, work, family):
        self.work, self.family, self.port = work, family, free_port()
        self.demo = self.ctx = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> "Server":
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        from app.ui import build_app, launch_kwargs, make_context

        self.ctx = make_context(self.work, demo=self.family, zip_limit=50_000_000)
        self.demo = build_app(self.ctx)
        self.demo.queue(default_concurrency_limit=4)
        for attempt in range(20):  # the port of the app just closed may take a moment to be free
            try:
                self.demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                                 server_port=self.port, **launch_kwargs(self.ctx))
                return self
            except OSError:
                time.sleep(0.25)
        raise AssertionError(f"port {self.port} did not come free")

    def stop(self) -> None:
        if self.demo is not None:
            self.demo.close()
            self.demo = None


def _opened(page, url):
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.get_by_text("Compatible", exact=False).first).to_be_visible(timeout=30_000)


def _recipe(page):
    page.get_by_role("tab", name="Recipe").click()
    return page.locator(".cm-content").first


def _history(page):
    page.get_by_role("tab", name="Merge").click()
    return page.locator("#merge-history")


def _done(history):
    """The history's cells that say a merge is done (the table's own cells, not its hidden copy)."""
    return history.locator("span[data-editable]").filter(has_text=re.compile(r"^done$"))


def test_session_survives_reload_second_tab_and_restart(fmnist_demo, browser, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    import mergecore

    gate, real = threading.Event(), mergecore.merge

    def held(*args, **kwargs):  # a merge waits here until the test lets it go
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(mergecore, "merge", held)
    from app import compare as cmp

    eval_gate, real_eval = threading.Event(), cmp.evaluate_models

    def held_eval(*args, **kwargs):  # so is an evaluation
        assert eval_gate.wait(60)
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(cmp, "evaluate_models", held_eval)
    t0 = time.time()
    server = Server(tmp_path / "work", fmnist_demo).start()
    try:
        context = browser.new_context(viewport={"width": 1360, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _opened(page, server.url)

        # the session: one model fewer and a curve of the recipe changed
        page.get_by_label("Remove a model").click()
        page.get_by_role("option", name="digits", exact=True).click()
        page.get_by_role("button", name="Remove", exact=True).click()
        expect(page.get_by_text("Removed digits").first).to_be_visible(timeout=15_000)
        yaml_box = _recipe(page)
        expect(yaml_box).not_to_contain_text("digits", timeout=10_000)
        anchors = page.locator("#curve-anchors textarea")
        expect(anchors).not_to_have_value("", timeout=10_000)
        anchors.fill("0.2, 0.9")
        anchors.press("Tab")
        expect(yaml_box).to_contain_text("[0.2, 0.9]", timeout=10_000)

        # a merge, held at its start, and a second one queued behind it
        page.get_by_role("tab", name="Merge").click()
        page.locator("#merge-btn").click()
        expect(page.locator("#merge-summary")).to_contain_text("Merging into", timeout=15_000)
        expect(page.locator("#merge-cancel")).to_be_enabled()
        page.locator("#merge-btn").click()
        expect(page.locator("#merge-queue")).to_contain_text("merge-2 — 1 ahead", timeout=15_000)

        # a reload mid-merge: the Merge tab follows the running merge and the queue
        page.reload()
        expect(page.get_by_text("Compatible", exact=False).first).to_be_visible(timeout=30_000)
        history = _history(page)
        expect(page.locator("#merge-summary")).to_contain_text("Merging into", timeout=15_000)
        expect(page.locator("#merge-queue")).to_contain_text("merge-2 — 1 ahead")
        expect(history).to_contain_text("running")
        gate.set()
        expect(page.locator("#merge-summary")).to_contain_text(re.compile(r"Merged .*merge-2"), timeout=30_000)
        expect(_done(history)).to_have_count(2, timeout=10_000)
        headers = header_lines(page, "merge-history")
        assert headers and all(lines == 1 for _, lines, _ in headers), headers  # no header wrapped letter by letter
        expect(history).not_to_contain_text("running")
        expect(history).not_to_contain_text("queued")
        expect(page.locator("#merge-cancel")).to_be_disabled()
        # both reach Compare and Export
        page.get_by_role("tab", name="Export").click()
        page.get_by_label("Merged checkpoint").click()
        expect(page.get_by_role("option", name="merge", exact=True)).to_be_visible()
        expect(page.get_by_role("option", name="merge-2", exact=True)).to_be_visible()
        page.keyboard.press("Escape")
        # evaluated on the demo's tasks (Evaluate is off while it runs): the scores go into the history
        page.get_by_role("tab", name="Compare").click()
        page.locator("#eval-btn").click()
        expect(page.locator("#eval-btn")).to_be_disabled(timeout=10_000)
        eval_gate.set()
        expect(page.locator("#eval-progress [data-status='done']")).to_be_visible(timeout=60_000)
        expect(page.locator("#eval-btn")).to_be_enabled()
        expect(_history(page)).to_contain_text(re.compile(r"\b[01]\.\d{4}\b"), timeout=10_000)
        expect(_recipe(page)).to_contain_text("[0.2, 0.9]")  # and the reload kept the recipe
        expect(_recipe(page)).not_to_contain_text("digits")

        # a second tab of the same browser: the same models, recipe and history
        other = context.new_page()
        _opened(other, server.url)
        expect(_recipe(other)).to_contain_text("[0.2, 0.9]", timeout=10_000)
        expect(_recipe(other)).not_to_contain_text("digits")
        expect(_done(_history(other))).to_have_count(2, timeout=10_000)
        expect(_history(other)).to_contain_text(re.compile(r"\b[01]\.\d{4}\b"))  # with their scores
        other.get_by_role("tab", name="Compare").click()
        expect(other.locator("#eval-progress")).to_contain_text("the latest evaluation")
        expect(other.locator("#eval-scores")).to_contain_text("merge-2")
        other.close()

        # the app restarts on the same work dir: the browser finds its history, models and recipe
        server.stop()
        server.start()
        _opened(page, server.url)
        history = _history(page)
        expect(_done(history)).to_have_count(2, timeout=10_000)
        expect(history).to_contain_text("merge-2")
        expect(_recipe(page)).to_contain_text("[0.2, 0.9]")
        expect(_recipe(page)).not_to_contain_text("digits")
        assert not errors, errors
        context.close()
    finally:
        gate.set()
        server.stop()
    print(f"browser session test: {time.time() - t0:.1f} s")
