"""Relation extraction: the relation between two marked entities (typed entity markers, entity-start head)."""

from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.relation_extraction.info import INFO


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.relation_extraction.task import RelationExtractionTask  # noqa: PLC0415

    return RelationExtractionTask


def _predictor() -> type[Predictor]:
    # Likewise: the predictor loads torch and transformers when a saved model is used.
    from lmtune.tasks.relation_extraction.predict import RelationPredictor  # noqa: PLC0415

    return RelationPredictor


register_task(INFO, _task, _predictor)
