"""Classification metrics: hand-computed cases, absent labels, multi-label, calibration, JSON output."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from lmtune.evaluate.metrics import classification_metrics, expected_calibration_error


def _plain(value: Any) -> bool:
    """True when ``value`` holds only Python builtins (no numpy scalars hiding inside)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return type(value) in (int, float, str, bool)


# y_true=[0,0,1,1], y_pred=[0,1,1,1]:
#   class 0: tp 1, fp 0, fn 1 -> P 1,   R 1/2, F1 2/3
#   class 1: tp 2, fp 1, fn 0 -> P 2/3, R 1,   F1 4/5
#   macro F1 (2/3 + 4/5)/2 = 11/15; weighted equal (supports 2 and 2).
# y_true=[0,1,2,2], y_pred=[0,1,1,1] (label 2 never predicted):
#   class 0: F1 1; class 1: P 1/3, R 1, F1 1/2; class 2: P 0 (0/0 -> 0), R 0, F1 0
#   macro F1 1/2, weighted (1*1 + 1*1/2 + 2*0)/4 = 3/8, macro P (1+1/3+0)/3 = 4/9, macro R 2/3.
# y_true=[0,0,1,1], y_pred=[0,0,1,1] with 3 labels: label 2 absent from both sides, so it is left
#   out of the macro average (its F1 is undefined) but kept in per_class and the confusion matrix.
SINGLE_LABEL_CASES = [
    (
        "binary",
        [0, 0, 1, 1],
        [0, 1, 1, 1],
        ["neg", "pos"],
        {
            "accuracy": 0.75,
            "micro_f1": 0.75,
            "macro_f1": 11 / 15,
            "weighted_f1": 11 / 15,
            "macro_precision": (1 + 2 / 3) / 2,
            "macro_recall": (1 / 2 + 1) / 2,
        },
        {"neg": (1.0, 0.5, 2 / 3, 2), "pos": (2 / 3, 1.0, 0.8, 2)},
        [[1, 1], [0, 2]],
    ),
    (
        "label never predicted",
        [0, 1, 2, 2],
        [0, 1, 1, 1],
        ["a", "b", "c"],
        {
            "accuracy": 0.5,
            "macro_f1": 0.5,
            "weighted_f1": 3 / 8,
            "macro_precision": 4 / 9,
            "macro_recall": 2 / 3,
        },
        {"a": (1.0, 1.0, 1.0, 1), "b": (1 / 3, 1.0, 0.5, 1), "c": (0.0, 0.0, 0.0, 2)},
        [[1, 0, 0], [0, 1, 0], [0, 2, 0]],
    ),
    (
        "label absent from both",
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        ["x", "y", "z"],
        {"accuracy": 1.0, "macro_f1": 1.0, "weighted_f1": 1.0},
        {"z": (0.0, 0.0, 0.0, 0)},
        [[2, 0, 0], [0, 2, 0], [0, 0, 0]],
    ),
]


@pytest.mark.parametrize(
    ("y_true", "y_pred", "names", "expected", "per_class", "matrix"),
    [case[1:] for case in SINGLE_LABEL_CASES],
    ids=[case[0] for case in SINGLE_LABEL_CASES],
)
def test_single_label_hand_computed(y_true, y_pred, names, expected, per_class, matrix) -> None:
    result = classification_metrics(np.array(y_true), np.array(y_pred), names)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    for name, (precision, recall, f1, support) in per_class.items():
        assert result["per_class"][name] == pytest.approx(
            {"precision": precision, "recall": recall, "f1": f1, "support": support}
        )
    assert set(result["per_class"]) == set(names)
    assert result["confusion_matrix"] == matrix
    assert result["num_examples"] == len(y_true)
    assert _plain(result)
    json.dumps(result)


def test_binary_probs_add_roc_auc_and_ece() -> None:
    y_true = np.array([0, 0, 1, 1])
    # P(label 1) = .1, .6, .4, .9: of the 4 (neg, pos) pairs, 3 are ranked right -> AUC 0.75.
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.1, 0.9]])
    result = classification_metrics(y_true, probs.argmax(1), ["neg", "pos"], probs=probs)
    assert result["roc_auc"] == pytest.approx(0.75)
    # Confidences .9 (right), .6 (wrong), .6 (wrong), .9 (right):
    # bin (.5,.6]: acc 0, conf .6 -> .6 * 2/4; bin (.8,.9]: acc 1, conf .9 -> .1 * 2/4. ECE .35
    assert result["expected_calibration_error"] == pytest.approx(0.35)
    json.dumps(result)


