"""Instruction-tuning throughput, packed vs padded: lmtune vs the Hugging Face Trainer and TRL's SFTTrainer.

Every variant trains the same decoder (saved once, same starting weights) on the same conversations (the
bundled English chatterbot set, rendered with the model's chat template by ``lmtune.data.chat``; loss on
assistant tokens, end-of-turn token included) for the same number of optimizer steps: batch 8 (rows),
max_length 256, fp32, AdamW lr 5e-5 with 6% linear warm-up, weight decay 0.01, clipping 1.0, seed 42.

    trainer_padded   transformers Trainer on lmtune's rendered token ids and labels, DataCollatorForSeq2Seq
                     (pad to the longest in the batch, labels -100 on pads), fed lmtune's length-grouped batches
    trl_sft          TRL SFTTrainer on the same pre-tokenised ``input_ids`` + ``assistant_masks`` (TRL turns
                     the mask into labels), its own padding collator, lmtune's batches, no packing
    trl_sft_packed   the same with ``packing=True`` (TRL's default "bfd" strategy: best-fit-decreasing rows of
                     <= max_length, which turns on padding-free batches: each batch is one flattened row with
                     position ids restarting per conversation and no attention mask), TRL's random sampler
    lmtune_padded    ``lmtune.train``, task sft, data.packing false (length-grouped, dynamically padded batches)
    lmtune_packed    ``lmtune.train``, task sft, data.packing true (first-fit-decreasing rows of <= max_length)

The padded Trainer and TRL runs get exactly lmtune's batches (its LengthGroupedBatchSampler, same seed), so
the three padded variants train on the same batches in the same order and their step-1 losses must agree.
On request (``--variants``), the Trainer with its own samplers, as users run it:

    trainer_grouped  train_sampling_strategy="group_by_length" (each mega-batch of 400 walked longest first)
    trainer_random   the default random order
    trl_sft_padding_free  TRL SFTTrainer with ``padding_free=True`` and no packing: lmtune's batches, each
                     flattened into one row without padding (position ids restart per conversation)

``--lora`` trains LoRA adapters instead of all weights (lmtune's defaults: rank 8, alpha 16, dropout 0.05, every
linear layer but the LM head; peft ``get_peft_model`` with the same settings for the Trainer and TRL; learning rate
2e-4). ``--precision bf16`` trains every variant in bf16 autocast over fp32 weights (Trainer/TRL ``bf16=True``,
lmtune ``train.precision: bf16``): the faster choice on CPUs with AVX512-BF16 or AMX.

Each variant runs in its own subprocess with the same torch thread count (``--threads``); variants alternate
across repeats. Timing is taken the same way for every variant, outside the code under test: a timestamp at
the end of each optimizer step (Trainer/TRL: ``on_step_end``; lmtune: after ``optimizer.zero_grad``, the last
call of its step) and the real (non-pad) tokens of each trained batch (Trainer/TRL: in ``training_step``;
lmtune: where its task computes the loss). Real tokens/s = real tokens of the steps after ``--warmup-steps``
/ time from the end of the last warm-up step to the end of the last step. No evaluation or saving happens
during the timed steps (lmtune's starting-point and final evaluation, export and report are before or after).

    python benchmarks/bench_sft.py --output sft.json            # the full measurement (est. ~25 min, quiet 2 cores)
    python benchmarks/bench_sft.py --quick --threads 1          # checks that every variant runs
    python benchmarks/bench_sft.py --model smollm2 --steps 12 --warmup-steps 2   # the real SmolLM2-135M
    python benchmarks/bench_sft.py --model smollm2 --lora --precision bf16 \
        --variants trainer_padded trl_sft_packed trl_sft_padding_free lmtune_packed   # issue 17's LoRA SFT table
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("trainer_padded", "trl_sft", "trl_sft_packed", "lmtune_padded", "lmtune_packed")
EXTRA_VARIANTS = ("trainer_grouped", "trainer_random", "trl_sft_padding_free")
BASELINE = "trainer_padded"
SEED = 42
BATCH_SIZE = 8
MAX_LENGTH = 256
LEARNING_RATE = 5e-5
LORA_LEARNING_RATE = 2e-4  # with --lora (adapters start at zero and need a larger step)
# With --lora: lmtune's method defaults (config/schema.py MethodConfig), given to peft the same way for every variant.
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
HELD_OUT = 16  # conversations in lmtune's validation/test file (its evaluation runs outside the timing)
# The default model: a Llama decoder built from a config with SmolLM2's tokenizer (49,152 tokens, tied embeddings).
SMALL_LLAMA = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 6,
               "intermediate_size": 1024, "max_position_embeddings": 2048, "tie_word_embeddings": True}


# ------------------------------------------------------------------------------------------ setup
def build_model(workdir: Path, kind: str) -> Path:
    """The model folder every variant loads: the bundled SmolLM2-135M, or a small random Llama saved once."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmtune.models.registry import CHATML_TEMPLATE, IM_END, find_bundled, resolve_model

    if kind == "smollm2":
        return resolve_model("smollm2")
    # SmolLM2's real tokenizer from the GGUF's metadata (seconds), as tests/helpers.py builds it.
    bundled = find_bundled("smollm2")
    spec = importlib.util.find_spec(bundled.module)
    tok = AutoTokenizer.from_pretrained(next(iter(spec.submodule_search_locations)), gguf_file=bundled.source)
    tok.eos_token = tok.pad_token = IM_END
    tok.chat_template = tok.chat_template or CHATML_TEMPLATE
    tok.model_max_length = 2048
    folder = workdir / "model"
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, **SMALL_LLAMA)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(workdir: Path, model_dir: Path, steps: int, repeat: int | None) -> dict[str, Any]:
    """Render the chatterbot conversations once; write what every variant reads.

    ``chat.jsonl`` (conversations lmtune renders itself), ``tokens.jsonl`` (the same conversations as
    lmtune's token ids and labels, for the Trainer and TRL) and ``heldout.jsonl`` (lmtune's evaluation
    files). Conversations longer than max_length are dropped first, so every variant trains on the same
    set; the set is repeated so that the packed variants do not run out of rows (lmtune's deduplication
    is switched off for that reason).
    """
    from lmtune.data.bundled import resolve_bundled_data
    from lmtune.data.chat import ensure_chat_template, render_conversation
    from lmtune.models.registry import load_padded_tokenizer

    tok = load_padded_tokenizer(model_dir)
    if ensure_chat_template(tok):
        raise SystemExit("the model's tokenizer lacks ChatML tokens; every variant would need its embeddings grown")
    rows = [json.loads(line) for line in resolve_bundled_data("chatterbot").read_text(encoding="utf-8").splitlines()]
    kept = []
    for row in rows:
        ex = render_conversation(tok, row["messages"], max_length=MAX_LENGTH)
        if ex is not None:
            kept.append(({"messages": row["messages"]}, ex))
    tokens = sum(len(ex.input_ids) for _, ex in kept)
    # Enough rows for the packed variants (steps x batch full rows) with a 30% margin, at least one copy.
    repeat = repeat or max(1, math.ceil(1.3 * steps * BATCH_SIZE * MAX_LENGTH / tokens))
    with (workdir / "chat.jsonl").open("w", encoding="utf-8") as chat, \
            (workdir / "tokens.jsonl").open("w", encoding="utf-8") as ids:
        for _ in range(repeat):
            for record, ex in kept:
                chat.write(json.dumps(record, ensure_ascii=False) + "\n")
                ids.write(json.dumps({"input_ids": ex.input_ids, "labels": ex.labels}) + "\n")
    held = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in kept[:HELD_OUT])
    (workdir / "heldout.jsonl").write_text(held, encoding="utf-8")
    targets = sum(sum(t != -100 for t in ex.labels) for _, ex in kept)
    return {"conversations": len(kept), "skipped_too_long": len(rows) - len(kept), "repeat": repeat,
            "tokens_per_copy": tokens, "mean_tokens": tokens / len(kept), "target_fraction": targets / tokens}


