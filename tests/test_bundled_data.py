"""The bundled chat and language-model data sets: real conversions of the installed packages' files."""

from __future__ import annotations

import bz2
import dataclasses
import importlib.util
import json
import lzma
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtune.data.bundled import BUNDLED_DATA, list_datasets, resolve_bundled_data
from lmtune.data.chatterbot import CHATTERBOT_LANGUAGES, chatterbot_records
from lmtune.data.janeausten import JANEAUSTENR_ENV, _decompress_lazyload, austen_paragraphs
from lmtune.data.readers import read_table
from lmtune.errors import DataError

# Conversations per language in chatterbot-corpus 1.3.3, after the rules in chatterbot_records.
CHATTERBOT_COUNTS = {
    "bengali": 113, "chinese": 467, "dutch": 314, "english": 2025, "french": 89, "german": 113,
    "hebrew": 49, "hindi": 52, "hinglish": 31, "indonesian": 163, "italian": 562, "japanese": 568,
    "korean": 454, "marathi": 33, "oriya": 44, "persian": 773, "portuguese": 321, "russian": 43,
    "spanish": 280, "swedish": 43, "tamil": 31, "telugu": 9, "thai": 6, "traditionalchinese": 456,
    "turkish": 93, "ukrainian": 456, "urdu": 15, "yoruba": 31,
}  # fmt: skip
# Paragraphs per novel in r-cran-janeaustenr 1.0.0, in publication order.
AUSTEN_COUNTS = {
    "Sense and Sensibility": 1809,
    "Pride and Prejudice": 2057,
    "Mansfield Park": 1789,
    "Emma": 2315,
    "Northanger Abbey": 1018,
    "Persuasion": 1006,
}


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMTUNE_CACHE", str(root))
    return root


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _dataset_name(language: str) -> str:
    return "chatterbot" if language == "english" else f"chatterbot_{language}"


def _chatterbot_data() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    assert spec is not None and spec.submodule_search_locations, "chatterbot-corpus is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _check_conversation(record: dict[str, Any]) -> None:
    messages = record["messages"]
    assert len(messages) >= 2 and len(messages) % 2 == 0
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert all(isinstance(m["content"], str) and m["content"] == m["content"].strip() != "" for m in messages)
    assert isinstance(record["topic"], str) and record["topic"]


# --- chatterbot --------------------------------------------------------------------------------------


def test_chatterbot_languages_are_the_package_folders() -> None:
    folders = sorted(p.name for p in _chatterbot_data().iterdir() if p.is_dir() and p.name != "__pycache__")
    assert list(CHATTERBOT_LANGUAGES) == folders and len(folders) == 28
    for language in folders:
        dataset = BUNDLED_DATA[_dataset_name(language)]
        assert (dataset.task, dataset.columns, dataset.suffix) == ("sft", ("messages", "topic"), ".jsonl")


def test_chatterbot_english(cache: Path) -> None:
    path = resolve_bundled_data("chatterbot")
    assert path == cache / "data" / "chatterbot.jsonl"
    records = _read_jsonl(path)
    assert len(records) == CHATTERBOT_COUNTS["english"]
    for record in records:
        assert set(record) == {"messages", "topic"}
        _check_conversation(record)
    # Files in sorted order: ai.yml first; its first category is the topic.
    assert records[0] == {
        "messages": [
            {"role": "user", "content": "What is AI?"},
            {
                "role": "assistant",
                "content": "Artificial Intelligence is the branch of engineering and science devoted to "
                "constructing machines that think.",
            },
        ],
        "topic": "AI",
    }
    topics = Counter(r["topic"] for r in records)
    assert len(topics) == 21 and {"greetings", "humor", "science", "trivia"} <= set(topics)
    turns = Counter(len(r["messages"]) for r in records)
    assert turns[2] == 1957 and max(turns) == 26  # mostly question-answer pairs, some multi-turn

    # The readers take it as JSON Lines with the messages lists intact.
    table = read_table("bundled:chatterbot")
    assert table.columns == ["messages", "topic"] and len(table) == len(records)
    assert table.rows[0]["messages"][0]["role"] == "user"


def test_chatterbot_file_is_reused(cache: Path) -> None:
    path = resolve_bundled_data("chatterbot_spanish")
    mtime = path.stat().st_mtime_ns
    assert resolve_bundled_data("chatterbot_spanish") == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == ["chatterbot_spanish.jsonl"]  # no temporary file left


