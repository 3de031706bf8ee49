"""`mergecore extract-lora`: a fine-tune minus its base as a PEFT LoRA adapter that peft loads.

Fine-tunes here are a tiny base plus deltas of a known rank (or known singular values) on some
linear layers, a changed norm, bias and embedding; the adapter, loaded by peft on the base and
folded (`merge_and_unload`), must give the fine-tune's weights and logits back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergecore.cli import main
from mergecore.errors import Cancelled, MergeError
from mergecore.events import CancelToken
from mergecore.io.outdir import MARKER, remove_live_temp_dirs, write_marker
from mergecore.lora import factor
from mergecore.lora.extract import REPORT, extract_lora

WEIGHTS = "model.safetensors"


def _orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def _with_spectrum(shape: tuple[int, int], sigma: list[float], g: torch.Generator) -> torch.Tensor:
    """A matrix of `shape` whose nonzero singular values are exactly `sigma`."""
    u, v = _orthonormal(shape[0], len(sigma), g), _orthonormal(shape[1], len(sigma), g)
    return (u * torch.tensor(sigma, dtype=torch.float64)) @ v.T


def make_ft(base: Path, out: Path, deltas: dict[str, torch.Tensor], *, shifts: tuple[str, ...] = (),
            drop: tuple[str, ...] = (), reshape: Optional[str] = None) -> Path:
    """A 'fine-tune' of `base`: each tensor of `deltas` plus its delta, each tensor named by a
    substring of `shifts` plus 0.1 · noise (norms, biases, embeddings)."""
    shutil.copytree(base, out)
    sd = load_file(out / WEIGHTS)
    g = torch.Generator().manual_seed(7)
    for name, delta in deltas.items():
        sd[name] = (sd[name].double() + delta).float()
    for name in list(sd):
        if any(s in name for s in shifts):
            sd[name] = sd[name] + 0.1 * torch.randn(sd[name].shape, generator=g)
    for name in drop:
        del sd[name]
    if reshape:
        sd[reshape] = sd[reshape][:-1].clone()
    save_file(sd, out / WEIGHTS, metadata={"format": "pt"})
    return out


def _rank4(base: Path, names: list[str], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with safe_open(str(base / WEIGHTS), "pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
    return {n: _with_spectrum(s, [0.8, 0.5, 0.3, 0.2], g) for n, s in shapes.items()}


def _load(path: Path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path)


def _folded(base: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load(base), adapter).merge_and_unload()


def _config(out: Path) -> dict:
    return json.loads((out / "adapter_config.json").read_text())


def _keys(out: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


IDS = torch.tensor([[1, 5, 9, 20, 33, 47, 60, 2]])

CASES = {  # arch: (rank-4 deltas, other changed tensors, modules kept whole, expected target_modules)
    "llama": ([f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)]
              + ["model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"],
              ("layers.1.input_layernorm", "model.norm", "embed_tokens"),
              {"model.layers.1.input_layernorm", "model.norm", "model.embed_tokens"},
              {"q_proj", "model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"}),
    "qwen2": ([f"model.layers.{i}.self_attn.v_proj.weight" for i in range(4)] + ["model.layers.3.mlp.up_proj.weight"],
              ("layers.1.input_layernorm", "embed_tokens", "layers.2.self_attn.v_proj.bias"),
              {"model.layers.1.input_layernorm", "model.embed_tokens", "lm_head"},  # tied: the head too
              {"v_proj", "model.layers.3.mlp.up_proj"}),
    "gpt2": ([f"transformer.h.{i}.attn.c_attn.weight" for i in range(4)],  # Conv1D: fan_in_fan_out
             ("h.1.ln_1", "wte", "h.3.attn.c_attn.bias"), {"transformer.h.1.ln_1", "transformer.wte", "lm_head"},
             {"c_attn"}),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_exact_rank_is_reproduced_by_peft(arch, model_factory, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = model_factory(arch, 0)
    lowrank, shifts, whole, targets = CASES[arch]
    ft = make_ft(base, tmp_path / "ft", _rank4(base, lowrank), shifts=shifts)
    report = extract_lora(str(ft), str(base), tmp_path / "out", rank=4)
    out = tmp_path / "out"

    folded, want = _folded(base, out), _load(ft)
    got_sd, want_sd = folded.state_dict(), want.state_dict()
    assert set(got_sd) == set(want_sd)
    for k, v in want_sd.items():
        torch.testing.assert_close(got_sd[k], v, atol=2e-6, rtol=1e-5, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(folded(IDS).logits, want(IDS).logits, atol=1e-5, rtol=1e-5)

    cfg = _config(out)
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["peft_type"]) == (4, 4, {}, "LORA")
    assert set(cfg["target_modules"]) == targets
    assert set(cfg["modules_to_save"]) == whole
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    assert cfg["bias"] == ("lora_only" if arch in ("qwen2", "gpt2") else "none")  # those layers have biases
    assert sorted(r.tensor for r in report.lora) == sorted(lowrank)
    for row in report.lora:
        assert row.rank == 4 and row.energy == pytest.approx(1.0, abs=1e-6) and row.error < 1e-5
    # unchanged tensors are left out: every key is of a changed module (or a factorised layer's bias)
    changed = {n.rpartition(".")[0] for n in lowrank} | whole
    assert all(any(f"base_model.model.{m}." in k for m in changed) for k in _keys(out))
    # exactly the keys and shapes peft itself saves for this config
    peft_out = tmp_path / "by-peft"
    get_peft_model(_load(base), LoraConfig.from_pretrained(str(out))).save_pretrained(peft_out)
    assert _keys(peft_out) == _keys(out)
    rows = (out / REPORT).read_text().splitlines()
    assert rows[0] == "tensor,kind,shape,rank,retained_energy,relative_error,svd" and len(rows) == len(report.rows) + 1


def test_rank_2_keeps_the_energy_of_the_top_singular_values(model_factory, tmp_path):
    base = model_factory("llama", 0)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight"]
    ft = make_ft(base, tmp_path / "ft", _rank4(base, names, seed=3))
    report = extract_lora(str(ft), str(base), tmp_path / "out", rank=2)
    ft_sd, base_sd = load_file(ft / WEIGHTS), load_file(base / WEIGHTS)
    rows = {r.tensor: r for r in report.lora}
    assert set(rows) == set(names)
    for name in names:
        s = torch.linalg.svdvals((ft_sd[name] - base_sd[name]).double())
        energy = float((s[:2] ** 2).sum() / (s ** 2).sum())
        assert rows[name].rank == 2
        assert rows[name].energy == pytest.approx(energy, rel=1e-5)
        assert rows[name].error == pytest.approx((1 - energy) ** 0.5, rel=1e-4)
    table = report.table()
    assert names[0] in table and f"{rows[names[0]].energy:8.4f}" in table


SPECTRA = {  # tensor: (singular values, rank kept at energy 0.9)
    "model.layers.0.self_attn.q_proj.weight": ([4.0, 2.0, 1.0, 0.5], 2),  # 20/21.25 = 0.94
    "model.layers.1.self_attn.q_proj.weight": ([1.0, 1.0, 1.0, 1.0], 4),  # 0.75 at 3
    "model.layers.2.self_attn.q_proj.weight": ([10.0, 0.1], 1),
    "model.layers.3.self_attn.q_proj.weight": ([3.0, 3.0, 0.2], 2),
}


@pytest.fixture
def spectral_ft(model_factory, tmp_path) -> tuple[Path, Path]:
    base = model_factory("llama", 0)
    g = torch.Generator().manual_seed(5)
    deltas = {n: _with_spectrum((32, 32), sigma, g) for n, (sigma, _) in SPECTRA.items()}
    return base, make_ft(base, tmp_path / "ft", deltas)


def test_energy_picks_a_rank_per_layer(spectral_ft, tmp_path):
    base, ft = spectral_ft
    report = extract_lora(str(ft), str(base), tmp_path / "out", energy=0.9)
    ranks = {r.tensor: r.rank for r in report.lora}
    assert ranks == {n: k for n, (_, k) in SPECTRA.items()}
    cfg = _config(tmp_path / "out")
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2  # the most common rank
    pattern = {"model.layers.1.self_attn.q_proj": 4, "model.layers.2.self_attn.q_proj": 1}
    assert cfg["rank_pattern"] == pattern and cfg["alpha_pattern"] == pattern  # scale 1 everywhere
    assert all(r.energy >= 0.9 for r in report.lora)
    # peft builds each layer at its own rank, and the fold is the truncated difference
    folded = _folded(base, tmp_path / "out").state_dict()
    ft_sd, base_sd = load_file(ft / WEIGHTS), load_file(base / WEIGHTS)
    for name, (_, k) in SPECTRA.items():
        u, s, vh = torch.linalg.svd((ft_sd[name] - base_sd[name]).double())
        want = base_sd[name].double() + (u[:, :k] * s[:k]) @ vh[:k]
        torch.testing.assert_close(folded[name].double(), want, atol=1e-5, rtol=1e-5)

    capped = extract_lora(str(ft), str(base), tmp_path / "capped", energy=0.9, rank=3)
    assert {r.tensor: r.rank for r in capped.lora}["model.layers.1.self_attn.q_proj.weight"] == 3
    full = extract_lora(str(ft), str(base), tmp_path / "all", energy=1.0)
    assert [r.rank for r in full.lora] == [4, 4, 2, 3]  # the exact ranks, not the side


def test_randomized_svd_is_deterministic_and_exact_on_low_rank(spectral_ft, tmp_path, monkeypatch):
    base, ft = spectral_ft
    monkeypatch.setattr(factor, "EXACT_MAX_DIM", 4)  # the tiny layers take the randomized path
    monkeypatch.setattr(factor, "START_Q", 1)  # and --energy grows its guess by doubling
    one = extract_lora(str(ft), str(base), tmp_path / "one", energy=0.9)
    assert {r.svd for r in one.lora} == {"randomized"}
    assert {r.tensor: r.rank for r in one.lora} == {n: k for n, (_, k) in SPECTRA.items()}
    two = extract_lora(str(ft), str(base), tmp_path / "two", energy=0.9)
    a, b = ((p / "adapter_model.safetensors").read_bytes() for p in (tmp_path / "one", tmp_path / "two"))
    assert a == b
    exact = torch.get_rng_state()
    fixed = extract_lora(str(ft), str(base), tmp_path / "fixed", rank=4)
    assert torch.equal(torch.get_rng_state(), exact)  # the caller's random state is left alone
    assert {r.svd for r in fixed.lora} == {"randomized"} and all(r.error < 1e-5 for r in fixed.lora)


def test_modules_limits_the_factorised_layers_and_keeps_the_rest_whole(model_factory, tmp_path):
    base = model_factory("llama", 0)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
             "model.layers.1.mlp.down_proj.weight"]
    ft = make_ft(base, tmp_path / "ft", _rank4(base, names))
    report = extract_lora(str(ft), str(base), tmp_path / "out", rank=4, modules=["q_proj,v_proj"])
    cfg = _config(tmp_path / "out")
    assert set(cfg["target_modules"]) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    assert cfg["modules_to_save"] == ["model.layers.1.mlp.down_proj"]  # changed, not selected: nothing dropped
    assert {r.tensor: r.kind for r in report.rows} == dict(zip(names, ["lora", "lora", "full"]))
    folded, want = _folded(base, tmp_path / "out").state_dict(), load_file(ft / WEIGHTS)
    for name in names:
        torch.testing.assert_close(folded[name], want[name], atol=2e-6, rtol=1e-5)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["extract-lora", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_the_table_and_saves_it(model_factory, tmp_path, capsys):
    base = model_factory("llama", 0)
    ft = make_ft(base, tmp_path / "ft", _rank4(base, ["model.layers.0.self_attn.q_proj.weight"]),
                 shifts=("model.norm",))
    code, out, err = _cli(capsys, "--model", str(ft), "--base", str(base), str(tmp_path / "out"), "--rank", "2",
                          "--dtype", "bfloat16")
    assert code == 0, err
    assert "model.layers.0.self_attn.q_proj.weight" in out and "wrote " in out and REPORT in out
    assert {k: v for k, v in _keys(tmp_path / "out").items() if "lora" in k} == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (2, 32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (32, 2)}
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # an earlier extraction is replaced with --overwrite only
    code, _, err = _cli(capsys, "--model", str(ft), "--base", str(base), str(tmp_path / "out"), "--rank", "1")
    assert code == 2 and "already holds an extracted LoRA adapter; pass --overwrite" in err
    code, _, err = _cli(capsys, "--model", str(ft), "--base", str(base), str(tmp_path / "out"), "--rank", "1",
                        "--overwrite", "-q")
    assert code == 0, err
    assert _config(tmp_path / "out")["r"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", "out"]


def _siblings(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.fixture
def pair(model_factory, tmp_path) -> tuple[Path, Path]:
    base = model_factory("llama", 0)
    return base, make_ft(base, tmp_path / "ft", _rank4(base, ["model.layers.0.self_attn.q_proj.weight"]))


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "--rank must be an integer of at least 1, got 0"),
    (["--energy", "1.5"], "--energy must be in (0, 1]"),
    (["--energy", "0"], "--energy must be in (0, 1]"),
    (["--energy", "nan"], "--energy must be in (0, 1]"),
    ([], "give --rank R, --energy E or both"),
    (["--rank", "4", "--modules", "q_proj", "qq_proj"],
     "--modules: unknown module 'qq_proj'; the linear modules are: down_proj, gate_proj, k_proj, lm_head, o_proj, "
     "q_proj, up_proj, v_proj"),
    (["--rank", "4", "--modules", "input_layernorm"], "names 'model.layers.0.input_layernorm', which is not a linear"),
    (["--rank", "4", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["--rank", "4", "--device", "tpu"], "unknown device 'tpu'; use cpu or cuda"),
    (["--rank", "4", "--device", "meta"], "unsupported device 'meta'; use cpu or cuda"),
])
def test_bad_arguments_are_one_line(pair, tmp_path, capsys, args, message):
    base, ft = pair
    code, out, err = _cli(capsys, "--model", str(ft), "--base", str(base), str(tmp_path / "out"), *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert _siblings(tmp_path) == ["ft"]


def test_mismatched_models_are_refused(pair, model_factory, tmp_path, capsys):
    base, ft = pair
    mistral = model_factory("mistral", 0)
    shorter = make_ft(base, tmp_path / "shorter", {}, reshape="model.layers.2.mlp.up_proj.weight")
    same = make_ft(base, tmp_path / "same", {})
    capsys.readouterr()  # building the models wrote to stderr
    for model, other, message in [
        (mistral, base, "--model '" + str(mistral) + "' is a mistral but --base '" + str(base) + "' is a llama"),
        (shorter, base, "do not match: 'model.layers.2.mlp.up_proj.weight' is [64, 32] in 'base' but [63, 32] in "
                        "'model'"),
        (same, base, "--model and --base hold identical weights; there is nothing to extract"),
        (ft, base.parent / "missing", "not found"),
    ]:
        code, _, err = _cli(capsys, "--model", str(model), "--base", str(other), str(tmp_path / "out"), "--rank", "4")
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert _siblings(tmp_path) == ["ft", "same", "shorter"]


def test_output_path_rules(pair, tmp_path, capsys):
    base, ft = pair
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "merged").mkdir()
    write_marker(tmp_path / "merged", "merge")
    for out, message in [(tmp_path / "full", "is not empty and was not written by mergecore"),
                         (tmp_path / "merged", "holds a merge, not an extracted LoRA adapter; choose a new folder"),
                         (ft, "is the folder of a source model"),
                         (ft / "sub", "is inside the source model folder")]:
        code, _, err = _cli(capsys, "--model", str(ft), "--base", str(base), str(out), "--rank", "4", "--overwrite")
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and (tmp_path / "merged" / MARKER).is_file()
    assert _siblings(tmp_path) == ["ft", "full", "merged"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine; missing parents are created
    extract_lora(str(ft), str(base), tmp_path / "empty", rank=1)
    extract_lora(str(ft), str(base), tmp_path / "new" / "deep", rank=1)
    assert (tmp_path / "new" / "deep" / "adapter_model.safetensors").is_file()


def test_nothing_is_written_on_cancel_or_failure(pair, tmp_path, monkeypatch):
    base, ft = pair
    cancel = CancelToken()

    def progress(p) -> None:
        if p.tensors_done == 5:
            cancel.cancel()

    with pytest.raises(Cancelled):
        extract_lora(str(ft), str(base), tmp_path / "a" / "out", rank=4, progress=progress, cancel=cancel)
    assert _siblings(tmp_path) == ["ft"]

    import mergecore.lora.extract as extract

    def broken(path, entries, **kw):  # the disk fills up halfway through the weights
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(extract, "write_safetensors", broken)
    with pytest.raises(OSError):
        extract_lora(str(ft), str(base), tmp_path / "a" / "out", rank=4)
    assert _siblings(tmp_path) == ["ft"]  # no OUT, no temporary folder, no parent it made
    monkeypatch.undo()

    def interrupted(path, entries, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_lora(str(ft), str(base), tmp_path / "out", rank=4)
    assert _siblings(tmp_path) == ["ft"]

    def signalled(path, entries, **kw):  # SIGTERM's handler removes the live temporary folders
        remove_live_temp_dirs()
        return 0

    monkeypatch.setattr(extract, "write_safetensors", signalled)
    with pytest.raises(Cancelled, match="extraction stopped by a signal; nothing was written"):
        extract_lora(str(ft), str(base), tmp_path / "out", rank=4)
    assert _siblings(tmp_path) == ["ft"]


def test_a_layer_whose_bias_alone_changed_is_kept_whole(model_factory, tmp_path):
    base = model_factory("qwen2", 0)
    ft = make_ft(base, tmp_path / "ft", _rank4(base, ["model.layers.0.self_attn.q_proj.weight"]),
                 shifts=("layers.1.self_attn.k_proj.bias",))
    extract_lora(str(ft), str(base), tmp_path / "out", rank=4)
    cfg = _config(tmp_path / "out")
    assert cfg["modules_to_save"] == ["model.layers.1.self_attn.k_proj"] and cfg["bias"] == "none"
    assert set(cfg["target_modules"]) == {"model.layers.0.self_attn.q_proj"}
    got, want = _folded(base, tmp_path / "out").state_dict(), load_file(ft / WEIGHTS)
    for name in ("model.layers.1.self_attn.k_proj.bias", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(got[name], want[name], atol=2e-6, rtol=1e-5)


def test_library_errors_are_merge_errors(pair, tmp_path):
    base, ft = pair
    with pytest.raises(MergeError, match="no selected linear layer changed"):
        extract_lora(str(ft), str(base), tmp_path / "out", rank=4, modules=["k_proj"])
    with pytest.raises(MergeError, match="--modules names no module"):
        extract_lora(str(ft), str(base), tmp_path / "out", rank=4, modules=[" , "])


def test_an_adapter_reference_is_re_extracted_at_a_lower_rank(model_factory, tmp_path):
    base = model_factory("llama", 0)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    ft = make_ft(base, tmp_path / "ft", _rank4(base, names), shifts=("model.norm",))
    extract_lora(str(ft), str(base), tmp_path / "r4", rank=4)
    again = extract_lora(f"{base}+{tmp_path / 'r4'}", str(base), tmp_path / "r2", rank=2)
    direct = extract_lora(str(ft), str(base), tmp_path / "direct", rank=2)
    assert [(r.tensor, r.kind, r.rank) for r in again.rows] == [(r.tensor, r.kind, r.rank) for r in direct.rows]
    for a, b in zip(again.lora, direct.lora):
        assert a.energy == pytest.approx(b.energy, abs=1e-5)
    with pytest.raises(MergeError, match="inside the source model folder"):  # the adapter's folder is a source too
        extract_lora(f"{base}+{tmp_path / 'r4'}", str(base), tmp_path / "r4" / "sub", rank=2)


def test_device_cuda_runs_the_svds_there_or_says_why_not(pair, tmp_path, monkeypatch):
    base, ft = pair
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="--device cuda: no CUDA device is available here; use --device cpu"):
            extract_lora(str(ft), str(base), tmp_path / "gpu", rank=4, device="cuda")
        assert _siblings(tmp_path) == ["ft"]
        return
    monkeypatch.setattr(factor, "EXACT_MAX_DIM", 4)  # the randomized path too, with its seeded CUDA draws
    gpu = extract_lora(str(ft), str(base), tmp_path / "gpu", rank=4, device="cuda")
    cpu = extract_lora(str(ft), str(base), tmp_path / "cpu", rank=4)
    assert [r.rank for r in gpu.lora] == [r.rank for r in cpu.lora] and all(r.error < 1e-5 for r in gpu.lora)
    folded = _folded(base, tmp_path / "gpu").state_dict()
    want = load_file(ft / WEIGHTS)
    for name in want:
        torch.testing.assert_close(folded[name], want[name], atol=1e-5, rtol=1e-5)
