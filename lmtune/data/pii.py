"""Find personal data in a data set and redact, mask or drop it before tokenisation (``data.pii``).

One place applies the policy to every task's data: :func:`read_data_table` reads a source as
:func:`~lmtune.data.readers.read_table` does and, with ``data.pii`` set, scans or rewrites its text cells
(strings; lists of words, replaced word for word so tags stay aligned; message contents in nested
records), leaving label, tag, id and offset columns alone. ``redact`` replaces a finding by ``<TYPE>``
(refused for data holding character offsets, whose lengths it would change), ``mask`` masks it character
for character, ``drop`` leaves out its row, ``error`` stops at it (file:line, column, type; the value
masked), ``scan`` only records. What was found is recorded per source and column (:func:`recording`, the
run folder's ``pii.json``), and a rewriting policy is saved with the model (:func:`model_policy`) so
prediction inputs get the same treatment (:func:`apply_saved_policy`).

The analyzer itself (offline presidio; which recognizers, what they miss) is :mod:`lmtune.data.pii_engine`;
it is built on first use, once per process.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtune.config.schema import PII_ENTITIES, DataConfig
from lmtune.data.mixing import MIX_COLUMN, mix_tables
from lmtune.data.readers import detect_format, read_table, resolve_source
from lmtune.data.table import Table, format_locations
from lmtune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lmtune.data.pii_engine import Finding, NerNames, PiiScanner

__all__ = [
    "PII_ENTITIES",
    "PII_FILE",
    "SourceReport",
    "apply_pii",
    "apply_saved_policy",
    "mask_example",
    "model_policy",
    "protected_columns",
    "read_data_table",
    "recording",
    "run_record",
    "scanner",
    "split_names",
]

log = logging.getLogger("lmtune")

# Policies that rewrite text (and so are applied again to prediction inputs of a model trained with them).
REWRITING = ("redact", "mask")
# Masked examples kept per column in a report.
EXAMPLES_PER_COLUMN = 5
# Lines of dropped rows kept in a report.
DROPPED_LINES_KEPT = 1000
# Keys of nested records that name a speaker or a kind, never hold free text (chat messages).
_STRUCTURAL_KEYS = frozenset({"role", "from", "type"})
# What a run folder records about personal data (written by the train workflow).
PII_FILE = "pii.json"


@functools.cache
def scanner(entities: tuple[str, ...] | None = None, score: float = 0.4, ner: NerNames | None = None) -> PiiScanner:
    """One scanner per setting, shared by every read in the process (the analyzer is built once)."""
    from lmtune.data.pii_engine import PiiScanner  # noqa: PLC0415  (presidio and spaCy: ~200 MB and ~3 s, loaded only when personal data is scanned)

    return PiiScanner(entities, score, ner)


def _ner_names(source: str, labels: list[str] | None) -> NerNames:
    """:func:`lmtune.data.pii_engine.ner_names`."""
    from lmtune.data.pii_engine import ner_names  # noqa: PLC0415  (presidio and spaCy: ~200 MB and ~3 s, loaded only when personal data is scanned)

    return ner_names(source, labels)


def config_scanner(d: DataConfig, entities: list[str] | None = None, score: float | None = None) -> PiiScanner:
    """The scanner ``d``'s settings ask for (``pii_entities``, ``pii_score``, the ``pii_ner`` model), with
    ``entities`` / ``score`` in their place where given."""
    ner = _ner_names(d.pii_ner, d.pii_ner_labels) if d.pii_ner else None
    chosen = entities or d.pii_entities
    return scanner(tuple(chosen) if chosen else None, d.pii_score if score is None else score, ner)


def mask_example(value: str) -> str:
    """A found value shown without giving it away: the first character of each run of letters or digits,
    then ``***``; a domain keeps its last part (``john.smith@example.com`` -> ``j***.s***@e***.com``)."""
    tail = ""
    if "." in value and ("@" in value or "/" in value or value.count(".") == 1):
        head, _, suffix = value.rpartition(".")
        if suffix.isalpha() and len(suffix) <= 6:
            value, tail = head, "." + suffix
    return re.sub(r"(\w)\w*", lambda m: m.group(1) + "***", value) + tail


# ---------------------------------------------------------------------------------------------- reports
@dataclass
class ColumnReport:
    """What was found in one column: counts per entity type, rows touched and a few masked examples."""

    counts: Counter[str] = field(default_factory=Counter)
    rows: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON: ``counts`` (per type), ``rows`` (rows with a finding), ``examples`` (line, type, masked)."""
        return {"counts": dict(sorted(self.counts.items())), "rows": self.rows, "examples": self.examples}


