"""Classification metrics as plain, JSON-serialisable dicts.

Everything is computed locally with scikit-learn (``zero_division=0``) and returned as Python
floats/ints/lists, so the result can go straight into ``metrics.jsonl``, ``eval.json`` or the
report without a custom encoder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

ECE_BINS = 10


def classification_metrics(
    y_true: Any,
    y_pred: Any,
    label_names: list[str],
    *,
    probs: Any = None,
    multi_label: bool = False,
) -> dict[str, Any]:
    """Score predictions of a single-label or multi-label classifier.

    Single-label: ``y_true``/``y_pred`` are class indices, shape (N,); ``probs`` (optional) is
    (N, L) with rows summing to 1. Returns ``accuracy``, ``macro_f1``, ``weighted_f1``,
    ``micro_f1``, ``macro_precision``, ``macro_recall``, ``per_class`` (precision, recall, f1,
    support for every label name), ``confusion_matrix`` (rows = true, columns = predicted, in
    ``label_names`` order, every label included) and ``num_examples``. With ``probs`` it adds
    ``expected_calibration_error`` and, for two labels with both present in ``y_true``,
    ``roc_auc`` (of the probability of label 1).

    Multi-label: ``y_true``/``y_pred`` are 0/1 indicator arrays (N, L). Returns ``accuracy``
    (exact match of the whole label set), ``hamming_loss``, ``micro_f1``, ``macro_f1``,
    ``weighted_f1``, ``samples_f1``, ``per_class`` and ``num_examples``; ``probs`` is not used.

    Macro averages run over the labels that occur in ``y_true`` or ``y_pred`` (scikit-learn's
    default for single-label): a label the split never mentions has no defined F1, and counting
    it as 0 would punish the model for the split. ``per_class`` still lists every label.

    Raises ``ValueError`` for inputs whose shapes do not fit (a caller bug, not a data problem).
    """
    num_labels = len(label_names)
    if num_labels == 0:
        raise ValueError("classification_metrics: label_names is empty")
    true = np.asarray(y_true)
    pred = np.asarray(y_pred)
    if true.shape != pred.shape:
        raise ValueError(f"classification_metrics: y_true shape {true.shape} != y_pred shape {pred.shape}")
    if true.shape[0] == 0:
        raise ValueError("classification_metrics: no examples to score")
    if multi_label:
        return _multi_label_metrics(true.astype(int), pred.astype(int), label_names)
    if true.ndim != 1:
        raise ValueError(f"classification_metrics: single-label y_true must be (N,), got {true.shape}")
    for name, values in (("y_true", true), ("y_pred", pred)):
        if values.min() < 0 or values.max() >= num_labels:
            raise ValueError(
                f"classification_metrics: {name} holds a label index outside 0..{num_labels - 1}"
            )
    return _single_label_metrics(true.astype(int), pred.astype(int), label_names, probs)


def _single_label_metrics(
    true: np.ndarray, pred: np.ndarray, label_names: list[str], probs: Any
) -> dict[str, Any]:
    num_labels = len(label_names)
    all_labels = list(range(num_labels))
    present = sorted(set(true.tolist()) | set(pred.tolist()))
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(true, pred)),
        "macro_f1": _f1(true, pred, "macro", present),
        "weighted_f1": _f1(true, pred, "weighted", present),
        "micro_f1": _f1(true, pred, "micro", present),
    }
    precision, recall, _, _ = precision_recall_fscore_support(
        true, pred, labels=present, average="macro", zero_division=0
    )
    out["macro_precision"] = float(precision)
    out["macro_recall"] = float(recall)
    out["per_class"] = _per_class(true, pred, label_names)
    out["confusion_matrix"] = confusion_matrix(true, pred, labels=all_labels).tolist()
    out["num_examples"] = int(true.shape[0])
    if probs is not None:
        prob = np.asarray(probs, dtype=np.float64)
        if prob.shape != (true.shape[0], num_labels):
            raise ValueError(
                f"classification_metrics: probs shape {prob.shape} != {(true.shape[0], num_labels)}"
            )
        # ROC AUC is undefined when y_true holds one class only; leave the key out, not NaN.
        if num_labels == 2 and len(set(true.tolist())) == 2:
            out["roc_auc"] = float(roc_auc_score(true, prob[:, 1]))
        out["expected_calibration_error"] = expected_calibration_error(true, prob)
    return out


def _multi_label_metrics(true: np.ndarray, pred: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    num_labels = len(label_names)
    if true.ndim != 2 or true.shape[1] != num_labels:
        raise ValueError(
            f"classification_metrics: multi-label y_true must be (N, {num_labels}), got {true.shape}"
        )
    present = [j for j in range(num_labels) if true[:, j].any() or pred[:, j].any()]
    return {
        # Subset accuracy: an example counts only if every one of its L decisions is right.
        "accuracy": float(accuracy_score(true, pred)),
        "hamming_loss": float(hamming_loss(true, pred)),
        "micro_f1": _f1(true, pred, "micro", present),
        "macro_f1": _f1(true, pred, "macro", present),
        "weighted_f1": _f1(true, pred, "weighted", present),
        # zero_division=1 here only scores an example with no true and no predicted labels
        # (a correct "none of these") as 1 instead of 0; every other example uses 2tp/(2tp+fp+fn).
        "samples_f1": float(f1_score(true, pred, average="samples", zero_division=1)),
        "per_class": _per_class(true, pred, label_names),
        "num_examples": int(true.shape[0]),
    }


def _f1(true: np.ndarray, pred: np.ndarray, average: str, present: list[int]) -> float:
    # An all-negative multi-label split mentions no label; there is nothing to average.
    if not present:
        return 0.0
    return float(f1_score(true, pred, labels=present, average=average, zero_division=0))


def _per_class(true: np.ndarray, pred: np.ndarray, label_names: list[str]) -> dict[str, dict[str, Any]]:
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=list(range(len(label_names))), average=None, zero_division=0
    )
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }


def expected_calibration_error(y_true: Any, probs: Any, *, bins: int = ECE_BINS) -> float:
    """How far the model's confidence is from its accuracy, from 0 (calibrated) to 1.

    Each example's confidence is its top probability; examples are grouped into ``bins``
    equal-width confidence bins, and ECE is the example-weighted mean over bins of
    ``|accuracy in bin - mean confidence in bin|``. A model that says 0.9 and is right 90% of
    the time scores 0. ``y_true`` is (N,) class indices, ``probs`` is (N, L).
    """
    true = np.asarray(y_true)
    prob = np.asarray(probs, dtype=np.float64)  # (N, L)
    confidence = prob.max(axis=1)  # (N,)
    correct = (prob.argmax(axis=1) == true).astype(np.float64)  # (N,)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 joins bin 0.
    bin_index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = bin_index == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)
