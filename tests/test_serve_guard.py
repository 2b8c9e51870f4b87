"""``lmtune serve --guard`` and ``--redact-pii`` for real: a tiny guard classifier, a tiny served model, the real
offline presidio analyzer, uvicorn on a loopback port.

The guard is a tiny BERT trained to call texts holding the word ``badword`` toxic. The served decoder is a tiny
Llama tuned to answer every question with :data:`ANSWER` (an e-mail address and the guard's word), so what the
output guard and the masking receive is known.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import FILLER, NEGATIVE, POSITIVE, tiny_chat_llama, write_csv
from serve_helpers import assert_openai_error, get, post, request, running
from typer.testing import CliRunner

import lmtune
from lmtune import cli
from lmtune.errors import ConfigError
from lmtune.serve import ServeOptions
from lmtune.serve.app import create_app
from lmtune.serve.guard import PiiMasker, Safeguards, SafeguardStats
from lmtune.workflows.run import Run

ANSWER = "Write to jane.doe@example.com badword"
EMAIL = "jane.doe@example.com"
TOXIC = "you are a badword and a badword"
CLEAN = "Hello there, what is the plot?"
MESSAGE = "Withheld by the content filter."
WORDS = [*FILLER, *POSITIVE, *NEGATIVE, "hello", "there", "what", "is", "capital", "question", "write", "to", "you",
         "are", "please", "tell", "me", "about", "who", "why"]


@pytest.fixture(scope="module")
def guard_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Run:
    """A tiny classifier: ``toxic`` when a text holds ``badword``, else ``ok``."""
    root = tmp_path_factory.mktemp("guard")
    rng = random.Random(0)
    rows = []
    for i in range(320):
        words = rng.sample(WORDS, rng.randint(3, 10))
        toxic = i % 2 == 0
        if toxic:
            words.insert(rng.randint(0, len(words)), "badword")
        rows.append({"text": " ".join(words), "label": "toxic" if toxic else "ok"})
    cfg = {"task": "classification", "model": str(tiny_bert_dir), "baselines": [],
           "data": {"train": str(write_csv(root / "guard.csv", rows)), "max_length": 32},
           "train": {"epochs": 4, "batch_size": 16, "learning_rate": 5e-3, "precision": "fp32"},
           "output_dir": str(root / "run")}
    return lmtune.train(cfg, show_progress=False)


@pytest.fixture(scope="module")
def answer_run(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Run:
    """A tiny chat Llama tuned (40 full steps) until its greedy answer to any question is ANSWER."""
    root = tmp_path_factory.mktemp("answer")
    base = tiny_chat_llama(root / "base", smollm2_tokenizer_dir)
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: {random.Random(i).choice(WORDS)}?"},
                          {"role": "assistant", "content": ANSWER}]} for i in range(32)]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {"task": "sft", "model": str(base), "method": {"name": "full"}, "data": {"train": str(data), "max_length": 128},
           "train": {"max_steps": 40, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32"},
           "generation": {"max_new_tokens": 16, "eval_examples": 1}, "output_dir": str(root / "run")}
    return lmtune.train(cfg, show_progress=False)


def _guard(guard_run: Run, **kwargs: Any) -> ServeOptions:
    return ServeOptions(guard=str(guard_run.path), guard_labels=("toxic",), guard_message=MESSAGE, **kwargs)


@pytest.fixture(scope="module")
def refusing_server(answer_run: Run, guard_run: Run) -> Any:
    """The answer model, its inputs and outputs guarded, blocked inputs refused."""
    with running(create_app(answer_run, _guard(guard_run, guard_on="both"))) as base:
        yield base


@pytest.fixture(scope="module")
def replacing_server(answer_run: Run, guard_run: Run) -> Any:
    """The answer model, inputs guarded and answered by the message when blocked, personal data masked."""
    with running(create_app(answer_run, _guard(guard_run, guard_on="input", guard_action="replace",
                                               redact_pii=True))) as base:
        yield base


@pytest.fixture(scope="module")
def classifier_server(serve_classifier_run: Run, guard_run: Run) -> Any:
    """The sentiment classifier of tests/test_serve.py behind the guard."""
    with running(create_app(serve_classifier_run, _guard(guard_run))) as base:
        yield base


def _metric(base: str, name: str) -> float:
    _, data = get(base, "/metrics")
    lines = [x for x in data.decode().splitlines() if x.startswith(name + " ")]
    assert len(lines) == 1, (name, data.decode())
    return float(lines[0].rsplit(" ", 1)[1])


def _chat(base: str, content: str, **kwargs: Any) -> tuple[int, Any]:
    return post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "temperature": 0,
                                               **kwargs})


def _events(raw: bytes) -> list[Any]:
    return [json.loads(e.removeprefix("data: ")) for e in raw.decode().split("\n\n") if e.startswith("data: {")]


# ------------------------------------------------------------------------------------------ the fixtures
def test_the_guard_tells_toxic_from_clean_and_the_model_answers_as_tuned(guard_run: Run, answer_run: Run) -> None:
    probs = {t: r["probabilities"]["toxic"] for t, r in zip([TOXIC, ANSWER, CLEAN, "Question 3: plot?"],
                                                            guard_run.predict([TOXIC, ANSWER, CLEAN, "Question 3: plot?"]),
                                                            strict=True)}
    assert probs[TOXIC] > 0.5 and probs[ANSWER] > 0.5, probs
    assert probs[CLEAN] < 0.5 and probs["Question 3: plot?"] < 0.5, probs
    assert answer_run.chat([{"role": "user", "content": CLEAN}], do_sample=False)["text"] == ANSWER


# ------------------------------------------------------------------------------------------ refuse
def test_a_toxic_input_is_refused_with_a_content_filter_error(refusing_server: str) -> None:
    before = _metric(refusing_server, 'lmtune_guard_blocked_total{on="input"}')
    checked = _metric(refusing_server, 'lmtune_guard_checked_total{on="input"}')
    status, body = _chat(refusing_server, TOXIC)
    assert status == 400, body
    err = assert_openai_error(body, code="content_filter")
    assert err["type"] == "content_filter" and err["param"] == "messages"
    assert "'toxic'" in err["message"] and TOXIC not in err["message"]
    # every endpoint that takes text, streaming included (refused before the stream starts)
    status, body = post(refusing_server, "/v1/completions", {"prompt": ["fine words", TOXIC], "max_tokens": 4})
    assert status == 400 and assert_openai_error(body, code="content_filter")["param"] == "prompt"
    assert "prompt text 2" in body["error"]["message"]
    status, body = _chat(refusing_server, TOXIC, stream=True)
    assert status == 400 and body["error"]["type"] == "content_filter"
    assert _metric(refusing_server, 'lmtune_guard_blocked_total{on="input"}') == before + 3
    assert _metric(refusing_server, 'lmtune_guard_checked_total{on="input"}') == checked + 3


def test_a_flagged_answer_is_replaced_with_finish_reason_content_filter(refusing_server: str) -> None:
    blocked = _metric(refusing_server, 'lmtune_guard_blocked_total{on="output"}')
    replaced = _metric(refusing_server, "lmtune_guard_replaced_total")
    status, body = _chat(refusing_server, CLEAN, n=2)  # the input passes; the tuned answer holds "badword"
    assert status == 200, body
    assert [c["message"]["content"] for c in body["choices"]] == [MESSAGE, MESSAGE]
    assert [c["finish_reason"] for c in body["choices"]] == ["content_filter", "content_filter"]
    assert body["usage"]["completion_tokens"] > 0  # the model did answer; the answer was withheld
    status, body = post(refusing_server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4})
    assert status == 200
    # a streamed answer is screened whole before any of it is sent
    status, _, raw = request(refusing_server, "POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": CLEAN}], "temperature": 0, "stream": True})
    events = _events(raw)
    assert status == 200 and "badword" not in raw.decode() and EMAIL not in raw.decode()
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == MESSAGE
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == ["content_filter"]
    outputs = 2 + 1 + 1
    flagged = _metric(refusing_server, 'lmtune_guard_blocked_total{on="output"}') - blocked
    assert 3 <= flagged <= outputs  # the two chats surely; the raw-text continuation as the guard reads it
    assert _metric(refusing_server, "lmtune_guard_replaced_total") - replaced == flagged


def test_classify_and_task_inputs_are_guarded(classifier_server: str) -> None:
    status, body = post(classifier_server, "/v1/classify", {"input": ["a great film", TOXIC]})
    assert status == 400 and assert_openai_error(body, code="content_filter")["param"] == "input"
    status, body = post(classifier_server, "/v1/predict", {"input": [TOXIC]})
    assert status == 400 and body["error"]["type"] == "content_filter"
    status, body = post(classifier_server, "/v1/classify", {"input": ["a great wonderful film"]})
    assert status == 200 and body["data"][0]["label"] == "pos"
    assert _metric(classifier_server, 'lmtune_guard_blocked_total{on="input"}') == 2
    assert _metric(classifier_server, 'lmtune_guard_checked_total{on="input"}') == 3
    assert _metric(classifier_server, 'lmtune_guard_blocked_total{on="output"}') == 0


# ------------------------------------------------------------------------------------------ replace, PII
def test_replace_answers_a_blocked_input_with_the_message_without_generating(replacing_server: str) -> None:
    status, body = _chat(replacing_server, TOXIC, n=2)
    assert status == 200, body
    assert [c["message"]["content"] for c in body["choices"]] == [MESSAGE, MESSAGE]
    assert {c["finish_reason"] for c in body["choices"]} == {"content_filter"}
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] > 0
    status, _, raw = request(replacing_server, "POST", "/v1/completions", {"prompt": TOXIC, "stream": True})
    events = _events(raw)
    assert "".join(e["choices"][0]["text"] for e in events) == MESSAGE
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert _metric(replacing_server, "lmtune_guard_replaced_total") == 3


def test_redact_pii_masks_answers_and_counts_them(replacing_server: str) -> None:
    before = _metric(replacing_server, 'lmtune_pii_masked_total{entity="EMAIL_ADDRESS",where="answer"}') \
        if "EMAIL_ADDRESS" in get(replacing_server, "/metrics")[1].decode() else 0
    status, body = _chat(replacing_server, CLEAN)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Write to <EMAIL_ADDRESS> badword"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    status, _, raw = request(replacing_server, "POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": CLEAN}], "temperature": 0, "stream": True})
    assert EMAIL not in raw.decode()
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in _events(raw)) == \
        "Write to <EMAIL_ADDRESS> badword"
    after = _metric(replacing_server, 'lmtune_pii_masked_total{entity="EMAIL_ADDRESS",where="answer"}')
    assert after == before + 2
    _, view = get(replacing_server, "/v1/run")
    assert json.loads(view)["redact_pii"] is True and json.loads(view)["guard"]["on"] == "input"


def test_redact_pii_keeps_personal_data_out_of_the_log(replacing_server: str, answer_run: Run,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A request holding an e-mail address and a phone number that crashes the model: the server logs the error
    and its traceback (whose exception message quotes the prompt) with the personal data masked."""
    caplog.set_level(logging.INFO)
    status, _ = _chat(replacing_server, f"mail {EMAIL} or call (212) 555-0187, please")
    assert status == 200
    logging.getLogger("lmtune.serve.test").warning("a client wrote %s", f"to {EMAIL}")
    assert [r.getMessage() for r in caplog.records if "a client wrote" in r.getMessage()] == \
        ["a client wrote to <EMAIL_ADDRESS>"]
    assert EMAIL not in caplog.text


