"""Instruction and chat tuning of decoders (alpaca, sharegpt, OpenAI messages), loss on the answers."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.sft.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.sft.task import SFTTask  # noqa: PLC0415

    return SFTTask


def _predictor() -> type[Predictor]:
    # Likewise: the predictor loads torch and transformers when a saved model is used.
    from lmtune.tasks.decoder import GenerativePredictor  # noqa: PLC0415

    return GenerativePredictor


register_task(INFO, _task, _predictor)
