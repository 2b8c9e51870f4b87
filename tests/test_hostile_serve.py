"""``lmtune serve`` against careless and hostile clients (issue 13: items 1, 2, 10, 11, 13, 14).

Every test talks to the real app under uvicorn (``serve_helpers.running``) with a real client: the
standard library's ``http.client`` or raw sockets, so the bytes sent and the connection reuse are under
the test's control. Where a test needs the model to be slow, it makes the model's forward pass wait on
an event: the server code that runs around it is the real one.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from serve_helpers import assert_openai_error, get, post, request, running
from typer.testing import CliRunner

import lmtune.serve.app as serve_app
from lmtune import cli
from lmtune.errors import ConfigError
from lmtune.serve import ServeOptions
from lmtune.serve.app import create_app
from lmtune.workflows.run import Run

LONE = "\ud800"  # a lone UTF-16 surrogate: json.dumps writes it as the escape \ud800, which JSON allows
HOSTILE_DEADLINE = 30  # seconds: only catches a hang, never a speed assertion


@pytest.fixture(scope="module")
def clf_run(serve_classifier_run: Run) -> Run:
    return serve_classifier_run


@pytest.fixture(scope="module")
def sft_run(serve_sft_run: Run) -> Run:
    return serve_sft_run


@pytest.fixture(scope="module")
def clf_app(clf_run: Run) -> Any:
    return create_app(clf_run, ServeOptions(max_items=16))


@pytest.fixture(scope="module")
def clf_server(clf_app: Any) -> Iterator[str]:
    with running(clf_app) as base:
        yield base


@pytest.fixture(scope="module")
def sft_app(sft_run: Run) -> Any:
    return create_app(sft_run, ServeOptions(max_tokens_limit=64, max_n=4, max_items=6))


@pytest.fixture(scope="module")
def sft_server(sft_app: Any) -> Iterator[str]:
    with running(sft_app) as base:
        yield base


def _connect(base: str) -> http.client.HTTPConnection:
    host, port = base.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=HOSTILE_DEADLINE)


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on ``conn`` (kept open): (status, headers, body)."""
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


# ------------------------------------------------------------------------------------------ item 1
SURROGATE_CASES = [
    ("clf", "/v1/classify", {"input": [LONE]}, "input.0"),
    ("clf", "/v1/classify", {"input": "fine", "text_pair": "x" + LONE}, "text_pair"),
    ("clf", "/v1/classify", {"input": ["fine", f"ok {LONE} ok"]}, "input.1"),
    ("clf", "/v1/predict", {"input": LONE}, "input"),
    ("clf", "/v1/predict", {"input": [{"text": "a", "text_pair": LONE}]}, "input.0.text_pair"),
    ("sft", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}], "max_tokens": 2},
     "messages.0.content"),
    ("sft", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}],
                                     "max_tokens": 2}, "messages.0.content.0.text"),
    ("sft", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}], "max_tokens": 2,
                                     "stream": True}, "messages.0.content"),
    ("sft", "/v1/completions", {"prompt": ["The capital", "x\udfff"], "max_tokens": 2}, "prompt.1"),
    ("sft", "/v1/completions", {"prompt": LONE, "max_tokens": 2, "stream": True}, "prompt"),
    ("sft", "/v1/completions", {"prompt": "The capital", "max_tokens": 2, "stop": [LONE]}, "stop.0"),
]
GOOD = {"clf": ("/v1/classify", {"input": ["great wonderful film"]}),
        "sft": ("/v1/completions", {"prompt": "The capital", "max_tokens": 2, "temperature": 0})}


@pytest.mark.parametrize(("which", "path", "body", "param"), SURROGATE_CASES,
                         ids=[f"{c[1]}:{c[3]}{':stream' if c[2].get('stream') else ''}" for c in SURROGATE_CASES])
