"""`BASE+ADAPTER` references (issue 16, part 1): PEFT LoRA adapters, made by peft itself, applied
tensor by tensor while a merge streams.

Reads through `AdapterSource` must equal PEFT's own `merge_and_unload` (float32), a recipe over
`base+adapter` references must equal the same recipe over the folded experts, and every adapter
that cannot be applied exactly is refused in one line with exit status 2 and nothing written.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from _merge_helpers import assert_close, load_weights, run_bad, run_cli
from mergecore.cli import main
from mergecore.compat import compatibility
from mergecore.errors import MergeError
from mergecore.io.adapter import AdapterSource, open_source, source_folders
from mergecore.io.source import ModelSource, resolve_model_path
from mergecore.merging import merge
from mergecore.side_files import CARD_FILE, RECIPE_FILE, portable_checkpoint

peft = pytest.importorskip("peft")


def make_adapter(base: Path, out: Path, config, *, seed: int = 0, folded: Path | None = None,
                 safe: bool = True) -> dict[str, torch.Tensor]:
    """Wrap `base` with peft, give every trainable tensor (lora_B included) random values, save the
    adapter at `out`; returns merge_and_unload's state dict (and saves it at `folded`)."""
    from mergecore.models import load_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load_model(base), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape) * 0.1)
        model.save_pretrained(out, safe_serialization=safe)
        merged = model.merge_and_unload()
    if folded is not None:
        merged.save_pretrained(folded)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def lora(**kw) -> "peft.LoraConfig":
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **kw})


