"""Padding-free packing for decoder training: several sequences per row, none attending to another.

A packed row concatenates sequences and restarts ``position_ids`` at 0 where each one begins.
transformers (5.x, sdpa and eager attention) turns position ids that restart into a
block-diagonal causal mask when no ``attention_mask`` is given
(``masking_utils.find_packed_sequence_indices``), and flash-attention kernels read the same
boundaries from the position ids, so no token ever sees another sequence. Each sequence's first
token gets label -100: with the usual shift (logits at t predict the label at t+1) that stops
the previous sequence's last token from being trained to predict the next sequence's first
token -- exactly what an unpacked sequence does (its first token has no predecessor). With both,
packed training gives the same loss as unpacked training on the same sequences (tested).

Two ways to fill rows (PERFORMANCE.md: fixed-length rows are 3x padded batches on this CPU):

* ``pack_stream`` (language-model pre-training): documents one after another, cut at row
  boundaries; a document that does not fit continues at the start of the next row.
* ``pack_whole`` (instruction tuning): whole examples, never cut, placed first-fit-decreasing
  into rows of at most ``row_length`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from lmtune.data.features import IGNORE_INDEX

Row = dict[str, Any]  # input_ids, labels, position_ids: list[int]; segments: int


def segment(ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """One sequence as (input_ids, labels, position_ids) with its first label masked."""
    lab = list(labels)
    if lab:
        lab[0] = IGNORE_INDEX
    return list(ids), lab, list(range(len(ids)))


def pack_stream(
    sequences: Iterable[tuple[Sequence[int], Sequence[int]]], row_length: int, *, keep_last: bool = True
) -> list[Row]:
    """Concatenate ``(input_ids, labels)`` sequences and cut them into rows of ``row_length``.

    A sequence cut by a row boundary continues in the next row as a new segment (positions from
    0). ``keep_last`` keeps a final, shorter row. Returns rows with ``input_ids``, ``labels``,
    ``position_ids`` and ``segments`` (how many sequence pieces the row holds).
    """
    return list(iter_pack_stream(sequences, row_length, keep_last=keep_last))


def iter_pack_stream(
    sequences: Iterable[tuple[Sequence[int], Sequence[int]]], row_length: int, *, keep_last: bool = True
) -> Iterator[Row]:
    """:func:`pack_stream` as a generator: each row is yielded as soon as it is full, so a stream of
    any length is packed in the memory of one row (``data.streaming``)."""
    cur_ids: list[int] = []
    cur_lab: list[int] = []
    cur_pos: list[int] = []
    segments = 0
    for ids, labels in sequences:
        start = 0
        while start < len(ids):
            room = row_length - len(cur_ids)
            piece_ids, piece_lab, piece_pos = segment(ids[start : start + room], labels[start : start + room])
            cur_ids += piece_ids
            cur_lab += piece_lab
            cur_pos += piece_pos
            segments += 1
            start += room
            if len(cur_ids) == row_length:
                yield {"input_ids": cur_ids, "labels": cur_lab, "position_ids": cur_pos, "segments": segments}
                cur_ids, cur_lab, cur_pos, segments = [], [], [], 0
    if cur_ids and keep_last:
        yield {"input_ids": cur_ids, "labels": cur_lab, "position_ids": cur_pos, "segments": segments}


def pack_whole(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], row_length: int
) -> tuple[list[Row], list[list[int]]]:
    """Place whole sequences into rows of at most ``row_length`` tokens (first-fit decreasing).

    Every sequence must fit a row (callers skip or truncate longer ones first). Returns the rows
    and, for each row, the indices of the sequences it holds (in row order).
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(sequences[i][0])
        if n > row_length:
            raise ValueError(f"sequence {i} has {n} tokens, more than the row length {row_length}")
        for b, free in enumerate(room):  # first fit; rows are few enough for a linear scan
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(row_length - n)
    rows = []
    for members in bins:
        ids: list[int] = []
        lab: list[int] = []
        pos: list[int] = []
        for i in members:
            seg_ids, seg_lab, seg_pos = segment(*sequences[i])
            ids += seg_ids
            lab += seg_lab
            pos += seg_pos
        rows.append({"input_ids": ids, "labels": lab, "position_ids": pos, "segments": len(members)})
    return rows, bins


class PackedCollator:
    """Stacks packed rows: ``input_ids``, ``labels``, ``position_ids`` (B, T) and no attention mask.

    Rows shorter than the batch's longest are filled with one extra padding segment (pad ids,
    positions from 0, labels -100), which no real token can attend to.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        pos = torch.zeros((n, width), dtype=torch.long)  # (B, T)
        real = torch.zeros(n, dtype=torch.long)  # (B,) real tokens per row
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            ids[row, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
            pos[row, :k] = torch.as_tensor(f["position_ids"], dtype=torch.long)
            pos[row, k:] = torch.arange(width - k)
            real[row] = k
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "num_real_tokens": real}
