"""How a CPU training process's resident memory grows with the number of batch shapes it has seen.

A MiniLM classification loop (bf16 autocast, fused AdamW, batch 32) over random padded lengths; the resident set
is printed every ``--every`` steps. Run it once with oneDNN's default primitive cache and once with a small one
to see how much of the growth is that cache (one primitive per matmul shape, up to 1,024 by default):

    python benchmarks/bench_rss_growth.py
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=16 python benchmarks/bench_rss_growth.py
    MALLOC_ARENA_MAX=1 python benchmarks/bench_rss_growth.py        # glibc's per-thread arenas instead

Results in BENCHMARKS.md ("What an lmtune process loads", "A longer run").
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from lmtune.models.registry import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_classification import status_kib  # a sibling script, as bench_serve imports bench_sft


def minilm_step(batch: int) -> Callable[[int], None]:
    """A MiniLM classification training step (bf16 autocast, fused AdamW) on random ids of a given padded length;
    torch's threads and seed are the caller's."""
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(length: int) -> None:
        ids = torch.randint(1000, 20000, (batch, length))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, 2, (batch,))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def rss_mib() -> int:
    """VmRSS of this process in MiB."""
    return status_kib("VmRSS") // 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--every", type=int, default=20, help="print the resident set every N steps")
    p.add_argument("--min-length", type=int, default=6)
    p.add_argument("--max-length", type=int, default=69)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    train_step = minilm_step(32)
    seen: set[int] = set()
    marks = []
    for step in range(args.steps):
        length = rng.randint(args.min_length, args.max_length)
        seen.add(length)
        train_step(length)
        if step % args.every == 0:
            marks.append(rss_mib())
    settings = {k: os.environ.get(k, "default") for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MALLOC_ARENA_MAX")}
    print(f"{settings}: RSS (MiB) every {args.every} steps {marks}, at the end {rss_mib()}; "
          f"{len(seen)} distinct lengths")


if __name__ == "__main__":
    main()
