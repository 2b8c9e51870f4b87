"""Mix several training sources by weight into one table (``data.train`` given as a list).

Semantics (the choices of HF ``datasets.interleave_datasets`` with ``probabilities`` and
``stopping_strategy``, and LLaMA-Factory's ``interleave_under``/``interleave_over``, made exact):

- **Weights are shares of the epoch.** Source *i* with weight *w_i* contributes ``round(N * w_i / W)``
  examples to the mixed training data (``W`` the sum of the weights), not a random number around it: the
  counts are quotas, so a 3:1 mix is 3:1 in every run, and only which examples and their order are drawn.
- **The epoch length** ``N`` is set by ``data.mix_stopping``: ``first_exhausted`` (default) ends the epoch
  when the source with the least data for its weight is used up (every example of it once, the others a
  seeded sample without repetition: nothing repeats); ``all_exhausted`` ends it when every source is used
  up (every example at least once; a source short for its weight is repeated in whole passes plus a seeded
  sample). Repetition is what oversampling means, so that needs ``data.deduplicate: false`` and evaluation
  files of their own (config validation says so).
- **Deterministic**: the samples and the interleaving are drawn from ``data.split_seed``; the same config
  gives the same mixed table.
- **Columns**: each source may rename its columns to the names the config reads (``rename``); after that,
  every source must have the same columns (a DataError naming the file and the columns otherwise), and each
  row gains :data:`MIX_COLUMN`, the source it came from (``evaluate.slices: [mix_source]`` gives per-source
  metrics).
- **Evaluation** splits without files of their own are held out of the mixed table by the task, as for one
  source, so they are pooled with the mix's shares; the counts per source are recorded (:func:`recording`,
  the run folder's ``data.json`` ``mix``, and the report).

Streaming mixes interleave the sources' streams instead (:mod:`lmtune.data.streaming`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
from collections.abc import Iterator
from typing import Any

from lmtune.config import DataConfig
from lmtune.config.mix import MIX_COLUMN, MixSource
from lmtune.data.table import Table, column_suggestion
from lmtune.errors import DataError

__all__ = ["MIX_COLUMN", "check_same_columns", "describe_mix", "group_text_lines", "mix_record", "mix_tables", "note_mix", "quotas", "recording",
           "rename_columns"]

_RECORDING: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar("mix_recording",
                                                                                         default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[dict[str, Any]]]:
    """Collect the record (:func:`mix_record`) of every mix read inside the block (the train workflow puts the
    last into the run folder's ``data.json`` under ``mix``)."""
    records: list[dict[str, Any]] = []
    token = _RECORDING.set(records)
    try:
        yield records
    finally:
        _RECORDING.reset(token)


def quotas(sizes: list[int], weights: list[float], stopping: str) -> list[int]:
    """Examples each source contributes to one epoch of the mix: ``round(N * w_i / W)`` where ``N`` ends the
    epoch when the first source (``first_exhausted``) or every source (``all_exhausted``) is used up.

    >>> quotas([100, 1000], [1, 1], "first_exhausted"), quotas([100, 1000], [1, 1], "all_exhausted")
    ([100, 100], [1000, 1000])
    """
    total = sum(weights)
    epochs = [n * total / w for n, w in zip(sizes, weights, strict=True)]
    length = min(epochs) if stopping == "first_exhausted" else max(epochs)
    out = [round(length * w / total) for w in weights]
    if stopping == "first_exhausted":
        # Rounding never asks a source for more than it has.
        out = [min(q, n) for q, n in zip(out, sizes, strict=True)]
    return out


def _draw(n_rows: int, quota: int, rng: random.Random) -> list[int]:
    """Indices of ``quota`` rows of ``n_rows``: whole passes over every row, then a sample without repetition."""
    passes, rest = divmod(quota, n_rows)
    return [i for _ in range(passes) for i in range(n_rows)] + rng.sample(range(n_rows), rest)


def rename_columns(table: Table, source: MixSource) -> Table:
    """``table`` with ``source.rename`` applied (a DataError naming the file when a renamed column is missing)."""
    if not source.rename:
        return table
    missing = [c for c in source.rename if c not in table.columns]
    if missing:
        raise DataError(f"data.train source '{source.path}' renames column '{missing[0]}', which it does not have;"
                        f" the columns are: {', '.join(map(repr, table.columns))}", file=table.source,
                        hint=column_suggestion(missing[0], table.columns))
    columns = [source.rename.get(c, c) for c in table.columns]
    if len(set(columns)) < len(columns):
        raise DataError(f"data.train source '{source.path}': renaming gives two columns the same name "
                        f"({', '.join(columns)})", file=table.source)
    rows = [{source.rename.get(k, k): v for k, v in row.items()} for row in table.rows]
    return Table(table.source, rows, table.lines, columns, table.location_kind)


def check_same_columns(tables: list[Table], sources: list[MixSource]) -> None:
    """A DataError naming the first source whose columns (after renaming) differ from the first source's."""
    first = set(tables[0].columns)
    for table in tables[1:]:
        have = set(table.columns)
        if have == first:
            continue
        missing, extra = sorted(first - have), sorted(have - first)
        parts = ([f"lacks {', '.join(map(repr, missing))}"] if missing else []) + (
            [f"has {', '.join(map(repr, extra))} besides"] if extra else [])
        hint = column_suggestion(missing[0], table.columns) if missing else None
        raise DataError(
            f"the sources of a mixed data.train must have the same columns; this one {' and '.join(parts)} "
            f"those of '{sources[0].path}' ({', '.join(map(repr, tables[0].columns))})", file=table.source,
            hint=(hint + "; " if hint else "") + "map its columns with rename: {THEIRS: OURS} in its entry of "
            "data.train, or make the files agree")


def group_text_lines(table: Table, document_split: str) -> Table:
    """A plain-text file's lines (:func:`~lmtune.data.readers.read_table` leaves out the blank ones) as one row
    per document (``data.document_split``): per ``line``, per ``paragraph`` (a jump in line numbers is a
    break), or the whole ``file`` (paragraph breaks kept as blank lines). Each row's line is its first."""
    if document_split == "line":
        return table
    docs: list[list[str]] = []
    starts: list[int] = []
    last: int | None = None
    for row, line in zip(table.rows, table.lines, strict=True):
        if last is None or (line != last + 1 and document_split == "paragraph"):
            docs.append([])
            starts.append(line)
        elif line != last + 1:
            docs[-1].append("")  # keep the paragraph break inside a whole-file document
        docs[-1].append(row["text"])
        last = line
    return Table(table.source, [{"text": "\n".join(doc)} for doc in docs], starts, ["text"], table.location_kind)


def mix_tables(tables: list[Table], d: DataConfig, formats: list[str] | None = None) -> Table:
    """One table of the sources' rows by ``data.train_mix``'s weights (see the module docstring), every row
    tagged with its source in :data:`MIX_COLUMN`; its record goes to the active :func:`recording`.

    ``formats`` (each source's, detected): a plain-text source's lines become documents
    (:func:`group_text_lines`, ``data.document_split``) in a column named ``data.text_column``, so a text
    file mixes with tabular sources.
    """
    sources = d.train_mix or []
    tables = list(tables)
    for i, fmt in enumerate(formats or []):
        if fmt == "text":
            grouped = group_text_lines(tables[i], d.document_split)
            tables[i] = rename_columns(grouped, MixSource(path=sources[i].path, rename={"text": d.text_column})
                                       ) if d.text_column != "text" else grouped
    tables = [rename_columns(t, s) for t, s in zip(tables, sources, strict=True)]
    check_same_columns(tables, sources)
    for table in tables:
        if MIX_COLUMN in table.columns:
            raise DataError(f"column '{MIX_COLUMN}' is where a mixed data.train records each row's source, and "
                            "this source has one already", file=table.source,
                            hint=f"rename it in the source's entry: rename: {{{MIX_COLUMN}: OTHER}}")
        if not table.rows:
            raise DataError("no records", file=table.source)
    sizes = [len(t) for t in tables]
    counts = quotas(sizes, [s.weight for s in sources], d.mix_stopping)
    rng = random.Random(f"mix:{d.split_seed}")
    picked: list[tuple[dict[str, Any], int]] = []
    for table, source, quota in zip(tables, sources, counts, strict=True):
        for i in _draw(len(table), quota, rng):
            picked.append(({**table.rows[i], MIX_COLUMN: source.name}, table.lines[i]))
    # The interleaving: one seeded shuffle of the whole epoch (the sources' shares hold in every stretch of
    # it on average, as with interleave_datasets' sampling, but the totals are exact).
    rng.shuffle(picked)
    kinds = {t.location_kind for t in tables}
    mixed = Table(d.train, [r for r, _ in picked], [line for _, line in picked],
                  [*tables[0].columns, MIX_COLUMN], kinds.pop() if len(kinds) == 1 else "record")
    note_mix(mix_record(d, sizes, counts))
    return mixed


def note_mix(record: dict[str, Any]) -> None:
    """Hand a mix's record to the active :func:`recording`, if any."""
    recorded = _RECORDING.get()
    if recorded is not None:
        recorded.append(record)


def mix_record(d: DataConfig, sizes: list[int], counts: list[int]) -> dict[str, Any]:
    """What ``data.json`` (``mix``), the report and ``lmtune data inspect`` show about a mix: per source its
    weight, the share that weight asks for, the rows read and the rows the epoch takes (``repeats``: how many
    of those are copies)."""
    sources = d.train_mix or []
    total_weight = sum(s.weight for s in sources)
    total = sum(counts)
    return {
        "stopping": d.mix_stopping, "seed": d.split_seed, "examples": total,
        "sources": [{"source": s.name, "weight": s.weight, "target_share": s.weight / total_weight,
                     "rows": n, "taken": c, "share": c / total if total else math.nan,
                     "repeats": max(0, c - n), "unused": max(0, n - c)}
                    for s, n, c in zip(sources, sizes, counts, strict=True)],
    }


def describe_mix(record: dict[str, Any]) -> tuple[str, list[str], list[list[Any]]]:
    """A mix record (:func:`mix_record`, or a streamed mix's) as a sentence, a table header and rows, for the
    report and ``lmtune data inspect``."""
    header = ["source", "weight", "target share", "rows read", "examples in the mix", "share", "repeats",
              "unused"]
    rows = [[s["source"], f"{s['weight']:g}", f"{s['target_share']:.1%}", s.get("rows", "–"),
             s.get("taken", "–"), f"{s['share']:.1%}" if s.get("share") is not None else "–",
             s.get("repeats", "–"), s.get("unused", "–")] for s in record["sources"]]
    if record.get("streamed"):
        sentence = (f"Mixed data.train, streamed: each example drawn from a source with its target share "
                    f"(datasets.interleave_datasets, stopping {record['stopping']}, seeded per epoch); counts are "
                    "not known in advance.")
    else:
        sentence = (f"Mixed data.train: {record['examples']:,} examples per epoch (data.mix_stopping "
                    f"{record['stopping']}, data.split_seed {record['seed']}); validation/test splits without files "
                    "of their own are held out of these, pooled. Per-source metrics: evaluate.slices: "
                    f"[{MIX_COLUMN}].")
    return sentence, header, rows
