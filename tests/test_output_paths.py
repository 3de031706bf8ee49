"""Where a run may write: the output-path policy (never delete what mergecore did not write) and
the temporary folders (owner record, signal cleanup, stale-folder removal), all through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergecore.cli import main
from mergecore.errors import Cancelled, MergeError
from mergecore.io.outdir import (
    MARKER,
    OWNER,
    check_output_dir,
    claim_output_dir,
    install_signal_handlers,
    read_marker,
    remove_live_temp_dirs,
    signals_deferred,
    write_marker,
)
from mergecore.io.writer import ShardedWriter

REPO = Path(__file__).resolve().parents[1]


def _recipe(models: list[str], weights: list[float] | None = None) -> str:
    weights = weights or [0.5] * len(models)
    return yaml.safe_dump({"merge_method": "linear",
                           "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)]},
                          sort_keys=False)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hidden(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _merge(capsys, *args: object) -> tuple[int, list[str], str]:
    """`mergecore merge ARGS --quiet`: exit status, stderr lines, stdout."""
    capsys.readouterr()
    rc = main(["merge", *map(str, args), "--quiet"])
    cap = capsys.readouterr()
    return rc, cap.err.splitlines(), cap.out


def _refused(capsys, *args: object) -> str:
    rc, err, out = _merge(capsys, *args)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert out == ""
    return err[0]


@pytest.fixture
def project(llama_family, tmp_path, monkeypatch) -> Path:
    """A user's working folder: two models, a recipe naming them relatively, an unrelated file;
    the current directory is the project."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(llama_family["a"], proj / "model-a")
    shutil.copytree(llama_family["b"], proj / "model-b")
    (proj / "r.yml").write_text(_recipe(["model-a", "model-b"]))
    (proj / "notes.txt").write_text("my notes, not a model\n")
    monkeypatch.chdir(proj)
    return proj


# ------------------------------------------------------------------------------ refused outputs


@pytest.mark.parametrize("target", [".", "..", "./", "model-a/.."])
def test_current_directory_and_its_ancestors_are_refused(project, capsys, target):
    before = _snapshot(project.parent)
    msg = _refused(capsys, "r.yml", target)
    assert "current directory" in msg and "choose a new folder" in msg
    assert _snapshot(project.parent) == before  # every file still there, byte for byte


