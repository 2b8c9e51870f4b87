"""English -> Italian translation on real parallel text with the encoder-decoder warm-started from the
bundled MiniLM, through the CLI (slow): the tuned model must beat its starting point on chrF and BLEU,
and the saved folder must predict with plain transformers' generate behind ``lmtune predict``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli


@pytest.mark.slow
def test_minilm2minilm_translation_on_chatterbot_en_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "translate"
    code = run_cli(["train", "examples/seq2seq_translation_minilm2minilm.yaml", "--output_dir", str(run_dir),
                    "--train.epochs", "6", "--generation.eval_examples", "40", "--generation.max_new_tokens", "32",
                    "--no-progress"], monkeypatch)
    assert code == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    tuned, base = m["test"], m["starting_point"]["test"]
    assert tuned["loss"] < base["loss"] - 2
    # the untrained decoder (new cross-attention) writes nothing useful; the tuned one translates a little
    assert tuned["chrf"] > base["chrf"] + 5 and tuned["bleu"] > base["bleu"]
    assert tuned["stopped_fraction"] > base["stopped_fraction"]
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "warm-started from an encoder" in report and "Example outputs" in report
    src = tmp_path / "sources.jsonl"
    src.write_text(json.dumps({"source": "What is your name?"}) + "\n", encoding="utf-8")
    assert run_cli(["predict", str(run_dir), "--input", str(src), "--output", str(tmp_path / "out.jsonl")],
                   monkeypatch) == 0
    row = json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))
    assert row["source"] == "What is your name?" and row["generated"].strip()