def test_lone_surrogate_is_a_400_and_the_connection_stays_usable(
        which: str, path: str, body: Any, param: str, clf_server: str, sft_server: str) -> None:
    conn = _connect(clf_server if which == "clf" else sft_server)
    try:
        status, _, data = _exchange(conn, "POST", path, body)
        assert status == 400, data
        err = assert_openai_error(json.loads(data), code="invalid_value")
        assert err["param"] == param and "surrogate" in err["message"], err
        sock = conn.sock
        assert sock is not None, "the server closed the keep-alive connection"
        good_path, good_body = GOOD[which]
        status, _, data = _exchange(conn, "POST", good_path, good_body)
        assert status == 200, data
        assert conn.sock is sock, "the second request needed a new connection"
    finally:
        conn.close()


def test_paired_surrogates_are_text(clf_server: str) -> None:
    """An escaped surrogate pair is one ordinary character (an emoji), not an error."""
    status, _, data = request(clf_server, "POST", "/v1/classify", raw=b'{"input": ["great film \\ud83d\\ude00"]}')
    assert status == 200, data


# ------------------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**40])
@pytest.mark.parametrize(("path", "stream"), [("/v1/chat/completions", False), ("/v1/chat/completions", True),
                                              ("/v1/completions", False), ("/v1/completions", True)])
def test_seed_outside_64_bits_is_a_400(sft_server: str, seed: int, path: str, stream: bool) -> None:
    body: dict[str, Any] = {"max_tokens": 2, "temperature": 0, "seed": seed, "stream": stream}
    if path == "/v1/completions":
        body["prompt"] = "The capital"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    status, headers, data = request(sft_server, "POST", path, body)
    assert status == 400, data  # streamed too: refused before the stream starts, not a 200 with an error event
    assert headers["content-type"].startswith("application/json")
    assert assert_openai_error(json.loads(data), code="invalid_value")["param"] == "seed"


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_seed_at_the_64_bit_edges_is_served(sft_server: str, seed: int) -> None:
    status, body = post(sft_server, "/v1/completions", {"prompt": "The capital", "max_tokens": 2,
                                                        "temperature": 1.0, "seed": seed})
    assert status == 200, body


# ------------------------------------------------------------------------------------------ item 13
@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1", "[::1]", "localhost."])
@pytest.mark.parametrize("port", [True, False])
def test_loopback_host_names_are_served(clf_server: str, host: str, port: bool) -> None:
    name = f"{host}:{_port(clf_server)}" if port else host
    status, _, data = request(clf_server, "GET", "/v1/models", headers={"Host": name})
    assert status == 200, data


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost:80@x",
                                  "10.0.0.1"])
