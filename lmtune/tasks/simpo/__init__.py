"""Simple preference optimisation (SimPO) of a chat decoder: a length-normalised margin, no reference model."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.simpo.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.simpo.task import SIMPOTask  # noqa: PLC0415

    return SIMPOTask


def _predictor() -> type[Predictor]:
    # Likewise: a tuned policy answers prompts like any chat model.
    from lmtune.tasks.decoder import GenerativePredictor  # noqa: PLC0415

    return GenerativePredictor


register_task(INFO, _task, _predictor)
