"""The one prediction-file writer: input rows plus what the model said, as JSONL, CSV or TSV.

Every ``predict_file`` path (label scores, a task predictor's answers, generated text) ends here, so the
file rules are the same for all: the format comes from the output's extension, the file is written to a
temporary name and moved into place (a failed run leaves no half-written file), and in CSV/TSV a cell
holding a list or mapping (entities, chat messages, a JSONL input's word lists) is JSON text.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmtune.data.table import Table
from lmtune.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
DELIMITED_SUFFIXES = (".csv", ".tsv")


def check_output(output: str | Path) -> Path:
    """``output`` as a Path, or a DataError when its extension names no format we write."""
    out = Path(output)
    if out.suffix.lower() not in JSONL_SUFFIXES + DELIMITED_SUFFIXES:
        raise DataError("output must end in .csv, .tsv or .jsonl", file=out)
    return out


def rename_taken(table: Table, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A result field named like an input column (NER's ``tags`` beside gold ``tags``) as
    ``predicted_<name>``, so the input column is kept."""
    taken = set(table.columns)
    return [{(f"predicted_{k}" if k in taken else k): v for k, v in res.items()} for res in results]


def write_predictions(output: str | Path, table: Table, results: list[dict[str, Any]], *,
                      cells: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                      keep_input_columns: bool = False) -> int:
    """Write each row of ``table`` with its result (same order); returns the rows written.

    JSONL: the input row updated with the result's fields. CSV/TSV: the input columns, then the fields of
    the first result as ``cells`` gives them (default: as they are). An input column that a result field
    replaces is left out of CSV/TSV, unless ``keep_input_columns`` (then both are written, the input's
    first).
    """
    out = check_output(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if out.suffix.lower() in JSONL_SUFFIXES:
            with tmp.open("w", encoding="utf-8") as f:
                for row, res in zip(table.rows, results, strict=True):
                    f.write(json.dumps({**row, **res}, ensure_ascii=False, default=str) + "\n")
        else:
            flat = [cells(res) for res in results] if cells is not None else results
            fields = list(flat[0]) if flat else []
            inputs = table.columns if keep_input_columns else [c for c in table.columns if c not in fields]
            with tmp.open("w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, delimiter="\t" if out.suffix.lower() == ".tsv" else ",")
                writer.writerow(inputs + fields)
                for row, res in zip(table.rows, flat, strict=True):
                    writer.writerow([_cell(row.get(c)) for c in inputs] + [_cell(res.get(k)) for k in fields])
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(results)


def _cell(value: Any) -> Any:
    """A CSV cell: lists and mappings as JSON text."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value
