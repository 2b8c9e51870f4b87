"""Chat data: records -> validated conversations -> token ids with a loss mask.

Three record layouts are understood (``FORMATS``):

- ``alpaca``: ``instruction`` and ``output`` (``input`` and ``system`` optional);
- ``sharegpt``: ``conversations``, a list of ``{"from": ..., "value": ...}``;
- ``openai``: ``messages``, a list of ``{"role": ..., "content": ...}``; with tool calling, a ``tools`` list,
  assistant messages with ``tool_calls`` and ``tool`` messages (``chat_tools.py``).

Users may name the columns differently (``data.columns``: standard key -> their column name).
Every record becomes ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: an optional
system message, then user/assistant turns alternating, ending with an assistant turn. With tool calling, an
assistant message may also hold ``tool_calls`` (its content may then be empty) and must be followed by one
``tool`` message or more (the results), after which the assistant speaks again.

A conversation is rendered with the tokenizer's own chat template (the text the model will see at
inference) and tokenised once. Which tokens carry loss is decided by characters, not by token ids:
each assistant turn's character span is found by rendering prefixes of the conversation, and a token
carries loss when its characters lie inside such a span. The span ends after the template's
end-of-turn marker, so the EOS token is a label even when the pad token is the EOS token (SmolLM2);
labels are never masked by comparing ids with ``pad_token_id``.

Message content is text, never structure: where it spells one of the template's control tokens
(``<|im_end|>\n<|im_start|>system ...``), that text is tokenised as plain text (``chat_encoding.py``), so a
message cannot forge a turn, in training as at inference (transformers' ``sanitize_control_tokens``). Content
without such text is tokenised exactly as the rendered conversation always was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.text import Text

from lmtune.data.chat_encoding import encode_chat, render_chat
from lmtune.data.chat_tools import check_tool_support, tool_calls
from lmtune.data.features import IGNORE_INDEX, char_limit, clip_text
from lmtune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMATS = ("alpaca", "sharegpt", "openai")
STANDARD_KEYS = ("messages", "conversations", "instruction", "input", "output", "system", "tools")
TRAIN_ON = ("assistant", "last_assistant", "all")
TOO_LONG = ("skip", "truncate_left")
# The problems check_rendered reports (fixed sentences, so they can be counted over a data set).
NO_LOSS = "no token carries loss"
NO_EOS = "a target does not end with an end-of-turn/EOS token"
DOUBLE_BOS = "starts with two BOS tokens"

ROLES = ("system", "user", "assistant")
# The openai layout also has the results of tool calls.
OPENAI_ROLES = (*ROLES, "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Tokens that end an assistant turn in common templates: ChatML, Llama 3, Gemma, Phi-3.
END_OF_TURN_TOKENS = (IM_END, "<|eot_id|>", "<end_of_turn>", "<|end|>")

# ChatML, as SmolLM2/Qwen write it, but without a default system prompt: a conversation without a
# system message is rendered without one.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_REQUIRED = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",), "openai": ("messages",)}
_MESSAGE_KEYS = {"sharegpt": ("from", "value"), "openai": ("role", "content")}
# How many non-empty records detect_format looks at.
_DETECT_ROWS = 20


@dataclass
class RenderedExample:
    """One conversation as the model sees it in training.

    ``labels[i]`` is ``input_ids[i]`` where that token carries loss, else ``IGNORE_INDEX`` (-100);
    the causal shift happens in the loss. ``text`` is the rendered text of the kept tokens.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    truncated_tokens: int
    text: str


# ---------------------------------------------------------------------------------------------
# Records -> messages


def detect_format(rows: list[dict[str, Any]], columns: dict[str, str], source: str) -> str:
    """The chat layout of ``rows`` ("alpaca", "sharegpt" or "openai"), judged on the first non-empty rows.

    ``columns`` maps standard keys to the user's column names; unmapped keys use their standard name.
    A format matches when one of the rows looked at holds all of its required keys (values are
    checked later, per record, by :func:`to_messages`). No match, or more than one, is a DataError.
    """
    _check_columns(columns)
    sample = [row for row in rows if any(not _is_empty(value) for value in row.values())][:_DETECT_ROWS]
    if not sample:
        raise DataError("no records: every record is empty", file=source)
    matches = [
        fmt
        for fmt in FORMATS
        if any(all(not _is_empty(row.get(_column(columns, key))) for key in _REQUIRED[fmt]) for row in sample)
    ]
    if len(matches) == 1:
        return matches[0]
    found = list(dict.fromkeys(key for row in sample for key, value in row.items() if not _is_empty(value)))
    found_text = ", ".join(repr(key) for key in found) or "none"
    if matches:
        raise DataError(
            f"the records fit several chat formats ({', '.join(matches)}); keys found: {found_text}",
            file=source,
            hint="set data.chat_format to the one you mean",
        )
    tried = "; ".join(
        f"{fmt} needs {' and '.join(_describe_key(columns, key) for key in _REQUIRED[fmt])}"
        for fmt in FORMATS
    )
    raise DataError(
        f"cannot tell the chat format: tried {tried}; keys found: {found_text}",
        file=source,
        hint="name your columns in data.columns, e.g. {instruction: question, output: answer} or "
        "{messages: dialog}, or set data.chat_format",
    )


