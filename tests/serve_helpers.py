"""Running the real server in tests: tiny runs to serve, uvicorn in a thread on a free loopback port, raw HTTP."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from helpers import sentiment_rows, write_csv
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmtune
from lmtune.serve.app import server_config
from lmtune.workflows.run import Run

MAX_NEW = 8  # the sft run's generation.max_new_tokens
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
    """A tiny BERT sentiment classifier (2 epochs on 320 sentences: it learns the sentiment words)."""
    data = write_csv(root / "s.csv", sentiment_rows(320))
    cfg = {
        "task": "classification", "model": str(tiny_bert_dir), "baselines": [],
        "data": {"train": str(data), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32"},
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
