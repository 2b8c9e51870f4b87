"""Fuzzing the data readers and the config loader (issue 6, item 7).

The property, for every input: a reader or loader either returns a clean result, or raises an
:class:`~lmtune.errors.LmtuneError` whose message names the file (and, when it gives a line, a line
that exists), never any other exception and never a hang (each input gets ``_TIME_LIMIT`` seconds).

Inputs come from hypothesis, derandomised and without an example database, so CI sees the same inputs
every run: structured generators for each format (CSV quoting, ragged rows, NUL bytes, BOMs, mixed
newlines; JSON Lines with broken and non-object lines; SQuAD layouts with missing or wrong-typed
fields; Parquet files with odd column types; CoNLL; chat records; YAML configs with aliases, tags and
bad scalars), each optionally mutated at the byte level (flips, inserts, deletions, truncation) and
re-encoded (latin-1, UTF-16 with and without a BOM) or compressed (gzip, bz2, xz; then corrupted).

``LMTUNE_FUZZ_EXAMPLES=N`` runs N inputs per target instead of the fast-suite defaults. The counts
(inputs per target, clean results, error types) are printed at the end of the pytest run (see
``pytest_terminal_summary`` in conftest.py) and, with ``LMTUNE_FUZZ_REPORT=FILE``, written there as JSON.

``REGRESSIONS`` holds the minimal inputs fuzzing found that once escaped as other exceptions.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmtune.config import load_config, parse_override_args
from lmtune.data import chat
from lmtune.data.conll import pick_columns
from lmtune.data.readers import read_table
from lmtune.data.squad import clean_items, read_qa_items
from lmtune.errors import ConfigError, DataError, LmtuneError

# Inputs per target: LMTUNE_FUZZ_EXAMPLES overrides every default (a long run: 20000).
_OVERRIDE = int(os.environ.get("LMTUNE_FUZZ_EXAMPLES", "0") or 0)
# Seconds one input may take before it counts as a hang.
_TIME_LIMIT = 20.0


def _settings(default: int) -> settings:
    return settings(
        max_examples=_OVERRIDE or default,
        derandomize=True,  # the same inputs on every run and machine
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


# ---------------------------------------------------------------------------------------------
# Counting and the property

# target -> {"inputs": n, "clean": n, "ConfigError": n, "DataError": n, ...}
STATS: dict[str, Counter[str]] = defaultdict(Counter)


class Hang(Exception):
    """One input took longer than _TIME_LIMIT seconds."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    if not hasattr(signal, "setitimer"):  # not on Windows: no limit there
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"an input took over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _line_bound(raw: bytes) -> int:
    """The most lines ``raw`` can have, however its line breaks are counted (\\n, \\r, either width)."""
    return raw.count(b"\n") + raw.count(b"\r") + 1


def check(target: str, fn: Callable[[], Any], *, path: Path | None = None, max_line: int | None = None,
          file_for: tuple[type[LmtuneError], ...] = (LmtuneError,)) -> Any:
    """Run ``fn`` under the property; its result, or None when it raised an LmtuneError.

    Any other exception propagates (hypothesis then shrinks the input). An error of a ``file_for`` class
    must name ``path`` (a ConfigError about a setting names the key instead); any LmtuneError that gives
    a line must give one between 1 and ``max_line``.
    """
    STATS[target]["inputs"] += 1
    with _time_limit(_TIME_LIMIT):
        try:
            result = fn()
        except LmtuneError as err:
            STATS[target][type(err).__name__] += 1
            message = str(err)
            if path is not None and isinstance(err, file_for):
                assert str(path) in message, f"the error does not name the file: {message}"
            if err.line is not None and max_line is not None:
                assert 1 <= err.line <= max_line, f"line {err.line} of a file of at most {max_line}: {message}"
            return None
    STATS[target]["clean"] += 1
    return result


