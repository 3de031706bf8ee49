"""The Export tab: an exported DAM result replays from the unzipped folder with `mergecore merge`
to identical tensors (its artifact inside, local models relative to the recipe, no path of this
machine), the model card carries the session's scores, and Push to the Hub (create_repo +
upload_folder, monkeypatched: the Hub is never reached) uploads that same folder, or says in one
line why it did not."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from _app_helpers import client, poll, poll_merge, poll_search, replay_scores, search_args
from _merge_helpers import load_weights
from mergecore.cli import main

pytest_plugins = ("_app_helpers",)

KEY_X = "7" * 32  # unique among the app tests: the servers are shared per test session


def dam_args(fam, key):
    return search_args("dam", fam, key, steps=3, batch_size=8, examples_per_task=16, eval_every=3, eval_subset=0.5,
                       lr=0.02, lambda_l2=0.01, seed=0)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:80]
    return yaml.safe_load(card[4:].split("\n---\n", 1)[0])


def unzip_and_replay(zip_path: Path, status: str, where: Path) -> Path:
    """Unzip the export into `where`, put the models where the tab's status says, replay the
    recipe with `mergecore merge`; the replayed folder."""
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(where)
    (folder,) = [p for p in where.iterdir() if p.is_dir()]
    for ref, original in re.findall(r"- `(models/[^`]+)` ← `([^`]+)`", status):
        (folder / ref).parent.mkdir(exist_ok=True)
        (folder / ref).symlink_to(original)
    out = where.parent / f"{where.name}-replayed"
    assert main(["merge", str(folder / "mergecore_recipe.yml"), str(out), "-q"]) == 0
    return out


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert set(wa) == set(wb) and wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def dam_merges(fmnist_server, fmnist_demo):
    """A client session with two merges of one short DAM search: its replay (scored) and the
    recipe taken to the Recipe tab and merged there."""
    url, ctx = fmnist_server
    c = client(url)
    c.predict(api_name="/load_demo")
    assert "Started **DAM" in c.predict(**dam_args(fmnist_demo, KEY_X), api_name="/start_search")[2]
    assert poll_search(c, KEY_X)[-1]["status"] == "done"
    scores, out = replay_scores(c, KEY_X, "dam")  # merged and scored: 'dam-best'
    assert "Loaded the best dam recipe" in str(c.predict(KEY_X, api_name="/use_search_recipe")[-1])
    c.predict(api_name="/merge")
    summary = poll_merge(c)[2]
    assert "Merged" in summary, summary
    merged = Path(re.search(r"written to `([^`]+)`", summary).group(1))
    return c, ctx, merged, scores


def test_exported_dam_merge_replays_to_identical_tensors(dam_merges, fmnist_demo, tmp_path):
    c, ctx, merged, _ = dam_merges
    status, recipe_btn, zip_btn = c.predict(merged.name, api_name="/export")
    assert "zipped (" in status and "artifacts are inside" in status, status
    z = Path(zip_btn["value"]["path"] if isinstance(zip_btn["value"], dict) else zip_btn["value"])
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
        text = zf.read(f"{z.stem}/mergecore_recipe.yml").decode()
        card = zf.read(f"{z.stem}/README.md").decode()
    assert f"{z.stem}/artifacts/dam_coefficients.safetensors" in names
    assert not any(n.endswith(".mergecore-output.json") for n in names)
    # no path of this machine: local models relative to the recipe, the artifact beside it
    assert str(ctx.workspace.root) not in text and str(Path(fmnist_demo.models["base"]).parent) not in text
    data = yaml.safe_load(text)
    assert data["artifacts"] == {"coefficients": "artifacts/dam_coefficients.safetensors"}
    assert data["base_model"] == "models/base" and all(m["model"].startswith("models/") for m in data["models"])
    meta = front_matter(card)
    assert meta == {"base_model": "base", "library_name": "transformers", "tags": ["merge", "mergecore"]}
    assert "merge_method: dam" in card and "## Replay" in card and "## Evaluation" not in card
    recipe_file = Path(recipe_btn["value"]["path"] if isinstance(recipe_btn["value"], dict) else recipe_btn["value"])
    assert recipe_file.read_text() == text

    replayed = unzip_and_replay(z, status, tmp_path / "unzipped")
    assert_identical(merged, replayed)


def test_the_card_of_an_evaluated_merge_has_its_scores(dam_merges, tmp_path):
    c, ctx, _, scores = dam_merges
    status, _, zip_btn = c.predict("dam-best", api_name="/export")
    assert "zipped (" in status, status
    z = Path(zip_btn["value"]["path"] if isinstance(zip_btn["value"], dict) else zip_btn["value"])
    with zipfile.ZipFile(z) as zf:
        card = zf.read(f"{z.stem}/README.md").decode()
    assert "## Evaluation" in card
    row = next(r for r in scores["data"] if r[0] == "dam-best")
    assert f"| dam-best | {row[1]:.4f} |" in card, card
    # this client's 'dam-best' (other test modules' sessions on the shared server merge one too)
    merges = [j for j in ctx.jobs._jobs.values() if j.kind == "merge" and j.result is not None]
    owner = next(j.owner for j in merges if Path(j.result.out_dir) == dam_merges[2])
    job = next(j for j in merges if j.owner == owner and j.meta.get("name") == "dam-best")
    merged = Path(job.result.out_dir)
    assert_identical(merged, unzip_and_replay(z, status, tmp_path / "best"))


class FakeHub:
    """create_repo / upload_folder recording their calls (and what the folder held then)."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.fail == "create":
            import httpx

            raise httpx.ConnectError("[Errno -2] Name or service not known")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", kw["repo_id"], {**kw, "files": files}))
        if self.fail == "upload":
            raise ConnectionError("network is unreachable")
        return type("CommitInfo", (), {"oid": "0123456789abcdef"})()


