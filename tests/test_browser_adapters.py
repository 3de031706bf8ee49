"""Browser test of base + LoRA adapter models (Playwright drives Debian's chromium): on the
Models tab a bad adapter shows its one-line error in the page and adds nothing; the base and
the adapter folder typed into the page add the pair as one model, which the Recipe tab offers
among the recipe's models (its `BASE+ADAPTER` reference in the YAML), and the Merge tab merges it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from test_app_adapters import make_adapter

pytest.importorskip("peft")

pytest_plugins = ("_app_helpers",)


def test_add_a_base_plus_adapter_in_the_page_and_merge_it(app_server, demo_family, browser, tmp_path):
    from playwright.sync_api import expect

    url, ctx = app_server
    base = Path(demo_family.models["base"])
    root = ctx.workspace.root / "browser-adapters"
    good = make_adapter(base, root / "tuned", seed=3)
    no_config = root / "no-config"
    shutil.copytree(good, no_config)
    (no_config / "adapter_config.json").unlink()

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.locator("#demo-btn").click()
    status = page.locator("#models-status")
    expect(status).to_contain_text("Loaded the demo models", timeout=30_000)
    rows = page.locator("#models-table div[role='row']")
    expect(rows).to_have_count(3)

    # a folder without adapter_config.json on a base picked from the loaded models: one line, nothing added
    page.locator("#adapter-pick input").click()
    page.get_by_role("option", name="base", exact=True).click()
    expect(page.locator("#adapter-base textarea")).to_have_value("base")
    page.locator("#adapter-ref textarea").fill(str(no_config))
    page.locator("#adapter-add").click()
    expect(status).to_contain_text("has no adapter_config.json", timeout=15_000)
    assert "\n" not in status.inner_text().strip()
    expect(rows).to_have_count(3)
    page.screenshot(path=str(tmp_path / "1-bad-adapter.png"), full_page=True)

    # the base's folder and the adapter's typed in: added as one model
    page.locator("#adapter-base textarea").fill(str(base))
    page.locator("#adapter-ref textarea").fill(str(good))
    page.locator("#adapter-add").click()
    ref = f"{base}+{good}"
    expect(status).to_contain_text("(base + LoRA adapter)", timeout=15_000)
    expect(status).to_contain_text("Added")
    expect(rows).to_have_count(4)
    expect(page.locator("#models-table")).to_contain_text("LlamaForCausalLM + LoRA")
    expect(page.get_by_role("option")).to_have_count(0)  # no dropdown left open by the refresh
    page.screenshot(path=str(tmp_path / "2-added.png"), full_page=True)

    # the Recipe tab offers it among the recipe's models and names it BASE+ADAPTER
    page.get_by_role("tab", name="Recipe").click()
    expect(page.locator("#recipe-models")).to_contain_text("tuned", timeout=15_000)
    expect(page.locator("#recipe-models").get_by_label("tuned")).to_be_checked()
    expect(page.locator("#recipe-yaml .cm-content")).to_contain_text(f"model: {ref}", timeout=15_000)

    # merged from the Merge tab, the pair's reference in the checkpoint's recipe
    page.get_by_role("tab", name="Merge").click()
    page.locator("#merge-btn").click()
    summary = page.locator("#merge-summary")
    expect(summary).to_contain_text("Merged", timeout=60_000)
    merged = Path(re.search(r"written to (\S+)", summary.inner_text()).group(1).strip("`"))
    assert ref in (merged / "mergecore_recipe.yml").read_text()
    page.screenshot(path=str(tmp_path / "3-merged.png"), full_page=True)
    assert not errors, errors
    page.close()