def to_messages(
    row: dict[str, Any], fmt: str, columns: dict[str, str], *, source: str, line: int
) -> list[dict[str, Any]]:
    """One record as validated messages ``[{"role": ..., "content": ...}, ...]``.

    Roles are normalised to system/user/assistant (and ``tool`` in the openai layout). The result holds an
    optional system message first, then user and assistant turns alternating, starting with a user turn and
    ending with a non-blank assistant turn; an openai assistant message with ``tool_calls`` (validated, their
    ``arguments`` as objects: :func:`lmtune.data.chat_tools.tool_calls`) is followed by its ``tool`` results.
    Any problem is a DataError naming ``source``, ``line`` and the column; messages are counted from 1
    ("message 3 (index 2)").
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}; expected one of {FORMATS}")
    _check_columns(columns)
    if fmt == "alpaca":
        return _alpaca_messages(row, columns, source, line)
    column = _column(columns, "messages" if fmt == "openai" else "conversations")

    def fail(message: str, hint: str | None = None) -> DataError:
        return DataError(message, file=source, line=line, field=column, hint=hint)

    value = row.get(column)
    if not isinstance(value, list):
        hint = None
        if isinstance(value, str) and value.lstrip().startswith("["):
            hint = (
                "the conversation is JSON text (from a CSV cell?): store it as a list, e.g. in a .jsonl file"
            )
        elif value is None and column not in row:
            hint = f"the record has the keys {_keys(row)}; name the column in data.columns"
        raise fail(f"expected a list of messages, found {_type_name(value)}", hint)
    if not value:
        raise fail("the conversation has no messages")
    role_key, content_key = _MESSAGE_KEYS[fmt]
    messages = []
    for index, item in enumerate(value):
        where = f"message {index + 1} (index {index})"
        if not isinstance(item, dict):
            raise fail(f"{where} is {_type_name(item)}, not an object with '{role_key}' and '{content_key}'")
        calls = item.get("tool_calls") if fmt == "openai" else None
        # A message that only calls tools may leave its content out (OpenAI sends null).
        required = (role_key,) if calls else (role_key, content_key)
        missing = [key for key in required if key not in item]
        if missing:
            other = "openai" if fmt == "sharegpt" else "sharegpt"
            hint = None
            if all(key in item for key in _MESSAGE_KEYS[other]):
                hint = f"these messages look like the {other} layout: set data.chat_format: {other}"
            raise fail(
                f"{where} lacks the key{'s' if len(missing) > 1 else ''} {' and '.join(repr(k) for k in missing)}; "
                f"it has {_keys(item)}",
                hint,
            )
        raw_role = item[role_key]
        role = _normalise_role(raw_role, fmt)
        if role is None:
            known = ", ".join(SHAREGPT_ROLES if fmt == "sharegpt" else OPENAI_ROLES)
            raise fail(
                f"{where} has the unknown role {raw_role!r}; known roles: {known}",
                "tool calls are read in the openai layout (tools, tool_calls, role tool)"
                if fmt == "sharegpt" else None,
            )
        raw_content = item.get(content_key)
        content = "" if raw_content is None and calls else _content_text(raw_content, fmt)
        if content is None:
            raise fail(
                f"{where}: '{content_key}' must be a string, found {_type_name(item[content_key])}",
                'openai content may also be a list of {"type": "text", "text": ...} parts'
                if fmt == "openai"
                else None,
            )
        message: dict[str, Any] = {"role": role, "content": content}
        if calls is not None and calls != []:
            if role != "assistant":
                raise fail(f"{where} is {role!r}: only an assistant message has tool_calls")
            message["tool_calls"] = tool_calls(calls, where, fail)
        if role == "tool" and isinstance(item.get("tool_call_id"), str):
            message["tool_call_id"] = item["tool_call_id"]
        messages.append(message)
    _check_turns(messages, fail)
    return messages


def _alpaca_messages(
    row: dict[str, Any], columns: dict[str, str], source: str, line: int
) -> list[dict[str, str]]:
    def text(key: str, *, required: bool) -> str:
        column = _column(columns, key)
        value = row.get(column)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            hint = None
            if value is None and column not in row:
                hint = f"the record has the keys {_keys(row)}; name the column in data.columns"
            raise DataError(
                f"expected a string, found {_type_name(value)}",
                file=source,
                line=line,
                field=column,
                hint=hint,
            )
        if required and not value.strip():
            role = "assistant" if key == "output" else "user"
            raise DataError(f"the {role} content is empty", file=source, line=line, field=column)
        return value

    instruction = text("instruction", required=True)
    extra = text("input", required=False)
    output = text("output", required=True)
    system = text("system", required=False)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _check_turns(messages: list[dict[str, Any]], fail: Callable[[str], DataError]) -> None:
    """System only first, then user/assistant alternating from user, ending with assistant, none blank. An
    assistant message with tool calls (its content may be blank) is followed by one tool message or more (the
    results), then the assistant again; a conversation may end with the calls (training on the call alone)."""
    expected = {"user"}
    for index, message in enumerate(messages):
        role = message["role"]
        where = f"message {index + 1} (index {index})"
        if role == "system":
            if index > 0:
                raise fail(f"{where} is 'system': a system message is only allowed first")
            continue
        if role not in expected:
            previous = messages[index - 1]["role"] if index else None
            if "user" in expected and (previous is None or previous == "system"):
                raise fail(f"{where} is {role!r}: the conversation must start with a user message")
            if role == "tool":
                raise fail(f"{where} is 'tool': a tool message must follow an assistant message with tool_calls "
                           "(or another tool message)")
            if "tool" in expected:
                raise fail(f"{where} is {role!r}: the tool calls of message {index} (index {index - 1}) must be "
                           "answered by tool messages first")
            if previous == "tool":
                raise fail(f"{where} is {role!r} after 'tool': the assistant answers the tool results")
            raise fail(f"{where} is {role!r} after {previous!r}: turns must alternate user/assistant")
        if role == "assistant" and message.get("tool_calls"):
            expected = {"tool"}
            continue
        if not message["content"].strip():
            raise fail(f"{where}: the {role} content is empty")
        expected = {"user": {"assistant"}, "assistant": {"user"}, "tool": {"tool", "assistant"}}[role]
    last = messages[-1]["role"]
    if last != "assistant":
        count = len(messages)
        raise fail(
            f"the conversation must end with an assistant message; the last, message {count} "
            f"(index {count - 1}), is {last!r}"
        )


def _normalise_role(role: Any, fmt: str) -> str | None:
    if not isinstance(role, str):
        return None
    name = role.strip().lower()
    if fmt == "sharegpt":
        return SHAREGPT_ROLES.get(name)
    return name if name in OPENAI_ROLES else None


def _content_text(content: Any, fmt: str) -> str | None:
    """The content as a string; openai text parts are joined. None when it is not text."""
    if isinstance(content, str):
        return content
    if fmt != "openai" or not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            return None
        texts.append(part["text"])
    return "".join(texts)


def _check_columns(columns: dict[str, str]) -> None:
    for key, name in columns.items():
        if key not in STANDARD_KEYS:
            hint = (
                f"did you mean {{{name}: {key}}}? (standard key: your column)"
                if name in STANDARD_KEYS
                else None
            )
            raise ConfigError(
                f"unknown key {key!r}; the keys are {', '.join(STANDARD_KEYS)}",
                field="data.columns",
                hint=hint,
            )
        if not isinstance(name, str) or not name:
            raise ConfigError(f"the column name for {key!r} must be a non-empty string", field="data.columns")


def _column(columns: dict[str, str], key: str) -> str:
    return columns.get(key, key)


def _describe_key(columns: dict[str, str], key: str) -> str:
    column = _column(columns, key)
    return repr(column) if column == key else f"{column!r} (for {key})"


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict) and len(value) == 0)


def _keys(mapping: dict[str, Any]) -> str:
    present = [key for key, value in mapping.items() if value is not None] if mapping else []
    return ", ".join(repr(key) for key in present) or "no keys"


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Tokenizer set-up


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> bool:
    """Give a tokenizer without a chat template the ChatML :data:`DEFAULT_CHAT_TEMPLATE`, or any tokenizer
    ``template`` (the user's ``model.chat_template``, which replaces the model's own).

    Without ``template``, a tokenizer that has a template is left alone. Otherwise the template is set and,
    where the vocabulary lacks them and the template writes them, ``<|im_start|>`` and ``<|im_end|>`` are added
    as special tokens (never split, skipped by ``decode(skip_special_tokens=True)``); a tokenizer without an
    EOS token gets ``<|im_end|>`` as its EOS, so generation stops at the end of a turn.

    Returns True when tokens were added: the caller MUST then grow the model's embeddings
    (``model.resize_token_embeddings(len(tokenizer))``), or the new ids index past the table.
    """
    if template is None and tokenizer.chat_template:
        return False
    tokenizer.chat_template = template or DEFAULT_CHAT_TEMPLATE
    vocab = tokenizer.get_vocab()
    missing = [token for token in (IM_START, IM_END) if token not in vocab and token in tokenizer.chat_template]
    added = 0
    if missing:
        added = tokenizer.add_special_tokens(
            {"extra_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.eos_token is None and IM_END in tokenizer.get_vocab():
        tokenizer.eos_token = IM_END
    return added > 0


def end_of_turn_ids(
    tokenizer: PreTrainedTokenizerBase, model_generation_eos: int | list[int] | None = None
) -> set[int]:
    """Token ids that end an assistant turn.

    The tokenizer's EOS, the model's generation EOS ids (pass ``model.generation_config.eos_token_id``)
    and whichever of ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>`` the vocabulary holds.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(model_generation_eos, int):
        ids.add(model_generation_eos)
    elif model_generation_eos is not None:
        ids.update(int(i) for i in model_generation_eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return ids


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of plain text by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


# ---------------------------------------------------------------------------------------------
# Rendering


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    *,
    train_on: str = "assistant",
    max_length: int,
    too_long: str = "skip",
    special_tokens_in_content: bool = False,
    tools: Sequence[dict[str, Any]] | None = None,
) -> RenderedExample | None:
    """Render ``messages`` with the tokenizer's chat template; token ids plus labels.

    ``train_on``: ``"assistant"`` (every assistant turn carries loss), ``"last_assistant"`` (only the
    final one) or ``"all"`` (every token). Each assistant turn's span runs from the end of the
    generation prompt to the end of the turn as the template writes it, end-of-turn marker included: an
    assistant's tool calls carry loss as its answers do, the tool results (``tool`` messages) never.

    ``tools``: the conversation's tool definitions, given to the template (``apply_chat_template(...,
    tools=...)``); a conversation with tools or tool calls and a template that cannot write them is a
    DataError (:func:`lmtune.data.chat_tools.check_tool_support`).

    Longer than ``max_length`` tokens: ``too_long="skip"`` returns None; ``"truncate_left"`` drops
    prompt tokens from the start (keeping a leading BOS) so that everything from the first
    loss-carrying token on fits, and returns None when even that does not fit.

    A template that does not render conversations incrementally (a prefix of the conversation is
    not rendered as a prefix of the whole) raises a DataError unless ``train_on="all"``.

    Control-token text in message content is tokenised as plain text
    (:func:`lmtune.data.chat_encoding.encode_chat`) unless
    ``special_tokens_in_content``. A message longer than :func:`~lmtune.data.features.char_limit` characters
    holds more than ``max_length`` tokens: its example is skipped without tokenising it, or with
    ``"truncate_left"`` a prompt message is clipped to its end before tokenising (the same example; only
    ``truncated_tokens`` then counts from the clipped message).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, not {train_on!r}")
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, not {too_long!r}")
    check_tool_support(tokenizer, messages, tools, source=None, line=None)
    clipped = _clip_messages(list(messages), train_on, max_length, too_long)
    if clipped is None:
        return None
    messages = clipped
    encoding = encode_chat(tokenizer, messages, special_tokens_in_content=special_tokens_in_content, tools=tools)
    text, input_ids = encoding.text, encoding.input_ids
    offsets = encoding.offsets or []
    spans = _loss_spans(tokenizer, messages, text, train_on, tools)
    labels = _labels(input_ids, offsets, spans)
    first_loss = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    if len(input_ids) <= max_length:
        return RenderedExample(input_ids, labels, first_loss, 0, text)
    if too_long == "skip":
        return None
    # Keep a leading BOS: the model has only ever seen sequences that start with it.
    keep = 1 if tokenizer.bos_token_id is not None and input_ids[0] == tokenizer.bos_token_id else 0
    cut = len(input_ids) - max_length
    if keep + cut > first_loss:
        return None
    start = keep + cut
    if keep and input_ids[start] == input_ids[0]:
        # The cut lands on a turn that starts with the BOS itself (SmolLM2's BOS is <|im_start|>): that token
        # leads, and the kept one would make a double BOS.
        keep, cut = 0, start
    kept_text = text[: offsets[0][1]] if keep else ""
    return RenderedExample(
        input_ids=input_ids[:keep] + input_ids[start:],
        labels=labels[:keep] + labels[start:],
        prompt_tokens=first_loss - cut,
        truncated_tokens=cut,
        text=kept_text + text[offsets[start][0] :],
    )


def _clip_messages(
    messages: list[dict[str, Any]], train_on: str, max_length: int, too_long: str
) -> list[dict[str, Any]] | None:
    """``messages`` with every content longer than ``char_limit(max_length)`` characters (more than
    ``max_length`` tokens) dealt with before anything is tokenised: None when the example cannot fit (``"skip"``,
    or such a message from the first loss-carrying one on), else prompt messages clipped to their end, which
    holds every token that left truncation keeps of them."""
    limit = char_limit(max_length)
    long = [i for i, message in enumerate(messages) if len(message["content"]) > limit]
    if not long:
        return messages
    assistants = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    first_loss = {"all": 0, "assistant": assistants[0], "last_assistant": assistants[-1]}[train_on]
    if too_long == "skip" or long[-1] >= first_loss:
        return None
    return [
        {**message, "content": clip_text(message["content"], max_length, side="left")}
        if i in long
        else message
        for i, message in enumerate(messages)
    ]


def _loss_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], text: str, train_on: str,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[tuple[int, int]]:
    """Character spans of ``text`` that carry loss, in order."""
    if train_on == "all":
        return [(0, len(text))]
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for i in turns:
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        # The full render is the render of the whole conversation: reuse it for the last turn.
        turn = (
            text
            if i == len(messages) - 1
            else render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        )
        if not (text.startswith(turn) and turn.startswith(prompt)):
            raise DataError(
                "the chat template does not render conversations incrementally: rendering the first "
                f"{i + 1} messages does not give the start of the whole conversation's text, so the "
                "assistant turns cannot be located",
                hint="use a model or chat template that renders each message in place (e.g. ChatML), "
                "or set data.train_on: all",
            )
        spans.append((len(prompt), len(turn)))
    return spans


def _labels(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """A token's id where its characters lie inside a span, else IGNORE_INDEX; one pass (both are in order)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    span = 0
    for position, (start, end) in enumerate(offsets):
        while span < len(spans) and spans[span][1] < end:
            span += 1
        if span == len(spans):
            break
        if spans[span][0] <= start:
            labels[position] = input_ids[position]
    return labels


