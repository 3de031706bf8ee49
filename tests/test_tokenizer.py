"""`tokenizer_source` / `tokenizer:` with differing vocabularies: union tokenizer, permuted embeddings.

Tiny Llamas with small WordLevel tokenizers built here. Each model's embedding row of a token is
a recognisable random vector, and every expected output row is computed by hand from mergekit's
rules: a model that lacks a token takes the base's row if the base has it, else the row of the one
model that has it, else the mean of the rows of the models that have it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _merge_helpers import run_mergekit
from mergecore.errors import MergeError
from mergecore.io.source import ModelSource
from mergecore.merging import merge
from mergecore.plan import plan_merge
from mergecore.recipe import parse_recipe

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# base: the cat sat on mat dog; a: reordered, lacks 'dog', adds lion + zebra;
# b: reordered, lacks 'mat', adds lion + owl, and its embeddings are padded to 16 rows
WORDS = {
    "base": ["the", "cat", "sat", "on", "mat", "dog"],
    "a": ["lion", "mat", "the", "zebra", "sat", "on", "cat"],
    "b": ["owl", "on", "the", "dog", "lion", "cat", "sat"],
}
ROWS = {"base": 10, "a": 11, "b": 16}
UNION = SPECIALS + WORDS["base"] + ["lion", "zebra", "owl"]  # base vocabulary, then a's, then b's new tokens


def _save_tokenizer(words: list[str], path: Path, extra_special: tuple[str, ...] = (),
                    specials_last: bool = False) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in (words + SPECIALS if specials_last else SPECIALS + words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)})
    tok.save_pretrained(path)


def _build(path: Path, words: list[str], rows: int, seed: int, tied: bool = False,
           extra_special: tuple[str, ...] = (), specials_last: bool = False) -> Path:
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=rows, max_position_embeddings=32,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    _save_tokenizer(words, path, extra_special, specials_last)
    return path


@pytest.fixture(scope="module")
def vm(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab-models")
    out = {k: _build(root / k, WORDS[k], ROWS[k], seed) for seed, k in enumerate(("base", "a", "b"))}
    # same vocabulary as base, other weights; and a model without tokenizer files
    out["base2"] = _build(root / "base2", WORDS["base"], ROWS["base"], 7)
    out["notok"] = _build(root / "notok", WORDS["base"], ROWS["base"], 8)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out["notok"] / f).unlink()
    return out


def _vocab(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


def _rows(path: Path, name: str) -> dict[str, torch.Tensor]:
    """token -> that model's row of tensor `name`."""
    t = ModelSource(str(path)).read(name).float()
    return {tok: t[i] for tok, i in _vocab(path).items() if i < t.shape[0]}


def _filled(vm, name: str, models: list[str], base: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """Per model, token -> its row after mergekit's fill (over `models`), for every union token."""
    rows = {m: _rows(vm[m], name) for m in models}
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in models}
    for tok in UNION:
        have = [m for m in models if tok in rows[m]]
        if base in have:
            fill = rows[base][tok]
        elif len(have) == 1:
            fill = rows[have[0]][tok]
        else:
            fill = torch.stack([rows[m][tok] for m in have]).mean(0)
        for m in models:
            out[m][tok] = rows[m].get(tok, fill)
    return out


def _linear_recipe(vm, extra: str) -> str:
    return f"""merge_method: linear
base_model: {vm['base']}
models:
  - {{model: {vm['base']}, parameters: {{weight: 0.2}}}}
  - {{model: {vm['a']}, parameters: {{weight: 0.3}}}}
  - {{model: {vm['b']}, parameters: {{weight: 0.5}}}}
dtype: float32
{extra}"""


