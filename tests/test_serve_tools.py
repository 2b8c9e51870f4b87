"""Tool calling on ``POST /v1/chat/completions``, with the real server and the official ``openai`` client.

Fast tests use the plain sft run (SmolLM2's ChatML template, no tool support): what is refused and what is
accepted. The slow ones serve a tiny model trained (``conftest.serve_tool_run``: 60 steps) to answer every
question with one fixed ``get_weather`` call and a tool result with a fixed answer, so the calls really come
from the model's generation and the parsed ``tool_calls`` are checked against that call.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from helpers import WEATHER_ANSWER, WEATHER_CALL, WEATHER_TOOL
from serve_helpers import assert_openai_error, post, request, running

from lmtune.data.chat_tools import parse_tool_calls
from lmtune.models import generation
from lmtune.serve import ServeOptions
from lmtune.serve.app import create_app
from lmtune.workflows.run import Run

CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "How is the weather? (99)"}]


@pytest.fixture(scope="module")
def plain_server(serve_sft_run: Run) -> Any:
    with running(create_app(serve_sft_run, ServeOptions(max_tokens_limit=64))) as base:
        yield base


@pytest.fixture(scope="module")
def tool_server(serve_tool_run: Run) -> Any:
    with running(create_app(serve_tool_run, ServeOptions(max_tokens_limit=64))) as base:
        yield base


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"tools": [WEATHER_TOOL]}, "tools", "unsupported_parameter"),  # the template cannot write tools
    ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "tool_choice", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools", "invalid_value"),
    ({"messages": [*QUESTION, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "{}"}]}, "messages", "unsupported_parameter"),
    ({"messages": [*QUESTION, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "{}"}]}, "messages", "invalid_value"),
])
def test_tool_requests_a_model_cannot_honour_are_400(plain_server: str, body: dict[str, Any], param: str,
                                                     code: str) -> None:
    status, answer = post(plain_server, CHAT, {"messages": QUESTION, "max_tokens": 4, **body})
    assert status == 400, answer
    err = assert_openai_error(answer, code=code)
    assert err["param"] == param


def test_tool_choice_none_answers_as_without_tools(plain_server: str) -> None:
    base = {"messages": QUESTION, "max_tokens": 6, "temperature": 0}
    status, plain = post(plain_server, CHAT, base)
    status_none, none = post(plain_server, CHAT, {**base, "tools": [WEATHER_TOOL], "tool_choice": "none"})
    assert status == status_none == 200
    assert none["choices"][0]["message"] == plain["choices"][0]["message"]
    assert "tool_calls" not in none["choices"][0]["message"]


@pytest.mark.slow
def test_server_returns_the_models_tool_calls_in_openais_shape(tool_server: str, serve_tool_run: Run) -> None:
    client = _client(tool_server)
    answer = client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER_TOOL],  # type: ignore[arg-type]
                                            max_tokens=40, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == WEATHER_CALL["name"]
    assert isinstance(call.function.arguments, str) and json.loads(call.function.arguments) == WEATHER_CALL["arguments"]
    # the call is what the model generated: the same prompt rendered and generated in-process, parsed
    g = serve_tool_run.generator()
    prompt = generation.chat_prompt(g.tokenizer, QUESTION, tools=[WEATHER_TOOL])
    (raw,) = g.generate([prompt], serve_tool_run.generation_settings(max_new_tokens=40, do_sample=False))
    assert raw["text"].startswith("<tool_call>")
    assert [c["function"]["name"] for c in parse_tool_calls(raw["text"])[1]] == [call.function.name]

    # the call's result sent back (the assistant message as the client got it): the model answers in text
    follow = [*QUESTION, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'}]
    final = client.chat.completions.create(model="m", messages=follow, tools=[WEATHER_TOOL],  # type: ignore[arg-type]
                                           max_tokens=40, temperature=0)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content == WEATHER_ANSWER

    # tool_choice none: no tools in the prompt, nothing parsed
    status, plain = post(tool_server, CHAT, {"messages": QUESTION, "tools": [WEATHER_TOOL], "tool_choice": "none",
                                             "max_tokens": 40, "temperature": 0})
    assert status == 200 and "tool_calls" not in plain["choices"][0]["message"]
    assert plain["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_streamed_tool_calls_end_in_openais_shape(tool_server: str) -> None:
    client = _client(tool_server)
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER_TOOL],  # type: ignore[arg-type]
                                                 max_tokens=40, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id and calls[0].id.startswith("call_")
    assert calls[0].function is not None and calls[0].function.name == WEATHER_CALL["name"]
    assert json.loads(calls[0].function.arguments or "") == WEATHER_CALL["arguments"]
    assert "".join(d.content or "" for d in deltas) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the raw stream still ends with [DONE]
    status, _, data = request(tool_server, "POST", CHAT, {"messages": QUESTION, "tools": [WEATHER_TOOL],
                                                          "max_tokens": 40, "temperature": 0, "stream": True})
    assert status == 200 and data.decode().rstrip().endswith("data: [DONE]")
