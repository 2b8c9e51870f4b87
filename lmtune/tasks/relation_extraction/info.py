"""What the rest of lmtune knows about the relation_extraction task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import TaskInfo

INFO = TaskInfo(
    name="relation_extraction",
    summary="label the relation between two marked entities of a text (works_for, born_in ...), or none",
    reads="text + head/tail spans {start, end, type} + relation; text with <e1>..</e1> <e2>..</e2> "
    "(SemEval); or text + entities + relations per document (every entity pair; data.columns renames them)",
    default_metric="micro_f1",
    auto_class="AutoModelForSequenceClassification",
    pipeline_tag="text-classification",
    usage='import lmtune.tasks.relation_extraction.model  # registers model_type lmtune_relation\n'
    'from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n'
    'tok = AutoTokenizer.from_pretrained("{name}")\n'
    'model = AutoModelForSequenceClassification.from_pretrained("{name}")\n'
    'model(**tok("[E1:PER] Ada [/E1:PER] works at [E2:ORG] Acme [/E2:ORG]", return_tensors="pt")).logits',
    headline_metrics=(("micro_f1", "micro F1"), ("macro_f1", "macro F1"), ("micro_precision", "precision"),
                      ("micro_recall", "recall")),
    comparison_metric="micro_f1",
    card_metrics=("micro_f1", "macro_f1", "micro_precision", "micro_recall", "loss"),
    baselines=("majority", "tfidf_logreg"),
    default_baselines=("majority",),
    starting_point_name="before fine-tuning (new head)",
    card_limitation="The relation types come from the training file; scores leave the no-relation class out, "
    "and a pair whose markers a long text would cut off is skipped (counted).",
)
