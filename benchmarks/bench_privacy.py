"""Accuracy against epsilon, and what DP-SGD costs in speed: the bundled demo (all-MiniLM-L6-v2 on Rotten
Tomatoes, ``lmtune/configs/demo.yaml``) trained without DP and with ``train.privacy.epsilon`` 1, 3 and 8.

Every run has the same data, model, method, steps and seed; only ``train.privacy`` differs (DP runs train in
fp32 with Poisson-sampled batches, so the no-DP run is forced to fp32 too, with random batches, to compare like
with like). The table gives test accuracy, the epsilon spent (at the delta shown), the noise multiplier, and the
training loop's steps per second and examples per second (the expected batch for DP runs). A full demo epoch
takes ~6 min on 2 cores without DP; ``--max-samples`` and ``--epochs`` make a documented subset.

    python benchmarks/bench_privacy.py --max-samples 3000 --epochs 1 --threads 2 --out privacy.json
    python benchmarks/bench_privacy.py --method lora --epsilons 1 3 8

``--audit`` measures what DP buys a decoder instead: SmolLM2-135M with LoRA continues pre-training on Jane
Austen paragraphs (``examples/causal_lm_janeausten_smollm2.yaml``, one paragraph per row: ``data.packing:
false``) with canaries inserted once and 16 times (``evaluate.memorisation``), without DP and per epsilon; the
table gives the canaries' exposure and the verbatim extraction rate before and after training, beside the
held-out perplexity.

    python benchmarks/bench_privacy.py --audit --max-samples 2000 --epochs 1 --batch-size 32 --epsilons 8 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="DP budgets (plus a no-DP run)")
    p.add_argument("--max-samples", type=int, default=None, help="data.max_samples (a subset of the demo data)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--method", default="full", help="method.name: full (the demo's), freeze or lora")
    p.add_argument("--head-learning-rate", type=float, default=None,
                   help="train.head_learning_rate (the new head's; default: the demo's 1e-3)")
    p.add_argument("--learning-rate", type=float, default=None, help="default: the demo's")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="train.privacy.max_grad_norm")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--audit", action="store_true",
                   help="SmolLM2-135M LoRA on Jane Austen with canaries: exposure and extraction against epsilon")
    return p.parse_args(argv)


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.audit:
        return audit(args)
    import lmtune
    from lmtune.config import load_config

    results = []
    work = Path(tempfile.mkdtemp(prefix="bench-privacy-"))
    try:
        for eps in [None, *args.epsilons]:
            overrides: dict[str, Any] = {
                "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.precision": "fp32",
                "train.eval_every": 10**6, "train.log_every": 10, "method.name": args.method,
                "output_dir": str(work / f"eps-{eps}"), "baselines": [],
            }
            if args.max_samples:
                overrides["data.max_samples"] = args.max_samples
            if args.learning_rate:
                overrides["train.learning_rate"] = args.learning_rate
            if args.head_learning_rate:
                overrides["train.head_learning_rate"] = args.head_learning_rate
            if eps is None:
                overrides["train.group_by_length"] = False  # random batches, as the DP runs draw them
            else:
                overrides["train.privacy"] = {"epsilon": eps, "max_grad_norm": args.max_grad_norm}
            cfg = load_config(ROOT / "lmtune" / "configs" / "demo.yaml", overrides)
            t0 = time.perf_counter()
            run = lmtune.train(cfg, show_progress=False)
            wall = time.perf_counter() - t0
            s = run.metrics["summary"]
            p = s.get("privacy") or {}
            row = {
                "epsilon_target": eps, "test_accuracy": run.metrics["test"]["accuracy"],
                "test_macro_f1": run.metrics["test"].get("macro_f1"),
                "epsilon_spent": p.get("epsilon"), "delta": p.get("delta"), "noise_multiplier": p.get("noise_multiplier"),
                "sample_rate": p.get("sample_rate"), "steps": s["steps"], "train_seconds": s["train_seconds"],
                "steps_per_second": s["steps"] / s["train_seconds"],
                "examples_per_second": s["steps"] * args.batch_size / s["train_seconds"],
                "train_examples": run.metrics.get("summary", {}).get("privacy", {}).get("train_examples"),
                "wall_seconds": wall,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results[0]["steps_per_second"]
    print(f"\nmethod {args.method}, batch {args.batch_size}, epochs {args.epochs}, max_samples {args.max_samples}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f" ({', '.join(_cpu_flags())}); OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("| epsilon (target) | test accuracy | epsilon spent | delta | noise multiplier | steps | steps/s | "
          "speed vs no DP |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        target = "none" if r["epsilon_target"] is None else f"{r['epsilon_target']:g}"
        spent = "–" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        delta = "–" if r["delta"] is None else f"{r['delta']:.1e}"
        noise = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        print(f"| {target} | {r['test_accuracy']:.3f} | {spent} | {delta} | {noise} | {r['steps']} | "
              f"{r['steps_per_second']:.2f} | {r['steps_per_second'] / base:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


AUDIT = {"canaries": 3, "canary_repeats": [1, 16], "canary_digits": 3, "extraction_prompts": 100,
         "extraction_prefix_tokens": 16, "extraction_suffix_tokens": 16}


def _exposure(m: dict[str, Any]) -> dict[int, float]:
    return {g["repeats"]: g["mean_exposure"] for g in m["exposure"]["by_repeats"]}


def audit(args: argparse.Namespace) -> list[dict[str, Any]]:
    """What DP buys a decoder: canary exposure and extraction, and what it costs: held-out perplexity."""
    import torch

    import lmtune
    from lmtune.config import load_config

    results = []
    work = Path(tempfile.mkdtemp(prefix="bench-privacy-audit-"))
    try:
        for eps in [None, *args.epsilons]:
            overrides: dict[str, Any] = {
                "data.max_length": 64, "data.packing": False, "data.validation_size": 0.01, "data.test_size": 0.01,
                "train.max_steps": None, "train.epochs": args.epochs, "train.batch_size": args.batch_size,
                "train.precision": "fp32", "train.eval_every": 10**6, "train.log_every": 10,
                "train.learning_rate": args.learning_rate or 1e-3, "evaluate.memorisation": AUDIT,
                "output_dir": str(work / f"eps-{eps}"),
            }
            if args.max_samples:
                overrides["data.max_samples"] = args.max_samples
            if eps is not None:
                overrides["train.privacy"] = {"epsilon": eps, "max_grad_norm": args.max_grad_norm}
            cfg = load_config(ROOT / "examples" / "causal_lm_janeausten_smollm2.yaml", overrides)
            t0 = time.perf_counter()
            run = lmtune.train(cfg, show_progress=False)
            wall = time.perf_counter() - t0
            s, m = run.metrics["summary"], run.metrics["memorisation"]
            p = s.get("privacy") or {}
            row = {
                "epsilon_target": eps, "epsilon_spent": p.get("epsilon"), "noise_multiplier": p.get("noise_multiplier"),
                "delta": p.get("delta"), "steps": s["steps"], "train_examples": p.get("train_examples"),
                "test_perplexity": run.metrics["test"]["perplexity"],
                "start_perplexity": (run.metrics.get("starting_point") or {}).get("test", {}).get("perplexity"),
                "exposure_before": _exposure(m["starting_point"]), "exposure_after": _exposure(m["tuned"]),
                "space_bits": m["tuned"]["exposure"]["space_bits"],
                "extraction_before": {k: m["starting_point"]["extraction"][k]["rate"] for k in ("train", "heldout")},
                "extraction_after": {k: m["tuned"]["extraction"][k]["rate"] for k in ("train", "heldout")},
                "steps_per_second": s["steps"] / s["train_seconds"], "wall_seconds": wall,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nSmolLM2-135M LoRA, batch {args.batch_size}, epochs {args.epochs}, max_samples {args.max_samples}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads ({', '.join(_cpu_flags())})")
    repeats = sorted(results[0]["exposure_after"])
    print("| epsilon (target) | spent | noise multiplier | test perplexity | "
          + " | ".join(f"exposure, {r}x canary (bits)" for r in repeats)
          + " | extraction train / held-out | steps/s |")
    print("|---|---|---|---|" + "---|" * len(repeats) + "---|---|")
    for r in results:
        target = "none" if r["epsilon_target"] is None else f"{r['epsilon_target']:g}"
        spent = "–" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        noise = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        cells = " | ".join(f"{r['exposure_before'][k]:.1f} -> {r['exposure_after'][k]:.1f}" for k in repeats)
        x = r["extraction_after"]
        print(f"| {target} | {spent} | {noise} | {r['start_perplexity'] or float('nan'):.1f} -> "
              f"{r['test_perplexity']:.1f} | {cells} | {x['train']:.2f} / {x['heldout']:.2f} | "
              f"{r['steps_per_second']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
