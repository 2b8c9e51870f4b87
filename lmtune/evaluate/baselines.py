"""Cheap baselines, trained and scored on the same split as the fine-tuned model.

They show what the big model buys: if TF-IDF + logistic regression gets within a point of the
fine-tuned transformer, the user should know before paying for the transformer. Each baseline
fits in seconds on CPU and joins ``BASELINES`` with one line (its name also goes into
``lmtune.config.tasks.CLASSIC_BASELINES``, which configs are checked against).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from lmtune.config.tasks import CLASSIC_BASELINES, NEURAL_BASELINES
from lmtune.errors import ConfigError, DataError
from lmtune.evaluate.metrics import classification_metrics

# Multi-label decisions: a label is predicted when its probability reaches this (as in the task).
MULTI_LABEL_THRESHOLD = 0.5


class Baseline:
    """A classifier with a fixed recipe: fit on texts, give class probabilities, report its size.

    ``labels`` are class indices (N,) for single-label and 0/1 indicators (N, L) for multi-label;
    ``predict_proba`` returns (N, L): a distribution per row for single-label, independent
    per-label probabilities for multi-label.
    """

    name: ClassVar[str]
    # One line for the report; an instance may refine it to describe its own settings.
    description: str

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, texts: list[str], labels: Any, num_labels: int, multi_label: bool) -> None:
        """Train on ``texts``; raise :class:`DataError` if the data cannot train this baseline."""
        raise NotImplementedError

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, (N, L)."""
        raise NotImplementedError

    def size_bytes(self) -> int:
        """Approximate size of the fitted parameters, in bytes."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Learned numbers (coefficients, intercepts, priors); vocabularies are not counted."""
        raise NotImplementedError


class MajorityBaseline(Baseline):
    """Predicts the most frequent training class (multi-label: each label's majority value)."""

    name = "majority"
    description = (
        "Always predicts the most frequent training class (multi-label: each label's majority value)."
    )

    def fit(self, texts: list[str], labels: Any, num_labels: int, multi_label: bool) -> None:
        """Store the training label frequencies."""
        y = np.asarray(labels)
        if multi_label:
            # (L,) fraction of training examples carrying each label; >= 0.5 means "predict it".
            self.prior = y.astype(np.float64).mean(axis=0)
        else:
            # The class prior as the probability row: its argmax is the majority class (the
            # lowest index on ties), and it gives the calibration metrics an honest input.
            self.prior = np.bincount(y, minlength=num_labels).astype(np.float64) / len(y)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """The training prior, repeated for every text: (N, L)."""
        return np.tile(self.prior, (len(texts), 1))

    def size_bytes(self) -> int:
        """Bytes of the stored prior."""
        return int(self.prior.nbytes)

    def num_parameters(self) -> int:
        """The prior's entries."""
        return int(self.prior.size)


