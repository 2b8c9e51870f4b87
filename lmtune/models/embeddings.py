"""Word embeddings: a word tokenizer for any script, word2vec training, and pretrained vectors.

* :func:`word_tokenize` splits text into words with one rule set shared by word2vec training and the
  neural baselines' tokenizer (:func:`build_word_tokenizer`): Unicode NFKC, lower case (optional),
  whitespace and punctuation split, and every character of a script written without spaces
  (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar) as a word of its own. The rules are a
  ``tokenizers`` normalizer + pre-tokenizer, so the saved tokenizer of a baseline model splits text
  exactly as training did.
* :func:`train_word2vec` trains CBOW or skip-gram vectors with gensim; :func:`train_from_source` also
  trains GloVe (``lmtune.models.glove``: co-occurrence counts + AdaGrad), saved the same way.
* :func:`load_vectors` reads pretrained vectors in word2vec text, word2vec binary and GloVe text format
  (optionally gzip/bz2/xz compressed) with errors that name the file and line; nothing is unpickled.
* :class:`WordVectors` saves as ``vectors.safetensors`` + ``vocab.json`` + ``embeddings.json`` (never
  gensim's pickle) and answers nearest-neighbour queries.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import json
import logging
import lzma
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from lmtune.config import load_config
from lmtune.data.pii import read_data_table
from lmtune.errors import ConfigError, DataError
from lmtune.models.glove import EpochCallback, train_glove

log = logging.getLogger(__name__)

FORMAT_NAME = "lmtune-word-vectors"
FORMAT_VERSION = 1
VECTORS_FILE = "vectors.safetensors"
VOCAB_FILE = "vocab.json"
INFO_FILE = "embeddings.json"

PAD, UNK, SEP = "[PAD]", "[UNK]", "[SEP]"
# Scripts written without spaces between words: each character becomes a token (Han characters are
# split by the normalizer already; listing them again keeps the rule explicit).
_SPACELESS = (
    "[\u3040-\u30ff\u31f0-\u31ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\u0e00-\u0e7f\u0e80-\u0eff"  # Thai, Lao
    "\u1780-\u17ff\u1000-\u109f]"  # Khmer, Myanmar
)
Method = Literal["cbow", "skipgram", "glove"]
METHODS: tuple[str, ...] = ("cbow", "skipgram", "glove")
# Passes over the corpus when none are given: gensim's default for word2vec; GloVe's AdaGrad needs more
# (the paper ran 50-100, the reference demo 15; 25 measured in BENCHMARKS.md).
DEFAULT_EPOCHS: dict[str, int] = {"cbow": 5, "skipgram": 5, "glove": 25}


# ------------------------------------------------------------------------------------------ words
@functools.lru_cache(maxsize=4)
def word_pipeline(lowercase: bool = True) -> tuple[Any, Any]:
    """The ``tokenizers`` normalizer and pre-tokenizer that define what a word is."""
    normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        # Control characters removed, spaces put around CJK ideographs; accents kept (strip_accents
        # would otherwise follow `lowercase` and fold "café" into "cafe").
        normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                   lowercase=lowercase),
    ])
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.BertPreTokenizer(),  # whitespace, and each punctuation character alone
        pre_tokenizers.Split(Regex(_SPACELESS), behavior="isolated"),
    ])
    return normalizer, pre_tokenizer


def word_tokenize(text: str, *, lowercase: bool = True) -> list[str]:
    """Words of ``text``: ``"Great film, 很好!"`` -> ``["great", "film", ",", "很", "好", "!"]``."""
    normalizer, pre_tokenizer = word_pipeline(lowercase)
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def build_word_tokenizer(texts: Iterable[str], *, min_count: int = 1, max_vocab: int | None = None,
                         lowercase: bool = True, max_length: int = 512) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is the words of ``texts``.

    Ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[SEP]`` 2 (between the two texts of a pair), then words by
    falling frequency (ties in order of first appearance), keeping those seen ``min_count`` times,
    at most ``max_vocab`` of them. Other words map to ``[UNK]``. It pads on the right, adds no other
    special tokens, and saves as a plain ``tokenizer.json`` that ``AutoTokenizer`` loads.
    """
    counts = Counter(word for text in texts for word in word_tokenize(text, lowercase=lowercase))
    words = [w for w, c in counts.most_common() if c >= min_count and w not in (PAD, UNK, SEP)]
    if max_vocab is not None:
        words = words[:max_vocab]
    vocab = {PAD: 0, UNK: 1, SEP: 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer, backend.pre_tokenizer = word_pipeline(lowercase)
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A [SEP] $B",
                                                           special_tokens=[(SEP, 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, sep_token=SEP, model_max_length=max_length,
        padding_side="right", model_input_names=["input_ids", "attention_mask"],
    )
    log.info("word vocabulary: %s words (min count %d) of %s distinct, from %s tokens", f"{len(words):,}",
             min_count, f"{len(counts):,}", f"{sum(counts.values()):,}")
    return tokenizer


# ------------------------------------------------------------------------------------------ vectors
@dataclass
class WordVectors:
    """Words and their vectors: ``vectors[i]`` (float32, (V, D)) belongs to ``words[i]``."""

    words: list[str]
    vectors: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    counts: list[int] | None = None

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise ValueError(f"{len(self.words)} words but vectors of shape {self.vectors.shape}")
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self._index: dict[str, int] | None = None
        self._lower: dict[str, int] | None = None
        self._unit: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.words)

    @property
    def dim(self) -> int:
        """Vector size D."""
        return int(self.vectors.shape[1])

    @property
    def index(self) -> dict[str, int]:
        """Word -> row (the first row where a word occurs twice)."""
        if self._index is None:
            self._index = {}
            for i, w in enumerate(self.words):
                self._index.setdefault(w, i)
        return self._index

    def _row(self, word: str) -> int | None:
        """The row of ``word``: exact match first, then case-insensitive (the first such word in the file)."""
        i = self.index.get(word)
        if i is not None:
            return i
        if self._lower is None:
            self._lower = {}
            for j, w in enumerate(self.words):
                self._lower.setdefault(w.lower(), j)
        return self._lower.get(word.lower())

    def lookup(self, word: str) -> np.ndarray | None:
        """The word's vector (matched exactly, else ignoring case), or None."""
        i = self._row(word)
        return None if i is None else self.vectors[i]

    def neighbors(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` words of highest cosine similarity to ``word`` (itself excluded)."""
        i = self._row(word)
        if i is None:
            raise DataError(f"'{word}' has no vector ({len(self):,} words known)",
                            hint="words are matched as the tokenizer writes them (lower case by default)")
        if self._unit is None:
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._unit = self.vectors / np.maximum(norms, 1e-12)  # (V, D)
        sims = self._unit @ self._unit[i]  # (V,)
        sims[i] = -np.inf
        k = max(0, min(k, len(self) - 1))
        top = np.argpartition(-sims, k - 1)[:k] if k else np.array([], dtype=np.int64)
        top = top[np.argsort(-sims[top], kind="stable")]
        return [(self.words[j], float(sims[j])) for j in top]

    def save(self, folder: str | Path) -> Path:
        """Write ``vectors.safetensors`` (tensor ``vectors``), ``vocab.json`` and ``embeddings.json``."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"vectors": self.vectors}, str(out / VECTORS_FILE))
        vocab: dict[str, Any] = {"words": self.words}
        if self.counts is not None:
            vocab["counts"] = self.counts
        (out / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "words": len(self), "dim": self.dim, **self.info}
        (out / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> WordVectors:
        """Read a folder written by :meth:`save`."""
        path = Path(folder)
        for name in (VECTORS_FILE, VOCAB_FILE):
            if not (path / name).is_file():
                raise DataError(f"not a word-vectors folder: {name} is missing", file=path,
                                hint="make one with `lmtune embeddings train`")
        try:
            vocab = json.loads((path / VOCAB_FILE).read_text(encoding="utf-8"))
            info = json.loads((path / INFO_FILE).read_text(encoding="utf-8")) if (path / INFO_FILE).is_file() else {}
            vectors = load_file(str(path / VECTORS_FILE))["vectors"]
        except (ValueError, KeyError, SafetensorError) as exc:
            raise DataError(f"unreadable word-vectors folder: {exc}", file=path) from None
        words = vocab.get("words") if isinstance(vocab, dict) else None
        if not isinstance(words, list) or len(words) != len(vectors):
            raise DataError(f"{VOCAB_FILE} lists {len(words or [])} words for {len(vectors)} vectors", file=path)
        return cls(words=[str(w) for w in words], vectors=vectors, info=info, counts=vocab.get("counts"))


# ------------------------------------------------------------------------------------------ word2vec
def train_word2vec(
    sentences: list[list[str]], *, method: Method = "cbow", dim: int = 100, window: int = 5, min_count: int = 1,
    epochs: int = 5, negative: int = 5, seed: int = 0, workers: int = 1,
) -> WordVectors:
    """CBOW or skip-gram vectors (gensim) for the words of tokenised ``sentences``.

    One worker thread by default: gensim's result then depends only on the data and ``seed``.
    """
    if method not in ("cbow", "skipgram"):
        raise ConfigError(f"word2vec method must be cbow or skipgram, not '{method}'")
    sentences = [s for s in sentences if s]
    tokens = sum(len(s) for s in sentences)
    if not sentences:
        raise DataError("word2vec: the corpus holds no words")
    from gensim.models import Word2Vec  # noqa: PLC0415  (~70 MB: loaded only when word2vec vectors are trained)

    start = time.perf_counter()
    try:
        model = Word2Vec(sentences=sentences, vector_size=dim, window=window, min_count=min_count,
                         sg=int(method == "skipgram"), epochs=epochs, negative=negative, seed=seed, workers=workers)
    except RuntimeError as exc:  # "you must first build vocabulary": nothing reached min_count
        raise DataError(f"word2vec: no word occurs at least {min_count} times ({tokens:,} tokens)",
                        hint="lower --min-count or give a larger corpus") from exc
    seconds = time.perf_counter() - start
    wv = model.wv
    words = list(wv.index_to_key)
    info = {"method": method, "window": window, "min_count": min_count, "epochs": epochs, "negative": negative,
            "seed": seed, "sentences": len(sentences), "tokens": tokens, "train_seconds": round(seconds, 3)}
    log.info("word2vec %s: %s words x %d dims from %s tokens in %.1f s", method, f"{len(words):,}", dim,
             f"{tokens:,}", seconds)
    return WordVectors(words=words, vectors=np.asarray(wv.vectors), info=info,
                       counts=[int(wv.get_vecattr(w, "count")) for w in words])


def read_corpus(source: str | Path, *, lowercase: bool = True) -> tuple[list[list[str]], dict[str, Any]]:
    """Tokenised sentences of a corpus: a text file (one sentence per line) or a run config (YAML).

    A config gives the text column (and text pair column) of every row of its ``data.train``; labels
    are not read.
    """
    path = Path(source)
    if not path.is_file():
        raise DataError("corpus file not found", file=path)
    if path.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(path)
        table = read_data_table(cfg.data.train, cfg.data)
        columns = [c for c in (cfg.data.text_column, cfg.data.text_pair_column) if c]
        texts = [str(v) for c in columns for v in table.column(c) if isinstance(v, str) and v.strip()]
        source_info = {"corpus": str(cfg.data.train), "config": str(path), "columns": columns}
    else:
        with _open_binary(path) as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(f"not UTF-8 text (byte {exc.start})", file=path, line=line) from None
        texts = [line for line in text.splitlines() if line.strip()]
        source_info = {"corpus": str(path)}
    sentences = [word_tokenize(t, lowercase=lowercase) for t in texts]
    return sentences, {**source_info, "lowercase": lowercase}


# ------------------------------------------------------------------------------------------ loading
VectorFormat = Literal["auto", "lmtune", "word2vec", "word2vec_binary", "glove"]


def _open_binary(path: Path) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]  # a GzipFile reads bytes
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    return path.open("rb")


def detect_format(path: Path) -> str:
    """``lmtune`` for a folder, ``word2vec_binary`` for ``.bin``, else ``word2vec`` (a "V D" header) or ``glove``."""
    if path.is_dir():
        return "lmtune"
    stem = path.name.lower()
    for suffix in (".gz", ".bz2", ".xz"):
        stem = stem.removesuffix(suffix)
    if stem.endswith(".bin"):
        return "word2vec_binary"
    with _open_binary(path) as f:
        first = f.readline(4096).split()
    return "word2vec" if len(first) == 2 and all(p.isdigit() for p in first) else "glove"


def load_vectors(source: str | Path, *, format: VectorFormat = "auto", keep: set[str] | None = None,
                 limit: int | None = None) -> WordVectors:
    """Pretrained vectors from a file or an lmtune vectors folder.

    ``keep``: read only these words (and their lower-cased forms), which saves memory on big files.
    ``limit``: read at most this many vectors from the top of the file (files list frequent words first).
    Malformed lines raise :class:`DataError` with the file and line number.
    """
    path = Path(source)
    if not path.exists():
        raise DataError("word vectors not found", file=path,
                        hint="give a word2vec (.txt/.bin) or GloVe (.txt) file, or a folder from `lmtune embeddings train`")
    kind = detect_format(path) if format == "auto" else format
    if kind == "lmtune":
        vectors = WordVectors.load(path)
        if keep is not None:
            picked = [i for i, w in enumerate(vectors.words) if w in keep or w.lower() in keep]
            vectors = WordVectors([vectors.words[i] for i in picked], vectors.vectors[picked], vectors.info)
        return vectors
    if kind == "word2vec_binary":
        words, rows = _read_binary(path, keep, limit)
    elif kind in ("word2vec", "glove"):
        words, rows = _read_text(path, kind == "word2vec", keep, limit)
    else:
        raise ConfigError(f"unknown vector format '{format}'; choose auto, lmtune, word2vec, word2vec_binary, glove")
    if not rows:
        what = "none of the wanted words" if keep is not None else "no vectors"
        raise DataError(f"the {kind} file holds {what}", file=path)
    return WordVectors(words=words, vectors=np.stack(rows), info={"source": str(path), "source_format": kind})


def _wanted(word: str, keep: set[str] | None) -> bool:
    return keep is None or word in keep or word.lower() in keep


def _read_text(path: Path, header: bool, keep: set[str] | None, limit: int | None) -> tuple[list[str], list[np.ndarray]]:
    """word2vec text ("V D" first, then "word x1 .. xD") or GloVe ("word x1 .. xD" from the first line)."""
    words: list[str] = []
    rows: list[np.ndarray] = []
    dim: int | None = None
    expected: int | None = None
    entries = 0
    with _open_binary(path) as f:
        for number, raw in enumerate(_lines(f), start=1):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if number == 1 and header:
                parts = text.split()
                if len(parts) != 2 or not all(p.isdigit() for p in parts):
                    raise DataError(f"word2vec text header must be 'WORDS DIMS', found {text[:60]!r}", file=path,
                                    line=1, hint="a file without a header is GloVe format: --format glove")
                expected, dim = int(parts[0]), int(parts[1])
                continue
            if not text.strip():
                continue
            parts = text.rstrip().split(" ")
            if dim is None:  # GloVe: the first line decides the size
                dim = len(parts) - 1
                if dim < 1:
                    raise DataError("a line needs a word and at least one number", file=path, line=number)
            if len(parts) < dim + 1:
                raise DataError(f"expected a word and {dim} numbers, found {len(parts)} field(s)",
                                file=path, line=number)
            entries += 1
            # Some files hold words with spaces: the last `dim` fields are the vector.
            word = " ".join(parts[: len(parts) - dim])
            if _wanted(word, keep):
                try:
                    rows.append(np.asarray(parts[len(parts) - dim :], dtype=np.float32))
                except ValueError:
                    bad = next(p for p in parts[len(parts) - dim :] if not _is_float(p))
                    raise DataError(f"not a number: {bad[:30]!r} (word {word[:30]!r})", file=path,
                                    line=number) from None
                words.append(word)
            if limit is not None and entries >= limit:
                return words, rows
    if header and expected is not None and entries != expected:
        raise DataError(f"the header announces {expected:,} vectors but the file holds {entries:,}", file=path,
                        line=1, hint="the file may be truncated")
    return words, rows


def _lines(f: IO[bytes]) -> Iterator[bytes]:
    yield from f


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_binary(path: Path, keep: set[str] | None, limit: int | None) -> tuple[list[str], list[np.ndarray]]:
    """word2vec binary: an ASCII "V D" line, then per word: the word, a space, D little-endian float32."""
    words: list[str] = []
    rows: list[np.ndarray] = []
    with _open_binary(path) as f:
        header = f.readline().split()
        if len(header) != 2 or not all(p.isdigit() for p in header):
            raise DataError(f"word2vec binary header must be 'WORDS DIMS', found {b' '.join(header)[:60]!r}",
                            file=path, line=1, hint="for a text file use --format word2vec or glove")
        count, dim = int(header[0]), int(header[1])
        size = 4 * dim
        for entry in range(1, count + 1):
            word_bytes = bytearray()
            while True:
                ch = f.read(1)
                if not ch:
                    raise DataError(f"file ends inside entry {entry:,} of {count:,} (truncated?)", file=path)
                if ch == b" ":
                    break
                if ch != b"\n" or word_bytes:  # a newline may end the previous vector
                    word_bytes += ch
                if len(word_bytes) > 10_000:
                    raise DataError(f"entry {entry:,}: no space after the word within 10,000 bytes; "
                                    "this is not word2vec binary", file=path)
            data = f.read(size)
            if len(data) != size:
                raise DataError(f"file ends inside the vector of entry {entry:,} of {count:,} (truncated?)",
                                file=path)
            word = word_bytes.decode("utf-8", errors="replace")
            if _wanted(word, keep):
                words.append(word)
                rows.append(np.frombuffer(data, dtype="<f4").astype(np.float32))
            if limit is not None and entry >= limit:
                break
    return words, rows


def embedding_matrix(vectors: WordVectors, vocab: list[str], *, std: float | None = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows for ``vocab`` taken from ``vectors`` (exact word, else its lower case); others random.

    Returns the (V, D) matrix and a (V,) boolean array of which rows were found. Words without a
    vector get normal noise of the found vectors' standard deviation (or ``std``).
    """
    found = np.zeros(len(vocab), dtype=bool)
    rng = np.random.default_rng(seed)
    scale = std if std is not None else float(vectors.vectors.std()) or 0.1
    matrix = rng.normal(0.0, scale, size=(len(vocab), vectors.dim)).astype(np.float32)
    for i, word in enumerate(vocab):
        vec = vectors.lookup(word)
        if vec is not None:
            matrix[i] = vec
            found[i] = True
    return matrix, found


# ------------------------------------------------------------------------------------------ commands
def train_from_source(source: str | Path, output: str | Path, *, method: Method = "cbow", dim: int = 100,
                      window: int = 5, min_count: int = 2, epochs: int | None = None, seed: int = 0,
                      lowercase: bool = True, max_vocab: int | None = None,
                      on_epoch: EpochCallback | None = None) -> WordVectors:
    """``lmtune embeddings train``: word2vec or GloVe on a corpus file or a config's training data, saved to ``output``.

    ``epochs`` None: the method's default (:data:`DEFAULT_EPOCHS`). ``max_vocab`` (GloVe only) keeps the
    most frequent words; ``on_epoch`` (GloVe only) hears each epoch's loss.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown embeddings method '{method}'; choose {', '.join(METHODS)}")
    if max_vocab is not None and method != "glove":
        raise ConfigError("max_vocab applies to glove only; word2vec keeps every word seen min_count times",
                          hint="drop --max-vocab, or raise --min-count to keep fewer words")
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not (out / INFO_FILE).is_file():
        raise DataError("output folder is not empty and holds no word vectors; refusing to overwrite it", file=out)
    passes = DEFAULT_EPOCHS[method] if epochs is None else epochs
    sentences, source_info = read_corpus(source, lowercase=lowercase)
    if method == "glove":
        fit = train_glove(sentences, dim=dim, window=window, min_count=min_count, max_vocab=max_vocab,
                          epochs=passes, seed=seed, on_epoch=on_epoch)
        vectors = WordVectors(words=fit.words, vectors=fit.vectors, info=fit.info, counts=fit.counts)
    else:
        vectors = train_word2vec(sentences, method=method, dim=dim, window=window, min_count=min_count,
                                 epochs=passes, seed=seed)
    vectors.info.update(source_info)
    vectors.save(out)
    return vectors


def open_vectors(source: str | Path) -> WordVectors:
    """A saved vectors folder, or a pretrained file in any supported format (for neighbors/info)."""
    return load_vectors(source)


def describe(vectors: WordVectors) -> dict[str, Any]:
    """Facts for ``lmtune embeddings info``: size, training settings, the most frequent words."""
    norms = np.linalg.norm(vectors.vectors, axis=1)
    return {
        "words": len(vectors), "dim": vectors.dim,
        "mean_norm": float(norms.mean()) if len(norms) else 0.0,
        **{k: v for k, v in vectors.info.items() if k not in ("format", "version", "words", "dim")},
        "first_words": vectors.words[:20],
    }
