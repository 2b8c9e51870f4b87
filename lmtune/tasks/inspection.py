"""The toolkit of ``lmtune data inspect`` reports: length statistics, split order, collected warnings, rows of
pre-flight checks and their rendering. Shared by the task folders' inspection modules (a shared module, not a
task folder) and usable by the inspect workflow above them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmtune.config import Config

# Suggest a larger data.max_length when more than this fraction of a split is truncated.
TRUNCATION_WARN_FRACTION = 0.05
SPLIT_ORDER = ("train", "validation", "test")
# Status of a pre-flight check row: ``error`` is what would stop ``lmtune train``.
OK, WARNING, ERROR = "ok", "warning", "error"
STATUS_STYLE = {OK: "green", WARNING: "yellow", ERROR: "bold red"}
PAD_IS_EOS_NOTE = "pad == eos: lmtune masks padding by position, EOS stays a target"


def split_rank(split: str) -> int:
    """Sort key putting train, validation, test first, in that order."""
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


def length_stats(lengths: Sequence[int], percentiles: Sequence[int] = (90, 99)) -> dict[str, float] | None:
    """min / median / p<q> for each of ``percentiles`` / max / mean; None for no lengths.

    Percentiles are observed lengths (q% of the values are at most it).
    """
    if not len(lengths):
        return None
    a = np.asarray(lengths)
    qs = np.percentile(a, [50, *percentiles], method="inverted_cdf")
    return {"min": int(a.min()), "median": int(qs[0]), **{f"p{q}": int(v) for q, v in zip(percentiles, qs[1:],
                                                                                          strict=True)},
            "max": int(a.max()), "mean": round(float(a.mean()), 1)}


def round_up(n: int, multiple: int = 8) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str], skip: Sequence[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink
        self.skip = skip

    def emit(self, record: logging.LogRecord) -> None:
        if not any(part in str(record.msg) for part in self.skip):
            self.sink.append(record.getMessage())


@contextlib.contextmanager
def collect_warnings(skip: Sequence[str] = ("truncated",)) -> Iterator[list[str]]:
    """Keep lmtune's warnings (skipped rows, unstratified splits) for the report instead of stderr.

    Warnings whose message template contains one of ``skip`` are dropped: the report has its own
    columns for them (truncation, by default) and the warning would repeat them.
    Records still propagate to handlers the application configured; only Python's last-resort
    printing to stderr is avoided, since a handler now exists.
    """
    messages: list[str] = []
    handler = _ListHandler(messages, skip)
    logger = logging.getLogger("lmtune")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------------------------------ check rows
def check_row(name: str, status: str, detail: str = "", count: int | None = None,
              total: int | None = None) -> dict[str, Any]:
    """One row of the checks table: ``status`` is ok, warning or error (error: ``train`` would stop)."""
    return {"check": name, "status": status, "count": count, "total": total, "detail": detail}


def model_positions(cfg: Config, model_path: Path | None) -> int | None:
    """The positions the model has (what ``build_model`` checks data.max_length against), if known."""
    if cfg.model.init == "scratch":
        return int(cfg.model.context_length)
    if model_path is None:
        return None
    try:
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    return int(positions) if isinstance(positions, int) and positions > 0 else None


def positions_check(cfg: Config, model_path: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """The row (and error sentence) for data.max_length against the model's positions."""
    positions = model_positions(cfg, model_path)
    if positions is None:
        return None, None
    max_length = cfg.data.max_length
    name = f"data.max_length {max_length} fits the model's positions"
    if max_length > positions:
        error = (f"data.max_length {max_length} is larger than the model's {positions} positions: "
                 f"set --data.max_length {positions} or less")
        return check_row(name, ERROR, f"the model has {positions}"), error
    return check_row(name, OK, f"the model has {positions}"), None


# ------------------------------------------------------------------------------------------ rendering
def render_header(report: dict[str, Any], console: Console, settings: str = "") -> None:
    """The first lines of a decoder task's report: the config and the settings that shape the rows
    (``settings``: the task's own, e.g. ``", data.train_on assistant"``)."""
    header = (f"task {report['task']}, model {report['model']}, data.max_length {report['max_length']}, "
              f"train.batch_size {report['batch_size']}{settings}")
    header += f", packing {'on' if report['packing'] else 'off'}"
    if report["max_samples"]:
        header += f", data.max_samples {report['max_samples']}"
    console.print(Text.assemble(("data inspect", "bold"), f" {report['config']}\n" if report["config"] else "\n",
                                header), highlight=False)


def render_checks(report: dict[str, Any], console: Console) -> None:
    """The checks table, then the errors, notes and suggestions of ``report``."""
    table = Table(title="pre-flight checks (an `error` row would stop `lmtune train`)", title_justify="left")
    table.add_column("check", overflow="fold", ratio=3)
    table.add_column("status")
    table.add_column("count", justify="right")
    table.add_column("detail", overflow="fold", ratio=3)
    for c in report["checks"]:
        count = "" if c["count"] is None else (f"{c['count']}/{c['total']}" if c["total"] is not None else str(c["count"]))
        table.add_row(Text(c["check"]), Text(c["status"], style=STATUS_STYLE[c["status"]]), count, Text(c["detail"]))
    console.print(table)
    for error in report["errors"]:
        console.print(Text.assemble(("error: ", "bold red"), error))
    for note in report["warnings"]:
        console.print(Text(f"note: {note}", style="dim"))
    for tip in report["suggestions"]:
        console.print(Text.assemble(("suggestion: ", "bold yellow"), tip))


def stats_row(table: Table, split: str, stats: dict[str, Any] | None, *extra: str) -> None:
    """A table row of one split's length statistics (min, median, p95, max, mean), then ``extra`` cells."""
    s = stats or {}
    table.add_row(split, *[str(s.get(k, "–")) for k in ("min", "median", "p95", "max", "mean")], *extra)
