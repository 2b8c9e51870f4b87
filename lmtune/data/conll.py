"""CoNLL-style files: one token per line with whitespace- or tab-separated columns, a blank line between
sentences, ``-DOCSTART-`` lines skipped.

``parse_conll`` gives a :class:`~lmtune.data.table.Table` with one row per sentence: ``tokens`` (the
first column), ``tags`` (the last column; None in a one-column file, e.g. text to predict) and
``conll_columns`` (every column, for a config that picks others: ``data.conll_token_column`` /
``data.conll_tag_column``). A row's line is the sentence's first line, so word ``i`` of a sentence is on
line ``line + i``.
"""

from __future__ import annotations

import re
from typing import Any

from lmtune.data.table import Table
from lmtune.errors import DataError

DOCSTART = "-DOCSTART-"
COLUMNS = ("tokens", "tags", "conll_columns")
# Line breaks: \n, \r\n or a lone \r. Not str.splitlines, which also breaks at \x0b, \x0c, \x1c-\x1e, \x85
# and U+2028/9 (a latin-1 file's \x85 is one), so every later line number would be off.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _fields(line: str) -> list[str]:
    # Tabs, when the line has any, are the separators (a token may then hold spaces); else any whitespace.
    if "\t" in line:
        return [f.strip() for f in line.rstrip("\r\n").split("\t")]
    return line.split()


def parse_conll(text: str, source: str) -> Table:
    """Sentences of a CoNLL-style text; a line whose column count differs from its sentence's first line
    is a DataError naming it."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    current: list[list[str]] = []
    start = 0

    def close() -> None:
        if current:
            columns = [list(col) for col in zip(*current, strict=True)]
            rows.append({"tokens": columns[0], "tags": columns[-1] if len(columns) > 1 else None,
                         "conll_columns": columns})
            lines.append(start)
            current.clear()

    for number, raw in enumerate(_LINE_BREAK.split(text), 1):
        if not raw.strip():
            close()
            continue
        fields = _fields(raw)
        if fields[0] == DOCSTART:
            close()
            continue
        if any(not f for f in fields):
            raise DataError("empty column (two tabs in a row, or a tab at the end of the line)", file=source,
                            line=number)
        if not current:
            start = number
        elif len(fields) != len(current[0]):
            raise DataError(f"this line has {len(fields)} column(s), the sentence's first line ({start}) has "
                            f"{len(current[0])}", file=source, line=number,
                            hint="every token line of a sentence needs the same columns; sentences are "
                            "separated by blank lines")
        current.append(fields)
    close()
    if not rows:
        raise DataError("no sentences: the file holds only blank or -DOCSTART- lines", file=source)
    return Table(source=source, rows=rows, lines=lines, columns=list(COLUMNS), location_kind="line")


def pick_columns(table: Table, token_column: int, tag_column: int) -> tuple[list[list[str]], list[list[str] | None]]:
    """Tokens and tags of every sentence from the configured CoNLL column indices (negative counts from
    the end); a sentence with too few columns is a DataError."""
    tokens: list[list[str]] = []
    tags: list[list[str] | None] = []
    for row, line in zip(table.rows, table.lines, strict=True):
        columns = row["conll_columns"]
        for index, what in ((token_column, "data.conll_token_column"), (tag_column, "data.conll_tag_column")):
            if not -len(columns) <= index < len(columns):
                raise DataError(f"the sentence has {len(columns)} column(s); {what} is {index}", file=table.source,
                                line=line, field=what)
        tokens.append(columns[token_column])
        same = len(columns) == 1 or (token_column % len(columns)) == (tag_column % len(columns))
        tags.append(None if same else columns[tag_column])
    return tokens, tags