def push(c, name, repo, private=True):
    out = c.predict(name, repo, private, api_name="/push_hub")
    if not out[0].startswith("Pushing"):
        return out[0], ""
    out = poll(lambda: c.predict(api_name="/poll_push"), lambda o: o[0] and not str(o[0]).startswith("Pushing"),
               30, 0.1, "push")
    return out[0], out[1]


def test_push_to_the_hub_uploads_the_export(dam_merges, monkeypatch):
    import huggingface_hub

    c, ctx, merged, _ = dam_merges
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "create_repo", hub.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", hub.upload_folder)

    # no token: one line saying how to log in; nothing called
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    status, _ = push(c, merged.name, "me/my-merge")
    assert "no Hugging Face token" in status and "hf auth login" in status and "\n" not in status and not hub.calls
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    for bad in ("my-merge", "me/my merge", "me/a/b", "-me/x", "me/x--y", ""):
        status, _ = push(c, merged.name, bad)
        assert status.startswith("**Error:**") and ("org/name" in status) and "\n" not in status, (bad, status)
    assert not hub.calls

    status, log = push(c, merged.name, "me/my-merge", private=True)
    assert "Pushed" in status and "https://huggingface.co/me/my-merge" in status, status
    assert "uploading" in log and "uploaded to" in log
    (_, repo, kw), (_, repo2, up) = hub.calls
    assert repo == repo2 == "me/my-merge"
    assert kw["private"] is True and kw["exist_ok"] is True and kw["token"] == "hf_test_token"
    files = up["files"]
    assert {"config.json", "model.safetensors", "README.md", "mergecore_recipe.yml",
            "artifacts/dam_coefficients.safetensors"} <= set(files)
    assert not any(f.startswith(".") for f in files)
    assert files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    recipe = yaml.safe_load(files["mergecore_recipe.yml"])
    assert recipe["base_model"] == "models/base" and recipe["artifacts"]["coefficients"].startswith("artifacts/")
    card = files["README.md"].decode()
    # the Hub refuses a base_model that is not a Hub model: the demo's base is local, so none is named
    assert front_matter(card) == {"library_name": "transformers", "tags": ["merge", "mergecore"]}
    assert not Path(up["folder_path"]).exists()  # the staged copy is removed afterwards


@pytest.mark.parametrize("fail, expected", [
    ("create", "could not reach the Hugging Face Hub (ConnectError); nothing was uploaded"),
    ("upload", "could not reach the Hugging Face Hub (ConnectionError); the repository exists but nothing was "
               "uploaded"),
])
def test_push_without_a_network_says_so_in_one_line(dam_merges, monkeypatch, fail, expected):
    import huggingface_hub

    c, _, merged, _ = dam_merges
    hub = FakeHub(fail=fail)
    monkeypatch.setattr(huggingface_hub, "create_repo", hub.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", hub.upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    status, log = push(c, merged.name, "me/offline", private=False)
    assert status == f"**Error:** {expected}", status
    assert "Traceback" not in log and hub.calls[0][2]["private"] is False


def test_repo_ids_and_hub_errors():
    from app.hub import check_repo_id, hub_error

    assert check_repo_id(" me/my-merge ") == "me/my-merge" and check_repo_id("Org_1/model.v2") == "Org_1/model.v2"
    err = type("HTTPError", (Exception,), {})("401 Unauthorized")
    err.response = type("R", (), {"status_code": 401})()
    line = hub_error(err)
    assert "refused the token (401" in line and "hf auth login" in line and "\n" not in line


def test_zip_and_staged_folder_replace_and_add_files(tmp_path, model_factory):
    import shutil

    from app.files import Workspace
    from mergecore.io.outdir import write_marker

    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_factory("llama", 0), ckpt)
    write_marker(ckpt, "merge")
    extra = tmp_path / "c.safetensors"
    extra.write_bytes(b"x" * 10)
    ws = Workspace(tmp_path / "work")
    z = ws.zip_checkpoint(ckpt, "tiny", replace={"README.md": "card"}, extra={"artifacts/c.safetensors": extra})
    with zipfile.ZipFile(z) as zf:
        assert zf.read("tiny/README.md") == b"card" and zf.read("tiny/artifacts/c.safetensors") == b"x" * 10
        assert "tiny/config.json" in zf.namelist() and "tiny/.mergecore-output.json" not in zf.namelist()
    staged = ws.stage_checkpoint(ckpt, "tiny", replace={"README.md": "card"}, extra={"artifacts/c.safetensors": extra})
    assert (staged / "README.md").read_text() == "card" and (staged / "artifacts" / "c.safetensors").is_file()
    assert (staged / "model.safetensors").stat().st_ino == (ckpt / "model.safetensors").stat().st_ino  # linked
    assert ws.owns(staged) and ws.exports not in staged.parents  # not served
    ws.remove_staged(staged)
    assert not staged.parent.exists() and ckpt.is_dir()
