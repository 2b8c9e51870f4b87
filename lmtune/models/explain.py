"""Token attributions: which input tokens moved a model's score, by integrated gradients on its input embeddings.

Integrated gradients (Sundararajan et al., 2017; computed by Captum's ``LayerIntegratedGradients``) walks from
a *baseline* input to the real one in ``n_steps`` points and sums the gradients of a scalar score along the
way, times the input's difference from the baseline. Attributions are taken on the model's input embedding
layer (``model.get_input_embeddings()``: token ids are discrete, their embedding vectors are not) and summed
over the embedding dimension, one number per token. They are *complete*: they add up to
``score(input) - score(baseline)``; Captum's convergence delta is how far the numerical integral misses that,
the check that ``n_steps`` was enough.

The baseline is the input with every token replaced by the padding token (the unknown token for a tokenizer
without one), except the special tokens ([CLS], [SEP], a chat model's markers), which stay as they are, the
usual practice: the attributions then speak about the text, and a special token's is exactly zero.

The score is a function of the logits that the task chooses (:func:`log_odds`: a label's log-odds, summed
over an entity's tokens for NER). Every model lmtune saves exposes its input embeddings (transformers models,
LoRA-merged or adapter models through peft, the neural baselines); one that does not is a ModelError.

Cost: ``n_steps`` forward and backward passes per explained item, run ``internal_batch_size`` interpolation
points at a time so memory stays that of a batch of that many sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmtune.errors import ModelError

DEFAULT_STEPS = 32
"""Interpolation points per explanation (Gauss-Legendre): enough for a convergence delta of a few percent of the
score change on the models tested; raise it when the delta reported is large."""
MAX_STEPS = 1024
INTERNAL_BATCH_SIZE = 16
"""Interpolation points run through the model at once (bounds memory: a batch of this many sequences)."""


@dataclass(frozen=True)
class Attribution:
    """Integrated-gradient attributions of one input."""

    scores: np.ndarray
    """(T,) one raw attribution per token (summed over the embedding dimension); special tokens have 0."""
    change: float
    """``score(input) - score(baseline)``: what the attributions share out."""
    delta: float
    """Captum's convergence delta, ``sum(scores) - change``: near 0 when ``n_steps`` sufficed."""


def check_steps(n_steps: int) -> int:
    """``n_steps`` when it is 1 to :data:`MAX_STEPS`, else a ModelError saying what is allowed."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or not 1 <= n_steps <= MAX_STEPS:
        raise ModelError(f"explanation steps must be a whole number from 1 to {MAX_STEPS}, got {n_steps!r}",
                         hint=f"{DEFAULT_STEPS} is the default; more steps make attributions more exact and slower")
    return n_steps


def embedding_layer(model: Any) -> torch.nn.Module:
    """The model's input embedding layer (token ids -> vectors), or a ModelError when it has none."""
    get = getattr(model, "get_input_embeddings", None)
    layer = get() if callable(get) else None
    if not isinstance(layer, torch.nn.Module):
        raise ModelError(f"this model ({type(model).__name__}) does not expose its input embeddings, so its "
                         "predictions cannot be explained by token attributions")
    return layer


def reference_token_id(tokenizer: Any) -> int:
    """The token the baseline is made of: padding, else the unknown token."""
    for name in ("pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ModelError("the tokenizer has neither a padding nor an unknown token to build the attribution baseline "
                     "from", hint="set tokenizer.pad_token in the model folder")


def log_odds(logits: torch.Tensor, label: int, *, multi_label: bool = False) -> torch.Tensor:
    """The log-odds of ``label`` in ``logits`` (..., L) -> (...): for softmax labels ``z_k - logsumexp(z_j, j != k)``
    (for two labels, the logit difference), for independent (sigmoid) labels ``z_k`` itself.

    Unlike the probability it does not saturate near 0 or 1, so a confident prediction still shares out a
    score change worth explaining; unlike the bare logit it cannot be raised by raising every logit together.
    """
    z = logits.float()
    if multi_label or z.shape[-1] == 1:
        return z[..., label]
    others = torch.cat([z[..., :label], z[..., label + 1:]], dim=-1)
    return z[..., label] - torch.logsumexp(others, dim=-1)


