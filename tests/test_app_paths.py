"""What the app reads: one confinement rule for typed paths (`app.paths`), errors that never show
a file's contents, and the YAML limits on imports and uploads.

The rule itself on plain folders (inside, outside, `..`, symlinks both ways, --allow-dir), then
the running app through `gradio_client` as tests/test_app.py drives it: a server file or a file
with a secret line typed as the tasks file of Evaluate or of a search, a model folder outside
the roots, a recipe naming one, an alias bomb pasted into the YAML import, an oversized upload;
and one case typed into the page in Chromium.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from _app_helpers import CHROMIUM_ARGS, chromium, client, playwright
from mergecore.errors import MergeError

pytest_plugins = ("_app_helpers",)

SECRET = "mc-secret-line-7f3a9c"
OUTSIDE = "outside the folders this app may read"

# 546 bytes in the report; this one is smaller and expands to 9**9 (387 million) items
ALIAS_BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}' if p else 'lol'] * 9)}]\n"
                     for p, a in zip(["", *"abcdefgh"], "abcdefghi")) + "merge_method: *i\nmodels: *i\n"

# files that are not tasks files, each with the secret where an old message quoted it
NOT_TASKS = {
    "a key": f"{SECRET}: 1\n",  # the engine listed unknown keys
    "an alias": f"x: *{SECRET}\n",  # the YAML parser names an undefined alias
    "text": f"{SECRET}\nmore text of the file\n",
    "a list": f"- {SECRET}\n- other\n",
    "a task list without tasks": f"- name: prod\n  password: {SECRET}\n",
}


def _passwd_lines() -> list[str]:
    try:
        return [ln.strip() for ln in Path("/etc/passwd").read_text().splitlines() if ln.strip()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# the rule


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f.yml").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "s.yml").write_text(SECRET)
    return root, outside


def test_confine_inside_outside_dotdot_and_symlinks(tree, tmp_path, monkeypatch):
    from app.paths import confine

    root, outside = tree
    inside = (root / "sub" / "f.yml").resolve()
    assert confine(root / "sub" / "f.yml", [root]) == inside
    assert confine(str(root), [root]) == root.resolve()
    assert confine(f"{root}/sub/../sub/f.yml", [root]) == inside  # `..` that stays inside
    assert confine(root / "new" / "not-yet.yml", [root]) == (root / "new" / "not-yet.yml").resolve()

    def refused(path, what="tasks file"):
        with pytest.raises(MergeError) as e:
            confine(path, [root], what)
        msg = str(e.value)
        assert OUTSIDE in msg and "start the app with --allow-dir DIR" in msg and "\n" not in msg
        assert msg.startswith(f"{what} ") and SECRET not in msg
        return msg

    assert str(outside / "s.yml") in refused(outside / "s.yml")
    refused(f"{root}/sub/../../outside/s.yml")  # `..` out of the root
    refused("/etc/passwd")
    (root / "escape").symlink_to(outside)  # a link inside that points outside
    refused(root / "escape" / "s.yml")
    refused(root / "escape")
    (tmp_path / "root2").mkdir()
    refused(tmp_path / "root2")  # a sibling sharing the root's name as a prefix is not inside
    (outside / "in").symlink_to(root / "sub")  # a link outside that points inside: where it leads counts
    assert confine(outside / "in" / "f.yml", [root]) == inside
    monkeypatch.chdir(root)  # relative paths are taken from the current directory, then checked
    assert confine("sub/f.yml", [root]) == inside
    refused("../outside/s.yml")
    # an allowed folder (--allow-dir) is a root like the others
    assert confine(outside / "s.yml", [root, outside]) == (outside / "s.yml").resolve()
    with pytest.raises(MergeError, match="give a tasks file"):
        confine("  ", [root], "tasks file")


def test_hub_ids_are_not_paths(tree, monkeypatch):
    from app.paths import local_model

    root, outside = tree
    monkeypatch.chdir(outside)
    assert local_model("nobody-here/no-such-model", [root]) is None  # goes to the Hub code as before
    with pytest.raises(MergeError, match=OUTSIDE):
        local_model(str(outside), [root])
    (outside / "org").mkdir()
    (outside / "org" / "name").mkdir()
    with pytest.raises(MergeError, match=OUTSIDE):  # an org/name that is a local folder is that folder
        local_model("org/name", [root])
    assert local_model(str(root / "sub"), [root]) == (root / "sub").resolve()


def test_context_roots_and_allow_dir(tmp_path, demo_family):
    from app.paths import hf_cache_dir
    from app.ui import make_context

    extra = tmp_path / "extra"
    extra.mkdir()
    ctx = make_context(tmp_path / "work", demo=demo_family, allowed_dirs=[str(extra)])
    roots = [Path(r).resolve() for r in ctx.read_roots()]
    assert (tmp_path / "work").resolve() in roots and extra.resolve() in roots and hf_cache_dir().resolve() in roots
    base = Path(demo_family.models["base"]).resolve()
    assert any(base == r or base.is_relative_to(r) for r in roots)  # the demo's models
    assert not any(Path("/etc").resolve().is_relative_to(r) for r in roots)
    with pytest.raises(MergeError, match="not a folder"):
        make_context(tmp_path / "work2", allowed_dirs=[tmp_path / "nope"])


def test_launch_has_allow_dir(tmp_path, capsys):
    import launch

    with pytest.raises(SystemExit):
        launch.main(["--help"])
    assert "--allow-dir DIR" in capsys.readouterr().out
    assert launch.main(["--no-demo", "--work-dir", str(tmp_path), "--allow-dir", str(tmp_path / "nope")]) == 2
    assert "--allow-dir" in capsys.readouterr().err


@pytest.mark.parametrize("kind", list(NOT_TASKS))
def test_a_file_that_is_no_tasks_file_is_named_not_shown(tmp_path, kind):
    from app.paths import tasks_file

    p = tmp_path / "notes.yml"
    p.write_text(NOT_TASKS[kind])
    with pytest.raises(MergeError) as e:
        tasks_file(str(p), [tmp_path])
    msg = str(e.value)
    assert str(p) in msg and "tasks file" in msg and SECRET not in msg and "\n" not in msg


def test_tasks_file_checks(tmp_path):
    from app.paths import tasks_file

    ok = tmp_path / "tasks.yml"
    ok.write_text("tasks:\n  - name: t\n    kind: lm\n    data: {path: t.jsonl}\n")
    assert tasks_file(str(ok), [tmp_path]) == ok.resolve()
    bad = tmp_path / "bad.yml"  # shaped like a tasks file: the engine's message says what is wrong
    bad.write_text("tasks:\n  - name: t\n    kind: nope\n    data: {path: t.jsonl}\n")
    with pytest.raises(MergeError, match="'kind' must be one of"):
        tasks_file(str(bad), [tmp_path])
    with pytest.raises(MergeError, match="not found"):
        tasks_file(str(tmp_path / "missing.yml"), [tmp_path])
    bomb = tmp_path / "bomb.yml"
    bomb.write_text(ALIAS_BOMB)
    t0 = time.time()
    with pytest.raises(MergeError, match="expands to more than"):
        tasks_file(str(bomb), [tmp_path])
    assert time.time() - t0 < 5


def test_uploads_over_the_limit_are_refused_unread(tmp_path, monkeypatch):
    from app.paths import read_upload
    from mergecore.yamlio import MAX_YAML_BYTES

    big = tmp_path / "big.yml"
    with open(big, "wb") as f:  # sparse: 11 MB on paper, nothing on disk
        f.truncate(MAX_YAML_BYTES + 1_000_000)

    def no_reading(self):
        raise AssertionError("read before the size check")

    monkeypatch.setattr(Path, "read_bytes", no_reading)
    with pytest.raises(MergeError, match="over the 10 MB limit"):
        read_upload(big, "recipe file")
    monkeypatch.undo()
    small = tmp_path / "r.yml"
    small.write_text("merge_method: ties\n")
    assert read_upload(small) == b"merge_method: ties\n"


# ---------------------------------------------------------------------------------------------
# the running app


def _text(out) -> str:
    return " ".join(str(o) for o in (out if isinstance(out, (list, tuple)) else [out]))


@pytest.fixture
def secret_outside(tmp_path):
    p = tmp_path / "secret.yml"  # pytest's tmp folder: not the app's work dir, demo dir or caches
    p.write_text(f"{SECRET}\nsecond line\n")
    return p


def test_client_evaluate_tasks_file_confined_and_never_echoed(app_server, secret_outside):
    url, ctx = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    dotdot = f"{ctx.workspace.root}/../{secret_outside.parent.name}/secret.yml"  # out of the work dir by `..`
    for path in ("/etc/passwd", str(secret_outside), dotdot):
        text = _text(c.predict(["base"], path, "", api_name="/evaluate"))
        assert OUTSIDE in text and "--allow-dir DIR" in text, text
        assert SECRET not in text and "second line" not in text
        assert not any(line in text for line in _passwd_lines()), text
    (ctx.workspace.root / "escape").symlink_to(secret_outside.parent, target_is_directory=True)
    text = _text(c.predict(["base"], str(ctx.workspace.root / "escape" / "secret.yml"), "", api_name="/evaluate"))
    assert OUTSIDE in text and SECRET not in text
    # inside the work dir but no tasks file: named, not shown; no evaluation is started
    for i, (kind, content) in enumerate(NOT_TASKS.items()):
        p = ctx.workspace.root / f"notes-{i}.yml"
        p.write_text(content)
        text = _text(c.predict(["base"], str(p), "", api_name="/evaluate"))
        assert str(p) in text and "tasks file" in text and "error" in text, (kind, text)
        assert SECRET not in text, (kind, text)
        assert "starting" not in text


def test_client_search_tasks_file_confined_and_never_echoed(app_server, secret_outside):
    url, ctx = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    key = "9" * 32
    inside = ctx.workspace.root / "search-notes.yml"
    inside.write_text(NOT_TASKS["a key"])
    for name in ("rmm", "dam", "evo"):
        for path, want in (("/etc/passwd", OUTSIDE), (str(secret_outside), OUTSIDE), (str(inside), str(inside))):
            out = c.predict(name=name, key=key, **{f"{name}_models": ["variant_a", "variant_b"], f"{name}_base": "base",
                                                  f"{name}_tasks": path}, api_name="/start_search")
            status = str(out[2])
            assert status.startswith("**Error:**") and want in status, (name, status)
            assert SECRET not in status and not any(line in status for line in _passwd_lines())
    assert ctx.jobs.jobs(f"browser-{key}", kind="search") == []  # nothing was started


def test_client_model_folders_and_recipe_references_confined(app_server, tmp_path):
    url, ctx = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    out = c.predict(str(tmp_path), api_name="/add_model")
    assert OUTSIDE in str(out[-3]) and str(tmp_path) in str(out[-3])
    out = c.predict("/etc", api_name="/add_model")
    assert OUTSIDE in str(out[-3])
    recipe = f"merge_method: linear\nmodels:\n  - model: {tmp_path}\n    parameters: {{weight: 1.0}}\n"
    out = c.predict(recipe, api_name="/import_yaml")
    assert out[-1].startswith("**Error:**") and OUTSIDE in out[-1]
    base = ctx.demo.models["base"]
    recipe = (f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1.0}}\n"
              f"artifacts: {{coefficients: /etc/passwd}}\n")
    out = c.predict(recipe, api_name="/import_yaml")
    assert out[-1].startswith("**Error:**") and OUTSIDE in out[-1] and "artifact" in out[-1]


def test_client_alias_bomb_import_is_refused_quickly_and_small(app_server):
    url, _ = app_server
    c = client(url)
    c.predict(api_name="/load_demo")
    tracemalloc.start()  # traces every thread, the app's handler included
    try:
        t0 = time.time()
        out = c.predict(ALIAS_BOMB, api_name="/import_yaml")
        seconds = time.time() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out[-1].startswith("**Error:**") and "expands to more than" in out[-1] and "\n" not in out[-1]
    assert seconds < 10 and peak < 200 * 1024**2, (seconds, peak)
    # the typed value of one parameter has the same limits
    from app.values import text_to_value

    field = {"label": "weight", "type": "float", "range": None, "range_text": ""}
    with pytest.raises(MergeError, match="cannot read"):
        text_to_value(field, ALIAS_BOMB)


def test_client_uploads_are_capped(app_server):
    import httpx

    from app.ui import launch_kwargs
    from mergecore.yamlio import MAX_YAML_BYTES

    url, ctx = app_server
    assert launch_kwargs(ctx)["max_file_size"] == MAX_YAML_BYTES
    r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.yml", b"a: 1\n" * (MAX_YAML_BYTES // 5 + 10))},
                   timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    r = httpx.post(f"{url}gradio_api/upload", files={"files": ("small.yml", b"a: 1\n")}, timeout=60)
    assert r.status_code == 200


# ---------------------------------------------------------------------------------------------
# in a real browser


def test_browser_evaluate_tasks_field_refuses_a_server_file(app_server, secret_outside):
    sync_playwright = playwright()
    from playwright.sync_api import expect

    url, _ = app_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            # the page has opened its session (the demo) before the field is typed into
            expect(page.get_by_text("Compatible", exact=False).first).to_be_visible(timeout=30_000)
            page.get_by_role("tab", name="Compare").click()
            box = page.get_by_label("Tasks YAML (mergecore.eval)")
            box.fill(str(secret_outside))
            page.get_by_role("button", name="Evaluate").click()
            failed = page.locator(".mc-progress[data-status='failed']")
            expect(failed).to_contain_text(OUTSIDE, timeout=30_000)
            assert SECRET not in page.content()
        finally:
            browser.close()
