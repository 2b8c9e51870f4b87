"""Chat conversations rendered with the tokenizer's chat template and tokenised, with message content kept as
text: where a message spells one of the template's control tokens (``<|im_end|>\n<|im_start|>system ...``),
that text is tokenised as plain text, so a message cannot forge a turn (:func:`encode_chat`).

The ids are those of transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``, which marks
the control tokens found in content and tokenises them apart; this module does the same while keeping
each token's character offsets, which the loss mask of training is built from (``chat.py``). A conversation
whose content holds no control-token text is tokenised exactly as its rendered text always was.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.nodes

from lmtune.errors import DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The private-use characters transformers wraps around a control token it finds in message content
# (transformers.utils.chat_template_utils.mark_control_tokens): the same ones, so that the marking, and the
# removal of such characters from content, give its sanitised ids exactly.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """``messages`` rendered with the tokenizer's chat template, with the tool definitions ``tools`` where given
    (a ModelError without a template; a DataError when the template refuses them)."""
    if not tokenizer.chat_template:
        raise ModelError(
            "the tokenizer has no chat template", hint="lmtune.data.chat.ensure_chat_template gives it ChatML"
        )
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=list(tools) if tools else None, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as exc:
        raise DataError(
            f"the model's chat template refused the conversation: {exc}",
            hint="some templates reject system messages or other role orders; adapt the data to the model",
        ) from None
    if not isinstance(text, str):  # a list when given a batch; we never pass one
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


@dataclass
class ChatEncoding:
    """A conversation rendered with the chat template and tokenised: ``offsets[i]`` is token ``i``'s character
    span in ``text`` (None when not asked for). A control-token string tokenised as plain text gives each of
    its tokens the span of the whole string."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]] | None


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens_in_content: bool = False,
    offsets: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
) -> ChatEncoding:
    """``messages`` rendered with the tokenizer's chat template and tokenised (no special tokens added besides
    those the template writes), with character offsets (a fast tokenizer is needed for those).

    Control-token text in message content (see :func:`control_tokens`) is tokenised as plain text, the ids
    those of transformers' ``apply_chat_template(..., sanitize_control_tokens=True)`` (checked: a tokenizer
    for which they would differ is a DataError); ``special_tokens_in_content`` tokenises it as the control
    tokens instead. A conversation without such text is tokenised exactly as its rendered text always was.

    ``tools`` (tool definitions) go to the template. Control-token text in tool definitions or in an assistant's
    tool calls is a DataError unless ``special_tokens_in_content`` (only message content is kept as text).
    """
    messages = list(messages)
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools)
    if not special_tokens_in_content:
        _refuse_control_text_in_tools(tokenizer, messages, tools)
    if special_tokens_in_content or not holds_control_text(tokenizer, messages):
        ids, spans = _encode(tokenizer, text, offsets=offsets)
        return ChatEncoding(text, ids, spans)
    ids, spans = _encode_marked(tokenizer, messages, text, add_generation_prompt, offsets=offsets, tools=tools)
    sanitised = tokenizer.apply_chat_template(
        messages,
        tools=list(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        sanitize_control_tokens=True,
        return_dict=False,
    )
    if list(sanitised) != ids:
        raise DataError(
            "a message holds control-token text (like <|im_end|>) that cannot be kept as plain text "
            f"with this tokenizer ({type(tokenizer).__name__})",
            hint="remove that text from the data, or set data.special_tokens_in_content: true to train "
            "on it as control tokens",
        )
    return ChatEncoding(text, ids, spans)


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The strings that message content must not turn into tokens: the tokenizer's special tokens, plus the
    added tokens listed in ``tokenizer.chat_control_tokens`` or, without that list, the added tokens the chat
    template writes itself (the set transformers' ``sanitize_control_tokens`` uses)."""
    template = tokenizer.get_chat_template() if tokenizer.chat_template else ""
    added = tuple((token.content, bool(token.special)) for token in tokenizer.added_tokens_decoder.values())
    listed = getattr(tokenizer, "chat_control_tokens", None)
    return _control_tokens(template, added, tuple(listed) if listed is not None else None)


def _refuse_control_text_in_tools(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
) -> None:
    """A DataError where a tool definition or a tool call spells a control token: those are written by the
    template as JSON, outside the content that :func:`encode_chat` keeps as text, so they could forge a turn."""
    calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
    if not tools and not calls:
        return
    pattern = _control_pattern(control_tokens(tokenizer))
    found = pattern.search(json.dumps([tools or [], calls], ensure_ascii=False))
    if found:
        raise DataError(
            f"a tool definition or tool call holds the control-token text {found.group(0)!r}",
            hint="remove that text from the data, or set data.special_tokens_in_content: true to train on it "
            "as a control token",
        )


def holds_control_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]) -> bool:
    """Whether a message's content spells a control token (:func:`control_tokens`) or holds transformers'
    control-token markers: only then does :func:`encode_chat` tokenise it apart from the rest."""
    pattern = _control_pattern(control_tokens(tokenizer))
    return any(
        isinstance(content := message.get("content"), str)
        and (pattern.search(content) is not None or _MARK_START in content or _MARK_END in content)
        for message in messages
    )


