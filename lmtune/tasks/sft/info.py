"""What the rest of lmtune knows about the sft task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import TaskInfo

INFO = TaskInfo(
    name="sft",
    summary="instruction / chat tuning: the model learns the assistant's answers of conversations",
    reads="conversations: message lists (openai or sharegpt) or instruction/input/output columns",
    default_metric="loss",
    auto_class="AutoModelForCausalLM",
    pipeline_tag="text-generation",
    usage='from transformers import pipeline\n\nchat = pipeline("text-generation", model="{name}")\nmessages = [{{"role": "user", "content": "Hello!"}}]\nprint(chat(messages, max_new_tokens=128)[0]["generated_text"][-1]["content"])',
    headline_metrics=(("token_f1", "token F1"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF"), ("exact_match", "exact match"),
                      ("stopped_fraction", "stops by itself"), ("loss", "loss")),
    comparison_metric="rouge_l",
    card_metrics=("exact_match", "token_f1", "rouge_l", "chrf", "bleu", "stopped_fraction", "loss", "perplexity"),
    decoder=True,
    chat=True,
    chat_template=True,
    generates=True,
    memorisation=True,
    privacy=True,
    exports=("merged", "quantized", "gguf"),
    endpoints=("/v1/chat/completions", "/v1/completions"),
    streaming=True,
    bundled_data=("chatterbot", "chatterbot_*"),
)
