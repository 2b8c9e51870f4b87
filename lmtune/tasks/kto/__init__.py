"""Kahneman-Tversky optimisation (KTO) of a chat decoder on unpaired answers judged desirable or undesirable."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.kto.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.kto.task import KTOTask  # noqa: PLC0415

    return KTOTask


def _predictor() -> type[Predictor]:
    # Likewise: a tuned policy answers prompts like any chat model.
    from lmtune.tasks.decoder import GenerativePredictor  # noqa: PLC0415

    return GenerativePredictor


register_task(INFO, _task, _predictor)
