"""Run folders written before the task-boundary refactor still load, evaluate, predict and serve.

``tests/fixtures/v0_runs/{classification,sft}`` are runs as lmtune 0.1.0 wrote them (see
``tests/fixtures/make_v0_runs.py``): a tiny BERT sentiment classifier and a tiny Llama chat model, each
with a word-level tokenizer. Their data files were temporary and are gone, so evaluation reads a file
written here. Each test works on a copy (the fixtures are never written to).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli, sentiment_rows, write_csv
from serve_helpers import post, running
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import lmtune
from lmtune.serve.app import create_app

FIXTURES = Path(__file__).parent / "fixtures" / "v0_runs"
TEXTS = ["great wonderful film", "dull boring plot", "the acting was superb and charming", "awful tedious script"]
PROMPT = "hello #7"


@pytest.fixture
def clf_run(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / "classification", tmp_path / "classification"))


@pytest.fixture
def sft_run(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / "sft", tmp_path / "sft"))


def _plain_labels(model_dir: Path, texts: list[str]) -> list[str]:
    """The labels plain transformers gives the saved classifier (the reference for lmtune's answers)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    return [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


def _plain_answer(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """The greedy chat answer of plain transformers through the saved chat template."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return str(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


def test_fixtures_are_runs_of_the_previous_version() -> None:
    # What the tests below prove rests on these being the old runs, unchanged.
    for name in ("classification", "sft"):
        assert json.loads((FIXTURES / name / "run.json").read_text())["lmtune_version"] == "0.1.0"
        assert json.loads((FIXTURES / name / "model" / "lmtune.json").read_text())["task"] == name


def test_v0_classification_run_loads_predicts_evaluates(clf_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run = lmtune.load_run(clf_run)
    assert run.task == "classification" and run.metrics["test"]["accuracy"] >= 0
    expected = _plain_labels(run.model_dir, TEXTS)
    predicted = run.predict(TEXTS)
    assert [p["label"] for p in predicted] == expected
    assert all(set(p["probabilities"]) == {"neg", "pos"} for p in predicted)

    inputs = write_csv(tmp_path / "in.csv", [{"text": t} for t in TEXTS])
    out = tmp_path / "out.csv"
    assert run_cli(["predict", str(clf_run), "-i", str(inputs), "-o", str(out), "--no-progress"], monkeypatch) == 0
    with out.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == TEXTS and [r["label"] for r in rows] == expected

    # Its own splits pointed at files that are gone: `lmtune eval --data` scores a file instead.
    labelled = write_csv(tmp_path / "labelled.csv", sentiment_rows(40, seed=3))
    scores = tmp_path / "scores.json"
    assert run_cli(["eval", str(clf_run), "--data", str(labelled), "--output", str(scores)], monkeypatch) == 0
    metrics = json.loads(scores.read_text())
    assert metrics["num_examples"] == 40 and 0 <= metrics["accuracy"] <= 1, metrics


def test_v0_sft_run_loads_chats_evaluates(sft_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = lmtune.load_run(sft_run)
    assert run.task == "sft"
    answer = run.chat([{"role": "user", "content": PROMPT}], max_new_tokens=4, do_sample=False)
    assert answer["text"] == _plain_answer(run.model_dir, PROMPT, 4)
    assert answer["completion_tokens"] <= 4 and answer["finish_reason"] in ("stop", "length")

    inputs = tmp_path / "prompts.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (PROMPT, "hello #8")), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    assert run_cli(["predict", str(sft_run), "-i", str(inputs), "-o", str(out), "--max-new-tokens", "4",
                    "--no-progress"], monkeypatch) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPT, "hello #8"] and rows[0]["generated"] == answer["text"]

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello #{i}"},
                                                      {"role": "assistant", "content": "hi there"}]}) + "\n"
                             for i in range(12)), encoding="utf-8")
    scores = tmp_path / "scores.json"
    assert run_cli(["eval", str(sft_run), "--data", str(chats), "--output", str(scores)], monkeypatch) == 0
    metrics = json.loads(scores.read_text())
    assert metrics["loss"] > 0 and "token_f1" in metrics, metrics


def test_v0_runs_serve(clf_run: Path, sft_run: Path) -> None:
    expected = _plain_labels(clf_run / "model", TEXTS[:1])
    with running(create_app(clf_run)) as base:
        status, body = post(base, "/v1/classify", {"input": TEXTS[:1]})
    assert status == 200 and [d["label"] for d in body["data"]] == expected, body

    reference = _plain_answer(sft_run / "model", PROMPT, 4)
    with running(create_app(sft_run)) as base:
        status, body = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                                                           "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"] == reference, body