@dataclass
class SourceReport:
    """What :func:`apply_pii` found in one source and what it did."""

    source: str
    splits: list[str]
    policy: str
    rows: int = 0
    rows_with_pii: int = 0
    dropped_lines: list[int] = field(default_factory=list)
    columns: dict[str, ColumnReport] = field(default_factory=dict)
    location_kind: str = "line"

    @property
    def counts(self) -> Counter[str]:
        """Findings per entity type over every column."""
        total: Counter[str] = Counter()
        for column in self.columns.values():
            total.update(column.counts)
        return total

    def to_dict(self) -> dict[str, Any]:
        """JSON for ``pii.json`` and ``lmtune data scan --json``."""
        return {"source": self.source, "splits": self.splits, "policy": self.policy, "rows": self.rows,
                "rows_with_pii": self.rows_with_pii, "dropped": len(self.dropped_lines),
                "dropped_lines": self.dropped_lines[:DROPPED_LINES_KEPT], "location_kind": self.location_kind,
                "counts": dict(sorted(self.counts.items())),
                "columns": {name: c.to_dict() for name, c in self.columns.items()}}


_RECORDING: contextvars.ContextVar[list[SourceReport] | None] = contextvars.ContextVar("pii_recording",
                                                                                      default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[SourceReport]]:
    """Collect the report of every :func:`read_data_table` call made inside the block (the train workflow
    writes them to the run folder's ``pii.json``)."""
    reports: list[SourceReport] = []
    token = _RECORDING.set(reports)
    try:
        yield reports
    finally:
        _RECORDING.reset(token)


# ---------------------------------------------------------------------------------------------- tables
def protected_columns(d: DataConfig) -> set[str]:
    """Columns that hold labels, tags, ids or character offsets: never scanned or rewritten."""
    named = {d.columns.get(k, k) for k in ("label", "relation", "head", "tail", "entities", "relations")}
    return {d.label_column, d.tags_column, d.spans_column, d.answers_column, d.answer_text_column,
            d.answer_start_column, d.id_column, MIX_COLUMN, *named}


def _check_offsets(table: Table, d: DataConfig, policy: str) -> None:
    """A ConfigError when ``policy`` would break the character offsets ``table`` holds."""
    present = [c for c in table.columns if any(row.get(c) not in (None, "", []) for row in table.rows[:1000])]
    answers = [c for c in (d.answers_column, d.answer_text_column) if c in present]
    if answers and policy in REWRITING:
        raise ConfigError(
            f"data.pii: {policy} would rewrite the context but not the answers in column '{answers[0]}' "
            f"({table.source}), so answers would no longer be found at their offsets",
            hint="use data.pii: drop (rows with personal data are left out), error or scan for question answering",
        )
    spans = [c for c in (d.spans_column, *(d.columns.get(k, k) for k in ("head", "tail", "entities")))
             if c in present]
    if spans and policy == "redact":
        raise ConfigError(
            f"data.pii: redact changes text lengths, and {table.source} holds character offsets in column "
            f"'{spans[0]}'",
            hint="use data.pii: mask (masks character for character, so offsets stay valid), or drop",
        )


def split_names(source: str, d: DataConfig) -> list[str]:
    """The splits (train, validation, test) the config reads from ``source``; ``["data"]`` for none."""
    mixed = ["train"] if any(s.path == source for s in d.train_mix or []) else []
    return mixed + [s for s in ("train", "validation", "test") if getattr(d, s) == source] or ["data"]


