"""``lmtune serve --batching continuous``: the real server on transformers' continuous batching.

The tiny sft run of tests/serve_helpers.py served with ``ServeOptions(batching="continuous")``; answers are
checked against ``Run.chat`` / ``Run.generator().generate`` (plain greedy ``generate``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from serve_helpers import CAPITALS, MAX_NEW, running

from lmtune.errors import ConfigError
from lmtune.serve import ServeOptions
from lmtune.serve.app import create_app
from lmtune.workflows.run import Run

LONG = 300  # max_tokens of the long request (the tiny model rarely says EOS: it runs to the limit)


@pytest.fixture(scope="module")
def fp32_run(serve_sft_run: Run) -> Run:
    """The run with float32 weights: greedy answers then do not depend on how requests were batched (in bf16
    the rounding of a row's logits can change with the batch's shape, and so can a near-tied greedy choice)."""
    return Run.load(serve_sft_run.path, precision="fp32")


@pytest.fixture(scope="module")
def app(fp32_run: Run) -> Any:
    return create_app(fp32_run, ServeOptions(batching="continuous", max_batch_size=8, max_tokens_limit=LONG))


@pytest.fixture(scope="module")
def server(app: Any) -> Any:
    with running(app) as base:
        yield base


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def test_concurrent_greedy_chats_equal_run_chat(server: str, app: Any, fp32_run: Run) -> None:
    assert app.state.engine.continuous is not None
    client = _client(server)
    questions = [f"Capital of {c}?" for c in CAPITALS] * 3  # 12 concurrent requests, 8 rows at most

    def ask(q: str) -> Any:
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                              max_tokens=MAX_NEW, temperature=0)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, questions))
    for q, answer in zip(questions, answers, strict=True):
        expected = fp32_run.chat([{"role": "user", "content": q}], max_new_tokens=MAX_NEW, do_sample=False)
        assert answer.choices[0].message.content == expected["text"] and expected["text"].strip()
        assert answer.choices[0].finish_reason == expected["finish_reason"]
        assert answer.usage is not None
        assert answer.usage.prompt_tokens == expected["prompt_tokens"]
        assert answer.usage.completion_tokens == expected["completion_tokens"]
    assert app.state.engine.continuous.running == 0


def test_completions_in_order_and_fallback_for_stop_strings(server: str, fp32_run: Run) -> None:
    client = _client(server)
    prompts = ["The capital of Spain is", "Once upon a time", "北京"]
    answer = client.completions.create(model="m", prompt=prompts, max_tokens=6, temperature=0)
    g = fp32_run.generator()
    expected = g.generate(prompts, fp32_run.generation_settings(max_new_tokens=6, do_sample=False))
    assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == [e["text"] for e in expected]
    # stop strings are not handled by the continuous engine: such a request runs windowed, same answer as generate
    whole = expected[1]["text"]
    stop = whole[len(whole) // 2: len(whole) // 2 + 1] or "x"
    cut = client.completions.create(model="m", prompt=prompts[1], max_tokens=6, temperature=0, stop=[stop])
    (windowed,) = g.generate([prompts[1]], fp32_run.generation_settings(max_new_tokens=6, do_sample=False,
                                                                         stop=[stop]))
    assert cut.choices[0].text == windowed["text"]


def test_streaming_joins_to_the_whole_answer(server: str) -> None:
    client = _client(server)
    messages: Any = [{"role": "user", "content": "Capital of Peru?"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 2
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == whole.usage.model_dump()  # type: ignore[union-attr]


def test_a_short_request_finishes_before_a_long_one_that_started_first(server: str) -> None:
    """The point of continuous batching: the short request joins the running batch and leaves it when done,
    instead of waiting for the long answer (window batching runs the stream alone, to its end)."""
    client = _client(server)
    long = client.completions.create(model="m", prompt="Once upon a time", max_tokens=LONG, temperature=0,
                                     stream=True)
    pieces = iter(long)
    first = next(pieces)  # the long request is decoding now
    short = client.completions.create(model="m", prompt="The capital of Spain is", max_tokens=3, temperature=0)
    short_done = time.monotonic()
    rest = list(pieces)
    long_done = time.monotonic()
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    assert short.choices[0].text and short.usage is not None and short.usage.completion_tokens <= 3
    assert len(rest) > 20 and len(text) > 20  # the long answer went on decoding after the short one was sent
    assert short_done < long_done - 0.2, (short_done, long_done)


def test_a_client_that_leaves_frees_its_row(server: str, app: Any) -> None:
    continuous = app.state.engine.continuous
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert continuous.running == 1
    # the connection is closed: the request is cancelled and leaves the batch long before LONG tokens
    deadline = time.monotonic() + 20
    scheduler = continuous.manager.batch_processor.scheduler
    while (continuous.running or scheduler.active_requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert continuous.running == 0 and not scheduler.active_requests and not scheduler.waiting_requests
    assert not continuous.manager.output_router.result_handlers
    # and the server still answers
    answer = _client(server).completions.create(model="m", prompt="Hello", max_tokens=2, temperature=0)
    assert answer.choices[0].text is not None


def test_unknown_batching_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="batching"):
        ServeOptions(batching="eager")
