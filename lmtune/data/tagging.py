"""Sequence tagging data: tag schemes (BIO / BIOES), entity spans, words with character offsets, and the
alignment of word tags to sub-word tokens.

Everything goes through entity spans: a tag sequence is parsed (and validated) into spans
``(type, first_word, last_word)`` under the scheme it is written in, and spans are written back in the
scheme the model trains on. So BIO -> BIOES -> BIO round-trips exactly, and data written in IOB1 (an
entity may start with ``I-``) comes out as IOB2.

Problems raise :class:`ValueError` with a sentence saying what is wrong and where in the sentence; the
task turns them into DataErrors naming the file, line and field.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

from lmtune.data.features import IGNORE_INDEX

SCHEMES = ("bio", "bioes")
# Tag prefixes each scheme writes (besides the bare "O").
PREFIXES = {"bio": ("B", "I"), "bioes": ("B", "I", "E", "S")}
WORD_SPLITS = ("whitespace", "punctuation", "chars")
OUTSIDE = "O"

# CJK ideographs, kana, hangul and CJK punctuation: each character is a word of its own in "punctuation"
# splitting (Chinese and Japanese are written without spaces).
_CJK = (
    "\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3200-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
)
_CJK_CHAR = re.compile(f"[{_CJK}]")
_PUNCT_WORDS = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+(?:['’\\-][^\\W{_CJK}]+)*|[^\\w\\s]", re.UNICODE)


class TagError(ValueError):
    """A bad tag sequence; ``word`` is the 0-based index of the word at fault."""

    def __init__(self, message: str, word: int) -> None:
        super().__init__(message)
        self.word = word


def split_tag(tag: str, scheme: str) -> tuple[str, str | None]:
    """``"B-PER"`` -> ``("B", "PER")``, ``"O"`` -> ``("O", None)``; ValueError for a tag outside ``scheme``."""
    if tag == OUTSIDE:
        return OUTSIDE, None
    prefix, sep, kind = tag.partition("-")
    if not sep or not kind.strip() or prefix not in PREFIXES[scheme]:
        allowed = ", ".join(f"{p}-TYPE" for p in PREFIXES[scheme])
        raise ValueError(f"tag {tag!r} is not a {scheme.upper()} tag (O, {allowed})")
    return prefix, kind


def detect_scheme(tags: Sequence[str]) -> str:
    """``bioes`` when any tag starts with ``E-`` or ``S-``, else ``bio``."""
    return "bioes" if any(t[:2] in ("E-", "S-") for t in tags) else "bio"


def tags_to_spans(tags: Sequence[str], scheme: str) -> tuple[list[tuple[str, int, int]], int]:
    """Entity spans ``(type, first, last)`` (word indices, inclusive) of a tag sequence, and how many
    entities began with ``I-`` (IOB1 style; BIO only, read as a new entity).

    BIO is read leniently (an ``I-X`` after ``O`` or another type starts an entity, as conlleval does);
    BIOES strictly: an entity is ``S-X`` or ``B-X I-X* E-X``. A tag outside the scheme, or a broken BIOES
    entity, is a :class:`TagError` naming the word.
    """
    spans: list[tuple[str, int, int]] = []
    repaired = 0
    open_type: str | None = None
    start = 0
    for i, tag in enumerate(tags):
        try:
            prefix, kind = split_tag(tag, scheme)
        except ValueError as exc:
            raise TagError(f"word {i + 1}: {exc}", i) from None
        if scheme == "bio":
            if prefix == "I" and open_type == kind:
                continue
            if open_type is not None:
                spans.append((open_type, start, i - 1))
                open_type = None
            if prefix in ("B", "I"):
                repaired += prefix == "I"
                open_type, start = kind, i
            continue
        # bioes
        if prefix in ("I", "E"):
            if open_type != kind:
                raise TagError(f"word {i + 1}: {tag} does not continue an entity of type {kind} "
                               f"(BIOES: B-{kind} comes first)", i)
            if prefix == "E" and kind is not None:
                spans.append((kind, start, i))
                open_type = None
            continue
        if open_type is not None:
            raise TagError(f"word {i + 1}: {tag} comes while the {open_type} entity begun at word {start + 1} is "
                           f"not closed (BIOES: an entity ends with E-{open_type})", i)
        if prefix == "S" and kind is not None:
            spans.append((kind, i, i))
        elif prefix == "B":
            open_type, start = kind, i
    if open_type is not None:
        if scheme == "bio":
            spans.append((open_type, start, len(tags) - 1))
        else:
            raise TagError(f"the {open_type} entity begun at word {start + 1} never ends "
                           f"(BIOES: an entity ends with E-{open_type})", len(tags) - 1)
    return spans, repaired


def spans_to_tags(spans: Sequence[tuple[str, int, int]], length: int, scheme: str) -> list[str]:
    """The tag sequence of ``length`` words holding ``spans`` (non-overlapping, inclusive ends)."""
    tags = [OUTSIDE] * length
    for kind, first, last in spans:
        if scheme == "bioes" and first == last:
            tags[first] = f"S-{kind}"
            continue
        tags[first] = f"B-{kind}"
        for i in range(first + 1, last + 1):
            tags[i] = f"I-{kind}"
        if scheme == "bioes":
            tags[last] = f"E-{kind}"
    return tags


def convert_tags(tags: Sequence[str], source: str, target: str) -> list[str]:
    """``tags`` written in scheme ``source`` rewritten in scheme ``target`` (through entity spans)."""
    spans, _ = tags_to_spans(tags, source)
    return spans_to_tags(spans, len(tags), target)


def label_set(entity_types: Sequence[str], scheme: str) -> list[str]:
    """Every tag of ``scheme`` for the entity types: ``O`` first, then per type in the given order."""
    return [OUTSIDE] + [f"{p}-{t}" for t in entity_types for p in PREFIXES[scheme]]


def continuation_tag(tag: str) -> str:
    """The tag of a word's second and later sub-tokens when every sub-token is labelled: the entity goes on."""
    return tag if tag == OUTSIDE else "I-" + tag.split("-", 1)[1]


