"""Checkpoint size and save/load time of a LoRA run: every weight (Accelerate's plain ``save_state``) against
lmtune's checkpoints, which leave the frozen weights out (``lmtune.training.checkpoint.FrozenWeights``).

The model is a bundled one (SmolLM2-135M by default) under lmtune's default LoRA (``method: lora``: r 8,
all-linear), prepared by Accelerate with AdamW after one optimizer step, so the optimizer state is there as in a
real checkpoint. Both ways save the same objects (model, optimizer, RNG states) in the same process, each
``--repeats`` times into a fresh folder; the table gives the median seconds and the folder's size. Loading is
``accelerator.load_state`` against ``FrozenWeights.load`` (which also hashes the rebuilt frozen weights once per
process and checks them against the checkpoint's record: the first load pays for it, later ones reuse it).

    python benchmarks/bench_checkpoint.py --threads 2 --out checkpoint.json
    python benchmarks/bench_checkpoint.py --model gemma3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="a bundled name or a model folder")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from lmtune.config.schema import MethodConfig
    from lmtune.models.methods import apply_method
    from lmtune.models.registry import resolve_model
    from lmtune.training.checkpoint import FrozenWeights

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = apply_method(model, MethodConfig(name="lora"), set(), peft_task_type="CAUSAL_LM")
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    optimizer.zero_grad()

    results: dict[str, Any] = {
        "model": args.model, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        def save_many(tag: str) -> tuple[list[float], int, Path]:
            times, last = [], root
            for i in range(args.repeats):
                last = root / f"{tag}-{i}"
                times.append(_timed(lambda path=last: accelerator.save_state(str(path), safe_serialization=True)))
            return times, _size(last), last

        full_times, full_size, full_dir = save_many("every-weight")
        full_load = [_timed(lambda: accelerator.load_state(str(full_dir))) for _ in range(args.repeats)]
        frozen = FrozenWeights(accelerator, model)  # from here on save_state leaves the frozen weights out
        lean_times, lean_size, lean_dir = save_many("frozen-left-out")
        lean_load = [_timed(lambda: frozen.load(lean_dir)) for _ in range(args.repeats)]
        results["every_weight"] = {"bytes": full_size, "save_s": full_times, "load_s": full_load}
        results["frozen_left_out"] = {"bytes": lean_size, "save_s": lean_times, "load_s": lean_load}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.model}: {results['parameters']:,} parameters, {results['trainable']:,} trainable; "
          f"{results['torch_threads']} threads")
    print(f"{'checkpoint':<18}{'MB':>10}{'save s (median)':>18}{'load s (median)':>18}")
    for key in ("every_weight", "frozen_left_out"):
        r = results[key]
        print(f"{key:<18}{r['bytes'] / 1e6:>10.1f}{statistics.median(r['save_s']):>18.3f}"
              f"{statistics.median(r['load_s']):>18.3f}")
    print(f"size ratio {results['every_weight']['bytes'] / results['frozen_left_out']['bytes']:.1f}x, save time ratio "
          f"{statistics.median(full_times) / statistics.median(lean_times):.1f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
