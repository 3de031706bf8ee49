"""Bad input through the CLI: exit status 2, exactly one `error:` line on stderr, and nothing
left at the output path (no hidden temporary folder beside it either)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from mergecore.cli import main


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A tiny Llama like the conftest one but with intermediate_size 80 instead of 64."""
    import torch
    import transformers as tf

    torch.manual_seed(5)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                            tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("wide") / "llama-wide"
    tf.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _linear(*models, **extra) -> dict:
    return {"merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models], **extra}


def run_bad(tmp_path: Path, capsys, recipe: dict | str, *extra: str, out: Path | None = None) -> str:
    """Run `mergecore merge` on a bad recipe; check the contract and return the error line."""
    rpath = tmp_path / "recipe.yml"
    rpath.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    out = out or tmp_path / "merged"
    capsys.readouterr()
    rc = main(["merge", str(rpath), str(out), *extra])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert captured.out == ""
    assert not out.exists() or out.is_file()
    if out.parent.is_dir():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
    return lines[0]


# ------------------------------------------------------------------------------ recipe


def test_malformed_yaml_names_the_line(tmp_path, capsys, llama_family):
    text = f"merge_method: linear\nmodels:\n  - model: {llama_family['a']}\n    parameters: {{weight: [0.5\n"
    msg = run_bad(tmp_path, capsys, text)
    assert "malformed YAML" in msg and "line " in msg and "recipe.yml" in msg


def test_malformed_yaml_bad_indent(tmp_path, capsys):
    msg = run_bad(tmp_path, capsys, "merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    assert "line 4" in msg


def test_recipe_not_a_mapping(tmp_path, capsys):
    assert "expected a mapping" in run_bad(tmp_path, capsys, "just a string\n")


def test_recipe_file_missing(tmp_path, capsys):
    rc = main(["merge", str(tmp_path / "nope.yml"), str(tmp_path / "merged")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: recipe file not found")
    assert list(tmp_path.iterdir()) == []


def test_unknown_top_level_key(tmp_path, capsys, llama_family):
    msg = run_bad(tmp_path, capsys, {**_linear(llama_family["a"]), "merge_methd": "ties"})
    assert "unknown key 'merge_methd'" in msg and "merge_method" in msg


def test_unknown_method_lists_valid_ones(tmp_path, capsys, llama_family):
    msg = run_bad(tmp_path, capsys, {**_linear(llama_family["a"], llama_family["b"]), "merge_method": "blend"})
    assert "unknown merge method 'blend'" in msg
    for name in ("linear", "passthrough", "ties", "slerp"):
        assert name in msg


def test_misspelled_required_parameter_names_the_typo(tmp_path, capsys, llama_family):
    # an unused key is only a warning (mergekit runs such recipes), but when the method then
    # misses a parameter it needs, the error points at the likely typo
    recipe = _linear(llama_family["a"], llama_family["b"])
    recipe["models"][1]["parameters"] = {"weigth": 0.5}
    msg = run_bad(tmp_path, capsys, recipe, "--quiet")
    assert "needs parameter 'weight'" in msg and "'weigth' in the recipe is not a parameter of 'linear'" in msg


def test_parameter_out_of_range(tmp_path, capsys, llama_family):
    recipe = {"merge_method": "ties", "base_model": str(llama_family["base"]),
              "models": [{"model": str(llama_family["a"]), "parameters": {"weight": 0.5, "density": 1.5}}]}
    msg = run_bad(tmp_path, capsys, recipe)
    assert "density" in msg and "1.5" in msg and "out of range" in msg
    recipe = _linear(llama_family["a"], llama_family["b"])
    recipe["models"][0]["parameters"]["weight"] = "abc"
    msg = run_bad(tmp_path, capsys, recipe)
    assert "parameter 'weight'" in msg and "must be a float" in msg and "'abc'" in msg


def test_bad_value_inside_a_filter(tmp_path, capsys, llama_family):
    recipe = _linear(llama_family["a"], llama_family["b"])
    recipe["models"][0]["parameters"]["weight"] = [{"filter": "mlp", "value": "x"}, {"value": 0.5}]
    msg = run_bad(tmp_path, capsys, recipe)
    assert "must be a float" in msg and "mlp" in msg  # names the tensor


def test_missing_required_parameter(tmp_path, capsys, llama_family):
    recipe = {"merge_method": "linear", "models": [{"model": str(llama_family["a"])}, {"model": str(llama_family["b"])}]}
    msg = run_bad(tmp_path, capsys, recipe)
    assert "needs parameter 'weight'" in msg and str(llama_family["a"]) in msg


def test_missing_base_model(tmp_path, capsys, llama_family):
    recipe = {"merge_method": "task_arithmetic", "models": [{"model": str(llama_family["a"]), "parameters": {"weight": 1}}]}
    assert "needs a base_model" in run_bad(tmp_path, capsys, recipe)


def test_bad_dtype_and_sizes(tmp_path, capsys, llama_family):
    recipe = _linear(llama_family["a"], llama_family["b"])
    assert "unknown dtype 'float8'" in run_bad(tmp_path, capsys, recipe, "--dtype", "float8")
    assert "cannot parse size 'lots'" in run_bad(tmp_path, capsys, recipe, "--shard-size", "lots")
    assert "--threads must be at least 1" in run_bad(tmp_path, capsys, recipe, "--threads", "0")
    assert "unknown dtype" in run_bad(tmp_path, capsys, {**recipe, "dtype": "int3"})


# ------------------------------------------------------------------------------ models


def test_missing_model_folder(tmp_path, capsys, llama_family):
    missing = tmp_path / "no-such-model"
    msg = run_bad(tmp_path, capsys, _linear(llama_family["a"], missing))
    assert str(missing) in msg and "not found" in msg


def test_model_folder_without_weights(tmp_path, capsys, llama_family):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    msg = run_bad(tmp_path, capsys, _linear(llama_family["a"], empty))
    assert "has no weights" in msg


def test_truncated_safetensors(tmp_path, capsys, llama_family):
    bad = tmp_path / "truncated"
    shutil.copytree(llama_family["b"], bad)
    f = bad / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    msg = run_bad(tmp_path, capsys, _linear(llama_family["a"], bad))
    assert "truncated safetensors file" in msg and str(f) in msg and str(size // 2) in msg


@pytest.mark.parametrize("corruption", ["huge-length", "garbage-json", "not-an-object", "tiny-file", "bad-entry"])
def test_corrupt_safetensors_header(tmp_path, capsys, llama_family, corruption):
    bad = tmp_path / "corrupt"
    shutil.copytree(llama_family["b"], bad)
    f = bad / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    if corruption == "huge-length":
        raw[:8] = struct.pack("<Q", 2**40)
    elif corruption == "garbage-json":
        raw[8:8 + 16] = b"\xff\xfe{not json at a"
    elif corruption == "not-an-object":
        body = b"[1, 2, 3]".ljust(hlen)
        raw[8:8 + hlen] = body
    elif corruption == "tiny-file":
        raw = raw[:5]
    elif corruption == "bad-entry":
        header = json.loads(raw[8:8 + hlen])
        name = next(k for k in header if k != "__metadata__")
        header[name] = {"dtype": "F32", "shape": [1]}
        body = json.dumps(header, separators=(",", ":")).encode()
        assert len(body) <= hlen
        raw[8:8 + hlen] = body.ljust(hlen)
    f.write_bytes(bytes(raw))
    msg = run_bad(tmp_path, capsys, _linear(llama_family["a"], bad))
    assert "corrupt safetensors file" in msg and str(f) in msg


def test_different_shapes_name_tensor_and_both_shapes(tmp_path, capsys, llama_family, wide_llama):
    msg = run_bad(tmp_path, capsys, _linear(llama_family["a"], wide_llama))
    assert "model.layers.0.mlp." in msg
    assert "[80, 32]" in msg or "[32, 80]" in msg
    assert "[64, 32]" in msg or "[32, 64]" in msg
    assert str(wide_llama) in msg and str(llama_family["a"]) in msg


def test_architectures_do_not_match(tmp_path, capsys, llama_family, model_factory):
    gpt2 = model_factory("gpt2", 1, base_seed=0)
    msg = run_bad(tmp_path, capsys, _linear(llama_family["a"], gpt2))
    assert "architectures do not match" in msg and "LlamaForCausalLM" in msg and "GPT2LMHeadModel" in msg


# ------------------------------------------------------------------------------ slices


def test_slice_outside_the_model(tmp_path, capsys, llama_family):
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(llama_family["base"]), "layer_range": [2, 6]}]}]}
    msg = run_bad(tmp_path, capsys, recipe)
    assert "slices[0]" in msg and "[2, 6]" in msg and "4 layers" in msg


