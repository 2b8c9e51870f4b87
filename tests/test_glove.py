"""GloVe: co-occurrence counts weighted 1/distance (exact, by hand), AdaGrad that equals entry-by-entry
updates at batch size 1, a loss that falls, co-occurring words closer than words that never co-occur,
the lmtune vectors folder (safetensors + JSON), the CLI, clean errors, and use by a neural baseline."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import lmtune.models.glove as glove
from lmtune.errors import ConfigError, DataError, LmtuneError
from lmtune.models.embeddings import WordVectors, load_vectors, train_from_source
from lmtune.models.glove import build_vocabulary, count_cooccurrences, fit_glove, train_glove

# ---------------------------------------------------------------------------------------- counting
TINY = [["the", "cat", "sat", "the"], ["cat", "zzz", "the"]]
INDEX = {"the": 0, "cat": 1, "sat": 2}  # zzz is outside the vocabulary: dropped before distances count


def test_cooccurrence_counts_by_hand() -> None:
    # window 2. Sentence 1: d=1 the-cat, cat-sat, sat-the; d=2 the-sat, cat-the (the..the is 3 apart).
    # Sentence 2 without zzz is "cat the": d=1 cat-the. Nothing crosses from sentence 1 into sentence 2.
    x = count_cooccurrences(TINY, INDEX, window=2).toarray()
    expected = np.zeros((3, 3))
    expected[0, 1] = 1 + 1 / 2 + 1  # the-cat: s1 d=1, s1 d=2 (cat..the), s2 d=1 after zzz is dropped
    expected[1, 2] = 1  # cat-sat
    expected[0, 2] = 1 + 1 / 2  # sat-the d=1, the-sat d=2
    expected += expected.T  # symmetric
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-12)
    # window 3 reaches the..the at distance 3: 1/3 each way on the diagonal
    wide = count_cooccurrences(TINY, INDEX, window=3).toarray()
    assert wide[0, 0] == pytest.approx(2 / 3)
    np.testing.assert_allclose(wide - np.diag(np.diag(wide)), expected, atol=1e-12)


def _brute_force(sentences: list[list[str]], index: dict[str, int], window: int) -> np.ndarray:
    x = np.zeros((len(index), len(index)))
    for sentence in sentences:
        ids = [index[w] for w in sentence if w in index]
        for p, a in enumerate(ids):
            for q in range(p + 1, min(p + window + 1, len(ids))):
                x[a, ids[q]] += 1 / (q - p)
                x[ids[q], a] += 1 / (q - p)
    return x


@pytest.mark.parametrize("window", [1, 3, 8])
def test_counts_equal_a_plain_loop_however_the_sentences_are_chunked(window: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(window)
    vocab = [f"w{i}" for i in range(30)]
    sentences = [[rng.choice(vocab) for _ in range(rng.randint(0, 15))] for _ in range(200)]
    words, counts = build_vocabulary(sentences, min_count=3)
    assert counts == sorted(counts, reverse=True) and min(counts) >= 3
    index = {w: i for i, w in enumerate(words)}
    whole = count_cooccurrences(sentences, index, window=window)
    assert isinstance(whole, sp.csr_matrix) and whole.shape == (len(words), len(words))
    np.testing.assert_allclose(whole.toarray(), _brute_force(sentences, index, window), atol=1e-9)
    monkeypatch.setattr(glove, "_PAIRS_PER_CHUNK", 10)  # a few sentences a chunk
    np.testing.assert_allclose(count_cooccurrences(sentences, index, window=window).toarray(), whole.toarray(),
                               atol=1e-9)


def test_vocabulary_keeps_frequent_words_first_and_honours_max_vocab() -> None:
    sentences = [["b", "a", "c", "a"], ["c", "a", "d"]]
    assert build_vocabulary(sentences) == (["a", "c", "b", "d"], [3, 2, 1, 1])  # ties: first seen
    assert build_vocabulary(sentences, min_count=2) == (["a", "c"], [3, 2])
    assert build_vocabulary(sentences, max_vocab=3) == (["a", "c", "b"], [3, 2, 1])


# ---------------------------------------------------------------------------------------- fitting
def test_batch_size_one_is_entry_by_entry_adagrad() -> None:
    """The vectorised step at batch size 1 equals the textbook per-entry update written out with numpy."""
    x = count_cooccurrences(TINY * 3, INDEX, window=3)
    dim, epochs, lr, seed = 4, 3, 0.1, 7
    (w, c, b, bc), losses = fit_glove(x, dim=dim, epochs=epochs, learning_rate=lr, batch_size=1, seed=seed)

    coo = sp.coo_matrix(x)
    rng = np.random.default_rng(seed)
    ref = [((rng.random(shape) - 0.5) / dim).astype(np.float32).astype(np.float64)
           for shape in ((3, dim), (3, dim), (3,), (3,))]
    sq = [np.ones_like(p) for p in ref]
    ref_losses = []
    for _ in range(epochs):
        total = 0.0
        for k in rng.permutation(coo.nnz):
            i, j, value = coo.row[k], coo.col[k], coo.data[k]
            diff = ref[0][i] @ ref[1][j] + ref[2][i] + ref[3][j] - np.log(value)
            fdiff = min(1.0, (value / 100) ** 0.75) * diff
            total += fdiff * diff
            grads = (fdiff * ref[1][j], fdiff * ref[0][i], fdiff, fdiff)
            for p, s, row, g in zip(ref, sq, (i, j, i, j), grads, strict=True):
                s[row] += g * g
                p[row] -= lr * g / np.sqrt(s[row])
        ref_losses.append(total / coo.nnz)
    for mine, theirs in zip((w, c, b, bc), ref, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)


RING = 40  # words w0..w39 on a circle; a sentence walks it in steps of 1 or 2


def _ring_corpus(sentences: int = 800, length: int = 10, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        p, words = rng.randrange(RING), []
        for _ in range(length):
            words.append(f"w{p}")
            p = (p + rng.choice((-2, -1, 1, 2))) % RING
        out.append(words)
    return out


@pytest.fixture(scope="module")
def ring_fit() -> glove.GloveFit:
    return train_glove(_ring_corpus(), dim=16, window=2, epochs=30, seed=1)


def test_loss_falls_and_parameters_move(ring_fit: glove.GloveFit) -> None:
    losses = ring_fit.losses
    assert len(losses) == 30 and losses[-1] < 0.1 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))  # every epoch lowers it here
    assert ring_fit.info["losses"] == [round(v, 6) for v in losses] and ring_fit.info["batch_size"] < 100
    start = (np.random.default_rng(1).random((RING, 16)) - 0.5) / 16  # fit_glove's first draw: w's start
    assert np.abs(ring_fit.w - start).max() > 0.5
    np.testing.assert_array_equal(ring_fit.vectors, ring_fit.w + ring_fit.w_context)


def test_co_occurring_words_end_up_closer_than_words_that_never_co_occur(ring_fit: glove.GloveFit) -> None:
    sentences = _ring_corpus()
    index = {w: i for i, w in enumerate(ring_fit.words)}
    x = count_cooccurrences(sentences, index, window=2).toarray()
    unit = ring_fit.vectors / np.linalg.norm(ring_fit.vectors, axis=1, keepdims=True)
    cos = unit @ unit.T  # (V, V)
    for i in range(RING):
        together = x[i] > 0
        together[i] = False
        never = x[i] == 0
        assert never.sum() >= 20 and together.sum() >= 4
        assert cos[i, together].mean() > cos[i, never].mean() + 0.3, ring_fit.words[i]
    # the nearest neighbours of a word are its neighbours on the circle
    vectors = WordVectors(ring_fit.words, ring_fit.vectors)
    for word in ("w0", "w17", "w33"):
        k = int(word[1:])
        ring_distance = [min((int(w[1:]) - k) % RING, (k - int(w[1:])) % RING) for w, _ in vectors.neighbors(word, 4)]
        assert max(ring_distance) <= 4, (word, ring_distance)


def test_same_seed_same_vectors_other_seed_other_vectors() -> None:
    sentences = _ring_corpus(200)
    first = train_glove(sentences, dim=8, window=2, epochs=3, seed=5)
    np.testing.assert_array_equal(first.vectors, train_glove(sentences, dim=8, window=2, epochs=3, seed=5).vectors)
    assert not np.allclose(first.vectors, train_glove(sentences, dim=8, window=2, epochs=3, seed=6).vectors)


# ---------------------------------------------------------------------------------------- folder, CLI, errors
def _write_corpus(path: Path, sentences: list[list[str]]) -> Path:
    path.write_text("\n".join(" ".join(s) for s in sentences) + "\n", encoding="utf-8")
    return path


def test_saved_glove_vectors_are_the_lmtune_folder_and_load_back(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "ring.txt", _ring_corpus(300))
    vectors = train_from_source(corpus, tmp_path / "vec", method="glove", dim=8, window=2, min_count=1, epochs=4)
    folder = tmp_path / "vec"
    assert sorted(p.name for p in folder.iterdir()) == ["embeddings.json", "vectors.safetensors", "vocab.json"]
    back = load_vectors(folder)  # the path the neural baselines read
    assert back.words == vectors.words and back.counts == vectors.counts and len(back) == RING
    np.testing.assert_array_equal(back.vectors, vectors.vectors)
    info = json.loads((folder / "embeddings.json").read_text())
    assert info["format"] == "lmtune-word-vectors" and info["method"] == "glove" and info["epochs"] == 4
    assert info["corpus"] == str(corpus) and info["tokens"] == 3000 and len(info["losses"]) == 4
    assert info["vectors"] == "w + w_context" and back.info == info


def test_cli_trains_glove_and_its_vectors_answer_queries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import run_cli

    corpus = _write_corpus(tmp_path / "ring.txt", _ring_corpus())
    out = tmp_path / "vec"
    args = ["embeddings", "train", str(corpus), "--method", "glove", "--dim", "16", "--window", "2",
            "--min-count", "1", "--max-vocab", "39", "--epochs", "30", "--seed", "1", "-o", str(out)]
    assert run_cli(args, monkeypatch) == 0
    shown = capsys.readouterr().out
    assert "glove epoch 1/30: loss" in shown and "glove epoch 30/30" in shown and "39 words x 16 dims (glove" in shown
    assert WordVectors.load(out).info["max_vocab"] == 39
    assert run_cli(["embeddings", "neighbors", str(out), "w10", "-k", "2"], monkeypatch) == 0
    near = capsys.readouterr().out
    assert sum(f"w{k}" in near for k in (8, 9, 11, 12)) == 2, near
    assert run_cli(["embeddings", "info", str(out)], monkeypatch) == 0
    assert "method: glove" in capsys.readouterr().out
    # max_vocab is GloVe's alone; an unknown method is refused before any work
    assert run_cli(["embeddings", "train", str(corpus), "--max-vocab", "5", "-o", str(tmp_path / "w")], monkeypatch) == 2
    assert "max_vocab applies to glove only" in capsys.readouterr().err
    assert run_cli(["embeddings", "train", str(corpus), "--method", "fasttext", "-o", str(tmp_path / "f")],
                   monkeypatch) == 2
    assert "cbow, skipgram or glove" in capsys.readouterr().err


BAD_INPUT = [
    ("empty corpus", "", {}, DataError, "holds no words"),
    ("rare words only", "a b c\nd e f\n", {"min_count": 2}, DataError, "no word occurs at least 2 times"),
    ("no pair in any window", "alpha\nbeta\nalpha\nbeta\n", {}, DataError, "no two vocabulary words occur"),
    ("dim 0", "a b a b\n", {"dim": 0}, ConfigError, "dim must be greater than 0"),
    ("negative window", "a b a b\n", {"window": -1}, ConfigError, "window must be greater than 0"),
    ("epochs 0", "a b a b\n", {"epochs": 0}, ConfigError, "epochs must be greater than 0"),
    ("max_vocab 0", "a b a b\n", {"max_vocab": 0}, ConfigError, "max_vocab must be at least 1"),
]


@pytest.mark.parametrize(("name", "text", "settings", "error", "message"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_a_clean_lmtune_error(tmp_path: Path, name: str, text: str, settings: dict[str, int],
                                           error: type[LmtuneError], message: str) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    with pytest.raises(error, match=message):
        train_from_source(corpus, tmp_path / "vec", method="glove", **{"min_count": 1, **settings})
    assert not (tmp_path / "vec").exists()  # nothing half-written


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import run_cli

    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    assert run_cli(["embeddings", "train", str(empty), "--method", "glove", "-o", str(tmp_path / "v")], monkeypatch) != 0
    err = capsys.readouterr().err
    assert "error: glove: the corpus holds no words" in err and "Traceback" not in err
    assert run_cli(["embeddings", "train", str(empty), "--method", "glove", "--dim", "0", "-o", str(tmp_path / "v")],
                   monkeypatch) == 2  # typer refuses it before anything runs


# ---------------------------------------------------------------------------------------- neural baselines
def test_a_neural_baseline_starts_from_glove_vectors_as_from_word2vec(sentiment_csv: Path, tmp_path: Path) -> None:
    import lmtune

    config = tmp_path / "corpus.yaml"
    config.write_text(f"task: classification\ndata:\n  train: {sentiment_csv}\n", encoding="utf-8")
    folder = tmp_path / "glove"
    train_from_source(config, folder, method="glove", dim=12, min_count=1, epochs=10)
    cfg = {
        "task": "classification", "model": "baseline:bilstm",
        "data": {"train": str(sentiment_csv), "max_length": 32},
        "baseline": {"embeddings": str(folder), "hidden_size": 16, "dropout": 0.1},
        "train": {"epochs": 4, "batch_size": 16, "learning_rate": 5e-3, "log_every": 5, "precision": "fp32"},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    emb = json.loads((run.model_dir / "lmtune.json").read_text())["embeddings"]
    assert emb["source"] == str(folder) and emb["dim"] == 12 and emb["vocabulary_coverage"] == 1.0
    assert run.metrics["test"]["accuracy"] >= 0.9
