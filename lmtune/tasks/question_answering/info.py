"""What the rest of lmtune knows about the question_answering task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import TaskInfo

INFO = TaskInfo(
    name="question_answering",
    summary="extractive question answering: point at the answer span in a context (or say there is none)",
    reads="question, context and answers columns (SQuAD-style answers, or "
    "data.answer_text_column + data.answer_start_column)",
    default_metric="f1",
    auto_class="AutoModelForQuestionAnswering",
    pipeline_tag="question-answering",
    usage='from transformers import pipeline\n\nqa = pipeline("question-answering", model="{name}")\nprint(qa(question="Who wrote it?", context="Ada Lovelace wrote the first program."))\n# lmtune predict also applies the no-answer threshold tuned in training (lmtune.json)',
    headline_metrics=(("exact_match", "exact match"), ("f1", "F1"), ("has_answer_f1", "F1 (answerable)"),
                      ("no_answer_f1", "F1 (unanswerable)")),
    comparison_metric="f1",
    card_metrics=("f1", "exact_match", "has_answer_f1", "no_answer_f1", "loss"),
    endpoints=("/v1/qa",),
    bundled_data=("chatterbot_qa",),
)
