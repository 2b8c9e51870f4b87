"""A run's progress as the studio shows it: read from the files the training process writes.

Nothing here talks to the training process: ``metrics.jsonl`` (one record per logged step, appended),
``run.json`` (status and times) and ``train.log`` (its "training: N steps" line gives the total) are
what ``lmtune train`` writes whether the studio or the command line started it, so a run started either
way shows the same progress.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import deque
from pathlib import Path
from typing import Any

# The training loop's announcement of its length (lmtune/workflows/train.py logs it once per start).
TOTAL_STEPS = re.compile(r"training: (\d+) steps")
LOG_TAIL_LINES = 30
# A metrics.jsonl record is a few hundred bytes; a longer line is not one the loop wrote.
MAX_RECORD_CHARS = 100_000


def read_records(run_dir: Path, since: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The ``metrics.jsonl`` records after line ``since`` and the line number to ask from next time.

    A last line without its newline is being written: it is left for the next call, so a record is
    never returned half-read. Lines that are not JSON objects are skipped (and counted).
    """
    path = run_dir / "metrics.jsonl"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return [], since
    lines = text.split("\n")[:-1]  # the piece after the last newline is unfinished (or empty)
    since = max(0, min(since, len(lines)))
    records = []
    for line in lines[since:]:
        if not line.strip() or len(line) > MAX_RECORD_CHARS:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, len(lines)


def total_steps(run_dir: Path) -> int | None:
    """The run's optimizer steps as the last start of its training loop announced them in ``train.log``."""
    found = None
    for line in tail_lines(run_dir / "train.log", 2000):
        match = TOTAL_STEPS.search(line)
        if match:
            found = int(match.group(1))
    return found


def tail_lines(path: Path, count: int = LOG_TAIL_LINES, *, max_bytes: int = 1_000_000) -> list[str]:
    """The last ``count`` lines of a text file (at most its last ``max_bytes``); [] when it cannot be read."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines: deque[str] = deque(maxlen=count)
    for line in data.decode("utf-8", errors="replace").splitlines():
        lines.append(line)
    return list(lines)


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO timestamp of ``run.json`` as an aware datetime; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.timezone.utc)


def progress(run_dir: Path, record: dict[str, Any] | None, status: str, *, since: int = 0,
             log_file: Path | None = None, start_step: int = 0, now: dt.datetime | None = None) -> dict[str, Any]:
    """The contract's Progress object: status, step / total_steps, epoch, tokens/s, ETA, elapsed seconds,
    the new records after line ``since`` (``next``: where to ask from next), and the log's last lines.

    The ETA is the remaining steps at the rate of this start of training: the steps done since
    ``start_step`` (where a resume began; 0 for a fresh run) over the seconds since ``training_started_at``,
    so a resumed run is not credited with the steps its checkpoint already held.
    """
    new, next_line = read_records(run_dir, since)
    every, _ = read_records(run_dir, 0) if since else (new, next_line)
    step, epoch, tokens_per_second = 0, None, None
    for rec in every:
        if isinstance(rec.get("step"), int):
            step = max(step, rec["step"])
        if isinstance(rec.get("epoch"), (int, float)):
            epoch = rec["epoch"]
        if rec.get("split") == "train" and isinstance(rec.get("tokens_per_second"), (int, float)):
            tokens_per_second = rec["tokens_per_second"]
    total = total_steps(run_dir)
    now = now or dt.datetime.now(dt.timezone.utc)
    record = record or {}
    started = parse_time(record.get("training_started_at"))
    finished = parse_time(record.get("finished_at"))
    elapsed = None
    if started is not None:
        elapsed = max(0.0, ((finished if status != "running" and finished else now) - started).total_seconds())
    eta = None
    if status == "running" and total and elapsed and step:
        done = step - start_step
        if done > 0:
            eta = max(0.0, (total - step) * elapsed / done)
    if status == "complete":
        eta = 0.0
    log_tail = tail_lines(log_file) if log_file is not None and log_file.is_file() else []
    if not log_tail:
        log_tail = tail_lines(run_dir / "train.log")
    return {"status": status, "step": step, "total_steps": total, "epoch": epoch,
            "tokens_per_second": tokens_per_second, "eta_seconds": eta, "elapsed_seconds": elapsed,
            "records": new, "next": next_line, "log_tail": log_tail}

