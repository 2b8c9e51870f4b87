"""Choosing the numeric precision: measured, not assumed.

``precision: auto`` picks bf16 autocast on a CUDA GPU that supports it (fp16 with
loss scaling on older GPUs). On a CPU, bf16 support varies widely between
chips: some run bf16 matmuls 2-3x faster than fp32, others emulate them slowly.
So lmtune times a small matmul in both and uses bf16 only when it is clearly
faster. Master weights stay fp32 either way (autocast), so bf16 here changes
speed, not what is stored.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from lmtune.config import PRECISIONS
from lmtune.errors import ConfigError
from lmtune.training.flops import cached_measurement, device_name

log = logging.getLogger(__name__)


def _probe_key() -> str:
    """The disk cache key of a CPU probe: the measurement holds for this CPU model, torch version and thread count."""
    cpu = device_name(torch.device("cpu"))
    return f"{cpu}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _best_pass(step: Callable[[], Any]) -> float:
    """Seconds of ``step``'s fastest of 4 passes under inference mode; the first pass warms up (kernel choice,
    page faults)."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(4):
            t = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t)
    return best


# bf16 must beat fp32 by this factor to be chosen on CPU: below it, the casts cost more than they save.
_CPU_BF16_MIN_SPEEDUP = 1.25


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """Measured fp32/bf16 time ratio of a 384x384 matmul on this CPU (>1 means bf16 is faster).

    Costs well under a second: on CPUs without native bf16 one bf16 matmul is already
    enough to see it is many times slower, and the probe stops there. The answer is
    cached on disk per CPU model and torch version.
    """
    return float(cached_measurement("bf16_probe.json", _probe_key(), _bf16_speedup))


def _bf16_speedup() -> float:
    def timed(dtype: torch.dtype, reps: int) -> float:
        a = torch.randn(384, 384).to(dtype)
        b = torch.randn(384, 384).to(dtype)
        a @ b  # warm-up: oneDNN picks kernels on first use
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return best

    try:
        fp32 = timed(torch.float32, 5)
        bf16 = timed(torch.bfloat16, 1)
        if bf16 < 3 * fp32:  # plausibly fast: measure properly
            bf16 = min(bf16, timed(torch.bfloat16, 5))
        return fp32 / bf16
    except RuntimeError:  # no bf16 kernels at all
        return 0.0


# Decoding routes one-row bf16 matmuls to ATen's gemv (lmtune.models.decode_matmuls) only where that is
# clearly faster than oneDNN on this CPU.
_CPU_GEMV_MIN_SPEEDUP = 1.2


@functools.lru_cache(maxsize=1)
def cpu_bf16_gemv_speedup() -> float:
    """Measured oneDNN/ATen time ratio of one-row bf16 matrix-vector products on this CPU (>1: ATen's gemv is
    faster), the products a decoding step of one answer makes. The weights cycled through (64 MB) exceed the
    caches, as a model's do. Cached on disk per CPU model, torch version and thread count; about 0.06 s."""
    return float(cached_measurement("bf16_gemv_probe.json", _probe_key(), _bf16_gemv_speedup))


def _bf16_gemv_speedup() -> float:
    weights = [torch.ones(2048, 1024, dtype=torch.bfloat16) for _ in range(16)]
    x = torch.ones(1, 1024, dtype=torch.bfloat16)

    def products() -> None:
        for w in weights:
            torch.nn.functional.linear(x, w)

    # torch.backends.mkldnn.flags() would also touch the TF32 switch and warn about it: set only the one.
    enabled = torch._C._get_mkldnn_enabled()
    try:
        onednn = _best_pass(products)
        torch._C._set_mkldnn_enabled(False)
        aten = _best_pass(products)
        return onednn / aten
    except RuntimeError:  # no bf16 kernels at all
        return 0.0
    finally:
        torch._C._set_mkldnn_enabled(enabled)


# Decoding packs bf16 linears into oneDNN's blocked layout (lmtune.models.decode_matmuls.pack_linears) only where
# that is clearly faster than torch's plain oneDNN path on this CPU.
_CPU_PACKED_MIN_SPEEDUP = 1.2
_PACKED_PROBE_ROWS = 8