@pytest.mark.parametrize("layer_range,expect", [([3, 3], "is empty"), ([-1, 2], "is outside model"), ([3, 1], "is empty")])
def test_empty_or_negative_slice(tmp_path, capsys, llama_family, layer_range, expect):
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(llama_family["base"]), "layer_range": layer_range}]}]}
    assert expect in run_bad(tmp_path, capsys, recipe)


def test_slice_sources_of_different_lengths(tmp_path, capsys, llama_family):
    recipe = {"merge_method": "linear", "parameters": {"weight": 0.5},
              "slices": [{"sources": [{"model": str(llama_family["a"]), "layer_range": [0, 2]},
                                      {"model": str(llama_family["b"]), "layer_range": [0, 3]}]}]}
    assert "same number of layers, got [2, 3]" in run_bad(tmp_path, capsys, recipe)


def test_slice_with_more_models_than_the_method_takes(tmp_path, capsys, llama_family):
    """slerp takes one model besides the base; a slice with two is refused before anything is written."""
    recipe = {"merge_method": "slerp", "base_model": str(llama_family["base"]), "parameters": {"t": 0.5},
              "slices": [{"sources": [{"model": str(llama_family["base"]), "layer_range": [0, 4]},
                                      {"model": str(llama_family["a"]), "layer_range": [0, 4]},
                                      {"model": str(llama_family["b"]), "layer_range": [0, 4]}]}]}
    msg = run_bad(tmp_path, capsys, recipe)
    assert "takes exactly 1 model(s) besides the base, got 2" in msg