def integrated_gradients(
    model: Any, inputs: dict[str, torch.Tensor], score: Callable[[torch.Tensor], torch.Tensor], *,
    keep: torch.Tensor, reference_id: int, n_steps: int = DEFAULT_STEPS,
    internal_batch_size: int = INTERNAL_BATCH_SIZE,
) -> Attribution:
    """Attributions of one input (``inputs``: the tokenizer's tensors, batch 1, on the model's device) towards
    ``score(logits) -> (B,)``. ``keep`` (1, T) marks the tokens the baseline keeps (special tokens); the others
    become ``reference_id``. The model runs in its current mode (eval: no dropout, or the integral is noise)."""
    check_steps(n_steps)
    layer = embedding_layer(model)
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError("integrated_gradients explains one input at a time")
    names = [k for k in inputs if k != "input_ids"]
    extra = tuple(inputs[k] for k in names)

    def forward(ids: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        # Captum repeats the other inputs (attention mask ...) along the batch for the interpolation points.
        logits = model(input_ids=ids, **dict(zip(names, rest, strict=True))).logits
        return score(logits)  # (B,)

    from captum.attr import LayerIntegratedGradients  # noqa: PLC0415  (~30 MB: loaded only when explaining)

    baseline = torch.where(keep.bool(), input_ids, torch.full_like(input_ids, reference_id))
    ig = LayerIntegratedGradients(forward, layer)
    # inference_mode(False): the predictors answer under inference mode, where no gradient can be taken.
    with torch.inference_mode(False), torch.enable_grad():
        attributions, delta = ig.attribute(
            input_ids, baselines=baseline, additional_forward_args=extra or None, n_steps=n_steps,
            internal_batch_size=max(1, internal_batch_size), return_convergence_delta=True)
    scores = attributions.detach().float().sum(-1)[0].cpu().numpy()  # (1, T, H) -> (T,)
    d = float(delta.detach().reshape(-1)[0])
    return Attribution(scores=scores, change=float(scores.sum()) - d, delta=d)


def _normalised(values: Sequence[float]) -> list[float]:
    """``values`` divided by their largest magnitude (so the strongest is +1 or -1); all zero stays zero."""
    top = max((abs(v) for v in values), default=0.0)
    return [float(v) / top if top > 0 else 0.0 for v in values]


def describe(text_of: Callable[[int], str], tokens: Sequence[tuple[int, int, int, Hashable] | None],
             scores: np.ndarray) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """JSON-ready attributions: per token and merged per word, each normalised by its largest magnitude.

    ``tokens[t]`` is None for a token not to show (special tokens, padding), else ``(segment, start, end,
    word)``: character offsets into text ``segment`` (``text_of(segment)``: 0 the text, 1 a second text) and a
    key shared by the tokens of one word. A word's score is the sum of its tokens' (attributions add up).
    Rows: ``{"token"|"word": str, "start", "end", "score"}``, plus ``"segment"`` when a second text appears.
    """
    kept = [(t, span) for t, span in enumerate(tokens) if span is not None]
    pairs = any(span[0] != 0 for _, span in kept)
    token_rows: list[dict[str, Any]] = []
    word_order: list[Hashable] = []
    word_spans: dict[Hashable, list[Any]] = {}
    for t, (segment, start, end, word) in kept:
        row: dict[str, Any] = {"token": text_of(segment)[start:end], "start": start, "end": end,
                               "score": float(scores[t])}
        if pairs:
            row["segment"] = segment
        token_rows.append(row)
        key = (segment, word)
        if key not in word_spans:
            word_order.append(key)
            word_spans[key] = [segment, start, end, 0.0]
        span = word_spans[key]
        span[1], span[2] = min(span[1], start), max(span[2], end)
        span[3] += float(scores[t])
    for row, value in zip(token_rows, _normalised([r["score"] for r in token_rows]), strict=True):
        row["score"] = value
    words = [word_spans[k] for k in word_order]
    word_rows: list[dict[str, Any]] = []
    for (segment, start, end, _), value in zip(words, _normalised([w[3] for w in words]), strict=True):
        row = {"word": text_of(segment)[start:end], "start": start, "end": end, "score": value}
        if pairs:
            row["segment"] = segment
        word_rows.append(row)
    return token_rows, word_rows


def summary(attribution: Attribution) -> dict[str, float]:
    """The figures that say how far to trust one explanation: the score change shared out and the delta."""
    return {"score_change": attribution.change, "convergence_delta": attribution.delta}
