"""Tool-calling chat data: records with tools, calls and results, rendered through a real chat template (SmolLM2's
tokenizer with lmtune's ``chatml-tools``), the loss mask, the tool-support rule, validation at file:line, the
call parser the server uses, and ``model.chat_template``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import WEATHER_TOOL, loss_runs, tool_rows
from transformers import AutoTokenizer

import lmtune
from lmtune.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ensure_chat_template,
    render_conversation,
    to_messages,
)
from lmtune.data.chat_tools import (
    CHATML_TOOLS_TEMPLATE,
    parse_tool_calls,
    resolve_chat_template,
    target_text,
    template_supports_tools,
)
from lmtune.errors import ConfigError, DataError
from lmtune.models.registry import CHATML_TEMPLATE, GEMMA_TEMPLATE

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    {"role": "assistant", "content": "It is sunny."},
]


@pytest.fixture(scope="module")
def smol_tools(smollm2_tokenizer_dir: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert not ensure_chat_template(tok, resolve_chat_template("chatml-tools"))  # SmolLM2 has the ChatML tokens
    return tok




def test_tools_render_through_the_template_and_loss_covers_calls_and_answers(smol_tools: Any) -> None:
    messages = to_messages({"messages": CONVERSATION}, "openai", {}, source="t.jsonl", line=1)
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # JSON text -> object
    ex = render_conversation(smol_tools, messages, max_length=512, tools=[WEATHER_TOOL])
    assert ex is not None
    # the tool definitions appear as JSON in the system turn, after the system message
    assert ex.text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools>" in ex.text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in ex.text
    assert '<|im_start|>user\n<tool_response>\n{"sky": "sunny"}\n</tool_response><|im_end|>' in ex.text
    # loss: the call and the final answer, each with its end-of-turn; never the tool result, system or user
    assert loss_runs(smol_tools, ex, loss=True) == [
        call + "<|im_end|>\n", "It is sunny.<|im_end|>\n"]
    masked = "".join(loss_runs(smol_tools, ex, loss=False))
    assert "<tool_response>" in masked and "Weather in Paris?" in masked and "# Tools" in masked
    # the same arguments given as an object render the same
    as_object = json.loads(json.dumps(CONVERSATION))
    as_object[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    again = render_conversation(smol_tools, to_messages({"messages": as_object}, "openai", {}, source="t", line=1),
                                max_length=512, tools=[WEATHER_TOOL])
    assert again is not None and again.input_ids == ex.input_ids
    # the reference an evaluation scores a call against is the call as the template writes it
    assert target_text(smol_tools, messages[:3], [WEATHER_TOOL]) == call


def test_chatml_tools_without_tools_is_plain_chatml(smol_tools: Any, smollm2_tokenizer_dir: Path) -> None:
    plain = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    plain.chat_template = DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert smol_tools.apply_chat_template(messages, tokenize=False) == plain.apply_chat_template(
        messages, tokenize=False)


def test_a_record_may_end_with_its_call(smol_tools: Any) -> None:
    messages = to_messages({"messages": CONVERSATION[:3]}, "openai", {}, source="t", line=1)
    ex = render_conversation(smol_tools, messages, max_length=512, tools=[WEATHER_TOOL])
    assert ex is not None
    assert loss_runs(smol_tools, ex, loss=True) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n']


# template, supports tools
SUPPORT_CASES = [
    (CHATML_TOOLS_TEMPLATE, True),
    (DEFAULT_CHAT_TEMPLATE, False),
    (CHATML_TEMPLATE, False),
    (GEMMA_TEMPLATE, False),
    # Llama 3.1 style: tools in a variable, calls read as an attribute
    ("{% if tools is not none %}{{ tools | tojson }}{% endif %}{% for m in messages %}{% if m.tool_calls %}"
     "{{ m.tool_calls[0].function.name }}{% endif %}{% endfor %}", True),
    # mentions tools only as text: not support
    ("{{ 'tools and tool_calls are not supported' }}{% for m in messages %}{{ m['content'] }}{% endfor %}", False),
    # writes tools but never the calls
    ("{{ tools | tojson }}{% for m in messages %}{{ m['content'] }}{% endfor %}", False),
]


@pytest.mark.parametrize(("template", "supported"), SUPPORT_CASES)
def test_tool_support_rule(template: str, supported: bool) -> None:
    assert template_supports_tools(template) is supported


def test_template_without_tool_support_is_refused(smollm2_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)  # SmolLM2's own ChatML: no tools
    messages = to_messages({"messages": CONVERSATION}, "openai", {}, source="t", line=1)
    with pytest.raises(DataError, match="no tool support"):
        render_conversation(tok, messages, max_length=512, tools=[WEATHER_TOOL])


def test_training_with_tools_and_no_tool_template_names_the_first_record(
        tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    plain = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
             for i in range(2)]
    rows = plain + tool_rows(6)
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {"task": "sft", "model": str(tiny_chat_llama_dir), "data": {"train": str(data), "max_length": 256},
           "output_dir": str(tmp_path / "run")}
    with pytest.raises(DataError) as err:
        lmtune.train(cfg, show_progress=False)
    assert str(err.value).startswith(f"{data}:3: ") and "model.chat_template: chatml-tools" in str(err.value)


def _bad(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "q"}, *messages]


# messages, fragment of the error
BAD_CASES = [
    (_bad({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]}),
     "tool call 1: 'arguments' is not valid JSON"),
    (_bad({"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}),
     "tool call 1 has no function name"),
    (_bad({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}),
     "'arguments' must be a JSON object"),
    (_bad({"role": "assistant", "tool_calls": [CALL]}, {"role": "user", "content": "again"}),
     "the tool calls of message 2 (index 1) must be answered by tool messages first"),
    (_bad({"role": "assistant", "content": "hi"}, {"role": "tool", "content": "{}"}),
     "a tool message must follow an assistant message with tool_calls"),
    (_bad({"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": " "}),
     "message 3 (index 2): the tool content is empty"),
    (_bad({"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "{}"}),
     "must end with an assistant message"),
    ([{"role": "user", "content": "q", "tool_calls": [CALL]}, {"role": "assistant", "content": "a"}],
     "only an assistant message has tool_calls"),
]


@pytest.mark.parametrize(("messages", "fragment"), BAD_CASES)
def test_bad_tool_records_are_data_errors_at_file_line(messages: list[dict[str, Any]], fragment: str) -> None:
    with pytest.raises(DataError) as err:
        to_messages({"messages": messages}, "openai", {}, source="t.jsonl", line=4)
    assert str(err.value).startswith("t.jsonl:4: field 'messages': ") and fragment in str(err.value)


@pytest.mark.parametrize(("tools", "fragment"), [
    ({"name": "f"}, "'tools' must be a list"),
    ([{"type": "retrieval"}], "tool 1 (index 0) must be"),
    ([{"type": "function", "function": {"description": "x"}}], "tool 1 (index 0) has no function name"),
])
def test_bad_tool_definitions_name_the_record(tmp_path: Path, tiny_chat_llama_dir: Path, tools: Any,
                                              fragment: str) -> None:
    rows = tool_rows(4)
    rows[1]["tools"] = tools
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {"task": "sft", "model": {"name": str(tiny_chat_llama_dir), "chat_template": "chatml-tools"},
           "data": {"train": str(data), "max_length": 256}, "output_dir": str(tmp_path / "run")}
    with pytest.raises(DataError) as err:
        lmtune.train(cfg, show_progress=False)
    assert str(err.value).startswith(f"{data}:2: field 'tools': ") and fragment in str(err.value)


# text, content, calls (name, arguments)
PARSE_CASES = [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, [("f", {"a": 1})]),
    ('Let me look.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>', "Let me look.", [("f", {})]),
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"name": "g", "arguments": '
     '"{\\"b\\": 2}"}</tool_call>', None, [("f", {"a": 1}), ("g", {"b": 2})]),
    ("It is sunny.", "It is sunny.", []),
    ('<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>', None, []),  # bad JSON: plain text
    ('<tool_call>{"name": "f", "arguments": {}}', None, []),  # unclosed (cut by max_tokens)
    ('<tool_call>["f"]</tool_call>', None, []),  # not an object with a name
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call> <tool_call>{"name": "g"', None, []),
]


@pytest.mark.parametrize(("text", "content", "calls"), PARSE_CASES)
def test_parse_tool_calls(text: str, content: str | None, calls: list[tuple[str, dict[str, Any]]]) -> None:
    got_content, got = parse_tool_calls(text)
    if not calls:
        assert got == [] and got_content == text  # an unparseable answer is its text, whole
        return
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    assert all(isinstance(c["function"]["arguments"], str) for c in got)  # OpenAI: JSON text
    assert len({c["id"] for c in got}) == len(got)


def test_resolve_chat_template(tmp_path: Path) -> None:
    assert resolve_chat_template("chatml-tools") == CHATML_TOOLS_TEMPLATE
    assert resolve_chat_template(DEFAULT_CHAT_TEMPLATE) == DEFAULT_CHAT_TEMPLATE
    path = tmp_path / "t.jinja"
    path.write_text(CHATML_TOOLS_TEMPLATE, encoding="utf-8")
    assert resolve_chat_template(str(path)) == CHATML_TOOLS_TEMPLATE
    with pytest.raises(ConfigError, match="neither a built-in chat template"):
        resolve_chat_template("chatml-tool")
    with pytest.raises(ConfigError, match="not valid Jinja"):
        resolve_chat_template("{% for m in messages %}{{ m }}")


def test_chat_template_key_is_for_tasks_that_render_chats(tmp_path: Path) -> None:
    cfg = {"task": "classification", "model": {"name": "minilm", "chat_template": "chatml-tools"},
           "data": {"train": "x.csv"}}
    with pytest.raises(ConfigError, match=r"model\.chat_template is for task sft"):
        lmtune.load_config(cfg)
    assert lmtune.load_config({**cfg, "task": "sft"}).model.chat_template == "chatml-tools"


def test_final_answer_reference_is_its_content(smol_tools: Any) -> None:
    messages = to_messages({"messages": CONVERSATION}, "openai", {}, source="t", line=1)
    assert target_text(smol_tools, messages, [WEATHER_TOOL]) == "It is sunny."
