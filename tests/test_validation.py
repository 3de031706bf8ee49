"""Model files a merge must refuse before writing a wrong checkpoint (values: test_nonfinite.py).

Headers: every safetensors entry is validated before any tensor byte is read; shard indexes name
plain files inside the model folder; JSON side files must hold what they should, within a size
limit. Every refusal follows the CLI contract: exit 2, one `error:` line, nothing left at the
output path.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from _merge_helpers import linear, run_bad, run_cli
from mergecore.errors import MergeError
from mergecore.io.source import ModelSource, read_json_object


def _header(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + hlen]), raw[8 + hlen:]


def _write(f: Path, header: Any, data: bytes) -> None:
    body = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _corrupt(tmp_path: Path, src: Path, mutate: Callable[[dict, bytes], Any]) -> tuple[Path, Path]:
    """A copy of model `src` whose model.safetensors header is replaced by mutate(header, data)."""
    bad = tmp_path / "corrupt"
    shutil.copytree(src, bad)
    f = bad / "model.safetensors"
    header, data = _header(f)
    new = mutate(header, data)
    _write(f, header if new is None else new, data)
    return bad, f


def _tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# ------------------------------------------------------------------------------ safetensors headers


def _first(h: dict) -> str:
    """The tensor at data offset 0 (so a shifted span stays in the file)."""
    return min(_tensors(h), key=lambda k: h[k]["data_offsets"][0])


def _negative(h: dict, _: bytes) -> None:
    name = _first(h)
    b, e = h[name]["data_offsets"]
    h[name]["data_offsets"] = [b - 8, e - 8]  # before: 8 header bytes read as the tensor's first values


def _reversed(h: dict, _: bytes) -> None:
    name = _first(h)
    b, e = h[name]["data_offsets"]
    h[name]["data_offsets"] = [e, b]


def _beyond(h: dict, data: bytes) -> None:
    name = _first(h)
    b, e = h[name]["data_offsets"]
    h[name]["data_offsets"] = [len(data), len(data) + e - b]


def _wrong_size(h: dict, _: bytes) -> None:
    name = _first(h)
    h[name]["shape"] = [h[name]["shape"][0] * 2] + h[name]["shape"][1:]


def _overlap(h: dict, _: bytes) -> None:
    by_size: dict[int, list[str]] = {}
    for k in _tensors(h):
        b, e = h[k]["data_offsets"]
        by_size.setdefault(e - b, []).append(k)
    one, two = next(v for v in by_size.values() if len(v) >= 2)[:2]
    h[two]["data_offsets"] = list(h[one]["data_offsets"])
    h[two]["shape"], h[two]["dtype"] = h[one]["shape"], h[one]["dtype"]


def _set(key: str, value: Any) -> Callable[[dict, bytes], None]:
    def mutate(h: dict, _: bytes) -> None:
        h[_first(h)][key] = value
    return mutate


def _rank9(h: dict, _: bytes) -> None:
    name = _first(h)
    n = math.prod(h[name]["shape"])
    h[name]["shape"] = [n] + [1] * 8  # same byte size, nine dimensions


HEADER_CASES = {
    "negative-offsets": (_negative, r"data_offsets \[-8, \d+\] must satisfy 0 <= begin <= end"),
    "reversed-offsets": (_reversed, r"data_offsets \[\d+, \d+\] must satisfy 0 <= begin <= end"),
    "offsets-beyond-file": (_beyond, r"truncated safetensors file .*ends at byte \d+, the file has \d+"),
    "size-not-shape-x-dtype": (_wrong_size, r"data_offsets span (\d+) bytes but shape \[\d+, \d+\] of F32 needs (\d+)"),
    "overlap": (_overlap, r"tensors '.+' and '.+' overlap in the data section"),
    "unknown-dtype": (_set("dtype", "F7"), r"unsupported dtype 'F7'"),
    "dtype-not-a-string": (_set("dtype", 4), r"unsupported dtype 4"),
    "rank-9": (_rank9, r"shape must be a list of at most 8 dimensions"),
    "negative-dim": (_set("shape", [-1, 32]), r"shape \[-1, 32\] must hold integers"),
    "bool-dim": (_set("shape", [True, 32]), r"shape \[True, 32\] must hold integers"),
    "float-offsets": (_set("data_offsets", [0.0, 128.0]), r"data_offsets must be two integers"),
    "string-offsets": (_set("data_offsets", ["0", "128"]), r"data_offsets must be two integers"),
    "extra-key": (_set("offset", 3), r"exactly dtype, shape and data_offsets"),
    "entry-not-object": (lambda h, _: h.__setitem__(_first(h), [1, 2]), r"entry is not a JSON object"),
    "header-a-list": (lambda h, _: [h], r"header is not a JSON object"),
    "metadata-not-str": (lambda h, _: h.__setitem__("__metadata__", {"format": 1}), r"__metadata__ must map strings"),
    "metadata-a-list": (lambda h, _: h.__setitem__("__metadata__", ["pt"]), r"__metadata__ must map strings"),
    "empty-name": (lambda h, _: h.__setitem__("", h.pop(_first(h))), r"tensor name '' is empty"),
    "long-name": (lambda h, _: h.__setitem__("x" * 5000, h.pop(_first(h))), r"longer than 1024 characters"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_corrupt_header_is_one_line_naming_file_and_tensor(tmp_path, capsys, llama_family, case):
    mutate, pattern = HEADER_CASES[case]
    named = {}

    def remember(h: dict, data: bytes) -> Any:
        named["tensor"] = _first(h)
        return mutate(h, data)

    bad, f = _corrupt(tmp_path, llama_family["b"], remember)
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], bad))
    assert str(f) in msg
    m = re.search(pattern, msg)
    assert m, msg
    if case not in ("header-a-list", "metadata-not-str", "metadata-a-list", "overlap", "empty-name", "long-name"):
        assert f"'{named['tensor']}'" in msg
    if case == "size-not-shape-x-dtype":  # the header promises half the bytes its shape needs
        assert int(m.group(2)) == 2 * int(m.group(1))
    assert len(msg) < 400


def test_negative_offsets_never_reach_the_output(tmp_path, capsys, llama_family):
    """Before: exit 0 and the first tensor held 8 header bytes (the length prefix) as weights."""
    bad, _ = _corrupt(tmp_path, llama_family["b"], _negative)
    recipe = {"merge_method": "passthrough", "models": [{"model": str(bad)}]}
    msg = run_bad(tmp_path, capsys, recipe)
    assert "must satisfy 0 <= begin <= end" in msg


def test_valid_headers_still_open(llama_family):
    src = ModelSource(str(llama_family["b"]))
    header, _ = _header(llama_family["b"] / "model.safetensors")
    assert len(src.tensors) == len(_tensors(header))
    name = _first(header)
    b, e = header[name]["data_offsets"]
    assert src.info(name).nbytes == e - b
    assert torch.equal(src.read(name), load_file(llama_family["b"] / "model.safetensors")[name])


def test_empty_tensors_share_offsets(tmp_path):
    """Zero-size tensors take no bytes: several at one offset are not an overlap."""
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.zeros(0, 4), "b": torch.ones(2, 2), "c": torch.zeros(4, 0)}, d / "model.safetensors")
    src = ModelSource(str(d))
    assert src.info("a").shape == (0, 4) and src.info("c").shape == (4, 0)
    assert src.read("b").sum().item() == 4.0


# ------------------------------------------------------------------------------ shard index


@pytest.fixture()
def sharded_copy(tmp_path, llama_family) -> Path:
    """llama_family['b'] re-saved in several shards with a model.safetensors.index.json."""
    sd = load_file(llama_family["b"] / "model.safetensors")
    d = tmp_path / "sharded"
    shutil.copytree(llama_family["b"], d)
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    parts = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-0000{i + 1}-of-00003.safetensors"
        save_file({n: sd[n].contiguous() for n in part}, d / fname)
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _edit_index(d: Path, edit: Callable[[dict], None]) -> None:
    f = d / "model.safetensors.index.json"
    data = json.loads(f.read_text())
    edit(data["weight_map"])
    f.write_text(json.dumps(data))


def test_sharded_copy_merges(tmp_path, capsys, llama_family, sharded_copy):
    rc, _, err = run_cli(tmp_path, capsys, linear(llama_family["a"], sharded_copy))
    assert rc == 0, err
    assert len(ModelSource(str(sharded_copy)).tensors) == len(load_file(llama_family["b"] / "model.safetensors"))


def test_index_shard_outside_the_folder(tmp_path, capsys, llama_family, sharded_copy):
    # a real, valid shard sits one level up: still refused, the index may not leave its folder
    shutil.copy(sharded_copy / "model-00001-of-00003.safetensors", tmp_path / "x.safetensors")
    _edit_index(sharded_copy, lambda wm: wm.update({k: "../x.safetensors" for k, v in wm.items()
                                                     if v == "model-00001-of-00003.safetensors"}))
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], sharded_copy))
    assert "model.safetensors.index.json: shard '../x.safetensors' must be a plain file name inside the model folder" in msg


def test_index_absolute_shard(tmp_path, capsys, llama_family, sharded_copy):
    target = str(sharded_copy / "model-00002-of-00003.safetensors")
    _edit_index(sharded_copy, lambda wm: wm.update({k: target for k, v in wm.items()
                                                     if v == "model-00002-of-00003.safetensors"}))
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], sharded_copy))
    assert f"shard '{target}' must be a plain file name" in msg


@pytest.mark.parametrize("name", ["sub/model.safetensors", "..", "a\\b.safetensors", "x\0.safetensors", ""])
def test_index_other_non_plain_names(tmp_path, capsys, llama_family, sharded_copy, name):
    _edit_index(sharded_copy, lambda wm: wm.update({next(iter(wm)): name}))
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], sharded_copy))
    assert "must be a plain file name inside the model folder" in msg


def test_index_missing_shard(tmp_path, capsys, llama_family, sharded_copy):
    (sharded_copy / "model-00003-of-00003.safetensors").unlink()
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], sharded_copy))
    assert "shard model-00003-of-00003.safetensors named in model.safetensors.index.json is missing" in msg


def test_index_tensor_not_in_its_shard(tmp_path, capsys, llama_family, sharded_copy):
    moved = {}

    def edit(wm: dict) -> None:
        name = next(k for k, v in wm.items() if v == "model-00001-of-00003.safetensors")
        wm[name] = moved["to"] = "model-00002-of-00003.safetensors"
        moved["name"] = name

    _edit_index(sharded_copy, edit)
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], sharded_copy))
    assert f"puts tensor '{moved['name']}' in {moved['to']}, which does not hold it" in msg


@pytest.mark.parametrize("weight_map", [[["a", "b"]], {"t": 3}, "x", {}])
def test_index_weight_map_shape(tmp_path, capsys, llama_family, sharded_copy, weight_map):
    f = sharded_copy / "model.safetensors.index.json"
    f.write_text(json.dumps({"weight_map": weight_map}))
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], sharded_copy))
    assert "model.safetensors.index.json" in msg
    assert "weight_map" in msg or "must map a tensor name to a file name" in msg


def test_index_not_an_object(tmp_path, capsys, llama_family, sharded_copy):
    (sharded_copy / "model.safetensors.index.json").write_text("[1, 2]")
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], sharded_copy))
    assert "model.safetensors.index.json" in msg and "must hold a JSON object, got a list" in msg


# ------------------------------------------------------------------------------ JSON side files


@pytest.mark.parametrize("text, expect", [("[1, 2, 3]", "must hold a JSON object, got a list"),
                                          ('"llama"', "must hold a JSON object, got a str"),
                                          ("{bad", "is not valid JSON"),
                                          ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
                                          ('{"n": ' + "9" * 5000 + "}", "is not valid JSON")])
def test_config_json_not_an_object(tmp_path, capsys, llama_family, text, expect):
    bad = tmp_path / "badcfg"
    shutil.copytree(llama_family["b"], bad)
    (bad / "config.json").write_text(text)
    msg = run_bad(tmp_path, capsys, linear(llama_family["a"], bad))
    assert "config.json" in msg and expect in msg and len(msg) < 500


def test_json_size_is_bounded(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"pad": "' + "x" * 2000 + '"}')
    with pytest.raises(MergeError, match=r"is 2011 bytes, more than the 1000-byte limit"):
        read_json_object(f, "config.json", limit=1000)
    assert read_json_object(f, "config.json", limit=3000)["pad"] == "x" * 2000


def test_tokenizer_config_not_an_object(tmp_path, capsys, llama_family):
    bad = tmp_path / "badtok"
    shutil.copytree(llama_family["b"], bad)
    (bad / "tokenizer_config.json").write_text("[]")
    recipe = {**linear(llama_family["a"], bad), "chat_template": "auto"}
    msg = run_bad(tmp_path, capsys, recipe)
    assert "tokenizer_config.json" in msg and "must hold a JSON object, got a list" in msg


def test_tokenizer_json_not_an_object_still_hashes(tmp_path):
    from mergecore.vocab import _signature

    one, two = tmp_path / "one", tmp_path / "two"
    for d, text in ((one, "[1]"), (two, "[2]")):
        d.mkdir()
        (d / "tokenizer.json").write_text(text)
    assert _signature(one) != _signature(two)  # before: AttributeError ('list' has no .get)
