"""Word embeddings: the shared word tokenizer, word2vec that learns co-occurrence, vector files read
in every supported format (and refused with file:line when malformed), the lmtune folder format and CLI."""

from __future__ import annotations

import gzip
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from lmtune.errors import DataError
from lmtune.models.embeddings import (
    WordVectors,
    build_word_tokenizer,
    detect_format,
    load_vectors,
    read_corpus,
    train_word2vec,
    word_tokenize,
)

TOKENIZE_CASES = [
    ("Great film, really!", ["great", "film", ",", "really", "!"]),
    ("很好看的电影", ["很", "好", "看", "的", "电", "影"]),
    ("MiniLM 很好!", ["minilm", "很", "好", "!"]),
    ("Café déjà-vu", ["café", "déjà", "-", "vu"]),  # accents kept
    ("ｆｕｌｌ　ｗｉｄｔｈ", ["full", "width"]),  # NFKC
    ("すごい映画", ["す", "ご", "い", "映", "画"]),
    ("หนังดี", ["ห", "น", "ั", "ง", "ด", "ี"]),
    ("", []),
]


@pytest.mark.parametrize(("text", "words"), TOKENIZE_CASES)
def test_word_tokenize(text: str, words: list[str]) -> None:
    assert word_tokenize(text) == words


def test_word_tokenize_can_keep_case_and_the_tokenizer_splits_the_same_way() -> None:
    assert word_tokenize("Great Film", lowercase=False) == ["Great", "Film"]
    texts = ["great film , great cast", "dull film 很好", "great"]
    tok = build_word_tokenizer(texts, min_count=2)
    # [PAD] [UNK] [SEP], then words by frequency (ties: first seen): great 3, film 2
    assert tok.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[SEP]", "great", "film"]
    assert tok("Great FILM, 很!")["input_ids"] == [3, 4, 1, 1, 1]
    assert tok("great", "film")["input_ids"] == [3, 2, 4]  # a pair: [SEP] between the texts
    assert tok.pad_token_id == 0 and tok.padding_side == "right"


# ---------------------------------------------------------------------------------------- word2vec
ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat"]
VEHICLES = ["car", "bus", "truck", "train", "bike", "tram"]
FILLER = ["the", "a", "and", "was", "with", "of", "on", "saw"]


