"""What the rest of lmtune knows about the causal_lm task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import TaskInfo

INFO = TaskInfo(
    name="causal_lm",
    summary="train a causal language model on plain text (continued pre-training, or from scratch)",
    reads="plain text: .txt files (one document per file, paragraph or line: data.document_split) "
    "or a text column (data.text_column)",
    default_metric="loss",
    auto_class="AutoModelForCausalLM",
    pipeline_tag="text-generation",
    usage='from transformers import pipeline\n\ngenerate = pipeline("text-generation", model="{name}")\nprint(generate("It is a truth universally acknowledged", max_new_tokens=50)[0]["generated_text"])',
    headline_metrics=(("perplexity", "perplexity"), ("loss", "loss")),
    comparison_metric="perplexity",
    card_metrics=("perplexity", "loss"),
    decoder=True,
    generates=True,
    memorisation=True,
    privacy=True,
    packing_default=True,
    exports=("merged", "quantized", "gguf"),
    endpoints=("/v1/completions",),
    streaming=True,
    scratch=True,
    bundled_data=("janeausten",),
)
