"""Tasks: data + how to score a model + a metric, described in YAML.

The kinds live in an open registry (`mergecore.eval.kind`), one module each in
`mergecore/eval/kinds/`; this module imports them all, so a new kind is one new file there.
Built in:

- ``classification``: accuracy on images or texts; ``classes`` and ``head_from`` (another
  checkpoint's classifier head on the evaluated body) as in the RMM paper's task-head setting.
- ``lm`` (causal-LM loss / perplexity): the score is 1 / perplexity.
- ``multiple_choice``: the option with the largest log-likelihood wins; accuracy.
- ``generation``: greedy decoding, exact match against the answer(s).

Each task's `score` is higher-is-better, so an evaluator can average them (searches maximise
that mean).

YAML (a list of tasks, or ``tasks:`` holding one; relative paths are relative to the file)::

    tasks:
      - name: fmnist_tops                 # unique; `kind` defaults to classification
        kind: classification
        data: {images: t10k-images-idx3-ubyte.gz, labels: t10k-labels-idx1-ubyte.gz}
        classes: [0, 2, 4, 6]             # optional: only these labels / logits
        head_from: expert_fmnist_tops     # optional: score with this checkpoint's classifier.*
      - name: sentiment                   # no head_from: the evaluated model's own head (shared)
        kind: classification
        data: {path: sst.csv, split: {part: test, val_fraction: 0.2, stratify: true}}  # jsonl / json / csv / tsv / parquet / txt
        input: text                       # auto: arrays -> image, records -> text
        text_field: sentence
        label_field: label
        label_names: [negative, positive] # when labels are strings
      - name: wiki
        kind: lm                          # perplexity; score = 1 / perplexity
        data: {path: wiki.jsonl, max_examples: 500}
        text_field: text
        max_length: 512
      - name: arc
        kind: multiple_choice
        data: {path: arc.jsonl}
        context_template: "Question: {question}\nAnswer:"
        choices_field: choices            # or choice_fields: [A, B, C, D] (one column each)
        answer_field: answer              # index, letter, or the option's text
        normalize: none                   # none | tokens | chars
      - name: gsm
        kind: generation
        data: {path: gsm.jsonl}
        prompt_field: question
        answer_field: answer              # a string or a list of accepted strings
        max_new_tokens: 16
        stop: ["\n"]
        ignore_case: false

Data blocks (`DataSpec`): ``path`` (records, .npz, or an image folder with one sub-folder per
class), or ``images`` + ``labels`` (.npy or idx files); ``range: [start, stop]`` and
``max_examples`` keep a fixed part of the file. ``split: {part: val, val_fraction: 0.2, seed: 0,
stratify: true}`` keeps a seeded shuffled fraction of the rows (``part: test`` exactly the
others; ``stratify`` draws it within each label), so a validation and a test task file can name
one file without sharing a row. A .txt file is one ``text`` record per non-empty line, or per
blank-line separated paragraph with ``txt_unit: paragraph``. Text tasks may name a ``tokenizer`` folder;
otherwise the evaluated checkpoint's tokenizer is used. ``batch_size`` overrides the
evaluator's per task.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from mergecore.errors import MergeError, clip
from mergecore.eval import kinds as _kinds_package
from mergecore.eval.kind import Prepared, Resources, Task, TrainingInputs, kind_names, task_class
from mergecore.eval.kinds.classification import ClassificationTask
from mergecore.eval.kinds.generation import GenerationTask, cut_at_stop
from mergecore.eval.kinds.lm import LMTask
from mergecore.eval.kinds.multiple_choice import MultipleChoiceTask
from mergecore.eval.yamlspec import validation_message
from mergecore.yamlio import load_yaml, load_yaml_file

__all__ = ["ClassificationTask", "GenerationTask", "LMTask", "MultipleChoiceTask", "Prepared", "Resources", "Task",
           "TrainingInputs", "cut_at_stop", "load_tasks", "parse_tasks", "task_from_dict"]

# every module in mergecore/eval/kinds registers its kind on import
for _module in pkgutil.iter_modules(_kinds_package.__path__):
    importlib.import_module(f"{_kinds_package.__name__}.{_module.name}")


def task_from_dict(data: Any, base_dir: Optional[Path] = None, where: str = "task") -> Task:
    """Build a Task from its YAML mapping; relative paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise MergeError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    data.setdefault("kind", "classification")
    if isinstance(data.get("name"), str):
        where = f"{where} ({clip(data['name'], 60)})"
    cls = task_class(data["kind"]) if isinstance(data["kind"], str) else None
    if cls is None:
        raise MergeError(f"{where}: 'kind' must be one of {', '.join(kind_names())}")
    try:
        spec = cls.spec_class.model_validate(data)
    except ValidationError as err:
        raise MergeError(validation_message(err, where)) from None
    return cls(spec, base_dir)


def parse_tasks(text: str | bytes, base_dir: Optional[Path] = None, where: str = "tasks") -> list[Task]:
    """Tasks from YAML text: a list of tasks, or a mapping with a `tasks:` list."""
    return _tasks_from_data(load_yaml(text, where), base_dir, where)


def _tasks_from_data(data: Any, base_dir: Optional[Path], where: str) -> list[Task]:
    if isinstance(data, dict):
        unknown = set(data) - {"tasks", "description", "name"}
        if unknown:
            raise MergeError(f"{where}: unknown key(s) {clip(', '.join(sorted(map(str, unknown))), 200)} (expected 'tasks')")
        data = data.get("tasks")
    if not isinstance(data, list) or not data:
        raise MergeError(f"{where}: expected a non-empty list of tasks (or 'tasks:' with one)")
    return unique_tasks([task_from_dict(t, base_dir, f"{where}: tasks[{i}]") for i, t in enumerate(data)], where)


def unique_tasks(tasks: list[Task], where: str) -> list[Task]:
    """`tasks`, or a MergeError naming the repeated names."""
    dup = sorted(n for n, count in Counter(t.name for t in tasks).items() if count > 1)
    if dup:
        raise MergeError(f"{where}: task names must be unique; repeated: {clip(', '.join(dup), 200)}")
    return tasks


def load_tasks(path: str | Path) -> list[Task]:
    """Tasks from a YAML file; data paths are relative to the file's folder."""
    p = Path(path).expanduser()
    return _tasks_from_data(load_yaml_file(p, "tasks file"), p.resolve().parent, str(p))
