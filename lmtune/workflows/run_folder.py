"""A run folder on disk: lmtune's mark on it, the one process that writes it, and what may be deleted.

- **The mark.** ``run.json`` carries ``{"format": "lmtune-run", "format_version": 1}``, written the
  moment a run claims its folder. Other experiment tools write a ``run.json`` with a ``status`` too, so
  the status alone never makes a folder lmtune's. Runs written before the mark existed (lmtune 0.x)
  are recognised by the ``lmtune_version`` and ``task`` keys every one of them has (:func:`is_legacy_run`).
- **One writer.** :class:`RunLock` holds an exclusive ``flock`` on ``.run.lock`` in the folder for
  the run's whole life. The kernel drops it when the process ends however it ends (``kill -9``, an
  out-of-memory kill), so a ``running`` status whose lock nobody holds is a run that was killed:
  :func:`run_status` says ``interrupted``. The lock file itself is never deleted while the folder
  exists: a second process must meet the same file (the same inode) to see the first one's lock.
- **Deleting.** :func:`clear_run_folder` removes lmtune's own entries (:data:`KNOWN_FILES`,
  :data:`KNOWN_FOLDERS`) and nothing else, refusing outright when anything else is there; it never
  removes the folder itself, nor follows a link inside it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from lmtune.errors import RunError
from lmtune.evaluate.comparison import COMPARISON_FILE
from lmtune.training import checkpoint as ckpt

try:  # POSIX; lmtune trains on Linux and macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs are not locked (see RunLock.acquire)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lmtune")

RUN_FILE = "run.json"
LOCK_FILE = ".run.lock"
RUN_FORMAT = "lmtune-run"
RUN_FORMAT_VERSION = 1
STATUSES = ("running", "complete", "failed", "interrupted")

# Everything lmtune writes at the top of a run folder (docs/architecture.md, "Run folder"); the only
# names --overwrite deletes. tests/test_hostile_runs.py checks a real run's folder against them.
KNOWN_FILES = frozenset({RUN_FILE, "config.yaml", "train.log", "metrics.jsonl", "metrics.json", "data.json",
                         "baselines.json", COMPARISON_FILE, "starting_point.json", "report.md",
                         "reference_logps.safetensors", "canaries.json", "pii.json"})
# model/ and adapter/ (the saved model), checkpoints/, plots/, baselines/NAME/ (neural baseline sub-runs),
# lmtune/ (TensorBoard's logs: Accelerate names the folder after the tracker project), and a model
# folder half written when the run stopped.
KNOWN_FOLDERS = frozenset({"model", "adapter", "checkpoints", "plots", "baselines", "lmtune", ".model.tmp"})
# An atomic write stopped before its rename: `.NAME.tmp` or `.NAME.tmp-PID` (save_json_atomic).
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.tmp(?:-\d+)?$")
# Opening the lock file: a link planted in its place is refused, never followed (ELOOP), and a named pipe
# does not block the open. Descriptors are close-on-exec in Python anyway (PEP 446).
_LOCK_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
MAX_RECORD_BYTES = 2**20
# How long a run waits for the lock before naming its holder: status probes hold it for microseconds.
LOCK_WAIT_SECONDS = 2.0


def run_marker() -> dict[str, Any]:
    """The fields that mark ``run.json`` as lmtune's."""
    return {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION}


# ------------------------------------------------------------------------------------------ run.json
def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    """``run.json`` of ``run_dir``; None when there is none. A RunError naming the file when it is
    not a JSON object (unreadable, truncated, not UTF-8, a list ...)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:  # lmtune writes about 1 KB: this one is not ours
            raise RunError(f"the run record is larger than {MAX_RECORD_BYTES // 2**20} MiB", file=path)
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = getattr(exc, "strerror", None) or str(exc)[:200]
        raise RunError(f"cannot read the run record: {detail}", file=path) from None
    if not isinstance(record, dict):
        raise RunError(f"the run record is not a JSON object but {type(record).__name__}", file=path)
    return record


def is_marked_run(record: dict[str, Any] | None) -> bool:
    """Whether ``run.json`` carries lmtune's mark."""
    return record is not None and record.get("format") == RUN_FORMAT


def is_legacy_run(record: dict[str, Any] | None) -> bool:
    """Whether ``run.json`` is one lmtune wrote before the mark existed (0.x): every such record
    starts with a status, ``task`` and ``lmtune_version``, a key no other tool writes."""
    return (record is not None and "format" not in record and record.get("status") in STATUSES
            and isinstance(record.get("lmtune_version"), str) and isinstance(record.get("task"), str))


