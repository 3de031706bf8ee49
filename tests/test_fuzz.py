"""Property tests: hostile checkpoints and recipes through `mergecore merge`.

Random byte corruptions of a tiny checkpoint's header and data, and random mutations of valid
recipes (values, keys, nesting, aliases), 500 examples each (derandomized: the same examples on
every run). Every run must end in exit 0 with finite output (or, where a source already holds
non-finite values, a warning that says so), or in exit 2 with exactly one `error:` line, within
10 s, leaving nothing behind: never a traceback, a crash or a hang.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mergecore.cli import main

EXAMPLES = int(os.environ.get("MERGECORE_FUZZ_EXAMPLES", "500"))  # CI runs the default
FUZZ = settings(max_examples=EXAMPLES, deadline=10_000, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

LAYERS = 2
HIDDEN = 8


def _write_model(path: Path, seed: int) -> Path:
    """A two-layer Llama-shaped checkpoint written directly (no transformers: fast to copy)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(16, HIDDEN, generator=g),
               "model.norm.weight": torch.ones(HIDDEN),
               "lm_head.weight": torch.randn(16, HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
        tensors[p + "mlp.up_proj.weight"] = torch.randn(2 * HIDDEN, HIDDEN, generator=g)
        tensors[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": LAYERS,
        "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "vocab_size": 16}))
    return path


@pytest.fixture(scope="module")
def fuzz_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-models")
    return {name: _write_model(root / name, seed) for seed, name in enumerate(("base", "a", "b"))}


def _run(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    return rc, err.getvalue()


def _check_contract(rc: int, err: str, out: Path) -> None:
    """exit 0 with finite output (or a warning naming non-finite sources), or exit 2 with one line;
    never a traceback; nothing beside the output folder."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    assert all(ln.startswith(("error: ", "warning: ")) for ln in lines), err
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], leftovers
    if rc == 2:
        assert sum(ln.startswith("error: ") for ln in lines) == 1, err
        assert not out.exists(), err
        return
    assert not any(ln.startswith("error: ") for ln in lines), err
    assert out.is_dir()
    warned = any("non-finite" in ln for ln in lines)
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                if t.is_floating_point() and not warned:
                    assert torch.isfinite(t).all(), (k, err)


# ---------------------------------------------------------------------------------------- headers

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def _corruptions(draw) -> list[tuple[str, Any]]:
    kind = draw(st.sampled_from(["bytes", "header-field", "header-entry", "length", "truncate", "data"]))
    if kind == "bytes":  # flip random bytes, most of them in the header
        return [("bytes", draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=6)))]
    if kind == "header-field":  # one field of one tensor gets a random JSON value
        return [("field", (draw(st.integers(0, 99)), draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"])),
                           draw(_json_values | st.lists(st.integers(-2**40, 2**40), min_size=0, max_size=10))))]
    if kind == "header-entry":  # offsets shifted, swapped or scaled; shapes changed
        return [("entry", (draw(st.integers(0, 99)), draw(st.integers(-4096, 4096)), draw(st.integers(-4096, 4096)),
                           draw(st.booleans())))]
    if kind == "length":
        return [("length", draw(st.integers(0, 2**64 - 1)))]
    if kind == "truncate":
        return [("truncate", draw(st.floats(0, 1)))]
    return [("data", draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=32)))]


def _corrupt(raw: bytes, ops: list[tuple[str, Any]]) -> bytes:
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    names = sorted(k for k in header if k != "__metadata__")
    data = raw[8 + hlen:]

    def pack(h: dict) -> bytes:
        hb = json.dumps(h).encode()
        return struct.pack("<Q", len(hb)) + hb + data

    for kind, arg in ops:
        if kind == "bytes":
            buf = bytearray(raw)
            for where, value in arg:
                span = min(len(buf), 8 + hlen + 64)
                buf[int(where * (span - 1))] = value
            return bytes(buf)
        if kind == "field":
            i, field, value = arg
            header[names[i % len(names)]][field] = value
            return pack(header)
        if kind == "entry":
            i, d_lo, d_hi, reshape = arg
            entry = header[names[i % len(names)]]
            lo, hi = entry["data_offsets"]
            entry["data_offsets"] = [lo + d_lo, hi + d_hi]
            if reshape:
                entry["shape"] = list(reversed(entry["shape"])) + [1]
            return pack(header)
        if kind == "length":
            return struct.pack("<Q", arg) + raw[8:]
        if kind == "truncate":
            return raw[: int(arg * len(raw))]
        if kind == "data":
            buf = bytearray(raw)
            for where, value in arg:
                buf[8 + hlen + int(where * (len(data) - 1))] = value
            return bytes(buf)
    return raw


@FUZZ
@given(ops=_corruptions(), which=st.sampled_from(["base", "a"]))
def test_corrupt_checkpoints_end_cleanly(fuzz_models, ops, which):
    with tempfile.TemporaryDirectory(prefix="fuzz-st-") as tmp:
        tmp = Path(tmp)
        model = tmp / which
        shutil.copytree(fuzz_models[which], model)
        f = model / "model.safetensors"
        f.write_bytes(_corrupt(f.read_bytes(), ops))
        refs = {n: (model if n == which else fuzz_models[n]) for n in ("base", "a", "b")}
        recipe = {"merge_method": "ties", "base_model": str(refs["base"]),
                  "models": [{"model": str(refs[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("a", "b")]}
        (tmp / "r.yml").write_text(yaml.safe_dump(recipe))
        out = tmp / "out"
        rc, err = _run(["merge", str(tmp / "r.yml"), str(out), "--threads", "1", "--quiet"])
        event(f"exit {rc}")
        _check_contract(rc, err, out)


# ---------------------------------------------------------------------------------------- recipes

_scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.sampled_from([0, 1, -1, 2**63, -2**80])
            | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 1e-320, 0.5, 1.0])
            | st.text(max_size=10) | st.sampled_from(["ties", "linear", "self_attn", "mlp", "*", ".inf", "NaN", ""]))


def _base_recipes(models: dict[str, Path]) -> list[dict]:
    b, x, y = (str(models[n]) for n in ("base", "a", "b"))
    return [
        {"merge_method": "linear", "models": [{"model": x, "parameters": {"weight": 0.6}},
                                              {"model": y, "parameters": {"weight": [0.2, 0.8]}}]},
        {"merge_method": "ties", "base_model": b, "parameters": {"normalize": True, "lambda": 1.0},
         "models": [{"model": x, "parameters": {"weight": 0.5, "density": 0.5}},
                    {"model": y, "parameters": {"weight": [{"filter": "self_attn", "value": 0.7}, {"value": 0.3}],
                                                "density": 0.7}}]},
        {"merge_method": "slerp", "base_model": b, "parameters": {"t": [0.0, 0.5, 1.0]},
         "models": [{"model": b}, {"model": x}]},
        {"merge_method": "dare_ties", "base_model": b, "seed": 3,
         "models": [{"model": x, "parameters": {"weight": 1.0, "density": 0.3}}, {"model": y, "parameters": {"weight": 1.0, "density": 0.6}}]},
        {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float16",
         "models": [{"model": x, "parameters": {"weight": 0.5}}, {"model": y, "parameters": {"weight": 0.5}}]},
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": x, "layer_range": [0, 1]}]},
                                                   {"sources": [{"model": y, "layer_range": [1, 2]}]}]},
    ]


def _paths(node: Any, prefix: tuple = (), seen: frozenset = frozenset()) -> list[tuple]:
    """Paths into a recipe tree; stops at shared or recursive nodes (mutations create both)."""
    out = [prefix]
    if id(node) in seen or len(prefix) > 6:
        return out
    seen = seen | {id(node)}
    if isinstance(node, dict):
        for k, v in list(node.items())[:8]:
            out += _paths(v, prefix + (k,), seen)
    elif isinstance(node, list):
        for i, v in enumerate(node[:8]):
            out += _paths(v, prefix + (i,), seen)
    return out


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


@st.composite
def _mutated_recipes(draw, models: dict[str, Path]) -> str:
    recipe = json.loads(json.dumps(draw(st.sampled_from(_base_recipes(models)))))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(recipe)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["value", "value", "key", "delete", "nest", "alias", "list"]))
        if op == "value":
            recipe = _set(recipe, path, draw(_scalars))
        elif op == "key":
            target = _get(recipe, path)
            if isinstance(target, dict):
                target[draw(st.sampled_from(["weight", "densty", "t", "lambda", "gamma", "epsilon", "filter",
                                             "value", "models", "layer_range", "base_model", "x"]))] = draw(_scalars)
        elif op == "delete" and path:
            parent = _get(recipe, path[:-1])
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, list) and parent:
                parent.pop(path[-1])
        elif op == "nest":
            recipe = _set(recipe, path, [_get(recipe, path)] * draw(st.integers(1, 3)))
        elif op == "alias":  # the same object several times: PyYAML writes an anchor and aliases
            shared = _get(recipe, path)
            for _ in range(draw(st.integers(1, 6))):
                shared = [shared] * 9
            other = draw(st.sampled_from(_paths(recipe)))
            recipe = _set(recipe, other, shared)
        elif op == "list":
            recipe = _set(recipe, path, draw(st.lists(_scalars, max_size=5)))
    try:
        return yaml.safe_dump(recipe, sort_keys=False)
    except (yaml.YAMLError, ValueError):
        return "merge_method: [unclosed\n"


@pytest.fixture(scope="module")
def recipe_strategy(fuzz_models):
    return _mutated_recipes(fuzz_models)


@FUZZ
@given(data=st.data())
def test_mutated_recipes_end_cleanly(fuzz_models, recipe_strategy, data):
    text = data.draw(recipe_strategy)
    with tempfile.TemporaryDirectory(prefix="fuzz-recipe-") as tmp:
        tmp = Path(tmp)
        (tmp / "r.yml").write_text(text)
        out = tmp / "out"
        rc, err = _run(["merge", str(tmp / "r.yml"), str(out), "--threads", "1", "--quiet"])
        event(f"exit {rc}")
        _check_contract(rc, err, out)
        assert math.isfinite(len(err)) and len(err) < 4000, err[:300]
