"""`mergecore merge-adapters`: LoRA adapters of one base (made by peft itself on a tiny Llama or a
tied Qwen2) merged into one adapter that peft loads.

Each method is checked against its equations computed here on the adapters' own factors: cat and
linear give exactly base + Σ w_i ΔW_i (peft's fold of the merged adapter), linear at rank R the
best rank-R truncation of Σ w_i ΔW_i, ties / dare_ties mergecore's own method on the full ΔW_i
truncated, knots the SVD alignment of the concatenated ΔW_i; every refusal is one line, exit 2.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergecore.cli import main
from mergecore.executor import seed_for_tensor
from mergecore.io.adapter import open_source
from mergecore.lora.adapters import AdapterSpec
from mergecore.lora.merge import REPORT, merge_adapters
from mergecore.lora.merge_config import CONFIG_FILE, AdapterMergeConfig
from mergecore.methods import get_method

peft = pytest.importorskip("peft")

KEY = "base_model.model."
WEIGHTS = [0.7, -0.4, 1.2]
CONFIGS = {  # name: LoraConfig arguments (different ranks, scales and targets: the union is merged)
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "b": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "k_proj"],
          "rank_pattern": {"k_proj": 3}, "modules_to_save": ["model.norm"]},
    "c": {"r": 3, "lora_alpha": 3, "target_modules": ["v_proj", "down_proj"]},
}


def _load(path: Path):
    from mergecore.models import load_model

    return load_model(path)


def make_adapter(base: Path, out: Path, seed: int, **kw) -> dict[str, torch.Tensor]:
    """A peft LoRA of `base` with every trainable tensor moved off its init, saved at `out`;
    returns peft's fold (merge_and_unload) as a state dict."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_load(base), peft.LoraConfig(**kw))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape) * 0.1)
        model.save_pretrained(out)
        return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def fold(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(_load(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Each LoRA module's change s·B·A in float64 (base weight name -> ΔW), from the saved file."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            module = key[len(KEY):-len(".lora_A.weight")]
            leaf = module.rpartition(".")[2]
            r = next((v for k, v in cfg["rank_pattern"].items() if module.endswith(k)), cfg["r"])
            alpha = next((v for k, v in cfg["alpha_pattern"].items() if module.endswith(k)), cfg["lora_alpha"])
            scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
            out[f"{module}.weight"] = scale * sd[f"{KEY}{module}.lora_B.weight"].double() @ sd[key].double()
            assert leaf in str(cfg["target_modules"])
    return out


def truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.fixture(scope="module")
def trio(model_factory, tmp_path_factory) -> dict:
    """A tiny Llama base, three peft adapters of it and their folds."""
    root = tmp_path_factory.mktemp("adapters")
    base = model_factory("llama", 0)
    folds = {n: make_adapter(base, root / n, seed=i + 1, **kw) for i, (n, kw) in enumerate(CONFIGS.items())}
    return {"base": base, "root": root, "adapters": [root / n for n in CONFIGS], "folds": folds,
            "deltas": {n: deltas(root / n) for n in CONFIGS}}


def _config(trio, method: str, **kw) -> AdapterMergeConfig:
    specs = [AdapterSpec(str(a), w) for a, w in zip(trio["adapters"], WEIGHTS)]
    return AdapterMergeConfig(specs, str(trio["base"]), method, **kw)


def _merged_deltas(out: Path) -> dict[str, torch.Tensor]:
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and cfg["alpha_pattern"] == cfg["rank_pattern"] and not cfg["use_rslora"]
    return deltas(out)


def _reference(trio, combine) -> dict[str, torch.Tensor]:
    """Per module of the union, `combine([ΔW_i or 0 for each adapter])`."""
    names = sorted({n for d in trio["deltas"].values() for n in d})
    base_sd = load_file(trio["base"] / "model.safetensors")
    out = {}
    for name in names:
        zero = torch.zeros(base_sd[name].shape, dtype=torch.float64)
        out[name] = combine(name, [trio["deltas"][n].get(name, zero) for n in CONFIGS])
    return out


def test_cat_and_linear_are_exact_and_load_in_peft(trio, tmp_path):
    base_sd = _load(trio["base"]).state_dict()
    want = {k: v + sum(w * (trio["folds"][n][k] - v) for w, n in zip(WEIGHTS, CONFIGS)) for k, v in base_sd.items()}
    for method, rank in (("cat", None), ("linear", None), ("linear", 9)):
        out = tmp_path / f"{method}-{rank}"
        report = merge_adapters(_config(trio, method, rank=rank), out)
        got = fold(trio["base"], out)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"{method} {rank}: {k}")
        src = open_source(f"{trio['base']}+{out}")  # mergecore reads it as peft folds it
        for k in src.tensors:
            torch.testing.assert_close(src.read(k), got[k], atol=1e-6, rtol=0, msg=k)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "down_proj"}  # the union
        assert cfg["modules_to_save"] == ["model.norm"] and cfg["base_model_name_or_path"] == str(trio["base"])
        ranks = {r.tensor: r.rank for r in report.lora}
        assert ranks["model.layers.0.self_attn.q_proj.weight"] == 6  # 4 + 2: the concatenation's rank
        assert ranks["model.layers.0.self_attn.v_proj.weight"] == 7 and ranks["model.layers.0.mlp.down_proj.weight"] == 3
        assert all(r.energy == pytest.approx(1.0) for r in report.lora)
        assert {r.tensor for r in report.rows if r.kind == "full"} == {"model.norm.weight"}
        assert (out / REPORT).read_text().count("\n") == len(report.rows) + 1
        assert yaml.safe_load((out / CONFIG_FILE).read_text())["method"] == method


def test_linear_at_rank_r_is_the_best_truncation(trio, tmp_path):
    report = merge_adapters(_config(trio, "linear", rank=2), tmp_path / "out")
    got = _merged_deltas(tmp_path / "out")
    want = _reference(trio, lambda name, ds: sum(w * d for w, d in zip(WEIGHTS, ds)))
    assert got.keys() == want.keys()
    energies = {r.tensor: r.energy for r in report.lora}
    for name, full in want.items():
        torch.testing.assert_close(got[name], truncated(full, 2), atol=1e-5, rtol=0, msg=name)
        s = torch.linalg.svdvals(full)
        assert energies[name] == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
    by_energy = merge_adapters(_config(trio, "linear", energy=0.9), tmp_path / "energy")
    for row in by_energy.lora:  # the fewest components keeping 90% of ‖Σ w_i ΔW_i‖²
        share = torch.cumsum(torch.linalg.svdvals(want[row.tensor]) ** 2, 0)
        share /= share[-1].clone()
        assert row.rank == int((share < 0.9 - 1e-6).sum()) + 1 and row.energy >= 0.9 - 1e-6


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_ties_and_dare_are_mergecore_methods_on_the_full_changes(trio, tmp_path, method):
    params = {"density": 0.5}
    merge_adapters(_config(trio, method, parameters=params, rank=3, seed=7), tmp_path / "out")
    got = _merged_deltas(tmp_path / "out")
    m = get_method(method)
    resolved, _ = m.resolve_params({**params, "weight": WEIGHTS}, 3)

    def combine(name, ds):
        gen = torch.Generator().manual_seed(seed_for_tensor(7, name)) if m.randomized else None
        merged = m([d.float() for d in ds], torch.zeros(ds[0].shape), resolved, generator=gen, tensor_name=name)
        return truncated(merged, 3)

    want = _reference(trio, combine)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=0, msg=name)
    again = merge_adapters(_config(trio, method, parameters=params, rank=3, seed=7), tmp_path / "again")
    assert (again.out / "adapter_model.safetensors").read_bytes() == (tmp_path / "out/adapter_model.safetensors").read_bytes()