@pytest.mark.parametrize("path", ["/v1/models", "/health", "/v1/classify"])
def test_a_foreign_host_header_is_refused(clf_server: str, host: str, path: str) -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 cannot use the model."""
    method = "POST" if path == "/v1/classify" else "GET"
    status, _, data = request(clf_server, method, path, {"input": "x"} if method == "POST" else None,
                              headers={"Host": host})
    assert status == 400, data
    err = assert_openai_error(json.loads(data), code="invalid_host")
    assert "--allowed-host" in err["message"]


def test_allowed_hosts_extend_the_loopback_names(clf_run: Run) -> None:
    with running(create_app(clf_run, ServeOptions(allowed_hosts=("api.internal", "*.lan")))) as base:
        for host, status in [("api.internal", 200), ("api.internal:9000", 200), ("box.lan", 200),
                             ("localhost", 200), ("evil.example", 400), ("lan", 400)]:
            assert request(base, "GET", "/v1/models", headers={"Host": host})[0] == status, host
    with running(create_app(clf_run, ServeOptions(allowed_hosts=("*",)))) as base:
        assert request(base, "GET", "/v1/models", headers={"Host": "anything.example"})[0] == 200


def test_a_wildcard_bind_needs_a_key_or_allowed_hosts() -> None:
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(ConfigError, match="API key"):
            ServeOptions(host=host)
        assert not ServeOptions(host=host, api_key="sk-0123").loopback
        ServeOptions(host=host, allowed_hosts=("model.lan",))
    ServeOptions(host="192.168.1.5")  # a named address: its own name is checked, no key needed


# ------------------------------------------------------------------------------------------ item 14
@contextmanager
def _no_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ServeOptions]]:
    """`lmtune serve` runs up to the point it would load the model; the options it got are recorded."""
    started: list[ServeOptions] = []
    monkeypatch.setattr(serve_app, "serve", lambda run, options, announce=None: started.append(options))
    yield started


@pytest.mark.parametrize(("env", "args", "says"), [
    ({"LMTUNE_API_KEY": ""}, [], "LMTUNE_API_KEY is set but empty"),
    ({"LMTUNE_API_KEY": "   "}, [], "the API key is empty"),
    ({}, ["--api-key", ""], "the API key is empty"),
    ({"LMTUNE_API_KEY": "clé-secrète"}, [], "ASCII"),
    ({}, ["--api-key", "ключ"], "ASCII"),
    ({}, ["--api-key", " sk-padded "], "spaces"),
    ({}, ["--host", "0.0.0.0"], "API key"),
])
def test_unusable_api_keys_are_refused_at_start(monkeypatch: pytest.MonkeyPatch, clf_run: Run, env: dict[str, str],
                                                args: list[str], says: str) -> None:
    monkeypatch.delenv("LMTUNE_API_KEY", raising=False)
    with _no_server(monkeypatch) as started:
        result = CliRunner().invoke(cli.app, ["serve", str(clf_run.path), *args], env=env)
    assert started == [], f"the server started with api_key={started[0].api_key!r}"
    # `lmtune` (cli.main) prints an LmtuneError as one line and exits 2 (the subprocess test below)
    assert isinstance(result.exception, ConfigError), result.output
    assert says in str(result.exception)


def test_an_empty_key_in_the_environment_stops_lmtune_serve(clf_run: Run) -> None:
    """The real command: `LMTUNE_API_KEY= lmtune serve RUN` must not serve without a key."""
    env = {**os.environ, "LMTUNE_API_KEY": ""}
    done = subprocess.run([sys.executable, "-m", "lmtune", "serve", str(clf_run.path), "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=HOSTILE_DEADLINE * 4)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "LMTUNE_API_KEY is set but empty" in done.stderr and "Traceback" not in done.stderr


def test_a_good_key_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch, clf_run: Run) -> None:
    with _no_server(monkeypatch) as started:
        result = CliRunner().invoke(cli.app, ["serve", str(clf_run.path)], env={"LMTUNE_API_KEY": "sk-Abc.123_x"})
    assert result.exit_code == 0, result.output
    assert [o.api_key for o in started] == ["sk-Abc.123_x"]


def test_serve_command_defaults_are_the_options_defaults(monkeypatch: pytest.MonkeyPatch, clf_run: Run) -> None:
    """`lmtune serve --help` states the limits README documents: the command's defaults are ServeOptions'."""
    monkeypatch.delenv("LMTUNE_API_KEY", raising=False)
    with _no_server(monkeypatch) as started:
        result = CliRunner().invoke(cli.app, ["serve", str(clf_run.path)])
    assert result.exit_code == 0, result.output
    assert started == [ServeOptions()]


def test_text_pair_on_a_single_text_model_is_a_400(clf_server: str, clf_run: Run) -> None:
    assert not clf_run.meta.get("text_pair_column")  # the fixture classifier reads single texts
    status, body = post(clf_server, "/v1/classify", {"input": ["a", "b"], "text_pair": ["c", "d"]})
    assert status == 400, body
    err = assert_openai_error(body, code="invalid_value")
    assert err["param"] == "text_pair" and "single texts" in err["message"]
    status, body = post(clf_server, "/v1/predict", {"input": [{"text": "a", "text_pair": "c"}]})
    assert status == 400 and "single texts" in assert_openai_error(body)["message"]


@contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def test_a_crash_answers_500_without_its_text_and_logs_it_with_an_id(
        clf_app: Any, clf_server: str, caplog: pytest.LogCaptureFixture) -> None:
    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom in /very/secret/place")

    conn = _connect(clf_server)
    try:
        with caplog.at_level("ERROR", logger="lmtune"), _patched(clf_app.state.engine.loaded, "probabilities", crash):
            status, headers, data = _exchange(conn, "POST", "/v1/classify", {"input": ["a text"]})
        assert status == 500
        err = assert_openai_error(json.loads(data))
        assert err["type"] == "server_error"
        assert "boom" not in data.decode() and "secret" not in data.decode() and "RuntimeError" not in data.decode()
        request_id = headers["x-request-id"]
        assert request_id in err["message"]
        logged = [r for r in caplog.records if request_id in r.getMessage()]
        assert logged and logged[0].exc_info is not None and "boom" in str(logged[0].exc_info[1])
        sock = conn.sock
        status, _, data = _exchange(conn, "POST", "/v1/classify", {"input": ["great film"]})
        assert status == 200 and conn.sock is sock  # the connection survived the 500
    finally:
        conn.close()


def test_a_crash_mid_stream_sends_a_generic_error_event(sft_app: Any, sft_server: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    model = sft_app.state.engine.loaded.model

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom in /very/secret/place")

    with caplog.at_level("ERROR", logger="lmtune"), _patched(model, "forward", crash):
        status, _, raw = request(sft_server, "POST", "/v1/completions",
                                 {"prompt": "The capital", "max_tokens": 4, "stream": True})
    assert status == 200  # the answer had begun: the error travels as an event
    events = [json.loads(e.removeprefix("data: ")) for e in raw.decode().split("\n\n") if e.startswith("data: {")]
    err = assert_openai_error(events[-1])
    assert err["type"] == "server_error" and "boom" not in raw.decode() and "secret" not in raw.decode()
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


def _absolute_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if os.path.isabs(value) or value.startswith("~") else []
    if isinstance(value, dict):
        return [s for v in value.values() for s in _absolute_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _absolute_strings(v)]
    return []


def test_run_view_shows_no_absolute_paths(clf_server: str, clf_run: Run, tiny_bert_dir: Path) -> None:
    status, data = get(clf_server, "/v1/run")
    assert status == 200
    text = data.decode()
    for secret in (str(clf_run.path), str(clf_run.path.parent), str(tiny_bert_dir)):
        assert secret not in text, secret
    view = json.loads(data)
    config = yaml.safe_load(view["config"])
    assert config["task"] == "classification" and config["model"]["name"]  # still the config, names kept
    assert _absolute_strings(config) == [] and _absolute_strings(view["meta"]) == []
    assert _absolute_strings(view["metrics"]) == []


# ------------------------------------------------------------------------------------------ item 11
class _Gate:
    """Makes a torch module's forward wait until released, counting the calls (the slow model)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self._forward = module.forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(HOSTILE_DEADLINE), "the test never released the model"
        return self._forward(*args, **kwargs)

    def __enter__(self) -> _Gate:
        self.module.forward = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        del self.module.forward


