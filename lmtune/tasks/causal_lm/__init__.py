"""Language-model training on raw text: continued pre-training, or a small model from scratch."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.causal_lm.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.causal_lm.task import CausalLMTask  # noqa: PLC0415

    return CausalLMTask


def _predictor() -> type[Predictor]:
    # Likewise: the predictor loads torch and transformers when a saved model is used.
    from lmtune.tasks.decoder import GenerativePredictor  # noqa: PLC0415

    return GenerativePredictor


register_task(INFO, _task, _predictor)
