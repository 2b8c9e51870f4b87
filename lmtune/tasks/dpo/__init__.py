"""Direct preference optimisation of a chat decoder on preference pairs (DPO, IPO, SLiC hinge, robust DPO)."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.dpo.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.dpo.task import DPOTask  # noqa: PLC0415

    return DPOTask


def _predictor() -> type[Predictor]:
    # Likewise: a tuned policy answers prompts like any chat model.
    from lmtune.tasks.decoder import GenerativePredictor  # noqa: PLC0415

    return GenerativePredictor


register_task(INFO, _task, _predictor)