def apply_pii(table: Table, policy: str, scan: PiiScanner, *, protected: set[str] | frozenset[str] = frozenset(),
              splits: list[str] | None = None) -> tuple[Table, SourceReport]:
    """Scan ``table``'s text cells (every column but ``protected``) and apply ``policy``: ``scan`` only
    records, ``redact``/``mask`` rewrite the cells, ``drop`` leaves out rows with a finding, ``error``
    stops at the first (a DataError naming file:line, column and entity type, the value masked)."""
    report = SourceReport(table.source, splits or ["data"], policy, rows=len(table),
                          location_kind=table.location_kind)
    columns = [c for c in table.columns if c not in protected]
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for row, line in zip(table.rows, table.lines, strict=True):
        new_row = dict(row)
        found_in_row = False
        for column in columns:
            value = row.get(column)
            if value is None or isinstance(value, (bool, int, float)):
                continue
            found: list[tuple[str, Finding]] = []
            new_value = _process(value, scan, policy, found)
            if not found:
                continue
            found_in_row = True
            col = report.columns.setdefault(column, ColumnReport())
            col.rows += 1
            for text, f in found:
                col.counts[f.entity] += 1
                if len(col.examples) < EXAMPLES_PER_COLUMN:
                    col.examples.append({"line": line, "type": f.entity,
                                         "masked": mask_example(text[f.start:f.end])})
            if policy == "error":
                text, f = found[0]
                raise DataError(
                    f"personal data found: {f.entity} ({mask_example(text[f.start:f.end])})",
                    file=table.source, line=line, field=column,
                    hint="remove it, or set data.pii: redact, mask or drop to handle it",
                )
            new_row[column] = new_value
        if found_in_row:
            report.rows_with_pii += 1
            if policy == "drop":
                report.dropped_lines.append(line)
                continue
        rows.append(new_row if policy in REWRITING else row)
        lines.append(line)
    if policy == "drop" and report.dropped_lines:
        log.warning("%s: %d row(s) with personal data dropped (data.pii: drop; %s %s)", table.source,
                    len(report.dropped_lines), table.location_kind, format_locations(report.dropped_lines))
    return Table(table.source, rows, lines, table.columns, table.location_kind), report


def _process(value: Any, scan: PiiScanner, policy: str, found: list[tuple[str, Finding]]) -> Any:
    """``value`` with its text rewritten under ``policy``; every finding (with its text) added to ``found``."""
    if isinstance(value, str):
        findings = scan.find(value)
        found.extend((value, f) for f in findings)
        return scan.rewrite(value, findings, policy) if findings and policy in REWRITING else value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return _process_words(value, scan, policy, found)
    if isinstance(value, list):
        return [_process(v, scan, policy, found) for v in value]
    if isinstance(value, dict):
        return {k: v if k in _STRUCTURAL_KEYS else _process(v, scan, policy, found) for k, v in value.items()}
    return value


def _process_words(words: list[str], scan: PiiScanner, policy: str, found: list[tuple[str, Finding]]) -> list[str]:
    """A list of words (NER tokens) scanned as one text; each word overlapping a finding is replaced by
    ``<TYPE>`` (redact) or masked (mask), word for word, so the list keeps its length and tags stay aligned."""
    starts: list[int] = []
    position = 0
    for word in words:
        starts.append(position)
        position += len(word) + 1
    text = " ".join(words)
    findings = scan.find(text)
    found.extend((text, f) for f in findings)
    if not findings or policy not in REWRITING:
        return words
    out = list(words)
    for i, (word, start) in enumerate(zip(words, starts, strict=True)):
        end = start + len(word)
        hit = next((f for f in findings if f.start < end and f.end > start), None)
        if hit is not None:
            out[i] = f"<{hit.entity}>" if policy == "redact" else "*" * len(word)
    return out


def read_data_table(source: str, d: DataConfig) -> Table:
    """Read ``source`` as :func:`~lmtune.data.readers.read_table` does (``data.format``, ``data.encoding``)
    and apply ``data.pii`` to its text cells (label, tag, id and offset columns left alone).

    ``data.train`` given as a list (``data.train_mix``) is read here, for every task: each source read and
    treated so, then mixed by weight (:func:`~lmtune.data.mixing.mix_tables`). The report goes to the active
    :func:`recording`, if any.
    """
    if d.train_mix is not None and source == d.train:
        formats = [s.format or d.format for s in d.train_mix]
        formats = [detect_format(resolve_source(s.path)) if f == "auto" else f
                   for s, f in zip(d.train_mix, formats, strict=True)]
        tables = [_read_one(s.path, d, f, ["train"], s.rename) for s, f in zip(d.train_mix, formats, strict=True)]
        return mix_tables(tables, d, formats)
    return _read_one(source, d, d.format, split_names(source, d))