@pytest.mark.parametrize("language", [lang for lang in CHATTERBOT_LANGUAGES if lang != "english"])
def test_chatterbot_other_languages(cache: Path, language: str) -> None:
    records = _read_jsonl(resolve_bundled_data(_dataset_name(language)))
    assert len(records) == CHATTERBOT_COUNTS[language]
    for record in records:
        _check_conversation(record)


def test_chatterbot_counts_what_it_skips() -> None:
    """Mis-indented YAML in the package reads as one string per conversation: skipped and counted."""
    skipped: Counter[str] = Counter()
    assert sum(1 for _ in chatterbot_records(_chatterbot_data() / "english", skipped)) == 2025
    assert skipped == {"conversation not a list": 1}  # trivia.yml: 'In a game of bingo, ... - '22''
    skipped.clear()
    assert sum(1 for _ in chatterbot_records(_chatterbot_data() / "ukrainian", skipped)) == 456
    assert skipped == {"conversation not a list": 7, "conversation of fewer than 2 turns": 2}


def test_chatterbot_quirks(tmp_path: Path) -> None:
    (tmp_path / "b_numbers.yml").write_text(
        "categories: [numbers]\n"
        "conversations:\n"
        "- - What is six times seven?\n  - 42\n"  # an int answer is stringified
        "- - Is it true?\n  - yes\n  - Really?\n"  # YAML 1.1 reads yes as a bool; the unanswered turn goes
        "- - Only a question\n"  # fewer than 2 turns
        "- What? - nothing\n"  # not a list (mis-indented)
        "- - '  padded  '\n  - ''\n  - Answer\n"  # an empty entry would shift the roles after it
        "- - Nested\n  - [a, b]\n"
        "- - 2.5\n  - 2020-01-02\n",
        encoding="utf-8",
    )
    (tmp_path / "a_broken.yml").write_text("conversations: [unclosed\n", encoding="utf-8")
    (tmp_path / "c_nocategory.yml").write_text("conversations:\n- [Hi, Hello]\n", encoding="utf-8")
    (tmp_path / "d_empty.yml").write_text("", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("- [not, read]\n", encoding="utf-8")
    skipped: Counter[str] = Counter()
    records = list(chatterbot_records(tmp_path, skipped))
    assert records == [
        {
            "messages": [
                {"role": "user", "content": "What is six times seven?"},
                {"role": "assistant", "content": "42"},
            ],
            "topic": "numbers",
        },
        {
            "messages": [{"role": "user", "content": "Is it true?"}, {"role": "assistant", "content": "yes"}],
            "topic": "numbers",
        },
        {
            "messages": [{"role": "user", "content": "2.5"}, {"role": "assistant", "content": "2020-01-02"}],
            "topic": "numbers",
        },
        {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "topic": "c_nocategory",
        },
    ]
    assert skipped == {
        "unreadable file": 1,
        "file without a conversations list": 1,
        "conversation of fewer than 2 turns": 1,
        "conversation not a list": 1,
        "conversation with an empty or non-text entry": 2,
    }


# --- janeausten --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def austen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """The converted novels (one conversion for the module), or a skip that says how to install them."""
    dataset = BUNDLED_DATA["janeausten"]
    if not dataset.is_installed():
        pytest.skip(
            f"Debian's r-cran-janeaustenr is not installed; install it with: {dataset.install_command}"
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        path = resolve_bundled_data("janeausten")
        yield path, _read_jsonl(path)


def test_janeausten(austen: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = austen
    assert path.name == "janeausten.jsonl"
    assert BUNDLED_DATA["janeausten"].task == "causal_lm"
    assert all(set(r) == {"text", "book"} for r in records)
    books = list(dict.fromkeys(r["book"] for r in records))  # in file order
    assert books == list(AUSTEN_COUNTS)
    assert Counter(r["book"] for r in records) == AUSTEN_COUNTS
    first = {book: next(r["text"] for r in records if r["book"] == book) for book in books}
    assert first["Pride and Prejudice"] == (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife."
    )
    assert first["Emma"].startswith("Emma Woodhouse, handsome, clever, and rich")
    assert first["Sense and Sensibility"].startswith(
        "The family of Dashwood had long been settled in Sussex."
    )
    texts = [r["text"] for r in records]
    assert all(t == t.strip() and "\n" not in t and t for t in texts)
    assert not any(t.lower().startswith("chapter ") and len(t) < 15 for t in texts)  # headings left out
    assert not {"THE END", "FINIS", "Finis", "A NOTE ON THE TEXT"} & set(texts)
    total = sum(len(t) for t in texts)
    assert 3_900_000 < total < 4_100_000  # 3,997,399 characters, 716,715 words
    assert sum(len(t.split()) for t in texts) == 716_715


def test_janeausten_through_the_reader(austen: tuple[Path, list[dict[str, Any]]]) -> None:
    path, records = austen
    table = read_table(str(path))
    assert table.columns == ["text", "book"] and len(table) == len(records) == 9_994


def test_janeausten_from_env_folder(
    austen: tuple[Path, list[dict[str, Any]]], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$LMTUNE_JANEAUSTENR may name the R package folder or the root `dpkg -x` unpacked into."""
    package = BUNDLED_DATA["janeausten"].package_dir()
    assert package is not None
    for folder in (package, package.parents[4]):  # .../usr/lib/R/site-library/janeaustenr and its dpkg root
        monkeypatch.setenv(JANEAUSTENR_ENV, str(folder))
        assert BUNDLED_DATA["janeausten"].package_dir() == package
    path = resolve_bundled_data("janeausten")
    assert path.read_bytes() == austen[0].read_bytes()


def test_janeausten_env_folder_without_data(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(JANEAUSTENR_ENV, str(tmp_path))
    with pytest.raises(DataError, match="missing") as info:
        resolve_bundled_data("janeausten")
    assert "apt-get download r-cran-janeaustenr" in str(info.value)


def test_janeausten_not_installed(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = dataclasses.replace(BUNDLED_DATA["janeausten"], locate=lambda: None)
    monkeypatch.setitem(BUNDLED_DATA, "janeausten", missing)
    with pytest.raises(DataError, match="not installed") as info:
        resolve_bundled_data("janeausten")
    message = str(info.value)
    assert "make install" in message
    assert "apt-get download r-cran-janeaustenr" in message and "dpkg -x r-cran-janeaustenr_*.deb" in message
    assert {r["name"]: r for r in list_datasets()}["janeausten"]["installed"] is False


def test_austen_paragraphs() -> None:
    lines: list[str | None] = [
        "TITLE",
        "",
        "By Someone",
        "",
        "",
        "CHAPTER I",
        "",
        "First line",
        " second ",
        "",
    ]
    lines += [None, "* * * * *", "", "Chapter 2.", "", "Last words.", "", "THE END", "", "Editor's note."]
    assert list(austen_paragraphs(lines)) == ["First line second", "Last words."]


@pytest.mark.parametrize(
    ("compression", "pack"),
    [
        (1, zlib.compress),
        (2, lambda raw: b"2" + bz2.compress(raw)),
        (3, lambda raw: b"X" + lzma.compress(raw)),
        (3, lambda raw: b"Z" + zlib.compress(raw)),
        (2, lambda raw: b"0" + raw),
    ],
)
def test_lazyload_record_compressions(compression: int, pack: Any) -> None:
    raw = b"X\n" + bytes(range(256)) * 4
    assert _decompress_lazyload(struct.pack(">I", len(raw)) + pack(raw), compression, "x.rdb") == raw


def test_lazyload_record_damaged() -> None:
    raw = b"serialized R"
    with pytest.raises(DataError, match="header says 99"):
        _decompress_lazyload(struct.pack(">I", 99) + zlib.compress(raw), 1, "x.rdb")
    with pytest.raises(DataError, match="cannot decompress"):
        _decompress_lazyload(struct.pack(">I", len(raw)) + b"not zlib", 1, "x.rdb")


# --- the listing -------------------------------------------------------------------------------------


def test_list_datasets(cache: Path) -> None:
    rows = {row["name"]: row for row in list_datasets()}
    assert next(iter(rows)) == "rotten_tomatoes"
    assert {"chatterbot", "chatterbot_spanish", "chatterbot_yoruba", "janeausten"} <= set(rows)
    # rotten_tomatoes, chatterbot x 28 languages, janeausten, chatterbot_en_* x 6 (seq2seq), chatterbot_qa,
    # peoples_daily (NER)
    # + chatterbot_pairs and chatterbot_kto, arithmetic, aclsum (summarization)
    assert len(rows) == 1 + 28 + 1 + 6 + 1 + 1 + 2 + 1 + 1
    assert rows["aclsum"]["task"] == "seq2seq" and rows["aclsum"]["columns"][:2] == ["source", "target"]
    assert rows["chatterbot_qa"]["task"] == "question_answering"
    assert rows["chatterbot"]["installed"] and rows["chatterbot"]["path"] is None
    resolve_bundled_data("chatterbot")
    assert next(r for r in list_datasets() if r["name"] == "chatterbot")["path"] == str(
        cache / "data" / "chatterbot.jsonl"
    )
    assert rows["janeausten"]["columns"] == ["text", "book"]
