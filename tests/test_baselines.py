"""Baselines: they learn a synthetic but non-trivial task, report honestly, and fail with DataError."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lmtune.errors import ConfigError, DataError
from lmtune.evaluate.baselines import BASELINES, MajorityBaseline, TfidfLogRegBaseline, run_baselines

POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "moving",
    "brilliant",
    "charming",
    "gripping",
]
NEGATIVE = ["awful", "boring", "terrible", "dull", "clumsy", "tedious", "bland", "messy", "forgettable"]
NOISE = [
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "script",
    "ending",
    "director",
    "story",
    "cast",
    "the",
    "really",
]
NOISE += ["quite", "today", "again", "music", "pace", "was", "is", "a", "and", "with", "its", "this"]
TEMPLATES = [
    "the {n1} was {a1} and the {n2} {a2}",
    "{a1} {n1} , {n2} {n3} {a2}",
    "this {n1} is {a1} . {n2} {n3} {n4}",
    "{n1} {n2} {a1} {n3} {a2} {n4}",
]


def sentiment_data(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` templated review sentences, about 60% positive (label 1), each with two polar words.

    One in three sentences also carries a word of the opposite polarity (outvoted two to one), so
    single words do not decide the label and the classifier has to weigh the evidence.
    """
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.random() < 0.6)
        own, other = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        adjectives = [rng.choice(own), rng.choice(own)]
        nouns = {f"n{i}": rng.choice(NOISE) for i in range(1, 5)}
        if rng.random() < 1 / 3:
            nouns[f"n{rng.randint(1, 4)}"] = rng.choice(other)
        texts.append(rng.choice(TEMPLATES).format(a1=adjectives[0], a2=adjectives[1], **nouns))
        labels.append(label)
    return texts, np.array(labels)


TOPICS = {
    "sport": ["goal", "match", "league", "coach", "striker", "referee"],
    "food": ["recipe", "spicy", "noodles", "bakery", "dessert", "chef"],
    "tech": ["laptop", "software", "chip", "server", "compiler", "battery"],
}


