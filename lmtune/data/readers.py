"""Read a data file into rows of plain Python values, remembering where each row came from.

Supported: CSV, TSV, JSON, JSON Lines, Parquet, plain text (one record per line) and datasets saved
with ``datasets.Dataset.save_to_disk``; text formats may be compressed with gzip, bz2 or xz.
Values are not converted here: CSV cells stay strings, JSON and Parquet values keep their types
(lists stay lists). Every problem with the input is raised as a :class:`DataError` naming the file
and, where there is one, the line.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from lmtune.data import bundled
from lmtune.data.conll import parse_conll
from lmtune.data.files import DECOMPRESSORS, check_data_path, check_regular_files, decode, read_bytes
from lmtune.data.table import Table
from lmtune.errors import DataError

__all__ = ["FORMATS", "MAX_COLUMNS", "Table", "detect_format", "read_table", "resolve_source"]

FORMATS = ("auto", "csv", "tsv", "json", "jsonl", "parquet", "text", "hf", "conll")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "jsonl"}
_EXTENSIONS |= {".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
_EXTENSIONS |= {".conll": "conll", ".bio": "conll", ".iob": "conll"}  # token-per-line files (data/conll.py)
_HF_MARKERS = ("dataset_info.json", "state.json")
_HF_DICT_MARKER = "dataset_dict.json"
# The largest value csv.field_size_limit accepts everywhere (it is a C long, 32-bit on Windows).
_CSV_FIELD_LIMIT = 2**31 - 1
# Most columns a data set may have. lmtune reads a handful (text, label, ...); a table is a dict per row, so a
# file with a million columns (a wrong delimiter, a transposed export, a hostile header) would cost a million
# entries per row. 10,000 leaves room for wide exports (a text beside a few thousand feature columns).
MAX_COLUMNS = 10_000
_JSON_SHAPES = (
    'a list of objects ([{"text": ...}, ...]), an object holding one such list '
    '({"data": [...]}), or an object of equal-length column lists ({"text": [...], "label": [...]})'
)


def resolve_source(source: str | Path) -> Path:
    """The path a data source names: ``bundled:NAME`` is the bundled set's cached file (written on first
    use), anything else a path (``~`` expanded)."""
    if isinstance(source, str) and source.startswith("bundled:"):
        # Through the module (not a name bound at import), so a test can stand in for the registry.
        return Path(bundled.resolve_bundled_data(source.removeprefix("bundled:")))
    return Path(source).expanduser()


def read_table(source: str | Path, *, format: str = "auto", encoding: str = "utf-8") -> Table:
    """Read ``source`` (a file, a saved-dataset folder, or ``bundled:NAME``) into a :class:`Table`.

    ``format`` is one of :data:`FORMATS`; ``"auto"`` decides from the extension (or the folder
    contents). ``encoding`` applies to the text formats and is decoded strictly.
    """
    display = str(source)
    if format not in FORMATS:
        raise DataError(
            f"unknown data format '{format}'; choose one of: {', '.join(FORMATS)}",
            file=display,
            field="data.format",
        )
    path = resolve_source(source)
    check_data_path(path, display)
    fmt = _detect(path, display) if format == "auto" else format
    if fmt == "hf":
        return _read_hf(path, display)
    if path.is_dir():
        raise DataError(f"is a folder, but format '{fmt}' needs a file", file=display)
    raw = read_bytes(path, display)
    if not raw:
        raise DataError("no records: the file is empty", file=display)
    if fmt == "parquet":
        return _read_parquet(raw, display)
    text = decode(raw, encoding, display)
    if fmt in ("csv", "tsv"):
        return _read_delimited(text, display, "," if fmt == "csv" else "\t", fmt.upper())
    if fmt == "jsonl":
        return _read_jsonl(text, display)
    if fmt == "json":
        return _read_json(text, display)
    if fmt == "conll":
        return parse_conll(text, display)
    return _read_text(text, display)


def detect_format(path: Path) -> str:
    """The format of ``path`` from its extension (ignoring .gz/.bz2/.xz), or "hf" for a saved dataset."""
    return _detect(Path(path), str(path))


def _detect(path: Path, display: str) -> str:
    if path.is_dir():
        if any((path / marker).is_file() for marker in (*_HF_MARKERS, _HF_DICT_MARKER)):
            return "hf"
        raise DataError(
            "is a folder, not a data file or a dataset saved with datasets' save_to_disk",
            file=display,
            hint=_folder_hint(path),
        )
    name = path.name.lower()
    if name.endswith((".zst", ".zstd")):
        raise DataError(
            "zstd-compressed files are not supported",
            file=display,
            hint="decompress it first (zstd -d FILE) or compress with gzip, bz2 or xz",
        )
    for compression in DECOMPRESSORS:
        name = name.removesuffix(compression)
    fmt = _EXTENSIONS.get(Path(name).suffix)
    if fmt is None:
        known = ", ".join(_EXTENSIONS)
        raise DataError(
            f"cannot tell the data format from the file name '{path.name}'",
            file=display,
            hint=f"use one of the extensions {known} (optionally + .gz/.bz2/.xz), or set data.format",
        )
    return fmt


def _folder_hint(path: Path) -> str | None:
    try:
        files = sorted(p.name for p in path.iterdir() if p.is_file())
    except OSError:
        return None
    data_files = [f for f in files if any(f.lower().endswith(ext) for ext in _EXTENSIONS)]
    if data_files:
        return "point to one file in it, e.g. " + ", ".join(repr(str(path / f)) for f in data_files[:5])
    return "point to a data file (.csv, .jsonl, ...) or to a folder written by Dataset.save_to_disk"


def _read_delimited(text: str, display: str, delimiter: str, kind: str) -> Table:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    # strict: an unclosed quote is an error instead of silently swallowing the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    start = end = 0
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip() and (not header or len(header) > 1)):
                continue
            if header is None:
                header = _check_header(fields, display, start)
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"expected {len(header)} fields (as in the header) but found {len(fields)}",
                    file=display,
                    line=start,
                    hint=f"every row needs one value per column; a value containing {delimiter!r} must be in double quotes",
                )
            rows.append(dict(zip(header, fields, strict=True)))
            lines.append(start)
    except csv.Error as exc:
        record_start = end + 1
        if "unexpected end of data" in str(exc):
            message = "a quoted field is never closed (the file ends inside quotes)"
        else:
            message = f"malformed {kind} record: {exc}"
        raise DataError(
            message,
            file=display,
            line=record_start,
            hint='a field that contains quotes must be quoted itself, with inner quotes doubled ("")',
        ) from None
    if header is None:
        raise DataError(f"no records: the {kind} file has no header row", file=display)
    if not rows:
        raise DataError(f"no records: the {kind} file has only a header row", file=display)
    return Table(display, rows, lines, header, "line")


def _check_header(fields: list[str], display: str, line: int) -> list[str]:
    _check_column_count(len(fields), display, line, "the header has")
    header = [name.strip() for name in fields]
    seen: set[str] = set()
    for position, name in enumerate(header, start=1):
        if not name:
            raise DataError(f"header column {position} has no name", file=display, line=line)
        if name in seen:
            raise DataError(f"the header names column '{name}' twice", file=display, line=line)
        seen.add(name)
    return header


def _check_column_count(count: int, display: str, line: int | None, what: str) -> None:
    """A DataError when a table would have more than :data:`MAX_COLUMNS` columns (``what``: "the header has")."""
    if count > MAX_COLUMNS:
        raise DataError(
            f"{what} {count} columns; lmtune reads at most {MAX_COLUMNS}",
            file=display,
            line=line,
            hint="check the delimiter (csv vs tsv) and the layout; keep the columns the run needs "
            "(text, label, ...) in a narrower file",
        )


def _parse_json(text: str, display: str, first_line: int = 1) -> Any:
    """json.loads with every failure as a DataError at the right line (``first_line`` = line 1 of text)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON: {exc.msg} (column {exc.colno})", file=display, line=first_line + exc.lineno - 1
        ) from None
    except RecursionError:
        raise DataError("JSON is nested too deeply to read", file=display, line=first_line) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python will convert
        raise DataError(f"invalid JSON value: {exc}", file=display, line=first_line) from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _read_jsonl(text: str, display: str) -> Table:
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    # Split on "\n" only: str.splitlines would also break on U+2028 etc., legal inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = _parse_json(line, display, number)
        except DataError as exc:
            if number == 1 and (line.strip() == "{" or line.lstrip().startswith("[")):
                exc.hint = (
                    "this looks like one JSON document, not JSON Lines: use .json or set data.format: json"
                )
            raise
        if not isinstance(value, dict):
            raise DataError(
                f"expected one JSON object per line, found {_json_type(value)}",
                file=display,
                line=number,
                hint='each line must be one object, like {"text": "...", "label": "..."}',
            )
        records.append(value)
        lines.append(number)
    if not records:
        raise DataError("no records: the file has only blank lines", file=display)
    return _table_from_records(display, records, lines, "line")