# ------------------------------------------------------------------------------------------ children
def peak_rss_so_far_kib() -> int:
    """VmHWM of this process (KiB): the peak resident set up to now."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)


class StepLog:
    """Per-step end times and token counts, recorded identically for every variant."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.times: list[float] = []
        self.tokens: list[int] = []  # real (non-pad) tokens per step
        self.slots: list[int] = []  # tokens the step computed on, padding included
        self.train_rss_kib = 0

    def batch(self, real: int, slots: int) -> None:
        """Called once per trained batch (one batch per optimizer step: no gradient accumulation)."""
        self.tokens.append(real)
        self.slots.append(slots)

    def step_end(self) -> None:
        """Called at the end of each optimizer step."""
        self.times.append(time.perf_counter())
        if len(self.times) == self.steps:
            self.train_rss_kib = peak_rss_so_far_kib()

    def result(self, warmup: int) -> dict[str, Any]:
        """Steady-state real tokens/s after ``warmup`` steps, pad fraction, per-step records."""
        n = len(self.times)
        seconds = self.times[-1] - self.times[warmup - 1]
        return {"steps": n, "steps_timed": n - warmup, "timed_seconds": seconds,
                "tokens_per_second": sum(self.tokens[warmup:n]) / seconds,
                "real_tokens": sum(self.tokens[:n]), "slot_tokens": sum(self.slots[:n]),
                "step_tokens": self.tokens[:n], "step_slots": self.slots[:n],
                "step_seconds": [b - a for a, b in itertools.pairwise(self.times)],
                "train_rss_kib": self.train_rss_kib}