@pytest.fixture(scope="module")
def union_out(vm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("union") / "out"
    merge(parse_recipe(_linear_recipe(vm, "tokenizer_source: union\n")), out, threads=1)
    return out


def test_union_vocabulary_order_and_config(union_out):
    assert sorted(_vocab(union_out).items(), key=lambda kv: kv[1]) == [(t, i) for i, t in enumerate(UNION)]
    cfg = json.loads((union_out / "config.json").read_text())
    assert cfg["vocab_size"] == len(UNION) == 13
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    src = ModelSource(str(union_out))
    assert src.info("model.embed_tokens.weight").shape == (13, 16)
    assert src.info("lm_head.weight").shape == (13, 16)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_union_rows_follow_the_fill_rules(vm, union_out, name):
    out = ModelSource(str(union_out)).read(name)
    filled = _filled(vm, name, ["base", "a", "b"], "base")
    raw = {m: _rows(vm[m], name) for m in ("base", "a", "b")}
    w = {"base": 0.2, "a": 0.3, "b": 0.5}
    for i, tok in enumerate(UNION):
        want = sum(w[m] * filled[m][tok] for m in w)
        torch.testing.assert_close(out[i], want, msg=f"{name} {tok}")
    # spelled out for the three fill cases
    # shared by all: the plain weighted sum of each model's own row
    torch.testing.assert_close(out[UNION.index("the")], 0.2 * raw["base"]["the"] + 0.3 * raw["a"]["the"]
                               + 0.5 * raw["b"]["the"])
    # 'mat': b lacks it, the base has it -> b takes the base's row
    torch.testing.assert_close(out[UNION.index("mat")], 0.7 * raw["base"]["mat"] + 0.3 * raw["a"]["mat"])
    # 'zebra' / 'owl': only one model has it -> every model takes that row
    torch.testing.assert_close(out[UNION.index("zebra")], raw["a"]["zebra"])
    torch.testing.assert_close(out[UNION.index("owl")], raw["b"]["owl"])
    # 'lion': a and b have it, the base does not -> the base takes their mean
    mean = (raw["a"]["lion"] + raw["b"]["lion"]) / 2
    torch.testing.assert_close(out[UNION.index("lion")], 0.2 * mean + 0.3 * raw["a"]["lion"] + 0.5 * raw["b"]["lion"])


def test_union_reloads_and_tokenizer_round_trips(vm, union_out):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(union_out))
    ids = tok("the owl sat on zebra lion", add_special_tokens=False).input_ids
    assert ids == [UNION.index(w) for w in "the owl sat on zebra lion".split()]
    assert tok.decode(ids) == "the owl sat on zebra lion"
    model = tf.LlamaForCausalLM.from_pretrained(str(union_out)).eval()
    assert model.config.vocab_size == 13
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 13) and torch.isfinite(logits).all()
    # a token only b has lands on b's row (every model takes b's row, the weights sum to 1)
    owl = tok.convert_tokens_to_ids("owl")
    b_owl = _rows(vm["b"], "model.embed_tokens.weight")["owl"]
    torch.testing.assert_close(model.model.embed_tokens.weight[owl].detach(), b_owl)


def test_pad_to_multiple_of(vm, tmp_path):
    recipe = parse_recipe(_linear_recipe(vm, "tokenizer: {source: union, pad_to_multiple_of: 8}\n"))
    out = merge(recipe, tmp_path / "o", threads=1).out_dir
    e = ModelSource(str(out)).read("model.embed_tokens.weight")
    assert e.shape == (16, 16)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    # padding rows: each model's mean row (mergekit), so after a linear merge the mean output row
    for i in range(13, 16):
        torch.testing.assert_close(e[i], e[:13].mean(0))
    ref = ModelSource(str(tmp_path / "o")).read("lm_head.weight")
    assert ref.shape == (16, 16)


