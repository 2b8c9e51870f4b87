"""The records read from one source (:class:`Table`), with where each came from.

Every reader returns one: the file readers (``readers.py``) and the token-per-line reader
(``conll.py``). It sits below both so that neither imports the other for it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from lmtune.errors import DataError

# How many locations a message lists before it says "...".
SHOWN_LOCATIONS = 20


def format_locations(locations: list[int], limit: int = SHOWN_LOCATIONS) -> str:
    """The first ``limit`` line (or record) numbers for a message: ``"3, 8, 12 ..."``."""
    return ", ".join(map(str, locations[:limit])) + (" ..." if len(locations) > limit else "")


@dataclass
class Table:
    """Records read from one source, with where each came from.

    ``lines[i]`` locates ``rows[i]`` in the source; ``location_kind`` says what it counts:
    ``"line"`` (physical line where the record starts), ``"record"`` (1-based element of a JSON
    document) or ``"row"`` (1-based row of a Parquet file or saved dataset). Every row holds every
    column, ``None`` where a record lacked it.
    """

    source: str
    rows: list[dict[str, Any]]
    lines: list[int]
    columns: list[str]
    location_kind: str

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        """All values of column ``name``; a DataError listing the real columns if there is none."""
        if name not in self.columns:
            listed = ", ".join(repr(c) for c in self.columns)
            raise DataError(
                f"no column named '{name}'; the columns are: {listed}",
                file=self.source,
                hint=column_suggestion(name, self.columns),
            )
        return [row.get(name) for row in self.rows]


def column_suggestion(name: str, columns: list[str]) -> str | None:
    """A hint for a column ``name`` that is not among ``columns``: a wrong delimiter, case, or a close name."""
    if len(columns) == 1 and any(sep in columns[0] for sep in ";|\t,"):
        return f"the only column is named {columns[0]!r}: is the delimiter right (csv vs tsv)?"
    by_lower = {c.lower(): c for c in columns}
    if name.lower() in by_lower:
        return f"did you mean '{by_lower[name.lower()]}'? (column names are case-sensitive)"
    close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
