"""Which tokens a masked language model learns to predict: BERT's masking, decided row by row from a seed.

BERT's recipe (Devlin et al. 2019; Google's ``create_pretraining_data.py``): about ``probability`` of a row's
tokens are chosen, whole words at a time (every sub-token of a chosen word; words from the fast tokenizer's
``word_ids``, so each CJK character is a word), and each chosen token is replaced by the mask token (80%), by a
random token (10%) or left as it is (10%). The loss and the accuracy are taken at the chosen positions only.
Special tokens and the unknown token are never chosen (predicting ``[UNK]`` teaches nothing).

Why not transformers' collator. In transformers 5.23 ``DataCollatorForWholeWordMask`` is gone and
``DataCollatorForLanguageModeling`` draws its numbers from the global RNG or, given a ``seed``, from one generator
it creates at its first batch and advances batch after batch. Neither survives a resume exactly: lmtune's loop
fetches batches ahead of the step that uses them (the loop and Accelerate's loader each read one ahead), so the
RNG state a checkpoint saves is already past masks drawn for batches that step never used, and the collator's
own generator is not in the checkpoint at all. Its ``whole_word_mask=True`` also turns the 80/10/10 rule off
(every chosen token becomes ``[MASK]``) and finds words by gaps between character offsets, which makes a run
of Chinese characters, or ``dog.``, one word.

So here a row's masking is a pure function of ``(stream, seed, epoch, row index)``: a numpy ``Generator`` seeded
with those four numbers (``SeedSequence``) per row. It does not depend on the batch the row lands in, the
process or DataLoader worker that fetches it, or anything drawn before: a resumed run masks every row as the
uninterrupted run did, and so does a run with another batch size, gradient accumulation or process count.
Training rows change masks with the epoch (:meth:`MaskedRows.set_epoch`); held-out rows are masked once and
for all (seeded by ``data.split_seed``), so the starting model and the trained one are scored on the same
positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmtune.data.features import IGNORE_INDEX

# BERT's split of the chosen tokens: replaced by the mask token, by a random token, or kept.
MASK_SHARE = 0.8
RANDOM_SHARE = 0.1
# A token that no word holds (special tokens, [UNK]): never chosen.
NO_WORD = -1
# Seed streams: training rows, and each held-out split (masked once, for every evaluation).
TRAIN_STREAM = 0
EVAL_STREAMS = {"validation": 1, "test": 2}


@dataclass(frozen=True)
class Masker:
    """BERT's masking of one row, given the row's tokens, their words and a random generator."""

    probability: float
    mask_id: int
    vocab_size: int
    # Ids never drawn as the random replacement (special tokens: [CLS], [PAD], [MASK] ...).
    special_ids: frozenset[int]
    whole_words: bool = True

    def choose(self, words: Sequence[int], rng: np.random.Generator) -> list[int]:
        """Positions to predict: ``round(probability x maskable tokens)`` of them (at least one), whole words in a
        random order, a word skipped when it would overshoot (BERT's rule); a row whose every word overshoots
        (one long word) predicts one whole word. ``words[t]`` is token t's word, :data:`NO_WORD` for none."""
        groups: dict[int, list[int]] = {}
        for pos, word in enumerate(words):
            if word != NO_WORD:
                groups.setdefault(word if self.whole_words else pos, []).append(pos)
        if not groups:
            return []
        candidates = list(groups.values())
        target = max(1, round(self.probability * sum(len(g) for g in candidates)))
        order = rng.permutation(len(candidates))
        chosen: list[int] = []
        for k in order:
            if len(chosen) >= target:
                break
            if len(chosen) + len(candidates[k]) <= target:
                chosen += candidates[k]
        return sorted(chosen or candidates[order[0]])

    def mask(self, input_ids: Sequence[int], words: Sequence[int], rng: np.random.Generator) -> dict[str, list[int]]:
        """``{"input_ids", "labels"}``: the row with its chosen tokens replaced (80/10/10), and the original
        token at each chosen position (-100 elsewhere)."""
        ids = [int(t) for t in input_ids]
        labels = [IGNORE_INDEX] * len(ids)
        chosen = self.choose(words, rng)
        for pos, draw in zip(chosen, rng.random(len(chosen)), strict=True):
            labels[pos] = ids[pos]
            if draw < MASK_SHARE:
                ids[pos] = self.mask_id
            elif draw < MASK_SHARE + RANDOM_SHARE:
                ids[pos] = self._random_token(rng)
        return {"input_ids": ids, "labels": labels}

    def _random_token(self, rng: np.random.Generator) -> int:
        while True:  # special ids are a handful of a vocabulary of thousands: a redraw is rare
            token = int(rng.integers(self.vocab_size))
            if token not in self.special_ids:
                return token


def row_generator(stream: int, seed: int, epoch: int, row: int) -> np.random.Generator:
    """The generator that masks one row: a function of these four numbers only."""
    return np.random.default_rng([stream, seed % 2**64, epoch, row])


class MaskedRows(torch.utils.data.Dataset):
    """One split's token rows (``input_ids`` and ``word_ids`` columns of an Arrow dataset), masked as they are
    fetched: each item is ``{"input_ids", "labels"}`` (:meth:`Masker.mask` of row i with
    :func:`row_generator` ``(stream, seed, epoch, i)``). ``lengths`` are the rows' token counts (length grouping,
    sorted evaluation batches). ``per_epoch``: new masks each epoch (training); else one masking for good
    (held-out rows)."""

    def __init__(self, rows: Any, lengths: list[int], masker: Masker, *, stream: int, seed: int,
                 per_epoch: bool = True) -> None:
        self.rows = rows
        self.lengths = lengths
        self.masker = masker
        self.stream = stream
        self.seed = seed
        self.per_epoch = per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Mask with epoch ``epoch``'s draws; ignored by held-out rows, whose masking never changes (Accelerate
        calls this on an evaluation loader's dataset with its own count of passes over it)."""
        if self.per_epoch:
            self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, list[int]]]:
        cols = self.rows[list(indices)]
        return [self.masker.mask(ids, words, row_generator(self.stream, self.seed, self.epoch, int(i)))
                for i, ids, words in zip(indices, cols["input_ids"], cols["word_ids"], strict=True)]
