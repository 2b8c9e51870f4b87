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

From three rows on (a batch of answers, a prompt) oneDNN does the products, and :func:`pack_linears` makes
it faster there: each bf16 ``nn.Linear`` becomes a :class:`PackedLinear` that also holds its weight reordered
once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile``'s CPU
freezing does) and multiplies with ``torch.ops.mkldnn._linear_pointwise``. torch's plain path hands oneDNN the
strided weight on every call; the blocked one is 1.4-1.9x faster at 3-16 rows (bitwise the same results;
``benchmarks/bench_gemv.py``). At one and two rows ATen's gemv stays ahead of both (per step; the route above
runs with the plain weight). The copy costs the weights' bytes once more, so it is made only when that fits in
half the free memory.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psutil
import torch

log = logging.getLogger("lmtune")

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


PACK_ROWS = 16
"""The batch size oneDNN's weight layout is chosen for (the default generation batch; 1-1000 rows measured alike)."""


class PackedLinear(torch.nn.Linear):
    """A bf16 CPU ``nn.Linear`` (sharing its weight and bias) that multiplies with the weight in oneDNN's blocked
    layout; with oneDNN switched off (the one/two-row route) or under autograd it is the plain linear."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)  # no new weight: the linear's own parameters are shared (ties kept)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        # A plain attribute, not a buffer: it is not state (not saved) and must not be moved by .to().
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch._C._get_mkldnn_enabled() or (torch.is_grad_enabled() and self.weight.requires_grad):
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _packable(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    # Exactly nn.Linear with a plain strided bf16 CPU weight: not a quantized tensor subclass, not an adapter.
    return (type(module) is torch.nn.Linear and isinstance(weight, torch.nn.Parameter)
            and type(weight.data) is torch.Tensor and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu" and weight.layout == torch.strided)


def pack_linears(model: torch.nn.Module, *, max_bytes: int | None = None) -> int:
    """Replace ``model``'s bf16 CPU ``nn.Linear`` modules by :class:`PackedLinear`; returns the bytes of the
    packed copies (0: nothing packed). Nothing is packed when the copies would exceed ``max_bytes`` (default:
    half the memory free now)."""
    found = [(name, module) for name, module in model.named_modules() if _packable(module)]
    needed = sum(module.weight.numel() * module.weight.element_size() for _, module in found)
    budget = psutil.virtual_memory().available // 2 if max_bytes is None else max_bytes
    if not found or needed > budget:
        if found:
            log.info("bf16 linears not packed for oneDNN: the copies need %.0f MB, %.0f MB allowed",
                     needed / 2**20, budget / 2**20)
        return 0
    packed: dict[str, PackedLinear] = {}

    def reorder() -> None:
        for name, module in found:
            packed[name] = PackedLinear(module)

    # The reorders run in a helper thread: run in the main thread, they left decoding in every other thread
    # (the server's workers) 1.5x slower, ATen's gemv and attention included (measured on torch 2.13, cause not
    # found); from a helper thread neither the main thread nor the others lose speed.
    helper = threading.Thread(target=reorder, name="lmtune-pack")
    helper.start()
    helper.join()
    if len(packed) != len(found):
        raise RuntimeError("packing the linears for oneDNN failed (see the error above)")
    for name, linear in packed.items():
        model.set_submodule(name, linear)
    return needed
