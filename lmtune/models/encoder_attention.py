"""An encoder's self-attention in CPU training: the probabilities' dropout with fast masks.

In training with attention dropout, torch's SDPA has no fused CPU kernel and runs its math path, drawing the
probabilities' mask with ``bernoulli_`` one element at a time: about 12 ms of a 30 ms attention (forward and
backward; (32, 12, 64, 64) probabilities) on the 2-core machines lmtune is measured on. :func:`patch_attention`
replaces ``forward`` on the instance of every known BERT-style self-attention block (BERT, MiniLM, RoBERTa,
XLM-R, CamemBERT, ELECTRA, Data2Vec-text, DistilBERT) whose dropout fast dropout has taken over by the class's own computation with one change: when
the block's dropout is a :class:`FastDropout` (``train.fast_dropout``, the default on the CPU), p > 0 and the
model is training on the CPU, the attention is SDPA's math path written out, with the mask drawn by
:func:`lmtune.models.dropout.keep_mask`: float32 throughout, as SDPA's math path computes bf16 inputs on the
CPU (scores ``q k^T`` scaled, the padding mask, softmax, the dropped probabilities zeroed, ``probs v``, the
1 / keep scale applied to that smaller product), the result in the value's dtype. Same distribution as
torch's dropout, different draws (as for every other fast dropout layer). Without dropout (evaluation,
``p = 0``) or off the CPU, the model's own attention function (SDPA, eager, ...) runs, so nothing changes.

Measured and not adopted: projecting query, key and value with one (h x 3h) matmul (the three weights
``torch.cat``-ed per call). It made a MiniLM bf16 step ~4% faster but raised the training peak by ~150 MB: the
wider matmuls' oneDNN primitives, cached per shape, hold that memory (BENCHMARKS.md). Computing this
attention's matmuls in bf16 instead of float32 likewise cost ~50 MB for ~1.5%.

The patch is an instance attribute (``attention.forward``), made at training time: a model loaded from disk
(``lmtune predict``, the server) runs the plain block. ``tests/test_speed_paths.py`` checks outputs and
gradients against the plain block and the fast attention against a by-hand attention with the same mask.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lmtune.models.dropout import MIN_ELEMENTS, FastDropout, keep_mask

__all__ = ["attend", "patch_attention", "unpatch_attention"]


@dataclass(frozen=True)
class _Names:
    """Where an attention class keeps its projections."""

    query: str
    key: str
    value: str
    output: str | None  # an output projection the attention module itself applies (DistilBERT's out_lin)


_BERT = _Names("query", "key", "value", None)
_ATTENTIONS = {
    "BertSelfAttention": _BERT, "RobertaSelfAttention": _BERT, "XLMRobertaSelfAttention": _BERT,
    "CamembertSelfAttention": _BERT, "ElectraSelfAttention": _BERT, "Data2VecTextSelfAttention": _BERT,
    "DistilBertSelfAttention": _Names("q_lin", "k_lin", "v_lin", "out_lin"),
}


def _fast_dropout_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Non-causal attention with the probabilities' dropout mask from :func:`keep_mask`: (B, T, heads, d)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    dtype = value.dtype
    with torch.autocast(query.device.type, enabled=False):  # float32 matmuls, as SDPA's math path
        query, key, value = query.float(), key.float(), value.float()
        scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)  # in place from here: nothing saves it
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores.add_(attention_mask)
        probs = scores.softmax(dim=-1)
        drawn = keep_mask(probs.shape, dropout)
        if drawn is None:  # p rounds to 0 or 1 at 16 bits: torch's dropout
            output = torch.matmul(F.dropout(probs, dropout, training=True), value)
        else:
            keep, keep_scale = drawn
            output = torch.matmul(torch.where(keep, probs, 0), value).mul_(keep_scale)  # scale the smaller one
    return output.transpose(1, 2).contiguous().to(dtype), None


def _interface(module: Any, query: torch.Tensor, key: torch.Tensor) -> Callable[..., Any]:
    """The attention function a patched block calls: fast-dropout math in CPU training with a FastDropout,
    else the model's own (``config._attn_implementation``)."""
    implementation = module.config._attn_implementation
    p = module.dropout.p
    if (module.training and p > 0 and isinstance(module.dropout, FastDropout) and query.device.type == "cpu"
            and implementation in ("sdpa", "eager") and query.shape[:-1].numel() * key.shape[-2] >= MIN_ELEMENTS
            and not torch.jit.is_tracing()):
        return _fast_dropout_attention
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """``module``'s attention of ``query`` over ``key`` and ``value`` ((B, heads, T, d) each): (B, Tq, heads, d)
    and the weights where the function returns them."""
    function = _interface(module, query, key)
    return function(module, query, key, value, attention_mask, dropout=module.dropout.p if module.training else 0.0,
                    scaling=module.scaling, **kwargs)


def _patched_forward(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The self-attention forward of BERT's and DistilBERT's families, through :func:`attend`."""
    if past_key_values is not None:
        return type(self).forward(self, hidden_states, attention_mask, past_key_values=past_key_values, **kwargs)
    names = _ATTENTIONS[type(self).__name__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.attention_head_size)
    query, key, value = (getattr(self, name)(hidden_states).view(hidden_shape).transpose(1, 2)
                         for name in (names.query, names.key, names.value))
    output, weights = attend(self, query, key, value, attention_mask, kwargs)
    output = output.reshape(*input_shape, -1).contiguous()
    if names.output is not None:
        output = getattr(self, names.output)(output)
    return output, weights


def _attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    config: Any = getattr(model, "config", None)
    if config is not None and (getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False)):
        return []
    return [m for m in model.modules() if type(m).__name__ in _ATTENTIONS
            and all(hasattr(m, a) for a in ("config", "attention_head_size", "scaling", "dropout"))
            and not getattr(m, "is_decoder", False)]


def patch_attention(model: torch.nn.Module) -> int:
    """Run every known encoder self-attention block of ``model`` whose dropout is a :class:`FastDropout` with
    p > 0 through :func:`attend` (fast dropout masks in CPU training); returns how many blocks."""
    blocks = [m for m in _attentions(model) if isinstance(m.dropout, FastDropout) and m.dropout.p > 0]
    for attention in blocks:
        attention.forward = types.MethodType(_patched_forward, attention)
    return len(blocks)


def unpatch_attention(model: torch.nn.Module) -> None:
    """Undo :func:`patch_attention` (the classes' own forward again)."""
    for attention in _attentions(model):
        if "forward" in vars(attention):
            del attention.forward
