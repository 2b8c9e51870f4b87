"""Task features on disk and in batches: the tokenisation cache, samplers and collators.

A task turns records into *features*: variable-length token id lists plus task
fields (labels, indices). Features are stored as an Arrow table through
``datasets`` (memory-mapped, so large data does not sit in RAM) under a cache
key that hashes everything that determines them: the records, the tokenizer's
full definition and the task's settings. A second run with the same inputs
reads them back instead of tokenising again.

Batches are built padding-free where possible: examples of similar length are
grouped (``LengthGroupedBatchSampler``) and each batch is padded only to its own
longest example (``PaddingCollator``). On this kind of CPU that alone is worth
several times the throughput of fixed-length padding (see PERFORMANCE.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import Sampler

from lmtune.paths import cache_dir

log = logging.getLogger(__name__)

# The label of a token (or position) that carries no loss: torch's cross_entropy ignore_index default.
# The one definition; packing, chat rendering, tagging and the tasks import it.
IGNORE_INDEX = -100

# Bump when the on-disk feature layout changes so old caches are not reused.
FEATURE_FORMAT_VERSION = 1

# Characters kept per token of a length limit when a text is clipped before tokenising (clip_text). Real text
# averages 3-5 characters a token; the longest tokens of common vocabularies are runs of spaces or of '#'/'='
# (SmolLM2's longest: 81 characters), and WordPiece reads a word of over 100 characters as one [UNK]. At 128 the
# first max_length tokens of any such text lie inside the clipped part, so the tokenizer's own truncation still
# decides what is kept; only the cost stops growing with the text (a 1 MB text was tokenised whole, 1-2 s, to
# keep its first 128 tokens).
CHARS_PER_TOKEN = 128


def char_limit(max_tokens: int) -> int:
    """Characters of a text that hold its first ``max_tokens`` tokens: where :func:`clip_text` cuts."""
    return max_tokens * CHARS_PER_TOKEN


def clip_text(text: str, max_tokens: int, *, side: str = "right") -> str:
    """``text`` cut to :func:`char_limit` characters before it is tokenised and truncated to ``max_tokens`` tokens.

    ``side`` is the tokenizer's ``truncation_side``: ``"right"`` keeps the start of the text, ``"left"`` its end.
    The truncated token ids are the same as from the whole text; a clipped text still has more than
    ``max_tokens`` tokens, so it is still counted as truncated.
    """
    limit = char_limit(max_tokens)
    if len(text) <= limit:
        return text
    return text[-limit:] if side == "left" else text[:limit]


def clip_words(words: Sequence[str], max_tokens: int) -> list[str]:
    """The first of ``words`` that fit :func:`char_limit` characters: a word list clipped before it is tokenised
    (``is_split_into_words``) and truncated to ``max_tokens`` tokens, as :func:`clip_text` clips a text."""
    limit, used = char_limit(max_tokens), 0
    for k, word in enumerate(words):
        used += len(word)
        if used > limit:
            return list(words[:k]) if k else [clip_text(word, max_tokens)]
    return list(words)


def clip_pairs(
    tokenizer: Any, texts: Sequence[str], pairs: Sequence[str], max_length: int
) -> tuple[list[str], list[str]]:
    """Texts and second texts made ready for ``tokenizer(texts, pairs, truncation=True, max_length=max_length)``:
    the same ids as from the whole texts, for bounded work.

    A fast tokenizer truncating a pair keeps every overflowing window of both texts and pairs them all up, so its
    work and memory grow with the product of the two lengths (two 16 kB texts: 3 s and 1.9 GB; two 40 kB texts
    ran out of 6 GB). Each text is clipped by characters (:func:`clip_text`); where both are longer than
    ``max_length`` characters, each is then cut at a word boundary after its first ``max_length`` tokens, or
    later (for right truncation, lmtune's; a tokenizer that truncates on the left gets the character clip
    only). That keeps the result: longest-first truncation of two texts that both run past
    the limit keeps the same number of tokens of each whatever their lengths, except that the longer one gives
    the odd token, so the cut keeps the longer one longer. (When both run past the character bound, "longer" is
    judged on the clipped texts.)
    """
    side = getattr(tokenizer, "truncation_side", "right")
    firsts = [clip_text(t, max_length, side=side) for t in texts]
    seconds = [clip_text(t, max_length, side=side) for t in pairs]
    long = [i for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)) if min(len(a), len(b)) > max_length]
    if not long or side != "right" or not getattr(tokenizer, "is_fast", False):
        return firsts, seconds
    encoded = [
        tokenizer([column[i] for i in long], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for column in (firsts, seconds)
    ]
    for row, i in enumerate(long):
        # Token indices where a word starts: a text cut there keeps the tokens before it exactly.
        starts = [[k for k, w in enumerate(words) if k and w != words[k - 1]]
                  for words in (enc.word_ids(row) for enc in encoded)]
        counts = [len(enc["input_ids"][row]) for enc in encoded]
        cuts = [_first_at_or_after(s, max_length + 1, n) for s, n in zip(starts, counts, strict=True)]
        # Keep which text is the longer: it decides which one gives the odd token.
        if counts[0] > counts[1] and cuts[0] <= cuts[1]:
            cuts[0] = _first_at_or_after(starts[0], cuts[1] + 1, counts[0])
        elif counts[1] > counts[0] and cuts[1] <= cuts[0]:
            cuts[1] = _first_at_or_after(starts[1], cuts[0] + 1, counts[1])
        elif counts[0] == counts[1] and cuts[0] != cuts[1]:
            cuts = counts
        for column, enc, cut, n in zip((firsts, seconds), encoded, cuts, counts, strict=True):
            if cut < n:
                column[i] = column[i][: enc["offset_mapping"][row][cut][0]]
    return firsts, seconds


def _first_at_or_after(starts: list[int], index: int, count: int) -> int:
    """The first word start at or after token ``index``, else ``count`` (the text is not cut)."""
    return next((k for k in starts if k >= index), count)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how the tokenizer splits text."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:  # slow tokenizers: the vocabulary and class name stand in for the full definition
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(json.dumps(
        {
            "class": type(tokenizer).__name__,
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "padding_side": tokenizer.padding_side,
            "truncation_side": tokenizer.truncation_side,
            "model_max_length": int(min(tokenizer.model_max_length, 10**9)),
        },
        sort_keys=True,
    ).encode())
    return h.hexdigest()


def features_cache_key(task: str, records_digest: str, tokenizer: Any, settings: dict[str, Any]) -> str:
    """The cache key of one split's features."""
    h = hashlib.sha256()
    h.update(f"lmtune-features-v{FEATURE_FORMAT_VERSION}:{task}\n".encode())
    h.update(records_digest.encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def digest_records(rows: Sequence[Any]) -> str:
    """A content hash of already-cleaned records (order matters: it decides feature order)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def cached_features(
    key: str, build: Callable[[], dict[str, list[Any]]], *, use_cache: bool = True
) -> tuple[datasets.Dataset, bool]:
    """Load features stored under ``key`` or build them with ``build()`` and store them.

    Returns the features and whether they came from the cache. The store is
    atomic: features are written to a temporary folder and renamed into place, so
    an interrupted run never leaves a cache entry that looks complete.
    """
    if not use_cache:
        return datasets.Dataset.from_dict(build()), False
    root = cache_dir("features")
    final = root / key
    if (final / "dataset_info.json").is_file():
        try:
            return datasets.load_from_disk(str(final)), True
        except Exception as exc:  # a damaged cache entry is rebuilt, not fatal
            log.warning("tokenisation cache %s unreadable (%s); rebuilding", final, exc)
            shutil.rmtree(final, ignore_errors=True)
    data = datasets.Dataset.from_dict(build())
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    data.save_to_disk(str(tmp))
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race; theirs is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(final)), False


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields batches of indices, shuffled per epoch, grouping similar lengths together.

    Like the Hugging Face Trainer's ``group_by_length``: the shuffled indices are
    cut into mega-batches of ``batch_size * mega_batch_mult``, each sorted by
    length, then cut into batches. The batch holding the longest example goes
    first so an out-of-memory shows up at step 1, not hours in. Everything is
    derived from ``(seed, epoch)``, never from global RNG state, so a resumed run
    sees exactly the batches the uninterrupted run saw.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        mega_batch_mult: int = 50,
        drop_last: bool = False,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.mega_batch_mult = mega_batch_mult
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order ``__iter__`` yields."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """All batches of the current epoch, in order."""
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.group_by_length:
            mega = self.batch_size * self.mega_batch_mult
            order = [
                i
                for start in range(0, n, mega)
                for i in sorted(order[start : start + mega], key=lambda j: -self.lengths[j])
            ]
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and self.group_by_length and len(batches) > 1:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            first = batches.pop(longest)
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [first] + [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class SortedBatchSampler(Sampler[list[int]]):
    """Evaluation batches sorted by length (least padding); order is restored by example index."""

    def __init__(self, lengths: Sequence[int], batch_size: int) -> None:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        self._batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches

    def __len__(self) -> int:
        return len(self._batches)


class PaddingCollator:
    """Pads token-id lists to the longest in the batch and stacks the other fields.

    ``pad_fields`` maps a list-valued feature to its padding value (``input_ids``
    -> the tokenizer's pad id, ``labels`` of token tasks -> -100). An
    ``attention_mask`` is built from the unpadded lengths. Scalar and
    fixed-size fields become tensors as they are.
    """

    def __init__(
        self,
        pad_fields: dict[str, int],
        *,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        float_fields: Sequence[str] = (),
    ) -> None:
        self.pad_fields = pad_fields
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.float_fields = set(float_fields)

    def __call__(self, features: list[dict[str, Any]] | dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        if isinstance(features, dict):  # a batched fetch (datasets' __getitems__ may give columns)
            keys = list(features)
            features = [dict(zip(keys, vals, strict=True)) for vals in zip(*features.values(), strict=True)]
        first = features[0]
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = -(-width // m) * m
        batch: dict[str, torch.Tensor] = {}
        for key in first:
            values = [f[key] for f in features]
            if key in self.pad_fields:
                batch[key] = self._pad(values, width, self.pad_fields[key])
            elif key in self.float_fields:
                batch[key] = torch.tensor(values, dtype=torch.float32)
            else:
                batch[key] = torch.tensor(values)
        mask = torch.zeros(len(features), width, dtype=torch.long)
        for row, n in enumerate(lengths):
            if self.padding_side == "right":
                mask[row, :n] = 1
            else:
                mask[row, width - n :] = 1
        batch["attention_mask"] = mask
        return batch

    def _pad(self, values: list[list[int]], width: int, pad: int) -> torch.Tensor:
        out = torch.full((len(values), width), pad, dtype=torch.long)  # (B, T)
        for row, seq in enumerate(values):
            if not len(seq):
                continue
            t = torch.as_tensor(seq, dtype=torch.long)
            if self.padding_side == "right":
                out[row, : len(seq)] = t
            else:
                out[row, width - len(seq) :] = t
        return out


class FeatureDataset:
    """A features Dataset whose batches omit `length`, with the lengths kept at hand.

    Supports ``__getitems__`` so a DataLoader fetches a whole batch from Arrow in one call.
    """

    def __init__(self, ds: Any, lengths: list[int]) -> None:
        self.ds = ds
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.ds[i]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        cols = self.ds[indices]
        keys = list(cols)
        return [dict(zip(keys, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ds, name)


def save_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
