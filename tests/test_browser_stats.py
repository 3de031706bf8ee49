"""Browser test of the Recipe tab's statistics panel (Playwright drives Debian's chromium against
the app on the miniature fmnist-vit demo): regmean chosen in the Method dropdown shows the panel;
a merge without statistics fails in one line on the Merge tab; a tasks path outside the app's
folders is refused at the field; the demo's tasks file typed in and Collect pressed runs with a
progress bar to the end, the YAML gets `artifacts: {stats: ...}`, and the Merge tab merges it.
"""

from __future__ import annotations

import pytest

from _app_helpers import CHROMIUM_ARGS, chromium, playwright

pytest_plugins = ("_app_helpers",)


def _type(page, elem: str, text: str) -> None:
    box = page.locator(f"{elem} textarea, {elem} input").first
    box.fill(text)
    box.press("Enter")


def test_collect_statistics_and_merge_in_a_browser(fmnist_server, fmnist_demo):
    from playwright.sync_api import expect

    url, _ = fmnist_server
    with playwright()() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            expect(page.get_by_text("Compatible", exact=False).first).to_be_visible(timeout=30_000)
            page.get_by_role("tab", name="Recipe").click()
            yaml, panel = page.locator("#recipe-yaml .cm-content"), page.locator("#stats-panel")
            expect(yaml).to_contain_text("merge_method: ties", timeout=15_000)
            expect(panel).to_be_hidden()

            page.locator("#recipe-method input").first.click()
            page.get_by_role("option", name="regmean", exact=True).click()
            expect(yaml).to_contain_text("merge_method: regmean", timeout=15_000)
            expect(panel).to_be_visible()
            head = page.locator("#stats-head")
            expect(head).to_contain_text("needs Gram matrices of each linear layer's inputs")
            expect(head).to_contain_text("No statistics attached")
            page.locator("#recipe-models").get_by_label("base", exact=True).uncheck()  # the demo's base has no task
            expect(yaml).not_to_contain_text("/base", timeout=10_000)

            # without statistics the merge fails with the engine's one line
            page.get_by_role("tab", name="Merge").click()
            page.locator("#merge-btn").click()
            expect(page.locator("#merge-summary")).to_contain_text("Failed:", timeout=30_000)
            expect(page.locator("#merge-summary")).to_contain_text("artifacts")
            page.get_by_role("tab", name="Recipe").click()

            # a path outside the app's folders: refused at the field
            tasks = page.locator("#stats-tasks")
            _type(page, "#stats-tasks", "/etc/passwd")
            expect(tasks).to_contain_text("outside the folders this app may read", timeout=10_000)
            _type(page, "#stats-tasks", str(fmnist_demo.val_tasks))
            expect(tasks).not_to_contain_text("⚠", timeout=10_000)
            page.locator("#stats-examples input").fill("8")

            page.locator("#stats-collect").click()
            expect(page.locator("#stats-progress .mc-progress[data-status='done']")).to_be_visible(timeout=60_000)
            expect(page.locator("#stats-log")).to_contain_text("Attached")
            expect(yaml).to_contain_text("artifacts:", timeout=10_000)
            expect(yaml).to_contain_text("stats: ")
            expect(head).to_contain_text("Statistics attached", timeout=10_000)

            page.get_by_role("tab", name="Merge").click()
            page.locator("#merge-btn").click()
            expect(page.locator("#merge-summary")).to_contain_text("Merged", timeout=60_000)
            assert not errors, errors
        finally:
            browser.close()