def test_tokenizer_source_model_permutes_to_its_vocabulary(vm, tmp_path):
    recipe = parse_recipe(_linear_recipe(vm, f"tokenizer_source: {vm['b']}\n"))
    plan = plan_merge(recipe)
    assert plan.vocab is not None and plan.vocab.tokenizer is None and plan.vocab.size == 11
    out = merge(recipe, tmp_path / "o", threads=1).out_dir
    assert _vocab(out) == _vocab(vm["b"])  # b's tokenizer files, copied
    e = ModelSource(str(out)).read("model.embed_tokens.weight")
    assert e.shape == (11, 16)  # b's 11 tokens (its padding rows are not part of the vocabulary)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 11
    filled = _filled(vm, "model.embed_tokens.weight", ["base", "a", "b"], "base")
    for tok, i in _vocab(vm["b"]).items():
        want = 0.2 * filled["base"][tok] + 0.3 * filled["a"][tok] + 0.5 * filled["b"][tok]
        torch.testing.assert_close(e[i], want, msg=tok)


def test_tokenizer_source_base_drops_other_tokens(vm, tmp_path):
    recipe = parse_recipe(_linear_recipe(vm, "tokenizer_source: base\n"))
    out = merge(recipe, tmp_path / "o", threads=1).out_dir
    assert _vocab(out) == _vocab(vm["base"])
    e = ModelSource(str(out)).read("lm_head.weight")
    assert e.shape == (10, 16)
    filled = _filled(vm, "lm_head.weight", ["base", "a", "b"], "base")
    for tok, i in _vocab(vm["base"]).items():
        torch.testing.assert_close(e[i], 0.2 * filled["base"][tok] + 0.3 * filled["a"][tok] + 0.5 * filled["b"][tok])


def test_special_token_ids_follow_the_output_vocabulary(vm, tmp_path):
    """The config (from the base) names bos/eos/pad by id; with another model's tokenizer those
    ids are renumbered to that tokenizer's ids, in config.json and generation_config.json."""
    c = _build(tmp_path / "c", ["the", "cat", "sat"], 7, 5, specials_last=True)
    recipe = parse_recipe(f"""merge_method: linear
base_model: {vm['base']}
models: [{{model: {vm['base']}}}, {{model: {c}}}]
parameters: {{weight: 0.5}}
tokenizer_source: {c}
""")
    out = merge(recipe, tmp_path / "o", threads=1).out_dir
    v = _vocab(c)
    for f in ("config.json", "generation_config.json"):
        cfg = json.loads((out / f).read_text())
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (v["<s>"], v["</s>"], v["<pad>"]), f


def test_identical_vocabularies_change_nothing(vm, tmp_path):
    body = f"""merge_method: linear
models: [{{model: {vm['base']}}}, {{model: {vm['base2']}}}]
parameters: {{weight: 0.5}}
dtype: float32
"""
    plain = merge(parse_recipe(body), tmp_path / "plain", threads=1).out_dir
    for i, src in enumerate(("union", "base", str(vm["base2"]))):
        recipe = parse_recipe(body + f"tokenizer_source: {src}\n")
        plan = plan_merge(recipe)
        assert plan.vocab is None and not any(j.vocab for j in plan.jobs)
        out = merge(recipe, tmp_path / f"o{i}", threads=1).out_dir
        x, y = ModelSource(str(plain)), ModelSource(str(out))
        assert all(torch.equal(x.read(n), y.read(n)) for n in x.tensors)
        assert _vocab(out) == _vocab(vm["base"])


def test_frankenmerge_takes_each_end_from_its_slice(vm, tmp_path):
    """Embeddings come from the first slice's model, the head from the last one's (as in mergekit):
    the tokens that model lacks have no row to take, so they are zero, and the plan says so."""
    recipe = parse_recipe(f"""merge_method: passthrough
slices:
  - sources: [{{model: {vm['a']}, layer_range: [0, 2]}}]
  - sources: [{{model: {vm['b']}, layer_range: [1, 2]}}]
tokenizer_source: union
dtype: float32
""")
    plan = plan_merge(recipe)
    assert sum("their rows are zero" in w for w in plan.warnings) == 2
    out = merge(recipe, tmp_path / "o", threads=1).out_dir
    src = ModelSource(str(out))
    emb, head = src.read("model.embed_tokens.weight"), src.read("lm_head.weight")
    ra, rb = _rows(vm["a"], "model.embed_tokens.weight"), _rows(vm["b"], "lm_head.weight")
    vocab = _vocab(out)  # no base model: the union starts from a's vocabulary
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == SPECIALS + WORDS["a"] + ["owl", "dog"]
    for tok, i in vocab.items():
        torch.testing.assert_close(emb[i], ra.get(tok, torch.zeros(16)), msg=tok)
        torch.testing.assert_close(head[i], rb.get(tok, torch.zeros(16)), msg=tok)
    assert torch.equal(src.read("model.layers.2.mlp.up_proj.weight"),
                       ModelSource(str(vm["b"])).read("model.layers.1.mlp.up_proj.weight"))


