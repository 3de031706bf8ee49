"""Hostile and careless text through the CLI: oversized and alias-bomb YAML, non-UTF-8 files,
absurd --threads / --shard-size values, OS errors and bugs. Every one ends in exactly one
`error:` line and exit status 2, quickly, without the process growing; and recipes that
mergekit runs (parameters a method does not use) run here too, with a warning."""

from __future__ import annotations

import errno
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mergecore.cli import main, run_command
from mergecore.errors import MergeError
from mergecore.threads import MAX_THREADS, check_threads, thread_cap
from mergecore.yamlio import MAX_YAML_BYTES

# 9 levels of 9 aliases: 546 bytes of YAML, 9**9 (387 million) strings once expanded
BOMB = "[" + ", ".join(["&a0 [" + ", ".join(['"lol"'] * 9) + "]"]
                       + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]) + "]"


def _cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    """Run `mergecore ARGV`; return the status, the stderr lines and stdout."""
    capsys.readouterr()
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.err.splitlines(), captured.out


def _one_error(capsys, *argv: str) -> str:
    rc, err, out = _cli(capsys, *argv)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert len(err[0]) < 800
    return err[0]


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")]


def _write(tmp_path: Path, text: str | bytes, name: str = "recipe.yml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


# ------------------------------------------------------------------------------ YAML limits


def test_recipe_over_the_size_limit_is_refused_before_parsing(tmp_path, capsys, monkeypatch):
    import mergecore.yamlio as yamlio

    def no_parsing(*a, **k):
        raise AssertionError("the YAML parser ran on an oversized file")

    monkeypatch.setattr(yamlio.yaml, "SafeLoader", no_parsing)
    body = "merge_method: linear\nmodels: [{model: a}]\n"
    r = _write(tmp_path, body + "#" * (MAX_YAML_BYTES + 1 - len(body)) + "\n")
    msg = _one_error(capsys, "merge", str(r), str(tmp_path / "out"))
    assert "over the 10 MB limit" in msg and str(r) in msg
    assert _leftovers(tmp_path / "out") == []


def test_alias_bomb_recipe_is_bounded_in_time_and_memory(tmp_path, capsys):
    text = f"merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: {BOMB}\n"
    assert len(text.encode()) < 700
    r = _write(tmp_path, text)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        msg = _one_error(capsys, "merge", str(r), str(tmp_path / "out"))
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "expands to more than" in msg and "aliases" in msg
    assert seconds < 2.0
    assert peak < 200 * 2**20


def test_alias_bomb_in_tasks_and_search_configs(tmp_path):
    from mergecore.eval.tasks import load_tasks, parse_tasks
    from mergecore.search.config import load_config
    from mergecore.search.rmm.run import RMMConfig

    with pytest.raises(MergeError, match="expands to more than"):
        parse_tasks(f"tasks:\n  - name: x\n    classes: {BOMB}\n")
    with pytest.raises(MergeError, match="expands to more than"):
        load_tasks(_write(tmp_path, f"- {{name: x, data: {BOMB}}}\n", "tasks.yml"))
    with pytest.raises(MergeError, match="expands to more than"):
        load_config(_write(tmp_path, f"models: {BOMB}\n", "search.yml"), RMMConfig)


def test_recursive_alias(tmp_path, capsys):
    r = _write(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: &w [1, *w]\n")
    assert "contains itself" in _one_error(capsys, "merge", str(r), str(tmp_path / "out"))


@pytest.mark.parametrize("depth, expected", [(100, "nested more than"), (20000, "nested")])
def test_deep_nesting(tmp_path, capsys, depth, expected):
    r = _write(tmp_path, "merge_method: linear\nmodels: [{model: a}]\nparameters: {weight: "
               + "[" * depth + "1" + "]" * depth + "}\n")
    assert expected in _one_error(capsys, "merge", str(r), str(tmp_path / "out"))


def test_non_utf8_recipe_tasks_and_search_config(tmp_path, capsys):
    from mergecore.eval.tasks import load_tasks
    from mergecore.search.config import load_config
    from mergecore.search.rmm.run import RMMConfig

    r = _write(tmp_path, b"merge_method: linear\nmodels: [{model: caf\xe9}]\n")
    msg = _one_error(capsys, "merge", str(r), str(tmp_path / "out"))
    assert "not UTF-8" in msg and "recipe.yml" in msg
    with pytest.raises(MergeError, match="not UTF-8"):
        load_tasks(_write(tmp_path, b"- {name: \xff}\n", "tasks.yml"))
    with pytest.raises(MergeError, match="not UTF-8"):
        load_config(_write(tmp_path, b"models: [\xff]\n", "search.yml"), RMMConfig)


def test_syntax_errors_keep_line_and_column(tmp_path, capsys):
    r = _write(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    msg = _one_error(capsys, "merge", str(r), str(tmp_path / "out"))
    assert msg.startswith(f"error: {r}: line 4, column 4: malformed YAML")


def test_error_messages_do_not_format_huge_values(tmp_path, capsys):
    from mergecore.recipe import parse_recipe, validate_parameters

    r = _write(tmp_path, "merge_method: linear\nmodels: [{model: a}]\n? " + "k" * 1_000_000 + "\n: 1\n")
    msg = _one_error(capsys, "merge", str(r), str(tmp_path / "out"))
    assert "unknown key 'kkkk" in msg and len(msg) < 800
    big = "[" + ", ".join(str(i) for i in range(100_000)) + "]"
    recipe = parse_recipe(f"merge_method: linear\nmodels: [{{model: a}}]\n"
                          f"parameters: {{weight: [{{filter: mlp, junk: {big}}}]}}\n")
    with pytest.raises(MergeError, match="each filter entry needs 'value'") as err:
        validate_parameters(recipe)
    assert len(str(err.value)) < 400
    with pytest.raises(MergeError) as err:  # pydantic's error would carry the whole input
        parse_recipe(f"merge_method: linear\nmodels: {{model: a}}\nname: {big}\n")
    assert len(str(err.value)) < 400


# ------------------------------------------------------------------------------ flags


def _tiny_recipe(tmp_path: Path, llama_family) -> Path:
    return _write(tmp_path, f"merge_method: linear\nmodels:\n"
                            f"  - {{model: {llama_family['a']}, parameters: {{weight: 0.5}}}}\n"
                            f"  - {{model: {llama_family['b']}, parameters: {{weight: 0.5}}}}\n")


def test_threads_above_the_cap_warn_and_run(tmp_path, capsys, llama_family):
    before = torch.get_num_threads()
    try:
        rc, err, out = _cli(capsys, "merge", str(_tiny_recipe(tmp_path, llama_family)), str(tmp_path / "out"),
                            "--threads", "100000", "--quiet")
        assert torch.get_num_threads() == thread_cap()
    finally:
        torch.set_num_threads(before)
    assert rc == 0, err
    assert err == [f"warning: --threads 100000 capped to {thread_cap()} (4 per CPU, at most {MAX_THREADS})"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_thread_rule():
    assert thread_cap() <= MAX_THREADS and check_threads(1) == 1 and check_threads(None) is None
    assert check_threads(10**9) == thread_cap()
    for bad in (0, -3):
        with pytest.raises(MergeError, match=f"--threads must be at least 1, got {bad}"):
            check_threads(bad)


def test_threads_below_one_for_every_subcommand(tmp_path, capsys, monkeypatch):
    r = _write(tmp_path, "merge_method: linear\nmodels: [{model: a}]\n")
    assert "--threads must be at least 1" in _one_error(capsys, "merge", str(r), str(tmp_path / "o"), "--threads", "0")
    assert "--threads must be at least 1" in _one_error(capsys, "eval", str(tmp_path), "--tasks", "t.yml",
                                                        "--threads", "0")
    assert "--threads must be at least 1" in _one_error(capsys, "bench", "build-family", "fmnist-vit", "--root",
                                                        str(tmp_path / "fam"), "--threads", "-2")
    monkeypatch.setattr("mergecore.search.dam.run.load_dam_config", lambda path: (SimpleNamespace(), tmp_path))
    assert "--threads must be at least 1" in _one_error(capsys, "search", "dam", "c.yml", str(tmp_path / "o"),
                                                        "--threads", "0")
    assert not (tmp_path / "o").exists() and not (tmp_path / "fam").exists()


@pytest.mark.parametrize("flag", ["--shard-size", "--memory-budget"])
@pytest.mark.parametrize("value, expected", [("inf", "finite"), ("nan", "finite"), ("1e400", "finite"),
                                             ("-5GB", "positive"), ("-1GB", "positive"), ("0", "positive"),
                                             ("1e30", "too large"), ("lots", "cannot parse")])
def test_absurd_sizes(tmp_path, capsys, llama_family, flag, value, expected):
    out = tmp_path / "out"
    msg = _one_error(capsys, "merge", str(_tiny_recipe(tmp_path, llama_family)), str(out), f"{flag}={value}")
    assert expected in msg and value in msg
    assert _leftovers(out) == []


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["merge", "r.yml", "out", "--threads", "many"])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: mergecore merge: argument --threads: invalid int value")


# ------------------------------------------------------------------------------ failures


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capsys, llama_family, monkeypatch):
    import mergecore.io.writer as writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "pwrite", full)
    out = tmp_path / "out"
    msg = _one_error(capsys, "merge", str(_tiny_recipe(tmp_path, llama_family)), str(out), "--quiet")
    assert msg.startswith("error: merge failed: No space left on device") and "free some disk space" in msg
    assert _leftovers(out) == []


def test_read_only_output_parent(tmp_path, capsys, llama_family):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    try:
        (parent / "probe").mkdir()
    except PermissionError:
        pass
    else:
        parent.chmod(0o700)
        pytest.skip("this user writes into read-only folders (root)")
    try:
        msg = _one_error(capsys, "merge", str(_tiny_recipe(tmp_path, llama_family)), str(parent / "out"), "--quiet")
    finally:
        parent.chmod(0o700)
    assert "is not writable" in msg or "Permission denied" in msg
    assert list(parent.iterdir()) == []
    # a model file the user may not read: the OS error's own words and the file
    shutil.copytree(llama_family["a"], tmp_path / "a")
    weights = tmp_path / "a" / "model.safetensors"
    weights.chmod(0)
    r = _write(tmp_path, f"merge_method: linear\nmodels:\n  - {{model: {tmp_path / 'a'}, parameters: {{weight: 1}}}}\n")
    msg = _one_error(capsys, "merge", str(r), str(tmp_path / "out"), "--quiet")
    assert "Permission denied" in msg and str(weights) in msg
    assert _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("err, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"),
     "error: merge failed: Permission denied (/data/out); check the permissions of that path"),
    (OSError(errno.EMFILE, "Too many open files"),
     "error: merge failed: Too many open files; raise the open-file limit (ulimit -n) or use fewer --threads"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/a", None, "/b"),
     "error: merge failed: No such file or directory (/a -> /b)"),
    (OSError("odd\nmessage"), "error: merge failed: odd message"),
])
def test_os_errors_become_one_line(capsys, err, expected):
    def fail() -> int:
        raise err

    assert run_command(fail, what="merge") == 2
    assert capsys.readouterr().err.splitlines() == [expected]


