"""Decoder models as classifiers: a sequence-classification head on a causal LM, with LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import lmtune


def test_tiny_llama_with_lora_learns(tmp_path: Path, sentiment_csv: Path) -> None:
    from helpers import tiny_llama
    from transformers import AutoModelForSequenceClassification

    model_dir = tiny_llama(tmp_path / "llama")
    cfg = {
        "task": "classification", "model": str(model_dir),
        "data": {"train": str(sentiment_csv), "max_length": 32},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "train": {"epochs": 4, "batch_size": 16, "learning_rate": 5e-3, "precision": "fp32"},
        "baselines": [], "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert run.metrics["test"]["accuracy"] > run.metrics["starting_point"]["test"]["accuracy"]
    merged = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    assert merged.config.pad_token_id is not None


@pytest.mark.slow
def test_smollm2_lora_classifier_on_rotten_tomatoes(tmp_path: Path) -> None:
    """The bundled SmolLM2-135M-Instruct (pad == eos) as a LoRA classifier with the demo's data."""
    os.environ.setdefault("LMTUNE_CACHE", str(tmp_path / "cache"))
    cfg = {
        "task": "classification", "model": "smollm2",
        "data": {"train": "bundled:rotten_tomatoes", "max_length": 64, "max_samples": 800},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 40, "batch_size": 16, "learning_rate": 1e-3, "eval_every": 20},
        "baselines": ["majority"], "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert run.metrics["test"]["accuracy"] > 0.6
    assert run.predict("A gorgeous, moving film.")[0]["label"] in {"fresh", "rotten"}