def child_hf(workdir: Path, model_dir: Path, variant: str, steps: int, warmup: int, threads: int, lora: bool,
             precision: str) -> dict[str, Any]:
    """One Trainer or SFTTrainer run on the pre-tokenised conversations."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    rows = [json.loads(line) for line in (workdir / "tokens.jsonl").read_text(encoding="utf-8").splitlines()]
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    log = StepLog(steps)
    losses: list[float] = []

    class Timing(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            log.step_end()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    order = None
    if variant in ("trainer_padded", "trl_sft", "trl_sft_padding_free"):
        from lmtune.data.features import LengthGroupedBatchSampler

        # lmtune's batches (epoch 0, same seed and lengths; it reads the same conversations in the same
        # order), flattened: the Trainer cuts them back into the same batches of BATCH_SIZE.
        batches = LengthGroupedBatchSampler([len(r["input_ids"]) for r in rows], BATCH_SIZE, seed=SEED).batches()
        order = [i for batch in batches for i in batch]

    def counting(cls: type) -> type:
        class Counting(cls):  # type: ignore[misc, valid-type]
            def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
                ids = inputs["input_ids"]  # (B, T); padding-free batches are (1, total tokens) with no mask
                mask = inputs.get("attention_mask")
                log.batch(int(mask.sum()) if mask is not None else ids.numel(), ids.numel())
                return super().training_step(model, inputs, *args, **kwargs)

            def _get_train_sampler(self, train_dataset: Any = None) -> Any:
                return order if order is not None else super()._get_train_sampler(train_dataset)
        return Counting

    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"{variant}-", dir=workdir), max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE, learning_rate=LORA_LEARNING_RATE if lora else LEARNING_RATE,
        weight_decay=WEIGHT_DECAY, warmup_steps=round(WARMUP_RATIO * steps), lr_scheduler_type="linear",
        max_grad_norm=1.0, seed=SEED, bf16=precision == "bf16", eval_strategy="no", save_strategy="no", logging_steps=1, report_to="none",
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if variant == "trainer_grouped" else "random",
    )
    if variant.startswith("trainer"):
        data = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                  "attention_mask": [[1] * len(r["input_ids"]) for r in rows],
                                  "labels": [r["labels"] for r in rows]})
        trainer = counting(Trainer)(
            model=model, args=TrainingArguments(**common), train_dataset=data, processing_class=tok,
            data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100),
            callbacks=[Timing()])
    else:
        from trl import SFTConfig, SFTTrainer

        # SmolLM2's template has no {% generation %} markers, and assistant_only_loss needs a conversational
        # dataset; a pre-tokenised one with an assistant_masks column gets the same labels, from lmtune's mask.
        data = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                  "assistant_masks": [[int(x != -100) for x in r["labels"]] for r in rows]})
        # Padding-free without packing refuses a max_length it cannot enforce: the rows already fit MAX_LENGTH.
        args = SFTConfig(**common, max_length=None if variant == "trl_sft_padding_free" else MAX_LENGTH,
                         packing=variant == "trl_sft_packed",
                         padding_free=variant in ("trl_sft_packed", "trl_sft_padding_free"),
                         gradient_checkpointing=False)  # SFTConfig's default is True; lmtune's and Trainer's False
        trainer = counting(SFTTrainer)(model=model, args=args, train_dataset=data, processing_class=tok,
                                       callbacks=[Timing()])
    trainer.train()
    return {**log.result(warmup), "first_loss": losses[0] if losses else None, "losses": losses,
            "threads": torch.get_num_threads()}


def child_lmtune(workdir: Path, model_dir: Path, variant: str, steps: int, warmup: int, threads: int, lora: bool,
                 precision: str) -> dict[str, Any]:
    """One ``lmtune.train`` run, task sft, packed or padded; independent timing through two small patches."""
    import torch

    import lmtune
    from lmtune.tasks.sft.task import SFTTask
    from lmtune.training import loop as loop_mod

    log = StepLog(steps)
    original_loss, original_setup = SFTTask.loss, loop_mod.TrainingLoop.setup

    def loss(self: Any, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]  # (B, T)
        real = batch["num_real_tokens"].sum() if "num_real_tokens" in batch else batch["attention_mask"].sum()
        log.batch(int(real), ids.numel())
        return original_loss(self, model, batch)

    def setup(self: Any) -> None:
        original_setup(self)
        zero_grad = self.optimizer.zero_grad

        def timed_zero_grad(*args: Any, **kwargs: Any) -> Any:
            out = zero_grad(*args, **kwargs)  # the last call of lmtune's optimizer step
            log.step_end()
            return out

        self.optimizer.zero_grad = timed_zero_grad

    SFTTask.loss = loss  # type: ignore[method-assign]
    loop_mod.TrainingLoop.setup = setup  # type: ignore[method-assign]
    held = str(workdir / "heldout.jsonl")
    run = lmtune.train({
        "task": "sft", "model": str(model_dir),
        "data": {"train": str(workdir / "chat.jsonl"), "validation": held, "test": held, "max_length": MAX_LENGTH,
                 "packing": variant == "lmtune_packed", "deduplicate": False},
        **({"method": {"name": "lora", "r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"],
                       "target_modules": LORA["target_modules"]}} if lora else {}),
        "train": {"max_steps": steps, "batch_size": BATCH_SIZE,
                  "learning_rate": LORA_LEARNING_RATE if lora else LEARNING_RATE,
                  "weight_decay": WEIGHT_DECAY, "warmup_ratio": WARMUP_RATIO, "max_grad_norm": 1.0, "seed": SEED,
                  "precision": precision, "num_threads": threads, "log_every": 1,
                  "eval_every": 10**9, "save_every": 10**9},  # evaluate and save only after the last step
        "generation": {"max_new_tokens": 8, "eval_examples": 4},
        "output_dir": tempfile.mkdtemp(prefix=f"{variant}-", dir=workdir),
    }, show_progress=False)
    records = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    out = log.result(warmup)
    # lmtune's own figure: its metrics.jsonl rows (one per step) after warm-up; a row's seconds are its
    # tokens (counted above, same batches) over its logged tokens_per_second.
    own_seconds = sum(t / r["tokens_per_second"] for t, r in zip(out["step_tokens"][warmup:], train[warmup:], strict=True))
    return {**out, "first_loss": train[0]["loss"], "losses": [r["loss"] for r in train],
            "lmtune_own_tokens_per_second": sum(out["step_tokens"][warmup:]) / own_seconds,
            "threads": torch.get_num_threads()}


def run_child(argv: list[str], workdir: Path, threads: int) -> dict[str, Any]:
    """Run this script as a child; its result plus peak RSS (``ru_maxrss`` from wait4) and wall time."""
    result_path = Path(tempfile.mkstemp(prefix="result-", suffix=".json", dir=workdir)[1])
    log_path = result_path.with_suffix(".log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", *argv, "--result", str(result_path)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"child {argv[0]} failed; log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    return {**result, "peak_rss_kib": usage.ru_maxrss, "process_seconds": time.perf_counter() - start,
            "log": str(log_path)}


# ------------------------------------------------------------------------------------------ report
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: medians (min, max) of tokens/s and RSS, pad fraction, ratio to the baseline, first loss."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name]
        tps = [r["tokens_per_second"] for r in rs]
        out[name] = {
            "repeats": len(rs), "steps_timed": rs[0]["steps_timed"],
            "tokens_per_second": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)},
            "pad_fraction": statistics.median(1 - r["real_tokens"] / r["slot_tokens"] for r in rs),
            "real_tokens_per_step": statistics.median(r["real_tokens"] / r["steps"] for r in rs),
            "peak_rss_gib": statistics.median(r["peak_rss_kib"] / 2**20 for r in rs),
            "train_rss_gib": statistics.median(r["train_rss_kib"] / 2**20 for r in rs),
            "first_loss": rs[0]["first_loss"],
        }
        if "lmtune_own_tokens_per_second" in rs[0]:
            out[name]["lmtune_own_tokens_per_second"] = statistics.median(
                r["lmtune_own_tokens_per_second"] for r in rs)
    if BASELINE in out:
        base = out[BASELINE]["tokens_per_second"]["median"]
        for v in out.values():
            v["ratio_to_baseline"] = v["tokens_per_second"]["median"] / base
    return out


def loss_curves(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per variant, the median over repeats of each step's training loss (Trainer/TRL: their logged loss;
    lmtune: metrics.jsonl), so the curves of variants that trained on the same batches can be compared."""
    out: dict[str, list[float]] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        per_run = [r["losses"] for r in runs if r["variant"] == name and r["losses"]]
        if per_run:
            out[name] = [statistics.median(step) for step in zip(*per_run, strict=False)]
    return out


