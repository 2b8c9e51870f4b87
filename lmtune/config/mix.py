"""Several training sources mixed by weight (``data.train`` given as a list).

``data.train`` may name one source or a list of them::

    train:
      - {path: reviews.jsonl, weight: 3}
      - {path: bundled:rotten_tomatoes, weight: 1, rename: {review: text}}
      - extra.csv                      # a plain string: weight 1

The list is validated here (every entry a path with a weight > 0, no empty list) and kept as
``data.train_mix``; ``data.train`` itself becomes the mix's display name (:func:`mix_name`), which is
what reports, errors and every reader see. ``lmtune.data.mixing`` reads and mixes the sources.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["MIX_COLUMN", "MixSource", "mix_name", "normalise_train", "settle_train"]

# The column every mixed row carries: which source it came from (a slice for per-source metrics).
MIX_COLUMN = "mix_source"


class MixSource(BaseModel):
    """One source of a mixed ``data.train``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    path: str = Field(..., min_length=1, description="A file, a saved-dataset folder or `bundled:NAME` (with "
                      "data.streaming: a file, glob or folder of shards).")
    weight: float = Field(1.0, description="Share of the training epoch, relative to the other sources' "
                          "weights (`ratio` is the same key).")
    format: str | None = Field(None, description="This source's file format (default: data.format).")
    rename: dict[str, str] = Field(default_factory=dict, description="This source's column names mapped to the "
                                   "names the config reads, e.g. {review: text, sentiment: label}.")

    @model_validator(mode="before")
    @classmethod
    def _ratio_is_weight(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"path": value}
        if isinstance(value, dict) and "ratio" in value:
            if "weight" in value:
                raise ValueError(f"source {value.get('path')!r}: give weight or ratio, not both")
            value = {("weight" if k == "ratio" else k): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _positive_weight(self) -> MixSource:
        if not self.weight > 0 or self.weight == float("inf"):
            raise ValueError(f"source '{self.path}': weight must be a finite number > 0, not {self.weight:g}")
        return self

    @property
    def name(self) -> str:
        """How reports and the mix column name this source: its path."""
        return self.path


def mix_name(sources: list[MixSource]) -> str:
    """The display name of a mix, used as ``data.train``: ``mix(a.jsonl: 3, b.csv: 1)``."""
    return "mix(" + ", ".join(f"{s.path}: {s.weight:g}" for s in sources) + ")"


def normalise_train(raw: Any) -> Any:
    """A raw ``data`` mapping with a list ``train`` moved to ``train_mix`` (``train`` is named after it by
    :func:`settle_train` once the sources are validated)."""
    if not isinstance(raw, dict):
        return raw
    train = raw.get("train")
    if isinstance(train, (list, tuple)):
        if not train:
            raise ValueError("data.train is an empty list: name at least one source")
        paths = [_path_of(t) for t in train]
        repeated = sorted({str(p) for p in paths if paths.count(p) > 1})
        if repeated:
            raise ValueError(f"data.train names {', '.join(repeated)} more than once: give each source once, "
                             "with the sum of its weights")
        return {**raw, "train": "", "train_mix": list(train)}
    return raw


def settle_train(train: str, mix: list[MixSource] | None) -> tuple[str, list[MixSource] | None]:
    """``(data.train, data.train_mix)`` once validated: a mix's ``train`` is its :func:`mix_name`. A saved
    config holds both; a ``train`` that is neither empty nor the mix's name (an override such as
    ``--data.train other.csv``) replaces the mix."""
    if mix is None:
        return train, None
    if train and train != mix_name(mix):
        return train, None
    return mix_name(mix), mix


def _path_of(entry: Any) -> Any:
    if isinstance(entry, dict):
        return entry.get("path")
    return entry if isinstance(entry, str) else id(entry)


def check_oversampling(data: Any) -> None:
    """What ``data.mix_stopping: all_exhausted`` needs (a DataConfig); ValueError naming the keys.

    Oversampling repeats examples of the sources short for their weight: deduplication would drop the copies
    again, and a held-out split of the mix could hold a copy of a training example.
    """
    if data.deduplicate:
        raise ValueError("data.mix_stopping: all_exhausted repeats examples of the smaller sources, which "
                         "data.deduplicate would drop again: set data.deduplicate: false (or use first_exhausted)")
    if not data.streaming and (data.validation is None or data.test is None):
        raise ValueError("data.mix_stopping: all_exhausted repeats examples, so a split held out of the mix could "
                         "hold copies of training examples: give data.validation and data.test files (or use "
                         "first_exhausted, which never repeats)")
