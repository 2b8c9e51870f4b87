"""LoRA variants (peft LoraConfig): DoRA, rsLoRA, PiSSA/OLoRA initialisation, per-module ranks and alphas,
LoRA+ learning rates. Each trains (loss falls, the right weights train, as many as it should), merges, and
its saved adapter on the original base model predicts what the trained model did (the export parity gate).
Settings that cannot work are refused with a sentence that names the keys.

A table of cases, as in peft's tests/test_custom_models.py: tiny BERT classifiers (2 layers, hidden 32).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FILLER, NEGATIVE, POSITIVE, crash_after_checkpoint, minilm_path, write_csv
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

import lmtune
from lmtune.config import load_config
from lmtune.errors import ConfigError
from lmtune.training.loop import TrainingLoop
from lmtune.workflows.export import export_merged

HIDDEN, LAYERS = 32, 2
# method.target_modules of every case: the attention's query and value projections (32 -> 32).
TARGETS = ["query", "value"]
R = 4
# LoRA on query and value of each layer: A (r, 32) and B (32, r).
LORA_PARAMS = LAYERS * len(TARGETS) * 2 * HIDDEN * R
HEAD_PARAMS = HIDDEN * 2 + 2  # the classifier (2 labels)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT (no dropout) whose random weights are large enough (initializer_range 0.2,
    not 0.02) for its features to tell words apart: LoRA on a few matrices then learns in a few steps."""
    folder = tmp_path_factory.mktemp("lora-bert")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.2)
    BertForSequenceClassification(cfg).bert.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def easy_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three sentiment words and one filler word per text: a signal a random tiny model's features carry."""
    rng = random.Random(0)
    rows = []
    for i in range(256):
        words = rng.sample(POSITIVE if i % 2 == 0 else NEGATIVE, 3) + rng.sample(FILLER, 1)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if i % 2 == 0 else "neg"})
    return write_csv(tmp_path_factory.mktemp("lora-data") / "easy.csv", rows)


@pytest.fixture(autouse=True)
def _no_report(monkeypatch: pytest.MonkeyPatch) -> None:
    # The report (token attributions by integrated gradients) is half of each run's time and tested elsewhere.
    monkeypatch.setattr("lmtune.workflows.train.write_report", lambda *args, **kwargs: None)


def _config(model: Path, data: Path, out: Path, method: dict[str, Any], **train: Any) -> dict[str, Any]:
    return {
        "task": "classification", "model": str(model), "output_dir": str(out), "baselines": [],
        "data": {"train": str(data), "max_length": 16},
        "method": {"name": "lora", "r": R, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS, **method},
        "train": {"max_steps": 16, "batch_size": 16, "learning_rate": 1e-2, "log_every": 4, "eval_every": 16,
                  "precision": "fp32", **train},
    }


def _lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _check_dora(model: torch.nn.Module, trainable: dict[str, int]) -> None:
    magnitudes = {n: c for n, c in trainable.items() if "lora_magnitude_vector" in n}
    # one magnitude per output feature of each adapted weight
    assert len(magnitudes) == LAYERS * len(TARGETS) and set(magnitudes.values()) == {HIDDEN}


def _check_rslora(model: torch.nn.Module, trainable: dict[str, int]) -> None:
    scales = [m.scaling["default"] for m in _lora_modules(model).values()]
    assert len(scales) == LAYERS * len(TARGETS) and scales == pytest.approx([8 / math.sqrt(R)] * len(scales))


def _check_plain_scaling(model: torch.nn.Module, trainable: dict[str, int]) -> None:
    scales = [m.scaling["default"] for m in _lora_modules(model).values()]
    assert len(scales) == LAYERS * len(TARGETS) and scales == pytest.approx([8 / R] * len(scales))


def _check_patterns(model: torch.nn.Module, trainable: dict[str, int]) -> None:
    shapes = {n: tuple(m.lora_A["default"].weight.shape) for n, m in _lora_modules(model).items()}
    assert {s for n, s in shapes.items() if n.endswith("layer.0.attention.self.query")} == {(8, HIDDEN)}
    assert {s for n, s in shapes.items() if not n.endswith("layer.0.attention.self.query")} == {(R, HIDDEN)}
    # scale alpha / r per module: layer 0's query 8 / 8; the values' alpha 32 / 4; the rest 8 / 4
    scales = {(n.split(".")[-1], n.split(".")[-4], m.scaling["default"]) for n, m in _lora_modules(model).items()}
    assert scales == {("query", "0", 1.0), ("query", "1", 2.0), ("value", "0", 8.0), ("value", "1", 8.0)}


