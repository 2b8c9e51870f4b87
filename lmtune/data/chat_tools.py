"""Tool calling in chat data: OpenAI-style tool definitions and calls, the chat templates that write them, and
the parser that reads a model's calls back.

A record may carry ``tools`` (OpenAI function definitions: ``{"type": "function", "function": {"name",
"description", "parameters"}}``), assistant messages with ``tool_calls`` (``[{"id", "type": "function",
"function": {"name", "arguments"}}]``, arguments a JSON object or its JSON text) and ``tool`` messages (the
tools' results: ``tool_call_id``, ``content``). They are rendered by the chat template, which decides how
calls are written (transformers' ``apply_chat_template(messages, tools=...)``): lmtune only validates them and
gives ``arguments`` to the template as an object (what templates expect: they write it with ``tojson``).

A template supports tools when its source uses the ``tools`` variable and reads ``tool_calls``
(:func:`template_supports_tools`); a template that does not would drop the tools and the calls silently,
so such data is refused. Neither bundled model's own template does: ``model.chat_template: chatml-tools``
selects :data:`CHATML_TOOLS_TEMPLATE`, ChatML with tools in the Hermes / Qwen2.5 style.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes

from lmtune.errors import ConfigError, DataError

# ChatML with tools, as Qwen2.5 writes it (also the Hermes function-calling format), without a default system
# prompt: tools are listed as JSON inside <tools></tools> in the system turn (after the system message, if any),
# an assistant's calls are written as <tool_call>{"name": ..., "arguments": {...}}</tool_call> after its text,
# and the results of consecutive tool messages share one user turn, each inside <tool_response></tool_response>.
# A conversation without tools renders exactly as plain ChatML (lmtune's default template).
CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first)"
    " or (message['role'] == 'assistant' and not message.get('tool_calls')) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message['content'] %}{{- message['content'] + '\\n' }}{%- endif %}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{%- if tool_call['function'] is defined %}{%- set tool_call = tool_call['function'] %}{%- endif %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' + (tool_call['name'] | tojson) + ', \"arguments\": ' }}"
    "{{- tool_call['arguments'] | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ``model.chat_template`` names lmtune knows; anything else is a Jinja template or a file holding one.
CHAT_TEMPLATES = {"chatml-tools": CHATML_TOOLS_TEMPLATE}
TOOL_CALL_SYNTAX = "<tool_call>{...}</tool_call>"
# Where a template's assistant turn ends (ChatML, Llama 3, Gemma, Phi-3; as ``chat.END_OF_TURN_TOKENS``).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def resolve_chat_template(value: str) -> str:
    """The Jinja source that ``model.chat_template`` names: a built-in name (:data:`CHAT_TEMPLATES`), a template
    itself (it holds ``{{`` or ``{%``), or the path of a file holding one. A ConfigError where it is none."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        source = value
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{value!r} is neither a built-in chat template ({', '.join(CHAT_TEMPLATES)}), a Jinja template, "
                "nor a file",
                field="model.chat_template",
                hint="name a built-in template, give the template itself, or the path of a .jinja file",
            )
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the chat template file {path}: {exc}", field="model.chat_template") from None
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"the chat template is not valid Jinja: {exc.message} (template line {exc.lineno})",
                          field="model.chat_template") from None
    return source


@functools.lru_cache(maxsize=16)
def template_supports_tools(template: str) -> bool:
    """Whether a chat template writes tools and tool calls: its source uses the variable ``tools`` and reads
    ``tool_calls`` (an attribute, an item or a string naming it). A template that does neither ignores what
    ``apply_chat_template`` passes it, so tools would vanish from the rendered text without a word."""
    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return "tools" in template and "tool_calls" in template
    uses_tools = any(node.name == "tools" and node.ctx == "load" for node in ast.find_all(jinja2.nodes.Name))
    reads_calls = any(node.attr == "tool_calls" for node in ast.find_all(jinja2.nodes.Getattr)) or any(
        node.value == "tool_calls" for node in ast.find_all(jinja2.nodes.Const)
    )
    return uses_tools and reads_calls


def tokenizer_supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template (its ``tool_use`` one, where it has several) writes tools."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        template = tokenizer.get_chat_template(tools=[])
    except ValueError:
        return False
    return template_supports_tools(template)


def uses_tools(messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None) -> bool:
    """Whether a conversation involves tools: definitions, an assistant's calls or a tool's result."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def check_tool_support(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None, *, source: str | None,
    line: int | None,
) -> None:
    """A DataError (at ``source``:``line``) where the conversation involves tools and the tokenizer's chat template
    cannot write them (:func:`template_supports_tools`)."""
    if uses_tools(messages, tools) and not tokenizer_supports_tools(tokenizer):
        raise DataError(
            "this record has tools or tool calls, and the model's chat template has no tool support (it never "
            "uses `tools` and `tool_calls`), so they would be dropped from the text the model sees",
            file=source, line=line,
            hint="set model.chat_template: chatml-tools for a ChatML model (SmolLM2), or give a template that "
            "writes tools (model.chat_template: a Jinja string or a file)",
        )


# ---------------------------------------------------------------------------------------------
# Validation of records


def record_tools(row: dict[str, Any], fmt: str, columns: dict[str, str], *, source: str,
                 line: int) -> list[dict[str, Any]] | None:
    """An openai record's validated tool definitions (column ``tools``, or the one ``data.columns`` names);
    None for the other layouts and for records without tools."""
    if fmt != "openai":
        return None
    column = columns.get("tools", "tools")
    return tool_definitions(row.get(column), lambda message: DataError(message, file=source, line=line, field=column))


def tool_definitions(value: Any, fail: Callable[[str], DataError]) -> list[dict[str, Any]] | None:
    """A record's ``tools`` validated: None when absent or empty, else OpenAI function definitions (a bare
    ``{"name", "parameters"}`` is wrapped as ``{"type": "function", "function": ...}``)."""
    if value is None or value == []:
        return None
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise fail(f"'tools' is not valid JSON: {exc.msg} (character {exc.pos})") from None
    if not isinstance(value, list):
        raise fail(f"'tools' must be a list of function definitions, found {type(value).__name__}")
    out = []
    for index, tool in enumerate(value):
        where = f"tool {index + 1} (index {index})"
        if not isinstance(tool, dict):
            raise fail(f"{where} is not an object")
        function = tool.get("function") if "function" in tool else tool
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise fail(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        if not isinstance(function.get("name"), str) or not function["name"].strip():
            raise fail(f"{where} has no function name")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise fail(f"{where}: 'parameters' must be a JSON schema object")
        out.append({"type": "function", "function": function})
    return out


def tool_calls(value: Any, where: str, fail: Callable[[str], DataError]) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` validated, ``arguments`` parsed from JSON text into an object (what
    chat templates write with ``tojson``); ids are kept (``call_`` ids are made where missing)."""
    if not isinstance(value, list) or not value:
        raise fail(f"{where}: 'tool_calls' must be a non-empty list")
    calls = []
    for index, call in enumerate(value):
        at = f"{where}, tool call {index + 1}"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise fail(f'{at} must be {{"id": ..., "type": "function", "function": {{"name": ..., "arguments": ...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise fail(f"{at} has no function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise fail(f"{at}: 'arguments' is not valid JSON: {exc.msg} (character {exc.pos})") from None
        if not isinstance(arguments, dict):
            raise fail(f"{at}: 'arguments' must be a JSON object")
        ident = call.get("id")
        calls.append({"id": ident if isinstance(ident, str) and ident else new_call_id(), "type": "function",
                      "function": {"name": name, "arguments": arguments}})
    return calls


def target_text(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None) -> str:
    """What the model should answer to ``messages[:-1]``: the last message's content, or for an answer with tool
    calls, the answer as the chat template writes it (calls in its syntax), without the end-of-turn marker: the
    reference a generated answer is scored against."""
    last = messages[-1]
    if not last.get("tool_calls"):
        return str(last["content"])
    tool_list = list(tools) if tools else None
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tools=tool_list, tokenize=False,
                                           add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(list(messages), tools=tool_list, tokenize=False)
    answer = whole[len(prompt):] if whole.startswith(prompt) else str(last["content"])
    for marker in END_OF_TURN_MARKERS:
        answer = answer.split(marker)[0]
    return answer.strip()


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------------------------
# Parsing a model's answer


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A generated answer split into its text and its calls in the built-in syntax
    (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as :data:`CHATML_TOOLS_TEMPLATE` writes them).

    The calls come in OpenAI's shape (``id``, ``type: "function"``, ``function.name``, ``function.arguments`` as
    JSON text); the text is what lies outside them, stripped (None when nothing is left). An answer with no call,
    or with any call that is not a JSON object with a string ``name`` (an unfinished or garbled call), comes back
    whole as text with no calls: a model's bad call is its answer, not an error.
    """
    matches = list(_TOOL_CALL.finditer(text))
    if not matches:
        return text, []
    calls = []
    for match in matches:
        try:
            call = json.loads(match.group(1).strip())
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            return text, []
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as JSON text already
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return text, []
        calls.append({"id": new_call_id(), "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    rest = _TOOL_CALL.sub("", text).strip()
    if "<tool_call>" in rest:  # an unclosed call after the parsed ones: the answer is not a clean call
        return text, []
    return rest or None, calls
