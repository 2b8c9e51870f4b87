"""GloVe word vectors (Pennington, Socher and Manning, 2014), trained here with numpy, scipy and torch.

Two steps, as in the reference C implementation (``cooccur`` then ``glove``):

1. :func:`count_cooccurrences`: a sparse (V, V) matrix X whose entry X[i, j] sums ``1 / d`` over every
   time word j stands ``d`` words from word i (``1 <= d <= window``) inside one sentence. Words outside
   the vocabulary are dropped before distances are measured (as ``cooccur`` and word2vec do), and the
   count is symmetric. It is counted per window offset with array operations, a chunk of sentences at a
   time, so memory stays near the number of distinct pairs: no dense V x V matrix is ever built.
2. :func:`fit_glove`: the weighted least-squares objective over the nonzero entries,

       J = sum_ij f(X_ij) (w_i . w~_j + b_i + b~_j - log X_ij)^2,   f(x) = min(1, (x / x_max)^alpha),

   minimised with AdaGrad in shuffled mini-batches of entries. The gradient of a batch is summed per
   word row (``index_add_``) before AdaGrad's step, so a frequent word seen in many entries of a batch
   takes one bounded step instead of hundreds added up. On the Rotten Tomatoes snippets (513k entries,
   batches of 4096) the loss after 10 epochs was 0.0181 against 0.0180 with entry-by-entry AdaGrad
   (the first epoch ends higher: 0.061 against 0.053). Starts and gradient clipping follow the reference:
   parameters uniform in [-0.5, 0.5] / D, squared-gradient sums starting at 1, ``f(x) * diff`` clipped
   to [-100, 100].

   The learning rate is 0.1, not the paper's 0.05: the reference code's update is not textbook AdaGrad
   (its squared sums add ``(0.05 * g)^2`` and its bias step has no rate), which makes its later steps up
   to 20 times larger than 0.05 suggests. Textbook AdaGrad at 0.05 was still far from converged after
   25 epochs; 0.1 reached a lower loss and better vectors (BENCHMARKS.md, "GloVe vs word2vec").

:func:`train_glove` runs both on tokenised sentences and returns the words (by falling frequency) with
``w + w~`` as their vectors (the reference's default output, which the paper found a little better
than ``w`` alone). ``lmtune.models.embeddings`` wraps the result as its ``WordVectors``, saved exactly
like word2vec's (safetensors + JSON).

No library is used for this: ``glove-python`` and its forks tie w and w~ into one matrix, train with
Hogwild threads and save with pickle; ``mittens`` takes a dense V x V matrix; ``glovpy`` builds the C
code from a git clone when first imported.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from lmtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

X_MAX = 100.0
ALPHA = 0.75
LEARNING_RATE = 0.1  # textbook AdaGrad; see the module docstring for why not 0.05
GRAD_CLIP = 100.0  # the reference's grad_clip_value: bounds f(x) * diff, the shared factor of every gradient
MAX_BATCH = 4096  # entries per step; small co-occurrence tables take smaller batches (auto_batch_size)
# Pairs counted in memory at once before they are summed into the sparse matrix (~16 bytes each).
_PAIRS_PER_CHUNK = 8_000_000

EpochCallback = Callable[[int, int, float], None]  # (epoch, epochs, mean loss of that epoch)


# ------------------------------------------------------------------------------------------ counting
def build_vocabulary(sentences: Sequence[Sequence[str]], *, min_count: int = 1,
                     max_vocab: int | None = None) -> tuple[list[str], list[int]]:
    """Words seen at least ``min_count`` times, by falling frequency (ties: first seen), at most ``max_vocab``."""
    counts = Counter(word for sentence in sentences for word in sentence)
    kept = [(w, c) for w, c in counts.most_common() if c >= min_count]  # most_common is stable for ties
    if max_vocab is not None:
        kept = kept[:max_vocab]
    return [w for w, _ in kept], [c for _, c in kept]


def count_cooccurrences(sentences: Sequence[Sequence[str]], index: dict[str, int], *, window: int,
                        ) -> sp.csr_matrix:
    """The symmetric (V, V) float64 CSR matrix of distance-weighted co-occurrence counts.

    For words at positions p < q of one sentence (after out-of-vocabulary words are dropped) with
    ``q - p <= window``, ``1 / (q - p)`` is added to X[a, b] and to X[b, a]; a word near itself adds
    ``2 / d`` to its diagonal entry, as the reference's symmetric count does.
    """
    if window < 1:
        raise ConfigError(f"glove: window must be at least 1, not {window}")
    size = len(index)
    total = sp.csr_matrix((size, size), dtype=np.float64)
    chunk_tokens = max(10_000, _PAIRS_PER_CHUNK // (2 * window))
    ids: list[np.ndarray] = []
    in_chunk = 0
    for sentence in sentences:
        row = np.fromiter((index[w] for w in sentence if w in index), dtype=np.int32)
        if len(row) < 2:
            continue
        ids.append(row)
        in_chunk += len(row)
        if in_chunk >= chunk_tokens:
            total = total + _count_chunk(ids, window, size)
            ids, in_chunk = [], 0
    if ids:
        total = total + _count_chunk(ids, window, size)
    total.sum_duplicates()
    return total


def _count_chunk(rows: list[np.ndarray], window: int, size: int) -> sp.csr_matrix:
    """Counts of a few sentences: every pair at offset d in 1..window, weight 1/d, both ways."""
    words = np.concatenate(rows)  # (T,) word ids of the sentences one after another
    sentence = np.repeat(np.arange(len(rows), dtype=np.int32), [len(r) for r in rows])  # (T,)
    heads, tails, weights = [], [], []
    for d in range(1, window + 1):
        same = sentence[d:] == sentence[:-d]  # (T - d,): both ends in one sentence
        a, b = words[:-d][same], words[d:][same]
        heads += [a, b]
        tails += [b, a]
        weights.append(np.full(2 * len(a), 1.0 / d))
    coo = sp.coo_matrix((np.concatenate(weights), (np.concatenate(heads), np.concatenate(tails))),
                        shape=(size, size))
    return coo.tocsr()  # duplicates are summed here


# ------------------------------------------------------------------------------------------ fitting
@dataclass
class GloveFit:
    """Trained GloVe parameters: word vectors ``w`` and context vectors ``w~`` (float32, (V, D)), their biases."""

    words: list[str]
    counts: list[int]
    w: np.ndarray
    w_context: np.ndarray
    b: np.ndarray
    b_context: np.ndarray
    losses: list[float] = field(default_factory=list)  # mean f(X)(...)^2 over the entries, per epoch
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def vectors(self) -> np.ndarray:
        """``w + w~`` (V, D): what is saved as the word vectors."""
        return self.w + self.w_context


def weighting(x: torch.Tensor, x_max: float = X_MAX, alpha: float = ALPHA) -> torch.Tensor:
    """f(x) = (x / x_max)^alpha, capped at 1: rare pairs count less, frequent ones no more than x_max's."""
    return torch.clamp(x / x_max, max=1.0) ** alpha