@functools.lru_cache(maxsize=1)
def cpu_bf16_packed_speedup() -> float:
    """Measured time ratio of bf16 products of a few rows (8, a batch of answers being decoded) on torch's plain
    oneDNN path over the same products with the weights packed in oneDNN's blocked layout (>1: packing is
    faster). 64 MB of weights, as in :func:`cpu_bf16_gemv_speedup`; cached on disk alike; about 0.1 s."""
    return float(cached_measurement("bf16_packed_probe.json", _probe_key(), _bf16_packed_speedup))


def _bf16_packed_speedup() -> float:
    if not torch.backends.mkldnn.is_available() or not torch._C._get_mkldnn_enabled():
        return 0.0
    try:
        weights = [torch.ones(2048, 1024, dtype=torch.bfloat16) for _ in range(16)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, _PACKED_PROBE_ROWS) for w in weights]
        x = torch.ones(_PACKED_PROBE_ROWS, 1024, dtype=torch.bfloat16)
        plain = _best_pass(lambda: [torch.nn.functional.linear(x, w) for w in weights])
        blocked = _best_pass(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed])
        return plain / blocked
    except RuntimeError:  # no bf16 kernels in this oneDNN build
        return 0.0


def pack_bf16_linears(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model generating with ``dtype`` weights on ``device`` should hold its linears' weights in
    oneDNN's blocked layout (:func:`lmtune.models.decode_matmuls.pack_linears`): bf16 weights on a CPU where
    that measures faster than torch's plain oneDNN path."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    speedup = cpu_bf16_packed_speedup()
    log.debug("bf16 few-row matmuls: packed oneDNN weights are %.2fx the plain path on this CPU", speedup)
    return speedup >= _CPU_PACKED_MIN_SPEEDUP


def route_bf16_gemv(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model decoding with ``dtype`` weights on ``device`` should send its one- and two-row matmuls
    to ATen's gemv (:mod:`lmtune.models.decode_matmuls`): bf16 weights on a CPU where that measures faster."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    speedup = cpu_bf16_gemv_speedup()
    log.debug("bf16 one-row matmuls: ATen's gemv is %.2fx oneDNN on this CPU", speedup)
    return speedup >= _CPU_GEMV_MIN_SPEEDUP


def inference_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype a saved model's weights are loaded in to generate and evaluate (``auto|fp32|bf16|fp16``).

    ``auto``: bf16 on a GPU that supports it (else fp16); on a CPU bf16 where the measured probe says this CPU
    runs bf16 matmuls clearly faster (:func:`cpu_bf16_speedup`, as for training), else fp32. Decoding one
    token reads every weight once, so halving the bytes is where the gain is (about 1.2-1.3x for a tuned
    SmolLM2-135M on an AVX512-BF16 CPU, BENCHMARKS.md). On AVX2-only CPUs bf16 is emulated and slower, and
    the probe keeps fp32.
    """
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    choice = resolve_precision(requested, device, setting="precision")
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def resolve_precision(requested: str, device: torch.device, *, setting: str = "train.precision") -> str:
    """Map ``auto|fp32|bf16|fp16`` to Accelerate's ``no|bf16|fp16`` for ``device``.

    Explicit choices are honoured when the hardware can run them, otherwise a
    clear error (naming ``setting``) is raised rather than silently running in something else.
    """
    if requested == "fp32":
        return "no"
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16_ok else "fp16"
        if requested == "bf16" and not bf16_ok:
            raise ConfigError(f"{setting} bf16 is not supported by this GPU; use fp16, fp32 or auto")
        return requested
    if requested == "fp16":
        if device.type == "cpu":
            raise ConfigError(f"{setting} fp16 needs a GPU; on CPU use bf16, fp32 or auto")
        return "fp16"
    if requested == "bf16":
        return "bf16"
    # auto on CPU (and other devices): measure.
    if device.type == "cpu":
        speedup = cpu_bf16_speedup()
        choice = "bf16" if speedup >= _CPU_BF16_MIN_SPEEDUP else "no"
        log.info("precision auto: bf16 matmul is %.2fx fp32 on this CPU -> %s", speedup, choice)
        return choice
    return "no"