def run_status(run_dir: Path, record: dict[str, Any] | None, *, locked: bool = False) -> str | None:
    """The run's status: ``run.json``'s, except that ``running`` without a live writer (nobody holds
    the run's lock: its process was killed) is ``interrupted``. ``locked``: the caller holds the lock,
    so whoever wrote ``running`` is gone."""
    status = record.get("status") if record is not None else None
    if status is not None and not isinstance(status, str):
        status = str(status)
    if status == "running" and (locked or lock_holder(run_dir) is None):
        return "interrupted"
    return status


def started_training(record: dict[str, Any] | None) -> bool:
    """Whether the run reached its training loop (``training_started_at``); a marked run that did not
    has trained nothing."""
    return record is not None and "training_started_at" in record


# ------------------------------------------------------------------------------------------ the lock
@dataclass(frozen=True)
class LockHolder:
    """Who holds a run folder's lock (as it wrote into the lock file; fields None when unreadable)."""

    pid: int | None
    host: str | None
    started_at: str | None

    def describe(self) -> str:
        """``PID 123, started 2026-...`` (with the host when it is not this machine)."""
        parts = [f"PID {self.pid}" if self.pid is not None else "PID unknown"]
        if self.host and self.host != socket.gethostname():
            parts.append(f"on host {self.host}")
        if self.started_at:
            parts.append(f"started {self.started_at}")
        return ", ".join(parts)


_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


class RunLock:
    """The one writer's claim on a run folder: an exclusive ``flock`` on ``.run.lock``, held until
    :meth:`release` (or the end of a ``with`` block) or until the process ends.

    ``flock`` locks belong to the open file, not the process: a second ``RunLock`` in the same process
    is refused too, and closing another descriptor of the file (a status probe) does not release it.
    Its holder writes its PID, host and start time into the file for the error the next one sees.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds a lock now."""
        return self._fd is not None

    def acquire(self, run_dir: Path, *, wait: float = LOCK_WAIT_SECONDS) -> None:
        """Lock ``run_dir`` (which must exist), or raise a RunError naming the process that holds it."""
        if self._fd is not None:
            raise RuntimeError("RunLock.acquire: already held")  # a bug in lmtune, not the user's doing
        path = run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _LOCK_OPEN_FLAGS, 0o644)
        except OSError as exc:
            raise RunError(f"cannot create the run folder's lock file: {exc.strerror}", file=path,
                           hint="output_dir must be a folder you can write to") from None
        try:
            locked = _lock_exclusive(fd, run_dir, wait)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            return
        self._fd, self.path = fd, path
        _HELD.add(self)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        with contextlib.suppress(OSError):  # only for the next process's message: a full disk is no reason to stop
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        """Give the lock up (nothing when not held). The lock file stays: see the module docstring."""
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _lock_exclusive(fd: int, run_dir: Path, wait: float) -> bool:
    """``flock`` ``fd`` exclusively, trying for ``wait`` seconds; False where there are no file locks.
    A RunError naming the holder when another process keeps it."""
    if fcntl is None:  # pragma: no cover - no flock on this platform
        log.warning("this platform has no file locks: nothing stops a second process from writing %s", run_dir)
        return False
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            holder = read_holder(run_dir / LOCK_FILE)
            raise RunError(
                f"another lmtune process is writing this run folder ({holder.describe()})", file=run_dir,
                hint=f"wait for it to finish, or stop it (kill {holder.pid or 'PID'}) and continue the run with "
                "--resume; two processes writing one run folder would mix their checkpoints and metrics") from None
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                # Some network file systems have no locks: training there is still better than none.
                log.warning("the file system of %s has no file locks (%s): nothing stops a second process "
                            "from writing this run folder", run_dir, exc.strerror)
                return False
            raise RunError(f"cannot lock the run folder: {exc.strerror}", file=run_dir / LOCK_FILE) from None


def _forget_locks_in_child() -> None:
    # A forked child (DataLoader workers, multiprocessing) shares the parent's open lock file: closing
    # its copy (never LOCK_UN, which would unlock the parent's) means the lock ends with the parent
    # alone, and a child that outlives a killed parent for a moment cannot keep the run "running".
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def read_holder(lock_file: Path) -> LockHolder:
    """What the lock's holder wrote about itself (fields None where it cannot be read)."""
    info = None
    try:
        # At most a few bytes of a regular file (a pipe or device put there would never end).
        if stat.S_ISREG(lock_file.lstat().st_mode):
            with lock_file.open("rb") as f:
                info = json.loads(f.read(4096))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return LockHolder(None, None, None)
    pid = info.get("pid")
    return LockHolder(pid if isinstance(pid, int) else None, str(info.get("host") or "") or None,
                      str(info.get("started_at") or "") or None)


