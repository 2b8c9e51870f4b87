"""Readers: every format round-trips with correct locations; every bad input is a DataError at file:line."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtune.data import bundled
from lmtune.data.readers import Table, detect_format, read_table
from lmtune.errors import DataError

ROWS = [{"text": "good film", "label": "pos"}, {"text": "dull", "label": "neg"}]

# name, file content, expected rows, expected lines, location kind
ROUND_TRIPS: list[tuple[str, str, list[dict[str, Any]], list[int], str]] = [
    ("data.csv", "text,label\ngood film,pos\ndull,neg\n", ROWS, [2, 3], "line"),
    ("data.tsv", "text\tlabel\ngood film\tpos\n\ndull\tneg\n", ROWS, [2, 4], "line"),
    ("data.tab", "text\tlabel\r\ngood film\tpos\r\ndull\tneg\r\n", ROWS, [2, 3], "line"),
    (
        "multiline.csv",
        'text,label\n"line one\nline two, with comma",pos\n"say ""hi""",\n',
        [{"text": "line one\nline two, with comma", "label": "pos"}, {"text": 'say "hi"', "label": ""}],
        [2, 4],
        "line",
    ),
    ("bom.csv", "\ufefftext,label\ngood film,pos\ndull,neg", ROWS, [2, 3], "line"),
    (
        "data.jsonl",
        '{"text": "good film", "label": "pos"}\n\n{"text": "dull", "label": "neg", "tags": ["a", "b"]}\n',
        [{**ROWS[0], "tags": None}, {**ROWS[1], "tags": ["a", "b"]}],
        [1, 3],
        "line",
    ),
    (
        "data.ndjson",
        '{"text": "a\u2028b"}\r\n{"text": "c"}',
        [{"text": "a\u2028b"}, {"text": "c"}],
        [1, 2],
        "line",
    ),
    ("list.json", json.dumps(ROWS, indent=2), ROWS, [1, 2], "record"),
    ("wrapped.json", json.dumps({"version": 2, "data": ROWS}), ROWS, [1, 2], "record"),
    (
        "columns.json",
        json.dumps({"text": ["good film", "dull"], "label": ["pos", "neg"]}),
        ROWS,
        [1, 2],
        "record",
    ),
    (
        "data.txt",
        "first line  \r\n\n  second\nthird",
        [{"text": "first line  "}, {"text": "  second"}, {"text": "third"}],
        [1, 3, 4],
        "line",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "rows", "lines", "kind"), ROUND_TRIPS, ids=[c[0] for c in ROUND_TRIPS]
)
def test_text_formats_round_trip(
    tmp_path: Path, name: str, content: str, rows: list, lines: list, kind: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    table = read_table(path)
    assert table.rows == rows
    assert table.lines == lines
    assert table.columns == list(rows[0])
    assert table.location_kind == kind
    assert table.source == str(path)
    assert len(table) == len(rows)


@pytest.mark.parametrize(
    ("suffix", "compress"), [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)]
)
def test_compressed_csv(tmp_path: Path, suffix: str, compress: Any) -> None:
    path = tmp_path / f"data.csv{suffix}"
    path.write_bytes(compress(b'text,label\n"two\nlines",pos\ndull,neg\n'))
    table = read_table(path)
    assert table.rows == [{"text": "two\nlines", "label": "pos"}, {"text": "dull", "label": "neg"}]
    assert table.lines == [2, 4]