def _read_json(text: str, display: str) -> Table:
    if not text.strip():
        raise DataError("no records: the file is blank", file=display)
    try:
        document = _parse_json(text, display)
    except DataError as exc:
        if exc.message.startswith("invalid JSON: Extra data"):
            exc.hint = (
                "this looks like JSON Lines (one object per line): use .jsonl or set data.format: jsonl"
            )
        raise
    where = ""
    if isinstance(document, dict):
        lists = {k: v for k, v in document.items() if isinstance(v, list)}
        # A list holding objects is a list of records ({"data": [...]}, maybe beside metadata keys)
        # unless every key holds a list, which is the column layout.
        holders = [k for k, v in lists.items() if any(isinstance(x, dict) for x in v)]
        if len(holders) == 1 and (len(document) == 1 or len(lists) < len(document)):
            where = holders[0]
        elif document and len(lists) == len(document):
            return _table_from_columns(display, lists)
        else:
            raise DataError(f"unsupported JSON layout: expected {_JSON_SHAPES}", file=display)
        document = document[where]
        where = f" in '{where}'"
    if not isinstance(document, list):
        raise DataError(f"the JSON document is {_json_type(document)}; expected {_JSON_SHAPES}", file=display)
    if not document:
        raise DataError(f"no records: the JSON list{where} is empty", file=display)
    for index, record in enumerate(document, start=1):
        if not isinstance(record, dict):
            raise DataError(
                f"record {index}{where} is {_json_type(record)}, not an object",
                file=display,
                hint=f"expected {_JSON_SHAPES}",
            )
    return _table_from_records(display, document, list(range(1, len(document) + 1)), "record")


