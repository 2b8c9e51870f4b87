"""What the rest of lmtune knows about the masked_lm task without running it (see ``TaskInfo``)."""

from __future__ import annotations

from typing import Any

from lmtune.config.tasks import TaskInfo


def check_masked_lm(config: Any) -> None:
    """Config checks of masked_lm (``TaskInfo.check``): settings of other tasks that cannot apply here are
    refused by name (a non-default value, so a saved config.yaml, which spells out every default, reloads).
    ``data.extend_vocabulary`` applies: frequent training words the tokenizer reads only as its unknown token become
    tokens the model learns to predict (and a tagging run started from the result finds them known)."""
    d = config.data
    if d.text_pair_column is not None:
        raise ValueError("data.text_pair_column does not apply to task masked_lm: it reads one text per document "
                         "(data.text_column)")
    if config.method.name == "qlora":
        raise ValueError("method.name qlora is for decoders; a masked-language-model encoder is small: use "
                         "method.name lora or full")


INFO = TaskInfo(
    name="masked_lm",
    summary="continue pre-training an encoder (BERT-style) on plain text: masked-token prediction (whole words, "
    "15%, 80% [MASK] / 10% random / 10% kept)",
    reads="plain text: .txt files (one document per file, paragraph or line: data.document_split) or a text "
    "column (data.text_column)",
    default_metric="loss",
    auto_class="AutoModelForMaskedLM",
    pipeline_tag="fill-mask",
    usage='from transformers import pipeline\n\nfill = pipeline("fill-mask", model="{name}")\n'
    'print(fill(f"It is a truth universally {{fill.tokenizer.mask_token}}."))',
    headline_metrics=(("accuracy", "masked-token accuracy"), ("perplexity", "perplexity"), ("loss", "loss")),
    comparison_metric="perplexity",
    card_metrics=("accuracy", "perplexity", "loss"),
    endpoints=("/v1/fill-mask",),
    check=check_masked_lm,
    packing_default=True,
    starting_point_name="before pre-training",
    card_limitation="Masked-language-model pre-training adapts the encoder to the text it read: its vocabulary, "
                    "style and facts. It is a starting point for a classification or tagging run, not a model "
                    "that answers questions; its fillers repeat the biases of that text.",
)
