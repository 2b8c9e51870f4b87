"""Sequence to sequence: summarization and translation, on an encoder-decoder or a prompted decoder."""

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.base import Predictor, Task, register_task
from lmtune.tasks.seq2seq.checks import check_config


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.seq2seq.task import Seq2SeqTask

    return Seq2SeqTask


def _predictor() -> type[Predictor]:
    from lmtune.tasks.seq2seq.predict import Seq2SeqPredictor

    return Seq2SeqPredictor


INFO = TaskInfo(
    name="seq2seq",
    summary="summarization and translation: generate a target text from a source text",
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
)

register_task(INFO, _task, _predictor)