# ------------------------------------------------------------------------------------------ words
def split_words(text: str, how: str) -> list[tuple[str, int, int]]:
    """Words of ``text`` with their character offsets ``(word, start, end)``.

    ``whitespace``: runs of non-space characters. ``punctuation``: words and punctuation marks apart,
    every CJK character a word of its own ("Paris, France" -> Paris / , / France). ``chars``: every
    non-space character.
    """
    if how == "whitespace":
        return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    if how == "punctuation":
        return [(m.group(), m.start(), m.end()) for m in _PUNCT_WORDS.finditer(text)]
    if how == "chars":
        return [(c, i, i + 1) for i, c in enumerate(text) if not c.isspace()]
    raise ValueError(f"unknown word split {how!r}; choose one of {', '.join(WORD_SPLITS)}")


def guess_text_split(texts: list[str]) -> str:
    """How raw text without given words is cut: ``chars`` for text that is mostly CJK (written without
    spaces), else ``punctuation``."""
    sample = "".join(texts[:2000])
    letters = [c for c in sample if not c.isspace()]
    cjk = sum(bool(_CJK_CHAR.match(c)) for c in letters)
    return "chars" if letters and cjk >= 0.3 * len(letters) else "punctuation"


def guess_word_split(sentences: Sequence[Sequence[str]]) -> str:
    """How the training sentences were cut into words, so raw text at prediction is cut the same way:
    ``chars`` when nearly every CJK-bearing word is one character, ``punctuation`` when punctuation marks
    stand alone as words, else ``whitespace``."""
    cjk = single = punct = 0
    for words in sentences[:5000]:
        for w in words:
            if _CJK_CHAR.search(w):
                cjk += 1
                single += len(w) == 1
            elif w and all(not c.isalnum() for c in w):
                punct += 1
    if cjk and single >= 0.9 * cjk:
        return "chars"
    return "punctuation" if punct else "whitespace"


