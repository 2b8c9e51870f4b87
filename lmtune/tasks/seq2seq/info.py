"""What the rest of lmtune knows about the seq2seq task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import RULE_BASELINES, TaskInfo
from lmtune.tasks.seq2seq.checks import check_config

INFO = TaskInfo(
    name="seq2seq",
    summary="summarization and translation: generate a target text from a source text",
    reads="a source and a target column (data.source_column, data.target_column)",
    default_metric="loss",
    auto_class="AutoModelForSeq2SeqLM",
    pipeline_tag="text2text-generation",
    usage='from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # decoder route: AutoModelForCausalLM\n\ntok = AutoTokenizer.from_pretrained("{name}")\nmodel = AutoModelForSeq2SeqLM.from_pretrained("{name}")\nids = tok(["a source text"], return_tensors="pt")\nprint(tok.batch_decode(model.generate(**ids), skip_special_tokens=True))',
    headline_metrics=(("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rouge_l", "ROUGE-L"), ("bleu", "BLEU"),
                      ("chrf", "chrF"), ("stopped_fraction", "stops by itself")),
    comparison_metric="rouge_l",
    card_metrics=("rouge1", "rouge2", "rouge_l", "rouge_lsum", "bleu", "chrf", "stopped_fraction", "loss"),
    generates=True,
    endpoints=("/v1/generate",),
    check=check_config,
    bundled_data=("chatterbot_en_*", "aclsum"),
    # Summarization's lead-N rows in the comparison table (translation has none: the task gives no rows).
    baselines=RULE_BASELINES,
    default_baselines=RULE_BASELINES,
)
