"""GloVe against word2vec (CBOW, skip-gram) on the same bundled corpora, with lmtune's own trainers.

Two measurements, every method with the same tokenisation, vocabulary (min count), vector size and window:

1. **Word similarity** on the six Jane Austen novels (bundled ``janeausten``, one sentence per
   paragraph, 876k words): Spearman correlation between the vectors' cosine and human judgements on
   WordSim-353 and SimLex-999, and accuracy on the Google analogy questions, all from the copies that ship
   in gensim's test data and scored with gensim's ``evaluate_word_pairs`` / ``evaluate_word_analogies``
   (pairs with a word outside the vocabulary are skipped; the methods share one vocabulary, so they are
   scored on the same pairs).
2. **Downstream accuracy** on Rotten Tomatoes (bundled ``rotten_tomatoes``, 12,808 snippets): a seeded
   80/20 split; vectors trained on the training snippets only; each snippet is the mean of its words'
   vectors; a logistic regression (scikit-learn) trained on the training part, accuracy on the rest.
   Random vectors of the same size give the floor.

    python benchmarks/bench_embeddings.py                   # one seed, about 3 minutes with --threads 1
    python benchmarks/bench_embeddings.py --seeds 0 1 2 --out embeddings.json

Run it with ``OMP_NUM_THREADS=1`` (or ``--threads 1``) on a shared machine; gensim uses one worker thread,
so its vectors depend only on the data and the seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def _tokenised_austen() -> list[list[str]]:
    from lmtune.data.bundled import resolve_bundled_data
    from lmtune.models.embeddings import word_tokenize

    path = resolve_bundled_data("janeausten")
    with path.open(encoding="utf-8") as f:
        return [word_tokenize(json.loads(line)["text"]) for line in f if line.strip()]


def _reviews(seed: int) -> tuple[list[str], list[int], list[str], list[int]]:
    """Rotten Tomatoes snippets, deduplicated, in a seeded 80/20 split: train texts/labels, test texts/labels."""
    from lmtune.data.bundled import resolve_bundled_data

    with resolve_bundled_data("rotten_tomatoes").open(encoding="utf-8", newline="") as f:
        rows = {(r["text"], r["label"]) for r in csv.DictReader(f)}
    data = sorted(rows)
    random.Random(seed).shuffle(data)
    cut = int(0.8 * len(data))
    labels = sorted({label for _, label in data})
    train, test = data[:cut], data[cut:]
    return ([t for t, _ in train], [labels.index(y) for _, y in train],
            [t for t, _ in test], [labels.index(y) for _, y in test])


def _train(method: str, sentences: list[list[str]], args: argparse.Namespace, seed: int) -> Any:
    from lmtune.models.embeddings import WordVectors, train_word2vec
    from lmtune.models.glove import train_glove

    if method == "glove":
        fit = train_glove(sentences, dim=args.dim, window=args.window, min_count=args.min_count,
                          epochs=args.glove_epochs, seed=seed)
        return WordVectors(fit.words, fit.vectors, fit.info, fit.counts)
    return train_word2vec(sentences, method=method, dim=args.dim, window=args.window,  # type: ignore[arg-type]
                          min_count=args.min_count, epochs=args.w2v_epochs, seed=seed)


def _keyed(vectors: Any) -> Any:
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=vectors.dim)
    kv.add_vectors(vectors.words, vectors.vectors)
    return kv


def similarity_scores(vectors: Any) -> dict[str, float]:
    """WordSim-353 and SimLex-999 Spearman, Google analogy accuracy (gensim's test data and scorers)."""
    from gensim.test.utils import datapath

    kv = _keyed(vectors)
    out: dict[str, float] = {}
    for name, file in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt")):
        _, spearman, oov = kv.evaluate_word_pairs(datapath(file), case_insensitive=True)
        out[f"{name}_spearman"] = float(spearman.statistic)
        out[f"{name}_pairs_oov_percent"] = float(oov)
    accuracy, sections = kv.evaluate_word_analogies(datapath("questions-words.txt"), case_insensitive=True)
    total = next(s for s in sections if s["section"] == "Total accuracy")
    out["analogy_accuracy"] = float(accuracy)
    out["analogy_questions"] = len(total["correct"]) + len(total["incorrect"])
    return out


def downstream_accuracy(vectors: Any, train: tuple[list[str], list[int]], test: tuple[list[str], list[int]],
                        seed: int) -> float:
    """Logistic regression on mean word vectors: accuracy on the held-out snippets."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from lmtune.models.embeddings import word_tokenize

    def features(texts: list[str]) -> np.ndarray:
        rows = np.zeros((len(texts), vectors.dim), dtype=np.float32)  # (N, D)
        index = vectors.index
        for n, text in enumerate(texts):
            ids = [index[w] for w in word_tokenize(text) if w in index]
            if ids:
                rows[n] = vectors.vectors[ids].mean(0)
        return rows

    scaler = StandardScaler().fit(features(train[0]))
    model = LogisticRegression(max_iter=2000, random_state=seed)
    model.fit(scaler.transform(features(train[0])), train[1])
    return float(model.score(scaler.transform(features(test[0])), test[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["cbow", "skipgram", "glove"])
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--w2v-epochs", type=int, default=5, help="word2vec passes (lmtune's default)")
    parser.add_argument("--glove-epochs", type=int, default=25, help="GloVe passes (lmtune's default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (GloVe)")
    parser.add_argument("--skip", choices=["similarity", "downstream"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON with every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    runs: list[dict[str, Any]] = []
    austen = _tokenised_austen() if args.skip != "similarity" else []
    for seed in args.seeds:
        reviews = _reviews(seed) if args.skip != "downstream" else None
        review_sentences = []
        if reviews is not None:
            from lmtune.models.embeddings import word_tokenize

            review_sentences = [word_tokenize(t) for t in reviews[0]]
        for method in [*args.methods, "random"]:
            row: dict[str, Any] = {"method": method, "seed": seed}
            if austen and method != "random":
                start = time.perf_counter()
                vectors = _train(method, austen, args, seed)
                row["austen_train_seconds"] = round(time.perf_counter() - start, 1)
                row["austen_words"] = len(vectors)
                row.update(similarity_scores(vectors))
            if reviews is not None:
                if method == "random":
                    from lmtune.models.embeddings import WordVectors

                    base = _train(args.methods[0], review_sentences, args, seed)
                    noise = np.random.default_rng(seed).normal(size=base.vectors.shape).astype(np.float32)
                    vectors = WordVectors(base.words, noise)
                else:
                    vectors = _train(method, review_sentences, args, seed)
                row["reviews_accuracy"] = downstream_accuracy(vectors, (reviews[0], reviews[1]),
                                                              (reviews[2], reviews[3]), seed)
            runs.append(row)
            print(json.dumps(row), flush=True)

    keys = ["wordsim353_spearman", "simlex999_spearman", "analogy_accuracy", "reviews_accuracy",
            "austen_train_seconds"]
    print(f"\n{len(args.seeds)} seed(s); dim {args.dim}, window {args.window}, min count {args.min_count}, "
          f"word2vec {args.w2v_epochs} epochs, GloVe {args.glove_epochs} epochs")
    print("| method | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for method in [*args.methods, "random"]:
        cells = []
        for key in keys:
            values = [r[key] for r in runs if r["method"] == method and key in r]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "machine": platform.platform(), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