def _read_one(source: str, d: DataConfig, fmt: str, splits: list[str], rename: dict[str, str] | None = None
              ) -> Table:
    """One source read (``fmt``) and put through ``data.pii``; ``rename`` (a mixed source's column names to
    the config's) says which of its columns are the protected ones."""
    table = read_table(source, format=fmt, encoding=d.encoding)
    if d.pii == "off":
        return table
    _check_offsets(table, d, d.pii)
    scan = config_scanner(d)
    protected = protected_columns(d)
    protected |= {theirs for theirs, ours in (rename or {}).items() if ours in protected}
    table, report = apply_pii(table, d.pii, scan, protected=protected, splits=splits)
    reports = _RECORDING.get()
    if reports is not None:
        reports.append(report)
    if report.rows_with_pii:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items()))
        log.info("%s: personal data in %d of %d rows (%s); data.pii: %s", source, report.rows_with_pii,
                 report.rows, counts, d.pii)
    return table


def run_record(d: DataConfig, reports: list[SourceReport]) -> dict[str, Any]:
    """The run folder's ``pii.json``: the policy, its settings, the findings per entity type over every
    source, and each source's report (:meth:`SourceReport.to_dict`)."""
    found: Counter[str] = Counter()
    for report in reports:
        found.update(report.counts)
    return {"policy": d.pii, "entities": list(d.pii_entities or PII_ENTITIES), "score": d.pii_score,
            **_ner_record(d), "found": dict(sorted(found.items())), "rows_with_pii": sum(r.rows_with_pii for r in reports),
            "dropped": sum(len(r.dropped_lines) for r in reports), "sources": [r.to_dict() for r in reports]}


def model_policy(d: DataConfig, record_file: Path | None = None) -> dict[str, Any]:
    """What a model folder's ``lmtune.json`` records under ``pii``: the policy and its settings (applied again
    to prediction inputs when it rewrote text) and the findings per entity type (from the run's ``pii.json``,
    ``record_file``). Empty when ``data.pii`` is off."""
    if d.pii == "off":
        return {}
    found: dict[str, int] = {}
    if record_file is not None and record_file.is_file():
        found = json.loads(record_file.read_text(encoding="utf-8")).get("found", {})
    return {"pii": {"policy": d.pii, "entities": list(d.pii_entities or PII_ENTITIES), "score": d.pii_score,
                    **_ner_record(d), "found": found}}


def _ner_record(d: DataConfig) -> dict[str, Any]:
    """The ``pii_ner`` model (resolved folder and name labels) a record keeps, so predictions use it too."""
    if not d.pii_ner:
        return {}
    ner = _ner_names(d.pii_ner, d.pii_ner_labels)
    return {"ner": ner.folder, "ner_labels": list(ner.labels)}


def apply_saved_policy(table: Table, meta: dict[str, Any]) -> Table:
    """``table`` (prediction inputs) under the ``redact``/``mask`` policy a model was trained with (its
    ``lmtune.json`` ``pii`` entry); unchanged for models trained without one. The model's label column is
    left alone."""
    saved = meta.get("pii") or {}
    policy = saved.get("policy")
    if policy not in REWRITING:
        return table
    from lmtune.data.pii_engine import NerNames  # noqa: PLC0415  (presidio and spaCy: ~200 MB and ~3 s, loaded only when personal data is scanned)

    ner = NerNames(saved["ner"], tuple(saved.get("ner_labels") or ())) if saved.get("ner") else None
    scan = scanner(tuple(saved.get("entities") or PII_ENTITIES), float(saved.get("score", 0.4)), ner)
    protected = {c for c in (meta.get("label_column"),) if c}
    rewritten, report = apply_pii(table, policy, scan, protected=protected)
    if report.rows_with_pii:
        log.info("%s: personal data in %d of %d input rows %s as the model was trained (%s)", table.source,
                 report.rows_with_pii, report.rows, "redacted" if policy == "redact" else "masked",
                 ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items())))
    return rewritten