# ---------------------------------------------------------------------------------------------
# Checks and display


def check_rendered(
    tokenizer: PreTrainedTokenizerBase, example: RenderedExample, eos_ids: set[int]
) -> list[str]:
    """Problems with a rendered example that would train the model wrongly (empty when it is sound).

    Each contiguous run of loss-carrying tokens must end with a token of ``eos_ids`` (whitespace
    tokens after it, such as ChatML's newline, are allowed), or the model never learns to stop.
    The problems are the fixed sentences :data:`NO_LOSS`, :data:`NO_EOS` and :data:`DOUBLE_BOS`
    (each at most once), so callers can count them over many examples.
    """
    problems = []
    labels = example.labels
    if all(label == IGNORE_INDEX for label in labels):
        problems.append(NO_LOSS)
    for start, end in _loss_runs(labels):
        last = end - 1
        while last > start and labels[last] not in eos_ids and not _decode(tokenizer, [labels[last]]).strip():
            last -= 1
        if labels[last] not in eos_ids:
            problems.append(NO_EOS)
            break
    bos = tokenizer.bos_token_id
    if bos is not None and example.input_ids[:2] == [bos, bos]:
        problems.append(DOUBLE_BOS)
    return problems


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, clean_up_tokenization_spaces=False))


def _loss_runs(labels: list[int]) -> Iterable[tuple[int, int]]:
    """(start, end) of each run of loss-carrying positions, end exclusive."""
    start = None
    for position, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            yield start, position
            start = None


def format_conversation_for_display(tokenizer: PreTrainedTokenizerBase, example: RenderedExample) -> Text:
    """The example's tokens as rich text: loss-carrying tokens on a green background, the rest dim."""
    shown = Text()
    # Decode runs of equal loss status together: a character split over byte-level tokens decodes whole.
    position = 0
    while position < len(example.input_ids):
        loss = example.labels[position] != IGNORE_INDEX
        end = position
        while end < len(example.input_ids) and (example.labels[end] != IGNORE_INDEX) == loss:
            end += 1
        piece = _decode(tokenizer, example.input_ids[position:end])
        shown.append(piece, style="black on green" if loss else "dim")
        position = end
    return shown
