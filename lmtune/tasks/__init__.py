"""Tasks: one module per application, registered by name (see ``base.Task``)."""

from lmtune.tasks.base import PREDICTORS, TASKS, Task, TaskData, register_predictor, register_task
from lmtune.tasks.causal_lm import task as _causal_lm  # noqa: F401  (each registers itself)
from lmtune.tasks.classification import task as _classification  # noqa: F401
from lmtune.tasks.question_answering import task as _question_answering  # noqa: F401
from lmtune.tasks.seq2seq import task as _seq2seq  # noqa: F401
from lmtune.tasks.sft import task as _sft  # noqa: F401
from lmtune.tasks.token_classification import task as _token_classification  # noqa: F401

__all__ = ["PREDICTORS", "TASKS", "Task", "TaskData", "get_task", "register_predictor", "register_task"]


def get_task(name: str) -> type:
    """The task class registered under ``name``."""
    return TASKS[name]