def test_tied_embeddings(tmp_path):
    import transformers as tf

    base = _build(tmp_path / "tb", WORDS["base"], 10, 0, tied=True)
    a = _build(tmp_path / "ta", WORDS["a"], 12, 1, tied=True, extra_special=("<|x|>",))
    recipe = parse_recipe(f"""merge_method: linear
models: [{{model: {base}, parameters: {{weight: 0.5}}}}, {{model: {a}, parameters: {{weight: 0.5}}}}]
tokenizer_source: union
dtype: float32
""")
    out = merge(recipe, tmp_path / "o", threads=1).out_dir
    src = ModelSource(str(out))
    assert "lm_head.weight" not in src.tensors
    vocab = _vocab(out)
    # base's 10, a's 'lion', 'zebra', then a's added special token
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][10:] == ["lion", "zebra", "<|x|>"]
    e = src.read("model.embed_tokens.weight")
    assert e.shape == (13, 16)
    ra = _rows(a, "model.embed_tokens.weight")
    torch.testing.assert_close(e[vocab["<|x|>"]], ra["<|x|>"])
    torch.testing.assert_close(e[vocab["zebra"]], ra["zebra"])
    model = tf.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.shape == (13, 16)
    torch.testing.assert_close(model.lm_head.weight.detach(), e)
    tok = tf.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<|x|>") == 12 and "<|x|>" in tok.decode([12])


def test_tokens_block(vm, tmp_path):
    b = vm["b"]
    recipe = parse_recipe(_linear_recipe(vm, f"""tokenizer:
  source: union
  tokens:
    "<new>": {{source: {{kind: zero}}}}
    lion: {{source: {{kind: model_token, model: {b}, token: owl}}, force: true}}
    zebra: {{source: {b}}}
"""))
    with pytest.raises(MergeError, match="has no token 'zebra'"):
        plan_merge(recipe)
    recipe = parse_recipe(_linear_recipe(vm, f"""tokenizer:
  source: union
  tokens:
    "<new>": {{source: {{kind: zero}}}}
    lion: {{source: {{kind: model_token, model: {b}, token: owl}}, force: true}}
    mat: {{source: {vm['a']}}}
"""))
    out = merge(recipe, tmp_path / "o", threads=1).out_dir
    vocab = _vocab(out)
    assert vocab["<new>"] == 13
    e = ModelSource(str(out)).read("model.embed_tokens.weight")
    raw = {m: _rows(vm[m], "model.embed_tokens.weight") for m in ("base", "a", "b")}
    torch.testing.assert_close(e[13], torch.zeros(16))
    torch.testing.assert_close(e[vocab["lion"]], raw["b"]["owl"])  # forced on every model
    # b lacks 'mat': it takes a's row instead of the base's
    torch.testing.assert_close(e[vocab["mat"]], 0.2 * raw["base"]["mat"] + 0.8 * raw["a"]["mat"])


