"""Processes the studio starts: ``lmtune train`` (launch, resume) and ``lmtune export``, each a separate
process through the same command line a user would type, in its own process group.

A run launched here is the run the CLI would write: the studio writes ``configs/NAME.yaml``, runs
``python -m lmtune train configs/NAME.yaml --no-progress`` in the workspace, and reads the run folder
the command writes. Its own bookkeeping (``.studio/runs/NAME.json``: pid, command, log; the process's
output in ``.studio/logs/``) stays outside the run folder, which holds only what ``lmtune train`` writes.
Stopping sends SIGTERM to the process group, which ``lmtune train`` takes as Ctrl-C (SIGINT would be
ignored by a process started in the background of a script): the run ends
``interrupted``; resuming runs ``lmtune train CONFIG --resume runs/NAME``. The run's own lock
(:class:`lmtune.workflows.run_folder.RunLock`) keeps a second writer out even past the studio.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmtune.config import load_config
from lmtune.errors import RunError
from lmtune.studio.progress import tail_lines
from lmtune.studio.workspace import (
    CONFIGS_DIR,
    EXPORTS_DIR,
    RUNS_DIR,
    Conflict,
    NotFound,
    Workspace,
    check_name,
)
from lmtune.training import checkpoint as ckpt
from lmtune.workflows.run_folder import (
    lock_holder,
    read_run_record,
    replaceable_without_overwrite,
    run_status,
)

EXPORT_FORMATS = ("merged", "onnx", "gguf", "quantized")
STOP_WAIT_SECONDS = 30.0
STEP_DIR = re.compile(r"step-(\d+)$")


@dataclass
class Job:
    """One process the studio started."""

    id: str
    kind: str  # "train" or "export"
    name: str  # the run's name
    command: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None
    started_at: str
    output: str | None = None
    start_step: int = 0
    returncode: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def poll(self) -> int | None:
        """The exit code once the process ended (reaping it), else None."""
        if self.returncode is None and self.process is not None:
            self.returncode = self.process.poll()
        return self.returncode

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process is not None and self.poll() is None

    def state(self) -> str:
        """``running``, ``done`` or ``failed``."""
        code = self.poll()
        return "running" if code is None else ("done" if code == 0 else "failed")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Jobs:
    """The studio's processes and their records (see the module docstring). Thread-safe."""

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace
        self.lock = threading.Lock()
        self.train_jobs: dict[str, Job] = {}
        self.jobs: dict[str, Job] = {}
        (self.ws.studio_dir / "runs").mkdir(parents=True, exist_ok=True)
        (self.ws.studio_dir / "logs").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------ records
    def record_path(self, name: str) -> Path:
        """``.studio/runs/NAME.json``: the studio's record of a run it launched."""
        return self.ws.studio_dir / "runs" / f"{check_name(name)}.json"

    def record(self, name: str) -> dict[str, Any] | None:
        """The studio's record of ``name``, or None (a run started from the command line)."""
        try:
            value = json.loads(self.record_path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def launched_by(self, name: str) -> str:
        """``studio`` for a run the studio launched, else ``cli`` (also when the studio only resumed it)."""
        rec = self.record(name)
        return str(rec.get("launched_by") or "studio") if rec is not None else "cli"

    def log_file(self, name: str) -> Path | None:
        """The studio's log of the run's process (its stdout and stderr), when the studio started it."""
        rec = self.record(name)
        path = self.ws.studio_dir / "logs" / f"{check_name(name)}.log"
        return path if rec is not None and path.is_file() else None

    def start_step(self, name: str) -> int:
        """The step the run's current start of training began from (0, or the checkpoint a resume continued)."""
        job = self.train_jobs.get(name)
        if job is not None:
            return job.start_step
        rec = self.record(name) or {}
        return int(rec.get("start_step") or 0)

    def job_status(self, name: str) -> str | None:
        """``running`` while a process the studio started for the run lives; ``failed`` when it ended badly
        before writing run.json; None when the studio started none (the run folder says)."""
        job = self.train_jobs.get(name)
        if job is None:
            return None
        if job.alive:
            return "running"
        if job.returncode == 0:
            return None
        # Stopped before it wrote run.json (still importing): what it would have recorded itself.
        return "interrupted" if job.extra.get("stopped") else "failed"

    def running(self, name: str) -> bool:
        """Whether a process writes ``runs/NAME`` now: one the studio started, or any holding the run's lock."""
        job = self.train_jobs.get(name)
        if job is not None and job.alive:
            return True
        run_dir = self.ws.run_dir(name)
        return run_dir.is_dir() and lock_holder(run_dir) is not None

    # ------------------------------------------------------------------------------------ train
    def launch(self, name: str, config: dict[str, Any]) -> Job:
        """Start ``lmtune train configs/NAME.yaml`` into ``runs/NAME``. A Conflict when that folder exists or
        is being written (nothing of it is touched); a ConfigError when the config does not validate."""
        check_name(name)
        raw = dict(config)
        raw["output_dir"] = f"{RUNS_DIR}/{name}"
        load_config(self.ws.resolved_config(raw))  # a ConfigError (400) before anything is written
        with self.lock:
            run_dir = self.ws.run_dir(name)
            if self.running(name):
                raise Conflict(f"run {name!r} is being written by a running process",
                               hint="wait for it to finish or stop it; then resume it, or launch under another name")
            if run_dir.is_dir() and not run_dir.is_symlink() and _nothing_to_keep(run_dir):
                pass  # a run that failed before training (bad data ...): `lmtune train` replaces it itself
            elif run_dir.exists() or run_dir.is_symlink():
                raise Conflict(f"a run folder {RUNS_DIR}/{name} already exists; launching would write into it",
                               hint="resume it (Resume), or launch under another name")
            config_path = self.ws.root / CONFIGS_DIR / f"{name}.yaml"
            config_path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
            command = [sys.executable, "-m", "lmtune", "train", f"{CONFIGS_DIR}/{name}.yaml", "--no-progress"]
            job = self._start("train", name, command, self.ws.studio_dir / "logs" / f"{name}.log", append=False)
            self.train_jobs[name] = job
            self._write_record(name, job, config=f"{CONFIGS_DIR}/{name}.yaml", launched_by="studio")
            return job

    def resume(self, name: str) -> Job:
        """Continue ``runs/NAME`` from its last checkpoint (``lmtune train CONFIG --resume runs/NAME``)."""
        with self.lock:
            run_dir = self.ws.run_dir(name)
            if not (run_dir / "run.json").is_file():
                raise NotFound(f"no run {name!r} in {RUNS_DIR}/")
            if self.running(name):
                raise Conflict(f"run {name!r} is running; only a stopped run can be resumed",
                               hint="stop it first, or wait for it to finish")
            launched_by = self.launched_by(name)
            studio_config = self.ws.root / CONFIGS_DIR / f"{name}.yaml"
            command = [sys.executable, "-m", "lmtune", "train"]
            if self.record(name) is not None and studio_config.is_file():
                command.append(f"{CONFIGS_DIR}/{name}.yaml")
                config = f"{CONFIGS_DIR}/{name}.yaml"
            else:  # started from the command line: its resolved config, pointed at its folder
                command += [f"{RUNS_DIR}/{name}/config.yaml", "--output_dir", f"{RUNS_DIR}/{name}"]
                config = f"{RUNS_DIR}/{name}/config.yaml"
            command += ["--resume", f"{RUNS_DIR}/{name}", "--no-progress"]
            latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
            match = STEP_DIR.search(latest.name) if latest is not None else None
            job = self._start("train", name, command, self.ws.studio_dir / "logs" / f"{name}.log", append=True)
            job.start_step = int(match.group(1)) if match else 0
            self.train_jobs[name] = job
            self._write_record(name, job, config=config, launched_by=launched_by)
            return job

    def stop(self, name: str, *, wait: float = STOP_WAIT_SECONDS) -> bool:
        """Ask the run's process to stop (SIGTERM to its process group, taken as Ctrl-C); wait up to ``wait`` seconds
        for it to end. Returns whether a process was signalled. A run started from the command line on this
        machine is signalled by the PID its lock names."""
        job = self.train_jobs.get(name)
        if job is not None and job.alive and job.process is not None:
            job.extra["stopped"] = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.process.wait(timeout=wait)
            job.poll()
            return True
        run_dir = self.ws.run_dir(name)
        holder = lock_holder(run_dir) if run_dir.is_dir() else None
        if holder is None or holder.pid is None or (holder.host and holder.host != socket.gethostname()):
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(holder.pid, signal.SIGTERM)
        return True

    # ------------------------------------------------------------------------------------ export
    def export(self, name: str, format: str, quantize: str | None = None) -> Job:
        """Start ``lmtune export runs/NAME --format F [--quantize Q] --output exports/NAME-F[-Q]``."""
        run_dir = self.ws.run_dir(name)
        if not (run_dir / "run.json").is_file():
            raise NotFound(f"no run {name!r} in {RUNS_DIR}/")
        if format not in EXPORT_FORMATS:
            raise RunError(f"unknown export format {format!r}; available formats: {', '.join(EXPORT_FORMATS)}",
                           field="format")
        if quantize is not None and not re.fullmatch(r"[A-Za-z0-9_]{1,16}", quantize):
            raise RunError(f"--quantize {quantize!r} is not a quantization name", field="quantize")
        with self.lock:
            if self.running(name):
                raise Conflict(f"run {name!r} is still training; export it once it is complete")
            base = self.ws.root / EXPORTS_DIR / "-".join(p for p in (name, format, quantize) if p)
            output, n = base, 0
            while output.exists():
                n += 1
                output = base.with_name(f"{base.name}-{n}")
            output.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "lmtune", "export", f"{RUNS_DIR}/{name}", "--format", format,
                       "--output", self.ws.relative(output)]
            if quantize:
                command += ["--quantize", quantize]
            job_id = uuid.uuid4().hex[:12]
            job = self._start("export", name, command, self.ws.studio_dir / "logs" / f"export-{job_id}.log",
                              append=False, job_id=job_id)
            job.output = self.ws.relative(output)
            return job

    def job(self, job_id: str) -> Job:
        """A job by id (NotFound when unknown)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def describe(self, job: Job) -> dict[str, Any]:
        """``{"status", "log_tail", "output", ...}`` of a job."""
        return {"id": job.id, "kind": job.kind, "run": job.name, "status": job.state(), "returncode": job.poll(),
                "log_tail": tail_lines(job.log), "output": job.output, "command": job.command[1:]}

    def reap(self) -> None:
        """Collect ended processes (no zombies while the studio runs)."""
        for job in list(self.jobs.values()):
            job.poll()

    # ------------------------------------------------------------------------------------ internals
    def _start(self, kind: str, name: str, command: list[str], log: Path, *, append: bool,
               job_id: str | None = None) -> Job:
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("ab" if append else "wb") as out:
            out.write(f"$ lmtune {' '.join(command[3:])}   ({_now()})\n".encode())
            out.flush()
            # Its own session: a stop reaches the whole group, and the studio's own Ctrl-C does not.
            process = subprocess.Popen(command, cwd=self.ws.root, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        job = Job(id=job_id or uuid.uuid4().hex[:12], kind=kind, name=name, command=command, log=log,
                  process=process, started_at=_now())
        self.jobs[job.id] = job
        return job

    def _write_record(self, name: str, job: Job, *, config: str, launched_by: str) -> None:
        record = {"name": name, "launched_by": launched_by, "pid": job.process.pid if job.process else None,
                  "command": job.command[1:], "config": config, "log": self.ws.relative(job.log),
                  "started_at": job.started_at, "start_step": job.start_step}
        path = self.record_path(name)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
        tmp.replace(path)


def _nothing_to_keep(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a run that stopped before training began (``lmtune train`` replaces it unasked)."""
    try:
        record = read_run_record(run_dir)
    except RunError:
        return False
    return replaceable_without_overwrite(run_dir, record, run_status(run_dir, record))