def test_a_crash_quoting_the_prompt_is_logged_masked(answer_run: Run, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(answer_run, ServeOptions(redact_pii=True))
    g = app.state.engine.loaded

    def crash(prompts: list[str], *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"cannot answer {prompts[0]!r}")

    try:
        with running(app) as base, caplog.at_level("ERROR", logger="lmtune"):
            g.generate = crash  # the run's generator is shared with the other servers of the module: restored below
            status, body = _chat(base, f"mail {EMAIL} or call (212) 555-0187, please")
    finally:
        del g.generate
    assert status == 500 and EMAIL not in json.dumps(body)
    logged = [r for r in caplog.records if "error serving" in r.getMessage()]
    assert logged and "ValueError: cannot answer" in caplog.text
    assert EMAIL not in caplog.text and "555-0187" not in caplog.text
    assert "<EMAIL_ADDRESS>" in caplog.text and "<PHONE_NUMBER>" in caplog.text
    assert re.search(r'File ".*engine\.py", line \d+', caplog.text)  # code locations are kept as they are


def test_the_masker_with_the_real_analyzer() -> None:
    masker = PiiMasker(SafeguardStats())
    text, counts = masker.mask("Mail jane.doe@example.com or call (212) 555-0187 please")
    assert text == "Mail <EMAIL_ADDRESS> or call <PHONE_NUMBER> please"
    assert counts == Counter({"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1})
    # labels stay; strings of task answers are masked; keys and numbers untouched
    answer = {"label": "pos", "entities": [{"text": "jane.doe@example.com", "start": 3}], "score": 0.5}
    assert masker.mask_value(answer, frozenset({"pos"})) == {
        "label": "pos", "entities": [{"text": "<EMAIL_ADDRESS>", "start": 3}], "score": 0.5}
    assert masker.stats.masked == Counter({("EMAIL_ADDRESS", "answer"): 1})


# ------------------------------------------------------------------------------------------ bad flags
@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"guard_threshold": 0.0}, "--guard-threshold"),
    ({"guard_threshold": 1.5}, "--guard-threshold"),
    ({"guard_threshold": float("nan")}, "--guard-threshold"),
    ({"guard_on": "sideways"}, "--guard-on"),
    ({"guard_action": "block"}, "--guard-action"),
    ({"guard_labels": ("toxic", " ")}, "--guard-labels"),
    ({"guard_message": "x" * 5000}, "--guard-message"),
])
def test_bad_guard_flags_fail_naming_the_flag(guard_run: Run, kwargs: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServeOptions(guard=str(guard_run.path), **{"guard_labels": ("toxic",), **kwargs})
    assert flag in caught.value.message and caught.value.field == flag[2:].replace("-", "_")


def test_guard_flags_without_a_guard_or_a_folder_fail(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--guard-labels applies with --guard"):
        ServeOptions(guard_labels=("toxic",))
    with pytest.raises(ConfigError, match="--guard-threshold applies with --guard"):
        ServeOptions(guard_threshold=0.9)
    with pytest.raises(ConfigError, match=r"--guard .* does not exist"):
        ServeOptions(guard=str(tmp_path / "nowhere"), guard_labels=("toxic",))


def test_a_guard_that_is_not_a_text_classifier_or_has_other_labels_fails(guard_run: Run, answer_run: Run) -> None:
    with pytest.raises(ConfigError, match="a guard must be a classifier") as caught:
        Safeguards(ServeOptions(guard=str(answer_run.path), guard_labels=("toxic",)))
    assert caught.value.field == "guard" and "--guard" in caught.value.message
    with pytest.raises(ConfigError, match="--guard-labels names 'rude'") as caught:
        Safeguards(ServeOptions(guard=str(guard_run.path), guard_labels=("rude",)))
    assert caught.value.hint is not None and "ok" in caught.value.hint and "toxic" in caught.value.hint
    with pytest.raises(ConfigError, match="--guard needs --guard-labels") as caught:
        Safeguards(ServeOptions(guard=str(guard_run.path)))
    assert caught.value.hint is not None and "toxic" in caught.value.hint


def test_the_cli_passes_the_guard_flags_and_names_a_bad_one(monkeypatch: pytest.MonkeyPatch, guard_run: Run,
                                                             answer_run: Run) -> None:
    started: list[ServeOptions] = []
    monkeypatch.setattr("lmtune.serve.app.serve", lambda run, options, announce=None: started.append(options))
    monkeypatch.delenv("LMTUNE_API_KEY", raising=False)
    result = CliRunner().invoke(cli.app, ["serve", str(answer_run.path), "--guard", str(guard_run.path),
                                          "--guard-labels", "toxic", "--guard-on", "output", "--redact-pii"])
    assert result.exit_code == 0, result.output
    assert started == [ServeOptions(guard=str(guard_run.path), guard_labels=("toxic",), guard_on="output",
                                    redact_pii=True)]
    result = CliRunner().invoke(cli.app, ["serve", str(answer_run.path), "--guard", str(guard_run.path),
                                          "--guard-labels", "toxic", "--guard-threshold", "2"])
    assert isinstance(result.exception, ConfigError) and "--guard-threshold" in str(result.exception)