@functools.lru_cache(maxsize=16)
def _control_tokens(
    template: str, added: tuple[tuple[str, bool], ...], listed: tuple[str, ...] | None
) -> tuple[str, ...]:
    if listed is not None:
        return tuple(content for content, special in added if special or content in listed)
    literals = _template_literals(template)
    return tuple(
        content for content, special in added if special or (content in literals and not content.isspace())
    )


def _template_literals(template: str) -> str:
    """The literal text and string constants of a chat template, joined by NUL (so a token cannot match across
    two of them); the template's source where it does not parse here (a template using extension tags)."""
    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateError:
        return template
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)


@functools.lru_cache(maxsize=16)
def _control_pattern(tokens: tuple[str, ...]) -> re.Pattern[str]:
    """A regex matching any of ``tokens``, the longest first (a token wins over the tokens inside it)."""
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")


def _encode(
    tokenizer: PreTrainedTokenizerBase, text: str, *, offsets: bool
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """``text`` tokenised without added special tokens; with ``offsets``, each token's character span."""
    if not offsets:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ModelError(
            f"the tokenizer ({type(tokenizer).__name__}) cannot report character offsets",
            hint="use a model whose tokenizer has a tokenizer.json (a fast tokenizer)",
        ) from None
    return list(encoding["input_ids"]), [(int(a), int(b)) for a, b in encoding["offset_mapping"]]


def _encode_marked(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    text: str,
    add_generation_prompt: bool,
    *,
    offsets: bool,
    tools: Sequence[dict[str, Any]] | None = None,
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids (and offsets into ``text``) of the conversation with the control-token text of its contents
    tokenised as plain text: as transformers' ``encode_marked_chat`` does it, keeping the offsets.

    Each control token in a content is wrapped in private-use markers; the conversation rendered from the
    marked messages is split at the markers; text pieces are tokenised normally (template control tokens
    included) and the marked tokens as plain text, each piece after the first behind a newline that is then
    dropped (SentencePiece would otherwise add its word-start space at the start of a piece).
    """
    if any(_MARK_START in message["content"] or _MARK_END in message["content"] for message in messages):
        raise DataError(
            "a message holds the private-use character U+F0000 or U+F0001, which marks control-token text "
            "while a conversation is tokenised",
            hint="remove those characters from the data",
        )
    pattern = _control_pattern(control_tokens(tokenizer))
    marked = [
        {
            **message,
            "content": pattern.sub(
                lambda match: _MARK_START + match.group(0) + _MARK_END,
                message["content"],
            ),
        }
        for message in messages
    ]
    rendered = render_chat(tokenizer, marked, add_generation_prompt=add_generation_prompt, tools=tools)
    markers = re.compile(f"{_MARK_START}({pattern.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
    pieces = markers.split(rendered)  # [text, marked token or None, text, ...]
    if "".join(piece or "" for piece in pieces) != text:
        raise DataError(
            "a message holds control-token text (like <|im_end|>) and the chat template changes message "
            "content, so that text cannot be kept apart from the template's own control tokens",
            hint="remove that text from the data, or set data.special_tokens_in_content: true to train "
            "on it as control tokens",
        )
    newline = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    start = 0
    for index, piece in enumerate(pieces):
        if not piece:
            continue
        as_text = index % 2 == 1
        piece_ids, piece_spans = _encode_piece(tokenizer, piece, as_text, newline if index else None, offsets)
        ids += piece_ids
        spans += [(start + a, start + b) for a, b in piece_spans]
        start += len(piece)
    return ids, spans if offsets else None


def _encode_piece(
    tokenizer: PreTrainedTokenizerBase, piece: str, as_text: bool, newline: list[int] | None, offsets: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    """One piece of a marked conversation: ids, and spans relative to the piece (empty without ``offsets``).

    ``newline``: the newline's ids, for a piece after the first (tokenised behind a newline, which is then
    dropped). A marked control token (``as_text``) is tokenised as plain text; its tokens share its span.
    """

    def encode(prefix: str) -> tuple[list[int], list[tuple[int, int]]]:
        if as_text:
            ids = _plain_ids(tokenizer, prefix + piece)
            return ids, [(0, len(piece))] * len(ids)
        ids, spans = _encode(tokenizer, prefix + piece, offsets=offsets)
        return ids, [(max(a - len(prefix), 0), max(b - len(prefix), 0)) for a, b in spans or []]

    ids, spans = encode("\n") if newline is not None else ([], [])
    if newline is not None and ids[: len(newline)] == newline:
        ids, spans = ids[len(newline) :], spans[len(newline) :]
    else:
        ids, spans = encode("")
    if as_text and tokenizer.convert_tokens_to_ids(piece) in ids:
        raise DataError(
            f"the tokenizer reads the text {piece!r} as its control token even without special tokens",
            hint="remove that text from the data, or set data.special_tokens_in_content: true",
        )
    return ids, spans if offsets else []


def _plain_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text`` tokenised as plain text, matching no added token, special or not (as transformers'
    ``_encode_without_added_tokens``): the fast tokenizer's normaliser, pre-tokenizer and model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = (
        [split for split, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        if backend.pre_tokenizer
        else [text]
    )
    return [token.id for split in splits for token in backend.model.tokenize(split)]
