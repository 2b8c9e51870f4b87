"""Preference data: pairs of answers (dpo, orpo, simpo, reward) and unpaired judged answers (kto).

Records are read in TRL's dataset shapes (https://huggingface.co/docs/trl/dataset_formats):

Pairs (:func:`read_preference_pairs`), a ``chosen`` and a ``rejected`` answer to one prompt:

- ``standard``: ``prompt``, ``chosen`` and ``rejected`` are text; the prompt becomes one user message;
- ``conversational``: ``prompt`` is a list of messages (a system message allowed first, ending with a user
  message); ``chosen`` and ``rejected`` each hold the assistant's message, ``[{"role": "assistant", ...}]``;
- ``implicit``: no prompt column; ``chosen`` and ``rejected`` are whole conversations that share their start.
  The prompt is the longest run of identical messages at the start of both; what follows must be exactly one
  assistant message on each side. (As TRL's ``maybe_extract_prompt``, a text ``prompt`` beside whole
  conversations is ignored and the prompt is taken from them.)

Unpaired (:func:`read_kto_examples`): ``prompt`` (text or messages), ``completion`` (text or the assistant's
message) and ``label`` (true/false, 1/0 or desirable/undesirable).

An optional ``system`` column becomes a system message first. ``data.columns`` names other columns
(``{chosen: good, rejected: bad}``; keys :data:`PREFERENCE_KEYS`). Messages may use the OpenAI keys
(``role``/``content``) or ShareGPT's (``from``/``value``: ``human``/``gpt``); a CSV cell holding a JSON list of
messages is read as that list. Structural problems (a missing column, a wrong type, an unknown role, a prompt
that does not end with a user message) are DataErrors naming file, line and column. Answers that are empty and
pairs whose two answers are the same text are skipped, counted with their lines in the facts, and logged.

Rendering is SFT's (:func:`lmtune.data.chat.render_conversation`): prompt plus one answer, with the model's chat
template, loss on the final assistant turn only, its end-of-turn token included (also when pad is EOS). A pair is
two such renders that keep the same prompt tokens (:func:`render_pair`).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from lmtune.config import DataConfig
from lmtune.data.chat import (
    DOUBLE_BOS,
    NO_EOS,
    NO_LOSS,
    ROLES,
    SHAREGPT_ROLES,
    RenderedExample,
    check_rendered,
    end_of_turn_ids,
    render_conversation,
)
from lmtune.data.pii import read_data_table
from lmtune.data.splits import first_occurrences, given_splits, hold_out
from lmtune.data.table import Table, column_suggestion, format_locations
from lmtune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PREFERENCE_KEYS = ("prompt", "chosen", "rejected", "completion", "label", "system")
PAIR_FORMATS = ("standard", "conversational", "implicit")
# Label texts of unpaired (KTO) data, compared lower-cased and stripped.
DESIRABLE_LABELS = ("true", "1", "desirable", "yes")
UNDESIRABLE_LABELS = ("false", "0", "undesirable", "no")
# Problems of a rendered pair besides check_rendered's (fixed sentences, so they can be counted).
SAME_TOKENS = "chosen and rejected render to the same tokens"
PROMPT_DIFFERS = "chosen and rejected do not start with the same prompt tokens"
# Skipped line numbers kept in the facts (the counts are exact).
LINES_KEPT = 1000

_MESSAGE_LAYOUTS = (("role", "content"), ("from", "value"))

class _Located(Protocol):
    line: int


R = TypeVar("R", bound=_Located)


@dataclass
class PreferencePair:
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) answer.

    ``prompt``: the messages before the answer (an optional system message, then user/assistant turns,
    ending with a user message); ``line``: where the record is in its source.
    """

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    line: int


@dataclass
class KTOExample:
    """One prompt with one answer judged desirable or not (unpaired preference data, KTO)."""

    prompt: list[dict[str, str]]
    completion: str
    desirable: bool
    line: int