def topic_data(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Multi-label texts: each topic present with probability 0.4 adds two of its words (none possible)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        row = [int(rng.random() < 0.4) for _ in TOPICS]
        words = [rng.choice(NOISE) for _ in range(4)]
        for present, vocabulary in zip(row, TOPICS.values(), strict=True):
            if present:
                words += rng.sample(vocabulary, 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(row)
    return texts, np.array(labels)


@pytest.fixture(scope="module")
def sentiment_results() -> tuple[dict, np.ndarray, np.ndarray]:
    texts, labels = sentiment_data(300, seed=1)
    results = run_baselines(
        ["majority", "tfidf_logreg"],
        texts[:240],
        labels[:240],
        {"test": (texts[240:], labels[240:])},
        ["negative", "positive"],
        seed=0,
    )
    return results, labels[:240], labels[240:]


def test_registry_holds_the_documented_baselines() -> None:
    assert {"majority", "tfidf_logreg"} <= set(BASELINES)
    for name, cls in BASELINES.items():
        assert cls.name == name and cls.description


def test_tfidf_logreg_learns_synthetic_sentiment(sentiment_results) -> None:
    results, _, _ = sentiment_results
    metrics = results["tfidf_logreg"]["metrics"]["test"]
    assert metrics["accuracy"] > 0.9
    assert metrics["num_examples"] == 60
    assert "roc_auc" in metrics and "expected_calibration_error" in metrics


def test_majority_scores_the_majority_rate(sentiment_results) -> None:
    results, train_labels, test_labels = sentiment_results
    majority_class = int(np.bincount(train_labels).argmax())
    metrics = results["majority"]["metrics"]["test"]
    assert metrics["accuracy"] == pytest.approx(float(np.mean(test_labels == majority_class)))
    # Every prediction is the majority class: one column of the confusion matrix holds everything.
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix[:, majority_class].sum() == len(test_labels)


def test_result_fields_are_complete_and_json_serialisable(sentiment_results) -> None:
    results, _, _ = sentiment_results
    for entry in results.values():
        assert set(entry) == {
            "description",
            "train_seconds",
            "predict_ms_per_example",
            "size_bytes",
            "parameters",
            "metrics",
        }
        assert entry["train_seconds"] >= 0 and entry["predict_ms_per_example"] >= 0
        assert isinstance(entry["parameters"], int) and entry["parameters"] > 0
        assert isinstance(entry["size_bytes"], int) and entry["size_bytes"] > 0
    assert results["tfidf_logreg"]["size_bytes"] > 100 * results["majority"]["size_bytes"]
    json.dumps(results)


def test_multi_label() -> None:
    texts, labels = topic_data(300, seed=2)
    results = run_baselines(
        ["majority", "tfidf_logreg"],
        texts[:240],
        labels[:240],
        {"validation": (texts[240:], labels[240:])},
        list(TOPICS),
        multi_label=True,
    )
    learned = results["tfidf_logreg"]["metrics"]["validation"]
    assert learned["micro_f1"] > 0.9
    assert learned["accuracy"] > 0.8
    # Each topic is present in ~40% of examples, so "majority" predicts no label at all.
    majority = results["majority"]["metrics"]["validation"]
    assert majority["micro_f1"] == 0.0
    assert majority["accuracy"] == pytest.approx(float(np.mean(labels[240:].sum(axis=1) == 0)))
    json.dumps(results)


def test_chinese_texts_without_spaces() -> None:
    # Word tokens would be whole sentences here; the character n-grams carry the signal.
    rng = random.Random(3)
    good, bad = ["好看", "精彩", "感人", "喜欢", "推荐"], ["难看", "无聊", "失望", "糟糕", "浪费"]
    filler = ["这部电影", "剧情", "演员", "今天", "我们都觉得", "真的", "非常"]
    texts, labels = [], []
    for _ in range(200):
        label = rng.randrange(2)
        parts = [rng.choice(filler), rng.choice(filler), rng.choice(good if label else bad)]
        rng.shuffle(parts)
        texts.append("".join(parts) + "。")
        labels.append(label)
    results = run_baselines(
        ["tfidf_logreg"], texts[:150], labels[:150], {"test": (texts[150:], labels[150:])}, ["差评", "好评"]
    )
    assert results["tfidf_logreg"]["metrics"]["test"]["accuracy"] > 0.9


def test_word_vocabulary_empty_but_characters_usable() -> None:
    # One-letter "words" give the word analyzer nothing (it keeps tokens of 2+ characters).
    texts, labels = ["a", "b", "a a", "b b", "a", "b"], np.array([0, 1, 0, 1, 0, 1])
    baseline = TfidfLogRegBaseline()
    baseline.fit(texts, labels, num_labels=2, multi_label=False)
    assert [v.analyzer for v in baseline.vectorizers] == ["char_wb"]
    assert baseline.predict_proba(["a", "b"]).argmax(axis=1).tolist() == [0, 1]


def test_empty_vocabulary_raises_data_error() -> None:
    with pytest.raises(DataError, match="baseline tfidf_logreg: no usable tokens in the training texts"):
        run_baselines(["tfidf_logreg"], ["", "  ", "\n"], [0, 1, 0], {}, ["a", "b"])


def test_one_training_class_raises_data_error() -> None:
    with pytest.raises(DataError, match="one class only"):
        run_baselines(["tfidf_logreg"], ["good film", "fine film"], [1, 1], {}, ["neg", "pos"])


def test_class_missing_from_training_gets_zero_probability() -> None:
    texts, labels = sentiment_data(60, seed=4)
    for cls in BASELINES.values():
        baseline = cls(seed=0)
        baseline.fit(texts, labels, num_labels=3, multi_label=False)
        probs = baseline.predict_proba(texts[:5])
        assert probs.shape == (5, 3)
        assert np.allclose(probs[:, 2], 0.0) and np.allclose(probs.sum(axis=1), 1.0)


def test_majority_predict_proba_is_the_prior() -> None:
    baseline = MajorityBaseline()
    baseline.fit(["x"] * 4, np.array([2, 2, 0, 2]), num_labels=3, multi_label=False)
    assert baseline.predict_proba(["y", "z"]).tolist() == [[0.25, 0.0, 0.75]] * 2


def test_same_seed_same_metrics() -> None:
    texts, labels = sentiment_data(120, seed=5)
    runs = [
        run_baselines(
            ["tfidf_logreg"], texts[:100], labels[:100], {"t": (texts[100:], labels[100:])}, ["n", "p"]
        )
        for _ in range(2)
    ]
    assert runs[0]["tfidf_logreg"]["metrics"] == runs[1]["tfidf_logreg"]["metrics"]


def test_unknown_baseline_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown baseline") as info:
        run_baselines(["majority", "bert_tiny"], ["a b"], [0], {}, ["a", "b"])
    assert "tfidf_logreg" in str(info.value)


BAD_LABELS = [
    ("length mismatch", ["aa bb", "cc dd"], [0], False, "2 texts but 1 labels"),
    ("index too large", ["aa bb", "cc dd"], [0, 2], False, r"0\.\.1"),
    ("negative index", ["aa bb", "cc dd"], [0, -1], False, r"0\.\.1"),
    ("strings", ["aa bb", "cc dd"], ["neg", "pos"], False, "integer indices"),
    ("fractional", ["aa bb", "cc dd"], [0.5, 1.0], False, "integer indices"),
    ("multi-label given indices", ["aa bb", "cc dd"], [0, 1], True, r"expected \(N, 2\)"),
    ("multi-label not 0/1", ["aa bb", "cc dd"], [[0, 2], [1, 0]], True, r"0\.\.1"),
    ("empty training split", [], [], False, "training split is empty"),
]


@pytest.mark.parametrize(
    ("texts", "labels", "multi_label", "message"), [c[1:] for c in BAD_LABELS], ids=[c[0] for c in BAD_LABELS]
)
def test_bad_labels_raise_data_error(texts, labels, multi_label, message) -> None:
    with pytest.raises(DataError, match=message):
        run_baselines(["majority"], texts, labels, {}, ["a", "b"], multi_label=multi_label)


def test_bad_eval_labels_name_the_split() -> None:
    with pytest.raises(DataError, match="validation"):
        run_baselines(["majority"], ["aa", "bb"], [0, 1], {"validation": (["aa"], [5])}, ["a", "b"])