def _knots_reference(name: str, ds: list[torch.Tensor], merge) -> torch.Tensor:
    """KnOTS from its equations: [ΔW_1 … ΔW_n] = U Σ [V_1ᵀ … V_nᵀ], X_i = Σ V_iᵀ, ΔW = U·merge(X_i)."""
    u, s, vh = torch.linalg.svd(torch.cat(ds, dim=1), full_matrices=False)
    keep = s > s[0] * 1e-6
    u, s, vh = u[:, keep], s[keep], vh[keep]
    width = ds[0].shape[1]
    # an adapter without the module has V_i = 0 exactly (ΔW_i = U Σ V_iᵀ = 0), not the SVD's 1e-16 noise
    parts = [(s[:, None] * vh[:, i * width:(i + 1) * width]).float() * bool(d.any()) for i, d in enumerate(ds)]
    return u @ merge(name, parts).double()


def test_knots_matches_its_equations(trio, tmp_path):
    params = {"density": 0.6}
    merge_adapters(_config(trio, "knots", parameters=params, rank=3), tmp_path / "ties")
    ties = get_method("ties")
    resolved, _ = ties.resolve_params({**params, "weight": WEIGHTS}, 3)
    want = _reference(trio, lambda name, ds: truncated(_knots_reference(
        name, ds, lambda n, xs: ties(xs, torch.zeros(xs[0].shape), resolved)), 3))
    got = _merged_deltas(tmp_path / "ties")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=0, msg=name)
    # merged linearly, the aligned parts give back Σ w_i ΔW_i: U Σ (Σ_i w_i V_iᵀ) = Σ_i w_i ΔW_i
    merge_adapters(_config(trio, "knots", knots_merge="linear", rank=10), tmp_path / "linear")
    got = _merged_deltas(tmp_path / "linear")
    for name, full in _reference(trio, lambda name, ds: sum(w * d for w, d in zip(WEIGHTS, ds))).items():
        torch.testing.assert_close(got[name], full, atol=1e-5, rtol=0, msg=name)


