"""The last encoder layer on the first position only, for heads that read nothing else.

A BERT-style sequence classifier (BERT, MiniLM, RoBERTa, XLM-R, CamemBERT, ELECTRA, Data2Vec-text) reads
the last layer's output at position 0 (``[CLS]`` / ``<s>``) and nothing more: the pooler takes
``hidden[:, 0]``, RoBERTa's head ``features[:, 0, :]``. In that layer the other positions' queries,
attention outputs and feed-forward blocks are computed and thrown away. Keys and values still need every
position (the first token attends to all of them), so the layer is rerun here with one query row:

    q = query(x[:, :1]); k = key(x); v = value(x)      attention over the full (padded) mask row 0
    out = feed_forward(attention.output(attn, x[:, :1]))

The same modules, in the same order, on a subset of rows; for a 6-layer model that is about 14% of the
linear-layer FLOPs of a step (forward and backward: 10 of the last layer's 12 h^2 per token). The logits
equal the full layer's (float rounding: a matmul on one row may sum in another order), so nothing changes
but time; ``tests/test_speed_paths.py`` checks the logits, the loss and every gradient against the full
layer. The patch is an instance attribute (``layer.forward``): parameter names, ``state_dict`` and the saved
model are untouched, and a model loaded from disk (``lmtune predict``, the server) runs the plain layer.

Applied only where both the head class and the layer class are known to read / be built this way, the
model is an encoder without cross-attention, and feed-forward chunking is off; anything else keeps the
plain layer.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["first_token_last_layer", "plain_last_layer"]

# Heads whose logits depend on the last hidden state at position 0 only.
_HEADS = frozenset({
    "BertForSequenceClassification", "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
    "CamembertForSequenceClassification", "ElectraForSequenceClassification",
    "Data2VecTextForSequenceClassification",
})
# Layers built like transformers' BertLayer (attention.self.query/key/value, attention.output,
# feed_forward_chunk); the forward below mirrors BertLayer.forward for an encoder.
_LAYERS = frozenset({"BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer",
                     "Data2VecTextLayer"})


def _last_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    if type(model).__name__ not in _HEADS:
        return None
    config: Any = model.config
    if config.is_decoder or getattr(config, "add_cross_attention", False) or getattr(config, "chunk_size_feed_forward", 0):
        return None
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return None
    last = layers[-1]
    attention = getattr(getattr(last, "attention", None), "self", None)
    if type(last).__name__ not in _LAYERS or attention is None or not all(
            hasattr(attention, name) for name in ("query", "key", "value", "attention_head_size", "scaling")):
        return None
    return last


def first_token_last_layer(model: torch.nn.Module) -> bool:
    """Run ``model``'s last encoder layer on position 0 only, if its head reads nothing else; True if patched."""
    last = _last_layer(model)
    if last is None:
        return False
    last.forward = types.MethodType(_first_position_forward, last)
    return True


def plain_last_layer(model: torch.nn.Module) -> None:
    """Undo :func:`first_token_last_layer` (the class's own forward again)."""
    last = _last_layer(model)
    if last is not None and "forward" in vars(last):
        del last.forward


def _first_position_forward(self: Any, hidden_states: torch.Tensor,
                            attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    """BertLayer.forward for an encoder, with the query, the attention output and the feed-forward block on
    position 0 only: returns (B, 1, H)."""
    kwargs.pop("encoder_attention_mask", None)
    kwargs.pop("past_key_values", None)
    attention = self.attention.self
    batch, length = hidden_states.shape[:2]
    first = hidden_states[:, :1]
    head = attention.attention_head_size
    query = attention.query(first).view(batch, 1, -1, head).transpose(1, 2)
    key = attention.key(hidden_states).view(batch, length, -1, head).transpose(1, 2)
    value = attention.value(hidden_states).view(batch, length, -1, head).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] != 1:
        attention_mask = attention_mask[:, :, :1, :]  # row 0 of a (B, 1|heads, T, T) mask
    eager = sys.modules[type(attention).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)
    context, _ = interface(attention, query, key, value, attention_mask,
                           dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling,
                           **kwargs)
    attention_output = self.attention.output(context.reshape(batch, 1, -1).contiguous(), first)
    return self.feed_forward_chunk(attention_output)
