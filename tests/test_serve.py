"""``lmtune serve`` for real: uvicorn on a loopback port, the official ``openai`` client, raw HTTP.

Two runs are trained once for the module (``serve_helpers``): an sft LoRA run on a tiny Llama with
SmolLM2's tokenizer and a tiny BERT classifier. Every answer is checked against the Python API's (``Run.chat`` / ``generate`` / ``predict``).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from serve_helpers import (
    CAPITALS,
    MAX_NEW,
    assert_openai_error,
    get,
    post,
    request,
    running,
)

import lmtune
from lmtune.errors import ConfigError
from lmtune.serve import ServeOptions
from lmtune.serve.app import create_app
from lmtune.serve.metrics import percentile
from lmtune.workflows.run import Run

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def sft_run(serve_sft_run: Run) -> Run:
    return serve_sft_run


@pytest.fixture(scope="module")
def clf_run(serve_classifier_run: Run) -> Run:
    return serve_classifier_run


@pytest.fixture(scope="module")
def sft_server(sft_run: Run) -> Any:
    with running(create_app(sft_run, ServeOptions(max_batch_size=8, batch_wait_ms=20, max_tokens_limit=64,
                                                  max_n=4, max_items=6, max_body_bytes=20_000))) as base:
        yield base


@pytest.fixture(scope="module")
def clf_server(clf_run: Run) -> Any:
    with running(create_app(clf_run, ServeOptions(api_key=KEY, max_items=16))) as base:
        yield base


def _client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def _metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " ") or x.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


# ------------------------------------------------------------------------------------------ generative
def test_openai_client_chat_models_and_usage(sft_server: str, sft_run: Run) -> None:
    client = _client(sft_server)
    models = client.models.list()
    assert [m.id for m in models.data] == [sft_run.path.name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    answer = client.chat.completions.create(model=models.data[0].id, messages=messages,  # type: ignore[arg-type]
                                            max_tokens=MAX_NEW, temperature=0)
    expected = sft_run.chat(messages, max_new_tokens=MAX_NEW, do_sample=False)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert len(answer.choices) == 1 and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected["text"] and expected["text"].strip()
    assert answer.choices[0].finish_reason == expected["finish_reason"]
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["completion_tokens"]
    assert answer.usage.total_tokens == expected["prompt_tokens"] + expected["completion_tokens"]
    # text content parts and the `developer` role (read as system) render the same conversation
    parts = client.chat.completions.create(model="anything", max_tokens=MAX_NEW, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "France?"}]},
    ])
    assert parts.choices[0].message.content == expected["text"]


def test_streaming_joins_to_the_whole_answer(sft_server: str, sft_run: Run) -> None:
    client = _client(sft_server)
    messages = [{"role": "user", "content": "Capital of Peru?"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_NEW,  # type: ignore[arg-type]
                                           temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_NEW,  # type: ignore[arg-type]
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # type: ignore[union-attr]
    # the raw stream is server-sent events ending in [DONE]
    status, headers, raw = request(sft_server, "POST", "/v1/completions",
                                   {"prompt": "The capital", "max_tokens": 4, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-2] == "data: [DONE]" and all(e.startswith("data: ") for e in events[:-1])


def test_completions_continue_raw_text_in_input_order(sft_server: str, sft_run: Run) -> None:
    client = _client(sft_server)
    prompts = ["The capital of Spain is", "Once upon a time", "北京"]
    answer = client.completions.create(model="m", prompt=prompts, max_tokens=6, temperature=0)
    g = sft_run.generator()
    expected = g.generate(prompts, sft_run.generation_settings(max_new_tokens=6, do_sample=False))
    assert [c.text for c in answer.choices] == [e["text"] for e in expected]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage is not None and answer.usage.completion_tokens == sum(e["completion_tokens"] for e in expected)
    # streamed completion == the whole one
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=prompts[0], max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == expected[0]["text"]


def test_sampling_n_seed_and_stop(sft_server: str) -> None:
    client = _client(sft_server)
    messages = [{"role": "user", "content": "Capital of Japan?"}]
    args: dict[str, Any] = {"model": "m", "messages": messages, "max_tokens": MAX_NEW}
    sampled = client.chat.completions.create(**args, n=3, temperature=1.5, seed=7)
    again = client.chat.completions.create(**args, n=3, temperature=1.5, seed=7)
    texts = [c.message.content for c in sampled.choices]
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # the same seed gives the same answers
    assert len(set(texts)) > 1  # three draws, not one answer copied
    assert sampled.usage is not None and sampled.usage.completion_tokens >= 3
    # a stop string cuts the answer before it and reports finish_reason "stop"
    greedy = client.chat.completions.create(**args, temperature=0).choices[0].message.content or ""
    assert len(greedy) > 2
    stop = greedy[1:3]
    whole = client.chat.completions.create(**args, temperature=0, stop=[stop])
    cut = whole.choices[0]
    assert cut.message.content == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"
    # streamed, the same text, finish reason and token counts (the token completing the stop string counts)
    chunks = list(client.chat.completions.create(**args, temperature=0, stop=[stop], stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_batching_batches_and_gives_one_at_a_time_answers(sft_server: str) -> None:
    prompts = [f"Capital of {c}? ({i})" for i, c in enumerate(list(CAPITALS) * 4)]

    def ask(prompt: str) -> str:
        status, body = post(sft_server, "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_NEW, "temperature": 0})
        assert status == 200, body
        return str(body["choices"][0]["message"]["content"])

    alone = [ask(p) for p in prompts]
    _, before = get(sft_server, "/metrics")
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone  # greedy answers do not depend on the batch they ran in
    _, after = get(sft_server, "/metrics")
    batches = _metric(after.decode(), "lmtune_batches_total") - _metric(before.decode(), "lmtune_batches_total")
    requests = (_metric(after.decode(), "lmtune_batched_requests_total")
                - _metric(before.decode(), "lmtune_batched_requests_total"))
    assert requests == len(prompts)
    assert batches < len(prompts) / 2, f"{requests} concurrent requests ran in {batches} batches"
    assert _metric(after.decode(), "lmtune_batch_requests_max") > 1


def test_streams_and_batched_requests_share_the_model(sft_server: str) -> None:
    """Streams run alone in the model thread, between batches; concurrent mixes all get their answers."""
    client = _client(sft_server)
    questions = [f"Capital of {c}?" for c in CAPITALS]
    args: dict[str, Any] = {"model": "m", "max_tokens": MAX_NEW, "temperature": 0}
    whole = {q: client.chat.completions.create(messages=[{"role": "user", "content": q}], **args)
             .choices[0].message.content for q in questions}

    def ask(job: tuple[str, bool]) -> str:
        q, stream = job
        messages = [{"role": "user", "content": q}]
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(messages=messages, stream=True, **args) if c.choices)
        return client.chat.completions.create(messages=messages, **args).choices[0].message.content or ""

    jobs = [(q, stream) for q in questions for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [whole[q] for q, _ in jobs]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "max_tokens",
     "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5}, 400, "n", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400,
     "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role",
     "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 8}, 400,
     "messages", "context_length_exceeded"),
    ("/v1/completions", {"prompt": ["a"] * 7}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": "   "}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": 17}, 400, "prompt", "invalid_value"),
    ("/v1/classify", {"input": "a text"}, 404, None, "unsupported_endpoint"),
    ("/v1/nothing", {}, 404, None, "not_found"),
])
def test_limits_and_malformed_requests_answer_4xx(sft_server: str, path: str, body: Any, status: int,
                                                  param: str | None, code: str) -> None:
    got, answer = post(sft_server, path, body)
    assert got == status, answer
    err = assert_openai_error(answer, code=code)
    assert err["param"] == param


def test_bad_bytes_never_kill_the_server(sft_server: str) -> None:
    for raw in (b"{not json", b"", b"\xff\xfe\x00", b"[1, 2, 3]", b'{"messages": "hi"}'):
        status, _, data = request(sft_server, "POST", "/v1/chat/completions", raw=raw)
        assert status == 400, (raw, data)
        assert_openai_error(json.loads(data))
    status, _, data = request(sft_server, "POST", "/v1/chat/completions", raw=b"{not json")
    assert assert_openai_error(json.loads(data), code="invalid_json")
    # a body over the limit is refused before it is parsed, whatever its Content-Length says
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]}).encode()
    status, _, data = request(sft_server, "POST", "/v1/chat/completions", raw=huge)
    assert status == 413 and assert_openai_error(json.loads(data), code="request_too_large")
    status, _, data = request(sft_server, "GET", "/v1/chat/completions")
    assert status == 405 and assert_openai_error(json.loads(data), code="method_not_allowed")
    # a client that goes away mid-stream frees the model for the next request
    client = _client(sft_server)
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=64, stream=True)
    next(iter(stream))
    stream.close()
    assert get(sft_server, "/health")[0] == 200
    ok = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_metrics_count_requests_per_endpoint_and_status(sft_server: str) -> None:
    post(sft_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    post(sft_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 10_000})
    status, text = get(sft_server, "/metrics")
    body = text.decode()
    assert status == 200
    assert _metric(body, 'lmtune_requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert _metric(body, 'lmtune_requests_total{endpoint="/v1/completions",status="400"}') >= 1
    p50 = _metric(body, 'lmtune_request_duration_seconds{endpoint="/v1/completions",quantile="0.5"}')
    p99 = _metric(body, 'lmtune_request_duration_seconds{endpoint="/v1/completions",quantile="0.99"}')
    assert 0 < p50 <= p99
    assert "# TYPE lmtune_batch_requests histogram" in body


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)
    assert percentile([5.0], 0.9) == 5.0


# ------------------------------------------------------------------------------------------ classifier, auth
def test_classify_endpoint_matches_run_predict(clf_server: str, clf_run: Run) -> None:
    texts = ["great wonderful brilliant film", "dull awful boring plot", "the story was quite warm"]
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body = post(clf_server, "/v1/classify", {"input": texts}, headers=auth)
    assert status == 200, body
    expected = clf_run.predict(texts)
    assert [d["label"] for d in body["data"]] == [e["label"] for e in expected] and expected[0]["label"] == "pos"
    assert expected[1]["label"] == "neg"
    for got, want in zip(body["data"], expected, strict=True):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    # /v1/predict answers the same; one text alone is a one-element list
    status, single = post(clf_server, "/v1/predict", {"input": texts[0]}, headers=auth)
    assert status == 200 and single["data"][0]["label"] == "pos" and len(single["data"]) == 1
    # concurrent classify requests are batched and each gets its own answers
    def ask(i: int) -> list[str]:
        code, answer = post(clf_server, "/v1/classify", {"input": texts[i % 3:]}, headers=auth)
        assert code == 200, answer
        return [d["label"] for d in answer["data"]]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(ask, range(12)))
    assert results == [[e["label"] for e in expected][i % 3:] for i in range(12)]
    status, body = post(clf_server, "/v1/classify", {"input": ["x"] * 17}, headers=auth)
    assert status == 400 and assert_openai_error(body)["param"] == "input"
    status, body = post(clf_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                        headers=auth)
    assert status == 404 and "/v1/classify" in assert_openai_error(body, code="unsupported_endpoint")["message"]


def test_api_key_is_required_everywhere_but_health(clf_server: str) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _client(clf_server, key="sk-wrong").models.list()
    assert info.value.status_code == 401
    assert_openai_error(info.value.body if "error" in (info.value.body or {}) else {"error": info.value.body},
                        code="invalid_api_key")
    assert [m.id for m in _client(clf_server, key=KEY).models.list().data]
    for path in ("/v1/models", "/metrics", "/v1/run", "/v1/run/plots/comparison.png"):
        status, data = get(clf_server, path)
        assert status == 401, path
        assert_openai_error(json.loads(data), code="invalid_api_key")
    status, data = post(clf_server, "/v1/classify", {"input": "x"}, headers={"Authorization": "Basic " + KEY})
    assert status == 401
    assert get(clf_server, "/health") == (200, get(clf_server, "/health")[1])
    assert json.loads(get(clf_server, "/health")[1])["status"] == "ok"
    # the page's code is public (it holds no data), everything it shows needs the key
    assert get(clf_server, "/")[0] == 200 and get(clf_server, "/static/app.js")[0] == 200
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', get(clf_server, "/")[1].decode())
    assert "/static/common/apikey.js" in assets and "/static/common/style.css" in assets  # shared with the studio
    assert all(get(clf_server, asset)[0] == 200 for asset in assets), assets


def test_run_view_and_plots_without_path_traversal(clf_server: str, clf_run: Run, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    status, data = get(clf_server, "/v1/run", headers=auth)
    view = json.loads(data)
    assert status == 200 and view["task"] == "classification" and view["labels"] == ["neg", "pos"]
    assert "task: classification" in view["config"]
    assert view["metrics"]["test"]["accuracy"] == clf_run.metrics["test"]["accuracy"]
    assert "training_curves.png" in view["plots"]
    status, png = get(clf_server, "/v1/run/plots/training_curves.png", headers=auth)
    assert status == 200 and png.startswith(b"\x89PNG")
    # a link in plots/ pointing out of it is neither listed nor served
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    link = clf_run.path / "plots" / "link.png"
    os.symlink(secret, link)
    try:
        assert "link.png" not in json.loads(get(clf_server, "/v1/run", headers=auth)[1])["plots"]
        assert get(clf_server, "/v1/run/plots/link.png", headers=auth)[0] == 404
    finally:
        link.unlink()
    for path in ("/v1/run/plots/..%2Fconfig.yaml", "/v1/run/plots/%2E%2E%2Fmetrics.json",
                 "/v1/run/plots/../config.yaml", "/v1/run/plots/..%2F..%2F..%2Fetc%2Fpasswd", "/v1/run/plots/"):
        status, data = get(clf_server, path, headers=auth)
        assert status == 404, path
        assert b"task: classification" not in data and b"root:" not in data


def test_serve_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServeOptions(max_batch_size=0)
    with pytest.raises(ConfigError, match="API key"):
        ServeOptions(api_key=" ")
    # every interface without a key is refused (tests/test_hostile_serve.py); with one it is not loopback
    assert ServeOptions().loopback and not ServeOptions(host="0.0.0.0", api_key=KEY).loopback


# ------------------------------------------------------------------------------------------ other tasks
def _ner_config(root: Path, model: Path) -> dict[str, Any]:
    lines = []
    for i in range(40):
        name, place = ["Alice", "Bob", "Dmitri"][i % 3], ["Paris", "Kyoto"][i % 2]
        lines += [f"{name}\tB-PER", "went\tO", "to\tO", f"{place}\tB-LOC", f"day{i}\tO", ""]
    (root / "train.conll").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"task": "token_classification", "data": {"train": str(root / "train.conll"), "max_length": 16}}


def _qa_config(root: Path, model: Path) -> dict[str, Any]:
    rows = []
    for i in range(40):
        code = ["zebra", "tiger", "otter"][i % 3]
        context = f"we met at noon and the code is {code} today ({i})"
        rows.append({"id": f"q{i}", "question": "what is the code?", "context": context,
                     "answers": {"text": [code], "answer_start": [context.index(code)]}})
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"task": "question_answering", "data": {"train": str(root / "qa.jsonl"), "max_length": 32}}


@pytest.mark.parametrize(("build", "path", "items", "bad_item"), [
    (_ner_config, "/v1/ner", ["Alice went to Paris", "Bob went to Kyoto yesterday"], {"text": "x"}),
    (_qa_config, "/v1/qa", [{"question": "what is the code?", "context": "so the code is tiger now"},
                            {"question": "where?", "context": "we met in Lima"}], "just a text"),
])
def test_task_endpoints_answer_as_run_predict(build: Any, path: str, items: list[Any], bad_item: Any,
                                              tiny_bert_nodrop_dir: Path, tmp_path: Path) -> None:
    from lmtune.config.tasks import TASK_INFOS as PREDICTORS

    cfg = build(tmp_path, tiny_bert_nodrop_dir)
    if cfg["task"] not in PREDICTORS:
        pytest.skip(f"no predictor registered for {cfg['task']} in this tree")
    cfg.update(model=str(tiny_bert_nodrop_dir), baselines=[], output_dir=str(tmp_path / "run"),
               train={"max_steps": 3, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32"})
    run = lmtune.train(cfg, show_progress=False)
    expected = run.predict(items)
    with running(create_app(run, ServeOptions(max_items=4))) as base:
        status, own = post(base, path, {"input": items})
        assert status == 200, own
        assert [{k: v for k, v in d.items() if k != "index"} for d in own["data"]] == \
            json.loads(json.dumps(expected))
        status, generic = post(base, "/v1/predict", {"input": items})
        assert status == 200 and generic["data"] == own["data"] and generic["task"] == cfg["task"]
        status, body = post(base, path, {"input": [items[0], bad_item]})
        assert status == 400 and assert_openai_error(body)["param"] == "input"
        status, body = post(base, path, {"input": items * 3})
        assert status == 400 and "at most 4" in assert_openai_error(body)["message"]
        status, body = post(base, "/v1/classify", {"input": "x"})
        assert status == 404 and path in assert_openai_error(body, code="unsupported_endpoint")["message"]


def test_a_bare_model_folder_is_served_too(clf_run: Run) -> None:
    with running(create_app(clf_run.model_dir, ServeOptions(model_name="sentiment"))) as base:
        status, body = post(base, "/v1/classify", {"input": ["great wonderful brilliant film"]})
        assert status == 200 and body["model"] == "sentiment" and body["data"][0]["label"] == "pos"
        view = json.loads(get(base, "/v1/run")[1])
        assert view["config"] == "" and view["metrics"] == {} and view["plots"] == []
        assert json.loads(get(base, "/v1/models")[1])["data"][0]["id"] == "sentiment"
