"""Raw-text documents of a language-model run (``causal_lm``, ``masked_lm``): read from a text file or a text
column, de-duplicated and split.

A ``.txt`` file is one document per file, per blank-line-separated paragraph or per line
(``data.document_split``); a table is one document per row of ``data.text_column``, empty rows skipped and
counted (or a DataError with ``data.empty_text: error``). Duplicates are dropped (``data.deduplicate``),
validation/test held out of train by ``data.split_seed`` unless they have files of their own, evaluation
documents that also occur in train dropped, and ``data.max_samples`` sampled per split.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from lmtune.config import DataConfig
from lmtune.data.mixing import group_text_lines
from lmtune.data.pii import read_data_table
from lmtune.data.readers import detect_format
from lmtune.data.splits import first_occurrences, given_splits, hold_out
from lmtune.errors import DataError

# Documents of one split, and facts about reading them (source, rows read, skipped, duplicates removed).
SplitDocuments = tuple[list[str], dict[str, Any]]


def read_documents(source: str, d: DataConfig) -> SplitDocuments:
    """The documents of one source, and facts about reading it; a DataError naming the file if none."""
    table = read_data_table(source, d)
    fmt: str = d.format
    if d.train_mix is not None and source == d.train:
        fmt = "mixed"  # read_data_table made each text source's lines documents already
    elif fmt == "auto" and not source.startswith("bundled:"):
        fmt = detect_format(Path(source))
    skipped = 0
    docs: list[str] = []
    if fmt == "text" and d.document_split != "line":
        docs = [row["text"] for row in group_text_lines(table, d.document_split).rows]
    else:
        for value, line in zip(table.column(d.text_column), table.lines, strict=True):
            if value is None or (isinstance(value, str) and not value.strip()):
                if d.empty_text == "error":
                    raise DataError("empty text", file=source, line=line, field=d.text_column,
                                    hint="set data.empty_text: skip to drop such rows (they are counted)")
                skipped += 1
                continue
            if not isinstance(value, str):
                raise DataError(f"expected text, found {type(value).__name__}", file=source, line=line,
                                field=d.text_column)
            docs.append(value)
    if not docs:
        raise DataError("no text to train on", file=source)
    return docs, {"source": source, "rows_read": len(table), "skipped_empty": skipped}


def split_documents(d: DataConfig) -> dict[str, SplitDocuments]:
    """Every split's documents (``train``, and ``validation`` / ``test`` where there are any) with their facts."""
    train, train_info = read_documents(d.train, d)
    if d.deduplicate:
        unique = first_occurrences(train, str)
        train_info["duplicates_removed"] = len(train) - len(unique)
        train = unique
    train, held, sources = hold_out(train, d, what="document(s)", kind="text",
                                    hint="give data.validation (and data.test) files, or "
                                    "data.document_split: paragraph for a long text file")
    out: dict[str, SplitDocuments] = {s: (held[s], {"source": sources[s]}) for s in held}
    for s, src in given_splits(d).items():
        out[s] = read_documents(src, d)
    if d.deduplicate:
        seen = set(train)
        for s in ("validation", "test"):
            if s in out:
                docs, info = out[s]
                clean = [x for x in first_occurrences(docs, str) if x not in seen]
                info["duplicates_removed"] = len(docs) - len(clean)
                out[s] = (clean, info)
    out["train"] = (train, train_info)
    if d.max_samples:
        rng = random.Random(d.split_seed)
        for s, (docs, info) in out.items():
            if len(docs) > d.max_samples:
                out[s] = (rng.sample(docs, d.max_samples), info)
    return out
