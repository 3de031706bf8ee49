"""Checkpoint I/O: lazy model sources (safetensors, sharded, .bin), the atomic sharded writer,
size parsing and Hub id resolution."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergecore.errors import MergeError
from mergecore.io.source import ModelSource, is_hub_id, resolve_model_path
from mergecore.io.writer import ShardedWriter, parse_size, prepare_output_dir

sys.path.insert(0, str(Path(__file__).parent))
from conftest import _tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def torch_llama():
    """A tiny Llama (not saved): the reference state dict for the reading tests."""
    config, cls = _tiny_config("llama")
    torch.manual_seed(123)
    model = cls(config)
    # break the symmetry of the default norm weights (all ones) so equality checks mean something
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _assert_reads_state_dict(src: ModelSource, sd: dict[str, torch.Tensor]) -> None:
    assert set(src.tensors) == set(sd)
    for name, ref in sd.items():
        got = src.read(name)
        assert got.dtype == ref.dtype and tuple(got.shape) == tuple(ref.shape), name
        assert torch.equal(got, ref), name
        info = src.info(name)
        assert info.shape == tuple(ref.shape) and info.numel == ref.numel()
        assert info.nbytes == ref.numel() * ref.element_size()


def _no_hidden_leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------------------ sources


def test_source_single_file_safetensors(tmp_path, torch_llama):
    torch_llama.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    src = ModelSource(str(tmp_path / "m"))
    _assert_reads_state_dict(src, torch_llama.state_dict())
    assert src.architecture == "LlamaForCausalLM"
    assert src.config["num_hidden_layers"] == 4
    assert src.total_bytes() == sum(t.numel() * 4 for t in torch_llama.state_dict().values())
    # every read is a fresh tensor: writing to it does not change the next read
    t = src.read("model.norm.weight")
    t.zero_()
    assert torch.equal(src.read("model.norm.weight"), torch_llama.state_dict()["model.norm.weight"])
    src.close()


def test_source_sharded_safetensors(tmp_path, torch_llama):
    torch_llama.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    src = ModelSource(str(tmp_path / "m"))
    _assert_reads_state_dict(src, torch_llama.state_dict())
    assert {info.file for info in src.tensors.values()} == set(shards)


def test_source_pytorch_bin(tmp_path, torch_llama):
    # transformers 5 always writes safetensors, so write the .bin checkpoint the way older
    # transformers did: a zip-format torch.save of the state dict beside config.json
    d = tmp_path / "m"
    torch_llama.config.save_pretrained(d)
    sd = {k: v.clone() for k, v in torch_llama.state_dict().items()}
    torch.save(sd, d / "pytorch_model.bin")
    src = ModelSource(str(d))
    _assert_reads_state_dict(src, torch_llama.state_dict())
    assert all(info.offset == -1 for info in src.tensors.values())


def test_source_legacy_pytorch_bin_and_bin_index(tmp_path, torch_llama):
    sd = {k: v.clone() for k, v in torch_llama.state_dict().items()}
    names = sorted(sd)
    half = len(names) // 2
    d = tmp_path / "m"
    torch_llama.config.save_pretrained(d)
    parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for fname, keys in parts.items():
        # the legacy (non-zip) format cannot be memory-mapped; the reader falls back
        torch.save({k: sd[k] for k in keys}, d / fname, _use_new_zipfile_serialization=False)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    src = ModelSource(str(d))
    _assert_reads_state_dict(src, torch_llama.state_dict())


def test_source_prefers_safetensors_over_bin(tmp_path, torch_llama):
    d = tmp_path / "m"
    torch_llama.save_pretrained(d)
    torch.save({"other": torch.zeros(2)}, d / "pytorch_model.bin")
    assert "other" not in ModelSource(str(d)).tensors


def test_source_reads_bf16_and_integer_tensors(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "m"
    d.mkdir()
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(4).to(torch.float16),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, d / "model.safetensors")
    src = ModelSource(str(d))
    for k, v in tensors.items():
        assert src.read(k).dtype == v.dtype
        assert torch.equal(src.read(k), v)


def test_source_search_dirs(tmp_path, torch_llama):
    torch_llama.save_pretrained(tmp_path / "models" / "tiny")
    src = ModelSource("tiny", search_dirs=(tmp_path / "models",))
    assert src.path == (tmp_path / "models" / "tiny").resolve()


def test_source_errors(tmp_path, torch_llama):
    with pytest.raises(MergeError, match="no weights"):
        (tmp_path / "empty").mkdir()
        ModelSource(str(tmp_path / "empty"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(MergeError, match="is a file, expected a model folder"):
        ModelSource(str(tmp_path / "f"))
    with pytest.raises(MergeError, match="not found: no such folder"):
        ModelSource(str(tmp_path / "nope"))
    torch_llama.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    next((tmp_path / "m").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(MergeError, match="shard model-00002-of-.* named in model.safetensors.index.json is missing"):
        ModelSource(str(tmp_path / "m"))
    src_ok = tmp_path / "ok"
    torch_llama.save_pretrained(src_ok)
    with pytest.raises(MergeError, match="has no tensor 'nope'"):
        ModelSource(str(src_ok)).info("nope")


# ------------------------------------------------------------------------------ hub ids


def test_hub_id_offline_names_id_and_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_hub_id("some-org/some-model") and is_hub_id("some-org/some-model@main")
    assert not is_hub_id("/abs/path") and not is_hub_id("./rel/path") and not is_hub_id("plainname")
    with pytest.raises(MergeError) as err:
        resolve_model_path("some-org/some-model")
    msg = str(err.value)
    assert "'some-org/some-model'" in msg and "local folder" in msg
    assert "\n" not in msg
    with pytest.raises(MergeError, match="'some-org/some-model'.*local folder"):
        resolve_model_path("some-org/some-model@v1.0")


def test_lora_reference_refused():
    with pytest.raises(MergeError, match="LoRA"):
        resolve_model_path("org/model+org/adapter")


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5GB", 5 * 10**9),
        ("500M", 500 * 10**6),
        ("500MB", 500 * 10**6),
        ("1.5G", 1_500_000_000),
        ("2GiB", 2 * 1024**3),
        ("2 kib", 2048),
        ("20KB", 20_000),
        ("1MiB", 1024**2),
        ("123", 123),
        ("123B", 123),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "GB", "0", "-1GB", "1.2.3MB"])
def test_parse_size_rejects(text):
    with pytest.raises(MergeError):
        parse_size(text)


# ------------------------------------------------------------------------------ writer


def _layout(sd: dict[str, torch.Tensor]):
    return [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]


def test_writer_shards_index_and_loads(tmp_path, torch_llama):
    sd = torch_llama.state_dict()
    out = tmp_path / "out"
    names = list(sd)
    random.Random(0).shuffle(names)  # tensors may arrive in any order
    with ShardedWriter(out, _layout(sd), shard_size=20_000, metadata={"who": "test"}) as w:
        assert not out.exists() and w.tmp_dir.is_dir() and w.tmp_dir.parent == tmp_path
        for n in names:
            assert w.write(n, sd[n]) == sd[n].numel() * 4
        w.add_file("config.json", torch_llama.config.to_json_string())
        result = w.finalize()
    assert result == out.absolute()
    assert _no_hidden_leftovers(tmp_path, "out") == []
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == len(w.shard_names) > 1
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in sd.values())
    loaded: dict[str, torch.Tensor] = {}
    for s in shards:
        part = load_file(s)
        # each shard holds exactly the tensors the index assigns to it, within the size limit
        assert set(part) == {k for k, f in index["weight_map"].items() if f == s.name}
        assert sum(t.numel() * 4 for t in part.values()) <= 20_000 or len(part) == 1
        loaded.update(part)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    # the header carries the metadata
    from safetensors import safe_open

    with safe_open(shards[0], "pt") as f:
        assert f.metadata() == {"format": "pt", "who": "test"}

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # and it reads back through ModelSource too
    _assert_reads_state_dict(ModelSource(str(out)), sd)


def test_writer_single_shard_has_no_index(tmp_path):
    sd = {"x": torch.randn(4, 4), "y": torch.arange(3, dtype=torch.int32), "z": torch.randn(2).to(torch.bfloat16)}
    with ShardedWriter(tmp_path / "o", _layout(sd)) as w:
        for k, v in sd.items():
            w.write(k, v)
        w.finalize()
    # the weights, and the marker that lets a later merge replace this folder (with overwrite)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".mergecore-output.json", "model.safetensors"]
    got = load_file(tmp_path / "o" / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_writer_oversized_tensor_gets_own_shard(tmp_path):
    sd = {"small1": torch.randn(10), "big": torch.randn(100), "small2": torch.randn(10)}
    w = ShardedWriter(tmp_path / "o", _layout(sd), shard_size=100)
    assert [w.slots[k].shard for k in sd] == [0, 1, 2]
    w.abort()


def test_writer_abort_leaves_nothing(tmp_path):
    sd = {"x": torch.randn(64, 64), "y": torch.randn(64, 64)}
    w = ShardedWriter(tmp_path / "out", _layout(sd), shard_size=20_000)
    w.write("x", sd["x"])
    w.add_file("config.json", "{}")
    w.abort()
    assert list(tmp_path.iterdir()) == []
    w.abort()  # idempotent


def test_writer_exception_inside_with_aborts(tmp_path):
    sd = {"x": torch.randn(8)}
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(tmp_path / "out", _layout(sd)) as w:
            w.write("x", sd["x"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_finalize_with_missing_tensor_leaves_nothing(tmp_path):
    sd = {"x": torch.randn(8), "y": torch.randn(8)}
    w = ShardedWriter(tmp_path / "out", _layout(sd))
    w.write("x", sd["x"])
    with pytest.raises(MergeError, match="1 tensors were never written \\(first: y\\)"):
        w.finalize()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_wrong_tensor(tmp_path):
    w = ShardedWriter(tmp_path / "out", [("x", torch.float32, (4,))])
    try:
        with pytest.raises(MergeError, match="not in the output layout"):
            w.write("nope", torch.zeros(4))
        with pytest.raises(MergeError, match="layout says"):
            w.write("x", torch.zeros(5))
        with pytest.raises(MergeError, match="layout says"):
            w.write("x", torch.zeros(4, dtype=torch.float16))
    finally:
        w.abort()
    with pytest.raises(MergeError, match="planned twice"):
        ShardedWriter(tmp_path / "out2", [("x", torch.float32, (4,)), ("x", torch.float32, (4,))])
    assert list(tmp_path.iterdir()) == []


def test_writer_replaces_existing_folder(tmp_path):
    """An earlier merge's folder (it has the marker) is replaced as a whole, only with
    overwrite; a folder mergecore did not write is never touched."""
    out = tmp_path / "out"
    with ShardedWriter(out, [("x", torch.float32, (2,))]) as w:
        w.write("x", torch.zeros(2))
        w.finalize()
    (out / "stale.txt").write_text("old")
    with pytest.raises(MergeError, match="already holds a merge; pass --overwrite"):
        ShardedWriter(out, [("x", torch.float32, (2,))])
    with ShardedWriter(out, [("x", torch.float32, (2,))], overwrite=True) as w:
        w.write("x", torch.ones(2))
        # the old folder stays intact until finalize
        assert (out / "stale.txt").is_file()
        w.finalize()
    assert sorted(p.name for p in out.iterdir()) == [".mergecore-output.json", "model.safetensors"]
    assert torch.equal(load_file(out / "model.safetensors")["x"], torch.ones(2))
    assert _no_hidden_leftovers(tmp_path, "out") == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty and was not written by mergecore"):
        ShardedWriter(foreign, [("x", torch.float32, (2,))], overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert _no_hidden_leftovers(tmp_path, "foreign") == []


def test_writer_creates_missing_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with ShardedWriter(out, [("x", torch.float32, (2,))]) as w:
        w.write("x", torch.ones(2))
        w.finalize()
    assert (out / "model.safetensors").is_file()


def test_prepare_output_dir(tmp_path):
    assert prepare_output_dir(tmp_path / "x" / "y") == (tmp_path / "x" / "y").absolute()
    assert not (tmp_path / "x").exists()  # creates nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(MergeError, match="exists and is not a folder"):
        prepare_output_dir(tmp_path / "file")
    with pytest.raises(MergeError, match="cannot write to output path .*is a file, not a folder"):
        prepare_output_dir(tmp_path / "file" / "out")
    with pytest.raises(MergeError, match="cannot write"):
        ShardedWriter(tmp_path / "file" / "deeper" / "out", [("x", torch.float32, (2,))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert os.path.isfile(tmp_path / "file")
