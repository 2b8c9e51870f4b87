"""Label cells as label names: shared by the classification task (training data) and its predictor
(labelled files given to ``lmtune eval``), so both read a cell the same way."""

from __future__ import annotations

from typing import Any

import numpy as np

# Multi-label decisions: a label is on when its sigmoid probability reaches this (the classic baselines
# decide the same way, so it is theirs too).
from lmtune.evaluate.baselines import MULTI_LABEL_THRESHOLD

__all__ = ["MULTI_LABEL_THRESHOLD", "is_blank", "label_keys", "sort_labels"]


def is_blank(value: Any) -> bool:
    """A missing cell: None, NaN, or text that is only whitespace."""
    return value is None or (isinstance(value, float) and np.isnan(value)) or (
        isinstance(value, str) and not value.strip()
    )


def _label_key(value: Any) -> str:
    """Labels are kept as strings; integral numbers lose a trailing `.0` (pandas/parquet floats)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def label_keys(value: Any, *, multi_label: bool, delimiter: str | None) -> list[str]:
    """A raw label cell as label names: one for single-label, zero or more for multi-label
    (a list, or a string split on ``delimiter``); blanks are no labels."""
    if not multi_label:
        return [_label_key(value)]
    if is_blank(value):
        items = []
    elif isinstance(value, list):
        items = value
    elif isinstance(value, str) and delimiter:
        items = value.split(delimiter)
    else:
        items = [value]
    return [_label_key(v) for v in items if not is_blank(v)]


def sort_labels(labels: set[str]) -> list[str]:
    """Numeric labels in numeric order (2 before 10), others alphabetically."""
    try:
        return sorted(labels, key=lambda x: float(x))
    except ValueError:
        return sorted(labels)