CASES = {  # name: (arch, LoraConfig arguments)
    "plain": ("llama", {}),
    "rslora-patterns": ("llama", {"use_rslora": True, "rank_pattern": {"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 3},
                                  "alpha_pattern": {"v_proj": 3}}),
    "embeddings-modules_to_save": ("llama", {"target_modules": ["q_proj", "embed_tokens"],
                                             "modules_to_save": ["lm_head", "post_attention_layernorm"]}),
    "qwen2-biases": ("qwen2", {"target_modules": ["q_proj", "k_proj", "v_proj"], "bias": "all",
                               "lora_bias": True}),
    "qwen2-lora_only": ("qwen2", {"target_modules": ["k_proj", "down_proj"], "bias": "lora_only",
                                  "modules_to_save": ["input_layernorm"]}),
    "qwen2-dora": ("qwen2", {"target_modules": ["q_proj", "o_proj", "gate_proj"], "use_dora": True}),
    "gpt2-fan_in_fan_out": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
}


@pytest.fixture(scope="module")
def adapters(model_factory, tmp_path_factory) -> dict[str, tuple[Path, Path, dict[str, torch.Tensor]]]:
    """name -> (base, adapter folder, PEFT's folded state dict)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, (arch, kw) in CASES.items():
        base = model_factory(arch, 0)
        out[name] = (base, root / name, make_adapter(base, root / name, lora(**kw), seed=len(out)))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_reads_equal_peft_merge_and_unload(adapters, case):
    base, adapter, folded = adapters[case]
    src = open_source(f"{base}+{adapter}")
    plain = ModelSource(str(base))
    assert isinstance(src, AdapterSource) and src.adapted
    assert src.tensors.keys() == plain.tensors.keys() and src.config == plain.config
    for name, info in src.tensors.items():
        got = src.read(name)
        assert got.dtype == info.dtype and tuple(got.shape) == info.shape
        assert_close(got, folded[name], f"{case}: {name}", atol=1e-6)
    changed = [n for n in src.adapted if not torch.equal(src.read(n), plain.read(n))]
    assert sorted(changed) == sorted(src.adapted), "every adapted tensor differs from the base"
    assert src.folders == (base.resolve(), adapter.resolve())


def test_what_each_case_adapts(adapters):
    """The cases reach what they claim: embeddings, whole modules, LoRA biases, DoRA, Conv1D."""
    def source(case):
        base, adapter, _ = adapters[case]
        return open_source(f"{base}+{adapter}")

    emb = source("embeddings-modules_to_save")
    assert emb.patches["model.embed_tokens.weight"].transpose
    assert {"lm_head.weight", "model.layers.0.post_attention_layernorm.weight"} <= set(emb.replaced)
    rs = source("rslora-patterns")
    assert rs.patches["model.layers.0.mlp.down_proj.weight"].a.shape[0] == 2
    assert rs.patches["model.layers.1.self_attn.q_proj.weight"].a.shape[0] == 3
    assert rs.patches["model.layers.0.self_attn.v_proj.weight"].scale == pytest.approx(3 / 2)
    qb = source("qwen2-biases")
    assert qb.patches["model.layers.0.self_attn.q_proj.bias"].a is None  # lora_bias
    assert "model.layers.0.self_attn.k_proj.bias" in qb.patches
    assert source("qwen2-dora").patches["model.layers.0.self_attn.o_proj.weight"].magnitude is not None
    g = source("gpt2-fan_in_fan_out")
    assert g.settings.fan_in_fan_out and g.patches["transformer.h.0.attn.c_attn.weight"].transpose


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merge_of_adapters_equals_merge_of_folded_experts(model_factory, tmp_path, capsys, method):
    """A recipe of base+A and base+B (relative references, resolved against the recipe's folder)
    gives the tensors of the same recipe over merge_and_unload's folded checkpoints."""
    base = model_factory("llama", 0)
    work = tmp_path / "models"
    work.mkdir()
    shutil.copytree(base, work / "base")
    make_adapter(base, work / "ad_a", lora(), seed=1, folded=work / "folded_a")
    make_adapter(base, work / "ad_b", lora(target_modules=["k_proj", "o_proj", "up_proj"], modules_to_save=["norm"]),
                 seed=2, folded=work / "folded_b")

    def recipe(a: str, b: str) -> dict:
        params = {"weight": 0.6, "density": 0.7} if method == "ties" else {"weight": 0.6}
        return {"merge_method": method, **({"base_model": "base"} if method == "ties" else {}),
                "models": [{"model": a, "parameters": params}, {"model": b, "parameters": {**params, "weight": 0.4}}],
                "dtype": "float32"}

    (work / "adapters.yml").write_text(yaml.safe_dump(recipe("base+ad_a", "base+ad_b"), sort_keys=False))
    (work / "folded.yml").write_text(yaml.safe_dump(recipe("folded_a", "folded_b"), sort_keys=False))
    assert main(["merge", str(work / "adapters.yml"), str(tmp_path / "dry"), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    assert main(["merge", str(work / "adapters.yml"), str(tmp_path / "from_adapters"), "--quiet"]) == 0
    assert main(["merge", str(work / "folded.yml"), str(tmp_path / "from_folded"), "--quiet"]) == 0
    got, want = load_weights(tmp_path / "from_adapters"), load_weights(tmp_path / "from_folded")
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], name, atol=1e-6)
    out = tmp_path / "from_adapters"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert [m["model"] for m in yaml.safe_load((out / RECIPE_FILE).read_text())["models"]] == ["base+ad_a", "base+ad_b"]
    assert "`base+ad_a`" in (out / CARD_FILE).read_text()
    assert not any(p.name.startswith("adapter") for p in out.iterdir())


def test_export_replays_with_both_sides_in_models(model_factory, tmp_path):
    """An export renames each side of base+adapter to models/<folder>, and the unpacked folder
    replays to the same tensors."""
    base = model_factory("llama", 0)
    make_adapter(base, tmp_path / "adapter", lora(), seed=3)
    ref = f"{base}+{tmp_path / 'adapter'}"
    result = merge(yaml_recipe({"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 0.8},
                                "models": [{"model": ref, "parameters": {"weight": 1.0}}]}), tmp_path / "merged")
    ported = portable_checkpoint(tmp_path / "merged", paths=source_folders(result.plan.sources))
    assert [m.model for m in ported.recipe.models] == [f"models/{base.name}+models/adapter"]
    assert set(ported.local_models) == {f"models/{base.name}", "models/adapter"}
    unpacked = tmp_path / "unpacked"
    (unpacked / "models").mkdir(parents=True)
    for new, where in ported.local_models.items():
        (unpacked / new).symlink_to(where)
    (unpacked / RECIPE_FILE).write_text(ported.recipe_text)
    merge(unpacked / RECIPE_FILE, tmp_path / "replayed")
    want, got = load_weights(tmp_path / "merged"), load_weights(tmp_path / "replayed")
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert "models/adapter" in ported.card


def yaml_recipe(data: dict):
    from mergecore.recipe import recipe_from_dict

    return recipe_from_dict(data, "recipe")


def test_compat_and_a_folder_with_plus_in_its_name(model_factory, adapters, tmp_path, capsys):
    base, adapter, _ = adapters["plain"]
    src = {"base+adapter": open_source(f"{base}+{adapter}"), "base": ModelSource(str(base))}
    assert compatibility(src, "base").ok
    odd = tmp_path / "my+model"
    shutil.copytree(base, odd)
    assert type(open_source(str(odd))) is ModelSource  # an existing folder is a model, not base+adapter
    rc, _, err = run_cli(tmp_path, capsys, {"merge_method": "linear", "parameters": {"weight": 0.5},
                                            "models": [{"model": str(odd)}, {"model": str(base)}]})
    assert rc == 0, err


def test_whole_model_loaders_refuse_in_one_line_and_the_fold_they_suggest_works(adapters, tmp_path):
    """collect-stats and the searches load whole models by folder: they say how to fold first,
    and that fold (a passthrough of the one model) is PEFT's merge_and_unload."""
    from mergecore.search.config import model_ref

    for refuse in (lambda: resolve_model_path("org/model+org/adapter"), lambda: model_ref("base+adapter", tmp_path)):
        with pytest.raises(MergeError) as err:
            refuse()
        assert "passthrough" in str(err.value) and "\n" not in str(err.value)
    base, adapter, folded = adapters["embeddings-modules_to_save"]
    merge(yaml_recipe({"merge_method": "passthrough", "models": [{"model": f"{base}+{adapter}"}]}), tmp_path / "fold")
    got = load_weights(tmp_path / "fold")
    assert got.keys() == ModelSource(str(base)).tensors.keys()
    for name, t in got.items():
        assert_close(t, folded[name], name, atol=1e-6)


# ------------------------------------------------------------------------------ refused, one line


def _edit_config(adapter: Path, dest: Path, **changes) -> Path:
    shutil.copytree(adapter, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


def _one_model(ref: str) -> dict:
    return {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}


def test_adapter_for_another_model_is_refused(model_factory, adapters, tmp_path, capsys):
    """Another shape (a Llama with a wider MLP) or a module the base lacks (GPT-2's on a Llama)."""
    import transformers as tf

    other = tmp_path / "wide-llama"
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    tf.LlamaForCausalLM(config).save_pretrained(other)
    _, llama_adapter, _ = adapters["plain"]
    line = run_bad(tmp_path, capsys, _one_model(f"{other}+{llama_adapter}"))
    assert "does not fit the base" in line and "down_proj" in line and "[32, 64]" in line and "[32, 48]" in line
    _, gpt2_adapter, _ = adapters["gpt2-fan_in_fan_out"]
    line = run_bad(tmp_path, capsys, _one_model(f"{model_factory('llama', 0)}+{gpt2_adapter}"))
    assert "does not fit the base" in line and "c_attn" in line


def test_bad_adapters_are_refused(model_factory, adapters, tmp_path, capsys):
    base, adapter, _ = adapters["plain"]
    no_config = tmp_path / "no-config"
    shutil.copytree(adapter, no_config)
    (no_config / "adapter_config.json").unlink()
    cases = {
        no_config: "has no adapter_config.json",
        _edit_config(adapter, tmp_path / "rank", r=8): "rank 4 x 4 in its weights but r = 8",
        _edit_config(adapter, tmp_path / "replicated", layer_replication=[[0, 2], [1, 4]]): "'layer_replication' is set",
        _edit_config(adapter, tmp_path / "pissa", init_lora_weights="pissa"): "rewrote the base weights",
        _edit_config(adapter, tmp_path / "dora", use_dora=True): "no DoRA magnitude",
        _edit_config(adapter, tmp_path / "no-type", peft_type=None): "has no 'peft_type'",
    }
    for folder, expected in cases.items():
        assert expected in run_bad(tmp_path, capsys, _one_model(f"{base}+{folder}")), folder
    assert "single '+'" in run_bad(tmp_path, capsys, _one_model(f"{base}+{adapter}+{adapter}"))
    assert "not found" in run_bad(tmp_path, capsys, _one_model(f"{base}+{tmp_path / 'missing'}"))


def test_other_adapter_types_and_pickles_are_refused(model_factory, tmp_path, capsys):
    base = model_factory("llama", 0)
    make_adapter(base, tmp_path / "ia3", peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]))
    make_adapter(base, tmp_path / "loha", peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    make_adapter(base, tmp_path / "pickled", lora(), safe=False)
    assert "IA3 (peft_type), not LoRA" in run_bad(tmp_path, capsys, _one_model(f"{base}+{tmp_path / 'ia3'}"))
    assert "LOHA (peft_type), not LoRA" in run_bad(tmp_path, capsys, _one_model(f"{base}+{tmp_path / 'loha'}"))
    line = run_bad(tmp_path, capsys, _one_model(f"{base}+{tmp_path / 'pickled'}"))
    assert "adapter_model.bin" in line and "pickle" in line


def test_convolution_lora_is_refused(model_factory, tmp_path, capsys):
    base = model_factory("vit", 0)
    make_adapter(base, tmp_path / "conv", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["projection"]))
    assert "convolution" in run_bad(tmp_path, capsys, _one_model(f"{base}+{tmp_path / 'conv'}"))


def test_hub_ids_on_both_sides(adapters, tmp_path, monkeypatch):
    """Hub ids on either side go through the Hub download (faked here with Hub-cache folders);
    the card links both and descends from the base."""
    import huggingface_hub

    base, adapter, folded = adapters["plain"]
    cache = {}
    for repo, folder in (("org/base", base), ("org/adapter", adapter)):
        snap = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
        shutil.copytree(folder, snap)
        cache[repo] = snap
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(cache[repo_id]))
    result = merge(yaml_recipe(_one_model("org/base+org/adapter")), tmp_path / "merged")
    got = load_weights(tmp_path / "merged")
    assert all(torch.equal(got[n], folded[n]) for n in got)
    card = (tmp_path / "merged" / CARD_FILE).read_text()
    assert "base_model: [org/base]" in card or "base_model: org/base" in card
    assert "[org/base](https://huggingface.co/org/base) + [org/adapter](https://huggingface.co/org/adapter)" in card
    ported = portable_checkpoint(tmp_path / "merged", paths=source_folders(result.plan.sources))
    assert [m.model for m in ported.recipe.models] == ["org/base+org/adapter"] and not ported.local_models