def test_a_symlink_to_the_current_directory_is_refused(project, capsys, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(project)
    before = _snapshot(project)
    assert "current directory" in _refused(capsys, "r.yml", link)
    assert _snapshot(project) == before


@pytest.mark.parametrize("target", ["model-a", "model-a/sub", "model-a/sub/deeper"])
def test_a_source_model_folder_or_inside_one_is_refused(project, capsys, target):
    before = _snapshot(project)
    msg = _refused(capsys, "r.yml", target)
    assert "source model" in msg or "not written by mergecore" in msg
    if target != "model-a":
        assert "inside the source model folder" in msg and str(project / "model-a") in msg
    assert _snapshot(project) == before
    assert not (project / "model-a" / "sub").exists()


def test_an_ancestor_of_a_source_model_is_refused(llama_family, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(llama_family["a"], models / "a")
    shutil.copytree(llama_family["b"], models / "b")
    r = tmp_path / "recipes" / "r.yml"
    r.parent.mkdir()
    r.write_text(_recipe([str(models / "a"), str(models / "b")]))
    before = _snapshot(models)
    _refused(capsys, r, models)
    assert _snapshot(models) == before
    # even when an earlier merge marked that folder and --overwrite is given
    write_marker(models, "merge")
    before = _snapshot(models)
    msg = _refused(capsys, r, models, "--overwrite")
    assert "contains the source model folder" in msg
    assert _snapshot(models) == before


def test_a_merged_model_cannot_be_its_own_output(llama_family, tmp_path, capsys):
    """A previous merge used as a source: it is marked, --overwrite is given, still refused."""
    first = tmp_path / "first"
    r1 = tmp_path / "r1.yml"
    r1.write_text(_recipe([str(llama_family["a"]), str(llama_family["b"])]))
    assert _merge(capsys, r1, first)[0] == 0
    r2 = tmp_path / "r2.yml"
    r2.write_text(_recipe([str(first), str(llama_family["a"])]))
    before = _snapshot(first)
    msg = _refused(capsys, r2, first, "--overwrite")
    assert "is the folder of a source model" in msg
    assert _snapshot(first) == before and _hidden(tmp_path, "first") == []


def test_the_recipes_folder_is_refused(llama_family, tmp_path, capsys):
    """Replaying the recipe a merge wrote into its own folder must not replace that folder."""
    out = tmp_path / "out"
    r = tmp_path / "r.yml"
    r.write_text(_recipe([str(llama_family["a"]), str(llama_family["b"])]))
    assert _merge(capsys, r, out)[0] == 0
    before = _snapshot(out)
    msg = _refused(capsys, out / "mergecore_recipe.yml", out, "--overwrite")
    assert "the recipe's folder" in msg
    assert _snapshot(out) == before
    # a new folder inside the recipe's folder is fine
    rc, err, _ = _merge(capsys, out / "mergecore_recipe.yml", out / "again")
    assert rc == 0, err
    assert (out / "again" / "model.safetensors").is_file()


def test_a_non_empty_foreign_folder_is_refused(llama_family, tmp_path, capsys):
    r = tmp_path / "r.yml"
    r.write_text(_recipe([str(llama_family["a"]), str(llama_family["b"])]))
    folder = tmp_path / "photos"
    (folder / "2023").mkdir(parents=True)
    (folder / "2023" / "beach.jpg").write_bytes(b"\xff\xd8 jpeg")
    (folder / "list.txt").write_text("x")
    before = _snapshot(folder)
    for extra in ((), ("--overwrite",)):
        msg = _refused(capsys, r, folder, *extra)
        assert msg == f"error: output folder {folder} is not empty and was not written by mergecore; choose a new folder"
        assert _snapshot(folder) == before and _hidden(tmp_path, "photos") == []


def test_a_path_that_is_a_file_is_refused(llama_family, tmp_path, capsys):
    r = tmp_path / "r.yml"
    r.write_text(_recipe([str(llama_family["a"]), str(llama_family["b"])]))
    f = tmp_path / "out.bin"
    f.write_bytes(b"data")
    assert "exists and is not a folder" in _refused(capsys, r, f)
    assert f.read_bytes() == b"data"


def test_a_folder_marked_by_another_kind_of_run_is_refused(llama_family, tmp_path, capsys):
    r = tmp_path / "r.yml"
    r.write_text(_recipe([str(llama_family["a"]), str(llama_family["b"])]))
    search = tmp_path / "search"
    search.mkdir()
    write_marker(search, "rmm")
    (search / "rmm_log.jsonl").write_text("{}\n")
    before = _snapshot(search)
    msg = _refused(capsys, r, search, "--overwrite")
    assert "holds a search (rmm), not a merge" in msg
    assert _snapshot(search) == before


# ------------------------------------------------------------------------------ accepted outputs


def test_a_new_path_and_an_empty_folder_work(llama_family, tmp_path, capsys):
    r = tmp_path / "r.yml"
    r.write_text(_recipe([str(llama_family["a"]), str(llama_family["b"])]))
    for out in (tmp_path / "new" / "nested" / "out", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        rc, err, stdout = _merge(capsys, r, out)
        assert rc == 0, err
        assert "wrote" in stdout and err == []
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
        assert read_marker(out) == "merge"
        marker = json.loads((out / MARKER).read_text())
        assert set(marker) == {"kind", "created", "mergecore"}
        assert not (out / OWNER).exists()  # the owner record stays with the temporary folder
        assert _hidden(out.parent, out.name) == []


def test_a_previous_merge_is_replaced_only_with_overwrite(llama_family, tmp_path, capsys):
    a, b = llama_family["a"], llama_family["b"]
    r1, r2 = tmp_path / "r1.yml", tmp_path / "r2.yml"
    r1.write_text(_recipe([str(a), str(b)], [1.0, 0.0]))
    r2.write_text(_recipe([str(a), str(b)], [0.0, 1.0]))
    out = tmp_path / "out"
    assert _merge(capsys, r1, out)[0] == 0
    first = _snapshot(out)
    msg = _refused(capsys, r2, out)
    assert msg == f"error: output folder {out} already holds a merge; pass --overwrite to replace it"
    assert _snapshot(out) == first
    rc, err, _ = _merge(capsys, r2, out, "--overwrite")
    assert rc == 0, err
    got, want = load_file(out / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert read_marker(out) == "merge"
    assert _hidden(tmp_path, "out") == []  # the previous output was removed, not left aside


def test_dry_run_needs_no_output_check(project, capsys):
    capsys.readouterr()
    assert main(["merge", "r.yml", ".", "--dry-run"]) == 0
    assert "model-a" in capsys.readouterr().out


# ------------------------------------------------------------------------------ searches


def _search_configs(root: Path, a: Path, b: Path) -> dict[str, Path]:
    (root / "tasks.yml").write_text("tasks: []\n")
    cfgs = {
        "rmm": {"base_model": str(a), "models": [str(b)], "tasks": "tasks.yml"},
        "dam": {"base_model": str(a), "models": [str(b)], "train_tasks": "tasks.yml"},
        "evo": {"method": "linear", "models": [str(a), str(b)], "parameters": {"weight": {"min": 0.0, "max": 1.0}},
                "tasks": "tasks.yml"},
    }
    out = {}
    for kind, cfg in cfgs.items():
        out[kind] = root / f"{kind}.yml"
        out[kind].write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("kind", ["rmm", "dam", "evo"])
def test_searches_refuse_foreign_model_and_other_kinds_folders(llama_family, tmp_path, capsys, kind):
    cfg = _search_configs(tmp_path, llama_family["a"], llama_family["b"])[kind]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    write_marker(other, "dam" if kind != "dam" else "rmm")
    (other / "result.json").write_text("{}")
    cases = {foreign: "not empty and was not written by mergecore",
             other: "a search resumes only in a folder of its own kind",
             llama_family["b"] / "search": "inside the source model folder"}
    for folder, expected in cases.items():
        before = _snapshot(tmp_path)
        capsys.readouterr()
        rc = main(["search", kind, str(cfg), str(folder), "--quiet"])
        err = capsys.readouterr().err.splitlines()
        assert rc == 2 and len(err) == 1 and expected in err[0], err
        assert _snapshot(tmp_path) == before
    assert not (llama_family["b"] / "search").exists()


def test_search_folders_are_claimed_and_resumed_by_their_own_kind(tmp_path):
    out = tmp_path / "runs" / "rmm-1"
    assert claim_output_dir(out, kind="rmm") == out
    assert read_marker(out) == "rmm"
    (out / "rmm_log.jsonl").write_text("{}\n")
    created = (out / MARKER).read_text()
    assert claim_output_dir(out, kind="rmm") == out  # a resume: accepted, marker kept as it was
    assert (out / MARKER).read_text() == created
    with pytest.raises(MergeError, match=r"holds a search \(rmm\), not a search \(evo\)"):
        claim_output_dir(out, kind="evo")
    with pytest.raises(MergeError, match="holds a search \\(rmm\\), not a merge"):
        check_output_dir(out, kind="merge", overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_output_dir(empty, kind="dam")
    assert read_marker(empty) == "dam"


def test_the_app_marks_the_search_folders_it_creates(tmp_path):
    from app.files import Workspace

    ws = Workspace(tmp_path / "work")
    out = ws.search_dir("owner", "evo")
    assert read_marker(out) == "evo"
    assert claim_output_dir(out, kind="evo") == out.resolve()
    merge_out = ws.merge_dir("owner", "m")
    assert not merge_out.exists()  # the writer creates it, with its marker


def test_policy_protects_folders_and_their_ancestors_not_their_insides(tmp_path):
    keep = tmp_path / "a" / "recipes"
    keep.mkdir(parents=True)
    for target in (keep, tmp_path / "a"):
        with pytest.raises(MergeError, match="recipe's folder"):
            check_output_dir(target, kind="merge", protect=[keep])
    assert check_output_dir(keep / "out", kind="merge", protect=[keep]) == keep / "out"
    link = tmp_path / "alias"
    link.symlink_to(keep)
    with pytest.raises(MergeError, match="is the recipe's folder"):
        check_output_dir(link, kind="merge", protect=[keep])


# ------------------------------------------------------------------------------ temporary folders


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp(parent: Path, name: str, owner: dict | None) -> Path:
    d = parent / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0" * 1024)
    if owner is not None:
        (d / OWNER).write_text(json.dumps(owner))
    return d


def test_stale_temp_folders_of_dead_runs_are_removed_with_a_warning(llama_family, tmp_path, capsys):
    r = tmp_path / "r.yml"
    r.write_text(_recipe([str(llama_family["a"]), str(llama_family["b"])]))
    host, dead, now = socket.gethostname(), _dead_pid(), time.time()
    stale_tmp = _temp(tmp_path, ".merged.tmp-0123abcd", {"pid": dead, "host": host, "started": now})
    stale_old = _temp(tmp_path, ".other.old-4567cdef", {"pid": dead, "host": host, "started": now})
    live = _temp(tmp_path, ".merged.tmp-89ab0123", {"pid": os.getpid(), "host": host, "started": now})
    no_owner = _temp(tmp_path, ".merged.tmp-cdef4567", None)
    elsewhere = _temp(tmp_path, ".merged.tmp-00001111", {"pid": dead, "host": host + "-elsewhere", "started": now})
    not_ours = _temp(tmp_path, ".merged.tmp-zz", {"pid": dead, "host": host, "started": now})  # not our naming
    rc, err, _ = _merge(capsys, r, tmp_path / "merged")
    assert rc == 0, err
    assert sorted(err) == sorted(
        f"warning: removed stale temporary folder {p} (its run, pid {dead}, died)" for p in (stale_tmp, stale_old))
    assert not stale_tmp.exists() and not stale_old.exists()
    for kept in (live, no_owner, elsewhere, not_ours):
        assert (kept / "model.safetensors").is_file(), kept
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_api_merges_report_removed_stale_folders_in_their_warnings(llama_family, tmp_path):
    """The app and the searches call the engine, not the CLI: the writer removes the stale
    folder and the result carries the warning."""
    from mergecore.merging import merge
    from mergecore.recipe import parse_recipe

    dead = _dead_pid()
    stale = _temp(tmp_path, ".m.tmp-a1b2c3d4", {"pid": dead, "host": socket.gethostname(), "started": time.time()})
    res = merge(parse_recipe(_recipe([str(llama_family["a"]), str(llama_family["b"])])), tmp_path / "m")
    assert f"removed stale temporary folder {stale} (its run, pid {dead}, died)" in res.warnings
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_signal_handler_cleanup_stops_a_merge_in_a_worker_thread(tmp_path):
    """The app merges in threads: the main thread's handler removes the registered temporary
    folder, and the writer then refuses to recreate it or to rename anything into place."""
    out = tmp_path / "out"
    w = ShardedWriter(out, [("x", torch.float32, (2,)), ("y", torch.float32, (2,))])
    owner = json.loads((w.tmp_dir / OWNER).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    w.write("x", torch.ones(2))
    assert w.tmp_dir in remove_live_temp_dirs()
    assert not w.tmp_dir.exists()
    with pytest.raises(Cancelled):
        w.add_file("tokenizer/vocab.json", "{}")
    w.write("y", torch.ones(2))  # a job already running finishes into the unlinked file
    with pytest.raises(Cancelled):
        w.finalize()
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_the_final_renames_waits_for_them(tmp_path, monkeypatch):
    """Ctrl-C between 'old output renamed away' and 'new output renamed in' would lose both:
    the handler holds the signal until the renames are done, then cleans up and interrupts."""
    from mergecore.io import outdir

    install_signal_handlers()
    # the handler chains to whatever SIGINT did when handlers were first installed in this
    # process (an earlier test's server may have set its own): here it is Python's default
    monkeypatch.setitem(outdir._PREVIOUS, signal.SIGINT, signal.default_int_handler)
    before = signal.signal(signal.SIGINT, outdir._on_signal)
    monkeypatch.setattr(outdir, "_DEFER", 0)
    monkeypatch.setattr(outdir, "_PENDING", [])
    try:
        _renames_wait_for_a_signal(tmp_path)
    finally:
        signal.signal(signal.SIGINT, before)


def _renames_wait_for_a_signal(tmp_path):
    w = ShardedWriter(tmp_path / "o", [("x", torch.float32, (2,))])
    w.write("x", torch.ones(2))
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # an undeferred handler would have run by now
            assert w.tmp_dir.exists()
            reached = True
    assert reached and not w.tmp_dir.exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT", "SIGKILL"])
def test_a_signal_mid_merge_leaves_nothing(llama_family, tmp_path, capsys, signame):
    """A real `python -m mergecore.cli merge` process, slowed down per tensor (sitecustomize), gets
    a signal once its temporary folder holds data. SIGTERM/SIGHUP/SIGINT: it removes the folder
    itself (exit 128+n; SIGINT is a cancel, exit 2). SIGKILL: the folder stays, owned by a dead
    pid, and the next merge in that folder removes it with a warning."""
    signum = getattr(signal, signame)
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import time\n"
        "import mergecore.executor as _ex\n"
        "_compute = _ex.compute_tensor\n"
        "def _slow(*a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return _compute(*a, **k)\n"
        "_ex.compute_tensor = _slow\n")
    work = tmp_path / "work"
    work.mkdir()
    r = work / "r.yml"
    r.write_text(_recipe([str(llama_family["a"]), str(llama_family["b"])]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(slow), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "mergecore.cli", "merge", str(r), str(work / "merged"),
                             "--threads", "1", "--quiet"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        temps: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            temps = [p for p in work.glob(".merged.tmp-*") if (p / "model.safetensors").is_file()]
            if temps:
                break
            time.sleep(0.05)
        assert temps, proc.communicate(timeout=60)
        owner = json.loads((temps[0] / OWNER).read_text())
        assert owner["pid"] == proc.pid
        time.sleep(0.5)  # a few tensors in
        assert proc.poll() is None
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if signame == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        assert [p.name for p in work.glob(".merged.tmp-*")] == [temps[0].name]
        rc, err, _ = _merge(capsys, r, work / "merged")
        assert rc == 0, err
        assert err == [f"warning: removed stale temporary folder {temps[0]} (its run, pid {proc.pid}, died)"]
        assert sorted(p.name for p in work.iterdir()) == ["merged", "r.yml"]
        return
    if signame == "SIGINT":
        assert proc.returncode == 2, stderr.decode()
        assert stderr.decode().strip().splitlines() == ["error: merge cancelled; nothing was written"]
    else:
        assert proc.returncode == 128 + signum, stderr.decode()
    assert sorted(p.name for p in work.iterdir()) == ["r.yml"]
