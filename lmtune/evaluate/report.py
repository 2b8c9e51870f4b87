"""A small Markdown report builder: the run logic composes the content, this only formats it.

Methods chain (``Report("Run").heading("Results").table(...)``) and ``render`` gives the text;
``write`` saves it atomically so a crash never leaves half a report in the run folder.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ALIGN_RULES = {"left": ":---", "l": ":---", "right": "---:", "r": "---:", "center": ":---:", "c": ":---:"}


@dataclass(frozen=True)
class Bold:
    """A table cell rendered in bold (e.g. the best value in a column)."""

    value: Any


def format_number(x: Any) -> str:
    """A value as table text: ints with thousands separators, floats with 4 decimals.

    Non-zero floats smaller than 1e-4 in magnitude (learning rates, tiny losses) use scientific
    notation so they do not print as 0.0000; None prints as an en dash; anything else as ``str``.
    """
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, numbers.Integral):
        return f"{int(x):,}"
    if isinstance(x, numbers.Real):
        value = float(x)
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-4:
            return f"{value:.2e}"
        return f"{value:,.4f}"
    return str(x)


def _cell(value: Any) -> str:
    if isinstance(value, Bold):
        text = _cell(value.value)
        return f"**{text}**" if text else text
    # A pipe would end the cell and a newline the row; both are common in model outputs.
    return format_number(value).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def _is_numeric(value: Any) -> bool:
    inner = value.value if isinstance(value, Bold) else value
    return inner is None or (isinstance(inner, numbers.Real) and not isinstance(inner, bool))


class Report:
    """A Markdown document assembled block by block."""

    def __init__(self, title: str) -> None:
        """Start a report whose first line is ``# title``."""
        self.title = title
        self._blocks: list[str] = []

    def heading(self, text: str, level: int = 2) -> Report:
        """A section heading of ``level`` 1 to 6 (the title is the only level 1 by convention)."""
        if not 1 <= level <= 6:
            raise ValueError(f"heading level must be 1..6, got {level}")
        self._blocks.append(f"{'#' * level} {text.strip()}")
        return self

    def paragraph(self, text: str) -> Report:
        """A paragraph of Markdown text, added as is."""
        self._blocks.append(text.strip())
        return self

    def bullets(self, items: list[str]) -> Report:
        """A bullet list; a multi-line item is indented so it stays inside its bullet."""
        if items:
            self._blocks.append("\n".join("- " + str(item).strip().replace("\n", "\n  ") for item in items))
        return self

    def table(self, header: list[str], rows: list[list[Any]], *, align: list[str] | None = None) -> Report:
        """A pipe table; cells go through :func:`format_number`, ``|`` is escaped, ``Bold`` cells are bold.

        ``align`` holds one of ``left``/``right``/``center`` (or ``l``/``r``/``c``) per column;
        by default a column is right-aligned when all its cells are numbers, else left-aligned.
        """
        width = len(header)
        for i, row in enumerate(rows):
            if len(row) != width:
                raise ValueError(f"table row {i} has {len(row)} cells, the header has {width}")
        if align is None:
            align = [
                "right" if rows and all(_is_numeric(r[j]) for r in rows) else "left" for j in range(width)
            ]
        if len(align) != width or any(a not in _ALIGN_RULES for a in align):
            raise ValueError(f"align must hold {width} of {sorted(_ALIGN_RULES)}, got {align}")
        lines = [
            "| " + " | ".join(_cell(h) for h in header) + " |",
            "| " + " | ".join(_ALIGN_RULES[a] for a in align) + " |",
        ]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
        self._blocks.append("\n".join(lines))
        return self

    def image(self, rel_path: str, alt: str) -> Report:
        """An image link, relative to the report's folder so the run folder can move."""
        alt_text = alt.replace("[", "\\[").replace("]", "\\]")
        # Angle brackets let a path hold spaces or parentheses (CommonMark link destination).
        target = f"<{rel_path}>" if any(c in rel_path for c in " ()") else rel_path
        self._blocks.append(f"![{alt_text}]({target})")
        return self

    def code(self, text: str, lang: str = "") -> Report:
        """A fenced code block; the fence grows if ``text`` itself holds a fence."""
        fence = "```"
        while fence in text:
            fence += "`"
        self._blocks.append(f"{fence}{lang}\n{text.rstrip()}\n{fence}")
        return self

    def render(self) -> str:
        """The whole document as Markdown text, ending with a newline."""
        return "\n\n".join([f"# {self.title.strip()}", *self._blocks]) + "\n"

    def write(self, path: Path) -> Path:
        """Write the report to ``path`` atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(self.render())
            # mkstemp makes the file private (0600); a report is meant to be read by others.
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path



def per_type_section(report: Report, metrics: dict[str, Any], what: str, column: str
                     ) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """The first of test and validation whose metrics have ``per_type`` scores (entity or relation types): a
    heading "Per ``what`` (split)" and a table of support, precision, recall and F1 beside the starting point's
    F1 (first column ``column``). Returns ``(split, per_type, starting per_type)`` for what a task adds below it;
    None when no split has them."""
    for split in ("test", "validation"):
        m = metrics.get(split)
        if not m or "per_type" not in m:
            continue
        start = metrics.get("starting_point", {}).get(split, {}).get("per_type", {})
        report.heading(f"Per {what} ({split})", 3)
        rows = [[kind, s["support"], s["precision"], s["recall"], s["f1"], start.get(kind, {}).get("f1")]
                for kind, s in m["per_type"].items()]
        report.table([column, "support", "precision", "recall", "F1", "F1 before fine-tuning"], rows)
        return split, m["per_type"], start
    return None