@dataclass
class RenderedPair:
    """A pair as the model sees it: both sides rendered with the same prompt tokens.

    ``divergence``: the index of the first token where ``chosen.input_ids`` and ``rejected.input_ids`` differ
    (the length of the shorter when one is a prefix of the other).
    """

    chosen: RenderedExample
    rejected: RenderedExample
    divergence: int


# ---------------------------------------------------------------------------------------------
# Reading


def read_preference_pairs(source: str, data: DataConfig) -> tuple[list[PreferencePair], dict[str, Any]]:
    """The preference pairs of ``source`` and facts about them.

    Facts: ``source``, ``rows_read``, ``format`` (``standard``, ``conversational``, ``implicit``, or ``mixed``
    when rows differ), ``pairs`` (kept), ``skipped`` (``identical``: the two answers are the same text up to
    surrounding whitespace; ``empty_answer``: an answer is blank; each ``{"count", "lines"}``).
    """
    columns = _columns(data)
    table = read_data_table(source, data)
    has_prompt = columns["prompt"] in table.columns
    _require_columns(table, columns, ("chosen", "rejected"), source)
    pairs: list[PreferencePair] = []
    formats: set[str] = set()
    skipped: dict[str, list[int]] = {"identical": [], "empty_answer": []}
    for row, line in zip(table.rows, table.lines, strict=True):
        fmt, pair = _pair(row, line, columns, source, has_prompt)
        formats.add(fmt)
        if not (pair.chosen.strip() and pair.rejected.strip()):
            skipped["empty_answer"].append(line)
        elif pair.chosen.strip() == pair.rejected.strip():
            skipped["identical"].append(line)
        else:
            pairs.append(pair)
    _log_skipped(source, skipped, "pair")
    if not pairs:
        raise DataError(
            f"no usable preference pairs among {len(table)} records: {_describe_skipped(skipped)}", file=source
        )
    facts = {
        "source": source,
        "rows_read": len(table),
        "format": formats.pop() if len(formats) == 1 else "mixed",
        "pairs": len(pairs),
        "skipped": _skipped_facts(skipped),
    }
    return pairs, facts


def read_kto_examples(source: str, data: DataConfig) -> tuple[list[KTOExample], dict[str, Any]]:
    """The unpaired (KTO) examples of ``source`` and facts about them.

    Facts: ``source``, ``rows_read``, ``format`` (``standard``: text prompt and completion; ``conversational``:
    messages; or ``mixed``), ``examples``, ``desirable``, ``undesirable``, ``skipped`` (``empty_answer``:
    ``{"count", "lines"}``).
    """
    columns = _columns(data)
    table = read_data_table(source, data)
    _require_columns(table, columns, ("prompt", "completion", "label"), source)
    examples: list[KTOExample] = []
    formats: set[str] = set()
    skipped: dict[str, list[int]] = {"empty_answer": []}
    for row, line in zip(table.rows, table.lines, strict=True):
        prompt_value = _cell(_value(row, columns, "prompt", source, line))
        completion_value = _cell(_value(row, columns, "completion", source, line))
        prompt = _with_system(_prompt(prompt_value, columns["prompt"], source, line), row, columns, source, line)
        completion = _answer(completion_value, columns["completion"], source, line)
        desirable = _label(_value(row, columns, "label", source, line), columns["label"], source, line)
        standard = isinstance(prompt_value, str) and isinstance(completion_value, str)
        formats.add("standard" if standard else "conversational")
        if not completion.strip():
            skipped["empty_answer"].append(line)
            continue
        examples.append(KTOExample(prompt, completion, desirable, line))
    _log_skipped(source, skipped, "example")
    if not examples:
        raise DataError(f"no usable examples among {len(table)} records: {_describe_skipped(skipped)}", file=source)
    desirable_count = sum(example.desirable for example in examples)
    facts = {
        "source": source,
        "rows_read": len(table),
        "format": formats.pop() if len(formats) == 1 else "mixed",
        "examples": len(examples),
        "desirable": desirable_count,
        "undesirable": len(examples) - desirable_count,
        "skipped": _skipped_facts(skipped),
    }
    return examples, facts


