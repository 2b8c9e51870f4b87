"""Relation scores: precision / recall / F1 over the relation types, the no-relation class left out.

A pair predicted as a relation counts against precision, a gold relation against recall; a pair both
gold and predicted as no-relation counts for nothing (the TACRED / SemEval convention). Micro scores pool
the counts of every relation type; macro F1 is the mean F1 over the relation types that occur in the gold
labels or the predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _prf(tp: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = tp / predicted if predicted else 0.0
    recall = tp / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def relation_metrics_from_confusion(confusion: Any, labels: Sequence[str], no_relation: str | None
                                    ) -> dict[str, Any]:
    """The scores from a confusion matrix (rows = gold, columns = predicted, in ``labels`` order)."""
    cm = np.asarray(confusion, dtype=np.int64)
    per_type: dict[str, dict[str, Any]] = {}
    tp_all = pred_all = gold_all = 0
    for k, name in enumerate(labels):
        if name == no_relation:
            continue
        tp, predicted, gold = int(cm[k, k]), int(cm[:, k].sum()), int(cm[k, :].sum())
        p, r, f = _prf(tp, predicted, gold)
        per_type[name] = {"precision": p, "recall": r, "f1": f, "support": gold, "predicted": predicted}
        tp_all, pred_all, gold_all = tp_all + tp, pred_all + predicted, gold_all + gold
    precision, recall, f1 = _prf(tp_all, pred_all, gold_all)
    seen = [s["f1"] for s in per_type.values() if s["support"] or s["predicted"]]
    total = int(cm.sum())
    return {
        "micro_f1": f1, "micro_precision": precision, "micro_recall": recall,
        "macro_f1": float(np.mean(seen)) if seen else 0.0,
        "accuracy": float(np.trace(cm) / total) if total else 0.0,
        "num_pairs": total, "num_relations": gold_all, "no_relation_label": no_relation,
        "per_type": per_type,
    }


def confusion(gold: Sequence[int], pred: Sequence[int], num_labels: int) -> np.ndarray:
    """Counts (L, L), rows = gold index, columns = predicted index."""
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def relation_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str], no_relation: str | None
                     ) -> dict[str, Any]:
    """The scores of predicted label names against gold ones (both from ``labels``)."""
    index = {name: i for i, name in enumerate(labels)}
    cm = confusion([index[g] for g in gold], [index[p] for p in pred], len(labels))
    return relation_metrics_from_confusion(cm, labels, no_relation)
