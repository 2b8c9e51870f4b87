"""Odds-ratio preference optimisation (ORPO) of a chat decoder: SFT on the chosen answers and a preference term, no reference."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.orpo.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.orpo.task import ORPOTask  # noqa: PLC0415

    return ORPOTask


def _predictor() -> type[Predictor]:
    # Likewise: a tuned policy answers prompts like any chat model.
    from lmtune.tasks.decoder import GenerativePredictor  # noqa: PLC0415

    return GenerativePredictor


register_task(INFO, _task, _predictor)