def test_tied_qwen2_embeddings_merge_whole_with_the_head_as_twin(model_factory, tmp_path):
    """Adapters that train a tied embedding (peft's ensure_weight_tying) merge it linearly in
    modules_to_save, saved with its head twin as peft saves it."""
    base = model_factory("qwen2", 0)
    folds = [make_adapter(base, tmp_path / "e1", 1, r=4, lora_alpha=8, target_modules=["q_proj"],
                          modules_to_save=["embed_tokens"], ensure_weight_tying=True),
             make_adapter(base, tmp_path / "e2", 2, r=2, lora_alpha=2, target_modules=["q_proj", "o_proj"])]
    merge_adapters(AdapterMergeConfig([AdapterSpec(str(tmp_path / "e1"), 0.6), AdapterSpec(str(tmp_path / "e2"), 0.8)],
                                      str(base), "cat"), tmp_path / "out")
    keys = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert torch.equal(keys[f"{KEY}lm_head.weight"], keys[f"{KEY}model.embed_tokens.weight"])
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["ensure_weight_tying"] and set(cfg["modules_to_save"]) == {"model.embed_tokens", "lm_head"}
    base_sd = _load(base).state_dict()
    got = fold(base, tmp_path / "out")
    for k, v in base_sd.items():
        want = v + 0.6 * (folds[0][k] - v) + 0.8 * (folds[1][k] - v)
        torch.testing.assert_close(got[k], want, atol=1e-6, rtol=0, msg=k)


