"""Sequence to sequence: summarization and translation, on an encoder-decoder or a prompted decoder."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.seq2seq.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.seq2seq.task import Seq2SeqTask  # noqa: PLC0415

    return Seq2SeqTask


def _predictor() -> type[Predictor]:
    # Likewise: the predictor loads torch and transformers when a saved model is used.
    from lmtune.tasks.seq2seq.predict import Seq2SeqPredictor  # noqa: PLC0415

    return Seq2SeqPredictor


register_task(INFO, _task, _predictor)