def _topic_corpus(n: int, seed: int = 0) -> list[list[str]]:
    """Sentences drawing their content words from one topic only, plus shared filler words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = ANIMALS if rng.random() < 0.5 else VEHICLES
        words = rng.sample(topic, 3) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        out.append(words)
    return out


@pytest.mark.parametrize("method", ["cbow", "skipgram"])
def test_word2vec_puts_co_occurring_words_closer(method: str) -> None:
    vectors = train_word2vec(_topic_corpus(1500), method=method, dim=24, window=4, epochs=20, seed=1)  # type: ignore[arg-type]
    assert set(ANIMALS + VEHICLES) <= set(vectors.words) and vectors.dim == 24
    unit = {w: v / np.linalg.norm(v) for w, v in zip(vectors.words, vectors.vectors, strict=True)}
    for group, other in ((ANIMALS, VEHICLES), (VEHICLES, ANIMALS)):
        for word in group:
            same = np.mean([unit[word] @ unit[w] for w in group if w != word])
            cross = np.mean([unit[word] @ unit[w] for w in other])
            assert same > cross + 0.2, (word, same, cross)
    # the nearest content words of "cat" are animals
    near = [w for w, _ in vectors.neighbors("cat", k=12) if w not in FILLER][:4]
    assert set(near) <= set(ANIMALS), near
    assert vectors.info["method"] == method and vectors.info["tokens"] == 1500 * 6
    # same seed, one worker: the same vectors
    again = train_word2vec(_topic_corpus(1500), method=method, dim=24, window=4, epochs=20, seed=1)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.vectors, vectors.vectors)


def test_saved_vectors_are_safetensors_and_json_and_load_back(tmp_path: Path) -> None:
    vectors = train_word2vec(_topic_corpus(200), dim=8, epochs=2)
    folder = vectors.save(tmp_path / "vec")
    assert sorted(p.name for p in folder.iterdir()) == ["embeddings.json", "vectors.safetensors", "vocab.json"]
    back = load_vectors(folder)
    assert back.words == vectors.words and back.counts == vectors.counts
    np.testing.assert_array_equal(back.vectors, vectors.vectors)
    assert json.loads((folder / "embeddings.json").read_text())["format"] == "lmtune-word-vectors"
    assert detect_format(folder) == "lmtune"


# ---------------------------------------------------------------------------------------- pretrained files
WORDS = ["the", "Film", "great", "dull"]
VECS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def _word2vec_text(path: Path, header: bool = True) -> Path:
    lines = [f"{len(WORDS)} 3"] if header else []
    lines += [f"{w} " + " ".join(f"{x:g}" for x in v) for w, v in zip(WORDS, VECS, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _word2vec_binary(path: Path) -> Path:
    with path.open("wb") as f:
        f.write(f"{len(WORDS)} 3\n".encode())
        for w, v in zip(WORDS, VECS, strict=True):
            f.write(w.encode() + b" " + struct.pack("<3f", *v) + b"\n")
    return path


@pytest.mark.parametrize(("name", "writer", "kind"), [
    ("w2v.txt", _word2vec_text, "word2vec"),
    ("glove.txt", lambda p: _word2vec_text(p, header=False), "glove"),
    ("w2v.bin", _word2vec_binary, "word2vec_binary"),
])
def test_pretrained_formats_load(tmp_path: Path, name: str, writer, kind: str) -> None:
    path = writer(tmp_path / name)
    assert detect_format(path) == kind
    vectors = load_vectors(path)
    assert vectors.words == WORDS and vectors.info["source_format"] == kind
    np.testing.assert_allclose(vectors.vectors, VECS, rtol=1e-6)
    # only the wanted words (lower-cased forms match too), and lookups fall back to lower case
    some = load_vectors(path, keep={"film", "dull"})
    assert some.words == ["Film", "dull"]
    np.testing.assert_allclose(some.lookup("film"), VECS[1], rtol=1e-6)
    assert load_vectors(path, limit=2).words == WORDS[:2]


def test_gensim_written_files_load_the_same(tmp_path: Path) -> None:
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=3)
    kv.add_vectors(WORDS, VECS)
    for binary, name in ((False, "g.txt"), (True, "g.bin")):
        kv.save_word2vec_format(str(tmp_path / name), binary=binary)
        vectors = load_vectors(tmp_path / name)
        assert vectors.words == WORDS
        np.testing.assert_allclose(vectors.vectors, VECS, rtol=1e-6)


def test_compressed_glove_loads(tmp_path: Path) -> None:
    plain = _word2vec_text(tmp_path / "g.txt", header=False).read_bytes()
    path = tmp_path / "glove.6B.3d.txt.gz"
    path.write_bytes(gzip.compress(plain))
    assert load_vectors(path).words == WORDS


MALFORMED = [
    ("glove.txt", "the 0.1 0.2 0.3\nfilm 0.4 0.5\n", 2, "expected a word and 3 numbers"),
    ("glove.txt", "the 0.1 0.2 0.3\nfilm 0.4 zero 0.6\n", 2, "not a number: 'zero'"),
    ("w2v.txt", "3 2\nthe 0.1 0.2\nfilm 0.3 0.4\n", 1, "announces 3 vectors but the file holds 2"),
    ("w2v.txt", "3 2\nthe 0.1 0.2\nfilm 0.3\n", 3, "expected a word and 2 numbers"),
]


@pytest.mark.parametrize(("name", "text", "line", "message"), MALFORMED)
def test_malformed_text_files_name_file_and_line(tmp_path: Path, name: str, text: str, line: int,
                                                 message: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_vectors(path)
    assert err.value.line == line and message in err.value.message and err.value.file == str(path)


def test_malformed_binary_and_missing_files(tmp_path: Path) -> None:
    path = _word2vec_binary(tmp_path / "v.bin")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_vectors(path)
    (tmp_path / "bad.bin").write_bytes(b"hello world\n")
    with pytest.raises(DataError, match="header must be 'WORDS DIMS'"):
        load_vectors(tmp_path / "bad.bin")
    with pytest.raises(DataError, match="not found"):
        load_vectors(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="none of the wanted words"):
        load_vectors(_word2vec_text(tmp_path / "w.txt"), keep={"zebra"})


# ---------------------------------------------------------------------------------------- corpus and CLI
def test_corpus_from_a_config_reads_its_text_column(tmp_path: Path) -> None:
    from helpers import write_csv

    data = write_csv(tmp_path / "d.csv", [{"text": "Great film", "label": "pos"}, {"text": "很好", "label": "pos"}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: classification\ndata:\n  train: {data}\n", encoding="utf-8")
    sentences, info = read_corpus(cfg)
    assert sentences == [["great", "film"], ["很", "好"]] and info["corpus"] == str(data)


def test_cli_trains_and_queries_vectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import run_cli

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(s) for s in _topic_corpus(1500)) + "\n", encoding="utf-8")
    out = tmp_path / "vec"
    args = ["embeddings", "train", str(corpus), "--method", "skipgram", "--dim", "16", "--epochs", "20",
            "--min-count", "1", "--output", str(out)]
    assert run_cli(args, monkeypatch) == 0
    assert WordVectors.load(out).info["method"] == "skipgram"
    capsys.readouterr()
    assert run_cli(["embeddings", "neighbors", str(out), "truck", "-k", "3"], monkeypatch) == 0
    shown = capsys.readouterr().out
    assert "nearest to" in shown and sum(w in shown for w in VEHICLES if w != "truck") >= 2, shown
    assert run_cli(["embeddings", "info", str(out)], monkeypatch) == 0
    assert "skipgram" in capsys.readouterr().out
    assert run_cli(["embeddings", "neighbors", str(out), "zebra"], monkeypatch) == 2
    assert "'zebra' has no vector" in capsys.readouterr().err
    assert run_cli(["embeddings", "train", str(corpus), "--method", "fasttext", "-o", str(out)], monkeypatch) == 2
