"""Browser test of the mixture of experts (Playwright drives Debian's chromium): a base with a
tokenizer and three experts are added by folder on the Models tab (beside the demo the page opens
on); "moe (mixture of experts)" is chosen in the Recipe tab's method dropdown and its own form
appears, every field enabled; the base is picked, experts unticked, gate_mode, dtype and
experts_per_token chosen and prompts typed into each expert's box, with the YAML following. With
hidden gates and an expert without prompts the line under the method and the Merge tab's summary
say so in one line, and so does the YAML editor for a config with an empty prompt (with its line
and column); with prompts everywhere the Merge tab builds the mixture, which the page shows done,
and a reload opens on the same form.
"""

from __future__ import annotations

import re

import pytest

from _moe_helpers import family

pytest_plugins = ("_app_helpers",)

PROMPTS = {"e0": "python code\ndef return", "e1": "once upon time\nstory king", "e2": "sum plus number"}


def _choose(page, elem: str, option: str) -> None:
    page.locator(f"{elem} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _type(page, elem: str, text: str) -> None:
    """Type into a field as a user does: click it, replace its text, leave it (Tab)."""
    box = page.locator(f"{elem} textarea, {elem} input[type=text]").first
    box.click()
    box.fill(text)
    box.press("Tab")


def _one_line(locator) -> str:
    """The text of a message box that shows one paragraph of one line (Gradio's timer aside)."""
    from playwright.sync_api import expect

    paragraphs = locator.locator("p")
    expect(paragraphs).to_have_count(1)
    text = paragraphs.first.inner_text().strip()
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def moe_family(app_server):
    _, ctx = app_server
    return family(ctx.workspace.root / "browser-moe", "llama")


def test_choose_moe_type_prompts_and_build_it(app_server, moe_family, browser, tmp_path):
    from playwright.sync_api import expect

    url, _ = app_server
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    status = page.locator("#models-status")
    expect(status).to_contain_text("Loaded the demo models", timeout=30_000)
    for name in ("base", "e0", "e1", "e2"):
        _type(page, "#models-ref", str(moe_family[name]))
        page.locator("#models-add").click()
        expect(status).to_contain_text(f"Added {moe_family[name]}.", timeout=15_000)
    expect(page.locator("#models-table div[role='row']")).to_have_count(7)  # the demo's three, these four

    page.get_by_role("tab", name="Recipe").click()
    yaml, recipe_status = page.locator("#recipe-yaml .cm-content"), page.locator("#recipe-status")
    _choose(page, "#recipe-method", "moe (mixture of experts)")
    form = page.locator("#form-moe")
    expect(form).to_be_visible(timeout=15_000)
    expect(page.locator("#curve-editor")).to_be_hidden()  # the method's parts make way for the form
    expect(yaml).to_contain_text("gate_mode: hidden", timeout=10_000)
    fields = page.locator("[id^=moe-] textarea, [id^=moe-] input")
    assert fields.count() > 10 and all(fields.nth(i).is_enabled() for i in range(fields.count()))

    # the added base (base-2: the demo's is "base"), three experts of the seven models
    _choose(page, "#moe-base", "base-2")
    expect(yaml).to_contain_text(f"base_model: {moe_family['base']}", timeout=10_000)
    experts = page.locator("#moe-experts")
    for other in ("variant_a", "variant_b", "base-2"):
        experts.get_by_label(other, exact=True).uncheck()
        expect(experts.get_by_label(other, exact=True)).not_to_be_checked(timeout=10_000)
        expect(yaml).not_to_contain_text(f"source_model: {other}", timeout=10_000)
    expect(page.locator("#moe-positive--e2")).to_be_visible(timeout=10_000)
    expect(page.locator("#moe-positive--variant_a")).to_be_hidden()
    _choose(page, "#moe-dtype", "float32")
    expect(yaml).to_contain_text("dtype: float32", timeout=10_000)
    _choose(page, "#moe-gate_mode", "random")
    expect(yaml).to_contain_text("gate_mode: random", timeout=10_000)
    _choose(page, "#moe-gate_mode", "hidden")
    expect(yaml).to_contain_text("gate_mode: hidden", timeout=10_000)
    _type(page, "#moe-experts_per_token", "0")  # refused at the field, the config keeps its value
    expect(page.locator("#moe-experts_per_token")).to_contain_text("at least 1", timeout=10_000)
    _type(page, "#moe-experts_per_token", "1")
    expect(yaml).to_contain_text("experts_per_token: 1", timeout=10_000)

    # prompts typed into two experts; the third has none: hidden gates say so in one line
    for name in ("e0", "e1"):
        _type(page, f"#moe-positive--{name}", PROMPTS[name])
        expect(yaml).to_contain_text(PROMPTS[name].splitlines()[-1], timeout=10_000)
    _type(page, "#moe-negative--e1", "def return")
    expect(recipe_status).to_contain_text("experts.2", timeout=10_000)
    assert "has no positive_prompts" in _one_line(recipe_status)
    page.get_by_role("tab", name="Merge").click()
    page.locator("#merge-btn").click()
    summary = page.locator("#merge-summary")
    expect(summary).to_contain_text("Failed:", timeout=15_000)
    assert "has no positive_prompts" in _one_line(summary)

    # a config with an empty prompt, typed into the YAML editor: refused beside it with its line
    page.get_by_role("tab", name="Recipe").click()
    editor = page.locator("#recipe-yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    editor.fill(f"base_model: {moe_family['base']}\nexperts:\n  - source_model: {moe_family['e0']}\n"
                f"    positive_prompts: ['python', '']\n  - source_model: {moe_family['e1']}\n"
                f"    positive_prompts: [story]\n")
    page.locator("#apply-yaml").click()
    yaml_status = page.locator("#yaml-status")
    expect(yaml_status).to_contain_text(re.compile(r"line 4, column \d+: experts\.0\.positive_prompts: prompt 1 is "
                                                   r"empty"), timeout=10_000)
    _one_line(yaml_status)
    _choose(page, "#recipe-method", "ties")  # back to a method and to the mixture: the form was kept
    expect(page.locator("#curve-editor")).to_be_visible(timeout=15_000)
    _choose(page, "#recipe-method", "moe (mixture of experts)")
    expect(page.locator("#moe-positive--e1 textarea")).to_have_value(PROMPTS["e1"], timeout=15_000)

    _type(page, "#moe-positive--e2", PROMPTS["e2"])
    expect(recipe_status).to_contain_text("Mixture of 3 experts", timeout=10_000)
    expect(yaml).to_contain_text("sum plus number")
    page.screenshot(path=str(tmp_path / "moe-form.png"), full_page=True)
    page.get_by_role("tab", name="Merge").click()
    page.locator("#merge-btn").click()
    expect(summary).to_contain_text("Built the mixture of experts", timeout=60_000)
    expect(summary).to_contain_text("MixtralForCausalLM")
    expect(page.locator("#merge-progress [data-status=done]")).to_be_visible(timeout=10_000)
    expect(page.locator("#merge-history")).to_contain_text("moe", timeout=10_000)
    page.screenshot(path=str(tmp_path / "moe-built.png"), full_page=True)

    # the browser's session keeps the form: reloaded, the page opens on the mixture with its prompts
    page.reload()
    page.get_by_role("tab", name="Recipe").click()
    expect(page.locator("#moe-positive--e2 textarea")).to_have_value(PROMPTS["e2"], timeout=30_000)
    expect(page.locator("#recipe-method input")).to_have_value("moe (mixture of experts)")
    assert not errors, errors
