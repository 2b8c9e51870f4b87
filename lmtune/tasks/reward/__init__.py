"""Reward models on preference pairs: a scalar head on a decoder, scoring (prompt, answer) pairs."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.reward.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.reward.task import RewardTask  # noqa: PLC0415

    return RewardTask


def _predictor() -> type[Predictor]:
    # Likewise: the predictor loads torch and transformers when a saved model is used.
    from lmtune.tasks.reward.predict import RewardPredictor  # noqa: PLC0415

    return RewardPredictor


register_task(INFO, _task, _predictor)
