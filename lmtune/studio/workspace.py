"""The studio's workspace on disk: data files, configs, run folders and tuning studies.

Layout (``lmtune studio --workspace DIR``): ``data/`` uploaded files, ``configs/NAME.yaml`` the configs
the studio launched, ``runs/NAME/`` run folders (written by ``lmtune train`` alone: the studio keeps its
own bookkeeping in ``.studio/``, never inside a run folder, whose unknown files ``--overwrite`` refuses),
``studies/NAME/`` tuning studies, ``exports/`` exported models. Every path a request names is resolved
inside the workspace (or the run folder) and refused when it leaves it, by ``..`` or by a link.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from lmtune.data.readers import detect_format, read_table
from lmtune.errors import DataError, LmtuneError, RunError
from lmtune.workflows.run_folder import is_legacy_run, is_marked_run, read_run_record, run_status

DATA_DIR, CONFIGS_DIR, RUNS_DIR, STUDIES_DIR, EXPORTS_DIR, STUDIO_DIR = (
    "data", "configs", "runs", "studies", "exports", ".studio")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_LISTED_FILES = 1000
# Files a run's or study's folder may serve to the page (its report, plots and JSON records).
SERVED_SUFFIXES = {".png": "image/png", ".svg": "image/svg+xml", ".json": "application/json",
                   ".jsonl": "application/json", ".md": "text/markdown; charset=utf-8",
                   ".yaml": "text/plain; charset=utf-8", ".log": "text/plain; charset=utf-8",
                   ".txt": "text/plain; charset=utf-8", ".csv": "text/csv; charset=utf-8"}
# The keys of metrics.json that are tables, not numbers, shown in the report rather than compared.
SKIPPED_METRIC_KEYS = {"per_class", "confusion_matrix", "per_label", "per_entity", "per_group", "slices"}


class NotFound(LmtuneError):
    """A run, study, file or job the request names does not exist (answered 404)."""


class Conflict(LmtuneError):
    """The request would touch something in use (a run folder being written): answered 409."""


def check_name(name: str, what: str = "run") -> str:
    """``name`` if it is a plain name (letters, digits, ``.``, ``_``, ``-``; no path), else a DataError."""
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise RunError(f"{what} name {name!r} is not a plain name", field="name",
                       hint="use letters, digits, '.', '_' and '-' (at most 100 characters), starting with a letter or digit")
    return name


def inside(base: Path, relative: str) -> Path:
    """``base/relative`` resolved, refused (NotFound) when it is absolute, holds ``..``, or a link leads out."""
    parts = Path(relative).parts
    if not relative or Path(relative).is_absolute() or ".." in parts or "\x00" in relative:
        raise NotFound(f"{relative!r} is not a path inside {base.name}/", hint="name a file inside the folder")
    root = base.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise NotFound(f"{relative!r} leads out of {base.name}/ (a link)", hint="name a file inside the folder")
    return path


def served_file(base: Path, relative: str) -> tuple[Path, str]:
    """A file under ``base`` the page may read, and its media type (NotFound otherwise)."""
    path = inside(base, relative)
    media = SERVED_SUFFIXES.get(path.suffix.lower())
    if media is None:
        raise NotFound(f"{relative!r} is not a file the studio serves",
                       hint=f"it serves {', '.join(sorted(SERVED_SUFFIXES))} files")
    if not path.is_file():
        raise NotFound(f"no file {relative!r}")
    return path, media


def clean_json(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no such numbers; the page's parser refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def read_json(path: Path) -> Any:
    """A JSON file's content; None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Workspace:
    """The workspace folder (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        for sub in (DATA_DIR, CONFIGS_DIR, RUNS_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def runs_dir(self) -> Path:
        """``runs/``."""
        return self.root / RUNS_DIR

    @property
    def studio_dir(self) -> Path:
        """``.studio/``: the studio's own bookkeeping (launch records, process logs)."""
        return self.root / STUDIO_DIR

    def relative(self, path: Path) -> str:
        """``path`` relative to the workspace (as is when outside it)."""
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path)

    # ------------------------------------------------------------------------------------ data files
    def data_files(self) -> list[dict[str, Any]]:
        """The data files under ``data/`` (and the workspace's top level) lmtune can read, by path."""
        found: list[dict[str, Any]] = []
        for folder, pattern in ((self.root / DATA_DIR, "**/*"), (self.root, "*")):
            for path in sorted(folder.glob(pattern)):
                if len(found) >= MAX_LISTED_FILES:
                    break
                if not path.is_file() or path.is_symlink() or any(p.startswith(".") for p in path.relative_to(self.root).parts):
                    continue
                try:
                    detect_format(path)
                except LmtuneError:
                    continue
                found.append({"path": self.relative(path), "size": path.stat().st_size})
        return found

    def save_upload(self, filename: str, content: bytes) -> str:
        """Write an uploaded data file under ``data/`` (never over another: ``-1``, ``-2`` ... suffixes) after
        checking that lmtune reads it; returns its workspace path. A DataError naming the file (and the line)
        when it is not a data file; nothing is left behind then."""
        name = Path(filename or "").name
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "upload"
        display = name
        probe = self.root / DATA_DIR / name
        detect_format(Path(display))  # the extension says the format: a DataError naming the file when it does not
        stem, suffix = _split_suffix(name)
        target, n = probe, 0
        while target.exists():
            n += 1
            target = probe.with_name(f"{stem}-{n}{suffix}")
        partial = target.with_name(f".partial-{target.name}")  # hidden, the suffix kept (.csv.gz reads as such)
        partial.write_bytes(content)
        try:
            _check_readable(partial, display, target.name)
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)
        return self.relative(target)

    def resolve_data(self, value: Any) -> Any:
        """A data path of a config as the studio's process must open it: a workspace-relative path that exists
        becomes absolute (the studio runs from anywhere; launched runs run in the workspace)."""
        if isinstance(value, str) and value and not value.startswith("bundled:") and not Path(value).is_absolute():
            candidate = self.root / value
            if candidate.exists():
                return str(candidate)
        return value

    def resolved_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with its data files and local model folder resolved against the workspace."""
        out = json.loads(json.dumps(config))
        data = out.get("data")
        if isinstance(data, dict):
            for key in ("train", "validation", "test"):
                if key in data:
                    data[key] = self.resolve_data(data[key])
        model = out.get("model")
        if isinstance(model, str):
            out["model"] = self.resolve_data(model)
        elif isinstance(model, dict) and isinstance(model.get("name"), str):
            model["name"] = self.resolve_data(model["name"])
        return out

    # ------------------------------------------------------------------------------------ runs
    def run_dir(self, name: str) -> Path:
        """``runs/NAME`` (the name checked; the folder need not exist)."""
        return self.runs_dir / check_name(name)

    def run_names(self) -> list[str]:
        """Folders under ``runs/`` holding lmtune's run record, by name."""
        names = []
        for path in sorted(self.runs_dir.iterdir()) if self.runs_dir.is_dir() else []:
            if path.is_dir() and not path.is_symlink() and NAME.match(path.name) and (path / "run.json").is_file():
                names.append(path.name)
        return names

    def summary(self, name: str, *, launched_by: str = "cli", job_status: str | None = None) -> dict[str, Any]:
        """The contract's RunSummary of ``runs/NAME``; ``job_status``: the studio's own process state
        (a launched run is "running" before its process has written run.json)."""
        run_dir = self.run_dir(name)
        try:
            record = read_run_record(run_dir)
        except RunError:
            record = None
        lmtune_run = is_marked_run(record) or is_legacy_run(record)
        status = run_status(run_dir, record) if lmtune_run else None
        if job_status == "running":
            status = "running"
        elif status is None:
            status = job_status or "failed"
        record = record or {}
        metric = None
        metrics = read_json(run_dir / "metrics.json")
        if isinstance(metrics, dict):
            metric = headline_metric(metrics)
        return clean_json({"name": name, "path": f"{RUNS_DIR}/{name}", "status": status, "task": record.get("task"),
                           "model": record.get("model"), "method": record.get("method"),
                           "started_at": record.get("started_at"), "finished_at": record.get("finished_at"),
                           "metric": metric, "launched_by": launched_by})

    def config_yaml(self, name: str) -> str:
        """The run's ``config.yaml`` (as resolved by training) or, before training wrote it, the studio's config."""
        for path in (self.run_dir(name) / "config.yaml", self.root / CONFIGS_DIR / f"{name}.yaml"):
            if path.is_file():
                return path.read_text(encoding="utf-8", errors="replace")
        return ""

    # ------------------------------------------------------------------------------------ studies
    def studies_dir(self) -> Path:
        """``studies/``."""
        return self.root / STUDIES_DIR

    def study_dir(self, name: str) -> Path:
        """``studies/NAME``, which must exist."""
        path = self.studies_dir() / check_name(name, "study")
        if not path.is_dir():
            raise NotFound(f"no study {name!r} in {STUDIES_DIR}/")
        return path


