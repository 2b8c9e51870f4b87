"""Marked pairs as model inputs, shared by training and prediction: typed marker tokens in the tokenizer,
and a token window that always keeps both entities.

A text longer than ``max_length`` tokens is not cut at its end: the window is placed around the two
entities (their markers included), with as much context on each side as fits. A pair whose entities lie
further apart than ``max_length`` allows has no such window: it is skipped and counted, never trained on
with a marker missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken

from lmtune.data.features import char_limit
from lmtune.tasks.relation_extraction.records import Span, mark, markers


def marker_tokens(entity_types: Sequence[str]) -> list[str]:
    """Every marker token of ``entity_types``, in a fixed order."""
    return [m for kind in entity_types for m in markers(kind)]


def add_marker_tokens(tokenizer: Any, entity_types: Sequence[str]) -> list[str]:
    """Add the markers the tokenizer lacks as special tokens (never split, never lower-cased); returns them."""
    vocab = tokenizer.get_vocab()
    new = [m for m in marker_tokens(entity_types) if m not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in new], special_tokens=True)
    return new


def marker_ids(tokenizer: Any, entity_types: Sequence[str]) -> tuple[list[int], list[int], list[int]]:
    """Ids of the head-start, tail-start and every marker token."""
    heads = [tokenizer.convert_tokens_to_ids(markers(k)[0]) for k in entity_types]
    tails = [tokenizer.convert_tokens_to_ids(markers(k)[2]) for k in entity_types]
    every = [tokenizer.convert_tokens_to_ids(m) for m in marker_tokens(entity_types)]
    return heads, tails, every


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one text (BERT: ``[CLS]`` and ``[SEP]``)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for at in range(len(framed) - len(bare) + 1):
        if framed[at:at + len(bare)] == bare:
            return framed[:at], framed[at + len(bare):]
    return [], []


def clip_around(text: str, head: Span, tail: Span, max_length: int) -> tuple[str, Span, Span]:
    """The text cut by characters to the entities plus ``char_limit(max_length)`` on each side, offsets
    shifted: a megabyte text costs what its window costs (the token window below decides what is kept)."""
    limit = char_limit(max_length)
    lo = max(0, min(head[0], tail[0]) - limit)
    hi = min(len(text), max(head[1], tail[1]) + limit)
    if lo == 0 and hi == len(text):
        return text, head, tail
    return text[lo:hi], (head[0] - lo, head[1] - lo, head[2]), (tail[0] - lo, tail[1] - lo, tail[2])


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, Span, Span]], max_length: int,
                 entity_types: Sequence[str]) -> tuple[list[list[int] | None], int]:
    """Input ids per pair (None: the entities do not fit in ``max_length`` together) and how many pairs were
    windowed (longer than ``max_length``, context cut around the entities)."""
    prefix, suffix = special_frame(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    every = set(marker_ids(tokenizer, entity_types)[2])
    texts = [mark(*clip_around(text, head, tail, max_length)) for text, head, tail in pairs]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    out: list[list[int] | None] = []
    windowed = 0
    for ids in encoded:
        at = [i for i, t in enumerate(ids) if t in every]
        if len(at) < 4 or budget < 1:  # a marker the tokenizer could not keep (never with added tokens)
            out.append(None)
            continue
        lo, hi = at[0], at[-1]
        if hi - lo + 1 > budget:
            out.append(None)
            continue
        if len(ids) > budget:
            windowed += 1
            spare = budget - (hi - lo + 1)
            start = max(0, min(lo - spare // 2, len(ids) - budget))
            ids = ids[start:start + budget]
        out.append(prefix + ids + suffix)
    return out, windowed
