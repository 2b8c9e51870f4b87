"""Text regression: a score per text (ratings, readability, similarity), an encoder with a one-unit head.

A task that lives outside lmtune, in this folder alone, and joins it with one ``register_task`` line:
``tests/test_new_task.py`` imports it and trains it through ``lmtune train``. Nothing in ``lmtune/``
names it.
"""

from lmtune.tasks.base import Predictor, Task, register_task

from .info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when the folder registers: torch and transformers load only then.
    from .task import TextRegressionTask  # noqa: PLC0415

    return TextRegressionTask


def _predictor() -> type[Predictor]:
    # As above: the predictor loads transformers.
    from .predict import TextRegressionPredictor  # noqa: PLC0415

    return TextRegressionPredictor


register_task(INFO, _task, _predictor)
