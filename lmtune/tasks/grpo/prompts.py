"""The prompts of ``task: grpo``: read, validated and split; their other columns kept for the reward functions.

A record holds a ``prompt``: text (one user message) or a list of messages (an optional system message, then
user/assistant turns, ending with a user message; OpenAI ``role``/``content``; a CSV cell may hold the list as
JSON text).
``data.columns`` renames it (``{prompt: question}``) and the ``answer`` column the built-in rewards compare with
(``{answer: solution}``: passed to the reward functions as ``answer``). Every other column is passed to the
reward functions under its own name, one value per completion. A missing or empty prompt, or a message list
that does not end with a user message, is a DataError naming file, line and column.

Splits: given ``data.validation``/``data.test`` files, else a seeded hold-out of train
(``data.validation_size``/``test_size``, ``data.split_seed``); with ``data.deduplicate`` a prompt is kept once
in train and evaluation prompts that also occur in train are dropped; ``data.max_samples`` per split (seeded,
kept in line order).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from lmtune.config import DataConfig
from lmtune.data.pii import read_data_table
from lmtune.data.preference import preference_splits
from lmtune.data.table import column_suggestion
from lmtune.errors import ConfigError, DataError
from lmtune.models.text_generator import validate_prompt_messages
from lmtune.tasks.grpo.rewards import REWARD_ARGUMENTS

log = logging.getLogger(__name__)

# The standard names ``data.columns`` may map for grpo.
PROMPT_KEYS = ("prompt", "answer")


@dataclass
class PromptRow:
    """One prompt: as the data gave it (``prompt``: text or messages, what reward functions receive), as chat
    ``messages``, the record's other ``columns`` (for the reward functions) and its ``line`` in its source."""

    prompt: Any
    messages: list[dict[str, str]]
    columns: dict[str, Any]
    line: int


def prompt_columns(data: DataConfig) -> dict[str, str]:
    """``{standard key: the data's column}`` for :data:`PROMPT_KEYS`; a ConfigError for another key."""
    for key, name in data.columns.items():
        if key not in PROMPT_KEYS:
            raise ConfigError(f"unknown key {key!r} for grpo prompts; the keys are {', '.join(PROMPT_KEYS)}",
                              field="data.columns", hint="the other columns reach the reward functions under their "
                              "own names: no mapping needed")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"the column name for {key!r} must be a non-empty string", field="data.columns")
    return {key: data.columns.get(key, key) for key in PROMPT_KEYS}


def messages_cell(value: Any) -> Any:
    """A text cell that holds a JSON list of messages (a CSV cell) as that list; any other value unchanged (text
    that merely starts with ``[`` stays text)."""
    if not (isinstance(value, str) and value.lstrip().startswith("[") and value.rstrip().endswith("]")):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    is_messages = isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed)
    return parsed if is_messages else value


def prompt_messages(value: Any, *, source: str, line: int, column: str) -> list[dict[str, str]]:
    """A prompt cell as chat messages ending with a user message: text is one user message."""
    value = messages_cell(value)
    if isinstance(value, str):
        if not value.strip():
            raise DataError("the prompt is empty", file=source, line=line, field=column)
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return validate_prompt_messages(value, source=source, line=line, field=column)
    kind = "null" if value is None else type(value).__name__
    raise DataError(f"expected text or a list of messages, found {kind}", file=source, line=line, field=column)


def read_prompts(source: str, data: DataConfig) -> tuple[list[PromptRow], dict[str, Any]]:
    """The prompts of ``source`` and facts about it (``source``, ``rows_read``, ``format``: text, messages or
    mixed, ``columns``: those passed to the reward functions)."""
    names = prompt_columns(data)
    table = read_data_table(source, data)
    column = names["prompt"]
    if column not in table.columns:
        listed = ", ".join(repr(c) for c in table.columns)
        raise DataError(f"no column named {column!r}; the columns are: {listed}", file=source, field=column,
                        hint=column_suggestion(column, table.columns)
                        or "name your prompt column in data.columns, e.g. {prompt: question}")
    # The answer column is passed as `answer`; the rest under their own names (a name the reward functions'
    # own arguments take is not passed: it would clash).
    renamed = {names["answer"]: "answer"} if names["answer"] in table.columns else {}
    clashing = [c for c in table.columns if c != column and renamed.get(c, c) in REWARD_ARGUMENTS]
    if clashing:
        log.warning("%s: the column(s) %s are not passed to the reward functions: the names are their own "
                    "arguments (%s)", source, ", ".join(clashing), ", ".join(REWARD_ARGUMENTS))
    passed = [c for c in table.columns if c != column and c not in clashing]
    rows = []
    formats = set()
    for record, line in zip(table.rows, table.lines, strict=True):
        value = record.get(column)
        if value is None:
            raise DataError("the record has no prompt", file=source, line=line, field=column)
        messages = prompt_messages(value, source=source, line=line, column=column)
        is_text = isinstance(messages_cell(value), str)
        formats.add("text" if is_text else "messages")
        rows.append(PromptRow(prompt=value if is_text else messages, messages=messages,
                              columns={renamed.get(c, c): record.get(c) for c in passed}, line=line))
    if not rows:
        raise DataError("no prompts", file=source)
    facts = {"source": source, "rows_read": len(table), "format": formats.pop() if len(formats) == 1 else "mixed",
             "columns": [renamed.get(c, c) for c in passed]}
    return rows, facts


def _key(row: PromptRow) -> str:
    return json.dumps(row.messages, ensure_ascii=False, sort_keys=True)


def prompt_splits(data: DataConfig) -> tuple[dict[str, list[PromptRow]], dict[str, Any]]:
    """Prompts per split and facts about each (see the module docstring): the split, de-duplication (on the
    prompt's messages) and sampling of :func:`lmtune.data.preference.preference_splits`."""
    return preference_splits(data, lambda source: read_prompts(source, data), what="prompts", key=_key)