def test_errors(vm):
    with pytest.raises(MergeError, match="union needs every model's tokenizer.*notok"):
        plan_merge(parse_recipe(f"""merge_method: linear
models: [{{model: {vm['a']}}}, {{model: {vm['notok']}}}]
parameters: {{weight: 0.5}}
tokenizer_source: union
"""))
    with pytest.raises(MergeError, match="not one of the recipe's models"):
        plan_merge(parse_recipe(_linear_recipe(vm, "tokenizer: {tokens: {x: {source: nowhere/model}}}\n")))
    with pytest.raises(MergeError, match="exactly one of 'token' or 'token_id'"):
        plan_merge(parse_recipe(_linear_recipe(
            vm, f"tokenizer: {{tokens: {{x: {{source: {{kind: model_token, model: {vm['a']}}}}}}}}}\n")))
    with pytest.raises(MergeError, match="pad_to_multiple_of"):
        plan_merge(parse_recipe(_linear_recipe(vm, "tokenizer: {pad_to_multiple_of: 0}\n")))
    # without tokenizer_source, differing vocabulary sizes are refused as before
    with pytest.raises(MergeError, match="has shape"):
        plan_merge(parse_recipe(_linear_recipe(vm, "")))


def test_dry_run_names_the_vocabulary_change(vm, tmp_path, capsys):
    from mergecore.cli import main

    path = tmp_path / "r.yml"
    path.write_text(_linear_recipe(vm, "tokenizer: {source: union, pad_to_multiple_of: 8}\n"))
    assert main(["merge", str(path), str(tmp_path / "o"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "vocabulary: union" in text and "13 tokens, padded to 16 rows" in text
    assert "model.embed_tokens.weight" in text and "lm_head.weight" in text
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# side by side with mergekit 0.1.5


@pytest.mark.slow
def test_same_as_mergekit(vm, tmp_path):
    """mergekit orders the union's new tokens by hash order, so rows are compared token by token."""
    recipes = {
        "linear": _linear_recipe(vm, "tokenizer: {source: union, pad_to_multiple_of: 8}\n"),
        "task_arithmetic": f"""merge_method: task_arithmetic
base_model: {vm['base']}
models:
  - {{model: {vm['a']}, parameters: {{weight: 0.6}}}}
  - {{model: {vm['b']}, parameters: {{weight: 0.8}}}}
dtype: float32
tokenizer_source: union
""",
        "source_b": _linear_recipe(vm, f"tokenizer_source: {vm['b']}\n"),
        "tokens": _linear_recipe(vm, f"""tokenizer:
  source: union
  tokens:
    "<new>": {{source: {{kind: zero}}}}
    lion: {{source: {{kind: model_token, model: {vm['b']}, token: owl}}, force: true}}
    mat: {{source: {vm['a']}}}
"""),
    }
    jobs = []
    for name, text in recipes.items():
        (tmp_path / f"{name}.yml").write_text(text)
        jobs.append({"recipe": str(tmp_path / f"{name}.yml"), "out": str(tmp_path / f"mk-{name}")})
    status, stderr = run_mergekit(jobs, tmp_path, timeout=600)
    for name, text in recipes.items():
        assert status.get(name, {}).get("ok"), f"mergekit failed on {name}: {status.get(name)} {stderr[-2000:]}"
        mine = merge(parse_recipe(text), tmp_path / f"mc-{name}", threads=1).out_dir
        theirs = tmp_path / f"mk-{name}"
        vm_, vt = _vocab(mine), _vocab(theirs)
        assert set(vm_) == set(vt), name
        cm, ct = (json.loads((p / "config.json").read_text()) for p in (mine, theirs))
        assert cm["vocab_size"] == ct["vocab_size"], name
        sm, st = ModelSource(str(mine)), ModelSource(str(theirs))
        assert set(sm.tensors) == set(st.tensors)
        for tname in sm.tensors:
            x, y = sm.read(tname).float(), st.read(tname).float()
            assert x.shape == y.shape, (name, tname)
            if tname in ("model.embed_tokens.weight", "lm_head.weight"):
                order = torch.tensor([vt[t] for t, _ in sorted(vm_.items(), key=lambda kv: kv[1])])
                y = torch.cat([y[order], y[len(order):]])
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, msg=f"{name} {tname}")