def join_words(words: Sequence[str], how: str) -> tuple[str, list[tuple[int, int]]]:
    """A text for a word list (no spaces between characters for ``chars``), and each word's offsets."""
    sep = "" if how == "chars" else " "
    offsets = []
    pos = 0
    for w in words:
        offsets.append((pos, pos + len(w)))
        pos += len(w) + len(sep)
    return sep.join(words), offsets


def char_spans_to_word_spans(
    spans: Sequence[dict[str, Any]], words: Sequence[tuple[str, int, int]], text: str
) -> list[tuple[str, int, int]]:
    """Character spans ``{start, end, label}`` (end exclusive) as word spans ``(label, first, last)``.

    ValueError for a span outside the text, an empty or unlabelled span, a span boundary inside a word,
    a span that covers no word, and spans that overlap.
    """
    starts = {s: i for i, (_, s, _) in enumerate(words)}
    ends = {e: i for i, (_, _, e) in enumerate(words)}
    out: list[tuple[str, int, int, int, int]] = []
    for n, span in enumerate(spans, 1):
        if not isinstance(span, dict) or not {"start", "end", "label"} <= set(span):
            raise ValueError(f"span {n}: expected an object with start, end and label, found {span!r}")
        start, end, label = span["start"], span["end"], span["label"]
        if not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool) or isinstance(end, bool):
            raise ValueError(f"span {n}: start and end must be integers, found {start!r} and {end!r}")
        if not isinstance(label, str) or not label.strip() :
            raise ValueError(f"span {n}: the label must be an entity type such as PER, found {label!r}")
        if start < 0 or end > len(text):
            raise ValueError(f"span {n} ({start}-{end}) falls outside the text of {len(text)} characters")
        if start >= end:
            raise ValueError(f"span {n} ({start}-{end}) is empty (end must be greater than start)")
        # Spaces around the entity inside the span are not part of it.
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start not in starts or end not in ends:
            inside = [w for w, s, e in words if s < start < e or s < end < e]
            where = f" cuts through the word {inside[0]!r}" if inside else " covers no word"
            raise ValueError(f"span {n} ({start}-{end}, {text[start:end]!r}){where}; spans must start and end at "
                             "word boundaries (set data.word_split: chars to tag single characters)")
        out.append((label.strip(), starts[start], ends[end], span["start"], span["end"]))
    out.sort(key=lambda s: s[1])
    for a, b in itertools.pairwise(out):
        if b[1] <= a[2]:
            raise ValueError(f"spans {a[3]}-{a[4]} ({a[0]}) and {b[3]}-{b[4]} ({b[0]}) overlap")
    return [(label, first, last) for label, first, last, _, _ in out]


# ------------------------------------------------------------------------------------------ alignment
def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int], *, all_subtokens: bool,
                 continuation: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Token labels for one encoded sentence from its ``word_ids()`` (None for special tokens).

    Returns ``(labels, first)``: ``labels`` carries the loss (-100 where none): the first sub-token of
    each word gets the word's label, later sub-tokens -100, or (``all_subtokens``) ``continuation[label]``
    (the word's entity goes on: B-X -> I-X). ``first`` has the word's label on its first sub-token only:
    what evaluation and prediction read.
    """
    labels: list[int] = []
    first: list[int] = []
    previous: int | None = None
    for wid in word_ids:
        if wid is None:
            labels.append(IGNORE_INDEX)
            first.append(IGNORE_INDEX)
        elif wid != previous:
            labels.append(word_labels[wid])
            first.append(word_labels[wid])
        else:
            cont = word_labels[wid] if continuation is None else continuation[word_labels[wid]]
            labels.append(cont if all_subtokens else IGNORE_INDEX)
            first.append(IGNORE_INDEX)
        previous = wid
    return labels, first