def _pair(
    row: dict[str, Any], line: int, columns: dict[str, str], source: str, has_prompt: bool
) -> tuple[str, PreferencePair]:
    """One record as (its format, its pair); empty or identical answers are left to the caller."""
    chosen_value = _cell(_value(row, columns, "chosen", source, line))
    rejected_value = _cell(_value(row, columns, "rejected", source, line))
    # A record without a prompt (no such column, or none in this record of a JSON Lines file) has it implicitly.
    prompt_value = _cell(row.get(columns["prompt"])) if has_prompt else None
    whole = isinstance(chosen_value, list) and (
        prompt_value is None or (isinstance(prompt_value, str) and _holds_user(chosen_value))
    )
    if whole:
        fmt = "implicit"
        prompt, chosen, rejected = _shared_prompt(chosen_value, rejected_value, columns, source, line)
    elif not has_prompt:
        raise DataError(
            f"no column named {columns['prompt']!r}; the columns are: {_listed(row)}",
            file=source,
            line=line,
            field=columns["prompt"],
            hint="with text answers the prompt is a column of its own (name it in data.columns, e.g. "
            "{prompt: question}); without one, chosen and rejected must be whole conversations (message lists)",
        )
    else:
        prompt_value = _cell(_value(row, columns, "prompt", source, line))
        prompt = _prompt(prompt_value, columns["prompt"], source, line)
        chosen = _answer(chosen_value, columns["chosen"], source, line)
        rejected = _answer(rejected_value, columns["rejected"], source, line)
        standard = isinstance(prompt_value, str) and isinstance(chosen_value, str) and isinstance(rejected_value, str)
        fmt = "standard" if standard else "conversational"
    prompt = _with_system(prompt, row, columns, source, line)
    return fmt, PreferencePair(prompt, chosen, rejected, line)


