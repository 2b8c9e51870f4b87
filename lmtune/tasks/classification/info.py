"""What the rest of lmtune knows about the classification task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import CLASSIC_BASELINES, NEURAL_BASELINES, TaskInfo

INFO = TaskInfo(
    name="classification",
    summary="label texts (or text pairs): sentiment, topics, intents; one or many labels per text",
    reads="a text column (data.text_column; data.text_pair_column for pairs) and a label column "
    "(data.label_column: strings, integers or lists)",
    default_metric="accuracy",
    auto_class="AutoModelForSequenceClassification",
    pipeline_tag="text-classification",
    usage='from transformers import pipeline\n\nclf = pipeline("text-classification", model="{name}")\nclf("an example sentence")',
    headline_metrics=(("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1")),
    comparison_metric="accuracy",
    card_metrics=("accuracy", "macro_f1", "weighted_f1", "loss"),
    exports=("merged", "onnx"),
    endpoints=("/v1/classify",),
    baselines=CLASSIC_BASELINES + NEURAL_BASELINES,
    default_baselines=CLASSIC_BASELINES,
    bundled_data=("rotten_tomatoes",),
    slices=True,
    privacy=True,
    starting_point_name="before fine-tuning (new head)",
    card_limitation="The labels come from the training file: the model cannot predict a label it never saw.",
    default=True,
)
