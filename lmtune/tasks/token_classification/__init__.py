"""Token classification / named-entity recognition (BIO, BIOES; CoNLL, token lists, spans)."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.token_classification.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.token_classification.task import TokenClassificationTask  # noqa: PLC0415

    return TokenClassificationTask


def _predictor() -> type[Predictor]:
    # Likewise: the predictor loads torch and transformers when a saved model is used.
    from lmtune.tasks.token_classification.predict import TokenClassificationPredictor  # noqa: PLC0415

    return TokenClassificationPredictor


register_task(INFO, _task, _predictor)