def test_parquet_keeps_list_columns(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(
        pa.table({"text": ["a", "b", "c"], "labels": [["x", "y"], [], ["z"]], "score": [1, 2, 3]}), path
    )
    table = read_table(path)
    assert table.columns == ["text", "labels", "score"]
    assert table.column("labels") == [["x", "y"], [], ["z"]]
    assert table.rows[2] == {"text": "c", "labels": ["z"], "score": 3}
    assert (table.lines, table.location_kind) == ([1, 2, 3], "row")


def test_saved_hf_dataset(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(folder))
    assert detect_format(folder) == "hf"
    table = read_table(folder)
    assert table.rows == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    assert (table.columns, table.lines, table.location_kind) == (["text", "label"], [1, 2], "row")


def test_dataset_dict_folder_names_the_splits(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "dd"
    split = datasets.Dataset.from_dict({"text": ["a"]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(folder))
    with pytest.raises(DataError) as caught:
        read_table(folder)
    message = str(caught.value)
    assert str(folder) in message and "train" in message and "test" in message
    assert str(folder / "train") in message


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.log"
    path.write_text('{"text": "a"}\n')
    assert read_table(path, format="jsonl").rows == [{"text": "a"}]
    with pytest.raises(DataError, match="data format"):
        read_table(path)


def test_bundled_source_keeps_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sst.csv"
    path.write_text("text,label\na,pos\n")
    # The registry stands in for the bundled data sets; read_table resolves `bundled:` names through it.
    monkeypatch.setattr(bundled, "resolve_bundled_data", lambda name: path if name == "sst" else None)
    table = read_table("bundled:sst")
    assert table.source == "bundled:sst"
    assert table.rows == [{"text": "a", "label": "pos"}]


def test_latin1_works_with_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text\ncafé\n".encode("latin-1"))
    assert read_table(path, encoding="latin-1").column("text") == ["café"]


@pytest.mark.parametrize(
    ("columns", "asked", "hint"),
    [
        (["text", "label"], "lable", "did you mean 'label'?"),
        (["text", "label"], "Label", "did you mean 'label'? (column names are case-sensitive)"),
        (["text;label"], "text", "is the delimiter right"),
        (["text", "label"], "zzz", None),
    ],
)
def test_missing_column_lists_columns_and_suggests(columns: list[str], asked: str, hint: str | None) -> None:
    table = Table("data.csv", [dict.fromkeys(columns, "x")], [2], columns, "line")
    with pytest.raises(DataError) as caught:
        table.column(asked)
    error = caught.value
    assert str(error).startswith(f"data.csv: no column named '{asked}'")
    assert ", ".join(repr(c) for c in columns) in error.message
    assert error.hint == hint or (hint is not None and hint in (error.hint or ""))


def test_missing_file_suggests_close_name(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text\na\n")
    with pytest.raises(DataError) as caught:
        read_table(tmp_path / "trian.csv")
    message = str(caught.value)
    assert "trian.csv" in message and "file not found" in message and "train.csv" in message


def test_plain_folder_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(DataError, match="is a folder") as caught:
        read_table(tmp_path)
    assert "train.jsonl" in str(caught.value)


# name, raw bytes, expected line (None: no line), words the message must contain
BAD_INPUTS: list[tuple[str, bytes, int | None, str]] = [
    ("empty.csv", b"", None, "no records"),
    ("header_only.csv", b"text,label\n", None, "only a header"),
    ("too_many.csv", b"text,label\na,pos\nb,neg\nc,d,extra\n", 4, "expected 2 fields"),
    ("too_few.tsv", b"text\tlabel\na\tpos\nb\n", 3, "found 1"),
    ("after_multiline.csv", b'text,label\n"a\nb",pos\nc,d,e\n', 4, "found 3"),
    ("dup_header.csv", b"text,text\na,b\n", 1, "twice"),
    ("empty_header.csv", b"text,,label\na,b,c\n", 1, "no name"),
    ("unclosed.csv", b'text,label\na,pos\nb,"neg\nc,pos\n', 3, "never closed"),
    ("bad.jsonl", b'{"a": 1}\n{"a": 2}\n{"a": 3,,}\n', 3, "invalid JSON"),
    ("array.jsonl", b'{"a": 1}\n\n[1, 2]\n', 3, "an array"),
    ("bigint.jsonl", b'{"a": 1}\n{"a": ' + b"9" * 5000 + b"}\n", 2, "invalid JSON"),
    ("blank.jsonl", b"\n  \n", None, "no records"),
    ("syntax.json", b'[\n  {"a": 1},\n  {"a": 2\n]\n', 4, "invalid JSON"),
    ("scalar_record.json", b'[{"a": 1}, "oops"]', None, "record 2 is a string"),
    ("empty_list.json", b"[]", None, "no records"),
    ("shape.json", b'{"a": 1, "b": "x"}', None, "unsupported JSON layout"),
    ("uneven.json", b'{"a": [1, 2], "b": [1]}', None, "different lengths"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, 1, "nested too deeply"),
    ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000, 1, "nested too deeply"),
    ("non_utf8.csv", b"text,label\na,pos\nb,neg\ncaf\xe9,pos\n", 4, "0xe9"),
    ("non_utf8.txt", b"one\ntwo\nthree\nfour \xff\n", 4, "0xff"),
    ("blank.txt", b"\n\r\n \n", None, "no records"),
    ("corrupt.parquet", b"PAR1 this is not parquet", None, "Parquet"),
    ("truncated.csv.gz", gzip.compress(b"text\na\n")[:-6], None, "decompress"),
    ("data.csv.zst", b"\x28\xb5\x2f\xfd", None, "zstd"),
]


@pytest.mark.parametrize(("name", "raw", "line", "words"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_data_error_at_the_line(
    tmp_path: Path, name: str, raw: bytes, line: int | None, words: str
) -> None:
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(DataError) as caught:
        read_table(path)
    error = caught.value
    assert error.line == line
    expected_prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(error).startswith(expected_prefix)
    assert words in str(error)


def test_encoding_error_hints_at_data_encoding(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"text\n\xe9\n")
    with pytest.raises(DataError, match=r"data\.encoding"):
        read_table(path)
    with pytest.raises(DataError, match="unknown text encoding"):
        read_table(path, encoding="no-such-codec")


def test_missing_file_in_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "nope" / "data.csv")


_ARBITRARY = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.text(alphabet='{}[]",:\\\n\r\t 0a1etrunlfs\ufeff', max_size=200).map(str.encode),
)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".txt"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_ARBITRARY)
def test_arbitrary_bytes_give_a_table_or_a_data_error(tmp_path: Path, suffix: str, raw: bytes) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(raw)
    try:
        table = read_table(path)
    except DataError as error:
        assert str(path) in str(error)
    else:
        assert len(table.rows) == len(table.lines) > 0
        assert all(list(row) == table.columns for row in table.rows)