def test_a_lora_on_a_tied_embedding_keeps_its_head_twin(model_factory, tmp_path):
    """An embedding LoRA of a tied base (ensure_weight_tying: peft shares it with the head) merges
    as a LoRA and is saved with the head's twin LoRA, so the PeftModel computes the tied model."""
    base = model_factory("qwen2", 0)
    make_adapter(base, tmp_path / "e1", 1, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                 ensure_weight_tying=True)
    make_adapter(base, tmp_path / "e2", 2, r=2, lora_alpha=2, target_modules=["embed_tokens", "v_proj"],
                 ensure_weight_tying=True)
    specs = [AdapterSpec(str(tmp_path / "e1"), 0.6), AdapterSpec(str(tmp_path / "e2"), 0.8)]
    merge_adapters(AdapterMergeConfig(specs, str(base), "cat"), tmp_path / "out")
    keys = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert keys[f"{KEY}model.embed_tokens.lora_embedding_A"].shape == (6, 96)
    assert torch.equal(keys[f"{KEY}lm_head.lora_A.weight"], keys[f"{KEY}model.embed_tokens.lora_embedding_B"].T)
    srcs = [open_source(f"{base}+{tmp_path / n}") for n in ("e1", "e2", "out")]
    for name in srcs[0].tensors:
        b = srcs[0].unpatched(name).float()
        want = b + 0.6 * (srcs[0].read(name) - b) + 0.8 * (srcs[1].read(name) - b)
        torch.testing.assert_close(srcs[2].read(name), want, atol=1e-6, rtol=0, msg=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(_load(base), tmp_path / "out").eval()
    model = _load(base)
    model.load_state_dict({n: srcs[2].read(n) for n in srcs[2].tensors}, strict=False)
    model.tie_weights()
    ids = torch.tensor([[1, 5, 9, 20, 33, 47, 60, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ the command line


def test_cli_config_file_and_flags_write_the_same_adapter(trio, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(trio["root"], work)
    (work / "merge.yml").write_text(yaml.safe_dump({
        "base_model": str(trio["base"]), "method": "ties", "parameters": {"density": 0.5}, "rank": 3,
        "adapters": [{"adapter": "a", "weight": 0.7}, {"adapter": "b", "weight": -0.4, "parameters": {"density": 0.8}},
                     {"adapter": "c", "weight": 1.2}]}))
    assert main(["merge-adapters", str(work / "merge.yml"), str(tmp_path / "from-config")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in out and "merged by ties" in out
    flags = ["merge-adapters", str(tmp_path / "from-flags"), "--base", str(trio["base"]), "--method", "ties",
             "--rank", "3", "--param", "density=0.5", "-q"]
    for name, w in zip("abc", WEIGHTS):
        flags += ["--adapter", str(work / name), "--weight", str(w)]
    assert main(flags) == 0
    config_bytes = (tmp_path / "from-config/adapter_model.safetensors").read_bytes()
    assert config_bytes != (tmp_path / "from-flags/adapter_model.safetensors").read_bytes()  # b's own density
    (work / "merge.yml").write_text((work / "merge.yml").read_text().replace("0.8", "0.5"))
    assert main(["merge-adapters", str(work / "merge.yml"), str(tmp_path / "from-config"), "--overwrite", "-q"]) == 0
    assert (tmp_path / "from-config/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "from-flags/adapter_model.safetensors").read_bytes()


def run_bad(capsys, *args: str) -> str:
    capsys.readouterr()
    rc = main(["merge-adapters", *map(str, args)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_refusals_are_one_line(trio, model_factory, tmp_path, capsys):
    import transformers as tf

    base, (a, b, _) = trio["base"], trio["adapters"]
    pair = ["--base", base, "--adapter", a, "--adapter", b]
    out = tmp_path / "out"
    torch.manual_seed(0)
    wide = tmp_path / "wide-llama"
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=96)).save_pretrained(wide)
    make_adapter(wide, tmp_path / "wide-adapter", 0, r=2, lora_alpha=2, target_modules=["down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia3 = peft.get_peft_model(_load(base), peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
        ia3.save_pretrained(tmp_path / "ia3")
    make_adapter(base, tmp_path / "dora", 0, r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    cases = [
        ([out, "--base", base, "--adapter", a, "--adapter", tmp_path / "wide-adapter"], "does not fit the base"),
        ([out, "--base", base, "--adapter", a, "--adapter", tmp_path / "ia3"], "not LoRA"),
        ([out, "--base", base, "--adapter", a, "--adapter", tmp_path / "dora"], "DoRA"),
        ([out, *pair, "--rank", "0"], "--rank must be an integer of at least 1"),
        ([out, *pair, "--method", "cat", "--rank", "4"], "method cat keeps every adapter's rank"),
        ([out, *pair, "--method", "nosuch"], "unknown method 'nosuch'"),
        ([out, *pair, "--method", "regmean"], "reads statistics"),
        ([out, *pair, "--method", "ties", "--param", "density=2"], "out of range"),
        ([out, *pair, "--weight", "1"], "--weight is given 1 times for 2 adapters"),
        ([out, "--base", f"{base}+{a}", "--adapter", b], "BASE+ADAPTER"),
        ([out], "give a config file"),
        ([tmp_path, *pair], "not empty"),
    ]
    for args, expected in cases:
        line = run_bad(capsys, *args)
        assert expected in line, (expected, line)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert main(["merge-adapters", *map(str, [out, *pair]), "-q"]) == 0
    assert "already holds a merged LoRA adapter" in run_bad(capsys, out, *pair)
    assert "an extracted LoRA adapter" not in run_bad(capsys, out, *pair)


def test_other_base_names_only_warn(trio, tmp_path, capsys):
    renamed = tmp_path / "renamed"
    shutil.copytree(trio["adapters"][1], renamed)
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/other"}))
    capsys.readouterr()
    rc = main(["merge-adapters", str(tmp_path / "out"), "--base", str(trio["base"]), "--adapter",
               str(trio["adapters"][0]), "--adapter", str(renamed), "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and "warning: the adapters name different bases" in err and "org/other" in err
    line = run_bad(capsys, tmp_path / "out2", "--adapter", str(trio["adapters"][0]), "--adapter", str(renamed))
    assert "give the base model" in line  # and without --base there is no one base to take


def test_cancel_leaves_nothing_and_no_cuda_is_one_line(trio, tmp_path, capsys):
    from mergecore.errors import Cancelled
    from mergecore.events import CancelToken

    cancel = CancelToken()

    def progress(p):
        if p.tensors_done == 3:
            cancel.cancel()

    with pytest.raises(Cancelled):
        merge_adapters(_config(trio, "knots", rank=2), tmp_path / "out", progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []
    if not torch.cuda.is_available():
        line = run_bad(capsys, tmp_path / "out", "--base", trio["base"], "--adapter", trio["adapters"][0],
                       "--device", "cuda")
        assert "no CUDA device" in line
