"""Merge options end to end (dry run, progress, cancel, dtypes, overwrite, threads, side files)
and failures in the middle of a merge: each leaves either the full output or nothing."""

from __future__ import annotations

import json

import pytest
import torch

from _merge_helpers import assert_close, cli, leftovers, linear_recipe, load_weights, write_recipe
from mergecore.cli import main
from mergecore.errors import Cancelled
from mergecore.events import CancelToken, MergeProgress
from mergecore.merging import merge
from mergecore.plan import plan_merge
from mergecore.recipe import recipe_from_dict


# ------------------------------------------------------------------------------ options


def test_dry_run_prints_plan_and_writes_nothing(llama_family, tmp_path, capsys):
    r = write_recipe(tmp_path / "r.yml", linear_recipe(llama_family["a"], llama_family["b"], wa=[0.2, 0.8]))
    out = tmp_path / "o"
    assert main(["merge", str(r), str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "method: linear" in text and "estimated peak memory" in text
    assert "output: 39 tensors" in text and "4 layers" in text
    assert "layer   0" in text and "layer   3" in text and "weight=" in text
    assert not out.exists() and leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]

    assert main(["merge", str(r), str(out), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "linear" and len(plan["tensors"]) == 39
    by_name = {t["name"]: t for t in plan["tensors"]}
    assert by_name["model.layers.3.self_attn.q_proj.weight"]["params"]["weight"] == pytest.approx([0.8, 0.5])
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["params"]["weight"] == pytest.approx([0.2, 0.5])
    assert not out.exists()


def test_progress_callback_counts_up_to_total(llama_family, tmp_path):
    events: list[MergeProgress] = []
    result = merge(recipe_from_dict(linear_recipe(llama_family["a"], llama_family["b"])), tmp_path / "o",
                   progress=events.append, threads=3)
    total = result.tensors
    assert total == 39
    counts = [e.tensors_done for e in events]
    assert counts == list(range(0, total + 1))
    assert all(e.tensors_total == total for e in events)
    done_bytes = [e.bytes_done for e in events]
    assert done_bytes == sorted(done_bytes) and done_bytes[0] == 0
    assert done_bytes[-1] == events[-1].bytes_total == result.bytes_written
    assert events[-1].fraction == 1.0 and events[-1].eta == 0.0
    assert {e.current for e in events[1:]} == set(load_weights(llama_family["a"]))
    assert events[0].as_event().kind == "merge.progress"


@pytest.mark.parametrize("cancel_at", [0, 1, 38, 39])
def test_cancel_from_progress_callback_leaves_nothing(llama_family, tmp_path, cancel_at):
    token = CancelToken()
    seen: list[int] = []

    def progress(p: MergeProgress) -> None:
        seen.append(p.tensors_done)
        if p.tensors_done >= cancel_at:
            token.cancel()

    out = tmp_path / "o"
    with pytest.raises(Cancelled):
        merge(recipe_from_dict(linear_recipe(llama_family["a"], llama_family["b"])), out,
              progress=progress, cancel=token, threads=2)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert seen == list(range(cancel_at + 1))  # no progress is reported after the cancel


def test_cancel_before_start_keeps_existing_output(llama_family, tmp_path):
    out = tmp_path / "o"
    merge(recipe_from_dict(linear_recipe(llama_family["a"], llama_family["b"])), out)  # a previous merge
    (out / "keep.txt").write_text("previous merge")
    before = sorted(p.name for p in out.iterdir())
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        merge(recipe_from_dict(linear_recipe(llama_family["a"], llama_family["b"])), out, cancel=token, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before and "keep.txt" in before
    assert leftovers(out) == []


@pytest.mark.parametrize("entry", ["api", "cli"])
def test_output_dtype_override(llama_family, tmp_path, entry):
    a, b = llama_family["a"], llama_family["b"]
    out = tmp_path / "o"
    if entry == "api":
        merge(recipe_from_dict(linear_recipe(a, b)), out, out_dtype="bfloat16")
    else:
        assert cli(write_recipe(tmp_path / "r.yml", linear_recipe(a, b)), out, "--dtype", "bfloat16") == 0
    wa, wb, wo = load_weights(a), load_weights(b), load_weights(out)
    for name, t in wo.items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, (0.5 * wa[name] + 0.5 * wb[name]).to(torch.bfloat16)), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_recipe_dtype_sets_output_dtype(llama_family, tmp_path):
    out = tmp_path / "o"
    merge(recipe_from_dict(linear_recipe(llama_family["a"], llama_family["b"], dtype="float16")), out)
    assert {t.dtype for t in load_weights(out).values()} == {torch.float16}


def test_rerun_replaces_existing_output(llama_family, tmp_path):
    a, b = llama_family["a"], llama_family["b"]
    out = tmp_path / "o"
    merge(recipe_from_dict(linear_recipe(a, b, wa=1.0, wb=0.0)), out, shard_size=20_000)
    (out / "stale.txt").write_text("from an earlier run")
    assert (out / "model.safetensors.index.json").is_file()
    r = write_recipe(tmp_path / "r.yml", linear_recipe(a, b, wa=0.0, wb=1.0))
    assert cli(r, out) == 2  # an earlier merge is replaced only when asked
    assert (out / "stale.txt").is_file()
    assert cli(r, out, "--overwrite") == 0
    files = {p.name for p in out.iterdir()}
    assert "stale.txt" not in files and "model.safetensors.index.json" not in files
    assert not any(f.startswith("model-") for f in files)
    wb, wo = load_weights(b), load_weights(out)
    assert all(torch.equal(wo[k], wb[k]) for k in wb)
    assert leftovers(out) == []


def test_threads_do_not_change_the_result(llama_family, tmp_path):
    a, b = llama_family["a"], llama_family["b"]
    recipe = recipe_from_dict(linear_recipe(a, b, wa=[0.1, 0.9], wb=0.3))
    merge(recipe, tmp_path / "one", threads=1)
    merge(recipe, tmp_path / "many", threads=6, memory_budget=10_000)
    one, many = load_weights(tmp_path / "one"), load_weights(tmp_path / "many")
    assert all(torch.equal(one[k], many[k]) for k in one)


def test_tokenizer_and_side_files_from_base(llama_family, tmp_path):
    """Tokenizer files come from the base model; the card and recipe are written."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    (base / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(llama_family["a"]), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "o"
    merge(recipe_from_dict(recipe), out)
    assert json.loads((out / "tokenizer.json").read_text()) == {"model": {"vocab": {"a": 0}}}
    assert (out / "tokenizer_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and "merge_method: task_arithmetic" in card
    # task arithmetic with weight 1 on one model reproduces that model
    wa, wo = load_weights(llama_family["a"]), load_weights(out)
    for k in wa:
        assert_close(wo[k], wa[k], k, atol=1e-6)


# ------------------------------------------------------------------------------ failures mid-merge


def test_failure_in_a_job_leaves_nothing(llama_family, tmp_path, monkeypatch):
    import mergecore.executor as ex
    from mergecore.errors import MergeError

    real = ex.compute_tensor

    def flaky(plan, job, device="cpu", **kw):
        if job.out_name == "model.layers.2.mlp.up_proj.weight":
            raise MergeError("simulated failure")
        return real(plan, job, device, **kw)

    monkeypatch.setattr(ex, "compute_tensor", flaky)
    out = tmp_path / "o"
    cancel = CancelToken()
    with pytest.raises(MergeError, match="simulated failure"):
        merge(recipe_from_dict(linear_recipe(llama_family["a"], llama_family["b"])), out, threads=3, cancel=cancel)
    assert list(tmp_path.iterdir()) == []
    assert not cancel.cancelled  # the failure stopped the merge's workers, not the caller's token
    monkeypatch.setattr(ex, "compute_tensor", real)
    merge(recipe_from_dict(linear_recipe(llama_family["a"], llama_family["b"])), out, threads=3, cancel=cancel)
    assert (out / "model.safetensors").is_file()  # the same token serves the next merge


def test_bin_sources_are_not_changed_by_a_streaming_merge(llama_family, tmp_path):
    """A `.bin` state dict is kept after its first read; TIES overwrites the tensors it is handed,
    so each read must be a copy (else the second merge of a tensor starts from the first's result)."""
    from safetensors.torch import load_file

    import mergecore.executor as ex

    binned = {}
    for name in ("a", "b"):
        d = tmp_path / f"{name}-bin"
        d.mkdir()
        (d / "config.json").write_text((llama_family[name] / "config.json").read_text())
        torch.save(load_file(str(llama_family[name] / "model.safetensors")), d / "pytorch_model.bin")
        binned[name] = d
    recipe = recipe_from_dict({"merge_method": "ties", "base_model": str(llama_family["base"]),
                               "models": [{"model": str(binned[n]), "parameters": {"weight": 1.0, "density": 0.5}}
                                          for n in ("a", "b")]})
    plan = plan_merge(recipe)
    job = next(j for j in plan.jobs if j.out_name == "model.layers.1.mlp.up_proj.weight")
    first, second = ex.compute_tensor(plan, job), ex.compute_tensor(plan, job)
    assert torch.equal(first, second)
    original = load_file(str(llama_family["a"] / "model.safetensors"))[job.out_name]
    assert torch.equal(plan.sources[str(binned["a"])].read(job.out_name), original)


def test_file_truncated_after_planning_leaves_nothing(llama_family, tmp_path):
    """Headers were fine when planned; the data is cut short by the time it is read."""
    import shutil

    from mergecore.errors import MergeError
    from mergecore.executor import execute_plan

    src = tmp_path / "src"
    shutil.copytree(llama_family["b"], src)
    plan = plan_merge(recipe_from_dict(linear_recipe(llama_family["a"], src)))
    f = src / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    out = tmp_path / "o"
    with pytest.raises(MergeError, match="truncated file .*model.safetensors: tensor '.*' is cut short"):
        execute_plan(plan, out)
    assert not out.exists() and leftovers(out) == []
