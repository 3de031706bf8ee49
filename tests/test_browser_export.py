"""Browser test of the Export tab (Debian's chromium through Playwright, on the fmnist demo): a
short DAM search from the Search tab, its recipe merged from the Merge tab, the checkpoint
exported as a zip and downloaded, unzipped elsewhere and replayed with `mergecore merge` to
identical tensors; then Push to the Hub, with `huggingface_hub.create_repo` / `upload_folder`
replaced (the app runs in this process; the Hub is never reached): first unreachable (one
line in the tab), then recording what was uploaded."""

from __future__ import annotations

import re
import time
from pathlib import Path

from _app_helpers import start_dam_in_page
from test_app_export import FakeHub, assert_identical, front_matter, unzip_and_replay

pytest_plugins = ("_app_helpers",)


def test_export_a_dam_merge_download_replay_and_push(fmnist_server, browser, tmp_path, monkeypatch):
    import huggingface_hub
    from playwright.sync_api import expect

    url, ctx = fmnist_server
    start = time.time()
    page = browser.new_page(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    expect(page.get_by_text("Compatible", exact=False).first).to_be_visible(timeout=30_000)

    # Search: a short DAM run, its recipe to the Recipe tab, merged from the Merge tab
    start_dam_in_page(page, {"steps": "3", "examples_per_task": "16"})
    expect(page.locator("#search-result")).to_contain_text("Trained", timeout=120_000)
    page.locator("#search-use").click()
    expect(page.get_by_role("tab", name="Recipe", selected=True)).to_be_visible(timeout=15_000)
    expect(page.locator(".cm-content").first).to_contain_text("merge_method: dam", timeout=15_000)
    page.get_by_role("tab", name="Merge").click()
    page.locator("#merge-btn").click()
    expect(page.locator("#merge-summary")).to_contain_text("Merged", timeout=60_000)
    merged = Path(re.search(r"written to (\S+)", page.locator("#merge-summary").inner_text()).group(1))
    assert (merged / "artifacts" / "dam_coefficients.safetensors").is_file()

    # Export: the zip, downloaded through the browser, unzipped elsewhere and replayed
    page.get_by_role("tab", name="Export").click()
    page.get_by_role("button", name="Prepare downloads").click()
    status = page.locator("#export-status")
    expect(status).to_contain_text("zipped (", timeout=30_000)
    expect(status).to_contain_text("models/base")
    with page.expect_download(timeout=30_000) as dl:
        page.get_by_role("button", name=re.compile(r"Download .*\.zip")).click()
    zip_path = tmp_path / dl.value.suggested_filename
    dl.value.save_as(zip_path)
    assert zip_path.suffix == ".zip" and zip_path.stem == merged.name
    # the status as rendered: "models/base ← /…/base" per local model
    listed = "\n".join(f"- `{ref}` ← `{where}`" for ref, where in
                       re.findall(r"(models/\S+) ← (\S+)", status.inner_text()))
    assert listed.count("models/") == 5, status.inner_text()
    assert_identical(merged, unzip_and_replay(zip_path, listed, tmp_path / "unzipped"))

    # Push: the Hub unreachable -- one line, no traceback; then the upload, recorded
    monkeypatch.setenv("HF_TOKEN", "hf_browser_test")
    offline = FakeHub(fail="create")
    monkeypatch.setattr(huggingface_hub, "create_repo", offline.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", offline.upload_folder)
    page.locator("#export-repo textarea").fill("me/browser-merge")
    page.locator("#export-push").click()
    push_status = page.locator("#export-push-status")
    expect(push_status).to_contain_text("could not reach the Hugging Face Hub (ConnectError); nothing was uploaded",
                                        timeout=20_000)
    assert "Traceback" not in page.locator("#export-push-log textarea").input_value()
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "create_repo", hub.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", hub.upload_folder)
    expect(page.locator("#export-push")).to_be_enabled()  # on again once the failed push ended
    page.locator("#export-push").click()
    expect(push_status).to_contain_text("Pushed", timeout=20_000)
    expect(page.locator("#export-push")).to_be_enabled()
    expect(page.locator("#export-push-log textarea")).to_have_value(re.compile("uploaded to"), timeout=5_000)
    (_, repo, created), (_, _, uploaded) = hub.calls
    assert repo == "me/browser-merge" and created["private"] is True and created["exist_ok"] is True
    files = uploaded["files"]
    assert files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert "artifacts/dam_coefficients.safetensors" in files and "mergecore_recipe.yml" in files
    assert front_matter(files["README.md"].decode())["tags"] == ["merge", "mergecore"]
    assert not errors, errors
    print(f"browser export test: {time.time() - start:.1f} s")
