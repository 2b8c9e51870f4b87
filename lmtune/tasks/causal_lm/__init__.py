"""Language-model training on raw text: continued pre-training, or a small model from scratch."""

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.base import Predictor, Task, register_task


def _task() -> type[Task]:
    # Imported when the task runs, not when lmtune starts: torch and transformers load only then.
    from lmtune.tasks.causal_lm.task import CausalLMTask

    return CausalLMTask


def _predictor() -> type[Predictor]:
    from lmtune.tasks.decoder import GenerativePredictor

    return GenerativePredictor


INFO = TaskInfo(
    name="causal_lm",
    summary="train a causal language model on plain text (continued pre-training, or from scratch)",
    default_metric="loss",
    auto_class="AutoModelForCausalLM",
    pipeline_tag="text-generation",
    usage='from transformers import pipeline\n\ngenerate = pipeline("text-generation", model="{name}")\nprint(generate("It is a truth universally acknowledged", max_new_tokens=50)[0]["generated_text"])',
    headline_metrics=(("perplexity", "perplexity"), ("loss", "loss")),
    comparison_metric="perplexity",
    card_metrics=("perplexity", "loss"),
    decoder=True,
    generates=True,
    endpoints=("/v1/completions",),
    streaming=True,
    scratch=True,
)

register_task(INFO, _task, _predictor)