def auto_batch_size(entries: int) -> int:
    """Entries per step: about 100 steps an epoch, between 32 and ``MAX_BATCH``.

    Large tables use ``MAX_BATCH`` (vectorised work per step); a small corpus would otherwise take one
    or two steps an epoch and stay barely trained after the default epochs.
    """
    return int(min(MAX_BATCH, max(32, entries // 100)))


def fit_glove(matrix: sp.spmatrix, *, dim: int = 100, epochs: int = 25, x_max: float = X_MAX, alpha: float = ALPHA,
              learning_rate: float = LEARNING_RATE, batch_size: int | None = None, seed: int = 0,
              on_epoch: EpochCallback | None = None) -> tuple[list[np.ndarray], list[float]]:
    """Minimise GloVe's objective over the nonzero entries of ``matrix`` with AdaGrad.

    Returns ``[w, w~, b, b~]`` (float32 numpy) and the mean loss of each epoch, measured on each batch
    before its update as the reference reports it (``f(X)(...)^2``, without the reference's factor 1/2).
    ``batch_size`` None: :func:`auto_batch_size`. The same seed gives the same parameters.
    """
    _check_settings(dim=dim, epochs=epochs, x_max=x_max, alpha=alpha, learning_rate=learning_rate)
    if batch_size is not None:
        _check_settings(batch_size=batch_size)
    coo = sp.coo_matrix(matrix)
    size = coo.shape[0]
    keep = coo.data > 0
    heads = torch.from_numpy(coo.row[keep].astype(np.int64))  # (N,)
    tails = torch.from_numpy(coo.col[keep].astype(np.int64))  # (N,)
    x = torch.from_numpy(coo.data[keep].astype(np.float32))  # (N,)
    if len(x) == 0:
        raise DataError("glove: no two vocabulary words occur within the window of each other",
                        hint="give a larger corpus, a wider --window or a lower --min-count")
    batch_size = batch_size or auto_batch_size(len(x))
    log_x = torch.log(x)
    f_x = weighting(x, x_max, alpha)
    rng = np.random.default_rng(seed)
    # Reference starts: uniform in [-0.5, 0.5] / dim for vectors and biases alike; squared sums at 1.
    params = [torch.from_numpy(((rng.random(shape) - 0.5) / dim).astype(np.float32))
              for shape in ((size, dim), (size, dim), (size,), (size,))]
    w, w_ctx, b, b_ctx = params
    sq = [torch.ones_like(p) for p in params]
    losses: list[float] = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for first in range(0, len(x), batch_size):
            pick = order[first : first + batch_size]  # (B,)
            i, j = heads[pick], tails[pick]
            wi, wj = w[i], w_ctx[j]  # (B, D) each
            diff = (wi * wj).sum(1) + b[i] + b_ctx[j] - log_x[pick]  # (B,)
            fdiff = f_x[pick] * diff  # (B,)
            total += float((fdiff * diff).sum())
            fdiff = fdiff.clamp(-GRAD_CLIP, GRAD_CLIP)
            # d/dw_i = fdiff * w~_j, d/dw~_j = fdiff * w_i, d/db_i = d/db~_j = fdiff (the factor 2 is in the rate)
            _adagrad_rows(w, sq[0], i, fdiff[:, None] * wj, learning_rate)
            _adagrad_rows(w_ctx, sq[1], j, fdiff[:, None] * wi, learning_rate)
            _adagrad_rows(b, sq[2], i, fdiff, learning_rate)
            _adagrad_rows(b_ctx, sq[3], j, fdiff, learning_rate)
        loss = total / len(x)
        if not math.isfinite(loss):
            raise DataError(f"glove: the loss became {loss} in epoch {epoch}",
                            hint="lower the learning rate or the batch size")
        losses.append(loss)
        log.info("glove epoch %d/%d: loss %.5f (%.1f s)", epoch, epochs, loss, time.perf_counter() - start)
        if on_epoch is not None:
            on_epoch(epoch, epochs, loss)
    return [p.numpy() for p in params], losses


def _adagrad_rows(param: torch.Tensor, sq: torch.Tensor, index: torch.Tensor, grad: torch.Tensor,
                  learning_rate: float) -> None:
    """One AdaGrad step on the rows ``index`` names, the gradients of repeated rows summed first."""
    rows, where = torch.unique(index, return_inverse=True)  # (R,), (B,)
    summed = torch.zeros((len(rows), *grad.shape[1:]), dtype=grad.dtype).index_add_(0, where, grad)  # (R, ...)
    sq_rows = sq[rows] + summed * summed
    sq[rows] = sq_rows
    param[rows] -= learning_rate * summed / torch.sqrt(sq_rows)


def _check_settings(**settings: float) -> None:
    """A ConfigError naming the first setting that is not positive."""
    for name, value in settings.items():
        if not value > 0:
            raise ConfigError(f"glove: {name} must be greater than 0, not {value}",
                              hint=f"--{name.replace('_', '-')} takes a positive number")


# ------------------------------------------------------------------------------------------ together
def train_glove(sentences: Sequence[Sequence[str]], *, dim: int = 100, window: int = 5, min_count: int = 1,
                max_vocab: int | None = None, epochs: int = 25, seed: int = 0, x_max: float = X_MAX,
                alpha: float = ALPHA, learning_rate: float = LEARNING_RATE, batch_size: int | None = None,
                on_epoch: EpochCallback | None = None) -> GloveFit:
    """GloVe on tokenised ``sentences``: vocabulary, co-occurrence counts, then AdaGrad for ``epochs`` passes.

    The vocabulary settings mean what they mean for word2vec: words seen fewer than ``min_count``
    times are dropped (before windows are measured), ``max_vocab`` keeps the most frequent.
    """
    _check_settings(dim=dim, window=window, min_count=min_count, epochs=epochs)
    if max_vocab is not None and max_vocab < 1:
        raise ConfigError(f"glove: max_vocab must be at least 1, not {max_vocab}")
    sentences = [s for s in sentences if s]
    tokens = sum(len(s) for s in sentences)
    if not sentences:
        raise DataError("glove: the corpus holds no words")
    start = time.perf_counter()
    words, counts = build_vocabulary(sentences, min_count=min_count, max_vocab=max_vocab)
    if not words:
        raise DataError(f"glove: no word occurs at least {min_count} times ({tokens:,} tokens)",
                        hint="lower --min-count or give a larger corpus")
    matrix = count_cooccurrences(sentences, {w: i for i, w in enumerate(words)}, window=window)
    count_seconds = time.perf_counter() - start
    log.info("glove: %s words, %s nonzero co-occurrence entries from %s tokens (%.1f s)", f"{len(words):,}",
             f"{matrix.nnz:,}", f"{tokens:,}", count_seconds)
    (w, w_ctx, b, b_ctx), losses = fit_glove(
        matrix, dim=dim, epochs=epochs, x_max=x_max, alpha=alpha, learning_rate=learning_rate,
        batch_size=batch_size, seed=seed, on_epoch=on_epoch)
    seconds = time.perf_counter() - start
    info = {"method": "glove", "window": window, "min_count": min_count, "max_vocab": max_vocab, "epochs": epochs,
            "x_max": x_max, "alpha": alpha, "learning_rate": learning_rate,
            "batch_size": batch_size or auto_batch_size(int(matrix.nnz)), "seed": seed, "sentences": len(sentences), "tokens": tokens, "cooccurrence_entries": int(matrix.nnz),
            "losses": [round(v, 6) for v in losses], "vectors": "w + w_context",
            "count_seconds": round(count_seconds, 3), "train_seconds": round(seconds, 3)}
    log.info("glove: %s words x %d dims from %s tokens in %.1f s", f"{len(words):,}", dim, f"{tokens:,}", seconds)
    return GloveFit(words=words, counts=counts, w=w, w_context=w_ctx, b=b, b_context=b_ctx, losses=losses, info=info)
