"""Dropout whose random masks cost less on a CPU: the same distribution, drawn by numpy's PCG64.

torch draws a dropout mask on the CPU one element at a time from its Mersenne Twister (``bernoulli_``): about
6 ms for a (2048 x 576) activation on the 2-core machines lmtune is measured on, as long as the matmul it
precedes. LoRA puts a dropout in front of every adapted layer (7 per SmolLM2 block, 210 in all), and those
masks were 23% of a SmolLM2-135M LoRA step in bf16 (bench_speed_paths.py). :class:`FastDropout` draws the
same Bernoulli(1 - p) mask from 16 random bits per element, generated in bulk by numpy's PCG64 seeded from
torch's own generator (so ``torch.manual_seed`` and a resumed run's restored RNG state still fix every mask),
and applies it in two vectorised passes: 1.6 ms per such mask against 6.2 (bf16) and 9.3 ms (fp32).

The keep probability is rounded to a multiple of 2^-16 (p = 0.1 keeps 58,982 of 65,536 values: 0.899994) and
the kept values are scaled by the inverse of that probability, so the output's expectation is the input,
exactly as torch's dropout. The masks are different draws from torch's, so a run with fast dropout does not
repeat a run without it bit for bit (``train.fast_dropout: false`` restores torch's draws). Only used on the
CPU: CUDA's dropout is one fused kernel already.
"""

from __future__ import annotations

import numpy as np
import torch

BITS = 16
LEVELS = 1 << BITS
MIN_ELEMENTS = 4096  # below this torch's own draw is as quick


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float] | None:
    """A bool tensor of ``shape``, True with probability ~(1 - p), and the scale that keeps the expectation
    (1 / the exact keep probability); None when p rounds to 0 or 1 at 16 bits (torch's dropout then)."""
    threshold = round((1.0 - p) * LEVELS)  # values below it (of 0..65535) are kept
    if not 0 < threshold < LEVELS:
        return None
    n = int(np.prod(shape, dtype=np.int64))
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))  # advances torch's CPU generator once
    raw = np.random.PCG64(seed).random_raw((n + 3) // 4)  # 4 x 16 random bits per 64-bit draw
    bits = raw.view(np.int16)[:n]  # uniform over -32768..32767
    # Compared by numpy: torch's int16 comparison with a scalar was 6x slower (0.14 against 0.02 ms for
    # 600k values), and the bool tensor it allocated took page faults every time on top.
    return torch.from_numpy(bits < threshold - LEVELS // 2).view(shape), LEVELS / threshold


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of ``x`` (on the CPU) with a :func:`keep_mask` mask."""
    drawn = keep_mask(x.shape, p)
    if drawn is None:
        return torch.nn.functional.dropout(x, p, training=True)
    keep, scale = drawn
    return torch.where(keep, x, 0).mul_(scale)


class FastDropout(torch.nn.Dropout):
    """``nn.Dropout`` drawing its CPU masks with :func:`fast_dropout`; otherwise (eval mode, CUDA, in-place,
    small inputs) exactly ``nn.Dropout``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.p == 0.0 or self.inplace or input.device.type != "cpu"
                or input.numel() < MIN_ELEMENTS):
            return super().forward(input)
        return fast_dropout(input, self.p)


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Turn every plain ``nn.Dropout`` of ``model`` with p > 0 into a :class:`FastDropout` (same object, same p;
    no weights change). Returns how many."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Dropout and module.p > 0:
            module.__class__ = FastDropout
            changed += 1
    return changed
