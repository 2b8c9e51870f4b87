"""Language-model training: continued pre-training of a tiny decoder and a model from scratch."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import story_text
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmtune
from lmtune.errors import ConfigError, DataError


def _config(tmp_path, model, **over):
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = tmp_path / "stories.txt"
    text.write_text(story_text(200), encoding="utf-8")
    cfg = {
        "task": "causal_lm",
        "model": model,
        "data": {"train": str(text), "max_length": 64},
        "train": {"epochs": 3, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every": 5,
                  "precision": "fp32"},
        "output_dir": str(tmp_path / "run"),
    }
    for k, v in over.items():
        section, key = k.split(".")
        cfg[section][key] = v
    return cfg


def test_continued_pretraining_lowers_perplexity(tmp_path, tiny_chat_llama_dir):
    run = lmtune.train(_config(tmp_path, str(tiny_chat_llama_dir)), show_progress=False)
    m = run.metrics
    before = m["starting_point"]["test"]["perplexity"]
    after = m["test"]["perplexity"]
    assert after < before / 10, (before, after)
    data = json.loads((run.path / "data.json").read_text())
    # 300 paragraphs -> documents; the split holds out whole documents
    assert data["train"]["documents"] + data["validation"]["documents"] + data["test"]["documents"] == 200
    assert data["train"]["rows"] < data["train"]["documents"]  # packed: several documents per row
    log = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in log if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    # the saved folder is a plain causal LM that generates and stops at EOS by config
    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    assert model.generation_config.eos_token_id in (tok.eos_token_id, [tok.eos_token_id])
    out = model.generate(**tok("The small cat", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0]).startswith("The small cat")
    assert run.meta["task"] == "causal_lm"


def test_unpacked_training_runs_and_matches_eval_tokens(tmp_path, tiny_chat_llama_dir):
    packed = lmtune.train(_config(tmp_path / "a", str(tiny_chat_llama_dir), **{"train.max_steps": 2}), show_progress=False)
    cfg = _config(tmp_path / "b", str(tiny_chat_llama_dir), **{"train.max_steps": 2, "data.packing": False})
    plain = lmtune.train(cfg, show_progress=False)
    # Same held-out documents and tokens; every piece's first token is not predicted (nothing precedes it),
    # so the scored tokens are the tokens minus the pieces, in both layouts.
    for run in (packed, plain):
        facts = json.loads((run.path / "data.json").read_text())["test"]
        assert run.metrics["starting_point"]["test"]["target_tokens"] == facts["tokens"] - facts["pieces"]
    a, b = packed.metrics["starting_point"]["test"], plain.metrics["starting_point"]["test"]
    assert json.loads((plain.path / "data.json").read_text())["test"]["rows"] > \
        json.loads((packed.path / "data.json").read_text())["test"]["rows"]
    assert a["loss"] == pytest.approx(b["loss"], rel=0.02)


def test_scratch_model_with_trained_tokenizer(tmp_path):
    model = {"name": "unused", "init": "scratch", "tokenizer": "train", "vocab_size": 400, "layers": 2,
             "hidden_size": 64, "heads": 4, "context_length": 128}
    run = lmtune.train(_config(tmp_path, model), show_progress=False)
    m = run.metrics
    assert m["test"]["perplexity"] < m["starting_point"]["test"]["perplexity"] / 20
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    assert len(tok) <= 400
    assert run.meta["base_model_path"] is None
    cfg = AutoModelForCausalLM.from_pretrained(run.model_dir).config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (2, 64)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scratch_architectures_build(tmp_path, tiny_chat_llama_dir, arch):
    model = {"name": str(tiny_chat_llama_dir), "init": "scratch", "architecture": arch, "layers": 1,
             "hidden_size": 32, "heads": 2, "context_length": 64}
    run = lmtune.train(_config(tmp_path, model, **{"train.max_steps": 3}), show_progress=False)
    assert AutoModelForCausalLM.from_pretrained(run.model_dir).config.model_type == arch


def test_scratch_rejects_lora_and_other_tasks(tmp_path):
    cfg = _config(tmp_path, {"name": "x", "init": "scratch", "tokenizer": "train"})
    cfg["method"] = {"name": "lora"}
    with pytest.raises(ConfigError, match="from scratch"):
        lmtune.train(cfg, show_progress=False)
    cfg = _config(tmp_path, {"name": "x", "init": "scratch"})
    cfg["task"] = "classification"
    with pytest.raises(ConfigError, match="causal_lm"):
        lmtune.train(cfg, show_progress=False)


def test_too_few_documents_to_split(tmp_path, tiny_chat_llama_dir):
    cfg = _config(tmp_path, str(tiny_chat_llama_dir), **{"data.document_split": "file"})
    with pytest.raises(DataError, match="too few"):
        lmtune.train(cfg, show_progress=False)


def test_document_split_modes(tmp_path):
    from lmtune.config import load_config
    from lmtune.tasks.causal_lm.task import CausalLMTask

    f = tmp_path / "t.txt"
    f.write_text("a b\nc d\n\ne f\n\n\ng h\n", encoding="utf-8")
    for mode, expected in (("paragraph", ["a b\nc d", "e f", "g h"]), ("line", ["a b", "c d", "e f", "g h"]),
                           ("file", ["a b\nc d\n\ne f\n\ng h"])):
        cfg = load_config({"task": "causal_lm", "data": {"train": str(f), "document_split": mode}})
        docs, _ = CausalLMTask(cfg)._read_documents(str(f))
        assert docs == expected, mode
    assert torch is not None
