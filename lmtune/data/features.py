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
