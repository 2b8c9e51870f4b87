"""Online reinforcement learning of a chat decoder from rewards (GRPO): sample, score, reinforce the better answers."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.grpo.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.grpo.task import GRPOTask  # noqa: PLC0415

    return GRPOTask


def _predictor() -> type[Predictor]:
    # Likewise: a tuned policy answers prompts like any chat model.
    from lmtune.tasks.decoder import GenerativePredictor  # noqa: PLC0415

    return GenerativePredictor


register_task(INFO, _task, _predictor)
