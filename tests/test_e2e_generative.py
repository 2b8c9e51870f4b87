"""SmolLM2-135M-Instruct tuned with LoRA on the bundled chatterbot conversations, through the CLI (slow).

The real trap this guards: SmolLM2 pads with its EOS token (<|im_end|>). The tuned model must still
stop by itself, answer held-out prompts better than the base model, and export to a merged folder
whose logits match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

import lmtune


@pytest.mark.slow
def test_smollm2_lora_sft_on_chatterbot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTUNE_CACHE", str(Path.home() / ".cache" / "lmtune"))  # the converted SmolLM2, once
    run_dir = tmp_path / "chat"
    code = run_cli(["train", "examples/sft_chatterbot_smollm2_lora.yaml", "--output_dir", str(run_dir),
                 "--data.max_samples", "600", "--train.epochs", "1", "--train.eval_every", "1000",
                 "--generation.eval_examples", "40", "--generation.max_new_tokens", "40", "--no-progress"],
                monkeypatch)
    assert code == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    tuned, base = m["test"], m["starting_point"]["test"]
    assert tuned["loss"] < base["loss"] - 0.3
    assert tuned["rouge_l"] > base["rouge_l"] + 0.05
    assert tuned["token_f1"] > base["token_f1"]
    # ends its answers with <|im_end|> (== pad) by itself: measured 0.875, against 0.275 for the base model
    assert tuned["stopped_fraction"] >= 0.75 and tuned["stopped_fraction"] > base["stopped_fraction"] + 0.3
    # chat with the saved model from Python, and export it with the parity check
    run = lmtune.load_run(run_dir)
    answer = run.chat([{"role": "user", "content": "Do you like books?"}], max_new_tokens=40)
    assert answer["finish_reason"] == "stop" and answer["text"].strip()
    assert run_cli(["export", str(run_dir), "--format", "merged", "--output", str(tmp_path / "merged")], monkeypatch) == 0
    exported = json.loads((tmp_path / "merged" / "export.json").read_text())
    assert exported["max_abs_logit_diff"] <= exported["tolerance"]
