"""Packing invariants: packed rows give exactly the loss of the same sequences trained one by one."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmtune.data.packing import IGNORE_INDEX, PackedCollator, pack_stream, pack_whole
from lmtune.tasks.decoder import DecoderCollator


def _sequences(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(10, vocab) for _ in range(rng.randint(3, 40))]
        labels = list(ids)
        cut = rng.randint(0, len(ids) - 1)  # a prompt part without loss, as in SFT
        labels[:cut] = [IGNORE_INDEX] * cut
        out.append((ids, labels))
    return out


def _loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits.double()  # (B, T, vocab)
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["whole", "stream"])
def test_packed_loss_equals_unpacked(tiny_chat_llama_dir, attn, mode):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float64, attn_implementation=attn)
    model.eval()
    seqs = _sequences(12, model.config.vocab_size)
    with torch.no_grad():
        ref_loss, ref_items = 0.0, 0
        for ids, labels in seqs:  # one sequence at a time: no padding, no packing
            b = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}
            loss, items = _loss_sum(model, b)
            ref_loss += loss
            ref_items += items
        if mode == "whole":
            rows, bins = pack_whole(seqs, 96)
            assert sorted(i for b in bins for i in b) == list(range(len(seqs)))
        else:
            # Row length larger than every sequence's share, so no sequence is cut in this check.
            rows = pack_stream(seqs, 10_000)
        assert len(rows) < len(seqs)
        batch = PackedCollator(pad_token_id=0)(rows)
        packed_loss, packed_items = _loss_sum(model, batch)
    assert packed_items == ref_items
    assert packed_loss == pytest.approx(ref_loss, rel=1e-9)


def test_packed_rows_block_attention(tiny_chat_llama_dir):
    """Changing one packed sequence leaves the logits of the others untouched."""
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float64)
    model.eval()
    seqs = _sequences(3, model.config.vocab_size, seed=3)
    rows, _ = pack_whole(seqs, 200)
    assert len(rows) == 1
    changed = [list(s) for s in seqs[0]], *seqs[1:]
    changed[0][0][0] = (changed[0][0][0] + 1) % model.config.vocab_size
    rows2, _ = pack_whole([tuple(changed[0]), *changed[1:]], 200)
    with torch.no_grad():
        a = model(**{k: v for k, v in PackedCollator(0)(rows).items() if k in ("input_ids", "position_ids")}).logits
        b = model(**{k: v for k, v in PackedCollator(0)(rows2).items() if k in ("input_ids", "position_ids")}).logits
    differs = (a - b).abs().amax(-1)[0] > 1e-9  # (T,) which positions changed
    n0 = len(seqs[0][0])
    # pack_whole puts the longest first; find where sequence 0 sits by its content
    start = next(i for i in range(len(rows[0]["input_ids"])) if rows[0]["input_ids"][i : i + n0] == seqs[0][0])
    assert differs[start : start + n0].all()
    assert not differs[:start].any() and not differs[start + n0 :].any()


def test_stream_packing_cuts_and_masks():
    seqs = [([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]), ([6, 7, 8], [6, 7, 8])]
    rows = pack_stream(seqs, 4)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3], [0, 0, 1, 2]]
    # every piece's first token carries no loss: nothing predicts across a boundary
    assert [r["labels"] for r in rows] == [[-100, 2, 3, 4], [-100, -100, 7, 8]]
    assert [r["segments"] for r in rows] == [1, 2]


def test_collator_pads_rows_as_their_own_segment():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
            {"input_ids": [8], "labels": [-100], "position_ids": [0]}]
    batch = DecoderCollator(pad_token_id=2)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["num_real_tokens"].tolist() == [3, 1]
    assert "attention_mask" not in batch
    padded = DecoderCollator(pad_token_id=2)([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7], "labels": [7]}])
    assert padded["labels"].tolist() == [[5, 6], [7, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_pack_whole_refuses_too_long():
    with pytest.raises(ValueError, match="more than the row length"):
        pack_whole([([1] * 10, [1] * 10)], 8)
