"""The conversations of PyPI ``chatterbot-corpus``: the source of the bundled ``chatterbot*`` data sets.

Read from the package's YAML files (the package is installed ``--no-deps`` and never imported). The
parallel and question-answering sets built from the same files are in ``parallel.py`` and
``chatterbot_qa.py``; ``bundled.py`` registers them all.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

from lmtune.data.files import write_jsonl
from lmtune.errors import DataError

log = logging.getLogger(__name__)

CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"
# The language folders of chatterbot-corpus 1.3.3 (english is plain ``chatterbot``).
CHATTERBOT_LANGUAGES = (
    "bengali", "chinese", "dutch", "english", "french", "german", "hebrew", "hindi", "hinglish",
    "indonesian", "italian", "japanese", "korean", "marathi", "oriya", "persian", "portuguese", "russian",
    "spanish", "swedish", "tamil", "telugu", "thai", "traditionalchinese", "turkish", "ukrainian", "urdu",
    "yoruba",
)  # fmt: skip
LANGUAGE_NAMES = {"traditionalchinese": "Traditional Chinese"}  # for descriptions; others: capitalised


def turn_text(value: Any) -> str | None:
    """One conversation entry as text: strings stripped, other YAML scalars stringified, else None."""
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, bool):  # before int (bool is an int); YAML 1.1 reads bare yes/no/on/off as bools
        text = "yes" if value else "no"
    elif isinstance(value, (int, float, date, datetime)):
        text = value.isoformat() if isinstance(value, (date, datetime)) else str(value)
    else:  # None, a nested list or mapping: not a turn
        return None
    return text or None


def chatterbot_records(folder: Path, skipped: Counter[str] | None = None) -> Iterator[dict[str, Any]]:
    """Conversations from one language folder of chatterbot-corpus, in OpenAI messages format.

    Files are read in sorted order with ``yaml.safe_load``. Entries alternate user / assistant; a
    conversation with an odd number of turns loses its last (unanswered) user turn, and one with fewer
    than two turns is skipped. ``topic`` is the file's first category (its stem when it has none). What is
    skipped is counted into ``skipped`` by reason: unreadable files, conversations that are not lists
    (mis-indented YAML that read as one string), conversations with an empty or non-scalar entry (the
    roles after it would be wrong), and conversations too short.
    """
    skipped = Counter() if skipped is None else skipped
    for path in sorted(folder.glob("*.yml")):
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            log.warning("skipping %s: %s", path, exc)
            skipped["unreadable file"] += 1
            continue
        conversations = document.get("conversations") if isinstance(document, dict) else None
        if not isinstance(conversations, list):
            skipped["file without a conversations list"] += 1
            continue
        categories = document.get("categories")
        first = categories[0] if isinstance(categories, list) and categories else categories
        topic = turn_text(first) or path.stem
        for conversation in conversations:
            if not isinstance(conversation, list):
                skipped["conversation not a list"] += 1
                continue
            turns = [turn_text(entry) for entry in conversation]
            if any(turn is None for turn in turns):
                skipped["conversation with an empty or non-text entry"] += 1
                continue
            if len(turns) < 2:
                skipped["conversation of fewer than 2 turns"] += 1
                continue
            turns = turns[: len(turns) // 2 * 2]  # drop an unanswered last user turn
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": text}
                for i, text in enumerate(turns)
            ]
            yield {"messages": messages, "topic": topic}


def write_chatterbot(source: Path, out: Path) -> None:
    """A ``BundledDataset.write`` function: the conversations of one language folder as JSON Lines."""
    skipped: Counter[str] = Counter()
    count = write_jsonl(out, chatterbot_records(source, skipped))
    if not count:
        raise DataError("no conversations found", file=source, hint=f"reinstall it: {CHATTERBOT_INSTALL}")
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        log.info("chatterbot %s: %d conversations; skipped %s", source.name, count, reasons)
