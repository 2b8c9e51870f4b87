"""End to end on the real bundled model and data, through the CLI a user types (slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import run_cli


@pytest.mark.slow
def test_minilm_on_rotten_tomatoes_beats_its_baselines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MiniLM fine-tuned on a third of the bundled reviews: train, eval, predict through the CLI."""
    run = tmp_path / "rt"
    code = run_cli(["train", "lmtune/configs/demo.yaml", "--output_dir", str(run), "--data.max_samples", "4000",
                 "--train.epochs", "1", "--train.eval_every", "60", "--no-progress"], monkeypatch)
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    baselines = json.loads((run / "baselines.json").read_text())
    acc = metrics["test"]["accuracy"]
    assert acc >= 0.75
    assert acc > baselines["majority"]["metrics"]["test"]["accuracy"] + 0.15
    assert metrics["starting_point"]["test"]["accuracy"] < 0.65
    # eval on a labelled file, predict to CSV and JSONL
    sample = tmp_path / "sample.csv"
    with sample.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerow(["A warm, funny and beautifully acted film.", "fresh"])
        w.writerow(["A tedious, lifeless mess that goes nowhere.", "rotten"])
    assert run_cli(["eval", str(run), "--data", str(sample), "--output", str(tmp_path / "e.json")], monkeypatch) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == 1.0
    for out in ("p.csv", "p.jsonl"):
        assert run_cli(["predict", str(run), "-i", str(sample), "-o", str(tmp_path / out), "--no-progress"],
                    monkeypatch) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["label"] for r in rows] == ["fresh", "rotten"] and "prob_fresh" in rows[0]
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert abs(sum(lines[0]["probabilities"].values()) - 1) < 1e-5
