"""Files at the lowest level of the data layer: checking a path, reading bytes (decompressed) and text,
writing JSON Lines.

Both sides of the data layer use these: the readers (``readers.py``, ``squad.py``, ``streaming.py``)
that read what a config names, and the builders of the bundled data sets (``bundled.py`` and the
modules it registers) that write the cached files. Keeping them here means neither side imports the
other for them. Every problem is a :class:`DataError` naming the file (``display``: the name the user
gave, which may differ from the path, e.g. ``bundled:NAME``).
"""

from __future__ import annotations

import bz2
import difflib
import errno
import gzip
import json
import lzma
import os
import stat
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from lmtune.errors import DataError

# Compressed files, by suffix (the format is read from the extension before it: data.jsonl.gz is jsonl).
DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.decompress,
    ".bz2": bz2.decompress,
    ".xz": lzma.decompress,
}
ENCODING_HINT = "set data.encoding (e.g. latin-1) or re-save the file as UTF-8"


# What a path that is neither a file nor a folder is, for the message that refuses it.
_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_data_path(path: Path, display: str) -> None:
    """A DataError unless ``path`` is a regular file or a folder (symlinks followed).

    A missing path suggests close names in its folder; a dangling symlink names where it points; a
    symlink loop says so. A named pipe, a device or a socket is refused before anything opens it: opening
    a pipe for reading blocks until a writer comes, and a device like ``/dev/zero`` never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(
                "is a symbolic link that loops back on itself (or a chain of too many links)",
                file=display,
                hint="point to the real file; `ls -l` shows where each link leads",
            ) from None
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(f"cannot read the file: {exc.strerror or exc}", file=display) from None
        _raise_not_found(path, display)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(
            f"is {_describe_mode(mode)}, not a regular file",
            file=display,
            hint="lmtune reads data from files (or folders of files); save the data to a file first",
        )


def _describe_mode(mode: int) -> str:
    """What a path of ``st_mode`` ``mode`` is, in words ("a named pipe (FIFO)", "a character device", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file or folder")


def check_regular_files(folder: Path, display: str) -> None:
    """A DataError when an entry of ``folder`` (not recursive) is a pipe, a device or a socket
    (see :func:`check_data_path`)."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot list the folder: {exc.strerror or exc}", file=display) from None
    for entry in entries:
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue  # a dangling link: whoever reads it reports it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise DataError(
                f"'{entry.name}' in it is {_describe_mode(mode)}, not a regular file", file=display
            )


def _raise_not_found(path: Path, display: str) -> NoReturn:
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise DataError(
            f"file not found: it is a symbolic link to '{target}', which does not exist", file=display
        )
    parent = path.parent
    if not parent.is_dir():
        raise DataError(f"file not found (the folder '{parent}' does not exist)", file=display)
    try:
        siblings = [p.name for p in parent.iterdir()]
    except OSError:
        siblings = []
    close = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.6)
    hint = "did you mean " + " or ".join(repr(str(parent / c)) for c in close) + "?" if close else None
    raise DataError("file not found", file=display, hint=hint)


def read_bytes(path: Path, display: str) -> bytes:
    """The bytes of ``path``, decompressed when its suffix is .gz, .bz2 or .xz."""
    try:
        # O_NONBLOCK: should the path have become a pipe since it was checked, opening it does not wait for a
        # writer (it changes nothing for a regular file); fstat then refuses it before a byte is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise DataError(f"is {_describe_mode(mode)}, not a regular file", file=display)
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", file=display) from None
    suffix = path.suffix.lower()
    decompress = DECOMPRESSORS.get(suffix)
    if decompress is None:
        return raw
    try:
        return decompress(raw)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"cannot decompress the {suffix} file: {exc}", file=display) from None


def decode(raw: bytes, encoding: str, display: str) -> str:
    """``raw`` decoded strictly as ``encoding`` (a leading BOM dropped); errors name the line and byte."""
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise DataError(f"unknown text encoding '{encoding}'", file=display, field="data.encoding") from None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        byte = raw[exc.start : exc.start + 1].hex()
        hint = ENCODING_HINT
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            hint = "the file looks like UTF-16: set data.encoding to utf-16 or re-save the file as UTF-8"
        raise DataError(
            f"cannot decode byte 0x{byte} as {encoding} ({exc.reason})", file=display, line=line, hint=hint
        ) from None
    return text.removeprefix("\ufeff")


def write_jsonl(out: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` one JSON object per line (UTF-8, not ASCII-escaped); returns how many."""
    count = 0
    with out.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