def headline_metric(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The first scalar of the test split (else validation) in ``metrics.json``: the number a run list shows."""
    for split in ("test", "validation"):
        values = metrics.get(split)
        if isinstance(values, dict):
            for key, value in values.items():
                if key not in ("loss", "num_examples") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    return {"name": f"{split}.{key}", "value": value}
    return None


def flatten(value: Any, prefix: str = "", *, skip: set[str] | None = None) -> dict[str, Any]:
    """Nested mappings as ``{"a.b": leaf}`` (lists are leaves); keys in ``skip`` are left out."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if skip and key in skip:
                continue
            out.update(flatten(item, f"{prefix}{key}.", skip=skip))
    elif prefix:
        out[prefix[:-1]] = value
    return out


def _split_suffix(name: str) -> tuple[str, str]:
    """``("train", ".csv.gz")`` for ``train.csv.gz``: the suffix kept when a taken name gets ``-1``."""
    suffixes = "".join(Path(name).suffixes[-2:]) if name.lower().endswith((".gz", ".bz2", ".xz")) else Path(name).suffix
    return name[: len(name) - len(suffixes)] or "upload", suffixes


def _check_readable(path: Path, display: str, final_name: str) -> None:
    """Read ``path`` with lmtune's reader (format from ``final_name``'s extension); its DataError names ``display``."""
    fmt = detect_format(Path(final_name))
    try:
        table = read_table(path, format=fmt)
    except DataError as exc:
        where = f"line {exc.line}: " if exc.line is not None else ""
        raise DataError(f"{display} is not a {fmt} data file lmtune can read: {where}{exc.message}",
                        file=display, line=exc.line, hint=exc.hint) from None
    if len(table) == 0:
        raise DataError(f"{display} holds no records", file=display)
