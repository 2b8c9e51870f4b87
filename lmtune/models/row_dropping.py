"""Batched decoding that drops each row from the batch as soon as its answer ends.

``model.generate`` keeps every row of a batch in every decoding step until the longest answer ends: a
finished row is padded, but its token is still run through the whole model, so a batch of 16 answers of
7-41 tokens costs 41 steps of 16 rows. :func:`decode` is the same loop (prefill, then one token per step
over a ``DynamicCache``, the logits processors ``generate`` would build, greedy argmax or multinomial
sampling) except that a row whose answer ended (EOS, a stopping criterion) leaves the batch before the next
step: its KV cache rows are dropped (``Cache.batch_select_indices``), the remaining rows run on. With bf16
weights on a CPU the last one or two rows then also take the one-row route of
:mod:`lmtune.models.decode_matmuls`.

What comes back is what ``generate`` returns: ``(B, T + steps)`` token ids, each row padded with the pad id
after its end. Greedy answers are those of ``generate`` (in float32 token for token: a row's arithmetic does
not depend on the other rows; in bf16 a row's rounding can depend on the batch's shape, as it already does
between batch sizes). Sampled answers are seeded and reproducible, but once a row has left the batch the
random stream is drawn over fewer rows, so they are not ``generate``'s draws (at one row they are).

:func:`decode` returns ``None`` where it cannot promise ``generate``'s behaviour, and the caller runs
``generate``: encoder-decoders, beam search, one-row batches (nothing to drop), weights sharded across
processes (FSDP, ZeRO-3: ``generate`` keeps finished processes stepping with their peers), models whose
``prepare_inputs_for_generation`` is their own (multimodal and recurrent models feed extra inputs), models
without a standard dynamic KV cache, prompt-learning adapters, and any logits processor (from the model's
own generation config too) that keeps state across steps or rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin, StoppingCriteria
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.distributed.utils import _get_torch_distributed_world_size
from transformers.generation import logits_process as lp
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

# Processors that read only the rows' token ids and scores at each step (the repetition penalty also each row's
# padding length, kept by _select_rows), so they run on any subset of rows.
_ROW_WISE = (
    lp.RepetitionPenaltyLogitsProcessor, lp.NoRepeatNGramLogitsProcessor, lp.TemperatureLogitsWarper,
    lp.TopPLogitsWarper, lp.TopKLogitsWarper, lp.MinPLogitsWarper, lp.TypicalLogitsWarper, lp.EpsilonLogitsWarper,
    lp.EtaLogitsWarper, lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor,
    lp.SuppressTokensLogitsProcessor, lp.SuppressTokensAtBeginLogitsProcessor, lp.NoBadWordsLogitsProcessor,
    lp.SequenceBiasLogitsProcessor, lp.ForcedBOSTokenLogitsProcessor, lp.ForcedEOSTokenLogitsProcessor,
    lp.InfNanRemoveLogitsProcessor, lp.ExponentialDecayLengthPenalty,
)
_INPUTS = {"input_ids", "attention_mask", "position_ids", "past_key_values"}


def _forward_model(model: Any) -> Any | None:
    """The transformers model whose forward ``generate`` would run, or None where this loop does not apply."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None and hasattr(model, "get_base_model"):
        # A LoRA-style PeftModel's generate runs the base model, adapters injected in its layers; prompt
        # learning (virtual tokens fed with the inputs) needs PEFT's own generate.
        if getattr(model, "active_peft_config", None) is None or model.active_peft_config.is_prompt_learning:
            return None
        model = model.get_base_model()
    if not isinstance(model, GenerationMixin):
        return None
    found: Any = model
    if getattr(found.config, "is_encoder_decoder", False):
        return None
    if type(found).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation:
        return None
    if not found._supports_default_dynamic_cache():
        return None
    # Weights sharded across processes (FSDP, ZeRO-3): every forward is collective, so generate keeps a process
    # whose rows all ended stepping until its peers end (synced_gpus, decided this way); this loop does not.
    if (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(found)) and _get_torch_distributed_world_size() > 1:
        return None
    if not set(inspect.signature(found.forward).parameters) >= _INPUTS:
        return None
    return found


