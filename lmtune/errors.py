"""Errors a user can act on.

Every failure that comes from the user's data, config or paths is raised as an
:class:`LmtuneError` (or a subclass). The CLI prints these as one clear message
and exits non-zero, never with a traceback. Anything else is a bug in lmtune.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class LmtuneError(Exception):
    """An error caused by input the user controls, with where it happened.

    ``file``/``line``/``field`` are optional coordinates; ``hint`` says what to do.
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.line}" if self.line is not None else "") + ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        field = f"field '{self.field}': " if self.field is not None else ""
        hint = f"\n  hint: {self.hint}" if self.hint else ""
        return f"{where}{field}{self.message}{hint}"


class ConfigError(LmtuneError):
    """The config (file or overrides) is invalid; names the offending key."""


class DataError(LmtuneError):
    """A data file is missing, unreadable or holds a bad record."""


class ModelError(LmtuneError):
    """A model path/name cannot be loaded or does not fit the task."""


class RunError(LmtuneError):
    """A run folder is missing, incomplete, or would be overwritten."""


class HubError(LmtuneError):
    """The Hugging Face Hub cannot be reached, refuses the token, or refuses the request."""


class StudyError(LmtuneError):
    """A hyper-parameter study (``lmtune tune``) cannot be opened, created or read."""


def is_disk_full(exc: BaseException, folder: str | Path | None = None) -> bool:
    """Whether ``exc``, raised while writing into ``folder``, means the disk (or quota) is full.

    Writers say it differently: Python raises ``OSError(ENOSPC)``, safetensors a ``SafetensorError``
    with "os error 28", and torch.save only a ``RuntimeError`` about an unexpected stream position.
    The last is recognised by looking at the free space left where it was writing.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    if folder is not None and isinstance(exc, RuntimeError):
        path = Path(folder)
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            return False
        return usage.free < max(16 * 2**20, usage.total // 1000)  # under 16 MiB or 0.1% left
    return False