def _shared_prompt(
    chosen_value: Any, rejected_value: Any, columns: dict[str, str], source: str, line: int
) -> tuple[list[dict[str, str]], str, str]:
    """The implicit-prompt shape: the longest shared start of two conversations, and each one's final answer."""
    chosen_column, rejected_column = columns["chosen"], columns["rejected"]
    if not isinstance(rejected_value, list):
        raise DataError(
            f"chosen is a conversation but rejected is {_type_name(rejected_value)}",
            file=source,
            line=line,
            field=rejected_column,
            hint="without a prompt column both must be whole conversations (lists of messages)",
        )
    chosen = _messages(chosen_value, chosen_column, source, line)
    rejected = _messages(rejected_value, rejected_column, source, line)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):  # the same conversation: an identical pair, skipped by the caller
        shared -= 1
    rests = {chosen_column: chosen[shared:], rejected_column: rejected[shared:]}
    for column, rest in rests.items():
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            where = f"message {shared + 1} (index {shared})"
            other = f"{len(chosen) - shared} and {len(rejected) - shared}"
            raise DataError(
                f"chosen and rejected share their first {shared} message(s) and differ from {where} on "
                f"({other} messages follow); after the shared prompt each must hold exactly one assistant "
                f"message, but {column!r} continues with {_roles(rest)}",
                file=source,
                line=line,
                field=column,
                hint="the prompt is the longest run of identical messages at the start of both conversations; "
                "they may differ only in the final assistant answer",
            )
    prompt = chosen[:shared]
    _check_prompt(prompt, lambda message: DataError(f"the shared prompt: {message}", file=source, line=line,
                                                     field=chosen_column))
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def _prompt(value: Any, column: str, source: str, line: int) -> list[dict[str, str]]:
    """A prompt cell (text or messages) as messages ending with a user message."""

    def fail(message: str) -> DataError:
        return DataError(message, file=source, line=line, field=column)

    if isinstance(value, str):
        if not value.strip():
            raise fail("the prompt is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        messages = _messages(value, column, source, line)
        _check_prompt(messages, fail)
        return messages
    raise fail(f"expected text or a list of messages, found {_type_name(value)}")


def _answer(value: Any, column: str, source: str, line: int) -> str:
    """An answer cell: text, or a list holding the one assistant message (blank text is the caller's to skip)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = _messages(value, column, source, line, allow_blank=True)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataError(
                f"expected the answer alone, one assistant message; found {_roles(messages)}",
                file=source,
                line=line,
                field=column,
                hint='the conversational shape holds [{"role": "assistant", "content": ...}] here; whole '
                "conversations go in chosen and rejected without a prompt column",
            )
        return messages[0]["content"]
    raise DataError(
        f"expected text or a list holding the assistant message, found {_type_name(value)}",
        file=source,
        line=line,
        field=column,
    )


def _messages(
    value: list[Any], column: str, source: str, line: int, *, allow_blank: bool = False
) -> list[dict[str, str]]:
    """A list of OpenAI (role/content) or ShareGPT (from/value) messages, roles normalised.

    Blank content is an error unless ``allow_blank`` (an answer: skipped by the caller, not an error).
    """

    def fail(message: str, hint: str | None = None) -> DataError:
        return DataError(message, file=source, line=line, field=column, hint=hint)

    if not value:
        raise fail("the list of messages is empty")
    messages = []
    for index, item in enumerate(value):
        where = f"message {index + 1} (index {index})"
        if not isinstance(item, dict):
            raise fail(f"{where} is {_type_name(item)}, not an object with 'role' and 'content'")
        layout = next((keys for keys in _MESSAGE_LAYOUTS if all(key in item for key in keys)), None)
        if layout is None:
            raise fail(f"{where} lacks 'role' and 'content' (or ShareGPT's 'from' and 'value'); it has {_listed(item)}")
        role_key, content_key = layout
        raw_role = item[role_key]
        known = {role: role for role in ROLES} if role_key == "role" else SHAREGPT_ROLES
        role = known.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise fail(
                f"{where} has the unknown role {raw_role!r}; known roles: {', '.join(known)}",
                "only plain system/user/assistant messages are supported (no tool or function turns)",
            )
        content = _content_text(item[content_key])
        if content is None:
            raise fail(f"{where}: {content_key!r} must be text, found {_type_name(item[content_key])}")
        if not content.strip() and not allow_blank:
            raise fail(f"{where}: the {role} content is empty")
        messages.append({"role": role, "content": content})
    return messages


def _check_prompt(messages: list[dict[str, str]], fail: Callable[[str], DataError]) -> None:
    """A system message only first, then user/assistant turns alternating from user, ending with a user turn."""
    expected = "user"
    for index, message in enumerate(messages):
        role = message["role"]
        where = f"message {index + 1} (index {index})"
        if role == "system":
            if index > 0:
                raise fail(f"{where} is 'system': a system message is only allowed first")
            continue
        if role != expected:
            previous = messages[index - 1]["role"] if index else None
            if previous in (None, "system"):
                raise fail(f"{where} is {role!r}: the prompt must start with a user message")
            raise fail(f"{where} is {role!r} after {previous!r}: turns must alternate user/assistant")
        expected = "assistant" if role == "user" else "user"
    if not messages or messages[-1]["role"] != "user":
        last = f"the last is {messages[-1]['role']!r}" if messages else "it has no messages"
        raise fail(f"the prompt must end with a user message; {last}")


def _with_system(
    prompt: list[dict[str, str]], row: dict[str, Any], columns: dict[str, str], source: str, line: int
) -> list[dict[str, str]]:
    """``prompt`` behind the record's ``system`` column, when it has one."""
    column = columns["system"]
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return prompt
    if not isinstance(value, str):
        raise DataError(f"expected text, found {_type_name(value)}", file=source, line=line, field=column)
    if prompt[0]["role"] == "system":
        raise DataError(
            "the record has a system column and its prompt also starts with a system message",
            file=source,
            line=line,
            field=column,
            hint="keep one of them",
        )
    return [{"role": "system", "content": value}, *prompt]


def _label(value: Any, column: str, source: str, line: int) -> bool:
    """Whether a KTO label says desirable: a boolean, 1/0, or true/false/yes/no/desirable/undesirable text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in DESIRABLE_LABELS:
            return True
        if text in UNDESIRABLE_LABELS:
            return False
    raise DataError(
        f"the label must say whether the completion is desirable; found {value!r}",
        file=source,
        line=line,
        field=column,
        hint="use true/false, 1/0 or desirable/undesirable",
    )


def _columns(data: DataConfig) -> dict[str, str]:
    """Every standard key mapped to the user's column name (``data.columns``; unmapped keys keep their name)."""
    for key, name in data.columns.items():
        if key not in PREFERENCE_KEYS:
            hint = f"did you mean {{{name}: {key}}}? (standard key: your column)" if name in PREFERENCE_KEYS else None
            raise ConfigError(
                f"unknown key {key!r} for preference data; the keys are {', '.join(PREFERENCE_KEYS)}",
                field="data.columns",
                hint=hint,
            )
        if not isinstance(name, str) or not name:
            raise ConfigError(f"the column name for {key!r} must be a non-empty string", field="data.columns")
    return {key: data.columns.get(key, key) for key in PREFERENCE_KEYS}


def _require_columns(table: Table, columns: dict[str, str], keys: tuple[str, ...], source: str) -> None:
    for key in keys:
        name = columns[key]
        if name not in table.columns:
            listed = ", ".join(repr(column) for column in table.columns)
            mapped = "" if name == key else f" (for {key})"
            raise DataError(
                f"no column named {name!r}{mapped}; the columns are: {listed}",
                file=source,
                field=name,
                hint=column_suggestion(name, table.columns)
                or f"name your columns in data.columns, e.g. {{{key}: your_column}}",
            )


def _value(row: dict[str, Any], columns: dict[str, str], key: str, source: str, line: int) -> Any:
    """The record's value for ``key``; a missing value is a DataError (the column exists in other records)."""
    value = row.get(columns[key])
    if value is None:
        raise DataError(
            f"the record has no {key}", file=source, line=line, field=columns[key],
            hint=f"the record has the keys {_listed(row)}",
        )
    return value


def _cell(value: Any) -> Any:
    """A value with a JSON list of messages stored as text (a CSV cell) read as that list; else unchanged."""
    if not (isinstance(value, str) and value.lstrip().startswith("[") and value.rstrip().endswith("]")):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    is_messages = isinstance(parsed, list) and parsed and all(
        isinstance(item, dict) and any(all(key in item for key in keys) for keys in _MESSAGE_LAYOUTS)
        for item in parsed
    )
    return parsed if is_messages else value


def _holds_user(value: list[Any]) -> bool:
    """Whether a message list holds a user turn (a whole conversation, not an answer alone)."""
    return any(
        isinstance(item, dict)
        and str(item.get("role", item.get("from", ""))).strip().lower() in ("user", "human")
        for item in value
    )


def _content_text(content: Any) -> str | None:
    """Message content as text (OpenAI text parts joined); None when it is not text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            return None
        texts.append(part["text"])
    return "".join(texts)


def _roles(messages: list[dict[str, str]]) -> str:
    if not messages:
        return "no message"
    return f"{len(messages)} message(s): " + ", ".join(message["role"] for message in messages)


def _listed(mapping: dict[str, Any]) -> str:
    return ", ".join(repr(key) for key, value in mapping.items() if value is not None) or "no keys"


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def _skipped_facts(skipped: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    return {reason: {"count": len(lines), "lines": lines[:LINES_KEPT]} for reason, lines in skipped.items()}


_REASONS = {"identical": "chosen and rejected are the same text", "empty_answer": "an answer is empty"}


def _describe_skipped(skipped: dict[str, list[int]]) -> str:
    parts = [f"{len(lines)} skipped because {_REASONS[reason]}" for reason, lines in skipped.items() if lines]
    return "; ".join(parts) or "none"


def _log_skipped(source: str, skipped: dict[str, list[int]], what: str) -> None:
    for reason, lines in skipped.items():
        if lines:
            log.warning("%s: %d %s(s) skipped because %s (lines %s)", source, len(lines), what, _REASONS[reason],
                        format_locations(lines))


# ---------------------------------------------------------------------------------------------
# Splits


def preference_splits(
    data: DataConfig, read: Callable[[str], tuple[list[R], dict[str, Any]]], *, what: str = "pairs",
    key: Callable[[R], str] | None = None,
) -> tuple[dict[str, list[R]], dict[str, Any]]:
    """Records per split and facts about each, for any reader of one source (``read(source)``, e.g.
    ``lambda source: read_preference_pairs(source, data)``, or :func:`read_kto_examples` likewise): given validation/test files, else a seeded hold-out of train
    (``data.validation_size``/``test_size``, ``data.split_seed``); with ``data.deduplicate``, repeats of a whole
    record dropped in train and evaluation records that also occur in train dropped; ``data.max_samples`` per
    split (seeded, kept in line order). ``info[split]`` holds the reader's facts (a held-out split: its
    ``source``) and ``duplicates_removed``. ``key``: what makes two records the same (default: every field of
    the dataclass record but ``line``).
    """
    train, train_info = read(data.train)
    info: dict[str, Any] = {"train": train_info}

    def whole_record(record: R) -> str:
        fields = {name: value for name, value in asdict(record).items() if name != "line"}  # type: ignore[call-overload]
        return json.dumps(fields, ensure_ascii=False, sort_keys=True)

    key = key or whole_record

    if data.deduplicate:
        unique = first_occurrences(train, key)
        train_info["duplicates_removed"] = len(train) - len(unique)
        train = unique
    train, splits, sources = hold_out(train, data, what=what)
    for split, source in sources.items():
        info[split] = {"source": source}
    for split, source in given_splits(data).items():
        splits[split], info[split] = read(source)
    if data.deduplicate:
        seen = {key(record) for record in train}
        for split in ("validation", "test"):
            if split in splits:
                records = splits[split]
                clean = [record for record in first_occurrences(records, key) if key(record) not in seen]
                info[split]["duplicates_removed"] = len(records) - len(clean)
                splits[split] = clean
    splits["train"] = train
    if data.max_samples:
        rng = random.Random(data.split_seed)
        for split, records in splits.items():
            if len(records) > data.max_samples:
                splits[split] = sorted(rng.sample(records, data.max_samples), key=lambda record: record.line)
    return splits, info


# ---------------------------------------------------------------------------------------------
# Rendering


def render_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict[str, str]],
    completion: str,
    *,
    max_length: int,
    too_long: str,
    special_tokens_in_content: bool = False,
) -> RenderedExample | None:
    """``prompt`` and the assistant's ``completion`` rendered as SFT renders them, loss on the completion only
    (its end-of-turn token included); None when too long (``too_long`` as in
    :func:`~lmtune.data.chat.render_conversation`). For KTO examples and reward scoring."""
    return render_conversation(
        tokenizer,
        [*prompt, {"role": "assistant", "content": completion}],
        train_on="last_assistant",
        max_length=max_length,
        too_long=too_long,
        special_tokens_in_content=special_tokens_in_content,
    )


def render_pair(
    tokenizer: PreTrainedTokenizerBase,
    pair: PreferencePair,
    *,
    max_length: int,
    too_long: str,
    special_tokens_in_content: bool = False,
) -> RenderedPair | None:
    """Both sides of ``pair`` rendered with :func:`render_completion`, keeping the same prompt tokens.

    None when the pair is skipped as too long: with ``too_long="skip"`` when either side is longer than
    ``max_length``; with ``"truncate_left"`` when the longer answer alone does not fit. Otherwise a side longer
    than ``max_length`` has its prompt cut from the left (a leading BOS kept), and both sides lose the same
    number of prompt tokens (``truncated_tokens``), so their prompts stay the same tokens.
    """

    def render(answer: str, length: int) -> RenderedExample | None:
        return render_completion(tokenizer, pair.prompt, answer, max_length=length, too_long=too_long,
                                 special_tokens_in_content=special_tokens_in_content)

    chosen = render(pair.chosen, max_length)
    rejected = render(pair.rejected, max_length)
    if chosen is None or rejected is None:
        return None
    cut = max(chosen.truncated_tokens, rejected.truncated_tokens)
    # The less-cut side is rendered again with a limit that cuts as many prompt tokens as the other side lost:
    # rendering left-truncates to exactly max_length tokens, so a limit of (its whole length - cut) does.
    if chosen.truncated_tokens < cut:
        chosen = render(pair.chosen, len(chosen.input_ids) + chosen.truncated_tokens - cut)
    if rejected.truncated_tokens < cut:
        rejected = render(pair.rejected, len(rejected.input_ids) + rejected.truncated_tokens - cut)
    if chosen is None or rejected is None:
        return None
    # A prompt message clipped by characters before tokenising counts truncated tokens from the clipped text;
    # both sides lost the same tokens, so both report the same count.
    chosen, rejected = replace(chosen, truncated_tokens=cut), replace(rejected, truncated_tokens=cut)
    return RenderedPair(chosen, rejected, first_difference(chosen.input_ids, rejected.input_ids))


def first_difference(a: list[int], b: list[int]) -> int:
    """The index of the first position where ``a`` and ``b`` differ (the shorter length when one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def render_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], data: DataConfig
) -> list[RenderedPair | None]:
    """:func:`render_pair` of each pair with the settings of ``data`` (None where skipped as too long)."""
    return [
        render_pair(tokenizer, pair, max_length=data.max_length, too_long=data.too_long,
                    special_tokens_in_content=data.special_tokens_in_content)
        for pair in pairs
    ]