def test_unexpected_exception_is_one_line_exit_2(tmp_path, capsys, llama_family, monkeypatch):
    from mergecore.methods.base import MergeMethod

    def broken(self, *a, **k):
        raise ValueError("shapes\ndo not line up " + "x" * 5000)

    monkeypatch.setattr(MergeMethod, "__call__", broken)
    recipe, out = str(_tiny_recipe(tmp_path, llama_family)), tmp_path / "out"
    msg = _one_error(capsys, "merge", recipe, str(out), "--quiet")
    assert msg.startswith("error: internal error: ValueError: shapes do not line up xxx")
    assert msg.endswith("(run with --verbose for the traceback)")
    assert _leftovers(out) == []
    rc, err, _ = _cli(capsys, "--verbose", "merge", recipe, str(out), "--quiet")
    assert rc == 2 and err[0].startswith("Traceback") and err[-1].startswith("error: internal error: ValueError")


def test_interrupt_and_warnings(capsys):
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_command(interrupted) == 130
    assert capsys.readouterr().err.splitlines() == ["error: interrupted"]

    def warns() -> int:
        warnings.warn("a warning\nover two lines", UserWarning)
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert run_command(warns) == 0
    assert capsys.readouterr().err.splitlines() == ["warning: a warning over two lines"]