def _send_and_leave(base: str, path: str, body: Any) -> socket.socket:
    """Send a whole request on a raw socket and return it unread (the caller closes it: the client leaves)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=HOSTILE_DEADLINE)
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HOSTILE_DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def busy_app(clf_run: Run) -> Any:
    return create_app(clf_run, ServeOptions(max_items=200, max_queue=2, max_request_chars=1000))


@pytest.fixture(scope="module")
def busy_server(busy_app: Any) -> Iterator[str]:
    with running(busy_app) as base:
        yield base


def test_a_queued_request_whose_client_left_is_not_computed(busy_app: Any, busy_server: str) -> None:
    engine = busy_app.state.engine
    with _Gate(engine.loaded.model) as slow:
        first: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: first.update(
            answer=post(busy_server, "/v1/classify", {"input": ["great film"]})))
        thread.start()
        assert slow.entered.wait(HOSTILE_DEADLINE)
        leaving = _send_and_leave(busy_server, "/v1/classify", {"input": ["dull film"]})
        _wait_for(lambda: engine.batcher.pending == 2, "the second request to queue")
        leaving.close()
        _wait_for(lambda: engine.batcher.pending == 1, "the server to notice the client left")
        slow.release.set()
        thread.join(HOSTILE_DEADLINE)
        assert first["answer"][0] == 200
    assert slow.calls == 1, "the abandoned request was computed"


def test_a_running_request_whose_client_left_stops_between_batches(busy_app: Any, busy_server: str) -> None:
    engine = busy_app.state.engine
    with _Gate(engine.loaded.model) as slow:
        leaving = _send_and_leave(busy_server, "/v1/classify", {"input": [f"t{i}" for i in range(150)]})
        assert slow.entered.wait(HOSTILE_DEADLINE)  # the first of its three batches of 64 is running
        leaving.close()
        _wait_for(lambda: engine.batcher.pending == 0, "the server to notice the client left")
        slow.release.set()
        _wait_for(lambda: engine.worker.idle, "the model worker to stop")
    assert slow.calls == 1, f"{slow.calls} batches were computed for a client that had left"
    assert post(busy_server, "/v1/classify", {"input": ["great film"]})[0] == 200


def test_a_full_queue_answers_429_with_retry_after(busy_app: Any, busy_server: str) -> None:
    engine = busy_app.state.engine
    with _Gate(engine.loaded.model) as slow:
        answers: list[Any] = []
        threads = [threading.Thread(target=lambda: answers.append(post(busy_server, "/v1/classify",
                                                                       {"input": ["great film"]})))
                   for _ in range(2)]
        threads[0].start()
        assert slow.entered.wait(HOSTILE_DEADLINE)
        threads[1].start()
        _wait_for(lambda: engine.batcher.pending == 2, "two requests in flight")
        status, headers, data = request(busy_server, "POST", "/v1/classify", {"input": ["one more"]})
        assert status == 429, data
        assert int(headers["retry-after"]) >= 1
        assert "--max-queue" in assert_openai_error(json.loads(data), code="server_busy")["message"]
        assert get(busy_server, "/health")[0] == 200  # what does not use the model is still answered
        slow.release.set()
        for t in threads:
            t.join(HOSTILE_DEADLINE)
    assert [a[0] for a in answers] == [200, 200]
    assert post(busy_server, "/v1/classify", {"input": ["great film"]})[0] == 200


def test_text_characters_are_capped_before_tokenising(busy_app: Any, busy_server: str) -> None:
    engine = busy_app.state.engine
    calls: list[int] = []
    real = engine.loaded.probabilities
    with _patched(engine.loaded, "probabilities", lambda texts, *a, **k: calls.append(len(texts)) or real(texts, *a, **k)):
        status, body = post(busy_server, "/v1/classify", {"input": ["x" * 600, "y" * 600]})
        assert status == 400, body
        err = assert_openai_error(body, code="request_too_large")
        assert "1200 characters" in err["message"] and "--max-request-chars" in err["message"]
        status, body = post(busy_server, "/v1/classify", {"input": ["x" * 600], "text_pair": ["y" * 600]})
        assert status == 400 and calls == []  # refused before any text was tokenised
        assert post(busy_server, "/v1/classify", {"input": ["x" * 400, "y" * 400]})[0] == 200


@pytest.fixture(scope="module")
def capped_sft(sft_run: Run) -> Iterator[tuple[Any, str]]:
    app = create_app(sft_run, ServeOptions(max_tokens_limit=64, max_n=4, max_items=6, max_request_tokens=100,
                                           max_request_chars=2000))
    with running(app) as base:
        yield app, base


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_per_request_are_capped(capped_sft: tuple[Any, str], stream: bool) -> None:
    _, base = capped_sft
    # prompt tokens + prompts x n x max_tokens: streamed 1 x 1 x 64 after a ~50-token prompt; else 3 x 2 x 16
    over: dict[str, Any] = {"prompt": ["The capital of Spain " * 12] if stream else ["The capital of Spain"] * 3,
                            "max_tokens": 64 if stream else 16, "n": 1 if stream else 2, "stream": stream}
    status, _, data = request(base, "POST", "/v1/completions", over)
    assert status == 400, data
    err = assert_openai_error(json.loads(data), code="too_many_tokens")
    assert "--max-request-tokens" in err["message"] and "100" in err["message"]
    under = {**over, "max_tokens": 8}
    assert request(base, "POST", "/v1/completions", under)[0] == 200
    chat = {"messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 40, "n": 3, "stream": False}
    status, body = post(base, "/v1/chat/completions", chat)
    assert status == 400 and assert_openai_error(body, code="too_many_tokens")["param"] == "max_tokens"


def test_chat_characters_are_capped_before_the_template(capped_sft: tuple[Any, str]) -> None:
    app, base = capped_sft
    counted: list[str] = []
    g = app.state.engine.loaded
    real = g.count_tokens
    with _patched(g, "count_tokens", lambda text: counted.append(text) or real(text)):
        messages = [{"role": "user", "content": "word " * 150}, {"role": "assistant", "content": "ok"}] * 3
        status, body = post(base, "/v1/chat/completions", {"messages": [*messages, {"role": "user", "content": "?"}]})
    assert status == 400 and assert_openai_error(body, code="request_too_large")["param"] == "messages"
    assert counted == []


# ------------------------------------------------------------------------------------------ item 10
@pytest.fixture(scope="module")
def guarded_server(clf_run: Run) -> Iterator[str]:
    with running(create_app(clf_run, ServeOptions(read_timeout=1.0))) as base:
        yield base


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reading and discarding what it sends)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("sends", [b"", b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                                   b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 40\r\n\r\n{\"in"])
def test_a_client_that_does_not_finish_its_request_is_cut_off(guarded_server: str, sends: bytes) -> None:
    """Nothing, half the headers, or half the body: the connection is closed after --read-timeout."""
    with socket.create_connection(("127.0.0.1", _port(guarded_server))) as sock:
        sock.sendall(sends)
        assert _closed_by_server(sock, HOSTILE_DEADLINE), "the half-open connection was kept"
    assert get(guarded_server, "/health")[0] == 200


def test_a_trickling_client_is_cut_off(guarded_server: str) -> None:
    """Slowloris: a header byte now and then resets no timer; the whole request must arrive in time."""
    line = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
    with socket.create_connection(("127.0.0.1", _port(guarded_server))) as sock:
        sock.settimeout(0.2)
        deadline = time.monotonic() + HOSTILE_DEADLINE
        closed = False
        for byte in line:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            assert time.monotonic() < deadline
        assert closed, "a trickling client kept its connection"


def test_connections_past_the_limit_are_closed_and_the_server_recovers(clf_run: Run) -> None:
    with running(create_app(clf_run, ServeOptions(read_timeout=60, max_connections=6))) as base:
        socks = [socket.create_connection(("127.0.0.1", _port(base))) for _ in range(20)]
        try:
            # Past --max-connections the connection waiting longest without a request is closed to make
            # room (each open one holds a file descriptor), long before --read-timeout (60 s) would.
            closed = [_closed_by_server(s, 0.5) for s in socks]
            assert closed == [True] * 14 + [False] * 6, closed
            _serves_on_one_connection(base)  # a real client is served while six idle sockets hold the limit
            assert _closed_by_server(socks[14], 0.5)  # ... having made room by closing the oldest
        finally:
            for s in socks:
                s.close()
        _serves_on_one_connection(base)


def _serves_on_one_connection(base: str) -> None:
    conn = _connect(base)
    try:
        status, _, data = _exchange(conn, "POST", "/v1/classify", {"input": ["great film"]})
        assert status == 200, data
        sock = conn.sock
        status, _, _ = _exchange(conn, "GET", "/health")  # a client in time keeps its connection
        assert status == 200 and conn.sock is sock
    finally:
        conn.close()


ACCEPT_SCRIPT = textwrap.dedent("""
    import logging, sys
    import uvicorn
    from lmtune.serve import ServeOptions
    from lmtune.serve.app import create_app, server_config

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    app = create_app(sys.argv[1], ServeOptions(read_timeout=60.0))
    config = server_config(app, port=0, log_level="info")
    server = uvicorn.Server(config)

    @app.get("/exhaust")
    def exhaust() -> dict:
        # Use up this process's file descriptors (as 150 idle sockets did under a 128-file limit).
        global held
        held = []
        try:
            while True:
                held.append(open("/dev/null"))
        except OSError:
            pass
        return {"held": len(held)}

    @app.get("/release")
    def release() -> dict:
        for f in held:
            f.close()
        return {"ok": True}

    import threading
    def report() -> None:
        import time
        while not server.started:
            time.sleep(0.05)
        print(server.servers[0].sockets[0].getsockname()[1], flush=True)
    threading.Thread(target=report, daemon=True).start()
    server.run()
