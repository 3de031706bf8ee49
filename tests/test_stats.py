"""Statistics for data-informed merges: Gram matrices and Fisher information against direct
computations, RegMean++'s sequential Grams through a merged layer, the file, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergecore.cli import main
from mergecore.errors import MergeError
from mergecore.eval.evaluator import Evaluator
from mergecore.eval.training import task_data
from mergecore.models import load_model
from mergecore.stats import collect_stats
from mergecore.stats.store import open_stats

WORDS = "the a cat dog sat on mat ran to park big small red blue green is was and then it".split()


def build_lm(root: Path, model_factory) -> dict:
    """Two noisy 'fine-tunes' of a tiny Llama, each with a word-level tokenizer, and two LM tasks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    out = {"root": root}
    for name, seed in (("a", 1), ("b", 2)):
        shutil.copytree(model_factory("llama", seed, base_seed=0, noise=0.05), root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    rng = np.random.default_rng(0)
    tasks = []
    for k, name in enumerate(("a", "b")):  # a task named after each model: they pair by name
        words = WORDS[:10] if k == 0 else WORDS[8:]
        rows = [{"text": " ".join(rng.choice(words, size=int(rng.integers(3, 10))))} for _ in range(6)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks.append({"name": name, "kind": "lm", "data": {"path": f"{name}.jsonl"}, "max_length": 16})
    (root / "tasks.yml").write_text(yaml.safe_dump({"tasks": tasks}))
    out["tasks"] = root / "tasks.yml"
    return out


def build_vit(root: Path, model_factory) -> dict:
    """Two noisy tiny ViT classifiers (3 classes, 16x16 grey images) and one image task each."""
    rng = np.random.default_rng(1)
    tasks = []
    for name in ("t0", "t1"):
        np.savez(root / f"{name}.npz", images=rng.integers(0, 255, size=(5, 16, 16), dtype=np.uint8),
                 labels=rng.integers(0, 3, size=5))
        tasks.append({"name": name, "kind": "classification", "data": {"path": f"{name}.npz"}})
    (root / "tasks.yml").write_text(yaml.safe_dump({"tasks": tasks}))
    return {"root": root, "tasks": root / "tasks.yml", "a": model_factory("vit", 1, base_seed=0, noise=0.05),
            "b": model_factory("vit", 2, base_seed=0, noise=0.05)}


@pytest.fixture(scope="module")
def lm(tmp_path_factory, model_factory) -> dict:
    return build_lm(tmp_path_factory.mktemp("stats-lm"), model_factory)


@pytest.fixture(scope="module")
def vit(tmp_path_factory, model_factory) -> dict:
    return build_vit(tmp_path_factory.mktemp("stats-vit"), model_factory)


def model_data(folder: Path, tasks: Path, index: int, examples: int = 256):
    """A model and its task's inputs, chosen as the collector chooses them (seed 0)."""
    model = load_model(folder)
    ev = Evaluator(str(tasks))
    return model, task_data(ev.tasks[index], ev.resources(model, folder), model, max_examples=examples, seed=0,
                            index=index, max_length=None)


def inputs_by_hand(model, data, module_name: str) -> torch.Tensor:
    """The rows module `module_name` reads, one unpadded example at a time."""
    rows = []
    h = model.get_submodule(module_name).register_forward_hook(lambda m, a, o: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for k in range(len(data)):
            kwargs, _, _ = data.inputs([k])
            model(**kwargs)
    h.remove()
    return torch.cat(rows)


def test_gram_is_xtx_over_the_non_pad_tokens(lm, tmp_path):
    out = collect_stats("gram", lm["tasks"], [str(lm["a"]), str(lm["b"])], tmp_path / "g.safetensors", batch_size=4)
    sf = open_stats(out)
    assert sf.kind == "gram" and sf.meta["tasks"] == ["a", "b"] and sf.meta["examples"] == [6, 6]
    assert [m["path"] for m in sf.models] == [str(lm["a"].resolve()), str(lm["b"].resolve())]
    inputs = sf.meta["inputs"]  # q/k/v read one tensor: one matrix, stored under q_proj
    q = "model.layers.1.self_attn.q_proj.weight"
    assert inputs[q] == q and inputs["model.layers.1.self_attn.v_proj.weight"] == q
    assert inputs["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert inputs["model.layers.1.mlp.down_proj.weight"] == "model.layers.1.mlp.down_proj.weight"
    assert len(sf.keys) == 2 * (4 * 4 + 1)  # 4 inputs per layer and lm_head, per model
    for i, name in enumerate(("a", "b")):
        model, data = model_data(lm[name], lm["tasks"], i)
        for mod in ("model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj", "lm_head"):
            x = inputs_by_hand(model, data, mod)
            assert x.shape[0] == data.rows_total == sf.meta["rows"][i]
            torch.testing.assert_close(sf.gram(i, f"{mod}.weight"), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


def test_gram_of_a_vit_counts_every_token(vit, tmp_path):
    out = collect_stats("regmean", vit["tasks"], [str(vit["a"]), str(vit["b"])], tmp_path / "g.safetensors")
    sf = open_stats(out)
    model, data = model_data(vit["b"], vit["tasks"], 1)
    x = inputs_by_hand(model, data, "vit.layers.0.attention.q_proj")  # transformers' names in memory
    assert x.shape[0] == 5 * 5  # 4 patches and the CLS token per image
    q = "vit.encoder.layer.0.attention.attention.query.weight"  # the checkpoint's names in the file
    assert sf.meta["inputs"]["vit.encoder.layer.0.attention.attention.value.weight"] == q
    torch.testing.assert_close(sf.gram(1, q), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


def test_fisher_is_the_exact_expectation_over_classes(vit, tmp_path):
    out = collect_stats("fisher", vit["tasks"], [str(vit["a"]), str(vit["b"])], tmp_path / "f.safetensors",
                        examples=3)
    sf = open_stats(out)
    assert sf.kind == "fisher" and sf.meta["estimator"] == ["exact", "exact"] and sf.meta["examples"] == [3, 3]
    model, data = model_data(vit["a"], vit["tasks"], 0, examples=3)
    params = dict(model.named_parameters())
    total = 0.0
    for name, ck in (("vit.layers.1.attention.q_proj.weight", "vit.encoder.layer.1.attention.attention.query.weight"),
                     ("classifier.weight", "classifier.weight"), ("vit.layernorm.bias", "vit.layernorm.bias")):
        def logp(p, name=name, k=0):
            out = torch.func.functional_call(model, {name: p}, args=(), kwargs=data.inputs([k])[0], strict=False)
            return torch.log_softmax(out.logits[0], -1)

        fisher = torch.zeros_like(params[name])
        for k in range(len(data)):  # F = 1/n Σ_x Σ_c p(c|x) (∂ log p(c|x) / ∂θ)², the Jacobian over the classes
            jac = torch.func.jacrev(lambda p, k=k: logp(p, k=k))(params[name].detach())
            probs = logp(params[name].detach(), k=k).exp()
            fisher += (probs.view(-1, *[1] * fisher.ndim) * jac.pow(2)).sum(0)
        torch.testing.assert_close(sf.read(f"0/{ck}"), fisher / len(data), rtol=1e-4, atol=1e-9)
    for key in sf.keys:  # the norm the method normalises with: over the whole model's Fisher
        if key.startswith("0/"):
            total += float(sf.read(key).pow(2).sum())
    assert sf.meta["fisher_norm"][0] == pytest.approx(total ** 0.5, rel=1e-5)


def test_fisher_of_an_lm_samples_its_labels_deterministically(lm, tmp_path):
    kw = dict(examples=3, batch_size=2)
    one = collect_stats("fisher", lm["tasks"], [str(lm["a"])], tmp_path / "1.safetensors", **kw)
    two = collect_stats("fisher", lm["tasks"], [str(lm["a"])], tmp_path / "2.safetensors", **kw)
    sf = open_stats(one)
    assert sf.meta["estimator"] == ["sampled"]
    assert "0/model.layers.0.mlp.down_proj.weight" in sf.keys and "0/model.embed_tokens.weight" in sf.keys
    for key in sf.keys:
        f = sf.read(key)
        assert (f >= 0).all() and torch.equal(f, open_stats(two).read(key))


def test_regmean_plusplus_grams_go_through_the_merged_layer(lm, tmp_path):
    models = [str(lm["a"]), str(lm["b"])]
    plain = open_stats(collect_stats("gram", lm["tasks"], models, tmp_path / "g.safetensors"))
    pp_path = collect_stats("regmean_plusplus", lm["tasks"], models, tmp_path / "pp.safetensors", batch_size=4)
    pp = open_stats(pp_path)
    assert pp.kind == "gram_plusplus" and pp.meta["ratio"] == 0.6 and pp.meta["stack"] == "model.layers"
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(pp.gram(0, q1), plain.gram(0, q1), atol=1e-4)
    # the merge that uses them, then model a with that merge's embeddings and layer 0 and its own layer 1
    from mergecore.merging import merge
    from mergecore.recipe import recipe_from_dict

    merged = tmp_path / "merged"
    merge(recipe_from_dict({"merge_method": "regmean_plusplus", "models": [{"model": m} for m in models],
                            "dtype": "float32", "artifacts": {"stats": str(pp_path)}}), merged)
    ref = load_model(merged)
    model, data = model_data(lm["a"], lm["tasks"], 0)
    keep = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("model.layers.") or name.startswith("model.layers.0."):
                p.copy_(keep[name])
    for mod in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        x = inputs_by_hand(model, data, mod)
        torch.testing.assert_close(pp.gram(0, f"{mod}.weight"), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the CLI


def _err(capsys, args) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_collects_and_refuses_what_it_did_not_write(lm, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    args = ["collect-stats", "gram", str(lm["tasks"]), str(out), "--models", str(lm["a"]), str(lm["b"]),
            "--examples", "4", "-q"]
    assert main(args) == 0 and open_stats(out).meta["examples"] == [4, 4]
    assert "already holds statistics; pass --overwrite" in _err(capsys, args)
    assert main(args + ["--overwrite"]) == 0
    foreign = tmp_path / "mine.safetensors"
    foreign.write_bytes(b"not mine")
    assert "was not written by mergecore collect-stats" in _err(capsys, args[:3] + [str(foreign)] + args[4:])
    assert foreign.read_bytes() == b"not mine"
    assert "inside the model folder" in _err(capsys, args[:3] + [str(lm["a"] / "s.safetensors")] + args[4:])
    assert "tasks file not found" in _err(capsys, ["collect-stats", "gram", str(tmp_path / "no.yml"), str(out),
                                                    "--models", str(lm["a"])])
    third = tmp_path / "c"
    shutil.copytree(lm["a"], third)
    assert "no task for c" in _err(capsys, args[:4] + ["--models", str(lm["a"]), str(lm["b"]), str(third)])
    assert "unknown statistics 'ties'" in _err(capsys, ["collect-stats", "ties"] + args[2:])
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written


def test_collection_honours_cancel_and_writes_nothing(lm, tmp_path):
    from mergecore.errors import Cancelled
    from mergecore.events import CancelToken

    token = CancelToken()

    def progress(stage, done, total, message):
        if stage == "collect" and done >= 2:
            token.cancel()

    with pytest.raises(Cancelled):
        collect_stats("gram", lm["tasks"], [str(lm["a"]), str(lm["b"])], tmp_path / "s.safetensors", batch_size=1,
                      progress=progress, cancel=token)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MergeError, match="at least 1"):
        collect_stats("gram", lm["tasks"], [str(lm["a"])], tmp_path / "s.safetensors", examples=0)


def test_merge_collect_stats_end_to_end(lm, tmp_path, capsys, monkeypatch):
    import tempfile

    from mergecore.io.source import ModelSource

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    recipe_dir = tmp_path / "r"
    recipe_dir.mkdir()
    for name in ("a", "b"):  # models named relative to the recipe's folder
        shutil.copytree(lm[name], recipe_dir / name)
    shutil.copy(lm["tasks"], tmp_path / "tasks.yml")
    for f in ("a.jsonl", "b.jsonl"):
        shutil.copy(lm["root"] / f, tmp_path / f)
    recipe = recipe_dir / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "regmean", "models": [{"model": "a"}, {"model": "b"}],
                                      "dtype": "float32", "parameters": {"reduce_non_diagonal_ratio": 0.9}}))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--collect-stats", str(tmp_path / "tasks.yml"), "-q",
                 "--stats-examples", "4"]) == 0, capsys.readouterr().err
    shipped = out / "artifacts" / "stats.safetensors"
    assert open_stats(shipped).meta["examples"] == [4, 4]
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary statistics are gone
    # the same merge replayed from the shipped artifact
    again = tmp_path / "again"
    from mergecore.merging import merge
    from mergecore.recipe import load_recipe

    r = load_recipe(recipe).model_copy(update={"artifacts": {"stats": str(shipped)}})
    merge(r, again, search_dirs=(recipe_dir,))
    one, two = ModelSource("1", path=out), ModelSource("2", path=again)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(one.read(name), two.read(name))
    assert "reads no statistics" in _err(capsys, _ties(recipe_dir, tmp_path))


def _ties(recipe_dir: Path, tmp_path: Path) -> list[str]:
    r = recipe_dir / "ties.yml"
    r.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]}))
    return ["merge", str(r), str(tmp_path / "out2"), "--collect-stats", str(tmp_path / "tasks.yml"), "-q"]
