"""End to end: MiniLM learns extractive QA on the bundled chatterbot_qa set, through the CLI (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli


@pytest.mark.slow
def test_minilm_on_chatterbot_qa(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train, then eval on a SQuAD file and predict answers with character offsets."""
    run = tmp_path / "qa"
    code = run_cli(["train", "examples/question_answering_chatterbot.yaml", "--output_dir", str(run),
                    "--no-progress"], monkeypatch)
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    test, start = metrics["test"], metrics["starting_point"]["test"]
    # Measured (seed 42, bf16, 177 steps): test F1 0.115 -> 0.320, EM 0.000 -> 0.204 (validation F1 0.481).
    assert test["f1"] > start["f1"] + 0.15, (test["f1"], start["f1"])
    assert test["exact_match"] > start["exact_match"] + 0.1
    assert test["no_answer_examples"] > 0 and "null_score_diff_threshold" in test
    report = (run / "report.md").read_text()
    assert "Example predictions" in report and "plots/comparison.png" in report

    context = ("I like to talk about the history of robots and computers. thomas edison. "
               "History is the course of political, economic and military events over time.")
    doc = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "1", "question": "who invented the lightbulb",
         "answers": [{"text": "thomas edison.", "answer_start": context.index("thomas")}]}]}]}]}
    squad = tmp_path / "dev.json"
    squad.write_text(json.dumps(doc), encoding="utf-8")
    assert run_cli(["eval", str(run), "--data", str(squad), "--output", str(tmp_path / "e.json")], monkeypatch) == 0
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["num_examples"] == 1 and 0 <= scores["f1"] <= 1

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "who invented the lightbulb", "context": context}) + "\n")
    assert run_cli(["predict", str(run), "-i", str(questions), "-o", str(tmp_path / "a.jsonl"), "--no-progress"],
                   monkeypatch) == 0
    row = json.loads((tmp_path / "a.jsonl").read_text())
    assert row["context"][row["start"]:row["end"]] == row["answer"]
