"""End-to-end merges through `mergecore.merge` and the CLI on tiny checkpoints of six architectures.

Every merged tensor is compared with the same arithmetic done by hand on the input files, and
the output is reloaded with transformers and run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from _merge_helpers import assert_close, cli, frankenmerge, leftovers, linear_recipe, load_weights, run_forward, write_recipe
from mergecore.io.source import ModelSource
from mergecore.merging import merge
from mergecore.methods import get_method
from mergecore.plan import plan_merge
from mergecore.recipe import recipe_from_dict

ARCHS = ("llama", "mistral", "qwen2", "gpt2", "bert", "vit")


# ------------------------------------------------------------------------------ all archs


@pytest.mark.parametrize("entry", ["api", "cli"])
@pytest.mark.parametrize("arch", ARCHS)
def test_linear_merge_every_arch(arch, entry, model_factory, tmp_path):
    a = model_factory(arch, 1, base_seed=0)
    b = model_factory(arch, 2, base_seed=0)
    out = tmp_path / "merged"
    data = linear_recipe(a, b)
    if entry == "api":
        result = merge(recipe_from_dict(data), out)
        assert result.tensors == len(load_weights(a)) and result.shards == 1
        assert result.out_dir == out.absolute()
    else:
        assert cli(write_recipe(tmp_path / "r.yml", data), out) == 0

    wa, wb, wo = load_weights(a), load_weights(b), load_weights(out)
    assert set(wo) == set(wa)
    for name, t in wo.items():
        assert_close(t, 0.5 * wa[name] + 0.5 * wb[name], name)
        assert not torch.equal(t, wa[name]), name  # really a merge, not a copy
    cfg_in = json.loads((a / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out["architectures"] == cfg_in["architectures"]
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "mergecore_recipe.yml", "README.md"} <= files
    assert ("generation_config.json" in files) == (a / "generation_config.json").is_file()
    assert recipe_from_dict(yaml.safe_load((out / "mergecore_recipe.yml").read_text())) == recipe_from_dict(data)
    assert leftovers(out) == []
    run_forward(out, arch)


# ------------------------------------------------------------------------------ parameters


def test_weight_curve_gives_exact_per_layer_weights(llama_family, tmp_path):
    a, b = llama_family["a"], llama_family["b"]
    out = tmp_path / "o"
    merge(recipe_from_dict(linear_recipe(a, b, wa=[0.0, 1.0], wb=[1.0, 0.0])), out)
    wa, wb, wo = load_weights(a), load_weights(b), load_weights(out)
    for name, t in wo.items():
        if ".layers." in name:
            i = int(name.split(".")[2])
            w = i / 3
        else:
            w = 0.0  # embeddings, final norm and head take the curve's first value
        expected = (w * wa[name].double() + (1 - w) * wb[name].double()).float()
        assert_close(t, expected, name)
    # layer 0 is model b exactly, layer 3 model a exactly
    assert torch.equal(wo["model.layers.0.mlp.up_proj.weight"], wb["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(wo["model.layers.3.mlp.up_proj.weight"], wa["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(wo["lm_head.weight"], wb["lm_head.weight"])


def test_weight_curve_value_in_output_without_normalize(llama_family, tmp_path):
    """weight [0, 1] on a lone model without normalisation: output / input == i/3 per layer."""
    a = llama_family["a"]
    out = tmp_path / "o"
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": [0.0, 1.0]}}],
              "parameters": {"normalize": False}}
    merge(recipe_from_dict(recipe), out)
    wa, wo = load_weights(a), load_weights(out)
    for i in range(4):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        assert_close(wo[name], wa[name] * (i / 3), name)
    assert torch.count_nonzero(wo["model.embed_tokens.weight"]) == 0


def test_filters_give_attention_and_mlp_different_values(llama_family, tmp_path):
    a, b = llama_family["a"], llama_family["b"]
    out = tmp_path / "o"
    wa_spec = [{"filter": "self_attn", "value": 0.8}, {"filter": "mlp", "value": [0.0, 0.6]}, {"value": 0.5}]
    wb_spec = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [1.0, 0.4]}, {"value": 0.5}]
    merge(recipe_from_dict(linear_recipe(a, b, wa=wa_spec, wb=wb_spec)), out)
    wa, wb, wo = load_weights(a), load_weights(b), load_weights(out)
    seen = set()
    for name, t in wo.items():
        if "self_attn" in name:
            w = 0.8
        elif "mlp" in name:
            w = 0.6 * int(name.split(".")[2]) / 3
        else:
            w = 0.5
        seen.add(round(w, 6))
        expected = (w * wa[name].double() + (1 - w) * wb[name].double()).float()
        assert_close(t, expected, name)
    assert len(seen) >= 5


def test_sharded_input_and_output(model_factory, tmp_path):
    a = model_factory("llama", 1, base_seed=0, shard_size="20KB")
    b = model_factory("llama", 2, base_seed=0, shard_size="20KB")
    assert len(list(a.glob("model-*.safetensors"))) > 3
    out = tmp_path / "o"
    result = merge(recipe_from_dict(linear_recipe(a, b, wa=0.25, wb=0.75)), out, shard_size=20_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert result.shards == len(shards) > 1
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wa, wb = load_weights(a), load_weights(b)
    assert set(index["weight_map"]) == set(wa)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in wa.values())
    # sharded inputs are the same weights as the unsharded fixtures
    plain = load_weights(model_factory("llama", 1, base_seed=0))
    assert all(torch.equal(plain[k], wa[k]) for k in plain)
    for name, t in load_weights(out).items():
        assert_close(t, 0.25 * wa[name] + 0.75 * wb[name], name)
    run_forward(out, "llama")


def test_sharded_output_viacli(llama_family, tmp_path):
    r = write_recipe(tmp_path / "r.yml", linear_recipe(llama_family["a"], llama_family["b"]))
    out = tmp_path / "o"
    assert cli(r, out, "--shard-size", "30KB", "--threads", "3") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(load_weights(llama_family["a"]))


# ------------------------------------------------------------------------------ slices


def test_passthrough_frankenmerge_changes_depth(llama_family, tmp_path):
    base = llama_family["base"]
    out = tmp_path / "o"
    merge(recipe_from_dict(frankenmerge(base)), out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    w_in, w_out = load_weights(base), load_weights(out)
    source_layer = [0, 1, 2, 1, 2, 3]
    rests = {n.split(".", 3)[3] for n in w_in if n.startswith("model.layers.")}
    assert len(w_out) == len(w_in) + 2 * len(rests)
    for i, src in enumerate(source_layer):
        for rest in rests:
            assert torch.equal(w_out[f"model.layers.{i}.{rest}"], w_in[f"model.layers.{src}.{rest}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(w_out[name], w_in[name])
    # layer 3 of the output is layer 1 of the input
    assert torch.equal(w_out["model.layers.3.self_attn.q_proj.weight"], w_in["model.layers.1.self_attn.q_proj.weight"])
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    run_forward(out, "llama")


def test_qwen2_slices_keep_layer_types_consistent(model_factory, tmp_path):
    base = model_factory("qwen2", 0)
    cfg_in = json.loads((base / "config.json").read_text())
    assert len(cfg_in["layer_types"]) == cfg_in["num_hidden_layers"] == 4
    out = tmp_path / "o"
    assert cli(write_recipe(tmp_path / "r.yml", frankenmerge(base)), out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    assert len(cfg["layer_types"]) == 6
    assert cfg.get("max_window_layers", 6) <= 6
    w_in, w_out = load_weights(base), load_weights(out)
    assert torch.equal(w_out["model.layers.5.self_attn.q_proj.bias"], w_in["model.layers.3.self_attn.q_proj.bias"])
    run_forward(out, "qwen2")


def test_slices_can_shrink_depth_and_merge_ranges(llama_family, tmp_path):
    """Two 2-layer slices that each merge a and b with a curve: output has 4 layers, the curve
    spans each slice separately."""
    a, b = str(llama_family["a"]), str(llama_family["b"])
    recipe = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}},
                         {"model": b, "layer_range": [2, 4], "parameters": {"weight": [1.0, 0.0]}}]},
            {"sources": [{"model": a, "layer_range": [3, 4]},
                         {"model": b, "layer_range": [0, 1]}],
             "parameters": {"weight": 0.5}},
        ],
    }
    out = tmp_path / "o"
    merge(recipe_from_dict(recipe), out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    wa, wb, wo = load_weights(a), load_weights(b), load_weights(out)
    rest = "mlp.down_proj.weight"
    # slice 0: out layer j <- a[j] with weight j, b[j+2] with weight 1-j  (t = j / 1)
    assert torch.equal(wo[f"model.layers.0.{rest}"], wb[f"model.layers.2.{rest}"])
    assert torch.equal(wo[f"model.layers.1.{rest}"], wa[f"model.layers.1.{rest}"])
    # slice 1: a[3] and b[0] at 0.5 each
    assert_close(wo[f"model.layers.2.{rest}"], 0.5 * wa[f"model.layers.3.{rest}"] + 0.5 * wb[f"model.layers.0.{rest}"])
    run_forward(out, "llama")


# ------------------------------------------------------------------------------ other methods


def _method_defaults(name: str) -> dict:
    return {p.name: p.default for p in get_method(name).params if not p.required}


def _expected_by_hand(name: str, models: list[Path], base: Path, per_model: dict[str, list], global_params: dict,
                      t_of=None) -> dict[str, torch.Tensor]:
    """Call the method function directly on the loaded tensors, tensor by tensor."""
    method = get_method(name)
    ws = [load_weights(m) for m in models]
    wbase = load_weights(base)
    out = {}
    for tname, bt in wbase.items():
        params = {**_method_defaults(name), **global_params}
        if t_of is not None:
            params.update(t_of(tname))
        for k, vals in per_model.items():
            params[k] = list(vals)
        kwargs = {p.arg: params[p.name] for p in method.params}
        out[tname] = method.func([w[tname].float() for w in ws], bt.float(), **kwargs)
    return out


def test_ties_end_to_end_matches_direct_call(llama_family, tmp_path):
    base, a, b = llama_family["base"], llama_family["a"], llama_family["b"]
    recipe = {
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 0.7, "density": 0.5}},
                   {"model": str(b), "parameters": {"weight": 0.4, "density": 0.8}}],
        "parameters": {"lambda": 0.9},
    }
    out = tmp_path / "o"
    merge(recipe_from_dict(recipe), out)
    expected = _expected_by_hand("ties", [a, b], base, {"weight": [0.7, 0.4], "density": [0.5, 0.8]}, {"lambda": 0.9})
    wo = load_weights(out)
    assert set(wo) == set(expected)
    for k, v in expected.items():
        assert_close(wo[k], v, k, atol=1e-6)
    # and it is not trivially the base
    assert not torch.equal(wo["model.layers.0.mlp.up_proj.weight"], load_weights(base)["model.layers.0.mlp.up_proj.weight"])
    run_forward(out, "llama")


def test_task_arithmetic_end_to_end_matches_direct_call_and_formula(llama_family, tmp_path):
    base, a, b = llama_family["base"], llama_family["a"], llama_family["b"]
    recipe = {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 0.6}}, {"model": str(b), "parameters": {"weight": 0.3}}],
    }
    out = tmp_path / "o"
    assert cli(write_recipe(tmp_path / "r.yml", recipe), out) == 0
    expected = _expected_by_hand("task_arithmetic", [a, b], base, {"weight": [0.6, 0.3]}, {})
    wo, wa, wb, w0 = load_weights(out), load_weights(a), load_weights(b), load_weights(base)
    for k, v in expected.items():
        assert_close(wo[k], v, k)
        # the textbook formula: base + sum w_i (theta_i - base)
        assert_close(wo[k], w0[k] + 0.6 * (wa[k] - w0[k]) + 0.3 * (wb[k] - w0[k]), k, atol=1e-6)


def test_slerp_end_to_end_with_curve_matches_direct_call(llama_family, tmp_path):
    base, a = llama_family["base"], llama_family["a"]
    recipe = {
        "merge_method": "slerp", "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(a)}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]},
    }
    out = tmp_path / "o"
    merge(recipe_from_dict(recipe), out)

    def t_of(name: str) -> dict:
        if "self_attn" in name:
            return {"t": 0.2 + 0.6 * int(name.split(".")[2]) / 3}
        return {"t": 0.5}

    expected = _expected_by_hand("slerp", [a], base, {}, {}, t_of=t_of)
    wo = load_weights(out)
    for k, v in expected.items():
        assert_close(wo[k], v, k, atol=1e-6)
    # the plan used the same t values
    plan = plan_merge(recipe_from_dict(recipe))
    ts = {j.out_name: j.params["t"] for j in plan.jobs}
    assert ts["model.layers.2.self_attn.v_proj.weight"] == pytest.approx(0.6)
    assert ts["model.layers.2.mlp.up_proj.weight"] == 0.5


def test_plan_reads_headers_only(llama_family):
    """Planning opens sources without reading tensor data (no .bin maps, no fds)."""
    plan = plan_merge(recipe_from_dict(linear_recipe(llama_family["a"], llama_family["b"])))
    assert len(plan.jobs) == 39
    assert all(isinstance(s, ModelSource) and not s._fds for s in plan.sources.values())
    assert plan.layer_sources == [(str(llama_family["a"]), i) for i in range(4)]
