"""Splitting one data set into train / validation / test: the one place every task splits its data.

A config names a training source and, optionally, a validation and a test source. The evaluation
splits without a source of their own are held out of the training data, seeded by ``data.split_seed``:

- :func:`hold_out` (on :func:`holdout_indices`): a seeded random hold-out of ``data.validation_size`` /
  ``data.test_size``, items kept in their order (language-model documents, conversations, ...);
- :func:`stratified_split`: the same sizes, keeping each label's share of the data in every split
  (where the labels allow it);
- :func:`split_by_context`: whole groups (every question of one context) kept on the same side.

:func:`first_occurrences` drops repeats, so that deduplication and splitting agree on what an item is.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from sklearn.model_selection import train_test_split

from lmtune.config import DataConfig
from lmtune.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

_SPLIT_HINT = "give more data or explicit validation/test files"


def given_splits(data: DataConfig) -> dict[str, str]:
    """The evaluation splits that come from their own files: ``{split: source}``."""
    return {s: src for s, src in (("validation", data.validation), ("test", data.test)) if src}


def _held_out_sizes(data: DataConfig) -> dict[str, float]:
    """``{split: data.<split>_size}`` of the evaluation splits held out of ``data.train`` (validation first)."""
    given = given_splits(data)
    return {s: size for s, size in (("validation", data.validation_size), ("test", data.test_size))
            if s not in given}


def holdout_indices(n: int, fractions: dict[str, float], seed: int) -> dict[str, list[int]] | None:
    """A seeded random hold-out of ``n`` items: sorted indices per split in ``fractions`` (at least one
    each) and under ``"train"`` the rest; None when ``n`` is too small to leave any for training."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    counts = {s: max(1, round(f * n)) for s, f in fractions.items()}
    if sum(counts.values()) >= n:
        return None
    out: dict[str, list[int]] = {}
    start = 0
    for split, count in counts.items():
        out[split] = sorted(order[start : start + count])
        start += count
    out["train"] = sorted(order[start:])
    return out


def hold_out(items: list[T], data: DataConfig, *, what: str, kind: str = "data",
             hint: str = "give data.validation and data.test files, or more data"
             ) -> tuple[list[T], dict[str, list[T]], dict[str, str]]:
    """Split the evaluation sets that have no file of their own off the training ``items``: a seeded random
    hold-out of ``data.validation_size`` / ``data.test_size`` (``data.split_seed``).

    Returns the training items left, the held-out items per split and each held-out split's source
    description. Too few items to leave any for training is a DataError ("N {what} are too few to hold
    out validation and test {kind}").
    """
    sizes = _held_out_sizes(data)
    if not sizes:
        return items, {}, {}
    held = holdout_indices(len(items), sizes, data.split_seed)
    if held is None:
        raise DataError(f"{len(items)} {what} are too few to hold out {' and '.join(sizes)} {kind}",
                        file=data.train, hint=hint)
    splits = {s: [items[i] for i in held[s]] for s in sizes}
    sources = {s: f"{data.train} (split {sizes[s]:g})" for s in sizes}
    return [items[i] for i in held["train"]], splits, sources


def stratified_split(items: list[T], data: DataConfig, *, label: Callable[[T], Hashable | None] | None = None,
                     what: str = "rows") -> dict[str, list[T]]:
    """``items`` split into ``train`` and each evaluation split without a file of its own (validation
    first), of ``data.validation_size`` / ``data.test_size`` of the data, seeded by ``data.split_seed``.

    With ``label`` (an item's label): stratified, each split taken from what the splits before it left
    (scikit-learn's ``train_test_split``), so every label keeps its share in every split. A split is not
    stratified when an item's label is None (items without one label, e.g. multi-label data) or a label
    has fewer than 2 items left (logged). Without ``label``: a seeded random hold-out
    (:func:`holdout_indices`), items kept in their order. Too few items for a split is a DataError
    ("cannot split N {what} into a {split} set").
    """
    sizes = _held_out_sizes(data)
    out: dict[str, list[T]] = {}
    if label is None:
        start = 0
        for split, size in sizes.items():
            start += max(1, round(size * len(items)))
            if len(items) - start < 1:
                raise DataError(f"cannot split {len(items)} {what} into a {split} set", file=data.train,
                                hint=_SPLIT_HINT)
        held = holdout_indices(len(items), sizes, data.split_seed)
        assert held is not None  # the counts were checked above
        return {s: [items[i] for i in indices] for s, indices in held.items()}
    rest = items
    remaining = 1.0
    for split, size in sizes.items():
        strata: list[Any] | None = [label(item) for item in rest]
        if strata is not None and any(s is None for s in strata):
            strata = None
        elif strata is not None and min(Counter(strata).values()) < 2:
            log.warning("a label has fewer than 2 examples: %s split is not stratified", split)
            strata = None
        try:
            rest, held_items = train_test_split(rest, test_size=size / remaining, random_state=data.split_seed,
                                                stratify=strata)
        except ValueError as exc:
            raise DataError(f"cannot split {len(rest)} {what} into a {split} set: {exc}", file=data.train,
                            hint=_SPLIT_HINT) from None
        out[split] = held_items
        remaining -= size
    out["train"] = rest
    return out


def split_by_context(records: list[dict[str, Any]], fractions: dict[str, float],
                     seed: int) -> dict[str, list[dict[str, Any]]]:
    """Seeded split of records into ``train`` and the splits of ``fractions``, keeping every question of
    one context on the same side (otherwise the model is tested on paragraphs it trained on)."""
    contexts = list(dict.fromkeys(r["context"] for r in records))
    random.Random(seed).shuffle(contexts)
    side: dict[str, str] = {}
    start = 0
    for split, fraction in fractions.items():
        take = max(1, round(fraction * len(contexts)))
        for c in contexts[start:start + take]:
            side[c] = split
        start += take
    out: dict[str, list[dict[str, Any]]] = {"train": [], **{s: [] for s in fractions}}
    for r in records:
        out[side.get(r["context"], "train")].append(r)
    return out


def first_occurrences(items: list[T], key: Callable[[T], Hashable]) -> list[T]:
    """``items`` without repeats (same ``key``), first occurrence kept, order kept."""
    seen: set[Hashable] = set()
    out = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out
