"""Extractive question answering: answer spans in a context (SQuAD v1.1 / v2.0)."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.question_answering.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.question_answering.task import QuestionAnsweringTask  # noqa: PLC0415

    return QuestionAnsweringTask


def _predictor() -> type[Predictor]:
    # Likewise: the predictor loads torch and transformers when a saved model is used.
    from lmtune.tasks.question_answering.predict import QuestionAnsweringPredictor  # noqa: PLC0415

    return QuestionAnsweringPredictor


register_task(INFO, _task, _predictor)
