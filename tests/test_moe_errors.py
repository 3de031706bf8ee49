"""`mergecore moe` refusals: one line, exit status 2, nothing at the output path; cancel and a
failed write leave nothing either; --overwrite replaces only an earlier mixture."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from _moe_helpers import PROMPTS, family, llama, moe_dict, qwen, write_yaml  # noqa: F401
from mergecore.cli import main
from mergecore.errors import Cancelled
from mergecore.events import CancelToken
from mergecore.io.outdir import read_marker, write_marker
from mergecore.moe import build as build_mod
from mergecore.moe.build import build_moe
from mergecore.moe.config import parse_moe_config


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, Path]:
    """Models that do not fit the llama family: another MLP width, a gpt2."""
    root = tmp_path_factory.mktemp("moe-odd")
    return {"wide": family(root / "wide", "llama", experts=0, intermediate=40)["base"],
            "gpt2": family(root / "gpt2", "gpt2", experts=0)["base"]}


def _bad(llama, qwen, odd) -> dict[str, tuple[object, str]]:
    good = moe_dict(llama, PROMPTS)

    def with_(**kw) -> dict:
        return {**good, **kw}

    def expert(i: int, **kw) -> dict:
        experts = [dict(e) for e in good["experts"]]
        experts[i].update(kw)
        return with_(experts=experts)

    return {
        "shape": (expert(1, source_model=str(odd["wide"])), "is [40, 32], the base's is [48, 32]"),
        "architecture": (expert(0, source_model=str(qwen["e0"])), "is a qwen2 model and the base a llama one"),
        "unsupported": (with_(base_model=str(odd["gpt2"])), "is a gpt2 model; mergecore moe builds Mixtral from llama"),
        "k=0": (with_(experts_per_token=0), "experts_per_token must be between 1 and the number of experts (3), got 0"),
        "k>n": (with_(experts_per_token=4), "experts_per_token must be between 1 and the number of experts (3), got 4"),
        "k not int": (with_(experts_per_token="two"), "experts_per_token: Input should be a valid integer"),
        "no prompts": (expert(2, positive_prompts=None), "has no positive_prompts; gate_mode hidden builds"),
        "one expert": (with_(experts=good["experts"][:1], experts_per_token=1), "needs at least 2 experts, got 1"),
        "same prompts": (with_(experts=[{**e, "positive_prompts": ["x"]} for e in good["experts"]]),
                         "every expert has the same prompts"),
        "unknown key": (with_(gate_modes="hidden"), "unknown key 'gate_modes'"),
        "gate mode": (with_(gate_mode="learned"), "unknown gate_mode 'learned'"),
        "mixtral shared": (with_(architecture="mixtral", shared_experts=[good["experts"][0]]),
                           "Mixtral has no shared experts"),
        "qwen no shared": ({**moe_dict(qwen, [["python"], ["story"]])}, "exactly one shared expert"),
        "missing": (expert(0, source_model=str(llama["base"]) + "-nope"), "not found"),
        "no tokenizer": (with_(base_model=str(llama["e0"]), gate_mode="cheap_embed"),
                         "tokenized with the base model's tokenizer"),
        "yaml": ("base_model: [unclosed\nexperts: []\n", "line 2, column 8: malformed YAML"),
        "top": ("- just a list\n", "expected a mapping at the top level"),
    }


CASES = ["shape", "architecture", "unsupported", "k=0", "k>n", "k not int", "no prompts", "one expert",
         "same prompts", "unknown key", "gate mode", "mixtral shared", "qwen no shared", "missing", "no tokenizer",
         "yaml", "top"]


def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, llama, qwen, odd, tmp_path, capsys):
    data, expected = _bad(llama, qwen, odd)[case]
    cfg = tmp_path / "moe.yml"
    cfg.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["moe", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    _nothing_at(tmp_path / "out")


def test_bad_device_and_bad_output_folder_are_refused(llama, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "moe.yml", moe_dict(llama, PROMPTS))
    assert main(["moe", str(cfg), str(tmp_path / "out"), "--device", "tpu9", "-q"]) == 2
    assert "unknown device 'tpu9'; use cpu or cuda" in capsys.readouterr().err
    _nothing_at(tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["moe", str(cfg), str(tmp_path / "mine"), "-q"]) == 2
    assert "not empty and was not written by mergecore" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["moe", str(cfg), str(llama["e1"] / "sub"), "-q"]) == 2
    assert "inside the source model folder" in capsys.readouterr().err


def test_overwrite_replaces_only_an_earlier_mixture(llama, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "moe.yml", {**moe_dict(llama, PROMPTS), "gate_mode": "random"})
    out = tmp_path / "out"
    assert main(["moe", str(cfg), str(out), "-q"]) == 0
    assert main(["moe", str(cfg), str(out), "-q"]) == 2
    assert "already holds a mixture of experts; pass --overwrite" in capsys.readouterr().err
    assert main(["moe", str(cfg), str(out), "-q", "--overwrite"]) == 0 and read_marker(out) == "moe"
    merged = tmp_path / "merged"
    merged.mkdir()
    write_marker(merged, "merge")
    (merged / "model.safetensors").write_bytes(b"x")
    assert main(["moe", str(cfg), str(merged), "-q", "--overwrite"]) == 2
    assert "holds a merge, not a mixture of experts" in capsys.readouterr().err
    assert (merged / "model.safetensors").read_bytes() == b"x"


@pytest.mark.parametrize("stage", ["gates", "writing"])
def test_cancel_leaves_nothing(llama, tmp_path, stage):
    cancel = CancelToken()
    seen = []

    def progress(p) -> None:
        seen.append(p.stage)
        if p.stage == stage:
            cancel.cancel()

    with pytest.raises(Cancelled):
        build_moe(parse_moe_config(yaml.safe_dump(moe_dict(llama, PROMPTS))), tmp_path / "new" / "out",
                  progress=progress, cancel=cancel)
    assert stage in seen
    assert not (tmp_path / "new").exists()  # the parent it made is gone too


def test_a_failure_while_writing_leaves_nothing(llama, tmp_path, monkeypatch, capsys):
    calls = []
    real = build_mod._expert_tensor

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "_expert_tensor", failing)
    cfg = write_yaml(tmp_path / "moe.yml", moe_dict(llama, PROMPTS))
    assert main(["moe", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "moe failed: No space left on device" in err[0]
    _nothing_at(tmp_path / "out")


def test_the_example_config_is_valid():
    """examples/moe-smollm2-domains.yml parses (its models are built by build-family)."""
    from mergecore.moe.config import load_moe_config

    config = load_moe_config(Path(__file__).resolve().parents[1] / "examples" / "moe-smollm2-domains.yml")
    assert (config.gate_mode, len(config.experts), config.experts_per_token) == ("hidden", 3, 1)
