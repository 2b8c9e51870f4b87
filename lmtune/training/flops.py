"""Model FLOPs of a run and their share of the machine's matmul peak (model FLOP utilisation, MFU).

**Model FLOPs per token.** torch's own ``FlopCounterMode`` counts the matrix multiplications (linear
layers, attention through SDPA or plain matmuls, convolutions) of one forward pass of the task's model
over a real batch; dividing by the batch's token positions gives the forward cost of a token, whatever
the architecture (encoder, decoder, encoder-decoder, a head on top). Training adds the backward pass:
the gradient with respect to every layer's input (as much again as the forward) and the gradient of
every trainable weight (the forward's share of the trainable weights again). So a full fine-tune costs
3x the forward per token (the usual 6N), a LoRA run about 2x. Like PaLM's MFU, the figure counts what
the model needs for the real tokens only: padding, recomputation and optimizer arithmetic are not model
FLOPs, so they show as lost utilisation.

**The peak.** A square matmul timed on this machine in the run's precision (fp32, bf16 or fp16), in the
threads the run uses: what this hardware really sustains, not a datasheet number. It is measured once
per CPU/GPU model, precision, thread count and torch version, and kept in lmtune's cache.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lmtune.paths import cache_dir

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The timed matmul: large enough to reach a CPU's or GPU's sustained rate, small enough to take well
# under a second per precision on two cores.
_CPU_SIZE, _GPU_SIZE = 1024, 4096
_MIN_ROUND_SECONDS = 0.15


def _cpu_sdpa_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query.shape, key.shape, value.shape))


# torch's counter knows the GPU attention kernels but not the CPU one SDPA runs here (torch 2.13): the same
# formula (QK^T and AV) for it. The math fallback (attention with a mask) decomposes into counted matmuls.
_cpu_sdpa_flops._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode: pass tensors, not shapes
_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def forward_flops(forward: Callable[[], Any]) -> int:
    """FLOPs torch counts while ``forward()`` runs (call it under ``torch.no_grad()`` in eval mode)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    with counter:
        forward()
    return int(counter.get_total_flops())


def backward_factor(model: torch.nn.Module) -> float:
    """Training FLOPs per forward FLOP: 1 (forward) + 1 (input gradients) + the trainable share of the weights
    that multiply (linear, convolution and embedding-free matrices: every parameter with 2+ dimensions that
    is not an embedding table, whose lookup costs no FLOPs)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = trainable = 0
    for p in model.parameters():
        if p.ndim < 2 or id(p) in embeddings:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return 2.0 + (trainable / total if total else 0.0)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (what measured figures are cached under)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo", encoding="utf-8") as f:
        name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    # Variables that cap the instruction sets torch uses make the same chip a different machine: with
    # ONEDNN_MAX_CPU_ISA=AVX2 an AVX512-BF16 CPU runs bf16 matmuls ~400x slower (how BENCHMARKS.md
    # measures an AVX2-only CPU), so measurements cached under the bare name would be wrong for it.
    limits = [f"{var}={os.environ[var]}" for var in _ISA_LIMITS if os.environ.get(var)]
    return f"{name} ({', '.join(limits)})" if limits else name


_ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


@functools.lru_cache(maxsize=8)
def matmul_peak(precision: str, device_type: str = "cpu") -> dict[str, Any]:
    """This machine's sustained matmul rate in ``precision`` (``fp32|bf16|fp16``) on ``device_type``.

    Returns ``{"gflops", "precision", "device", "threads", "size"}``; ``gflops`` is the best of three
    timed rounds of an NxN matmul (N 1024 on CPU, 4096 on GPU). Cached on disk per device model,
    precision, threads and torch version; None-valued ``gflops`` where the precision has no kernel.
    """
    device = torch.device(device_type)
    threads = torch.get_num_threads()
    key = f"{device_name(device)}|{precision}|threads {threads}|torch {torch.__version__}"
    gflops = cached_measurement("matmul_peak.json", key, lambda: _measure(_DTYPES[precision], device))
    n = _GPU_SIZE if device.type == "cuda" else _CPU_SIZE
    return {"gflops": gflops, "precision": precision, "device": device_name(device), "threads": threads, "size": n}


def cached_measurement(file: str, key: str, measure: Callable[[], Any]) -> Any:
    """``measure()``'s answer for ``key``, kept in ``$LMTUNE_CACHE/<file>`` (a JSON object of such answers): a
    figure of this machine (a matmul rate, bf16's speed-up) is measured once, not at every run."""
    store = cache_dir() / file
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = measure()
        with contextlib.suppress(OSError):  # a read-only cache only costs a re-measure next time
            store.write_text(json.dumps(known, indent=1), encoding="utf-8")
    return known[key]


def _measure(dtype: torch.dtype, device: torch.device) -> float | None:
    n = _GPU_SIZE if device.type == "cuda" else _CPU_SIZE
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up: oneDNN / cuBLAS pick their kernel on first use
        sync()
        reps, best = 1, 0.0
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            seconds = time.perf_counter() - start
            best = max(best, 2 * n**3 * reps / seconds / 1e9)
            # Slow kernels (bf16 emulated on an AVX2-only CPU) stay at one matmul a round.
            reps = max(reps, min(64, int(reps * _MIN_ROUND_SECONDS / max(seconds, 1e-9))))
        return best
    except RuntimeError:  # no kernel for this precision here
        return None


def utilisation(flops_per_token: float, tokens_per_second: float, peak: dict[str, Any],
                processes: int) -> dict[str, Any]:
    """metrics.json's figures: model FLOPs per token and per second, the peak, and their ratio (MFU).

    ``tokens_per_second`` is the run's real-token rate over all ``processes``; each process is taken to
    have the measured peak of this one (the same device and thread count)."""
    achieved = flops_per_token * tokens_per_second / 1e9
    peak_all = peak["gflops"] * processes if peak["gflops"] else None
    return {
        "model_flops_per_token": flops_per_token,
        "model_gflops_per_second": achieved,
        "matmul_peak_gflops": peak_all,
        "matmul_peak": peak,
        "mfu": achieved / peak_all if peak_all else None,
    }
