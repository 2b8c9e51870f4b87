"""Token classification / named-entity recognition (BIO, BIOES; CoNLL, token lists, spans)."""

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.base import Predictor, Task, register_task


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.token_classification.task import TokenClassificationTask

    return TokenClassificationTask


def _predictor() -> type[Predictor]:
    from lmtune.tasks.token_classification.predict import TokenClassificationPredictor

    return TokenClassificationPredictor


INFO = TaskInfo(
    name="token_classification",
    summary="tag words: named entities (people, places, organisations ...) as character spans",
    default_metric="f1",
    auto_class="AutoModelForTokenClassification",
    pipeline_tag="token-classification",
    usage='from transformers import pipeline\n\nner = pipeline("token-classification", model="{name}", aggregation_strategy="simple")\nprint(ner("an example sentence"))  # lmtune predict splits words as in training (exact offsets)',
    headline_metrics=(("f1", "entity F1"), ("precision", "precision"), ("recall", "recall"),
                      ("token_accuracy", "tag accuracy")),
    comparison_metric="f1",
    card_metrics=("f1", "precision", "recall", "macro_f1", "token_accuracy", "loss"),
    endpoints=("/v1/ner",),
)

register_task(INFO, _task, _predictor)