def summary_lines() -> list[str]:
    """One line per target: inputs tried, clean results, errors by type (read by conftest.py)."""
    lines = []
    for target in sorted(STATS):
        counts = STATS[target]
        errors = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k not in ("inputs", "clean"))
        lines.append(f"{target}: {counts['inputs']} inputs, {counts['clean']} clean, errors: {errors or 'none'}")
    total = sum(c["inputs"] for c in STATS.values())
    if total:
        lines.append(f"total: {total} inputs, every failure an LmtuneError")
    return lines


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    report = os.environ.get("LMTUNE_FUZZ_REPORT")
    if report and STATS:
        Path(report).write_text(json.dumps({t: dict(c) for t, c in STATS.items()}, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every fuzzed file (each test overwrites its own file per input)."""
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------------
# Byte-level mutation and re-encoding

ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "utf-16", "utf-16-le", "cp1252"]


@st.composite
def mutated(draw: st.DrawFn, raw: bytes, max_ops: int = 4) -> bytes:
    """``raw`` with up to ``max_ops`` edits: flip, insert or delete bytes, duplicate a range, truncate."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b'"', b"\r", b"\n", b"\\", b"\xc3", b"\xe9", b"[", b"{"]))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "duplicate":
            size = draw(st.integers(1, 32))
            data[pos:pos] = data[pos : pos + size]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@st.composite
def encoded(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as bytes: mostly UTF-8, sometimes another encoding (unencodable characters become '?')."""
    encoding = draw(st.sampled_from(["utf-8"] * 4 + ENCODINGS))
    return text.encode(encoding, errors="replace")


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


# ---------------------------------------------------------------------------------------------
# CSV / TSV

_CELL_PIECES = ["a", "b", "good film", " ", ",", "\t", ";", '"', '""', "\n", "\r", "\r\n", "\x00", "\ufeff",
                "é", "\u2028", "\x85", "\\", "'", "pos", "neg", "1", "-1", "nan", "", "😀"]
_cell = st.lists(st.sampled_from(_CELL_PIECES), max_size=6).map("".join)


@st.composite
def delimited_text(draw: st.DrawFn) -> tuple[str, str]:
    """(file suffix, text): a header and rows, cells quoted properly, left bare, or quoted badly."""
    suffix = draw(st.sampled_from([".csv", ".tsv"]))
    delimiter = "," if suffix == ".csv" else "\t"
    header = draw(st.sampled_from([["text", "label"], ["text"], ["text", "label", "extra"], ["text", "text"],
                                   ["", "label"], [" text ", "label"]]))
    if draw(st.booleans()):
        header = draw(st.lists(_cell, min_size=0, max_size=4))
    rows = [header]
    for _ in range(draw(st.integers(0, 6))):
        width = draw(st.sampled_from([len(header), len(header), max(len(header) - 1, 0), len(header) + 1]))
        rows.append(draw(st.lists(_cell, min_size=width, max_size=width)))

    def render(cell: str) -> str:
        style = draw(st.sampled_from(["bare", "quoted", "quoted", "open", "stray"]))
        if style == "quoted":
            return '"' + cell.replace('"', '""') + '"'
        if style == "open":  # an opening quote that is never closed
            return '"' + cell
        if style == "stray":
            return cell + '"x'
        return cell

    newlines = st.sampled_from(["\n", "\r\n", "\r", "\n\n"])
    text = "".join(delimiter.join(render(c) for c in row) + draw(newlines) for row in rows)
    if draw(st.booleans()):
        text = "\ufeff" + text
    return suffix, text


@_settings(150)
@given(case=delimited_text(), data=st.data())
@example(case=(".csv", 'text,label\n"a\x00b",pos\n"never closed,neg\n'), data=None)
@example(case=(".csv", "text,label\n" + "x" * 2_000_000 + ",pos\n"), data=None)  # a huge single field
def test_delimited(work: Path, case: tuple[str, str], data: Any) -> None:
    suffix, text = case
    raw = text.encode()
    encoding = "utf-8"
    if data is not None:
        raw = data.draw(encoded(text))
        raw = data.draw(mutated(raw)) if data.draw(st.booleans()) else raw
        encoding = data.draw(st.sampled_from(["utf-8"] * 3 + ENCODINGS))
    path = _write(work / f"fuzz{suffix}", raw)
    table = check("csv/tsv", lambda: read_table(path, encoding=encoding), path=path, max_line=_line_bound(raw))
    if table is not None:
        assert len(table.rows) == len(table.lines) > 0
        assert all(list(row) == table.columns for row in table.rows)


# ---------------------------------------------------------------------------------------------
# JSON values, JSON Lines, JSON documents

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4), max_leaves=12)
_record = st.fixed_dictionaries(
    {},
    optional={"text": _json, "label": _json, "tokens": _json, "tags": _json, "question": _json, "context": _json,
              "answers": _json, "messages": _json, "instruction": _json, "output": _json},
)


def _deep(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


@st.composite
def jsonl_line(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["record", "record", "record", "value", "broken", "deep", "huge", "blank"]))
    if kind == "record":
        return json.dumps(draw(_record), allow_nan=True)
    if kind == "value":
        return json.dumps(draw(_json), allow_nan=True)
    if kind == "broken":
        line = json.dumps(draw(_record))
        return line[: draw(st.integers(0, max(len(line) - 1, 0)))]
    if kind == "deep":
        depth = draw(st.sampled_from([10, 500, 5_000, 100_000]))
        return '{"text": ' + _deep(depth) + ', "label": "pos"}'
    if kind == "huge":
        return json.dumps({"text": "x" * draw(st.sampled_from([10**3, 10**5])), "label": 1})
    return draw(st.sampled_from(["", " ", "\r", "\t"]))


@_settings(120)
@given(lines=st.lists(jsonl_line(), max_size=6), newline=st.sampled_from(["\n", "\r\n"]), data=st.data())
@example(lines=['{"text": ' + _deep(100_000) + "}"], newline="\n", data=None)
@example(lines=['{"text": 1' + "0" * 5000 + "}"], newline="\n", data=None)
def test_jsonl(work: Path, lines: list[str], newline: str, data: Any) -> None:
    text = newline.join(lines)
    raw = text.encode()
    if data is not None and data.draw(st.booleans()):
        raw = data.draw(mutated(data.draw(encoded(text))))
    path = _write(work / "fuzz.jsonl", raw)
    table = check("jsonl", lambda: read_table(path), path=path, max_line=_line_bound(raw))
    if table is not None:
        assert len(table.rows) == len(table.lines) > 0


@st.composite
def json_document(draw: st.DrawFn) -> Any:
    layout = draw(st.sampled_from(["records", "holder", "columns", "any"]))
    if layout == "records":
        return draw(st.lists(_record | _json, max_size=5))
    if layout == "holder":
        return {"data": draw(st.lists(_record | _json, max_size=5)), **draw(st.dictionaries(st.text(max_size=4), _json,
                                                                                            max_size=2))}
    if layout == "columns":
        return draw(st.dictionaries(st.sampled_from(["text", "label", "x"]), st.lists(_scalars, max_size=4),
                                    max_size=3))
    return draw(_json)


@_settings(100)
@given(document=json_document(), data=st.data())
@example(document=None, data=None)
def test_json(work: Path, document: Any, data: Any) -> None:
    text = _deep(100_000) if document is None else json.dumps(document, allow_nan=True)
    raw = text.encode()
    if data is not None and data.draw(st.booleans()):
        raw = data.draw(mutated(raw))
    path = _write(work / "fuzz.json", raw)
    check("json", lambda: read_table(path), path=path, max_line=_line_bound(raw))


# ---------------------------------------------------------------------------------------------
# SQuAD JSON and flat question-answering rows (lmtune.data.squad)

_maybe_text = st.text(max_size=20) | _json
def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] = _json) -> st.SearchStrategy[Any]:
    """``good`` about four times in five, else ``bad``: deep enough inputs to pass the first checks."""
    return st.one_of(good, good, good, good, bad)


_answer = st.fixed_dictionaries({"text": _mostly(st.sampled_from(["a", "b", "abc", "c a", "", " "]))}, optional={
    "answer_start": _mostly(st.integers(-3, 30), st.sampled_from([10**400, 1.5, "3", None, float("inf")]) | _json),
})
_question = st.fixed_dictionaries(
    {"question": _mostly(st.sampled_from(["q", "why?", "", "  x"])), "answers": _mostly(st.lists(_mostly(_answer),
                                                                                             max_size=3))},
    optional={"id": st.text(max_size=4) | _json, "is_impossible": _json})
_paragraph = st.fixed_dictionaries({"context": _mostly(st.sampled_from(["abc abc", "", "b", "c a b"])),
                                    "qas": _mostly(st.lists(_mostly(_question), max_size=3))})
_squad = st.fixed_dictionaries({"data": st.lists(_mostly(st.fixed_dictionaries(
    {"paragraphs": _mostly(st.lists(_mostly(_paragraph), max_size=3))}, optional={"title": _json})),
    min_size=1, max_size=3)}, optional={"version": _json})


@_settings(120)
@given(document=_squad, flat=st.booleans(), allow=st.booleans(), empty=st.sampled_from(["skip", "error"]),
       data=st.data())
@example(document={"data": [{"paragraphs": [{"context": "abc", "qas": [
    {"id": "1", "question": "q", "answers": [{"text": "b", "answer_start": 10**400}]}]}]}]},
    flat=False, allow=False, empty="skip", data=None)
def test_squad(work: Path, document: dict[str, Any], flat: bool, allow: bool, empty: str, data: Any) -> None:
    from lmtune.config import DataConfig

    cfg = DataConfig(train="x")
    if flat:  # the flat layout: one question per JSON line, answers as JSON text or a value
        rows = [{"question": q.get("question"), "context": p.get("context"),
                 "answers": json.dumps(q["answers"]) if "answers" in q and data and data.draw(st.booleans())
                 else q.get("answers")}
                for a in document["data"] if isinstance(a, dict) and isinstance(a.get("paragraphs"), list)
                for p in a["paragraphs"] if isinstance(p, dict) and isinstance(p.get("qas"), list)
                for q in p["qas"] if isinstance(q, dict)]
        raw = "\n".join(json.dumps(r) for r in rows).encode()
        path = work / "fuzz-qa.jsonl"
    else:
        raw = json.dumps(document, indent=1).encode()
        path = work / "fuzz-squad.json"
    if data is not None and data.draw(st.booleans()):
        raw = data.draw(mutated(raw))
    _write(path, raw)

    def read() -> Any:
        items, source, _ = read_qa_items(str(path), cfg)
        return clean_items(items, source, allow_unanswerable=allow, empty_text=empty)

    check("squad", read, path=path, max_line=_line_bound(raw))


# ---------------------------------------------------------------------------------------------
# Parquet

_ARROW_TYPES: dict[str, tuple[pa.DataType, st.SearchStrategy[Any]]] = {
    "string": (pa.string(), st.none() | st.text(max_size=8)),
    "large_string": (pa.large_string(), st.none() | st.text(max_size=8)),
    "int": (pa.int64(), st.none() | st.integers(-(2**63), 2**63 - 1)),
    "float": (pa.float64(), st.none() | st.floats(allow_nan=True)),
    "bool": (pa.bool_(), st.none() | st.booleans()),
    "null": (pa.null(), st.none()),
    "binary": (pa.binary(), st.none() | st.binary(max_size=8)),
    "list": (pa.list_(pa.string()), st.none() | st.lists(st.none() | st.text(max_size=4), max_size=3)),
    "struct": (pa.struct([("a", pa.int64()), ("b", pa.string())]),
               st.none() | st.fixed_dictionaries({"a": st.none() | st.integers(-9, 9), "b": st.none() | st.text(max_size=3)})),
    "nested": (pa.list_(pa.list_(pa.int8())), st.none() | st.lists(st.lists(st.integers(-9, 9), max_size=2), max_size=2)),
    "date": (pa.date32(), st.none() | st.dates()),
    "map": (pa.map_(pa.string(), pa.int32()), st.none() | st.lists(st.tuples(st.text(max_size=3), st.integers(-9, 9)),
                                                                       max_size=2)),
}


@st.composite
def parquet_bytes(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.sampled_from(["text", "label", "tokens", "tags", "messages", "x"]), max_size=3))
    n = draw(st.integers(0, 8))
    arrays, fields = [], []
    if draw(st.booleans()):  # text/label strings: tables the classification task can read
        for name in ("text", "label"):
            arrays.append(pa.array(draw(st.lists(st.sampled_from(["a b", "c", "pos", "neg", ""]) | st.none(),
                                                 min_size=n, max_size=n)), type=pa.string()))
            fields.append(pa.field(name, pa.string()))
    for name in names:  # duplicate names are allowed in Parquet: the reader must refuse them cleanly
        kind = draw(st.sampled_from(sorted(_ARROW_TYPES)))
        arrow_type, values = _ARROW_TYPES[kind]
        arrays.append(pa.array(draw(st.lists(values, min_size=n, max_size=n)), type=arrow_type))
        fields.append(pa.field(name, arrow_type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields)) if fields else pa.table({})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=draw(st.sampled_from(["none", "snappy", "gzip", "zstd"])))
    return sink.getvalue()


@_settings(100)
@given(raw=parquet_bytes(), mutate=st.booleans(), data=st.data())
def test_parquet(work: Path, raw: bytes, mutate: bool, data: Any) -> None:
    if mutate:
        raw = data.draw(mutated(raw))
    path = _write(work / "fuzz.parquet", raw)
    table = check("parquet", lambda: read_table(path), path=path)
    if table is not None:  # a clean table goes on through the classification task's validation
        check("parquet->classification", lambda: _classification_records(path), path=path)


def _classification_records(path: Path) -> Any:
    from lmtune.tasks.classification.task import ClassificationTask

    config = load_config({"task": "classification", "model": "minilm", "data": {"train": str(path)}})
    return ClassificationTask(config)._split_records()


# ---------------------------------------------------------------------------------------------
# Plain text, compressed files

@_settings(100)
@given(raw=st.binary(max_size=200) | st.lists(st.sampled_from(_CELL_PIECES), max_size=20).map(
    lambda parts: "".join(parts).encode()) | parquet_bytes(),
    fmt=st.sampled_from(["auto", "auto", "csv", "tsv", "json", "jsonl", "parquet", "text", "conll"]))
def test_text(work: Path, raw: bytes, fmt: str) -> None:
    """Plain text, and any bytes read as the wrong format (data.format set by hand)."""
    path = _write(work / "fuzz.txt", raw)
    check("text", lambda: read_table(path, format=fmt), path=path, max_line=_line_bound(raw))


_COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


@_settings(100)
@given(inner=delimited_text() | st.lists(jsonl_line(), max_size=4).map(lambda ls: (".jsonl", "\n".join(ls))),
       compression=st.sampled_from(sorted(_COMPRESSORS)), data=st.data())
def test_compressed(work: Path, inner: tuple[str, str], compression: str, data: Any) -> None:
    suffix, text = inner
    raw = _COMPRESSORS[compression](text.encode())
    how = data.draw(st.sampled_from(["intact", "truncated", "mutated", "garbage"]))
    if how == "truncated":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif how == "mutated":
        raw = data.draw(mutated(raw))
    elif how == "garbage":
        raw = data.draw(st.binary(max_size=64))
    path = _write(work / f"fuzz{suffix}{compression}", raw)
    check("compressed", lambda: read_table(path), path=path)


# ---------------------------------------------------------------------------------------------
# CoNLL, and the token-classification task's validation of it

_CONLL_PIECES = ["EU", "rejects", "German", "B-ORG", "I-ORG", "B-PER", "O", "E-LOC", "S-MISC", "X", "-DOCSTART-",
                 " ", "\t", "\t\t", "  ", "\r", "\x0b", "\x0c", "\x85", "\u2028", "\x00", "é", "I-", "B-", "-"]
_conll_line = st.lists(st.sampled_from(_CONLL_PIECES), max_size=5).map("".join)


@_settings(150)
@given(lines=st.lists(_conll_line, max_size=12), newline=st.sampled_from(["\n", "\r\n", "\r"]),
       token_column=st.integers(-3, 2), tag_column=st.integers(-3, 2))
@example(lines=["a B", "x\u2028y", "c D E"], newline="\n", token_column=0, tag_column=-1)
def test_conll(work: Path, lines: list[str], newline: str, token_column: int, tag_column: int) -> None:
    raw = newline.join(lines).encode()
    path = _write(work / "fuzz.conll", raw)
    # CoNLL counts \n, \r\n and a lone \r as line breaks; nothing else may shift the line numbers.
    max_line = raw.count(b"\n") + raw.count(b"\r") - raw.count(b"\r\n") + 1
    table = check("conll", lambda: read_table(path), path=path, max_line=max_line)
    if table is not None:
        check("conll", lambda: pick_columns(table, token_column, tag_column), path=path, max_line=max_line)
        check("conll->token_classification", lambda: _token_records(path), path=path, max_line=max_line)


def _token_records(path: Path) -> Any:
    from lmtune.tasks.token_classification.task import TokenClassificationTask

    config = load_config({"task": "token_classification", "model": "minilm", "data": {"train": str(path)}})
    return TokenClassificationTask(config)._read_split(str(path))


# ---------------------------------------------------------------------------------------------
# Chat records (alpaca, sharegpt, openai) and the sft task's reading of them

_role = st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "USER ", ""]) | _json
_content = st.sampled_from(["hi", "", "  ", "answer"]) | st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image"]), "text": _maybe_text}), max_size=2) | _json


# An assistant's tool calls: well-formed, or any JSON (arguments as JSON text, an object or anything else).
_tool_calls = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "x"]), "function": st.fixed_dictionaries(
        {}, optional={"name": st.sampled_from(["f", ""]) | _json,
                      "arguments": st.sampled_from(['{"a": 1}', "{", "[]", ""]) | _json})},
    optional={"id": _json}), max_size=2) | _json


@st.composite
def chat_record(draw: st.DrawFn) -> dict[str, Any]:
    fmt = draw(st.sampled_from(chat.FORMATS))
    if fmt == "alpaca":
        record = draw(st.fixed_dictionaries({}, optional={"instruction": _maybe_text, "input": _maybe_text,
                                                          "output": _maybe_text, "system": _maybe_text}))
    else:
        role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
        extra = {"tool_calls": _tool_calls, "tool_call_id": _json} if fmt == "openai" else {}
        message = st.fixed_dictionaries({}, optional={role_key: _role, content_key: _content, "name": _json,
                                                      **extra}) | _json
        key = "conversations" if fmt == "sharegpt" else "messages"
        record = {key: draw(st.lists(message, max_size=5) | _json)}
    if draw(st.booleans()):
        record.update(draw(st.dictionaries(st.sampled_from([*chat.STANDARD_KEYS, "extra"]), _json, max_size=2)))
    return record


_columns: st.SearchStrategy[dict[str, str]] = st.just({}) | st.dictionaries(st.sampled_from([*chat.STANDARD_KEYS, "bogus"]),
                                         st.sampled_from(["messages", "dialog", "instruction", "q", ""]), max_size=2)


@_settings(120)
@given(records=st.lists(chat_record(), min_size=1, max_size=4), columns=_columns, fmt=st.sampled_from(
    ["auto", *chat.FORMATS]))
def test_chat(work: Path, records: list[dict[str, Any]], columns: dict[str, str], fmt: str) -> None:
    raw = "\n".join(json.dumps(r, allow_nan=True) for r in records).encode()
    path = _write(work / "fuzz-chat.jsonl", raw)
    table = check("chat", lambda: read_table(path), path=path, max_line=_line_bound(raw))
    if table is None:
        return

    def convert() -> list[list[dict[str, str]]]:
        chosen = chat.detect_format(table.rows, columns, str(path)) if fmt == "auto" else fmt
        return [chat.to_messages(row, chosen, columns, source=str(path), line=line)
                for row, line in zip(table.rows, table.lines, strict=True)]

    conversations = check("chat", convert, path=path, max_line=_line_bound(raw), file_for=(DataError,))
    for messages in conversations or []:
        assert messages[-1]["role"] == "assistant" and all(isinstance(m["content"], str) for m in messages)


# ---------------------------------------------------------------------------------------------
# YAML configs (lmtune.config.load_config) and command-line overrides

_CONFIG_KEYS = {
    "task": st.sampled_from(["classification", "sft", "causal_lm", "nope", ""]),
    "model": st.sampled_from(["minilm", "smollm2-135m"]) | st.dictionaries(
        st.sampled_from(["name", "trust_remote_code", "allow_pickle", "dtype", "x"]), _scalars, max_size=3),
    "data": st.dictionaries(st.sampled_from(["train", "validation", "text_column", "max_length", "columns",
                                             "labels", "format", "streaming", "x"]),
                            _json | st.integers(0, 600) | st.sampled_from(["csv", "auto", "x.csv"]), max_size=4),
    "train": st.dictionaries(st.sampled_from(["epochs", "batch_size", "learning_rate", "seed", "distributed",
                                              "max_steps", "x"]), _json, max_size=4),
    "method": st.dictionaries(st.sampled_from(["name", "r", "alpha", "target_modules"]), _json, max_size=3),
    "output_dir": _json,
    "baselines": _json,
    "generation": _json,
}
_config = st.fixed_dictionaries({}, optional=_CONFIG_KEYS)
_VALID_CONFIG: dict[str, Any] = {"task": "classification", "model": "minilm", "data": {"train": "x.csv"}}
_YAML_PIECES = ["task: ", "model: ", "data:\n", "  train: ", "train: {epochs: ", "}", "]", "[", "{", ", ", "\n",
                "  ", "\t", "- ", "? ", ": ", "&a ", "*a", "&b [*a, *a, *a]", "*b", "<<: *a\n", "!!python/object:os.system ",
                "!!python/name:os.system", "!!binary ", "!!set ", "!!omap ", "!custom ", "'", '"', "#", "%YAML 1.1\n",
                "%TAG ! tag:x,2000:\n", "---\n", "...\n", "|\n", ">-\n", "0x1F", "0o17", "1e999", ".nan", "-.inf",
                "2020-13-45", "2001-12-14t21:59:43.10-05:00", "~", "null", "yes", "1" * 5000, "\x00", "\ufeff",
                "\u2028", "é", "classification", "minilm", "x.csv", "\\"]


@st.composite
def yaml_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["dumped", "dumped", "soup", "bytes"]))
    if kind == "dumped":
        config = draw(_config)
        if draw(st.booleans()):  # a valid config with some settings changed
            data = config.get("data")
            config = {**_VALID_CONFIG, **config, "data": {**_VALID_CONFIG["data"],
                                                        **(data if isinstance(data, dict) else {})}}
        text = yaml.safe_dump(config, allow_unicode=True, default_flow_style=draw(st.booleans()))
    elif kind == "soup":
        text = "".join(draw(st.lists(st.sampled_from(_YAML_PIECES), max_size=25)))
    else:
        return draw(st.binary(max_size=100))
    raw = draw(encoded(text))
    return draw(mutated(raw)) if draw(st.booleans()) else raw


def _billion_laughs(levels: int = 9) -> str:
    text = 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


@_settings(150)
@given(raw=yaml_bytes())
@example(raw=b"[" * 100_000)
@example(raw=(_billion_laughs() + f"task: *a{8}\n").encode())
@example(raw=b"!!python/object/apply:os.system ['echo pwned']\n")
@example(raw="task: classification\nmodel: minilm\n".encode("utf-16"))
def test_config(work: Path, raw: bytes) -> None:
    path = _write(work / "fuzz.yaml", raw)
    config = check("config", lambda: load_config(path), path=path, max_line=_line_bound(raw))
    if config is not None:
        config.to_dict()  # a loaded config always dumps back to plain data


_ARG = st.sampled_from(["--train.epochs", "--data.train", "--model.name", "--x", "--", "-", "train.epochs",
                        "--method.name=lora", "--data.columns", "--task", "--model.trust_remote_code",
                        "--model.name.sub", "--data=3"]) | st.sampled_from(_YAML_PIECES) | st.text(max_size=8)


@_settings(150)
@given(args=st.lists(_ARG, max_size=6))
def test_overrides(args: list[str]) -> None:
    def load() -> Any:
        return load_config(_VALID_CONFIG, parse_override_args(args))

    check("overrides", load)


# ---------------------------------------------------------------------------------------------
# End to end: a fuzzed CSV through ClassificationTask.prepare with a real tokenizer

@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    from helpers import minilm_path

    from lmtune.models.registry import load_padded_tokenizer

    return load_padded_tokenizer(minilm_path(), trust_remote_code=False)


_words = st.lists(st.sampled_from(["good", "bad", "film", "😀", "é", "\x00", '"', ",", " ", "\n", "", "[CLS]"]),
                  max_size=6).map(" ".join)


@_settings(25)
@given(rows=st.lists(st.tuples(_words, st.sampled_from(["pos", "neg", "pos", "neg", "", "1", " pos", "nan"])),
                     min_size=4, max_size=16),
       max_length=st.sampled_from([8, 9, 32]), mutate=st.booleans(), data=st.data())
def test_classification_prepare(work: Path, minilm_tokenizer: Any, rows: list[tuple[str, str]], max_length: int,
                                mutate: bool, data: Any) -> None:
    import csv

    buffer = io.StringIO()
    csv.writer(buffer).writerows([("text", "label"), *rows])
    raw = buffer.getvalue().encode()
    if mutate:
        raw = data.draw(mutated(raw, max_ops=2))
    path = _write(work / "fuzz-e2e.csv", raw)
    config = {"task": "classification", "model": "minilm",
              "data": {"train": str(path), "max_length": max_length, "cache": False}}

    def prepare() -> Any:
        from lmtune.tasks.classification.task import ClassificationTask

        return ClassificationTask(load_config(config)).prepare(minilm_tokenizer)

    prepared = check("csv->classification.prepare", prepare, path=path, max_line=_line_bound(raw),
                     file_for=(DataError,))
    if prepared is not None:
        assert len(prepared.splits["train"]) > 0


# ---------------------------------------------------------------------------------------------
# Regressions: the minimal inputs fuzzing found that escaped as other exceptions

REGRESSIONS: list[tuple[str, str, bytes, str]] = [
    # (case id, file name, content, fragment the LmtuneError message must hold)
    ("yaml nested 100k deep: RecursionError", "deep.yaml", b"[" * 100_000, "nested too deeply"),
    ("yaml nested 500 deep flow maps: RecursionError", "deep-map.yaml",
     ("model: " + "{a: " * 500 + "1" + "}" * 500).encode(), "nested too deeply"),
    ("yaml 5000-digit int: ValueError", "bigint.yaml", b"train: {epochs: " + b"9" * 5000 + b"}\n",
     "cannot be read"),
    ("yaml impossible date: ValueError", "date.yaml", b"task: 2020-13-45\n", "cannot be read"),
    ("yaml escape past the last code point: OverflowError", "escape.yaml", b'task: "\\U80010000"\n', "cannot be read"),
    ("yaml U+2028 counted as a line break: line 2 of a one-line file", "u2028.yaml",
     "train: {epochs: \u2028".encode(), "u2028.yaml:1:"),
    ("yaml billion laughs: a 2.8 GB error message after 50 s", "laughs.yaml",
     (_billion_laughs() + "task: *a8\n").encode(), "expands to more than"),
    ("squad json 100k deep: RecursionError", "deep.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("squad json 5000-digit int: ValueError", "bigint.json", b'{"data": 1' + b"0" * 5000 + b"}", "invalid JSON"),
    ("squad answer_start 10**400: OverflowError", "overflow.json", json.dumps({"data": [{"paragraphs": [
        {"context": "abc", "qas": [{"id": "1", "question": "q", "answers": [{"text": "b", "answer_start": 10**400}]}]}
    ]}]}).encode(), "answer_start must be a character offset"),
    ("qa jsonl answers cell of JSON text 100k deep: RecursionError", "deep-answers.jsonl",
     json.dumps({"question": "q", "context": "abc", "answers": "[" * 100_000}).encode(), "answers are not valid JSON"),
    ("conll U+2028 split a line: the error was at line 2, not 3", "shift.conll", "a B\nx\u2028y\nc D E\n".encode(),
     "shift.conll:3:"),
]


@pytest.mark.parametrize(("name", "content", "fragment"), [r[1:] for r in REGRESSIONS], ids=[r[0] for r in REGRESSIONS])
def test_regression(tmp_path: Path, name: str, content: bytes, fragment: str) -> None:
    from lmtune.config import DataConfig

    path = _write(tmp_path / name, content)
    with pytest.raises(LmtuneError) as info:
        if name.endswith(".yaml"):
            load_config(path)
        elif name.endswith((".json", ".jsonl")):
            items, source, _ = read_qa_items(str(path), DataConfig(train="x"))
            clean_items(items, source, allow_unanswerable=False, empty_text="skip")
        else:
            read_table(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)
    if name.endswith(".yaml"):
        assert isinstance(info.value, ConfigError)
    assert len(str(info.value)) < 2000  # a bounded message, not a dump of the input


@pytest.mark.parametrize("value", ["1" * 5000, "[" * 100_000, '"\\U80010000"', "2020-13-45"])
def test_override_values_yaml_cannot_convert_stay_text(value: str) -> None:
    """Regression: parse_override_args let PyYAML's ValueError (a 5000-digit int) escape."""
    assert parse_override_args(["--train.epochs", value]) == {"train.epochs": value}
    # and the config refuses it, naming the key (the huge number too: counts have upper bounds)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(_VALID_CONFIG, parse_override_args(["--train.epochs", value]))


def test_python_tags_are_refused(tmp_path: Path) -> None:
    """yaml.safe_load: a !!python tag is an error, and nothing runs."""
    marker = tmp_path / "ran"
    path = _write(tmp_path / "evil.yaml", f"!!python/object/apply:os.mkdir ['{marker}']\n".encode())
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        load_config(path)
    assert not marker.exists()


if __name__ == "__main__":  # pragma: no cover - `python tests/test_fuzz.py` runs the module
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