class TfidfLogRegBaseline(Baseline):
    """TF-IDF word 1-2-grams + character 2-5-grams, then logistic regression.

    The character n-grams (``char_wb``, within word boundaries) carry sub-word cues, morphology and
    misspellings, and they are what makes text without spaces (Chinese, Japanese) usable at all:
    the word analyzer sees a whole CJK sentence as one token. On Rotten Tomatoes snippets (10k
    training sentences) they add about 2 points of test accuracy over word n-grams alone (0.794
    vs 0.778) for about 3-4x the fit time (some 6 s of CPU instead of 2). C=4 was picked on that
    data's validation split; a larger C changed accuracy by under half a point.
    """

    name = "tfidf_logreg"
    description = (
        "TF-IDF of word 1-2-grams plus character 2-5-grams (sublinear tf), "
        "logistic regression (C=4; one-vs-rest for multi-label)."
    )

    def __init__(
        self, seed: int = 0, *, C: float = 4.0, features: tuple[str, ...] = ("word", "char")
    ) -> None:
        super().__init__(seed)
        unknown = set(features) - {"word", "char"}
        if not features or unknown:
            raise ValueError(f"features must be a non-empty subset of ('word', 'char'), got {features}")
        self.C = C
        self.features = features
        parts = {"word": "word 1-2-grams", "char": "character 2-5-grams"}
        self.description = (
            f"TF-IDF of {' plus '.join(parts[f] for f in features)} (sublinear tf), "
            f"logistic regression (C={C:g}; one-vs-rest for multi-label)."
        )

    def _vectorizers(self) -> list[TfidfVectorizer]:
        common: dict[str, Any] = {"sublinear_tf": True, "min_df": 1, "max_features": 200_000}
        made = {
            "word": TfidfVectorizer(ngram_range=(1, 2), **common),
            "char": TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), **common),
        }
        return [made[f] for f in self.features]

    def _classifier(self, num_classes: int, multi_label: bool) -> Any:
        if multi_label or num_classes == 2:
            # liblinear solves each binary problem several times faster than lbfgs on these
            # wide sparse matrices, at the same accuracy.
            binary = LogisticRegression(C=self.C, max_iter=1000, solver="liblinear", random_state=self.seed)
            return OneVsRestClassifier(binary) if multi_label else binary
        # Three or more classes: a true softmax model, which liblinear cannot fit.
        return LogisticRegression(C=self.C, max_iter=1000, random_state=self.seed)

    def fit(self, texts: list[str], labels: Any, num_labels: int, multi_label: bool) -> None:
        """Fit the vectorizers (dropping one that finds no tokens) and the classifier."""
        y = np.asarray(labels)
        self.num_labels = num_labels
        self.multi_label = multi_label
        self.vectorizers: list[TfidfVectorizer] = []
        blocks = []
        for vectorizer in self._vectorizers():
            try:
                blocks.append(vectorizer.fit_transform(texts))
            except ValueError as exc:
                # Only the empty-vocabulary case is expected (e.g. one-letter words have no word
                # 2+-grams); the other analyzer may still see tokens, so keep going.
                if "empty vocabulary" not in str(exc):
                    raise
                continue
            self.vectorizers.append(vectorizer)
        if not self.vectorizers:
            raise DataError(
                f"baseline {self.name}: no usable tokens in the training texts "
                f"({len(texts)} texts, none with a word or a character n-gram)",
                hint="check that the text column holds the texts, not empty cells",
            )
        features = sp.hstack(blocks, format="csr")  # (N, V_word + V_char)
        if multi_label:
            self.classes = np.arange(num_labels)
        else:
            self.classes = np.unique(y)
            if len(self.classes) < 2:
                raise DataError(
                    f"baseline {self.name}: the training labels hold one class only "
                    f"(index {int(self.classes[0])}); a classifier needs at least two",
                )
        self.model = self._classifier(len(self.classes), multi_label)
        self.model.fit(features, y)

    def _features(self, texts: list[str]) -> sp.csr_matrix:
        return sp.hstack([v.transform(texts) for v in self.vectorizers], format="csr")

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N, L) probabilities; a class never seen in training gets probability 0."""
        prob = self.model.predict_proba(self._features(texts))
        if self.multi_label:
            return np.asarray(prob, dtype=np.float64)
        # The model only knows the classes it saw; scatter them into the full label space.
        full = np.zeros((len(texts), self.num_labels), dtype=np.float64)
        full[:, self.classes] = prob
        return full

    def size_bytes(self) -> int:
        """Approximate serialised size: vocabulary terms and IDF weights plus the coefficients.

        Each vocabulary entry counts its UTF-8 term bytes plus 8 bytes for its column index; the
        IDF, coefficient and intercept arrays count their ``nbytes``. Python object overhead is
        left out, so this is close to what a compact file (e.g. JSON + .npy) would take, and well
        below the in-memory footprint.
        """
        total = 0
        for vectorizer in self.vectorizers:
            total += sum(len(term.encode("utf-8")) + 8 for term in vectorizer.vocabulary_)
            total += vectorizer.idf_.nbytes
        estimators = self.model.estimators_ if self.multi_label else [self.model]
        for estimator in estimators:
            # OneVsRestClassifier swaps in a constant predictor for a label that never varies.
            for attr in ("coef_", "intercept_"):
                value = getattr(estimator, attr, None)
                if value is not None:
                    total += np.asarray(value).nbytes
        return int(total)

    def num_parameters(self) -> int:
        """Coefficients and intercepts of the fitted classifier(s)."""
        estimators = self.model.estimators_ if self.multi_label else [self.model]
        return int(sum(np.asarray(getattr(e, a)).size for e in estimators for a in ("coef_", "intercept_")
                       if getattr(e, a, None) is not None))


BASELINES: dict[str, type[Baseline]] = {
    MajorityBaseline.name: MajorityBaseline,
    TfidfLogRegBaseline.name: TfidfLogRegBaseline,
}

# The classic baselines are the ones fitted here; the names a config may list (and which tasks list which) are
# declared in lmtune.config.tasks (BASELINE_NAMES, TaskInfo.baselines), so this table must agree with it.
if tuple(BASELINES) != CLASSIC_BASELINES:  # pragma: no cover  (a programming error, caught on import)
    raise RuntimeError(f"BASELINES {tuple(BASELINES)} differ from lmtune.config.tasks.CLASSIC_BASELINES "
                       f"{CLASSIC_BASELINES}")


def is_subrun_baseline(name: str) -> bool:
    """Whether baseline ``name`` trains as a sub-run of the train workflow (the neural ones,
    ``lmtune.models.neural_baselines``), not fitted here."""
    return name in NEURAL_BASELINES


def predict_labels(probs: np.ndarray, multi_label: bool) -> np.ndarray:
    """Turn (N, L) probabilities into predictions: argmax (N,), or 0/1 (N, L) at or above the threshold."""
    if multi_label:
        return (probs >= MULTI_LABEL_THRESHOLD).astype(int)
    return probs.argmax(axis=1)


def run_baselines(
    names: list[str],
    train_texts: list[str],
    train_labels: Any,
    eval_sets: dict[str, tuple[list[str], Any]],
    label_names: list[str],
    *,
    multi_label: bool = False,
    seed: int = 0,
    latency_texts: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fit each named baseline on the training split and score it on every evaluation split.

    ``train_labels`` and the labels in ``eval_sets`` (``{split: (texts, labels)}``) are class
    indices (N,) for single-label and 0/1 indicators (N, L) for multi-label. Returns
    ``{name: {"description", "train_seconds", "predict_ms_per_example", "size_bytes", "parameters",
    "metrics": {split: classification_metrics(...)}}}``, all JSON-serialisable.
    ``predict_ms_per_example`` is the wall time of ``predict_proba`` over all evaluation splits
    divided by their total size; with ``latency_texts``, over those texts instead (after a warm-up
    call on a few of them), so several models can be timed on the same inputs.
    """
    neural = [n for n in names if n in NEURAL_BASELINES]
    if neural:
        raise ConfigError(f"baseline(s) {', '.join(neural)} train on the training loop as sub-runs of lmtune.train, "
                          "not in run_baselines", hint="list them in a config's baselines, or train one with "
                          f"model: baseline:{neural[0]}")
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ConfigError(
            f"unknown baseline(s): {', '.join(unknown)}", hint=f"choose from: {', '.join(sorted(BASELINES))}"
        )
    num_labels = len(label_names)
    train_y = _check_labels("train", train_texts, train_labels, num_labels, multi_label)
    checked_sets = {
        split: (texts, _check_labels(split, texts, labels, num_labels, multi_label))
        for split, (texts, labels) in eval_sets.items()
    }
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        baseline = BASELINES[name](seed=seed)
        start = time.perf_counter()
        baseline.fit(train_texts, train_y, num_labels, multi_label)
        train_seconds = time.perf_counter() - start
        metrics: dict[str, Any] = {}
        predict_seconds, predicted = 0.0, 0
        for split, (texts, labels) in checked_sets.items():
            if not texts:
                continue
            start = time.perf_counter()
            probs = baseline.predict_proba(texts)  # (N, L)
            predict_seconds += time.perf_counter() - start
            predicted += len(texts)
            metrics[split] = classification_metrics(
                labels, predict_labels(probs, multi_label), label_names, probs=probs, multi_label=multi_label
            )
        if latency_texts:
            baseline.predict_proba(latency_texts[:8])  # warm-up
            start = time.perf_counter()
            baseline.predict_proba(latency_texts)
            predict_seconds, predicted = time.perf_counter() - start, len(latency_texts)
        results[name] = {
            "description": baseline.description,
            "train_seconds": float(train_seconds),
            "predict_ms_per_example": float(1000.0 * predict_seconds / max(predicted, 1)),
            "size_bytes": int(baseline.size_bytes()),
            "parameters": int(baseline.num_parameters()),
            "metrics": metrics,
        }
    return results


def _check_labels(
    split: str, texts: list[str], labels: Any, num_labels: int, multi_label: bool
) -> np.ndarray:
    """Labels as an int array of the expected shape, or a DataError naming the split."""
    y = np.asarray(labels)
    expected = f"(N, {num_labels}) 0/1 indicators" if multi_label else "(N,) class indices"
    if (multi_label and (y.ndim != 2 or y.shape[1:] != (num_labels,))) or (not multi_label and y.ndim != 1):
        raise DataError(f"baselines: {split} labels have shape {y.shape}, expected {expected}")
    if y.shape[0] != len(texts):
        raise DataError(f"baselines: {split} has {len(texts)} texts but {y.shape[0]} labels")
    if split == "train" and y.shape[0] == 0:
        raise DataError("baselines: the training split is empty")
    # Floats are accepted when whole (e.g. indicators read back as 0.0/1.0); strings are not.
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
        raise DataError(f"baselines: {split} labels must be integer indices, got dtype {y.dtype}")
    y = y.astype(int)
    high = 1 if multi_label else num_labels - 1
    if y.size and (y.min() < 0 or y.max() > high):
        raise DataError(
            f"baselines: {split} labels must lie in 0..{high}, found {int(y.min())}..{int(y.max())}"
        )
    return y
