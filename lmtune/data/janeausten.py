"""Jane Austen's six novels from Debian's ``r-cran-janeaustenr``: the bundled ``janeausten`` data set.

The package is an R library: its data is an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``), read
here with ``rdata`` (no R, no pickle) and written one record per paragraph (JSON Lines: text, book).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lmtune.data.files import write_jsonl
from lmtune.errors import DataError

JANEAUSTENR_ENV = "LMTUNE_JANEAUSTENR"
_R_LIBRARY = Path("usr/lib/R/site-library/janeaustenr")
_DEBIAN_PREFIX = Path(sys.prefix) / "share" / "lmtune-debian"  # `make install` extracts the .deb here
JANEAUSTENR_INSTALL = (
    f"make install, or: cd $(mktemp -d) && apt-get download r-cran-janeaustenr && "
    f"dpkg -x r-cran-janeaustenr_*.deb {_DEBIAN_PREFIX}"
)
# (R object, title) in publication order.
AUSTEN_BOOKS = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
# Not prose: "CHAPTER I", "Chapter 12", "VOLUME II" headings.
_HEADING = re.compile(r"(chapter|volume)\s+([0-9]+|[ivxlc]+)\.?", re.IGNORECASE)
# Where a novel's text ends: its closing line, or (Northanger Abbey) the editor's note after it.
_END_MARKERS = {"the end", "finis", "a note on the text"}


def locate_janeaustenr() -> Path | None:
    """The janeaustenr R package folder: ``$LMTUNE_JANEAUSTENR``, lmtune's own copy, or the system one.

    ``$LMTUNE_JANEAUSTENR`` may name the package folder itself or a ``dpkg -x`` root holding it; when it is
    set it is the only place looked at (a wrong value is reported, not silently passed over).
    """
    override = os.environ.get(JANEAUSTENR_ENV)
    if override:
        folder = Path(override).expanduser()
        return folder / _R_LIBRARY if (folder / _R_LIBRARY).is_dir() else folder
    for folder in (_DEBIAN_PREFIX / _R_LIBRARY, Path("/") / _R_LIBRARY):
        if folder.is_dir():
            return folder
    return None


def _decompress_lazyload(blob: bytes, compression: int, where: str) -> bytes:
    """One value of an R lazy-load database: a 4-byte big-endian length, then the compressed bytes.

    ``compression`` is the .rdx's ``compressed``: 1 (TRUE) is zlib; 2 and 3 put a type byte first
    ('Z' zlib, '2' bzip2, 'X' xz, '0' stored), as R's ``R_compress2/3`` write them.
    """
    if len(blob) < 4:
        raise DataError("truncated R lazy-load record", file=where)
    (size,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    kind = b"Z"
    if compression in (2, 3):
        kind, body = body[:1], body[1:]
    decompressors: dict[bytes, Callable[[bytes], bytes]] = {
        b"Z": zlib.decompress,
        b"2": bz2.decompress,
        b"X": lzma.decompress,
        b"0": bytes,
    }
    decompress = decompressors.get(kind)
    try:
        if compression == 0 or decompress is None:
            raise ValueError(f"unsupported compression {compression!r}/{kind!r}")
        raw = decompress(body)
    except (ValueError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"cannot decompress an R lazy-load record: {exc}", file=where) from None
    if len(raw) != size:
        raise DataError(f"R lazy-load record holds {len(raw)} bytes, its header says {size}", file=where)
    return raw


def read_r_lazyload(rdx: Path) -> dict[str, Any]:
    """Every variable of an R lazy-load database (``NAME.rdx`` index + ``NAME.rdb`` values), converted.

    The index is a gzip-compressed RDS file holding ``variables`` (name -> (offset, length) into the
    .rdb), ``references`` and ``compressed``. Values are parsed with ``rdata``, which reads R's
    serialization format as data (nothing is executed or unpickled).
    """
    import rdata  # noqa: PLC0415  (with xarray ~75 MB: loaded only when the Austen novels are unpacked)

    rdb = rdx.with_suffix(".rdb")
    try:
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress(rdx.read_bytes()), extension=".rds")
        )
        database = rdb.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the R data: {exc.strerror or exc}", file=exc.filename or rdx) from None
    except Exception as exc:  # gzip and rdata raise many types for a damaged file
        raise DataError(f"cannot parse the R lazy-load index: {exc}", file=rdx) from None
    compression = int(index["compressed"][0]) if len(index.get("compressed", ())) else 1
    values: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        raw = _decompress_lazyload(database[int(offset) : int(offset) + int(length)], compression, str(rdb))
        try:
            values[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        except Exception as exc:  # as above
            raise DataError(f"cannot parse the R object '{name}': {exc}", file=rdb) from None
    return values


def austen_paragraphs(lines: Sequence[str | None]) -> Iterator[str]:
    """The prose paragraphs of one novel given as its lines (``None`` for an R NA counts as blank).

    Lines are stripped and joined with a space; blank lines separate paragraphs. Front matter before the
    first chapter heading, the headings themselves, paragraphs without a letter ("* * *", "(1814)") and
    everything from the end marker on are left out: they are not the novel's text.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        text = (line or "").strip()
        if text:
            current.append(text)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    started = False
    for paragraph in paragraphs:
        if _HEADING.fullmatch(paragraph):
            started = True
        elif started and paragraph.lower() in _END_MARKERS:
            return
        elif started and any(c.isalpha() for c in paragraph):
            yield paragraph


def write_janeausten(source: Path, out: Path) -> None:
    """A ``BundledDataset.write`` function: the prose paragraphs of the six novels as JSON Lines."""
    rdx = source / "Rdata.rdx"
    if not rdx.is_file() or not rdx.with_suffix(".rdb").is_file():
        raise DataError(
            "the janeaustenr data (Rdata.rdx + Rdata.rdb) is missing",
            file=source,
            hint=f"reinstall it: {JANEAUSTENR_INSTALL}",
        )
    novels = read_r_lazyload(rdx)
    missing = [name for name, _ in AUSTEN_BOOKS if name not in novels]
    if missing:
        raise DataError(f"the janeaustenr data lacks {', '.join(missing)}", file=rdx)

    def records() -> Iterator[dict[str, Any]]:
        for name, title in AUSTEN_BOOKS:
            for paragraph in austen_paragraphs([None if v is None else str(v) for v in novels[name]]):
                yield {"text": paragraph, "book": title}

    write_jsonl(out, records())
