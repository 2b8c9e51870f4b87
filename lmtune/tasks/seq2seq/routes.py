"""The two routes of ``task: seq2seq``, chosen by the model (``model.seq2seq: auto``) or by that setting:
an encoder-decoder (or one warm-started from an encoder), or a decoder answering an instruction prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig

from lmtune.config import Config
from lmtune.errors import ConfigError, ModelError

ROUTES = ("encoder_decoder", "warm_start", "decoder")
ROUTE_DESCRIPTIONS = {
    "encoder_decoder": "encoder-decoder model",
    "warm_start": "encoder-decoder warm-started from an encoder (EncoderDecoderModel; new cross-attention)",
    "decoder": "decoder-only model with an instruction prompt in its chat template",
}
DEFAULT_PROMPTS = {
    "summarization": "Summarize:\n{source}",
    "translation": "Translate from {source_language} to {target_language}:\n{source}",
}


def model_route(cfg: Config, model_path: Path) -> str:
    """``encoder_decoder``, ``warm_start`` or ``decoder`` for the model at ``model_path`` and ``model.seq2seq``."""
    setting = cfg.model.seq2seq
    try:
        mc = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model's config: {exc}", file=model_path) from None
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(mc, "architectures", None) or []))
    if mc.is_encoder_decoder:
        if setting == "decoder":
            raise ConfigError(f"model.seq2seq decoder: {model_path} is an encoder-decoder ({mc.model_type})",
                              hint="use model.seq2seq: encoder_decoder (or auto)")
        return "encoder_decoder"
    if causal:
        if setting == "encoder_decoder":
            raise ConfigError(f"model.seq2seq encoder_decoder: {model_path} is a decoder-only model "
                              f"({mc.model_type}); it cannot be the encoder of an encoder-decoder",
                              hint="use model.seq2seq: decoder (or auto): it answers an instruction prompt")
        return "decoder"
    if setting == "decoder":
        raise ConfigError(f"model.seq2seq decoder: {model_path} is an encoder ({mc.model_type}), not a causal LM",
                          hint="use model.seq2seq: encoder_decoder to warm-start an encoder-decoder from it")
    return "warm_start"


def clip_source(tokenizer: Any, source: str, budget: int) -> tuple[str, bool]:
    """``source`` cut at the end to at most ``budget`` tokens (without special tokens), and whether it was cut.

    The decoder route's long-document rule, the same in training (``PromptSeq2SeqTask``) and prediction
    (``Seq2SeqPredictor``), so a saved summarizer sees at inference what it saw in training: the
    document's start, up to the budget its prompt and answer leave. The cut falls at a token boundary of
    the original text (from the tokenizer's offsets), so the kept text re-tokenises to the same tokens."""
    if len(source) <= budget:  # a token is at least one character
        return source, False
    enc = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= budget:
        return source, False
    return source[: enc["offset_mapping"][budget - 1][1]].rstrip(), True
