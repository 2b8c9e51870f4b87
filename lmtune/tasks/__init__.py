"""Tasks: one module per application, registered by name (see ``base.Task``)."""

from lmtune.tasks import (  # noqa: F401  (each registers itself)
    causal_lm,
    classification,
    question_answering,
    seq2seq,
    sft,
    token_classification,
)
from lmtune.tasks.base import PREDICTORS, TASKS, Task, TaskData, register_predictor, register_task

__all__ = ["PREDICTORS", "TASKS", "Task", "TaskData", "get_task", "register_predictor", "register_task"]


def get_task(name: str) -> type:
    """The task class registered under ``name``."""
    return TASKS[name]
