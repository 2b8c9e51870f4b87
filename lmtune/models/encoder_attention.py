"""An encoder's self-attention at training time: one projection matmul, and dropout masks drawn fast.

A BERT-style self-attention block (BERT, MiniLM, RoBERTa, XLM-R, CamemBERT, ELECTRA, Data2Vec-text,
DistilBERT) is run by :func:`patch_attention` with two changes that alter nothing but time:

- **Query, key and value as one matmul.** The block projects the same hidden states three times, with three
  ``nn.Linear`` of one shape. Their weights are stacked for each call (``torch.cat``, a (3h x h) copy, a few
  hundred KB) and applied once: ``q, k, v = linear(x, [Wq; Wk; Wv], [bq; bk; bv]).split(h)``. One wide matmul
  instead of three narrow ones, and under bf16 autocast one cast of ``x`` instead of three (autocast caches
  the casts of weights, not of activations). The outputs equal the separate projections' (float rounding: a
  wider matmul may block its sums differently); the gradients land in the three ``nn.Linear`` through
  ``cat``, whose parameters, names and ``state_dict`` are untouched. Where a projection is not a plain
  ``nn.Linear`` (LoRA wraps it) or something hooks it (Opacus' per-example gradients, Accelerate's
  offloading, explainers), the three modules are called as usual.
- **The attention probabilities' dropout with fast masks.** In training with attention dropout, torch's SDPA
  has no fused CPU kernel and runs its math path, drawing the mask with ``bernoulli_`` one element at a time:
  about 12 ms of a 30 ms attention (forward and backward; (32, 12, 64, 64) probabilities in bf16) on the
  2-core machines lmtune is measured on. When the block's dropout is a :class:`FastDropout`
  (``train.fast_dropout``, the default on the CPU), the same math runs here with the mask drawn by
  :func:`lmtune.models.dropout.fast_dropout`: scores ``q k^T * scale`` (bf16 under autocast, as the eager
  attention), the padding mask added, softmax in float32, the dropout, then ``probs v``. Same distribution as
  torch's dropout, different draws (as for every other fast dropout layer). Without dropout (evaluation,
  ``p = 0``) or off the CPU, the model's own attention function (SDPA, eager, ...) runs.

The patch is an instance attribute (``attention.forward``), made at training time: a model loaded from disk
(``lmtune predict``, the server) runs the plain block. ``tests/test_speed_paths.py`` checks outputs and
gradients against the plain block.
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

from lmtune.models.dropout import MIN_ELEMENTS, FastDropout, fast_dropout

__all__ = ["attend", "patch_attention", "projections", "unpatch_attention"]


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


def _plain(module: Any) -> bool:
    """A plain ``nn.Linear`` that nothing hooks."""
    return (type(module) is torch.nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not hasattr(module, "_hf_hook"))


def _stackable(linears: list[Any]) -> bool:
    first = linears[0]
    return all(_plain(m) for m in linears) and all(
        m.in_features == first.in_features and (m.bias is None) == (first.bias is None)
        and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device for m in linears)


def projections(x: torch.Tensor, linears: list[Any]) -> list[torch.Tensor]:
    """``[m(x) for m in linears]``, as one matmul when the modules are plain linears of one input width."""
    if len(linears) < 2 or not _stackable(linears):
        return [m(x) for m in linears]
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return list(F.linear(x, weight, bias).split([m.out_features for m in linears], dim=-1))


def _fast_dropout_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Non-causal attention with the probabilities' dropout mask from :func:`fast_dropout`: (B, T, heads, d)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask.float()
    probs = fast_dropout(scores.softmax(dim=-1), dropout)
    output = torch.matmul(probs.to(value.dtype), value)
    return output.transpose(1, 2).contiguous(), None


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
    return _interface(module, query, key)(module, query, key, value, attention_mask,
                                     dropout=module.dropout.p if module.training else 0.0, scaling=module.scaling,
                                     **kwargs)


def _patched_forward(self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The self-attention forward of BERT's and DistilBERT's families, through :func:`projections` and
    :func:`attend`."""
    if past_key_values is not None:
        return type(self).forward(self, hidden_states, attention_mask, past_key_values=past_key_values, **kwargs)
    names = _ATTENTIONS[type(self).__name__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.attention_head_size)
    linears = [getattr(self, names.query), getattr(self, names.key), getattr(self, names.value)]
    query, key, value = (p.view(hidden_shape).transpose(1, 2) for p in projections(hidden_states, linears))
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
    """Run every known encoder self-attention block of ``model`` through :func:`projections` (one matmul where
    the projections are plain linears) and :func:`attend` (fast dropout masks in CPU training); returns how
    many blocks."""
    blocks = _attentions(model)
    for attention in blocks:
        attention.forward = types.MethodType(_patched_forward, attention)
    return len(blocks)


def unpatch_attention(model: torch.nn.Module) -> None:
    """Undo :func:`patch_attention` (the classes' own forward again)."""
    for attention in _attentions(model):
        if "forward" in vars(attention):
            del attention.forward
