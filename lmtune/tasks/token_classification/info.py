"""What the rest of lmtune knows about the token_classification task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import TAGGER_BASELINES, TaskInfo

INFO = TaskInfo(
    name="token_classification",
    summary="tag words: named entities (people, places, organisations ...) as character spans",
    reads="tokens + tags columns, text + character spans (data.spans_column), or CoNLL files",
    default_metric="f1",
    auto_class="AutoModelForTokenClassification",
    pipeline_tag="token-classification",
    usage='from transformers import pipeline\n\nner = pipeline("token-classification", model="{name}", aggregation_strategy="simple")\nprint(ner("an example sentence"))  # lmtune predict splits words as in training (exact offsets)',
    headline_metrics=(("f1", "entity F1"), ("precision", "precision"), ("recall", "recall"),
                      ("token_accuracy", "tag accuracy")),
    comparison_metric="f1",
    card_metrics=("f1", "precision", "recall", "macro_f1", "token_accuracy", "loss"),
    endpoints=("/v1/ner",),
    # The BiLSTM tagger (`baselines: [bilstm]` trains it as a sub-run; `model: baseline:bilstm` alone).
    baselines=TAGGER_BASELINES,
    bundled_data=("peoples_daily",),
)