def lock_holder(run_dir: Path) -> LockHolder | None:
    """The process writing ``run_dir`` now, or None when nobody holds its lock.

    Probes with a shared lock, given up at once; a run starting in that instant waits for it (see
    :data:`LOCK_WAIT_SECONDS`). When the lock cannot be probed (no lock file support), the answer is
    "held": a status is never turned into ``interrupted`` on a guess.
    """
    path = run_dir / LOCK_FILE
    if fcntl is None:  # pragma: no cover
        return LockHolder(None, None, None)
    try:
        fd = os.open(path, os.O_RDONLY | _LOCK_OPEN_FLAGS)
    except FileNotFoundError:
        return None  # never locked (a run of lmtune 0.x), or a folder being created
    except OSError:
        return LockHolder(None, None, None)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path)
    except OSError:
        return LockHolder(None, None, None)
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return None


# ------------------------------------------------------------------------------------------ contents
def entries(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` apart from its lock file, sorted (a folder holding only the lock is empty)."""
    try:
        return sorted(name for name in os.listdir(run_dir) if name != LOCK_FILE)
    except OSError as exc:
        raise RunError(f"cannot list the run folder: {exc.strerror or exc}", file=run_dir) from None


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in ``run_dir`` that lmtune does not write, or not as that kind of thing (a link, a folder
    where lmtune writes a file ...): what makes :func:`clear_run_folder` refuse."""
    try:
        with os.scandir(run_dir) as found:
            return sorted(entry.name for entry in found if not _is_lmtune_entry(entry))
    except OSError as exc:
        raise RunError(f"cannot list the run folder: {exc.strerror or exc}", file=run_dir) from None


def _is_lmtune_entry(entry: os.DirEntry[str]) -> bool:
    if entry.is_symlink():
        return False
    name = entry.name
    if name in KNOWN_FOLDERS:
        return entry.is_dir(follow_symlinks=False)
    temp = _TEMP_FILE.match(name)
    if name == LOCK_FILE or name in KNOWN_FILES or (temp is not None and temp["name"] in KNOWN_FILES):
        return entry.is_file(follow_symlinks=False)
    return False


def replaceable_without_overwrite(run_dir: Path, record: dict[str, Any] | None, status: str | None) -> bool:
    """Whether a stopped run left nothing worth keeping: a marked run that failed or was interrupted
    before its training loop began (bad data, a model that does not load ...), so it has no
    checkpoint and no model. Such a folder is replaced by the next ``train`` without ``--overwrite``."""
    return (is_marked_run(record) and status in ("failed", "interrupted") and not started_training(record)
            and ckpt.latest_checkpoint(run_dir / "checkpoints") is None and not (run_dir / "model").exists())


def check_clearable(run_dir: Path) -> None:
    """A RunError listing what in ``run_dir`` lmtune did not write, if anything: such a folder is not deleted."""
    foreign = foreign_entries(run_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunError(f"the run folder also holds files lmtune did not write ({shown}); refusing to delete it",
                       file=run_dir, hint="move those files out of the folder, or choose another output_dir")


def clear_run_folder(run_dir: Path) -> list[str]:
    """Delete lmtune's entries in ``run_dir`` (call with its lock held); returns what was deleted.

    Refuses, deleting nothing, when anything else is in the folder (:func:`check_clearable`). ``run.json``
    goes last, so a run stopped halfway through is still recognised as lmtune's next time; the folder and
    its lock file stay.
    """
    check_clearable(run_dir)
    names = entries(run_dir)
    ordered = [n for n in names if n != RUN_FILE] + ([RUN_FILE] if RUN_FILE in names else [])
    for name in ordered:
        path = run_dir / name
        try:
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                shutil.rmtree(path)  # never follows links inside (fd-based on Linux)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise RunError(f"could not delete {name} from the run folder: {exc.strerror or exc}", file=run_dir,
                           hint="fix that, then run again with --overwrite (run.json is deleted last, so the folder is "
                           "still recognised as lmtune's)") from None
    return ordered
