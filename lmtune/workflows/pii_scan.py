"""``lmtune data scan``: the personal data in a config's data, per split and column, before training on it.

Each distinct source of ``data.train`` / ``data.validation`` / ``data.test`` is read as training reads it
and scanned by the offline presidio analyzer of :mod:`lmtune.data.pii` (whatever ``data.pii`` says: the scan
changes nothing). Label, tag, id and offset columns are left out, as training leaves them. The report
counts findings per entity type in each column and shows a few masked examples with their file:line.

Also here: the run report's section and the model card's line about what ``data.pii`` found and did
(from the run folder's ``pii.json`` and the model's ``lmtune.json``).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table as RichTable

from lmtune.config import Config, load_config
from lmtune.data.pii import PII_FILE, apply_pii, config_scanner, protected_columns, split_names
from lmtune.data.readers import read_table
from lmtune.evaluate.report import Report

if TYPE_CHECKING:
    from rich.console import Console

# What each policy does, in the words of the report and the card.
POLICY_WORDS = {
    "scan": "recorded only; the data was trained on as it was",
    "redact": "each replaced by `<TYPE>` before tokenisation",
    "mask": "masked character for character (`*`) before tokenisation",
    "drop": "rows holding any left out before tokenisation",
    "error": "none found (the run stops at the first)",
}


def scan_data(config: Config | str | Path | dict[str, Any], *, overrides: dict[str, Any] | None = None,
              entities: list[str] | None = None, score: float | None = None) -> dict[str, Any]:
    """Scan the sources of a config's data for personal data and return JSON-serialisable facts.

    ``entities`` and ``score`` default to ``data.pii_entities`` and ``data.pii_score``. Keys: ``config``,
    ``entities``, ``score``, ``rows``, ``seconds``, ``rows_per_second``, ``found`` (per entity type) and
    ``sources`` (per source: ``splits``, ``rows``, ``rows_with_pii``, ``counts``, ``columns`` with ``counts``,
    ``rows`` and masked ``examples`` of ``{line, type, masked}``).
    """
    if isinstance(config, Config):
        cfg = load_config(config.to_dict(), overrides) if overrides else config
        name = None
    else:
        cfg = load_config(copy.deepcopy(config) if isinstance(config, dict) else config, overrides)
        name = None if isinstance(config, dict) else str(config)
    d = cfg.data
    scan = config_scanner(d, entities, score)
    started = time.perf_counter()
    sources: list[dict[str, Any]] = []
    total: dict[str, int] = {}
    rows = 0
    for source in d.sources():  # a mixed data.train: each of its sources
        table = read_table(source, format=d.source_format(source), encoding=d.encoding)
        _, report = apply_pii(table, "scan", scan, protected=protected_columns(d), splits=split_names(source, d))
        rows += report.rows
        for entity, count in report.counts.items():
            total[entity] = total.get(entity, 0) + count
        sources.append(report.to_dict())
    seconds = time.perf_counter() - started
    return {"config": name, "entities": list(scan.entities), "score": scan.score,
            **({"ner": scan.ner.folder, "ner_labels": list(scan.ner.labels)} if scan.ner else {}), "rows": rows,
            "seconds": round(seconds, 3), "rows_per_second": round(rows / max(seconds, 1e-9), 1),
            "found": dict(sorted(total.items())), "sources": sources}


def render_scan(report: dict[str, Any], console: Console, *, examples: int = 5) -> None:
    """Print :func:`scan_data`'s report: per source, a table of counts per column and entity type, then up
    to ``examples`` masked examples per column with their file:line."""
    for source in report["sources"]:
        title = f"{source['source']} ({', '.join(source['splits'])}): personal data in " \
                f"{source['rows_with_pii']:,} of {source['rows']:,} rows"
        if not source["columns"]:
            console.print(f"{title}: none found", highlight=False)
            continue
        table = RichTable(title=title)
        for header in ("column", "type", "count", "examples (masked)"):
            table.add_column(header, justify="right" if header == "count" else "left", overflow="fold")
        for column, facts in source["columns"].items():
            shown = facts["examples"][:examples]
            for i, (entity, count) in enumerate(sorted(facts["counts"].items(), key=lambda kv: -kv[1])):
                cells = [f"{source['source']}:{e['line']} {e['masked']}" for e in shown if e["type"] == entity]
                table.add_row(column if i == 0 else "", entity, f"{count:,}", "\n".join(cells))
        console.print(table)
    found = ", ".join(f"{k} {v:,}" for k, v in sorted(report["found"].items(), key=lambda kv: -kv[1])) or "none"
    console.print(f"{report['rows']:,} rows scanned in {report['seconds']:.1f} s "
                  f"({report['rows_per_second']:,.0f} rows/s); found: {found}", highlight=False)


def report_section(report: Report, run_dir: Path) -> None:
    """The run report's "Personal data" section, from the run folder's ``pii.json`` (nothing without one)."""
    path = run_dir / PII_FILE
    if not path.is_file():
        return
    record = json.loads(path.read_text(encoding="utf-8"))
    report.heading("Personal data")
    found = ", ".join(f"{k} {v:,}" for k, v in sorted(record["found"].items(), key=lambda kv: -kv[1]))
    report.paragraph(f"`data.pii: {record['policy']}` (score ≥ {record['score']}): "
                     + (f"found {found} in {record['rows_with_pii']:,} rows; {POLICY_WORDS[record['policy']]}"
                        + (f" ({record['dropped']:,} rows dropped)" if record["dropped"] else "") + "."
                        if found else "nothing found."))
    rows = [[", ".join(s["splits"]), s["source"], column, entity, count]
            for s in record["sources"] for column, facts in s["columns"].items()
            for entity, count in facts["counts"].items()]
    if rows:
        report.table(["split", "source", "column", "type", "count"], rows)
    report.paragraph(f"Details, with masked examples and line numbers: `{PII_FILE}`.")


def card_lines(meta: dict[str, Any]) -> list[str]:
    """The model card's line about ``data.pii`` (from ``lmtune.json``); none when it was off."""
    saved = meta.get("pii")
    if not saved:
        return []
    found = ", ".join(f"{k} {v:,}" for k, v in sorted(saved.get("found", {}).items(), key=lambda kv: -kv[1]))
    line = f"- personal data (`data.pii: {saved['policy']}`): " + (
        f"found {found}; {POLICY_WORDS[saved['policy']]}" if found else "none found")
    if saved["policy"] in ("redact", "mask"):
        line += "; `predict` treats its inputs the same way"
    return [line + "."]
