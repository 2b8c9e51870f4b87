"""Tool calling on ``POST /v1/chat/completions``: a request's ``tools`` and ``tool_choice``, and the answer's
``tool_calls`` in OpenAI's shape.

``tools`` (OpenAI function definitions) are rendered by the model's chat template, which must support them
(:func:`lmtune.data.chat_tools.tokenizer_supports_tools`; a model tuned with ``model.chat_template:
chatml-tools`` does); ``tool_choice`` may be ``"auto"`` (the default: the model decides) or ``"none"`` (the
tools are left out of the prompt and the answer is plain text); ``"required"`` and a named function are
refused (lmtune does not constrain decoding). The answer is parsed for calls in the built-in syntax
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, :func:`lmtune.data.chat_tools.parse_tool_calls`):
found, they come back as ``message.tool_calls`` (ids, ``type: "function"``, ``arguments`` as JSON text) with
``finish_reason: "tool_calls"``; an answer without a well-formed call comes back as plain content.
"""

from __future__ import annotations

from typing import Any

from lmtune.data.chat_tools import parse_tool_calls, tokenizer_supports_tools, tool_definitions, uses_tools
from lmtune.errors import DataError
from lmtune.serve.gate import APIError

TOOL_CHOICES = ("auto", "none")


def request_tools(tools: list[Any] | None, tool_choice: Any, tokenizer: Any,
                  conversation: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The tool definitions to render for a request (None: none, or ``tool_choice: "none"``); 400s for a
    ``tool_choice`` lmtune cannot honour, malformed tools, and tools (or earlier calls and results in
    ``conversation``) for a template that cannot write them."""
    if tool_choice is not None and tool_choice not in TOOL_CHOICES:
        raise APIError(400, f"tool_choice {tool_choice!r} is not supported: this server takes \"auto\" or \"none\" "
                       "(it does not force calls)", param="tool_choice", code="unsupported_parameter")
    try:
        definitions = tool_definitions(tools, lambda message: DataError(message))
    except DataError as exc:
        raise APIError(400, exc.message, param="tools", code="invalid_value") from None
    if tool_choice == "none":
        definitions = None
    if uses_tools(conversation, definitions) and not tokenizer_supports_tools(tokenizer):
        raise APIError(400, "tools are not supported by this model: its chat template does not write tools or "
                       "tool calls (train it with model.chat_template: chatml-tools, or a template of your own "
                       "that does)", param="tools" if definitions else "messages", code="unsupported_parameter")
    return definitions


def answer_message(text: str, tools: list[dict[str, Any]] | None,
                   finish_reason: str) -> tuple[dict[str, Any], str]:
    """The assistant message of a choice, and its finish_reason: with ``tools``, calls parsed from ``text`` come
    back as ``tool_calls`` (``content`` holds what the answer says besides them, or None) and the reason is
    ``"tool_calls"``; otherwise ``text`` is the content."""
    if tools:
        content, calls = parse_tool_calls(text)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish_reason


def tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stream's ``delta.tool_calls`` for whole calls: each with its ``index``, id, name and all its arguments."""
    return [{"index": i, **call} for i, call in enumerate(calls)]
