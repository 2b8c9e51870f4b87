"""Running the real server in tests: tiny runs to serve, uvicorn in a thread on a free loopback port, raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from helpers import sentiment_rows, write_csv
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmtune
from lmtune.serve.app import server_config
from lmtune.workflows.run import Run

MAX_NEW = 8  # the sft run's generation.max_new_tokens
CHROMIUM = os.environ.get("LMTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Peru": "Lima", "Japan": "Tokyo"}


def train_sft_run(root: Path, tiny_chat_llama_dir: Path) -> Run:
    """A LoRA sft run (2 steps) on a tiny Llama with SmolLM2's tokenizer whose weights are redrawn at std
    0.3, so greedy answers are varied text rather than a run of newlines."""
    base = root / "noisy"
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_chat_llama_dir).save_pretrained(base)
    rows = [{"messages": [{"role": "user", "content": f"Capital of {c}? ({i})"},
                          {"role": "assistant", "content": CAPITALS[c]}]}
            for i, c in enumerate(list(CAPITALS) * 10)]
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "task": "sft", "model": str(base), "method": {"name": "lora"},
        "data": {"train": str(data), "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 5e-2, "warmup_ratio": 0.0, "precision": "fp32"},
        "generation": {"max_new_tokens": MAX_NEW, "eval_examples": 2},
        "output_dir": str(root / "run"),
    }
    return lmtune.train(cfg, show_progress=False)


def train_classifier_run(root: Path, tiny_bert_dir: Path) -> Run:
    """A tiny BERT sentiment classifier (2 epochs on 320 sentences: it learns the sentiment words).

    Learning rate 6e-3: at 3e-3 two epochs learnt the words for lucky dropout draws only (the last layer's
    draws changed when it began to run on position 0 only, and the run stopped learning); at 6e-3 seeds 42, 2
    and 3 reach test accuracy 1.0 at test loss 0.22-0.44 with either path, not saturated (4 epochs saturate
    the model: its attributions then no longer favour the sentiment words, which the page test checks).
    Torch's own dropout masks (``fast_dropout: false``) keep the state the tests were written against."""
    data = write_csv(root / "s.csv", sentiment_rows(320))
    cfg = {
        "task": "classification", "model": str(tiny_bert_dir), "baselines": [],
        "data": {"train": str(data), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 6e-3, "precision": "fp32", "fast_dropout": False},
        "output_dir": str(root / "run"),
    }
    return lmtune.train(cfg, show_progress=False)


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` (from ``create_app``) on 127.0.0.1 (a free port) in a thread, configured as ``lmtune
    serve`` configures uvicorn (its connection limits); yields the base URL; stops it afterwards."""
    # log_config=None: uvicorn's own logging.config.dictConfig would close every existing handler, among them
    # the one absl (imported by rouge_score) bound to the stderr pytest captured at collection: that closes
    # pytest's capture file and the session dies with "lost sys.stderr".
    config = server_config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def chromium(**options: Any) -> Iterator[Any]:
    """A headless Chromium (Debian's, driven by Playwright) with a fresh profile: yields its browser context
    (``options`` go to ``launch_persistent_context``, a ``viewport`` say); skips the test without Chromium."""
    # Imported here: the tests that need no browser load this module without Playwright.
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does it)")
    profile = tempfile.mkdtemp(prefix="lmtune-chromium-")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=CHROMIUM_ARGS, **options)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def lmtune_server(args: list[str], log: Path, api_key: str) -> Iterator[str]:
    """``python -m lmtune ARGS --port PORT`` (``lmtune serve RUN`` or ``lmtune studio ...``) in a subprocess on
    a free loopback port, its API key from ``LMTUNE_API_KEY`` and its output in ``log``; waits until it answers
    ``/health``, yields its base URL, stops it afterwards."""
    with socket.socket() as s:  # a free loopback port for the subprocess
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LMTUNE_API_KEY": api_key, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmtune", *args, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if get(base, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lmtune {args[0]} did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request(base: str, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the standard library (full control over the bytes sent): (status, headers, body)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def post(base: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
    """POST JSON; (status, parsed JSON body)."""
    status, _, data = request(base, "POST", path, body, **kwargs)
    return status, json.loads(data)


def get(base: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
    """GET; (status, body bytes)."""
    status, _, data = request(base, "GET", path, **kwargs)
    return status, data


def assert_openai_error(body: Any, *, code: str | None = None) -> dict[str, Any]:
    """``body`` is OpenAI's error shape; returns its ``error`` object."""
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return dict(err)
