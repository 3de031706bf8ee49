"""DAM / layer-wise AdaMerging: the merge formula, the loss terms by hand, which tensors get
coefficients, training on a miniature fmnist-vit family, recipe replay through the engine,
resume, the background job, LM support on the tiny Llama, the CLI and its errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from mergecore.cli import main
from mergecore.errors import Cancelled, MergeError
from mergecore.eval import Evaluator, load_model
from mergecore.events import CancelToken
from mergecore.merging import merge
from mergecore.plan import plan_merge
from mergecore.methods import get_method
from mergecore.methods.dam import combine, save_coefficients
from mergecore.recipe import load_recipe, recipe_from_dict
from mergecore.search.dam import losses
from mergecore.search.dam.merger import find_slots
from mergecore.search.dam.run import DAMConfig, DAMJob, load_dam_config, prepare_dam, run_dam

# ----------------------------------------------------------------------------- formula


def test_combine_column_layer_tanh_and_task_vectors_by_hand():
    w1 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w2 = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 1.0, -2.0]])
    base = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    c = torch.tensor([[[0.2, 0.5, 1.0]], [[0.8, -0.5, 0.0]]])  # [R=2, 1, in=3]: one per input column
    want = torch.empty(2, 3)
    for r in range(2):
        for j in range(3):
            want[r, j] = c[0, 0, j] * w1[r, j] + c[1, 0, j] * w2[r, j]
    assert torch.equal(combine(c, [w1, w2], None), want)  # W = Σ_i W_i · diag(c_i)
    # one scalar per model (layer granularity)
    cl = torch.tensor([0.3, 0.7]).view(2, 1, 1)
    assert torch.allclose(combine(cl, [w1, w2], None), 0.3 * w1 + 0.7 * w2)
    # tanh transform
    assert torch.allclose(combine(cl, [w1, w2], None, transform="tanh"), math.tanh(0.3) * w1 + math.tanh(0.7) * w2)
    # task vectors (AdaMerging): W0 + Σ λ_i (W_i − W0)
    assert torch.allclose(combine(cl, [w1, w2], base, form="task_vectors"),
                          base + 0.3 * (w1 - base) + 0.7 * (w2 - base))
    # the base as a merge input (row 0)
    c3 = torch.tensor([0.5, 0.25, 0.25]).view(3, 1, 1)
    assert torch.allclose(combine(c3, [w1, w2], base, include_base=True), 0.5 * base + 0.25 * w1 + 0.25 * w2)
    # bias: one scalar per model; Conv1D weights [in, out]: one per row (input dim 0)
    b1, b2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    assert torch.allclose(combine(torch.tensor([[0.5], [2.0]]), [b1, b2], None), 0.5 * b1 + 2.0 * b2)
    cc = torch.tensor([[[2.0], [0.0]], [[1.0], [1.0]]])  # [R, in=2, 1] against [in=2, out=3]
    assert torch.allclose(combine(cc, [w1, w2], None), torch.stack([2 * w1[0] + w2[0], w2[1]]))
    with pytest.raises(MergeError, match="3 rows but there are 2"):
        combine(c3, [w1, w2], None)
    with pytest.raises(MergeError, match="do not broadcast"):
        combine(torch.ones(2, 1, 4), [w1, w2], None)


def test_the_dam_method_reads_the_artifact(tmp_path):
    w1, w2, base = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    c = torch.rand(2, 1, 3)
    save_coefficients(tmp_path / "c.safetensors", {"l.weight": c}, {"transform": "tanh"})
    m = get_method("dam")
    art = {"coefficients": tmp_path / "c.safetensors"}
    out = m([w1, w2], base, {"transform": "tanh"}, tensor_name="l.weight", artifacts=art)
    assert torch.allclose(out, torch.tanh(c[0]) * w1 + torch.tanh(c[1]) * w2)
    assert torch.equal(m([w1, w2], base, {"transform": "tanh"}, tensor_name="other", artifacts=art), base)
    with pytest.raises(MergeError, match="trained with transform 'tanh' but the recipe says 'none'"):
        m([w1, w2], base, {"transform": "none"}, tensor_name="l.weight", artifacts=art)
    with pytest.raises(MergeError, match="no 'coefficients' entry"):
        m([w1, w2], base, {}, tensor_name="l.weight", artifacts={})
    with pytest.raises(MergeError, match="l.weight.*3 merge inputs"):
        m([w1, w2, w1], base, {"transform": "tanh"}, tensor_name="l.weight", artifacts=art)


# ----------------------------------------------------------------------------- losses


def test_loss_terms_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    T = 2.0
    ps, pt = (s / T).softmax(-1), (t / T).softmax(-1)
    fwd = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
    rev = (ps * (ps.log() - pt.log())).sum(-1).mean() * T * T
    assert losses.kl_loss(s, t, temperature=T) == pytest.approx(float(fwd), rel=1e-5)
    assert losses.kl_loss(s, t, temperature=T, direction="reverse") == pytest.approx(float(rev), rel=1e-5)
    assert losses.kl_loss(s, s.clone()) == pytest.approx(0.0, abs=1e-6)
    # top-k teachers: the merged logits are gathered at the teacher's indices
    tv, ti = t.topk(3, dim=-1)
    sk = s.gather(-1, ti)
    pk, qk = (tv / T).softmax(-1), (sk / T).softmax(-1)
    want = (pk * (pk.log() - qk.log())).sum(-1).mean() * T * T
    assert losses.kl_loss(s, tv, ti.to(torch.int32), temperature=T) == pytest.approx(float(want), rel=1e-5)
    assert losses.mse_loss(s, t) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-6)
    assert losses.mse_loss(s, tv, ti) == pytest.approx(float(((sk - tv) ** 2).mean()), rel=1e-6)
    p = s.softmax(-1)
    assert losses.entropy_loss(s) == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    # Σ_l Σ_{i<j} cos(c_i^l, c_j^l), L1, L2
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])  # 3 models, one tensor
    b = torch.tensor([[3.0], [-1.0]])  # 2 models, scalars: cos = -1
    want_cos = (1 / math.sqrt(2)) + 0.0 + (1 / math.sqrt(2)) - 1.0
    assert float(losses.cosine_term([a, b])) == pytest.approx(want_cos, rel=1e-6)
    assert float(losses.l1_term([a, b])) == pytest.approx(9.0)
    assert float(losses.l2_term([a, b])) == pytest.approx(1 + 1 + 1 + 4 + 9 + 1)


# ----------------------------------------------------------------------------- which tensors


def test_slots_per_architecture():
    import transformers as tf

    from conftest import _tiny_config

    def slots(arch, **kw):
        cfg, cls = _tiny_config(arch)
        torch.manual_seed(0)
        return {s.name: s for s in find_slots(cls(cfg), **kw)}

    llama = slots("llama")
    q = llama["model.layers.0.self_attn.q_proj.weight"]
    assert q.coef_shape == (1, 32) and q.shape == (32, 32)
    assert llama["model.layers.0.mlp.down_proj.weight"].coef_shape == (1, 64)
    assert llama["lm_head.weight"].coef_shape == (1, 32)  # untied head: merged, as in the paper
    assert not any("norm" in n or "embed" in n for n in llama)
    assert "lm_head.weight" not in slots("llama", lm_head=False)
    layer = slots("llama", granularity="layer")
    assert set(layer) == set(llama) and all(s.coef_shape == (1, 1) for s in layer.values())
    with_norms = slots("llama", merge_norms=True, merge_embeddings=True)
    assert with_norms["model.norm.weight"].coef_shape == (32,)
    assert with_norms["model.embed_tokens.weight"].coef_shape == (1, 32)
    # a tied head is the embedding matrix: never a coefficient set of its own
    qwen = slots("qwen2")
    assert "lm_head.weight" not in qwen and "model.embed_tokens.weight" not in qwen
    assert qwen["model.layers.0.self_attn.q_proj.bias"].coef_shape == (1,)
    assert "model.embed_tokens.weight" in slots("qwen2", merge_embeddings=True)
    # GPT-2 Conv1D: weight [in, out], one coefficient per input row
    gpt2 = slots("gpt2")
    assert gpt2["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert gpt2["transformer.h.0.attn.c_attn.weight"].coef_shape == (32, 1)
    vit = slots("vit", exclude=["^classifier\\."])
    assert not any(n.startswith("classifier") for n in vit) and "vit.embeddings.patch_embeddings.projection.weight" not in vit
    assert slots("vit", merge_embeddings=True)["vit.embeddings.patch_embeddings.projection.weight"].coef_shape == (1, 1, 1, 1)
    with pytest.raises(MergeError, match="no tensor gets DAM coefficients"):
        slots("llama", exclude=["model", "lm_head"])
    assert tf  # transformers is importable


# ----------------------------------------------------------------------------- miniature fmnist-vit


def _write_cfg(path: Path, fam, **over) -> Path:
    data = {
        "base_model": str(fam.base),
        "models": [str(p) for p in fam.experts.values()],
        "train_tasks": str(fam.val_tasks_file),
        "eval_tasks": str(fam.val_tasks_file),
        "steps": 4, "batch_size": 16, "examples_per_task": 32, "eval_every": 2, "eval_subset": 0.5,
        "checkpoint_every": 2, "eval_batch_size": 128, "seed": 0,
    }
    for k, v in over.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_training_lowers_the_kl_loss(tiny_fmnist_family, tmp_path):
    cfg, root = load_dam_config(_write_cfg(tmp_path / "dam.yml", tiny_fmnist_family, steps=8, batch_size=24,
                                           examples_per_task=24, eval_every=0, eval_at_start=False,
                                           optimizer={"lr": 0.02}))
    events = []
    summary = run_dam(cfg, root, tmp_path / "out", on_event=events.append)
    steps = [e.data for e in events if e.kind == "dam.step"]
    assert [s["step"] for s in steps] == list(range(1, 9))
    first, last = steps[0]["terms"]["kl"], steps[-1]["terms"]["kl"]
    assert last < first  # full-batch steps: the KL to the experts goes down
    s0 = steps[0]
    assert set(s0["terms"]) == {"kl", "cos", "l1", "l2", *(f"kl/{t}" for t in tiny_fmnist_family.experts)}
    assert s0["terms"]["kl"] == pytest.approx(sum(s0["terms"][f"kl/{t}"] for t in tiny_fmnist_family.experts))
    assert s0["lr"] == 0.02 and s0["examples_seen"] == 4 * 24 and s0["tokens_seen"] == 0
    # initial coefficients: 1/N everywhere, so l1 = Σ |c| = (number of coefficients) / 4 before the first step
    assert summary["teachers"]["mode"] == "cache" and summary["steps"] == 8
    assert [e.kind for e in events].count("dam.eval") == 1  # only the final one
    assert not any(n.startswith("classifier") for n in summary["tensors"])  # task heads are never merged


def test_replay_equals_search_and_resume_equals_uninterrupted(tiny_fmnist_family, tmp_path):
    fam = tiny_fmnist_family
    cfg_path = _write_cfg(tmp_path / "dam.yml", fam, steps=6, final_tasks=str(fam.tasks_file))
    cfg, root = load_dam_config(cfg_path)
    run = prepare_dam(cfg, root, tmp_path / "a")
    summary = run.run()
    # chosen on all of eval_tasks among the best periodic state, the last one and weight averaging (the start)
    val = summary["validation"]
    assert summary["eval"]["final"] and summary["eval"]["label"] == val["chosen"]
    assert summary["start"] == "weight averaging"
    assert summary["eval"]["mean"] == max(c["mean"] for c in val["candidates"])
    assert val["candidates"][-1]["label"] == "weight averaging" and val["candidates"][-1]["source"] == "data-free"
    assert [e["step"] for e in summary["evals"]] == [0, 2, 4]
    out = tmp_path / "a"
    for f in ("recipe.yml", "dam_coefficients.safetensors", "result.json", "dam_log.jsonl", "dam_checkpoint.safetensors"):
        assert (out / f).is_file(), f
    recipe = load_recipe(out / "recipe.yml")
    assert recipe.merge_method == "dam" and recipe.artifacts == {"coefficients": "dam_coefficients.safetensors"}
    assert recipe.parameters["transform"] == "none"
    # replay through the engine from another working directory: the artifact resolves next to the recipe
    assert main(["merge", str(out / "recipe.yml"), str(tmp_path / "merged"), "--quiet"]) == 0
    replayed = load_model(tmp_path / "merged")
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(replayed(pixel_values=x).logits, run.module(pixel_values=x).logits, atol=1e-6)
    ev = Evaluator(fam.val_tasks_file, batch_size=128)
    r = ev.evaluate(tmp_path / "merged")
    assert r.scores == pytest.approx(summary["eval"]["scores"], abs=1e-9)  # the search's last evaluation
    r = Evaluator(fam.tasks_file, batch_size=128).evaluate(tmp_path / "merged")
    assert r.mean == pytest.approx(summary["final"]["mean"], abs=1e-9)
    # the replayed tensors follow the formula (by hand from the coefficients file)
    from safetensors.torch import load_file

    coefs = load_file(str(out / "dam_coefficients.safetensors"))
    name = next(n for n in coefs if n.endswith("query.weight"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    srcs = [load_file(str(p / "model.safetensors"))[name] for p in fam.experts.values()]
    assert coefs[name].shape == (4, 1, srcs[0].shape[1])
    assert torch.allclose(merged[name], sum(coefs[name][i] * srcs[i] for i in range(4)), atol=1e-6)
    base = load_file(str(fam.base / "model.safetensors"))
    for n in ("classifier.weight", "vit.embeddings.position_embeddings", "vit.layernorm.weight"):
        assert torch.equal(merged[n], base[n])  # not merged: the base's

    # an interrupted run (background job, cancelled after step 3) resumes to the same coefficients
    stop_at = {"step": 3}
    job = DAMJob(cfg, root, tmp_path / "b",
                 on_event=lambda e: e.kind == "dam.step" and e.data["step"] == stop_at["step"] and job.cancel())
    job.start().join(120)
    assert job.done and isinstance(job.error, Cancelled)
    assert any(e.kind == "dam.step" for e in job.events)
    events = []
    resumed = run_dam(cfg, root, tmp_path / "b", on_event=events.append)
    assert events[[e.kind for e in events].index("dam.resumed")].data["step"] == 3
    assert [e.data["step"] for e in events if e.kind == "dam.step"] == [4, 5, 6]
    b = load_file(str(tmp_path / "b" / "dam_coefficients.safetensors"))
    assert set(b) == set(coefs) and all(torch.equal(b[k], coefs[k]) for k in coefs)
    assert resumed["eval"]["scores"] == summary["eval"]["scores"]
    log = [json.loads(x) for x in (tmp_path / "b" / "dam_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    # a checkpoint of another configuration is refused
    other, _ = load_dam_config(_write_cfg(tmp_path / "other.yml", fam, granularity="layer"))
    with pytest.raises(MergeError, match=r"different DAM search \(differs in: granularity\)"):
        run_dam(other, root, tmp_path / "b")


def test_cli_layerwise_adamerging_end_to_end(tiny_fmnist_family, tmp_path, capsys):
    fam = tiny_fmnist_family
    cfg = _write_cfg(tmp_path / "ada.yml", fam, granularity="layer", form="task_vectors", transform="tanh",
                     loss={"kind": "entropy"}, steps=3, eval_every=0, optimizer={"lr": 0.01, "clamp": [0, 1]})
    out = tmp_path / "ada"
    assert main(["search", "dam", str(cfg), str(out), "--merge", "--log-every", "1"]) == 0
    text = capsys.readouterr().out
    assert "step     3/3" in text and "entropy" in text and "final eval" in text
    result = json.loads((out / "result.json").read_text())
    assert result["teachers"]["mode"] == "none"  # entropy needs no teacher outputs
    from safetensors.torch import load_file

    coefs = load_file(str(out / "dam_coefficients.safetensors"))
    assert all(c.shape[0] == 4 and c.numel() == 4 for c in coefs.values())  # one scalar per model and tensor
    # the start: the better uniform merge on all of eval_tasks (λ = 1 is out of tanh's reach)
    starts = {"task arithmetic (lambda 0.3)": 0.3, "weight averaging": 0.25}
    assert [c["label"] for c in result["validation"]["candidates"] if c["source"] == "data-free"] == list(starts)
    init = math.atanh(starts[result["start"]])  # effective start = tanh(c)
    if result["eval"]["source"] == "data-free":  # training did not beat it on validation: uniform coefficients
        value = math.atanh(starts[result["validation"]["chosen"]])
        assert all(torch.allclose(c, torch.full_like(c, value)) for c in coefs.values())
    else:
        assert torch.allclose(coefs["vit.encoder.layer.0.attention.attention.key.bias"], torch.full((4, 1), init))
        moved = [n for n, c in coefs.items() if not torch.allclose(c, torch.full_like(c, init))]
        assert len(moved) > len(coefs) // 2  # it trained (a key bias gets no gradient: softmax ignores it)
    recipe = yaml.safe_load((out / "recipe.yml").read_text())
    assert recipe["parameters"] == {"transform": "tanh", "form": "task_vectors", "include_base": False,
                                    "coefficients": "coefficients"}
    r = Evaluator(fam.val_tasks_file, batch_size=128).evaluate(out / "model")
    assert r.scores == pytest.approx(result["eval"]["scores"], abs=1e-9)
    # running again resumes the finished run (no new steps) and gives the same result
    assert main(["search", "dam", str(cfg), str(out), "--quiet"]) == 0
    assert json.loads((out / "result.json").read_text())["eval"]["scores"] == result["eval"]["scores"]


def _cli_error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_configs_fail_with_one_line(tiny_fmnist_family, tmp_path, capsys):
    fam = tiny_fmnist_family
    out = str(tmp_path / "out")

    def err(**over) -> str:
        return _cli_error(capsys, ["search", "dam", str(_write_cfg(tmp_path / "bad.yml", fam, **over)), out])

    assert "granularty" in err(granularty="column")
    assert "granularity" in err(granularity="rows")
    assert "train_tasks has 4 task(s) for 3 model(s)" in err(models=[str(p) for p in fam.experts.values()][:3])
    assert "base_model is also listed under models" in err(models=[str(fam.base), *map(str, fam.experts.values())][:4])
    assert "task_vectors" in err(form="task_vectors", base_model=None)
    assert "init must be in (-1, 1)" in err(transform="tanh", init=1.5)
    assert "not found" in err(models=[str(tmp_path / "nope"), *map(str, fam.experts.values())][:4])
    assert "task 'nope' is not in train_tasks" in err(models=[{"model": str(p), "task": "nope"} for p in fam.experts.values()])
    assert "steps" in err(steps=0)
    assert "lr" in err(optimizer={"lr": -1})
    assert "not found" in _cli_error(capsys, ["search", "dam", str(tmp_path / "missing.yml"), out])
    assert not (tmp_path / "out" / "recipe.yml").exists()


def test_recipe_errors(tmp_path, llama_family):
    recipe = recipe_from_dict({"merge_method": "dam", "base_model": str(llama_family["base"]),
                               "models": [{"model": str(llama_family["a"])}]})
    with pytest.raises(MergeError, match="artifacts"):
        plan_merge(recipe)
    recipe = recipe.model_copy(update={"artifacts": {"coefficients": "nowhere.safetensors"}})
    with pytest.raises(MergeError, match="nowhere.safetensors.*not found"):
        plan_merge(recipe, search_dirs=(tmp_path,))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    recipe = recipe.model_copy(update={"artifacts": {"coefficients": "bad.safetensors"}})
    with pytest.raises(MergeError, match="cannot read DAM coefficients"):
        merge(recipe, tmp_path / "o", search_dirs=(tmp_path,))
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- causal LMs (tiny Llama)

WORDS = "the a cat dog sat on mat ran to park big small red blue green is was and then it".split()


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory, model_factory):
    """A tiny Llama base with a word-level tokenizer, two noisy 'fine-tunes', two text tasks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("dam-lm")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    base = root / "base"
    shutil.copytree(model_factory("llama", 0), base)
    tok.save_pretrained(base)
    rng = np.random.default_rng(0)
    tasks = []
    for k, name in enumerate(("animals", "colors")):
        words = WORDS[:10] if k == 0 else WORDS[8:]
        rows = [{"text": " ".join(rng.choice(words, size=int(rng.integers(3, 12))))} for _ in range(12)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks.append({"name": name, "kind": "lm", "data": {"path": f"{name}.jsonl"}, "max_length": 16})
    (root / "tasks.yml").write_text(yaml.safe_dump({"tasks": tasks}))
    return {"root": root, "base": base, "a": model_factory("llama", 1, base_seed=0, noise=0.05),
            "b": model_factory("llama", 2, base_seed=0, noise=0.05)}


def _lm_cfg(path: Path, lm, **over) -> Path:
    data = {"base_model": str(lm["base"]), "models": [str(lm["a"]), str(lm["b"])],
            "train_tasks": str(lm["root"] / "tasks.yml"), "steps": 3, "batch_size": 4, "examples_per_task": 8,
            "eval_every": 0, "eval_at_start": False, "checkpoint_every": 0, "optimizer": {"lr": 0.01}}
    data.update(over)
    path.write_text(yaml.safe_dump(data))
    return path


def test_lm_top_k_teachers_replay(lm_setup, tmp_path):
    # a vocabulary "too large" for full logits: the teachers keep their top-8 logits per token
    cfg, root = load_dam_config(_lm_cfg(tmp_path / "lm.yml", lm_setup, full_logits_max_vocab=16, teacher_top_k=8))
    events = []
    run = prepare_dam(cfg, root, tmp_path / "out", on_event=events.append)
    assert run.teachers["mode"] == "cache" and run.teachers["top_k"] == 8
    d = run.search.data[0]
    assert d.teacher.indices is not None and d.teacher.values[0].shape[1] == 8
    assert d.teacher.values[0].shape[0] == len(d.items[0])  # one row per token
    summary = run.run()
    steps = [e.data for e in events if e.kind == "dam.step"]
    assert steps[0]["tokens_seen"] > 0 and steps[-1]["tokens_seen"] > steps[0]["tokens_seen"]
    assert "lm_head.weight" in summary["tensors"]
    assert main(["merge", str(tmp_path / "out" / "recipe.yml"), str(tmp_path / "merged"), "--quiet"]) == 0
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = run.module(input_ids=ids).logits
        got = load_model(tmp_path / "merged")(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    tok_dir = lm_setup["base"]
    r = Evaluator(lm_setup["root"] / "tasks.yml", processor_from=tok_dir).evaluate(load_model(tmp_path / "merged"))
    assert r.scores == pytest.approx(summary["eval"]["scores"], rel=1e-6)


def test_lm_on_the_fly_teachers_mse_and_base_as_input(lm_setup, tmp_path):
    cfg, root = load_dam_config(_lm_cfg(tmp_path / "lm.yml", lm_setup, teachers="on_the_fly", include_base=True,
                                        loss={"kind": "mse", "lambda_cos": 0.1, "lambda_l2": 0.01}))
    run = prepare_dam(cfg, root, tmp_path / "out")
    assert run.teachers["mode"] == "on_the_fly" and run.search.data[0].teacher is None
    summary = run.run()
    terms = summary["last_step"]["terms"]
    assert {"mse", "mse/animals", "mse/colors", "cos", "l1", "l2"} <= set(terms)
    expected = terms["mse"] + 0.1 * terms["cos"] + 0.01 * terms["l2"]
    assert summary["last_step"]["loss"] == pytest.approx(expected, rel=1e-5)
    from safetensors.torch import load_file

    coefs = load_file(str(tmp_path / "out" / "dam_coefficients.safetensors"))
    assert all(c.shape[0] == 3 for c in coefs.values())  # base + 2 models
    recipe = load_recipe(tmp_path / "out" / "recipe.yml")
    assert recipe.parameters["include_base"] is True
    assert main(["merge", str(tmp_path / "out" / "recipe.yml"), str(tmp_path / "merged"), "--quiet"]) == 0
    ids = torch.tensor([[1, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "merged")(input_ids=ids).logits,
                              run.module(input_ids=ids).logits, atol=1e-5)


def test_config_defaults_are_the_papers():
    cfg = DAMConfig(models=["a"], train_tasks="t.yml")
    assert cfg.loss.kind == "kl" and cfg.loss.direction == "forward" and cfg.loss.temperature == 2.0
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 2e-3 and cfg.optimizer.weight_decay == 0.0
    assert cfg.granularity == "column" and cfg.transform == "none" and cfg.init is None
    assert not cfg.merge_embeddings and not cfg.merge_norms and cfg.lm_head
    assert CancelToken  # re-exported event types are importable
    assert F  # functional is used by the loss tests' imports


@pytest.mark.slow
def test_bench_rows_on_the_miniature_family(tiny_fmnist_family, tmp_path):
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_dam", root / "bench" / "dam.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_dam"] = bench
    spec.loader.exec_module(bench)
    tasks, note = bench.train_tasks(tiny_fmnist_family)
    assert "training split" in note and tasks[0]["data"]["range"] == [0, 50000]
    assert tasks[3]["data"]["images"].endswith("digits-train-images.npy")
    df, abl, notes = bench.run("fmnist-vit", quick=True, root=tiny_fmnist_family.root.parent, steps=2,
                               batch_size=8, examples=16, rows=["layer-wise AdaMerging"], methods=["linear"],
                               work=tmp_path, log=lambda *a: None)
    assert list(df.index) == ["pretrained", "individual", "weight averaging", "layer-wise AdaMerging"]
    row = df.loc["layer-wise AdaMerging"]
    # training is part of the search, which took time; the process held the models; a mean is a score
    assert 0 <= row["train_s"] <= row["search_s"] and row["search_s"] > 0 and row["peak_rss_mib"] > 50
    assert 0 <= row["mean"] <= 1
    assert abl is None and any("best data-free row, weight averaging" in n for n in notes)


def test_models_pair_with_their_tasks_by_name_then_by_head(tiny_fmnist_family):
    from mergecore.errors import MergeError
    from mergecore.search.dam.run import pair_models_with_tasks

    fam = tiny_fmnist_family
    names = list(fam.experts)
    paths = [str(p) for p in fam.experts.values()]
    tasks = str(fam.val_tasks_file)
    assert pair_models_with_tasks(names, paths, tasks) == [{"model": p, "task": n} for n, p in zip(names, paths)]
    renamed = [f"model{i}" for i in range(len(names))]  # no task of that name: the task scored with its head
    assert [d["task"] for d in pair_models_with_tasks(renamed, paths, tasks)] == names
    with pytest.raises(MergeError, match="no task for stranger"):
        pair_models_with_tasks(["stranger"], [str(fam.base)], tasks)


def test_a_model_pairs_with_the_first_task_named_like_it():
    from mergecore.eval.training import task_named_like

    tasks = ["code_ppl", "code_next_line", "legal_ppl", "docs_ppl", "codex"]
    assert task_named_like("expert_code", tasks) == "code_ppl"  # the first of its domain's tasks
    assert task_named_like("/models/ft-Legal", tasks) == "legal_ppl"  # words, case and folders aside
    assert task_named_like("docs", tasks) == "docs_ppl"
    assert task_named_like("expert_cod", tasks) is None  # whole words only: not code_ppl
    assert task_named_like("expert", tasks) is None  # nothing left to match
    assert task_named_like("expert_math", tasks) is None
