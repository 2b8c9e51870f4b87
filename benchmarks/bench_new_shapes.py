"""What a training step pays the first time it meets a batch shape (bf16 on the CPU: oneDNN builds its primitives).

A MiniLM classification step (bf16 autocast, fused AdamW) is run twice at each of ``--lengths`` padded lengths
never seen before, in a shuffled order; the first step at a length builds oneDNN's matmul primitives for that
shape, the second finds them in its cache. The median difference is the price of a new shape, which is what
bucketing batch lengths to a few shapes (padding each batch up to a multiple of N) could save, against the
padded tokens it adds:

    python benchmarks/bench_new_shapes.py                      # batch 32, lengths 10-57 (the MiniLM benchmark's)
    python benchmarks/bench_new_shapes.py --batch 16 --min-length 22

Results in BENCHMARKS.md ("Two more levers measured").
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_rss_growth import minilm_step  # a sibling script, as bench_rss_growth imports bench_classification


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-length", type=int, default=10)
    p.add_argument("--lengths", type=int, default=30, help="new lengths measured (each stepped twice)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_step = minilm_step(args.batch)

    def step(length: int) -> float:
        start = time.perf_counter()
        train_step(length)
        return time.perf_counter() - start

    warm = args.min_length - 2
    for length in (warm, warm + 1, warm, warm + 1):  # first-call costs that are not per shape
        step(length)
    lengths = list(range(args.min_length, args.min_length + args.lengths))
    random.Random(0).shuffle(lengths)
    new, again = [], []
    for length in lengths:
        new.append(step(length))
        again.append(step(length))
    extra = statistics.median(n - a for n, a in zip(new, again, strict=True)) * 1e3
    print(f"batch {args.batch}, {len(lengths)} new lengths {min(lengths)}-{max(lengths)}: step at a new length "
          f"{statistics.median(new) * 1e3:.1f} ms, the same length again {statistics.median(again) * 1e3:.1f} ms "
          f"(medians); a new shape costs {extra:.1f} ms (median of the pairs' differences)")


if __name__ == "__main__":
    main()
