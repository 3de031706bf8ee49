"""Evaluation: tasks (data + metric + how to score), subset sampling, cached inputs, an evaluator.

    from mergecore.eval import Evaluator, load_tasks
    ev = Evaluator(load_tasks("tasks.yml"), subset=0.05, seed=0, batch_size=128)
    result = ev.evaluate(model_or_checkpoint_folder, progress=..., cancel=..., subset_index=k)
    result.mean, result.scores, result.to_frame()
"""

from mergecore.eval.data import Arrays, DataSpec, Records, load_data, read_idx, write_idx
from mergecore.eval.evaluator import (
    EvalProgress,
    EvalResult,
    Evaluator,
    TaskResult,
    load_model,
    parse_subset,
)
from mergecore.eval.prep import ImagePrep, load_tokenizer
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

__all__ = [
    "Arrays", "DataSpec", "Records", "load_data", "read_idx", "write_idx",
    "EvalProgress", "EvalResult", "Evaluator", "TaskResult", "load_model", "parse_subset",
    "ImagePrep", "load_tokenizer",
    "ClassificationTask", "GenerationTask", "LMTask", "MultipleChoiceTask", "Task",
    "load_tasks", "parse_tasks", "task_from_dict",
]
