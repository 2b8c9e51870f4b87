"""Model FLOPs and MFU (lmtune/training/flops.py): counted FLOPs against hand-computed ones, the backward
factor by method, and the measured matmul peak kept in the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lmtune.paths import cache_dir
from lmtune.training import flops


def test_forward_flops_of_a_linear_stack_are_exact() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    x = torch.randn(4, 10)
    with torch.no_grad():
        counted = flops.forward_flops(lambda: model(x))
    assert counted == 2 * 4 * (10 * 20 + 20 * 3)  # 2 FLOPs per multiply-add, per row


def test_forward_flops_of_a_bert_cover_linears_and_attention(tiny_bert_dir: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    batch, seq = 2, 16
    ids = torch.randint(5, 100, (batch, seq))
    with torch.no_grad():
        counted = flops.forward_flops(lambda: model(input_ids=ids))
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "classifier" and "pooler" not in name)
    cfg = model.config
    attention = 2 * 2 * seq * cfg.hidden_size * cfg.num_hidden_layers  # QK^T and AV per token
    per_token = counted / (batch * seq)
    # the encoder's linears and attention per token, plus the pooler and head once per sequence
    assert 2 * linear + attention <= per_token <= 2 * linear + attention + 2 * (cfg.hidden_size ** 2 + 2 * cfg.hidden_size)


def test_backward_factor_follows_what_trains(tiny_bert_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    assert flops.backward_factor(model) == pytest.approx(3.0)  # full fine-tune: the usual 6N
    for p in model.parameters():
        p.requires_grad_(False)
    assert flops.backward_factor(model) == pytest.approx(2.0)  # nothing trains: input gradients only
    lora = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir),
                          LoraConfig(r=4, target_modules=["query", "value"]))
    assert 2.0 < flops.backward_factor(lora) < 2.5


def test_matmul_peak_is_measured_once_and_cached() -> None:
    flops.matmul_peak.cache_clear()
    peak = flops.matmul_peak("fp32")
    assert peak["gflops"] > 0.5 and peak["threads"] == torch.get_num_threads() and peak["size"] == 1024
    stored = json.loads((cache_dir() / "matmul_peak.json").read_text())
    # this thread count's entry (runs with train.num_threads 1 earlier in the session stored another)
    key = next(k for k in stored if f"|fp32|threads {peak['threads']}|" in k)
    stored[key] = 123.0  # a later process reads the cache instead of measuring again
    (cache_dir() / "matmul_peak.json").write_text(json.dumps(stored))
    flops.matmul_peak.cache_clear()
    assert flops.matmul_peak("fp32")["gflops"] == 123.0
    flops.matmul_peak.cache_clear()
    got = flops.utilisation(1e6, 1000.0, {"gflops": 10.0}, 2)
    assert got["model_gflops_per_second"] == pytest.approx(1.0) and got["mfu"] == pytest.approx(0.05)


def test_instruction_set_limits_make_another_cache_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # ONEDNN_MAX_CPU_ISA=AVX2 turns an AVX512-BF16 CPU's fast bf16 matmuls into emulated ones: the bf16
    # probe and the peaks measured without it must not be reused under it (BENCHMARKS.md's AVX2 runs).
    for var in flops._ISA_LIMITS:
        monkeypatch.delenv(var, raising=False)
    plain = flops.device_name(torch.device("cpu"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert flops.device_name(torch.device("cpu")) == f"{plain} (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2)"
