"""mergecore.compat: what keeps a set of models from a tensor-by-tensor merge, all at once."""

from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file, save_file

from mergecore.compat import compatibility
from mergecore.io.source import ModelSource


def test_the_same_architecture_is_compatible(model_factory):
    srcs = {n: ModelSource(str(model_factory("llama", s))) for n, s in (("a", 1), ("b", 2))}
    verdict = compatibility(srcs, "a")
    assert verdict.ok and verdict.problems == []
    assert verdict.architecture == "LlamaForCausalLM" and verdict.tensors == len(srcs["a"].tensors)


def test_every_difference_is_listed(model_factory, tmp_path):
    a = model_factory("llama", 1)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    sd = load_file(str(b / "model.safetensors"))
    del sd["model.norm.weight"]
    sd["extra.weight"] = sd["lm_head.weight"].clone()
    for name in [n for n in sd if "mlp.up_proj" in n]:
        sd[name] = sd[name][:-8].clone()
    save_file(sd, str(b / "model.safetensors"), metadata={"format": "pt"})
    srcs = {"a": ModelSource(str(a)), "b": ModelSource(str(b)), "g": ModelSource(str(model_factory("gpt2", 1)))}
    problems = compatibility(srcs, "a").problems
    assert problems[0] == "architectures differ: 'a' is LlamaForCausalLM, 'b' is LlamaForCausalLM, 'g' is GPT2LMHeadModel"
    assert "'b' lacks 1 tensor(s) 'a' has, e.g. 'model.norm.weight'" in problems
    assert "'b' has 1 tensor(s) 'a' lacks, e.g. 'extra.weight'" in problems
    assert "'model.layers.0.mlp.up_proj.weight' is [64, 32] in 'a' but [56, 32] in 'b'" in problems
    assert "... and 1 more tensors differ in shape between 'a' and 'b'" in problems
    assert any(p.startswith("'g' lacks") for p in problems)
    assert json.dumps(problems)  # plain strings, for any front end