# ------------------------------------------------------------------------------ mergekit leniency


def _models(*entries: tuple[Path, float]) -> str:
    return "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in entries)


def _mergekit_cases(f: dict[str, Path]) -> dict[str, str]:
    """mergekit's test-suite recipes: `weight:` under each model whatever the method."""
    return {
        "slerp": f"merge_method: slerp\nbase_model: {f['a']}\nparameters: {{t: 0.35}}\nmodels:\n"
                 + _models((f["a"], 0.6), (f["b"], 0.4)),
        "sce": f"merge_method: sce\nbase_model: {f['base']}\nparameters: {{select_topk: 0.5}}\nmodels:\n"
               + _models((f["a"], 0.6), (f["b"], 0.4)),
        "karcher": "merge_method: karcher\nmodels:\n" + _models((f["a"], 0.6), (f["b"], 0.4)),
        "nearswap": f"merge_method: nearswap\nbase_model: {f['a']}\nparameters: {{t: 0.01}}\nmodels:\n"
                    + _models((f["a"], 0.6), (f["b"], 0.4)),
    }


@pytest.mark.parametrize("method", ["slerp", "sce", "karcher", "nearswap"])
def test_mergekit_recipes_with_unused_weight_run(tmp_path, capsys, llama_family, method):
    text = _mergekit_cases(llama_family)[method]
    rc, err, _ = _cli(capsys, "merge", str(_write(tmp_path, text)), str(tmp_path / "out"), "--quiet")
    assert rc == 0, err
    assert len(err) == 1, err
    assert err[0].startswith(f"warning: models[0] ({llama_family['a']}) and 1 more: parameter 'weight' "
                             f"is not used by method '{method}' and is ignored")
    # the ignored key never reaches the method: same result as the recipe without it
    plain = text.replace("    parameters: {weight: 0.6}\n", "").replace("    parameters: {weight: 0.4}\n", "")
    assert "weight" not in plain
    rc, err, _ = _cli(capsys, "merge", str(_write(tmp_path, plain, "plain.yml")), str(tmp_path / "plain"), "--quiet")
    assert rc == 0 and err == []
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_misspelled_optional_parameter_warns_and_uses_the_default(tmp_path, capsys, llama_family):
    f = llama_family
    head = f"merge_method: ties\nbase_model: {f['base']}\nmodels:\n"
    typo = head + f"  - {{model: {f['a']}, parameters: {{weight: 0.5, densty: 0.2}}}}\n" \
                  f"  - {{model: {f['b']}, parameters: {{weight: 0.5}}}}\n"
    rc, err, _ = _cli(capsys, "merge", str(_write(tmp_path, typo)), str(tmp_path / "typo"), "--quiet")
    assert rc == 0, err
    assert err == [f"warning: models[0] ({f['a']}): parameter 'densty' is not used by method 'ties' and is "
                   f"ignored; did you mean 'density'?"]
    default = head + f"  - {{model: {f['a']}, parameters: {{weight: 0.5, density: 1.0}}}}\n" \
                     f"  - {{model: {f['b']}, parameters: {{weight: 0.5}}}}\n"
    assert _cli(capsys, "merge", str(_write(tmp_path, default, "d.yml")), str(tmp_path / "d"), "--quiet")[0] == 0
    got, want = load_file(tmp_path / "typo" / "model.safetensors"), load_file(tmp_path / "d" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_misspelled_required_parameter_is_named_in_the_error(tmp_path, capsys, llama_family):
    f = llama_family
    r = _write(tmp_path, f"merge_method: slerp\nbase_model: {f['a']}\nparameters: {{tt: 0.5}}\n"
                         f"models: [{{model: {f['a']}}}, {{model: {f['b']}}}]\n")
    msg = _one_error(capsys, "merge", str(r), str(tmp_path / "out"), "--quiet")
    assert "needs parameter 't'" in msg and "'tt' in the recipe is not a parameter of 'slerp': a typo?" in msg


def test_out_of_range_values_of_used_parameters_stay_errors(tmp_path, capsys, llama_family):
    f = llama_family
    r = _write(tmp_path, f"merge_method: slerp\nbase_model: {f['a']}\nparameters: {{t: 1.5}}\nmodels:\n"
                         + _models((f["a"], 0.6), (f["b"], 0.4)))
    rc, err, _ = _cli(capsys, "merge", str(r), str(tmp_path / "out"), "--quiet")
    assert rc == 2 and err[-1].startswith("error: ") and "out of range" in err[-1] and "'t'" in err[-1]
    assert _leftovers(tmp_path / "out") == []