# ------------------------------------------------------------------------------ output path


def test_output_under_a_regular_file(tmp_path, capsys, llama_family):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "merged"
    msg = run_bad(tmp_path, capsys, _linear(llama_family["a"], llama_family["b"]), out=out)
    assert "cannot write to output path" in msg and str(out) in msg
    assert blocker.read_text() == "not a folder"


def test_output_deeper_under_a_regular_file(tmp_path, capsys, llama_family):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    msg = run_bad(tmp_path, capsys, _linear(llama_family["a"], llama_family["b"]), out=blocker / "x" / "y" / "merged")
    assert "cannot write to output path" in msg


def test_output_is_an_existing_file(tmp_path, capsys, llama_family):
    out = tmp_path / "merged"
    out.write_text("keep me")
    msg = run_bad(tmp_path, capsys, _linear(llama_family["a"], llama_family["b"]), out=out)
    assert "exists and is not a folder" in msg
    assert out.read_text() == "keep me"


def test_failed_merge_keeps_previous_output(tmp_path, capsys, llama_family, wide_llama):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_text("previous result")
    rpath = tmp_path / "recipe.yml"
    rpath.write_text(yaml.safe_dump(_linear(llama_family["a"], wide_llama)))
    assert main(["merge", str(rpath), str(out)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")] == []


def test_verbose_shows_traceback(tmp_path, capsys, llama_family):
    rpath = tmp_path / "recipe.yml"
    rpath.write_text(yaml.safe_dump({**_linear(llama_family["a"]), "merge_method": "blend"}))
    assert main(["--verbose", "merge", str(rpath), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: unknown merge method")