def render_kto_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[KTOExample], data: DataConfig
) -> list[RenderedExample | None]:
    """:func:`render_completion` of each example with the settings of ``data`` (None where skipped as too long)."""
    return [
        render_completion(tokenizer, example.prompt, example.completion, max_length=data.max_length,
                          too_long=data.too_long, special_tokens_in_content=data.special_tokens_in_content)
        for example in examples
    ]


def pair_problems(
    tokenizer: PreTrainedTokenizerBase, pair: RenderedPair, eos_ids: set[int] | None = None
) -> list[str]:
    """Problems of a rendered pair that would train the model wrongly (empty when it is sound).

    Each side's :func:`~lmtune.data.chat.check_rendered` problems (:data:`~lmtune.data.chat.NO_EOS`,
    :data:`~lmtune.data.chat.NO_LOSS`, :data:`~lmtune.data.chat.DOUBLE_BOS`), each at most once, then
    :data:`SAME_TOKENS` and :data:`PROMPT_DIFFERS`: fixed sentences, so callers can count them. ``eos_ids``:
    the end-of-turn ids (default :func:`~lmtune.data.chat.end_of_turn_ids` of the tokenizer, which reads the
    whole vocabulary, tens of milliseconds: checking many pairs, compute it once and pass it).
    """
    eos = end_of_turn_ids(tokenizer) if eos_ids is None else eos_ids
    found = set(check_rendered(tokenizer, pair.chosen, eos)) | set(check_rendered(tokenizer, pair.rejected, eos))
    problems = [problem for problem in (NO_EOS, NO_LOSS, DOUBLE_BOS) if problem in found]
    chosen, rejected = pair.chosen, pair.rejected
    if chosen.input_ids == rejected.input_ids:
        problems.append(SAME_TOKENS)
    if chosen.input_ids[: chosen.prompt_tokens] != rejected.input_ids[: rejected.prompt_tokens]:
        problems.append(PROMPT_DIFFERS)
    return problems
