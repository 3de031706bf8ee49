"""Browser test of the leaderboard in the Search tab (Debian's chromium through Playwright, on the
miniature fmnist-vit demo): Leaderboard chosen in the dropdown shows its form on the session's
models with every field enabled; a budget typed key by key, two methods picked in the method
filter, the grid and the searches switched off, Start fills the live table and draws the ranking,
and the winner's recipe is offered. With MERGECORE_REQUIRE_BROWSER=1 a missing browser fails."""

from __future__ import annotations

import time

pytest_plugins = ("_app_helpers",)

FIELDS = ("tasks textarea", "val_tasks textarea", "budget textarea", "top_k input", "seed input", "methods input",
          "searches input")
METHODS = ["ties", "task_arithmetic"]


def _pick(page, key: str, option: str) -> None:
    """Type into a multiselect dropdown of the leaderboard form and pick `option`."""
    box = page.locator(f"#search-leaderboard-{key} input")
    box.click()
    box.press_sequentially(option)
    page.get_by_role("option", name=option, exact=True).click()


def test_leaderboard_in_a_browser(fmnist_server, fmnist_demo, browser):
    from playwright.sync_api import expect

    url, ctx = fmnist_server
    t0 = time.time()
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    expect(page.get_by_text("Compatible", exact=False).first).to_be_visible(timeout=30_000)
    page.get_by_role("tab", name="Search").click()
    page.locator("#search-kind input").click()
    page.get_by_role("option", name="Leaderboard: every data-free merge, ranked").click()
    expect(page.locator("#search-leaderboard-models")).to_contain_text("fmnist_tops", timeout=10_000)
    expect(page.locator("#search-leaderboard-tasks textarea")).to_have_value(str(fmnist_demo.tasks))
    expect(page.locator("#search-leaderboard-val_tasks textarea")).to_have_value(str(fmnist_demo.val_tasks))

    # every field of the form takes input in the page (not only through a handler)
    for f in FIELDS:
        key, tag = f.split()
        box = page.locator(f"#search-leaderboard-{key} {tag}").first
        expect(box).to_be_visible()
        expect(box).to_be_enabled()
        expect(box).to_be_editable()
    grid = page.locator("#search-leaderboard-grid input[type=checkbox]")
    expect(grid).to_be_enabled()
    expect(grid).to_be_checked()

    # the budget typed key by key; two methods, no grid, no searches
    budget = page.locator("#search-leaderboard-budget textarea")
    budget.fill("")
    budget.press_sequentially("90s")
    budget.press("Tab")
    expect(budget).to_have_value("90s")
    for m in METHODS:
        _pick(page, "methods", m)
    page.keyboard.press("Escape")
    for m in METHODS:
        expect(page.locator("#search-leaderboard-methods .token", has_text=m)).to_have_count(1)
    grid.uncheck()
    expect(grid).not_to_be_checked()
    searches = page.locator("#search-leaderboard-searches .token-remove")
    while searches.count():
        searches.first.click()
    expect(page.locator("#search-leaderboard-searches .token")).to_have_count(0)

    page.locator("#search-start").click()
    expect(page.locator("#search-status")).to_contain_text("Started", timeout=15_000)
    table = page.locator("#search-table")
    expect(table).to_be_visible(timeout=15_000)
    rows = table.get_by_role("row").filter(has=page.get_by_role("gridcell"))  # the header row has none
    expect(rows.filter(has_text="ties").first).to_be_visible(timeout=30_000)
    expect(page.locator("#search-plot-0 .barlayer .trace").first).to_be_attached(timeout=30_000)
    expect(page.locator("#search-result")).to_contain_text("Winner", timeout=30_000)
    expect(page.locator("#search-progress [data-status='done']")).to_be_visible()
    expect(page.locator("#search-recipe")).to_contain_text("merge_method:")
    expect(page.locator("#search-use")).to_be_visible()
    expect(rows).to_have_count(len(METHODS))
    expect(rows.first.get_by_role("gridcell").first).to_have_text("1")
    # what the page sent is what ran: the typed budget, the two methods without their grids, no searches
    progress = page.locator("#search-progress").inner_text()
    assert f"{len(METHODS)}/{len(METHODS)} candidates" in progress and "of 1m30s" in progress, progress
    assert "Searches:" not in page.locator("#search-result").inner_text()
    assert not errors, errors
    assert time.time() - t0 < 60, time.time() - t0
