"""Browser test of the Models tab on a first start (Playwright drives Debian's chromium).

`launch.py` runs in a subprocess with a demo family whose build waits for a file the test
creates (`test_app_models.gated_app`): the page is up and shows the build's stage, percent and
seconds while the demo builds; a local model is added meanwhile, and adding its folder again
says it is already loaded; when the build is done the demo is offered, loaded, and the model
table's headers each sit on one line (not wrapped letter by letter). A screenshot of each step
goes into the test's tmp dir.
"""

from __future__ import annotations

import re
from pathlib import Path

from _app_helpers import header_lines
from test_app_models import gated_app

pytest_plugins = ("_app_helpers",)


def test_first_start_progress_an_already_loaded_folder_and_one_line_headers(browser, tmp_path, model_factory):
    from playwright.sync_api import expect

    from app.state import MODEL_COLUMNS

    local = Path(model_factory("llama", 0))
    with gated_app(tmp_path, "--allow-dir", str(local.parent)) as (url, gate):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)

        # the page is up while the demo builds: its stage, percent and seconds beside the demo button
        build = page.locator("#demo-build")
        expect(build).to_contain_text("building the demo models: gated stage", timeout=30_000)
        expect(build).to_contain_text(re.compile(r"\d+% · \d+\.\d s"))
        expect(page.locator("#models-status")).to_contain_text("being built")
        page.screenshot(path=str(tmp_path / "1-building.png"), full_page=True)

        # a local model meanwhile; its folder again (spelled another way) is already loaded
        ref = page.locator("#models-ref textarea")
        ref.fill(str(local))
        page.locator("#models-add").click()
        expect(page.locator("#models-status")).to_contain_text("Added", timeout=15_000)
        ref.fill(f"{local.parent}/../{local.parent.name}/{local.name}/")
        page.locator("#models-add").click()
        status = page.locator("#models-status")
        expect(status).to_contain_text("is already loaded, as", timeout=15_000)
        expect(status).to_contain_text("nothing changed")
        expect(page.locator("#models-table div[role='row']")).to_have_count(1)

        # the build is done: this page has a model, so the demo is offered; loading it replaces the session
        gate.touch()
        expect(build).to_contain_text("adds them to this session", timeout=60_000)
        expect(page.locator("#demo-build [data-status='done']")).to_be_visible()
        page.locator("#demo-btn").click()
        expect(status).to_contain_text("Loaded the demo models", timeout=15_000)
        expect(page.locator("#models-table div[role='row']")).to_have_count(3)
        page.wait_for_timeout(300)
        page.screenshot(path=str(tmp_path / "2-demo.png"), full_page=True)

        headers = header_lines(page, 'models-table')
        assert [h[0] for h in headers] == MODEL_COLUMNS, headers
        assert all(lines == 1 for _, lines, _ in headers), headers  # each label on one line
        assert all(width >= 60 for _, _, width in headers), headers
        assert not errors, errors


def test_add_model_is_off_while_a_hub_fetch_runs(app_server, demo_family, browser, monkeypatch):
    """A Hub id is fetched in the background: the Add button is off until the fetch has ended."""
    import threading

    from playwright.sync_api import expect

    import app.tabs.models as models_tab

    url, _ = app_server
    gate = threading.Event()

    def gated_fetch(jc, ref):  # the Hub "download": held until the page has been looked at
        assert gate.wait(60)
        return str(demo_family.models["base"])

    monkeypatch.setattr(models_tab, "fetch", gated_fetch)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.locator("#demo-btn").click()
    status = page.locator("#models-status")
    expect(status).to_contain_text("Loaded the demo models", timeout=30_000)
    page.locator("#models-ref textarea").fill("some-org/some-model")
    page.locator("#models-add").click()
    expect(status).to_contain_text("Fetching", timeout=15_000)
    expect(page.locator("#models-add")).to_be_disabled()
    gate.set()
    expect(status).to_contain_text("is already loaded, as base", timeout=15_000)  # the fetched folder (rendered)
    expect(page.locator("#models-add")).to_be_enabled()
    page.close()
