"""Text classification (single- or multi-label, text pairs) on encoders and decoders, with baselines."""

from lmtune.config.tasks import BASELINE_NAMES, CLASSIC_BASELINES, TaskInfo
from lmtune.tasks.base import Predictor, Task, register_task


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.classification.task import ClassificationTask

    return ClassificationTask


def _predictor() -> type[Predictor]:
    from lmtune.tasks.classification.predict import ClassificationPredictor

    return ClassificationPredictor


INFO = TaskInfo(
    name="classification",
    summary="label texts (or text pairs): sentiment, topics, intents; one or many labels per text",
    default_metric="accuracy",
    auto_class="AutoModelForSequenceClassification",
    pipeline_tag="text-classification",
    usage='from transformers import pipeline\n\nclf = pipeline("text-classification", model="{name}")\nclf("an example sentence")',
    headline_metrics=(("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1")),
    comparison_metric="accuracy",
    card_metrics=("accuracy", "macro_f1", "weighted_f1", "loss"),
    exports=("merged", "onnx"),
    endpoints=("/v1/classify",),
    baselines=BASELINE_NAMES,
    default_baselines=CLASSIC_BASELINES,
)

register_task(INFO, _task, _predictor)
