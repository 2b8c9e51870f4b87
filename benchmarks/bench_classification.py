"""Side-by-side training throughput: lmtune vs the Hugging Face Trainer on sequence classification.

Every variant trains the same model (bundled all-MiniLM-L6-v2) on the same sentences (bundled Rotten
Tomatoes: a fixed seeded shuffle, deduplicated, first ``--examples``) for the same number of optimizer
steps, batch 32, max_length 128, learning rate 5e-5, seed 42:

    lmtune            ``lmtune.workflow.train`` with its defaults (precision auto, length grouping)
    trainer_default   Trainer, inputs padded to max_length 128, random order, fp32
    trainer_dynamic   Trainer, DataCollatorWithPadding (pad to the longest in the batch), fp32
    trainer_grouped   Trainer, dynamic padding + train_sampling_strategy="group_by_length", fp32
    trainer_bf16      Trainer, dynamic padding + group_by_length + bf16 autocast (the issue's "best")

and, on request only (``--variants``), diagnostics:

    trainer_same_batches  Trainer, dynamic padding, fp32, fed exactly lmtune's batches in lmtune's order
                          (lmtune's LengthGroupedBatchSampler): isolates the training loop from the
                          sampler, since over a few dozen steps the two samplers pick batches of
                          different average length (HF walks each mega-batch longest first)
    trainer_bf16_same_batches  the same in bf16 autocast: lmtune's loss curve step by step beside the
                          best Trainer's (with ``--no-dropout`` the two differ only by the code)
    lmtune_torch_dropout  lmtune with ``train.fast_dropout: false`` (torch's own dropout masks): what
                          fast dropout gains
    lmtune_full_last_layer  lmtune with the last encoder layer on every position (not on position 0
                          only, ``lmtune.models.first_token`` turned off): what that path gains
    lmtune_plain_attention  lmtune with the encoder's own self-attention blocks
                          (``lmtune.models.encoder_attention`` turned off: three projection matmuls,
                          torch's masks for the attention probabilities' dropout): what that path gains
    lmtune_malloc_defaults  lmtune with glibc malloc's default thresholds
                          (``lmtune.training.host_memory`` turned off: big tensors mapped and unmapped
                          every step): what keeping freed pages gains
    lmtune_bound_threads  lmtune with its OpenMP threads pinned one per core (``OMP_PROC_BIND=close``,
                          ``OMP_PLACES=cores``): what thread affinity gains

Every run records its training loss at every step (lmtune: the task's loss; the Trainer: ``compute_loss``);
the summary gives each variant's median curve and its gap to lmtune's, beside the gap that dropout's draws
alone make (``lmtune_torch_dropout``: lmtune with other masks), and ``--plot`` draws them. ``--no-dropout``
sets every dropout probability to 0 in every variant, so runs on the same batches should agree up to bf16
rounding.

Each variant runs in its own subprocess (peak RSS per variant from ``os.wait4``), variants alternate
across repeats (v1..v5, v1..v5, ...), and the first ``--warmup`` optimizer steps are excluded from timing.
Timing and token counts are taken the same way for every variant, outside the code under test:
a timestamp after each optimizer step (Trainer: ``on_step_end``; lmtune: after ``optimizer.zero_grad``,
the last call of its step) and the real tokens of each trained batch (sum of ``attention_mask``; Trainer:
in the collator, lmtune: where the task computes the loss). lmtune's own figures (``metrics.json``
summary, ``metrics.jsonl`` windows) are reported beside them as a cross-check.

    python benchmarks/bench_classification.py --steps 60 --repeats 3 --examples 4000 --out results.json
    python benchmarks/bench_classification.py --quick --threads 1   # a ~3.5 minute check that every variant runs
    python benchmarks/bench_classification.py --profile        # one lmtune run under cProfile + torch.profiler
    python benchmarks/bench_classification.py --variants lmtune trainer_bf16_same_batches lmtune_torch_dropout \
        --steps 40 --repeats 1 --plot curves.png                 # loss curves, lmtune beside the best Trainer
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("lmtune", "trainer_default", "trainer_dynamic", "trainer_grouped", "trainer_bf16")
DIAGNOSTIC_VARIANTS = ("trainer_same_batches", "trainer_bf16_same_batches", "lmtune_torch_dropout",
                       "lmtune_full_last_layer", "lmtune_plain_attention", "lmtune_malloc_defaults",
                       "lmtune_bound_threads")
# Environment a variant's child runs with on top of the parent's: OpenMP threads pinned, one per core.
VARIANT_ENV = {"lmtune_bound_threads": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}}
SAME_BATCHES = ("trainer_same_batches", "trainer_bf16_same_batches")  # the Trainer fed lmtune's batches
BF16_TRAINERS = ("trainer_bf16", "trainer_bf16_same_batches")
TRAINER_VARIANTS = (*VARIANTS[1:], *DIAGNOSTIC_VARIANTS)  # compared with lmtune
SEED = 42
BATCH_SIZE = 32
MAX_LENGTH = 128
LEARNING_RATE = 5e-5
WEIGHT_DECAY = 0.01  # lmtune's default; the Trainer gets the same (its default is 0)
WARMUP_RATIO = 0.06  # lmtune's default linear warm-up of the learning rate, given to the Trainer as steps
EVAL_EXAMPLES = 64  # validation and test files for lmtune: small, so its end-of-run evaluation is cheap


# ------------------------------------------------------------------------------------------ data
def write_subsets(workdir: Path, examples: int) -> dict[str, Any]:
    """Write train/validation/test CSVs (text,label) from a seeded shuffle of the bundled data.

    Rows with empty text are dropped and texts deduplicated *before* taking the subsets, so lmtune's
    own deduplication removes nothing and every variant sees exactly the same training sentences.
    """
    from lmtune.data.bundled import resolve_bundled_data

    with resolve_bundled_data("rotten_tomatoes").open(encoding="utf-8", newline="") as f:
        rows = [(r["text"], r["label"]) for r in csv.DictReader(f) if r["text"].strip()]
    random.Random(SEED).shuffle(rows)
    seen: set[str] = set()
    unique = []
    for text, label in rows:
        if text not in seen:
            seen.add(text)
            unique.append((text, label))
    need = examples + 2 * EVAL_EXAMPLES
    if len(unique) < need:
        raise SystemExit(f"--examples {examples} is too many: the data has {len(unique)} unique rows")
    splits = {
        "train": unique[:examples],
        "validation": unique[examples : examples + EVAL_EXAMPLES],
        "test": unique[examples + EVAL_EXAMPLES : need],
    }
    for name, subset in splits.items():
        with (workdir / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(subset)
    return {"train_examples": examples, "labels": sorted({lab for _, lab in splits["train"]})}


def read_train(workdir: Path) -> tuple[list[str], list[str]]:
    """Texts and labels of the training subset."""
    with (workdir / "train.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


# ------------------------------------------------------------------------------------------ children
def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (KiB): ``VmHWM``, the peak resident set up to now,
    or ``VmRSS``, the current one."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def steady_state(times: list[float], tokens: list[int], warmup: int, start: float) -> dict[str, float]:
    """Real tokens/s after the first ``warmup`` steps, and over the whole run from ``start``."""
    steps = len(times)
    out = {
        "steps_timed": steps - warmup,
        "timed_seconds": times[-1] - times[warmup - 1] if warmup else times[-1] - start,
        "whole_seconds": times[-1] - start,
    }
    out["tokens_per_second"] = sum(tokens[warmup:steps]) / max(out["timed_seconds"], 1e-9)
    out["whole_tokens_per_second"] = sum(tokens[:steps]) / max(out["whole_seconds"], 1e-9)
    out["step_seconds"] = [b - a for a, b in zip([start, *times[:-1]], times, strict=True)]
    out["step_tokens"] = tokens[:steps]
    return out


def no_dropout(model: Any) -> int:
    """Every dropout layer of ``model`` at p = 0 (the attention probabilities' too: BERT's attention reads its
    ``dropout.p``); returns how many."""
    import torch

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for layer in layers:
        layer.p = 0.0
    return len(layers)


def child_lmtune(workdir: Path, steps: int, warmup: int, profile: bool, fast_dropout: bool = True,
                 first_token: bool = True, patched_attention: bool = True,
                 retain_memory: bool = True, dropout: bool = True) -> dict[str, Any]:
    """One lmtune run through ``lmtune.workflow.train`` (precision auto, defaults); independent timing.
    ``fast_dropout=False`` (variant ``lmtune_torch_dropout``): torch's own dropout masks, to measure what
    ``train.fast_dropout`` gains. ``first_token=False`` (``lmtune_full_last_layer``): the last encoder layer
    on every position. ``patched_attention=False`` (``lmtune_plain_attention``): the encoder's own attention
    blocks. ``retain_memory=False`` (``lmtune_malloc_defaults``): glibc's own malloc thresholds."""
    import importlib

    if not first_token:
        from lmtune.models import first_token as first_token_module

        first_token_module.first_token_last_layer = lambda model: False
    if not patched_attention:
        from lmtune.models import encoder_attention

        encoder_attention.patch_attention = lambda model: 0
    if not retain_memory:
        from lmtune.training import host_memory

        host_memory.retain_freed_memory = lambda: None

    import torch

    from lmtune.tasks.classification.task import ClassificationTask
    from lmtune.workflows.train import train

    try:  # the package was renamed lmtune.train -> lmtune.training; accept both
        loop_mod = importlib.import_module("lmtune.training.loop")
    except ModuleNotFoundError:
        loop_mod = importlib.import_module("lmtune.train.loop")
    times: list[float] = []
    tokens: list[int] = []
    padded: list[int] = []
    losses: list[Any] = []
    marks: dict[str, Any] = {}
    prof: dict[str, Any] = {}

    original_loss = ClassificationTask.loss
    original_fit = loop_mod.TrainingLoop.fit
    original_setup = loop_mod.TrainingLoop.setup

    def loss(self: Any, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]  # (B, T)
        tokens.append(int(mask.sum()))
        padded.append(mask.numel())
        out = original_loss(self, model, batch)
        losses.append(out.detach() / len(batch["labels"]))  # the task's loss is summed; read after the run
        return out

    def setup(self: Any) -> None:
        original_setup(self)
        if not dropout:
            no_dropout(self.model)
        zero_grad = self.optimizer.zero_grad

        def timed_zero_grad(*args: Any, **kwargs: Any) -> Any:
            # zero_grad is the last call of lmtune's optimizer step: the same point as Trainer's on_step_end.
            out = zero_grad(*args, **kwargs)
            times.append(time.perf_counter())
            if len(times) == warmup and profile:
                prof["torch"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof["torch"].__enter__()
            if len(times) == steps:
                marks["train_phase_peak_rss_kib"] = status_kib("VmHWM")
                if "torch" in prof:
                    prof["torch"].__exit__(None, None, None)
            return out

        self.optimizer.zero_grad = timed_zero_grad

    def fit(self: Any, progress: Any = None) -> Any:
        marks["fit_start"] = time.perf_counter()
        marks["train_start_rss_kib"] = status_kib("VmRSS")
        return original_fit(self, progress)

    ClassificationTask.loss = loss  # type: ignore[method-assign]
    loop_mod.TrainingLoop.setup = setup  # type: ignore[method-assign]
    loop_mod.TrainingLoop.fit = fit  # type: ignore[method-assign]

    run_dir = Path(tempfile.mkdtemp(prefix="lmtune-run-", dir=workdir))
    config = {
        "task": "classification",
        "model": "minilm",
        "data": {
            "train": str(workdir / "train.csv"),
            "validation": str(workdir / "validation.csv"),
            "test": str(workdir / "test.csv"),
            "max_length": MAX_LENGTH,
        },
        "train": {
            "max_steps": steps,
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "head_learning_rate": LEARNING_RATE,  # one rate for every weight, as the Trainer side trains
            "seed": SEED,
            "eval_every": 10**9,  # evaluate only at the end (outside lmtune's train_seconds anyway)
            "log_every": warmup,  # metrics.jsonl windows: the first one is the warm-up
            **({} if fast_dropout else {"fast_dropout": False}),  # older lmtune versions lack the setting
        },
        "baselines": [],
        "output_dir": str(run_dir / "run"),
    }
    wall = time.perf_counter()
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        train(config, show_progress=False)
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(30)
    else:
        train(config, show_progress=False)
    wall = time.perf_counter() - wall
    if "torch" in prof:
        print(prof["torch"].key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)

    out_dir = run_dir / "run"
    summary = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))["summary"]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    # lmtune's own steady state: its metrics.jsonl windows after the first (warm-up) one. A window's
    # seconds are its tokens (counted here, same batches) over its logged tokens_per_second.
    own_tokens, own_seconds, previous = 0, 0.0, 0
    for i, r in enumerate(train_rows):
        window_tokens = sum(tokens[previous : r["step"]])
        if i > 0:
            own_tokens += window_tokens
            own_seconds += window_tokens / r["tokens_per_second"]
        previous = r["step"]
    result = {
        "steps": len(times),
        "real_tokens": sum(tokens[: len(times)]),
        "padded_tokens": sum(padded[: len(times)]),
        "step_padded": padded[: len(times)],
        **steady_state(times, tokens, warmup, marks["fit_start"]),
        "final_loss": train_rows[-1]["loss"],
        "step_losses": [float(x) for x in losses[: len(times)]],  # training calls come first (then evaluation)
        "train_phase_peak_rss_kib": marks.get("train_phase_peak_rss_kib"),
        "train_start_rss_kib": marks.get("train_start_rss_kib"),
        "child_wall_seconds": wall,
        "precision": summary["precision"],
        "threads": torch.get_num_threads(),
        "lmtune_summary": {k: summary[k] for k in ("train_seconds", "tokens_seen", "train_tokens_per_second")},
        "lmtune_steady_tokens_per_second": own_tokens / own_seconds if own_seconds else None,
    }
    return result


