"""Text classification (single- or multi-label, text pairs) on encoders and decoders, with baselines."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.classification.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.classification.task import ClassificationTask  # noqa: PLC0415

    return ClassificationTask


def _predictor() -> type[Predictor]:
    # Likewise: the predictor loads torch and transformers when a saved model is used.
    from lmtune.tasks.classification.predict import ClassificationPredictor  # noqa: PLC0415

    return ClassificationPredictor


register_task(INFO, _task, _predictor)
