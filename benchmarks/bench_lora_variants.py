"""LoRA variants on one task: the bundled demo (all-MiniLM-L6-v2 on Rotten Tomatoes, lmtune/configs/demo.yaml),
shortened, each variant with the same data, steps, seed and learning rates.

For each variant: test accuracy and loss, trainable parameters, training examples per second (optimizer
steps x batch / training seconds, evaluation excluded) and the whole run's wall time. Results go to a
JSON file and a Markdown table on stdout (BENCHMARKS.md).

    nice .venv/bin/python benchmarks/bench_lora_variants.py --steps 40 --lr 2e-3 --examples 160 --threads 1

With ``--speed-rounds N`` it measures only speed, fairly on a shared machine: every variant's model is
built once in this process, then the rounds alternate the variants, each timing ``--speed-steps``
optimizer steps (the loop's parameter groups and optimizer) on the same real training batches; the
median step time per variant is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

import lmtune
from lmtune.config import load_config
from lmtune.models.methods import build_task_model, count_parameters
from lmtune.tasks import get_task
from lmtune.training.loop import build_optimizer, param_groups
from lmtune.workflows import train as train_workflow

# name -> method settings on top of LoRA r 8, alpha 16 on every linear layer of the encoder
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "lora+ (ratio 16)": {"loraplus_lr_ratio": 16},
    # rank 16 on the attention's query and value, rank 4 elsewhere
    "per-module ranks": {"r": 4, "alpha": 8, "rank_pattern": {r"attention\.self\.(query|value)": 16},
                         "alpha_pattern": {r"attention\.self\.(query|value)": 32}},
}


def demo_config() -> dict[str, Any]:
    """The bundled demo config as a dict."""
    text = resources.files("lmtune").joinpath("configs/demo.yaml").read_text(encoding="utf-8")
    return dict(yaml.safe_load(text))


def variant_config(name: str, settings: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The shortened demo config for one variant."""
    cfg = demo_config()
    cfg["output_dir"] = str(workdir / name.replace(" ", "_").replace("(", "").replace(")", ""))
    cfg["baselines"] = []
    cfg["data"].update({"max_samples": args.examples, "max_length": 64})
    cfg["method"] = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05, **settings}
    cfg["train"].update({"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                         "head_learning_rate": 1e-3, "eval_every": args.steps, "precision": "fp32",
                         "num_threads": args.threads, "log_every": max(1, args.steps // 6)})
    return cfg


def run_variant(name: str, settings: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train one variant and return its figures."""
    cfg = variant_config(name, settings, args, workdir)
    start = time.perf_counter()
    run = lmtune.train(cfg, overwrite=True, show_progress=False)
    wall = time.perf_counter() - start
    m = run.metrics
    s = m["summary"]
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    return {
        "variant": name, "settings": settings,
        "test_accuracy": m["test"]["accuracy"], "test_loss": m["test"]["loss"],
        "start_accuracy": m["starting_point"]["test"]["accuracy"],
        "first_train_loss": losses[0], "last_train_loss": losses[-1],
        "trainable_parameters": s["trainable_parameters"],
        "train_examples_per_second": s["steps"] * args.batch_size / max(s["train_seconds"], 1e-9),
        "train_seconds": s["train_seconds"], "wall_seconds": wall,
    }


def measure_speed(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Median seconds per optimizer step of each variant, the variants alternating round by round."""
    if args.threads:
        torch.set_num_threads(args.threads)
    built: dict[str, tuple[Any, Any, torch.optim.Optimizer, int]] = {}
    batches: list[dict[str, torch.Tensor]] = []
    for name in args.variants:
        cfg = load_config(variant_config(name, VARIANTS[name], args, workdir))
        task = get_task(cfg.task)(cfg)
        path = task.model_path()
        tok = task.load_tokenizer(path)
        data = task.prepare(tok)
        torch.manual_seed(cfg.train.seed)
        model, head = build_task_model(task, path, data, tok)
        model.train()
        if not batches:  # the same real training batches for every variant
            collate = task.collator(tok)
            train = data.splits["train"]
            batches = [collate([train[(i * args.batch_size + j) % len(train)] for j in range(args.batch_size)])
                       for i in range(args.speed_steps)]
        built[name] = (task, model, build_optimizer(param_groups(model, cfg, head), cfg.train),
                       count_parameters(model)[0])
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.speed_rounds):
        for name, (task, model, optimizer, _) in built.items():
            start = time.perf_counter()
            for batch in batches:
                task.loss(model, batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times[name].append((time.perf_counter() - start) / len(batches))
    return [{"variant": name, "trainable_parameters": built[name][3], "step_seconds": statistics.median(t),
             "examples_per_second": args.batch_size / statistics.median(t), "all_step_seconds": t}
            for name, t in times.items()]


def main() -> None:
    """Run every chosen variant in turn; print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the adapters (all variants)")
    parser.add_argument("--examples", type=int, default=2000, help="data.max_samples (80%% train, 10%% val, 10%% test)")
    parser.add_argument("--threads", type=int, default=None, help="train.num_threads")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run folders here")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--speed-rounds", type=int, default=0, help="measure speed only, in this many rounds")
    parser.add_argument("--speed-steps", type=int, default=5, help="with --speed-rounds: steps per variant per round")
    args = parser.parse_args()
    if args.speed_rounds:
        with tempfile.TemporaryDirectory() as tmp:
            speed = measure_speed(args, Path(tmp))
        if args.out:
            args.out.write_text(json.dumps(speed, indent=2), encoding="utf-8")
        print("| variant | trainable params | s / step (median) | train examples/s |\n|---|---|---|---|")
        for r in speed:
            print(f"| {r['variant']} | {r['trainable_parameters']:,} | {r['step_seconds']:.3f} | "
                  f"{r['examples_per_second']:.1f} |")
        return
    # The run's report (token attributions by integrated gradients) is not measured and costs a minute per run.
    train_workflow.write_report = lambda *a, **k: None  # type: ignore[assignment]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for name in args.variants:
            results.append(run_variant(name, VARIANTS[name], args, workdir))
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("\n| variant | test accuracy | test loss | train loss first -> last | trainable params | "
          "train examples/s | run wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['test_accuracy']:.3f} | {r['test_loss']:.3f} | {r['first_train_loss']:.3f} -> "
              f"{r['last_train_loss']:.3f} | {r['trainable_parameters']:,} | {r['train_examples_per_second']:.1f} | "
              f"{r['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main()
