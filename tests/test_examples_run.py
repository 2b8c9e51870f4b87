"""Every shipped example config runs end to end, shortened to a few steps (slow: real bundled models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_relation_extraction_example import write_handmade

import lmtune

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

# A few steps on a few examples: this checks that each config is runnable as shipped, not its quality.
SHORT = {"train.max_steps": 2, "train.epochs": 1, "train.eval_every": 2, "train.batch_size": 4,
         "data.max_samples": 24, "generation.eval_examples": 2, "generation.max_new_tokens": 4}


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTUNE_CACHE", str(Path.home() / ".cache" / "lmtune"))  # reuse the converted SmolLM2
    overrides: dict[str, object] = {**SHORT, "output_dir": str(tmp_path / "run")}
    cfg = lmtune.load_config(path)
    if cfg.task == "classification":
        overrides.pop("generation.eval_examples")
        overrides.pop("generation.max_new_tokens")
    if cfg.data.train == "qa.jsonl":  # the column-mapping example names the user's own file: make one
        rows = [{"question": f"What is {i} plus {i}?", "context": "Arithmetic." if i % 2 else "",
                 "answer": str(2 * i)} for i in range(40)]
        (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        overrides["data.train"] = str(tmp_path / "qa.jsonl")
    if cfg.data.train == "data/tickets.csv":  # the multi-label example, also a user's own file
        tags = ["billing", "urgent", "login", "refund"]
        lines = ["text,tags"] + [f"ticket {i} about {tags[i % 4]} and {tags[(i * 3) % 4]},"
                                 f"{tags[i % 4]};{tags[(i * 3) % 4]}" for i in range(80)]
        (tmp_path / "tickets.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        overrides["data.train"] = str(tmp_path / "tickets.csv")
    if cfg.data.train == "data/relations.jsonl":  # the relation example: the hand-written sentences of its test
        overrides["data.train"] = str(write_handmade(tmp_path / "relations.jsonl"))
    if cfg.data.train.startswith("examples/"):  # data shipped with the examples, named from the repository root
        overrides["data.train"] = str(ROOT / cfg.data.train)
    if cfg.model.init == "scratch":
        overrides["model.vocab_size"] = 500
    if cfg.data.streaming:  # a stream has no length to cut: max_steps alone shortens it
        overrides.pop("data.max_samples")
    run = lmtune.train(path, overrides=overrides, show_progress=False)
    assert json.loads((run.path / "run.json").read_text())["status"] == "complete"
    assert (run.path / "report.md").is_file() and (run.model_dir / "model.safetensors").is_file()
