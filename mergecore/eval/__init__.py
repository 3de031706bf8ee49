"""Evaluation: tasks (data + metric + how to score; kinds in an open registry), subset sampling,
cached inputs, an evaluator.

    from mergecore.eval import Evaluator, load_tasks
    ev = Evaluator(load_tasks("tasks.yml"), subset=0.05, seed=0, batch_size=128)
    result = ev.evaluate(model_or_checkpoint_folder, progress=..., cancel=..., subset_index=k)
    result.mean, result.scores, result.to_frame()
"""

from mergecore.eval.data import Arrays, DataSpec, Records, load_data, read_idx, write_idx
from mergecore.eval.evaluator import EvalProgress, EvalResult, Evaluator, TaskResult, parse_subset
from mergecore.eval.kind import register_kind
from mergecore.eval.tasks import (
    ClassificationTask,
    GenerationTask,
    LMTask,
    MultipleChoiceTask,
    Task,
    load_tasks,
    parse_tasks,
    task_from_dict,
)
from mergecore.models import ImagePrep, load_model, load_tokenizer

__all__ = [
    "Arrays", "DataSpec", "Records", "load_data", "read_idx", "write_idx",
    "EvalProgress", "EvalResult", "Evaluator", "TaskResult", "load_model", "parse_subset",
    "ImagePrep", "load_tokenizer",
    "ClassificationTask", "GenerationTask", "LMTask", "MultipleChoiceTask", "Task",
    "load_tasks", "parse_tasks", "register_kind", "task_from_dict",
]