def child_trainer(workdir: Path, variant: str, steps: int, warmup: int, dropout: bool = True) -> dict[str, Any]:
    """One Hugging Face Trainer run in the configuration ``variant`` names."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    from lmtune.models.registry import resolve_model

    hf_logging.set_verbosity_error()
    model_path = resolve_model("minilm")
    texts, labels = read_train(workdir)
    names = sorted(set(labels))  # the order lmtune uses (sorted label strings)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_to_max = variant == "trainer_default"
    data = Dataset.from_dict({"text": texts, "label": [names.index(x) for x in labels]})
    data = data.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH,
                            padding="max_length" if pad_to_max else False),
        batched=True,
        remove_columns=["text"],
    )
    set_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, dtype=torch.float32,
    )
    if not dropout:
        no_dropout(model)

    tokens: list[int] = []
    padded: list[int] = []
    base_collator = DataCollatorWithPadding(tokenizer)

    def collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = base_collator(features)
        mask = batch["attention_mask"]  # (B, T); batches are collated in training order
        tokens.append(int(mask.sum()))
        padded.append(mask.numel())
        return batch

    times: list[float] = []
    losses: list[float] = []
    step_losses: list[Any] = []
    marks: dict[str, Any] = {}

    class Timing(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks["start"] = time.perf_counter()
            marks["train_start_rss_kib"] = status_kib("VmRSS")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter())
            if state.global_step == steps:
                marks["train_phase_peak_rss_kib"] = status_kib("VmHWM")

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class RecordingTrainer(Trainer):
        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            out = super().compute_loss(*args, **kwargs)
            step_losses.append((out[0] if isinstance(out, tuple) else out).detach())  # read after the run
            return out

    grouped = variant in ("trainer_grouped", "trainer_bf16")
    trainer_class: type[Trainer] = RecordingTrainer
    if variant in SAME_BATCHES:
        from torch.utils.data import Sampler

        from lmtune.data.features import LengthGroupedBatchSampler

        # lmtune's batches (same lengths, seed, epoch 0), flattened: the Trainer cuts them back into
        # the same batches of BATCH_SIZE. lmtune reads the same CSV rows in the same order.
        batches = LengthGroupedBatchSampler([len(x) for x in data["input_ids"]], BATCH_SIZE, seed=SEED).batches()
        order = [i for batch in batches for i in batch]

        class FixedOrder(Sampler[int]):
            def __iter__(self) -> Any:
                return iter(order)

            def __len__(self) -> int:
                return len(order)

        class SameBatchesTrainer(RecordingTrainer):
            def _get_train_sampler(self, train_dataset: Any = None) -> Any:
                return FixedOrder()

        trainer_class = SameBatchesTrainer
    args = TrainingArguments(
        output_dir=str(Path(tempfile.mkdtemp(prefix="trainer-", dir=workdir))),
        max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        warmup_steps=round(WARMUP_RATIO * steps),
        lr_scheduler_type="linear",
        seed=SEED,
        bf16=variant in BF16_TRAINERS,
        train_sampling_strategy="group_by_length" if grouped else "random",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=warmup,
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=data, data_collator=collator,
                      processing_class=tokenizer, callbacks=[Timing()])
    wall = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - wall
    return {
        "steps": len(times),
        "real_tokens": sum(tokens[: len(times)]),
        "padded_tokens": sum(padded[: len(times)]),
        "step_padded": padded[: len(times)],
        **steady_state(times, tokens, warmup, marks["start"]),
        "final_loss": losses[-1] if losses else None,
        "step_losses": [float(x) for x in step_losses[: len(times)]],
        "train_phase_peak_rss_kib": marks.get("train_phase_peak_rss_kib"),
        "train_start_rss_kib": marks.get("train_start_rss_kib"),
        "trainer_train_seconds": wall,
        "precision": "bf16" if args.bf16 else "fp32",
        "optimizer": str(args.optim),
        "threads": torch.get_num_threads(),
    }


def child_peak() -> dict[str, Any]:
    """Matmul peak of this CPU (1024x1024, 2 threads) in fp32 and bf16, and MiniLM's nn.Linear weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lmtune.models.registry import resolve_model

    n = 1024
    flop = 2 * n**3

    def gflops(dtype: torch.dtype, reps: int, rounds: int) -> dict[str, float]:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up: oneDNN picks its kernel on first use
        rates = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            rates.append(flop * reps / (time.perf_counter() - t) / 1e9)
        return {"best": max(rates), "median": statistics.median(rates)}

    fp32 = gflops(torch.float32, 10, 5)
    bf16 = gflops(torch.bfloat16, 1, 3)
    threads = torch.get_num_threads()
    fp32_2 = fp32
    if threads != 2:  # the reference figures are for 2 threads: measure those too
        torch.set_num_threads(2)
        fp32_2 = gflops(torch.float32, 10, 5)
        torch.set_num_threads(threads)
    config = AutoConfig.from_pretrained(resolve_model("minilm"), num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    return {"fp32_gflops": fp32, "bf16_gflops": bf16, "fp32_gflops_2_threads": fp32_2, "linear_weights": linear,
            "total_params": total, "threads": threads}


def run_child(argv: list[str], workdir: Path, threads: int | None,
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run this script as a child with ``argv`` (and ``extra_env``); returns its result plus peak RSS (KiB)
    and wall time."""
    result_path = Path(tempfile.mkstemp(prefix="result-", suffix=".json", dir=workdir)[1])
    log_path = result_path.with_suffix(".log")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           **(extra_env or {})}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op pool; the default is one thread per core
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", *argv, "--result", str(result_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"child {argv} failed with exit code {code}; log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["peak_rss_kib"] = usage.ru_maxrss  # KiB on Linux; this child only (wait4)
    result["minor_page_faults"] = usage.ru_minflt  # the allocator's cost shows here (whole process)
    result["process_wall_seconds"] = wall
    result["log"] = str(log_path)
    return result


# ------------------------------------------------------------------------------------------ report
def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]], peaks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-variant medians, lmtune/Trainer ratios (of medians and of adjacent pairs) and MFU."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r)
    variants: dict[str, Any] = {}
    for name, rs in by_variant.items():
        variants[name] = {
            "repeats": len(rs),
            "steps": rs[0]["steps"],
            "steps_timed": rs[0]["steps_timed"],
            "tokens_per_second": spread([r["tokens_per_second"] for r in rs]),
            "whole_run_tokens_per_second": spread([r["whole_tokens_per_second"] for r in rs]),
            "pad_fraction": statistics.median(1 - r["real_tokens"] / r["padded_tokens"] for r in rs),
            "real_tokens_per_timed_step": statistics.median(
                sum(r["step_tokens"][-r["steps_timed"] :]) / r["steps_timed"] for r in rs),
            "peak_rss_gib": spread([r["peak_rss_kib"] / 2**20 for r in rs]),
            "minor_page_faults": statistics.median(r["minor_page_faults"] for r in rs),
            "train_phase_peak_rss_gib": spread([r["train_phase_peak_rss_kib"] / 2**20 for r in rs]),
            "final_loss": spread([r["final_loss"] for r in rs if r["final_loss"] is not None]),
            "precision": rs[0]["precision"],
        }
        if name == "lmtune":
            variants[name]["lmtune_own_train_tokens_per_second"] = spread(
                [r["lmtune_summary"]["train_tokens_per_second"] for r in rs])
            own = [r["lmtune_steady_tokens_per_second"] for r in rs if r["lmtune_steady_tokens_per_second"]]
            if own:
                variants[name]["lmtune_own_steady_tokens_per_second"] = spread(own)
    ratios: dict[str, Any] = {}
    if "lmtune" in by_variant:
        lm = variants["lmtune"]["tokens_per_second"]["median"]
        lm_by_repeat = {r["repeat"]: r["tokens_per_second"] for r in by_variant["lmtune"]}
        for name in TRAINER_VARIANTS:
            if name not in variants:
                continue
            paired = [lm_by_repeat[r["repeat"]] / r["tokens_per_second"] for r in by_variant[name]
                      if r["repeat"] in lm_by_repeat]
            ratios[name] = {
                "of_medians": lm / variants[name]["tokens_per_second"]["median"],
                "paired_median": statistics.median(paired) if paired else None,
                "paired": paired,
                "rss_ratio": variants["lmtune"]["peak_rss_gib"]["median"] / variants[name]["peak_rss_gib"]["median"],
                "train_phase_rss_ratio": variants["lmtune"]["train_phase_peak_rss_gib"]["median"]
                / variants[name]["train_phase_peak_rss_gib"]["median"],
            }
    peak = {
        "fp32_gflops_2_threads_best": max(p["fp32_gflops_2_threads"]["best"] for p in peaks),
        "threads": peaks[0]["threads"],
        "fp32_gflops_best": max(p["fp32_gflops"]["best"] for p in peaks),
        "fp32_gflops_median": statistics.median(p["fp32_gflops"]["median"] for p in peaks),
        "bf16_gflops_best": max(p["bf16_gflops"]["best"] for p in peaks),
        "bf16_gflops_median": statistics.median(p["bf16_gflops"]["median"] for p in peaks),
        "runs": peaks,
    }
    linear = peaks[0]["linear_weights"]
    mfu: dict[str, Any] = {"linear_weights": linear, "total_params": peaks[0]["total_params"]}
    for name, v in variants.items():
        achieved = 6 * linear * v["tokens_per_second"]["median"] / 1e9
        dtype = "bf16" if v["precision"] == "bf16" else "fp32"
        mfu[name] = {
            "model_gflops": achieved,
            "dtype": dtype,
            f"mfu_vs_{dtype}_best": achieved / peak[f"{dtype}_gflops_best"],
            f"mfu_vs_{dtype}_median": achieved / peak[f"{dtype}_gflops_median"],
            "mfu_vs_bf16_best": achieved / peak["bf16_gflops_best"],
        }
    return {"variants": variants, "ratios": ratios, "matmul_peak": peak, "mfu": mfu}


def print_table(summary: dict[str, Any]) -> None:
    """The results as a plain-text table on stdout."""
    v, ratios = summary["variants"], summary["ratios"]
    print()
    print(f"{'variant':<20} {'steps':>7} {'real tokens/s median (min-max)':>32} {'pad':>5} "
          f"{'peak RSS GiB':>13} {'train RSS':>10} {'final loss':>10} {'lmtune x':>9} {'paired x':>9}")
    for name in VARIANTS + DIAGNOSTIC_VARIANTS:
        if name not in v:
            continue
        s = v[name]
        t = s["tokens_per_second"]
        r = ratios.get(name, {})
        print(f"{name:<20} {s['steps_timed']:>3}/{s['steps']:<3} "
              f"{t['median']:>12,.0f} ({t['min']:,.0f}-{t['max']:,.0f}){'':>6} {s['pad_fraction']:>5.2f} "
              f"{s['peak_rss_gib']['median']:>13.2f} {s['train_phase_peak_rss_gib']['median']:>10.2f} "
              f"{s['final_loss']['median']:>10.4f} "
              f"{r.get('of_medians', float('nan')):>9.2f} {r.get('paired_median') or float('nan'):>9.2f}")
    p, m = summary["matmul_peak"], summary["mfu"]
    print(f"\nmatmul peak 1024x1024, {p['threads']} thread(s): fp32 {p['fp32_gflops_best']:.1f} GFLOP/s (median "
          f"{p['fp32_gflops_median']:.1f}), bf16 {p['bf16_gflops_best']:.2f} GFLOP/s (median {p['bf16_gflops_median']:.2f})")
    if "lmtune" in m:
        lm = m["lmtune"]
        key = f"mfu_vs_{lm['dtype']}_best"
        print(f"lmtune MFU: 6 x {m['linear_weights']:,} nn.Linear weights x real tokens/s = "
              f"{lm['model_gflops']:.1f} GFLOP/s = {100 * lm[key]:.1f}% of the {lm['dtype']} peak "
              f"({100 * lm[key.replace('best', 'median')]:.1f}% of its median)")
    if p["threads"] != 2:
        print(f"fp32 matmul peak with 2 threads: {p['fp32_gflops_2_threads_best']:.1f} GFLOP/s")
    if "lmtune" in v and "lmtune_own_train_tokens_per_second" in v["lmtune"]:
        own = v["lmtune"]["lmtune_own_train_tokens_per_second"]["median"]
        steady = v["lmtune"].get("lmtune_own_steady_tokens_per_second", {}).get("median", float("nan"))
        print(f"lmtune's own figures: summary train_tokens_per_second {own:,.0f} (whole run, warm-up included), "
              f"metrics.jsonl after warm-up {steady:,.0f}")


def loss_curves(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each variant's median loss per step over its rounds, and its gaps to lmtune's median curve: at step 1,
    the largest, and the mean over the steps. Variants that saw the same batches in the same order (lmtune's
    diagnostics, the ``*_same_batches`` Trainers) are comparable step by step; the others see other batches."""
    by_variant: dict[str, list[list[float]]] = {}
    for r in runs:
        if r.get("step_losses"):
            by_variant.setdefault(r["variant"], []).append(r["step_losses"])
    median = {name: [statistics.median(step) for step in zip(*curves, strict=False)]
              for name, curves in by_variant.items()}
    gaps: dict[str, Any] = {}
    if "lmtune" in median:
        ref = median["lmtune"]
        for name, curve in median.items():
            n = min(len(ref), len(curve))
            if name == "lmtune" or n == 0:
                continue
            diff = [abs(a - b) for a, b in zip(ref[:n], curve[:n], strict=True)]
            gaps[name] = {"steps": n, "step_1": diff[0], "max": max(diff), "mean": sum(diff) / n,
                          "last_10_mean_lmtune": statistics.fmean(ref[max(0, n - 10) : n]),
                          "last_10_mean": statistics.fmean(curve[max(0, n - 10) : n])}
    return {"median": median, "gap_to_lmtune": gaps}


def print_curves(curves: dict[str, Any]) -> None:
    """The loss curves' gaps to lmtune's, one line per variant."""
    gaps = curves["gap_to_lmtune"]
    if not gaps:
        return
    print("\nloss per step against lmtune's (medians over rounds; same batches only where the variant says so):")
    for name, g in gaps.items():
        print(f"  {name:<26} {g['steps']:>3} steps: |gap| at step 1 {g['step_1']:.4f}, mean {g['mean']:.4f}, "
              f"max {g['max']:.4f}; mean of the last 10 steps {g['last_10_mean']:.4f} (lmtune {g['last_10_mean_lmtune']:.4f})")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load average and library versions."""
    import torch
    import transformers

    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per fp32 variant")
    p.add_argument("--warmup", type=int, default=5, help="first optimizer steps excluded from timing")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the variants (alternating)")
    p.add_argument("--examples", type=int, default=4000, help="training sentences (first N of a seeded shuffle)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS + DIAGNOSTIC_VARIANTS, default=list(VARIANTS),
                   help="diagnostics, not run by default: trainer_same_batches (the Trainer on lmtune's batches), "
                   "lmtune_torch_dropout (lmtune with torch's dropout masks), lmtune_full_last_layer (lmtune "
                   "with the last encoder layer on every position), lmtune_plain_attention (lmtune with the "
                   "encoder's own attention blocks), lmtune_malloc_defaults (lmtune with glibc's own malloc "
                   "thresholds), trainer_bf16_same_batches (the bf16 Trainer on lmtune's batches), "
                   "lmtune_bound_threads (lmtune with OpenMP threads pinned one per core)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every child (default: torch's, one per core). On a shared 2-core "
                   "machine 1 thread can be faster: an OpenMP barrier waits for a thread that shares a core")
    p.add_argument("--bf16-steps", type=int, default=None,
                   help="steps for trainer_bf16 (bf16 matmuls can be ~100x slower than fp32 on AVX2-only CPUs)")
    p.add_argument("--bf16-warmup", type=int, default=None, help="warm-up steps for trainer_bf16")
    p.add_argument("--bf16-repeats", type=int, default=None, help="run trainer_bf16 in only the first N rounds")
    p.add_argument("--no-dropout", action="store_true",
                   help="every dropout probability 0 in every variant: runs on the same batches then differ by the "
                   "code alone (the loss-curve check)")
    p.add_argument("--plot", type=Path, default=None, help="draw each variant's median training-loss curve as a PNG")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, logs and runs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that every variant runs")
    p.add_argument("--profile", action="store_true", help="profile one lmtune run (cProfile + torch.profiler)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.examples = 4, 1, 1, 400
        args.bf16_steps, args.bf16_warmup = 2, 1
    args.bf16_steps = args.bf16_steps or args.steps
    args.bf16_warmup = args.bf16_warmup if args.bf16_warmup is not None else min(args.warmup, args.bf16_steps - 1)
    if not 1 <= args.warmup < args.steps or not 1 <= args.bf16_warmup < args.bf16_steps:
        p.error("need 1 <= warm-up steps < steps (for fp32 and bf16)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Prepare the data, run the variants alternately in subprocesses, print and save the results."""
    args = parse_args(argv)
    if args.child is not None:
        workdir = args.workdir
        if args.child == "peak":
            result = child_peak()
        elif args.child == "lmtune" or args.child.startswith("lmtune_"):
            result = child_lmtune(workdir, args.steps, args.warmup, args.profile,
                                  fast_dropout=args.child != "lmtune_torch_dropout",
                                  first_token=args.child != "lmtune_full_last_layer",
                                  patched_attention=args.child != "lmtune_plain_attention",
                                  retain_memory=args.child != "lmtune_malloc_defaults",
                                  dropout=not args.no_dropout)
        else:
            result = child_trainer(workdir, args.child, args.steps, args.warmup, dropout=not args.no_dropout)
        args.result.write_text(json.dumps(result, indent=1), encoding="utf-8")
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-classification-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data_info = write_subsets(workdir, args.examples)
    load_before = os.getloadavg()
    print(f"workdir {workdir}; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}",
          file=sys.stderr)
    if args.profile:
        run = run_child(["lmtune", "--steps", str(args.steps), "--warmup", str(args.warmup),
                         "--workdir", str(workdir), "--profile"], workdir, args.threads)
        print(Path(run["log"]).read_text(encoding="utf-8"))
        print(json.dumps({k: run[k] for k in ("tokens_per_second", "steps_timed", "precision")}))
        return

    peaks = [run_child(["peak", "--workdir", str(workdir)], workdir, args.threads)]
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for variant in args.variants:
            bf16 = variant in BF16_TRAINERS
            if bf16 and args.bf16_repeats is not None and repeat >= args.bf16_repeats:
                continue
            steps, warmup = (args.bf16_steps, args.bf16_warmup) if bf16 else (args.steps, args.warmup)
            t = time.time()
            run = run_child([variant, "--steps", str(steps), "--warmup", str(warmup), "--workdir", str(workdir),
                             *(["--no-dropout"] if args.no_dropout else [])], workdir, args.threads,
                            VARIANT_ENV.get(variant))
            run.update(variant=variant, repeat=repeat, load_average=os.getloadavg()[0])
            runs.append(run)
            print(f"[{time.time() - started:6.0f}s] repeat {repeat} {variant:<16} {run['tokens_per_second']:8,.0f} "
                  f"real tokens/s, pad {1 - run['real_tokens'] / run['padded_tokens']:.2f}, peak RSS "
                  f"{run['peak_rss_kib'] / 2**20:.2f} GiB, loss {run['final_loss']}, {time.time() - t:.0f}s",
                  file=sys.stderr)
    peaks.append(run_child(["peak", "--workdir", str(workdir)], workdir, args.threads))
    summary = summarise(runs, peaks)
    print_table(summary)
    curves = loss_curves(runs)
    summary["loss_curves"] = {"no_dropout": args.no_dropout, **curves}
    print_curves(curves)
    if args.plot:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_sft import plot_losses  # the SFT benchmark's loss-curve chart

        plot_losses(curves["median"], args.plot, f"MiniLM, batch {BATCH_SIZE}, training loss per step"
                    f"{' (no dropout)' if args.no_dropout else ''}", ylabel="training loss (mean over examples)")
        print(f"loss curves drawn to {args.plot}")
    load_after = os.getloadavg()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                     "bf16_steps": args.bf16_steps, "bf16_warmup": args.bf16_warmup,
                     "bf16_repeats": args.bf16_repeats, "batch_size": BATCH_SIZE, "max_length": MAX_LENGTH,
                     "learning_rate": LEARNING_RATE, "seed": SEED, "threads": args.threads, **data_info},
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": load_after},
        "total_seconds": time.time() - started,
        **summary,
        "runs": runs,
    }
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; total {result['total_seconds']:.0f}s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
