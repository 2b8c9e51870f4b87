"""Batched decoding that drops finished rows (lmtune.models.row_dropping) against transformers' generate."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    StoppingCriteria,
)

from lmtune.models import row_dropping

VOCAB = 64
# A quarter of the vocabulary ends an answer: rows end at different steps, so the batch shrinks many times.
EOS = list(range(4, VOCAB, 4))


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        initializer_range=0.3)).eval()


def _gpt2() -> GPT2LMHeadModel:
    # Learned absolute positions: wrong position ids after a drop would change every answer.
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      initializer_range=0.3, bos_token_id=1, eos_token_id=2)).eval()


def _batch(rows: int = 8, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of lengths width, width - 1, ...; the padding id 0 is an ordinary token too."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (rows, width), generator=gen)
    mask = torch.ones(rows, width, dtype=torch.long)
    for b in range(rows):
        ids[b, : b % width], mask[b, : b % width] = 0, 0
    return ids, mask


class _RowsSeen:
    """Records the number of rows of every forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows: list[int] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        self.rows.append(kwargs["input_ids"].shape[0])


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}],
                         ids=["plain", "penalties"])
def test_greedy_equals_generate_while_the_batch_shrinks(make, extra) -> None:
    model = make()
    ids, mask = _batch()
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=EOS, pad_token_id=0, use_cache=True, **extra)
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        seen = _RowsSeen(model)
        got = row_dropping.decode(model, ids, mask, **kwargs)
        seen.handle.remove()
    assert got is not None and torch.equal(got, expected)
    # Rows ended at several different steps (so the test is not vacuous) and left the batch as they did.
    ends = [int(torch.isin(row[ids.shape[1]:], torch.tensor(EOS)).nonzero()[0]) if
            torch.isin(row[ids.shape[1]:], torch.tensor(EOS)).any() else None for row in expected]
    assert len({e for e in ends if e is not None}) >= 3
    assert seen.rows[0] == 8 and seen.rows == sorted(seen.rows, reverse=True) and len(set(seen.rows)) >= 4
    for step, rows in enumerate(seen.rows[1:]):  # forward k+1 feeds token k: rows that have not ended by then
        assert rows == sum(1 for e in ends if e is None or e > step)


def test_padding_lengths_follow_the_rows_left() -> None:
    # The repetition penalty skips each row's left padding (its padding lengths are per row): after a drop
    # they must follow the rows that stay. Here the padding id is a likely token, so a mix-up changes answers.
    model = _gpt2()
    ids, mask = _batch()
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=EOS, pad_token_id=0, repetition_penalty=1.3)
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        seen = _RowsSeen(model)
        got = row_dropping.decode(model, ids, mask, **kwargs)
        seen.handle.remove()
    assert len(set(seen.rows)) >= 3 and torch.equal(got, expected)


class _StopAfter(StoppingCriteria):
    """Ends row ``row`` once it has ``n`` new tokens (as lmtune's stop-string criterion ends a row)."""

    def __init__(self, width: int, row: int, n: int) -> None:
        self.width, self.row, self.n = width, row, n
        self.calls: list[int] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.calls.append(input_ids.shape[0])
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[self.row] = input_ids.shape[1] - self.width >= self.n
        return done


def test_stopping_criteria_see_every_row_and_end_one() -> None:
    model = _llama()
    ids, mask = _batch()
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=[5], pad_token_id=0)
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=mask, stopping_criteria=[_StopAfter(9, 3, 4)],
                                  **kwargs)
        criterion = _StopAfter(9, 3, 4)
        got = row_dropping.decode(model, ids, mask, stopping_criteria=[criterion], **kwargs)
    assert torch.equal(got, expected)
    assert (got[3, 9 + 4:] == 0).all() and set(criterion.calls) == {8}


def test_sampling_is_reproducible_and_one_row_matches_generate() -> None:
    model = _llama()
    ids, mask = _batch()
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.9, top_k=0, eos_token_id=EOS,
                  pad_token_id=0)
    with torch.inference_mode():
        torch.manual_seed(3)
        first = row_dropping.decode(model, ids, mask, **kwargs)
        torch.manual_seed(3)
        assert torch.equal(row_dropping.decode(model, ids, mask, **kwargs), first)
        # Until the first row ends, the draws are generate's own (the same ops on the same rows).
        torch.manual_seed(3)
        reference = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    width = ids.shape[1]
    first_end = min(int(torch.isin(r[width:], torch.tensor(EOS)).nonzero()[0]) for r in reference
                    if torch.isin(r[width:], torch.tensor(EOS)).any())
    assert torch.equal(first[:, : width + first_end + 1], reference[:, : width + first_end + 1])


def test_lora_wrapped_model_runs_its_base_model() -> None:
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    ids, mask = _batch()
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    lora = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.eval()
    with torch.inference_mode():
        expected = lora.generate(input_ids=ids, attention_mask=mask, **kwargs)
        got = row_dropping.decode(lora, ids, mask, **kwargs)
        plain = _llama().generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert got is not None and torch.equal(got, expected)
    assert not torch.equal(got, plain)  # the adapter (random B) is in the answers
    prompt_tuned = get_peft_model(_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert row_dropping.decode(prompt_tuned, ids, mask, **kwargs) is None


def test_falls_back_where_generate_must_run() -> None:
    model = _llama()
    ids, mask = _batch()
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    with torch.inference_mode():
        assert row_dropping.decode(model, ids[:1], mask[:1], **kwargs) is None  # one row: nothing to drop
        assert row_dropping.decode(model, ids, mask, **{**kwargs, "num_beams": 2}) is None
        # A processor outside the row-wise list (here the renormalisation) sends the batch to generate.
        assert row_dropping.decode(model, ids, mask, **{**kwargs, "renormalize_logits": True}) is None
        bart = BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                                       encoder_attention_heads=2, decoder_attention_heads=2,
                                                       encoder_ffn_dim=16, decoder_ffn_dim=16)).eval()
        assert row_dropping.decode(bart, ids, mask, **kwargs) is None
        assert row_dropping.decode(model, ids, mask, **kwargs) is not None


def test_falls_back_when_weights_are_sharded_across_processes(monkeypatch) -> None:
    # Under ZeRO-3 or FSDP with several processes every forward is collective: generate's synced_gpus must run.
    model = _llama()
    ids, mask = _batch()
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    monkeypatch.setattr(row_dropping, "is_deepspeed_zero3_enabled", lambda: True)
    with torch.inference_mode():
        assert row_dropping.decode(model, ids, mask, **kwargs) is not None  # one process: nothing to wait for
        monkeypatch.setattr(row_dropping, "_get_torch_distributed_world_size", lambda: 2)
        assert row_dropping.decode(model, ids, mask, **kwargs) is None
        monkeypatch.setattr(row_dropping, "is_deepspeed_zero3_enabled", lambda: False)
        assert row_dropping.decode(model, ids, mask, **kwargs) is not None  # DDP: each process holds all weights
