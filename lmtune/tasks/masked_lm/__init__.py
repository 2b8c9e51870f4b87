"""Masked-language-model training on raw text: continued pre-training of an encoder (BERT-style)."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.masked_lm.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.masked_lm.task import MaskedLMTask  # noqa: PLC0415

    return MaskedLMTask


def _predictor() -> type[Predictor]:
    # Likewise: the predictor loads torch and transformers when a saved model is used.
    from lmtune.tasks.masked_lm.predict import FillMaskPredictor  # noqa: PLC0415

    return FillMaskPredictor


register_task(INFO, _task, _predictor)