# name -> (method settings, trainable parameters beyond LoRA on query/value + the head, extra check, adapter rank
# saved: PiSSA/OLoRA adapters are saved as plain LoRAs of twice the rank)
CASES: dict[str, tuple[dict[str, Any], int, Callable[[torch.nn.Module, dict[str, int]], None], int]] = {
    "lora": ({}, 0, _check_plain_scaling, R),
    "dora": ({"use_dora": True}, LAYERS * len(TARGETS) * HIDDEN, _check_dora, R),
    "rslora": ({"use_rslora": True}, 0, _check_rslora, R),
    "pissa": ({"init_lora_weights": "pissa"}, 0, _check_plain_scaling, 2 * R),
    "olora": ({"init_lora_weights": "olora"}, 0, _check_plain_scaling, 2 * R),
    # randomised SVD: peft cannot redo this start when it loads an unconverted adapter (exact PiSSA/OLoRA it
    # can), so only the conversion makes base + adapter equal the trained model (0.67 logits apart without it)
    "pissa_niter_dora": ({"init_lora_weights": "pissa_niter_4", "use_dora": True}, LAYERS * len(TARGETS) * HIDDEN,
                         _check_dora, 2 * R),
    # layer 0's query at rank 8 instead of 4: 2 * 32 * 4 more parameters; the values at alpha 32
    "patterns": ({"rank_pattern": {r"layer\.0\.attention\.self\.query": 8}, "alpha_pattern": {"value": 32}},
                 2 * HIDDEN * R, _check_patterns, R),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_variant_trains_merges_and_its_adapter_reloads(
        case: str, bert_dir: Path, easy_csv: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings, extra, check, saved_rank = CASES[case]
    seen: dict[str, Any] = {}
    original = TrainingLoop.setup

    def spy(self: TrainingLoop) -> None:
        seen["start"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        seen["trainable"] = {n: p.numel() for n, p in self.model.named_parameters() if p.requires_grad}
        check(self.model, seen["trainable"])
        original(self)

    monkeypatch.setattr(TrainingLoop, "setup", spy)
    run = lmtune.train(_config(bert_dir, easy_csv, tmp_path / "run", settings), show_progress=False)

    # what trains: LoRA A/B (+ DoRA magnitudes) and the head, nothing of the base model
    trainable = seen["trainable"]
    assert sum(trainable.values()) == LORA_PARAMS + HEAD_PARAMS + extra
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < 0.9 * losses[0], losses
    # the saved model reloads as the trained one (train's own check) ...
    assert run.meta["saved_as"] == "merged"
    # ... and the adapter, on the untouched base model, predicts the same (PiSSA/OLoRA: converted to plain LoRA)
    adapter_cfg = json.loads((run.path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == saved_rank and adapter_cfg["init_lora_weights"] is True
    adapter = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
    assert any("classifier" in k for k in adapter)  # the trained head travels with the adapter
    assert any("lora_magnitude_vector" in k for k in adapter) == ("use_dora" in settings)
    # the adapters moved from their start, and the merged weights from the base model's (untouched on disk)
    final = load_file(str(run.path / "checkpoints" / "step-00000016" / "model.safetensors"))
    moved = [n for n, p in seen["start"].items() if ".lora_B." in n and n in final and not torch.equal(final[n], p)]
    assert len(moved) == LAYERS * len(TARGETS)
    merged = load_file(str(run.model_dir / "model.safetensors"))
    original = load_file(str(bert_dir / "model.safetensors"))
    key = "encoder.layer.1.attention.self.query.weight"
    assert (merged["bert." + key] - original[key]).abs().max() > 1e-4

    export = export_merged(run.path, tmp_path / "export")  # base + adapter vs merged export, within 1e-3
    assert export.source == "adapter" and export.max_abs_logit_diff <= 1e-3
    # close the loop: the export (from base + adapter) equals the model as trained (model/, merged in memory)
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    batch = tok(["great wonderful brilliant film", "dull awful boring plot", "a film"], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        trained = AutoModelForSequenceClassification.from_pretrained(run.model_dir).eval()(**batch).logits
        exported = AutoModelForSequenceClassification.from_pretrained(export.folder).eval()(**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
        reloaded = PeftModel.from_pretrained(base, str(run.path / "adapter")).eval()(**batch).logits
    assert torch.allclose(trained, exported, atol=1e-4) and torch.allclose(trained, reloaded, atol=1e-4)


def test_loraplus_puts_b_in_its_own_group_at_ratio_times_the_rate(
        bert_dir: Path, easy_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[tuple[set[str], float]] = []
    original = TrainingLoop.setup

    def spy(self: TrainingLoop) -> None:
        original(self)
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups.extend(({names[id(p)] for p in g["params"]}, g["initial_lr"]) for g in self.optimizer.param_groups)

    monkeypatch.setattr(TrainingLoop, "setup", spy)
    cfg = _config(bert_dir, easy_csv, tmp_path / "run", {"loraplus_lr_ratio": 16},
                  learning_rate=1e-3)
    run = lmtune.train(cfg, show_progress=False)
    b_groups = [(names, lr) for names, lr in groups if any(".lora_B." in n for n in names)]
    assert len(b_groups) == 1 and b_groups[0][1] == pytest.approx(16e-3)
    assert all(".lora_B." in n for n in b_groups[0][0]) and len(b_groups[0][0]) == LAYERS * len(TARGETS)
    others = [lr for names, lr in groups if names is not b_groups[0][0]]
    assert others and others == pytest.approx([1e-3] * len(others))
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < 0.9 * losses[0]


def test_pissa_resume_equals_uninterrupted_run(bert_dir: Path, easy_csv: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """PiSSA (randomised SVD) changes the frozen base weights: resume rebuilds them bit for bit (the checkpoint's
    digests check it) and ends where the uninterrupted run does, with the same converted adapter."""
    method = {"init_lora_weights": "pissa_niter_2", "use_dora": True}

    def cfg(name: str) -> dict[str, Any]:
        return _config(bert_dir, easy_csv, tmp_path / name, method, max_steps=8, save_every=4,
                       eval_every=4)

    whole = lmtune.train(cfg("whole"), show_progress=False)
    with crash_after_checkpoint(monkeypatch, 4):
        lmtune.train(cfg("broken"), show_progress=False)
    resumed = lmtune.train(cfg("broken"), resume=True, show_progress=False)
    for part in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(whole.path / part)), load_file(str(resumed.path / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize(
    ("method", "train", "message"),
    [
        ({"name": "full", "use_dora": True}, {}, r"method\.use_dora is a LoRA setting; method\.name is full"),
        ({"name": "freeze", "loraplus_lr_ratio": 16}, {}, r"method\.loraplus_lr_ratio is a LoRA setting"),
        ({"name": "qlora", "init_lora_weights": "pissa"}, {}, r"init_lora_weights pissa .*qlora"),
        ({"name": "lora", "init_lora_weights": "svd"}, {}, r"init_lora_weights 'svd' is not one of"),
        ({"name": "lora", "init_lora_weights": "olora", "use_rslora": True, "rank_pattern": {"query": 8}}, {},
         r"olora with method\.use_rslora and method\.rank_pattern"),
        ({"name": "lora", "init_lora_weights": "loftq", "merge": False}, {}, r"loftq .*method\.merge true"),
        ({"name": "lora", "rank_pattern": {"query(": 8}}, {}, r"method\.rank_pattern 'query\(' is not a regular"),
        ({"name": "lora", "rank_pattern": {"query": 0}}, {}, r"method\.rank_pattern"),
        ({"name": "lora", "loraplus_lr_ratio": 0.5}, {}, r"loraplus_lr_ratio"),
        ({"name": "lora"}, {"optimizer": "adamw_16bit"}, r"optimizer"),
    ],
)
def test_impossible_settings_are_refused_at_load(method: dict[str, Any], train: dict[str, Any], message: str,
                                                 tmp_path: Path) -> None:
    cfg = {"task": "classification", "model": "minilm", "data": {"train": "x.csv"}, "method": method,
           "train": train, "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_a_pattern_that_matches_no_module_is_refused_at_setup(bert_dir: Path, easy_csv: Path,
                                                              tmp_path: Path) -> None:
    cfg = _config(bert_dir, easy_csv, tmp_path / "run", {"alpha_pattern": {"layer\\.7\\.key": 4}})
    with pytest.raises(ConfigError, match=r"method\.alpha_pattern 'layer\\\.7\\\.key' matches none of the adapted "
                       r"modules: .*attention\.self\.query"):
        lmtune.train(cfg, show_progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    ("method", "train", "message"),
    [
        ({"init_lora_weights": "loftq"}, {}, r"method\.init_lora_weights loftq .*CUDA"),
        ({}, {"optimizer": "adamw_8bit"}, r"train\.optimizer adamw_8bit .*CUDA"),
        ({}, {"optimizer": "paged_adamw_8bit"}, r"train\.optimizer paged_adamw_8bit .*CUDA"),
    ],
)
def test_cuda_only_settings_are_refused_on_cpu_before_anything_loads(
        method: dict[str, Any], train: dict[str, Any], message: str, bert_dir: Path,
        easy_csv: Path, tmp_path: Path) -> None:
    cfg = _config(bert_dir, easy_csv, tmp_path / "run", method, **train)
    with pytest.raises(ConfigError, match=message):
        lmtune.train(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_pissa_adapter_only_run_predicts_as_the_merged_one(bert_dir: Path, easy_csv: Path, tmp_path: Path) -> None:
    """method.merge false saves model/ as the adapter alone: converted too, it gives the merged run's logits."""
    method = {"init_lora_weights": "pissa_niter_2"}
    merged = lmtune.train(_config(bert_dir, easy_csv, tmp_path / "merged", method), show_progress=False)
    adapter = lmtune.train(_config(bert_dir, easy_csv, tmp_path / "adapter", {**method, "merge": False}),
                           show_progress=False)
    assert adapter.meta["saved_as"] == "adapter" and (adapter.model_dir / "adapter_config.json").is_file()
    texts = ["great wonderful brilliant film", "dull awful boring plot"]
    tok = AutoTokenizer.from_pretrained(merged.model_dir)
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
        from_adapter = PeftModel.from_pretrained(base, str(adapter.model_dir)).eval()(**batch).logits
        from_merged = AutoModelForSequenceClassification.from_pretrained(merged.model_dir).eval()(**batch).logits
    assert torch.allclose(from_adapter, from_merged, atol=1e-4)