def _table_from_columns(display: str, columns: dict[str, list[Any]]) -> Table:
    _check_column_count(len(columns), display, None, "the JSON object has")
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"'{name}': {n}" for name, n in lengths.items())
        raise DataError(f"the column lists have different lengths ({listed})", file=display)
    count = next(iter(lengths.values()))
    if count == 0:
        raise DataError("no records: the column lists are empty", file=display)
    rows = [{name: values[i] for name, values in columns.items()} for i in range(count)]
    return Table(display, rows, list(range(1, count + 1)), list(columns), "record")


def _table_from_records(display: str, records: list[dict[str, Any]], lines: list[int], kind: str) -> Table:
    columns = list(dict.fromkeys(key for record in records for key in record))
    _check_column_count(len(columns), display, None, "the records have")
    rows = [{name: record.get(name) for name in columns} for record in records]
    return Table(display, rows, lines, columns, kind)


def _read_text(text: str, display: str) -> Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            rows.append({"text": line})
            lines.append(number)
    if not rows:
        raise DataError("no records: the file has only blank lines", file=display)
    return Table(display, rows, lines, ["text"], "line")


def _read_parquet(raw: bytes, display: str) -> Table:
    try:
        table = pq.read_table(pa.BufferReader(raw))
        _check_column_count(table.num_columns, display, None, "the file has")
        rows = table.to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        raise DataError(
            f"cannot read the file as Parquet: {exc}",
            file=display,
            hint="the file may be corrupt or not Parquet; re-export it, or set data.format if it is another format",
        ) from None
    return _rows_table(display, rows, table.column_names)


def _read_hf(path: Path, display: str) -> Table:
    if not path.is_dir():
        raise DataError(
            "format 'hf' needs a folder written by datasets' Dataset.save_to_disk, not a file", file=display
        )
    if (path / _HF_DICT_MARKER).is_file():
        _raise_dataset_dict(path, display)
    check_regular_files(path, display)
    try:
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            _raise_dataset_dict(path, display)
        _check_column_count(len(dataset.column_names), display, None, "the dataset has")
        rows = dataset.to_list()
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types for a damaged folder
        raise DataError(f"cannot load the saved dataset: {exc}", file=display) from None
    return _rows_table(display, rows, list(dataset.column_names))


def _raise_dataset_dict(path: Path, display: str) -> NoReturn:
    try:
        splits = [str(s) for s in json.loads((path / _HF_DICT_MARKER).read_text())["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
    example = repr(str(path / splits[0])) if splits else "one split's subfolder"
    raise DataError(
        f"this folder holds several splits ({', '.join(splits)}), not one dataset",
        file=display,
        hint=f"point to one split folder, e.g. {example}",
    )


def _rows_table(display: str, rows: list[dict[str, Any]], columns: list[str]) -> Table:
    if len(set(columns)) != len(columns):
        twice = sorted(name for name, n in Counter(columns).items() if n > 1)
        raise DataError(f"the data has duplicate column names: {', '.join(twice)}", file=display)
    if not rows:
        raise DataError("no records: the data has no rows", file=display)
    return Table(display, rows, list(range(1, len(rows) + 1)), columns, "row")
