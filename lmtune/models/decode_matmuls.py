"""bf16 decoding of one or two rows on a CPU: matrix-vector products through ATen's gemv, not oneDNN.

Decoding one answer (``lmtune chat``, ``predict`` at batch 1, a lone request to the server) multiplies a
single row by every weight matrix, once per token: the step reads all the weights and does almost no
arithmetic. With bf16 weights torch sends these products to oneDNN, whose kernels are built for many rows;
for one row they reach about 12 GB/s on an AVX512-BF16 CPU, where ATen's own bf16 gemv (fp32 accumulation,
what torch runs with oneDNN switched off) is 1.8-3x faster per product, the LM head included
(``benchmarks/bench_gemv.py``; BENCHMARKS.md, "Generation"). From three rows on oneDNN is as fast or faster, and for a prompt
(tens of rows) far faster.

:func:`route_small_forwards` hooks a model so that each forward of at most :data:`MAX_ROWS` tokens runs with
oneDNN off (``torch.backends.mkldnn``'s switch) and every other forward as before. Whether it pays is this
CPU's to say: the caller asks :func:`lmtune.training.precision.cpu_bf16_gemv_speedup`, which times both.
The switch is process-wide: while a decoding step holds it off, a bf16 matmul in another thread also runs on
ATen's kernels (the same products, accumulated in fp32 in another order). A count kept under a lock turns it
back on only when the last such step ends.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

MAX_ROWS = 2
"""Most tokens in a forward whose matmuls go to ATen's gemv: at one and two rows it is faster than oneDNN."""

_lock = threading.Lock()
_holders = 0
_saved = True


def _hold() -> None:
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _holders += 1


def _release() -> None:
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            torch._C._set_mkldnn_enabled(_saved)


class SmallForwardRoute:
    """The hooks :func:`route_small_forwards` put on a model; :meth:`remove` takes them off."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._held = threading.local()  # a forward's pre-hook and hook run in the same thread
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, always_call=True)]

    def _before(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
            rows = None if tokens is None else tokens.shape[:-1].numel()
        else:
            rows = tokens.numel()
        held = rows is not None and rows <= MAX_ROWS
        stack = self._stack()
        stack.append(held)
        if held:
            _hold()

    def _after(self, module: Any, args: Any, output: Any) -> None:
        stack = self._stack()
        if stack and stack.pop():
            _release()

    def _stack(self) -> list[bool]:
        stack: list[bool] | None = getattr(self._held, "stack", None)
        if stack is None:
            stack = self._held.stack = []
        return stack

    def remove(self) -> None:
        """Take the hooks off (the model's matmuls go to oneDNN again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def route_small_forwards(model: torch.nn.Module) -> SmallForwardRoute:
    """Hook ``model`` so its forwards of at most :data:`MAX_ROWS` tokens run their matmuls on ATen's gemv."""
    return SmallForwardRoute(model)
