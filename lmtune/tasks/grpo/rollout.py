"""Answers generated for prompts, and their per-token log-probabilities: the rollouts of ``task: grpo``.

Prompts arrive left-padded (``(N, P)`` ids and mask), as :func:`lmtune.models.generation.generate` pads them, so
every answer starts at column ``P``. An answer ends at its first end-of-turn token (kept: the model must learn to
write it) or after ``max_new_tokens``; what ``model.generate`` writes after the end (padding) is masked out.

The log-probabilities are computed with position ids from the attention mask (``cumsum - 1``, as generation
derives them), so a left-padded prompt is scored as it was sampled, and with the logits divided by the sampling
temperature (as TRL scores its samples).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmtune.data.features import IGNORE_INDEX
from lmtune.models.generation import GenerationSettings, generate_kwargs
from lmtune.tasks.preference_losses import completion_token_logps


@dataclass
class Completions:
    """N answers: ``ids`` ``(N, C)`` as generated (padding after the end), ``mask`` ``(N, C)`` 1 on the answer's
    tokens (its end-of-turn token included), ``texts`` (decoded without special tokens) and ``stopped`` (ended
    with an end-of-turn token rather than at the length limit)."""

    ids: Tensor
    mask: Tensor
    texts: list[str]
    stopped: list[bool]

    def token_lists(self) -> list[list[int]]:
        """Each answer's token ids (its end-of-turn token included)."""
        lengths = self.mask.sum(dim=1).tolist()
        return [row[:n] for row, n in zip(self.ids.tolist(), lengths, strict=True)]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(N, P)`` ids and attention mask of token-id lists, padded on the left."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
    return input_ids, mask


def completions_from_ids(ids: Tensor, stop_ids: list[int], tokenizer: Any) -> Completions:
    """The answers in ``ids`` ``(N, C)``, each ending at its first token of ``stop_ids`` (included)."""
    width = ids.shape[1]
    is_stop = torch.isin(ids, torch.tensor(stop_ids, dtype=ids.dtype, device=ids.device))  # (N, C)
    stopped = is_stop.any(dim=1)  # (N,)
    last = torch.where(stopped, is_stop.int().argmax(dim=1), torch.full_like(stopped, width - 1, dtype=torch.long))
    mask = (torch.arange(width, device=ids.device).unsqueeze(0) <= last.unsqueeze(1)).long()  # (N, C)
    texts = []
    for row, end, done in zip(ids.tolist(), last.tolist(), stopped.tolist(), strict=True):
        texts.append(str(tokenizer.decode(row[:end] if done else row[:end + 1], skip_special_tokens=True)))
    return Completions(ids, mask, texts, [bool(s) for s in stopped.tolist()])


def complete(model: Any, tokenizer: Any, input_ids: Tensor, attention_mask: Tensor, *, settings: GenerationSettings,
             stop_ids: list[int], pad_id: int) -> Completions:
    """Answers to left-padded prompts ``(N, P)``: sampled when ``settings.do_sample`` (drawing from the global torch
    RNG: the caller decides whether to fork it), else greedy. The model runs in eval mode without gradients and is
    put back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 **generate_kwargs(settings, stop_ids, pad_id))  # (N, P + C)
    finally:
        model.train(was_training)
    return completions_from_ids(out[:, input_ids.shape[1]:], stop_ids, tokenizer)


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under ``model`` (DDP, peft) computes only the last k positions' logits on request."""
    base = getattr(model, "module", model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def completion_logps(model: Any, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                     completion_mask: Tensor, *, temperature: float, keep_logits: bool) -> Tensor:
    """``(N, C)`` float32 log-probabilities of each answer token under ``model`` (0 off the answers): one forward
    over prompt + answer whose logits cover the answer positions only when ``keep_logits``."""
    prompt_length, answer_length = prompt_ids.shape[1], completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    # As generation numbers a left-padded row: from 0 at its first real token.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"logits_to_keep": answer_length + 1} if keep_logits else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   **kwargs).logits  # (N, C + 1, V), or (N, P + C, V)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, prompt_length:] = torch.where(completion_mask.bool(), completion_ids, IGNORE_INDEX)
    per_token = completion_token_logps(logits, labels, temperature=temperature)  # (N, P + C): column t scores t+1
    return per_token[:, prompt_length - 1: prompt_length - 1 + answer_length]
