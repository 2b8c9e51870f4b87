"""What lmtune's two training speed paths save, measured on their own (issue 17, target 1).

1. Dropout masks: torch's ``F.dropout`` against ``lmtune.models.dropout.fast_dropout`` on one activation
   (2048 x 576: a batch of 8 x 256 tokens of SmolLM2's width), fp32 and bf16, p 0.05 (LoRA's default).
2. One SmolLM2-135M LoRA training step (forward + backward, bf16 autocast over fp32 weights, lmtune's LoRA
   defaults through peft: rank 8, alpha 16, dropout 0.05, every linear layer but the LM head) on 8 x 256 random
   tokens of which a third carry a loss (as chatterbot's assistant tokens do), three ways:

       plain        torch's dropout masks, the LM head on every position (what the Trainer and TRL do)
       scored       torch's dropout masks, the LM head on the scored positions only (``scored_logits``)
       scored+fast  the same with ``train.fast_dropout`` (lmtune's default on CPU)

   The three alternate; medians of ``--repeats`` steps each. ``plain`` and ``scored`` start from the same torch
   seed, so their dropout masks and losses must agree (printed).
3. torch.profiler's share of ``aten::bernoulli_`` (torch's mask draws) in one ``scored`` step.

    python benchmarks/bench_speed_paths.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lmtune.data.features import IGNORE_INDEX
from lmtune.models.dropout import fast_dropout, use_fast_dropout
from lmtune.models.target_logits import scored_logits

BATCH, LENGTH, HIDDEN = 8, 256, 576
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` in ms, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def masks(repeats: int) -> None:
    """Part 1: one mask draw and its application, torch against fast."""
    print(f"1. dropout of a {BATCH * LENGTH} x {HIDDEN} activation, p 0.05 (median of {repeats})")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(BATCH * LENGTH, HIDDEN, dtype=dtype)
        plain = median_ms(lambda x=x: F.dropout(x, 0.05, training=True), repeats)
        fast = median_ms(lambda x=x: fast_dropout(x, 0.05), repeats)
        print(f"   {dtype!s:15} torch {plain:6.2f} ms   fast {fast:6.2f} ms   {plain / fast:.2f}x")


def steps(repeats: int) -> None:
    """Parts 2 and 3: whole LoRA steps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmtune.models.registry import resolve_model

    def build() -> Any:
        model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32)
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)).train()

    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (BATCH, LENGTH))
    labels = ids.clone()
    labels[torch.rand(BATCH, LENGTH) < 2 / 3] = IGNORE_INDEX
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    torch_model, fast_model = build(), build()
    print(f"2. SmolLM2-135M LoRA step, bf16 autocast, {BATCH} x {LENGTH} tokens, {int(keep.sum())} scored, "
          f"{use_fast_dropout(fast_model)} dropout layers (median of {repeats})")

    def step(model: Any, scored: bool, seed: int | None = None) -> float:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if scored:
                logits = scored_logits(model, keep, lambda: model(input_ids=ids, use_cache=False).logits)
                loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
            else:
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    same = (step(torch_model, False, seed=1), step(torch_model, True, seed=1))
    print(f"   summed loss, same seed: plain {same[0]:.4f}, scored {same[1]:.4f} "
          f"(relative difference {abs(same[0] - same[1]) / same[0]:.1e})")
    variants = {"plain": lambda: step(torch_model, False), "scored": lambda: step(torch_model, True),
                "scored+fast": lambda: step(fast_model, True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"   {name:12} {m:6.2f} s ({min(ts):.2f}-{max(ts):.2f})   {base / m:.2f}x plain")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(torch_model, True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    bernoulli = sum(e.self_cpu_time_total for e in events if e.key == "aten::bernoulli_")
    print(f"3. torch's aten::bernoulli_ (dropout masks) in a 'scored' step: {100 * bernoulli / total:.1f}% of self CPU time")


def main() -> None:
    """Run the three parts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        pass
    shown = " ".join(sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {shown or 'unknown'}")
    masks(max(args.repeats, 20))
    steps(args.repeats)


if __name__ == "__main__":
    main()