""")


def test_accept_errors_are_logged_once_per_interval(clf_run: Run, tmp_path: Path) -> None:
    """Out of file descriptors, the server logs the accept error once per interval, not per attempt (a
    test in a real process: it uses up that process's descriptors), and serves again when they are freed."""
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", ACCEPT_SCRIPT, str(clf_run.path)], stdout=subprocess.PIPE,
                                stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline() or 0)
        assert port, log.read_text()[-3000:]
        base = f"http://127.0.0.1:{port}"
        conn = _connect(base)  # opened first: it holds a descriptor of its own
        status, _, data = _exchange(conn, "GET", "/exhaust")
        assert status == 200 and json.loads(data)["held"] > 0
        before = log.stat().st_size
        waiting = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]  # queue in the kernel
        time.sleep(3)  # accept keeps failing for 3 s
        flood = log.stat().st_size - before
        assert _exchange(conn, "GET", "/release")[0] == 200
        for s in waiting:
            s.close()
        deadline = time.monotonic() + HOSTILE_DEADLINE
        while True:  # accepting resumes (asyncio retries a second after the error)
            try:
                if request(base, "GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not recover"
            time.sleep(0.2)
        conn.close()
    finally:
        proc.terminate()
        proc.wait(HOSTILE_DEADLINE)
    text = log.read_text(errors="replace")
    lines = [x for x in text.splitlines() if "Too many open files" in x]
    assert flood < 20_000, f"{flood} bytes of log in 3 s"
    assert 1 <= len(lines) <= 6, lines[:10]


def test_a_running_generation_whose_client_left_stops_within_a_step(sft_app: Any, sft_server: str) -> None:
    """A non-streamed answer stops at the next decoding step once its client left, not after max_tokens."""
    engine = sft_app.state.engine
    body = {"prompt": "The capital of", "max_tokens": 64, "temperature": 0}
    with _Gate(engine.loaded.model) as counted:  # the client that stays: how many steps the answer takes
        counted.release.set()
        status, answer = post(sft_server, "/v1/completions", body)
        assert status == 200, answer
    steps = counted.calls
    assert steps >= 8, f"the answer ends after {steps} steps: too short to show a stop"
    with _Gate(engine.loaded.model) as slow:
        leaving = _send_and_leave(sft_server, "/v1/completions", body)
        assert slow.entered.wait(HOSTILE_DEADLINE)  # its first decoding step is running
        leaving.close()
        _wait_for(lambda: engine.batcher.pending == 0, "the server to notice the client left")
        slow.release.set()
        _wait_for(lambda: engine.worker.idle, "the model worker to stop")
    assert slow.calls <= 2, f"{slow.calls} of {steps} decoding steps were computed for a client that had left"
    assert post(sft_server, "/v1/completions", {**body, "max_tokens": 2})[0] == 200
