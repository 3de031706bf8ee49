"""Browser test: Playwright (from PyPI) drives Debian's chromium against the app.

It loads the app on the demo family (the miniature fmnist-vit), drags a point of the curve
editor, runs a short RMM search (reloading the page while it runs: the search is still shown),
takes its best recipe to the Recipe tab, merges it, compares and evaluates the models, prepares
the downloads, runs a short DAM search (picked from the Search tab's dropdown) and saves a
screenshot of each tab (into $MERGECORE_SCREENSHOTS when set, e.g. assets/screenshots;
otherwise into the test's tmp dir).
`scripts/setup.sh` installs chromium; with MERGECORE_REQUIRE_BROWSER=1 (as `scripts/test.sh`
sets) a missing browser is a failure, not a skip.
"""

from __future__ import annotations

import re
from pathlib import Path

from _app_helpers import SCREENSHOT_DIR, start_dam_in_page

pytest_plugins = ("_app_helpers",)


def _shot(page, out: Path, name: str) -> None:
    page.wait_for_timeout(300)
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)


def test_drag_curve_merge_search_compare_export(fmnist_server, browser, tmp_path):
    from playwright.sync_api import expect

    url, _ = fmnist_server
    out = SCREENSHOT_DIR or tmp_path
    out.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)

    # Models: every new session opens on the demo family (the miniature fmnist-vit, trained here)
    expect(page.get_by_text("Compatible", exact=False).first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("trained here").first).to_be_visible()
    _shot(page, out, "1-models")

    # Recipe: drag the first point of the density curve upwards
    page.get_by_role("tab", name="Recipe").click()
    anchors = page.locator("#curve-anchors textarea")
    expect(anchors).to_have_value("0.3, 0.7", timeout=15_000)
    point = page.locator("#curve-editor circle[data-anchor='0']")
    expect(point).to_be_visible()
    point.scroll_into_view_if_needed()
    page.wait_for_timeout(200)
    box = point.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x, y - 30, steps=4)
    page.mouse.move(x, y - 70, steps=6)
    page.mouse.up()
    expect(anchors).not_to_have_value("0.3, 0.7", timeout=10_000)
    new_first = float(anchors.input_value().split(",")[0])
    assert new_first > 0.45, anchors.input_value()
    # the YAML preview and the form follow the dragged curve
    yaml_box = page.locator(".cm-content").first
    expect(yaml_box).to_contain_text(re.compile(r"density: \[0\.[4-9]\d*, 0\.7\]"), timeout=10_000)
    expect(page.locator("#field-density--fmnist_tops textarea")).to_have_value(re.compile(r"\[0\.[4-9]"),
                                                                                timeout=10_000)
    _shot(page, out, "2-recipe")

    # Search: a short RMM run; the reward plot fills in while it runs
    page.get_by_role("tab", name="Search").click()
    expect(page.locator("#search-rmm-models")).to_contain_text("fmnist_tops", timeout=10_000)
    episodes = page.locator("#search-rmm-episodes input")
    episodes.fill("30" if SCREENSHOT_DIR else "16")
    episodes.press("Tab")
    page.locator("#search-start").click()
    expect(page.locator("#search-status")).to_contain_text("Started", timeout=15_000)
    markers = page.locator("#search-plot-0 .scatterlayer .point")
    expect(markers.first).to_be_attached(timeout=60_000)
    # busy state: while it runs, Start and Resume are off and Stop is on (one poll sets all, read at once)
    done, start_off, stop_off, resume_off = page.evaluate("""() => [
        !!document.querySelector("#search-progress [data-status='done']"),
        ...['#search-start', '#search-stop', '#search-resume'].map(id => document.querySelector(id).disabled)]""")
    assert done or (start_off and not stop_off and resume_off), (done, start_off, stop_off, resume_off)
    # a reload (or a second tab of this browser) finds the search and keeps plotting it
    page.reload()
    expect(page.get_by_text("Compatible", exact=False).first).to_be_visible(timeout=30_000)
    page.get_by_role("tab", name="Search").click()
    expect(page.locator("#search-plot-0 .scatterlayer .point").first).to_be_attached(timeout=30_000)
    expect(page.locator("#search-result")).to_contain_text("Best merge", timeout=300_000)
    expect(page.locator("#search-progress [data-status='done']")).to_be_visible()
    expect(page.locator("#search-start")).to_be_enabled()
    expect(page.locator("#search-stop")).to_be_disabled()
    n = page.locator("#search-plot-0 .scatterlayer .trace").first.locator(".point").count()
    assert n == (30 if SCREENSHOT_DIR else 16), n
    expect(page.locator("#search-plot-3 .heatmaplayer, #search-plot-3 .hm")).not_to_have_count(0)
    expect(page.locator("#search-recipe")).to_contain_text("merge_method: passthrough")
    # the best recipe goes to the Recipe tab
    page.locator("#search-use").click()
    expect(page.get_by_role("tab", name="Recipe", selected=True)).to_be_visible(timeout=15_000)
    expect(page.locator(".cm-content").first).to_contain_text("merge_method: passthrough", timeout=15_000)

    # Merge it in the background, with progress and a summary (merges belong to the page's session)
    page.get_by_role("tab", name="Merge").click()
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-summary")).to_contain_text("Merged", timeout=60_000)
    expect(page.locator("#merge-progress [data-status='done']")).to_be_visible()
    _shot(page, out, "3-merge")

    # Compare: an example image through the sources and the merge, each body with the task's head
    page.get_by_role("tab", name="Compare").click()
    page.locator("#cmp-btn").click()
    expect(page.locator(".cmp-card")).to_have_count(6, timeout=60_000)
    expect(page.locator(".cmp-tag.merged")).to_have_count(1)
    expect(page.locator(".cmp-verdict").first).to_be_visible()
    page.get_by_role("button", name="Evaluate").click()
    expect(page.locator(".mc-progress[data-status='done']").last).to_be_visible(timeout=120_000)
    expect(page.get_by_text("fmnist_footwear").last).to_be_visible()
    page.wait_for_timeout(300)
    _shot(page, out, "5-compare")

    # Export: recipe and zipped checkpoint, served from the app's own exports folder
    page.get_by_role("tab", name="Export").click()
    page.get_by_role("button", name="Prepare downloads").click()
    expect(page.locator("#export-status")).to_contain_text("zipped (", timeout=30_000)
    link = page.get_by_role("button", name=re.compile(r"Download .*\.zip"))
    expect(link).to_be_visible()
    _shot(page, out, "6-export")

    # Search again, DAM this time (picked from the dropdown): the loss and each of its terms per step
    # the form's defaults on the real demo; a few steps on the miniature one
    start_dam_in_page(page, {} if SCREENSHOT_DIR else {"steps": "4", "examples_per_task": "32"})
    expect(page.locator("#search-rmm-models")).to_be_hidden()
    expect(page.locator("#search-result")).to_contain_text("Trained", timeout=300_000)
    expect(page.locator("#search-progress [data-status='done']")).to_be_visible()
    expect(page.locator("#search-recipe")).to_contain_text("merge_method: dam")
    # total, the sum over the tasks and one line per task
    expect(page.locator("#search-plot-0 .scatterlayer .trace")).to_have_count(6, timeout=10_000)
    page.wait_for_timeout(500)
    _shot(page, out, "4-search")
    assert not errors, errors