def plot_losses(curves: dict[str, list[float]], path: Path, title: str,
                ylabel: str = "training loss (mean over target tokens)") -> None:
    """The loss curves as a PNG (bench_classification.py draws its curves with it too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, marker=".", label=name,
                linestyle="--" if name.startswith("lmtune") else "-")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(summary: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [f"| variant | real tokens/s, median (min-max) | x {BASELINE} | pad fraction | real tokens/step "
             "| peak RSS | RSS at last step | first-step loss |", "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        t = s["tokens_per_second"]
        ratio = f"{s['ratio_to_baseline']:.2f}" if "ratio_to_baseline" in s else "-"
        loss = f"{s['first_loss']:.4f}" if s["first_loss"] is not None else "-"
        lines.append(f"| {name} | {t['median']:,.0f} ({t['min']:,.0f}-{t['max']:,.0f}) | {ratio} | "
                     f"{s['pad_fraction']:.2f} | {s['real_tokens_per_step']:,.0f} | {s['peak_rss_gib']:.2f} GiB | "
                     f"{s['train_rss_gib']:.2f} GiB | {loss} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run (warm-up included)")
    p.add_argument("--warmup-steps", type=int, default=4, help="first steps excluded from timing")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the variants (alternating)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every child (OMP_NUM_THREADS too)")
    p.add_argument("--model", choices=("small", "smollm2"), default="small",
                   help="small: Llama 384x6 built from a config with SmolLM2's tokenizer; smollm2: the real 135M")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (lmtune's defaults) instead of all weights")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast over fp32 weights in every variant (fast on AVX512-BF16/AMX CPUs)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS + EXTRA_VARIANTS, default=list(VARIANTS))
    p.add_argument("--data-repeat", type=int, default=None,
                   help="copies of the conversations (default: enough for the packed variants' steps)")
    p.add_argument("--output", type=Path, default=None, help="write the summary and every run as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, model, logs and runs here")
    p.add_argument("--plot", type=Path, default=None, help="draw each variant's training-loss curve as a PNG here")
    p.add_argument("--quick", action="store_true", help="tiny settings (4 steps, 1 repeat): checks every variant runs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup_steps, args.repeats = 4, 1, 1
    if not 1 <= args.warmup_steps < args.steps:
        p.error("need 1 <= --warmup-steps < --steps")
    return args


def main(argv: list[str] | None = None) -> None:
    """Build the model and data once, run the variants alternately in subprocesses, report."""
    args = parse_args(argv)
    if args.child is not None:
        child = child_lmtune if args.child.startswith("lmtune") else child_hf
        result = child(args.workdir, args.model_dir, args.child, args.steps, args.warmup_steps, args.threads,
                       args.lora, args.precision)
        args.result.write_text(json.dumps(result), encoding="utf-8")
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sft-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_dir = build_model(workdir, args.model)
    data = write_data(workdir, model_dir, args.steps, args.data_repeat)
    load_before = os.getloadavg()
    print(f"workdir {workdir}; model {model_dir}; {data['conversations']} conversations x {data['repeat']}, "
          f"mean {data['mean_tokens']:.0f} tokens, {100 * data['target_fraction']:.0f}% carry loss; "
          f"load average {load_before[0]:.2f}", file=sys.stderr)
    runs = []
    for repeat in range(args.repeats):
        for variant in args.variants:
            run = run_child([variant, "--workdir", str(workdir), "--model-dir", str(model_dir), "--steps",
                             str(args.steps), "--warmup-steps", str(args.warmup_steps), "--threads",
                             str(args.threads), *(["--lora"] if args.lora else []), "--precision", args.precision],
                            workdir, args.threads)
            runs.append({**run, "variant": variant, "repeat": repeat, "load_average": os.getloadavg()[0]})
            print(f"[{time.time() - started:5.0f}s] {repeat} {variant:<15} {run['tokens_per_second']:7,.0f} real "
                  f"tokens/s, pad {1 - run['real_tokens'] / run['slot_tokens']:.2f}, peak RSS "
                  f"{run['peak_rss_kib'] / 2**20:.2f} GiB, first-step loss {run['first_loss']}, "
                  f"{run['process_seconds']:.0f}s", file=sys.stderr)
    summary = summarise(runs)
    table = markdown_table(summary)
    print()
    print(table)
    for name, s in summary.items():
        if "lmtune_own_tokens_per_second" in s:
            print(f"{name}: lmtune's own metrics.jsonl after warm-up: {s['lmtune_own_tokens_per_second']:,.0f} tokens/s")
    padded = {summary[v]["first_loss"] for v in ("trainer_padded", "trl_sft", "trl_sft_padding_free", "lmtune_padded")
              if v in summary}
    if len(padded) > 1:  # same weights, same first batch: only float summation order may differ
        print(f"step-1 loss of the padded variants (same batch): spread {max(padded) - min(padded):.2e}")
    curves = loss_curves(runs)
    for name, losses in curves.items():
        print(f"{name} losses by step: " + " ".join(f"{x:.3f}" for x in losses))
    same = [v for v in ("trainer_padded", "trl_sft", "trl_sft_padding_free", "lmtune_padded") if v in curves]
    if len(same) > 1:  # the same batches in the same order: the curves should agree up to dropout draws
        n = min(len(curves[v]) for v in same)
        gap = max(abs(curves[a][i] - curves[same[0]][i]) for a in same[1:] for i in range(n))
        print(f"padded variants on the same batches: largest gap between loss curves over {n} steps {gap:.4f}")
    if args.plot:
        plot_losses(curves, args.plot, f"{args.model}{' LoRA' if args.lora else ''} {args.precision}, "
                    f"batch {BATCH_SIZE} x {MAX_LENGTH}")
        print(f"loss curves drawn to {args.plot}")
    load_after = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; total {time.time() - started:.0f}s")
    if args.output:
        import torch
        import transformers
        import trl

        result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "settings": {"steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
                               "threads": args.threads, "model": args.model, "lora": args.lora,
                               "precision": args.precision, "batch_size": BATCH_SIZE,
                               "max_length": MAX_LENGTH, "seed": SEED, **data,
                               "learning_rate": LORA_LEARNING_RATE if args.lora else LEARNING_RATE},
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "trl": trl.__version__},
                  "load_average": [load_before[0], load_after[0]], "table": table, "summary": summary, "loss_curves": curves,
                  "runs": runs}
        args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
