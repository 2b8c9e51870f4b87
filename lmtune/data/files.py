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
import gzip
import json
import lzma
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lmtune.errors import DataError

# Compressed files, by suffix (the format is read from the extension before it: data.jsonl.gz is jsonl).
DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.decompress,
    ".bz2": bz2.decompress,
    ".xz": lzma.decompress,
}
ENCODING_HINT = "set data.encoding (e.g. latin-1) or re-save the file as UTF-8"


def check_exists(path: Path, display: str) -> None:
    """A DataError when ``path`` does not exist, suggesting close names in its folder."""
    if path.exists():
        return
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
        raw = path.read_bytes()
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
