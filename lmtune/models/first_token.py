"""The last encoder layer on the first position only, for heads that read nothing else.

A BERT-style sequence classifier (BERT, MiniLM, RoBERTa, XLM-R, CamemBERT, ELECTRA, Data2Vec-text,
DistilBERT) reads the last layer's output at position 0 (``[CLS]`` / ``<s>``) and nothing more: the pooler
takes ``hidden[:, 0]``, RoBERTa's head ``features[:, 0, :]``, DistilBERT's ``hidden_state[:, 0]``. In that
layer the other positions' queries, attention outputs and feed-forward blocks are computed and thrown away.
Keys and values still need every position (the first token attends to all of them), so the layer is rerun
here with one query row:

    q = query(x[:, :1]); k = key(x); v = value(x)      attention over the full (padded) mask row 0
    out = feed_forward(attention.output(attn, x[:, :1]))

The same modules, in the same order, on a subset of rows; for a 6-layer model that is about 14% of the
linear-layer FLOPs of a step (forward and backward: 10 of the last layer's 12 h^2 per token), measured as
4-7% of a MiniLM step in bf16 (BENCHMARKS.md). The logits equal the full layer's (float rounding: a matmul on
one row may sum in another order), so nothing changes but time; ``tests/test_speed_paths.py`` checks the
logits, the loss and every gradient against the full layer. The patch is an instance attribute
(``layer.forward``): parameter names, ``state_dict`` and the saved model are untouched, and a model loaded
from disk (``lmtune predict``, the server) runs the plain layer.

Applied only where both the head class and the layer class are known to read / be built this way, the
model is an encoder without cross-attention, and feed-forward chunking is off; anything else keeps the
plain layer.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmtune.models.encoder_attention import attend

__all__ = ["first_token_last_layer", "plain_last_layer"]


def _attend(attention: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """Position 0's attention over every position, through :func:`encoder_attention.attend`: (B, 1, H)."""
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] != 1:
        attention_mask = attention_mask[:, :, :1, :]  # row 0 of a (B, 1|heads, T, T) mask
    context, _ = attend(attention, query, key, value, attention_mask, kwargs)
    return context.reshape(query.shape[0], 1, -1).contiguous()


def _heads(x: torch.Tensor, head: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], -1, head).transpose(1, 2)


def _bert_layer(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> torch.Tensor:
    """BertLayer.forward for an encoder, with the query, the attention output and the feed-forward block on
    position 0 only: returns (B, 1, H). (``*args``: the encoder passes ``encoder_hidden_states``, None here.)"""
    kwargs.pop("encoder_attention_mask", None)
    kwargs.pop("past_key_values", None)
    attention = self.attention.self
    first, head = hidden_states[:, :1], attention.attention_head_size
    context = _attend(attention, _heads(attention.query(first), head), _heads(attention.key(hidden_states), head),
                      _heads(attention.value(hidden_states), head), attention_mask, kwargs)
    return self.feed_forward_chunk(self.attention.output(context, first))


def _distilbert_block(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **kwargs: Any) -> torch.Tensor:
    """DistilBERT's TransformerBlock.forward with the query, the output projection, both layer norms and the
    feed-forward block on position 0 only: returns (B, 1, H)."""
    attention = self.attention
    first, head = hidden_states[:, :1], attention.attention_head_size
    context = _attend(attention, _heads(attention.q_lin(first), head), _heads(attention.k_lin(hidden_states), head),
                      _heads(attention.v_lin(hidden_states), head), attention_mask, kwargs)
    attention_output = self.sa_layer_norm(attention.out_lin(context) + first)
    return self.output_layer_norm(self.ffn(attention_output) + attention_output)


@dataclass(frozen=True)
class _Family:
    """Where a head's last layer sits and how it runs on position 0."""

    stack: str  # the layer stack's attribute on the base model (its layers in ``.layer``)
    layers: tuple[str, ...]  # the layer classes it is built of
    forward: Callable[..., torch.Tensor]  # that layer's forward on position 0
    needs: tuple[str, ...]  # the layer attributes ``forward`` reads, checked before patching


_BERT = _Family("encoder", ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer",
                            "Data2VecTextLayer"), _bert_layer, ("attention", "feed_forward_chunk"))
# Head classes whose logits read the last hidden state at position 0 only.
_HEADS = {
    "BertForSequenceClassification": _BERT, "RobertaForSequenceClassification": _BERT,
    "XLMRobertaForSequenceClassification": _BERT, "CamembertForSequenceClassification": _BERT,
    "ElectraForSequenceClassification": _BERT, "Data2VecTextForSequenceClassification": _BERT,
    "DistilBertForSequenceClassification": _Family("transformer", ("TransformerBlock",), _distilbert_block,
                                                   ("attention", "sa_layer_norm", "ffn", "output_layer_norm")),
}


def _last_layer(model: torch.nn.Module) -> tuple[torch.nn.Module, _Family] | None:
    family = _HEADS.get(type(model).__name__)
    if family is None:
        return None
    config: Any = model.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False) or getattr(
            config, "chunk_size_feed_forward", 0):
        return None
    layers = getattr(getattr(model.base_model, family.stack, None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return None
    last = layers[-1]
    if type(last).__name__ not in family.layers or not all(hasattr(last, name) for name in family.needs):
        return None
    return last, family


def first_token_last_layer(model: torch.nn.Module) -> bool:
    """Run ``model``'s last encoder layer on position 0 only, if its head reads nothing else; True if patched."""
    found = _last_layer(model)
    if found is None:
        return False
    last, family = found
    last.forward = types.MethodType(family.forward, last)
    return True


def plain_last_layer(model: torch.nn.Module) -> None:
    """Undo :func:`first_token_last_layer` (the class's own forward again)."""
    found = _last_layer(model)
    if found is not None and "forward" in vars(found[0]):
        del found[0].forward