def test_roc_auc_left_out_when_one_class_present() -> None:
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    result = classification_metrics(np.array([1, 1]), np.array([0, 1]), ["neg", "pos"], probs=probs)
    assert "roc_auc" not in result
    assert "expected_calibration_error" in result


def test_multiclass_probs_give_ece_only() -> None:
    probs = np.full((3, 3), 1 / 3)
    result = classification_metrics(np.array([0, 1, 2]), np.array([0, 0, 0]), ["a", "b", "c"], probs=probs)
    assert "roc_auc" not in result
    # One bin, confidence 1/3, accuracy 1/3 -> perfectly calibrated.
    assert result["expected_calibration_error"] == pytest.approx(0.0, abs=1e-12)


ECE_CASES = [
    ("always right at 1.0", [0, 1], [[1.0, 0.0], [0.0, 1.0]], 0.0),
    ("always wrong at 1.0", [1, 0], [[1.0, 0.0], [0.0, 1.0]], 1.0),
    ("overconfident", [0, 0, 0, 1], [[0.95, 0.05]] * 4, 0.2),
]


@pytest.mark.parametrize(
    ("y_true", "probs", "expected"), [c[1:] for c in ECE_CASES], ids=[c[0] for c in ECE_CASES]
)
def test_expected_calibration_error(y_true, probs, expected) -> None:
    assert expected_calibration_error(np.array(y_true), np.array(probs)) == pytest.approx(expected)


def test_multi_label_hand_computed() -> None:
    # 4 examples, 3 labels; exact matches: rows 0 and 3 -> accuracy 0.5.
    # Wrong cells: row 1 label 2 (fn), row 2 label 0 (fp) -> hamming 2/12.
    y_true = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]])
    y_pred = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]])
    result = classification_metrics(y_true, y_pred, ["sport", "tech", "food"], multi_label=True)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["hamming_loss"] == pytest.approx(2 / 12)
    # sport: tp1 fp1 -> F1 2/3; tech: F1 1; food: tp2 fn1 -> F1 4/5.
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1 + 4 / 5) / 3)
    # micro: tp 4, fp 1, fn 1 -> 8/10
    assert result["micro_f1"] == pytest.approx(0.8)
    # weighted by support 1, 1, 3
    assert result["weighted_f1"] == pytest.approx((2 / 3 + 1 + 3 * 0.8) / 5)
    # samples: row0 1, row1 2/3, row2 2/3, row3 (no labels, none predicted: correct) 1
    assert result["samples_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 1) / 4)
    assert result["per_class"]["food"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert "confusion_matrix" not in result
    assert result["num_examples"] == 4
    assert _plain(result)
    json.dumps(result)


def test_multi_label_all_negative_split_does_not_crash() -> None:
    zeros = np.zeros((3, 2), dtype=int)
    result = classification_metrics(zeros, zeros, ["a", "b"], multi_label=True)
    assert result["accuracy"] == 1.0
    assert result["hamming_loss"] == 0.0
    assert result["samples_f1"] == 1.0
    assert all(math.isfinite(v) for v in (result["macro_f1"], result["micro_f1"]))


BAD_INPUTS = [
    ("shape mismatch", dict(y_true=[0, 1], y_pred=[0], label_names=["a", "b"])),
    ("empty", dict(y_true=[], y_pred=[], label_names=["a", "b"])),
    ("index out of range", dict(y_true=[0, 2], y_pred=[0, 1], label_names=["a", "b"])),
    ("no labels", dict(y_true=[0], y_pred=[0], label_names=[])),
    ("probs shape", dict(y_true=[0, 1], y_pred=[0, 1], label_names=["a", "b"], probs=[[1.0, 0.0]])),
    ("multi-label width", dict(y_true=[[0, 1]], y_pred=[[0, 1]], label_names=["a"], multi_label=True)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_value_error(kwargs) -> None:
    with pytest.raises(ValueError, match="classification_metrics"):
        classification_metrics(**kwargs)


def test_lists_and_numpy_ints_give_the_same_result() -> None:
    as_lists = classification_metrics([0, 1, 1], [0, 1, 0], ["a", "b"])
    as_arrays = classification_metrics(np.array([0, 1, 1], dtype=np.int64), np.array([0, 1, 0]), ["a", "b"])
    assert as_lists == as_arrays