def _select_rows(processors: Sequence[Any], keep: torch.Tensor) -> None:
    """Keep the per-row state of ``processors`` for the rows ``keep`` only (the repetition penalty's padding
    lengths are the one such state among :data:`_ROW_WISE`)."""
    for processor in processors:
        if isinstance(processor, lp.RepetitionPenaltyLogitsProcessor) and isinstance(
                processor.prompt_ignore_length, torch.Tensor):
            processor.prompt_ignore_length = processor.prompt_ignore_length.to(keep.device)[keep]


def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    stopping_criteria: Sequence[StoppingCriteria] = (),
    **generate_kwargs: Any,
) -> torch.Tensor | None:
    """``model.generate(input_ids=..., attention_mask=..., stopping_criteria=..., **generate_kwargs)`` for a
    left-padded batch of a decoder, finished rows dropped at each step; None where ``generate`` must run.

    ``generate_kwargs`` are :func:`lmtune.models.generation.generate_kwargs`' (``max_new_tokens``, ``do_sample``,
    ``eos_token_id``, ``pad_token_id``, ...); the model's own generation config fills the rest, as in
    ``generate``. ``stopping_criteria`` are called after every step with all ``B`` rows' tokens so far (rows
    that ended show padding) and ``None`` scores; a row they flag ends after that step's token. Run it under
    ``torch.inference_mode()`` with the model in eval mode, as ``generate`` is run.
    """
    batch, width = input_ids.shape
    forward_model = _forward_model(model)
    if batch < 2 or forward_model is None:
        return None
    config, model_kwargs = forward_model._prepare_generation_config(None, **generate_kwargs)
    if config.num_beams != 1 or config.max_new_tokens is None or config.cache_implementation is not None:
        return None
    device = input_ids.device
    forward_model._prepare_special_tokens(config, True, device=device)
    # The mask tells the repetition penalty each row's left padding (not counted as repeated tokens).
    processors = forward_model._get_logits_processor(
        generation_config=config, input_ids_seq_length=width, encoder_input_ids=input_ids, device=device,
        model_kwargs={**model_kwargs, "attention_mask": attention_mask},
    )
    if any(type(p) not in _ROW_WISE for p in processors):
        return None
    eos = config._eos_token_tensor
    pad = int(config._pad_token_tensor) if config._pad_token_tensor is not None else 0
    extra = {"logits_to_keep": 1} if forward_model._supports_logits_to_keep() else {}

    max_new = int(config.max_new_tokens)
    out = torch.full((batch, width + max_new), pad, dtype=input_ids.dtype, device=device)  # (B, T + max_new)
    out[:, :width] = input_ids
    rows = torch.arange(batch, device=device)  # the original row of each running row
    mask = attention_mask.to(torch.long)  # (b, T + steps)
    # Positions count real tokens only (left padding sits at 0), as generate derives them.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (b, T)
    cache = DynamicCache(config=forward_model.config)
    logits = forward_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True, **extra).logits
    steps = 0
    while True:
        scores = logits[:, -1].to(dtype=torch.float32, copy=True)  # (b, V)
        if processors:  # they read the running rows' tokens so far, (b, T + steps)
            scores = processors(out[rows, : width + steps], scores)
        if config.do_sample:
            chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)  # (b,)
        else:
            chosen = scores.argmax(dim=-1)
        out[rows, width + steps] = chosen
        steps += 1
        ended = torch.isin(chosen, eos) if eos is not None else torch.zeros_like(chosen, dtype=torch.bool)
        for criterion in stopping_criteria:
            ended |= criterion(out[:, : width + steps], None)[rows].to(device)
        if steps == max_new or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            _select_rows(processors, keep)
            rows, mask, positions, chosen = rows[keep], mask[keep], positions[keep], chosen[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        positions = positions[:, -1:] + 1  # (b, 1)
        logits = forward_model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True, **extra).logits
    return out[:, : width + steps]
