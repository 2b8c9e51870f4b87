"""Tasks: one folder per application, registered by its ``__init__`` (see ``base``).

Importing this package registers every built-in task (light: the task classes load when a task runs).
A new task is a new folder plus one line below.
"""

from lmtune.tasks import (  # noqa: F401  (each registers itself)
    causal_lm,
    classification,
    dpo,
    grpo,
    kto,
    masked_lm,
    orpo,
    question_answering,
    relation_extraction,
    reward,
    seq2seq,
    sft,
    simpo,
    token_classification,
)
from lmtune.tasks.base import Predictor, Task, TaskData, get_predictor, get_task, register_task

__all__ = ["Predictor", "Task", "TaskData", "get_predictor", "get_task", "register_task"]