def test_a_bfloat16_base_is_rounded_once_and_keeps_its_dtype(model_factory, tmp_path):
    """The delta is added in float32 and the sum rounded to the base's dtype once: PEFT's float32
    fold of the same weights, rounded to bfloat16."""
    from mergecore.models import load_model

    base = tmp_path / "bf16"
    load_model(model_factory("llama", 0)).to(torch.bfloat16).save_pretrained(base)
    folded = make_adapter(base, tmp_path / "adapter", lora(), seed=5)  # peft folds a float32 load of the base
    src = open_source(f"{base}+{tmp_path / 'adapter'}")
    for name in src.tensors:
        got = src.read(name)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, folded[name].to(torch.bfloat16)), name


def test_older_modules_to_save_names(adapters, tmp_path):
    """Adapters that name a whole tensor `...X.modules_to_save.default.weight` (as PEFT keeps it in
    memory) or `...X.base_layer.weight` read the same as PEFT 0.21's `...X.weight`."""
    from safetensors.torch import load_file, save_file

    base, adapter, folded = adapters["embeddings-modules_to_save"]
    shutil.copytree(adapter, tmp_path / "old")
    saved = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("lm_head.weight", "lm_head.modules_to_save.default.weight")
               .replace("post_attention_layernorm.weight", "post_attention_layernorm.modules_to_save.weight"): v
               for k, v in saved.items()}
    assert renamed.keys() != saved.keys()
    save_file(renamed, tmp_path / "old" / "adapter_model.safetensors")
    src = open_source(f"{base}+{tmp_path / 'old'}")
    assert {"lm_head.weight", "model.layers.1.post_attention_layernorm.weight"} <= set(src.replaced)
    for name in src.tensors:
        assert_close(src.read(name), folded[name], name, atol=1e-6)
