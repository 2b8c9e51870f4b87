"""Preference tuning (DPO) throughput and peak memory: lmtune's ``task: dpo`` vs TRL's DPOTrainer.

Every variant trains the same decoder (the bundled SmolLM2-135M-Instruct by default) on the same preference pairs
(a seeded sample of the bundled ``chatterbot_pairs`` that fit ``max_length``, rendered with the model's chat
template) with the same batches in the same order for the same number of optimizer steps: batch 4 pairs (8 rows:
chosen and rejected through the model together), max_length 192, fp32, sigmoid DPO loss with beta 0.1, AdamW
(fused) with 10% linear warm-up, weight decay 0.0, clipping 1.0, seed 42.

    trl_dpo             TRL DPOTrainer with its defaults for the reference: full fine-tuning keeps a second copy
                        of the model and runs its forward pass at every step (precompute_ref_log_probs False);
                        with --lora the reference is the same model with the adapter disabled, run every step
    trl_dpo_precompute  precompute_ref_log_probs=True: the reference log-probs of every pair once, before training
                        (in DPOTrainer.__init__), as lmtune does
    lmtune_dpo          ``lmtune.train``, task dpo: one forward of B rows, each the prompt once and both answers
                        (a 4D mask keeps the rejected answer from seeing the chosen one), with logits only from
                        the first answer position (``logits_to_keep``); reference log-probs computed once before
                        the first step

``--lora``: the same three with LoRA (r 16, alpha 32, dropout 0, all linear layers of the blocks).

Same tokens: TRL tokenises the conversational pairs itself (its own chat-template path); every TRL child checks
that the ``prompt_ids``/``chosen_ids``/``rejected_ids`` it built equal lmtune's rendering
(``lmtune.data.preference.render_pair``) for every pair, and stops if not. Same batches: TRL gets lmtune's batches
(its LengthGroupedBatchSampler over max(chosen, rejected) lengths, same seed) through ``_get_train_sampler``;
the pair count is a multiple of the batch size, so every batch is full and the flattened order cuts back into the
same batches. The step-1 loss is log 2 for every run (the policy is the reference), so the script also prints the
step-1 mean log-probs of the chosen and rejected answers and the largest loss difference to lmtune over all steps.

Each variant runs in its own subprocess with the same torch thread count (``--threads``, also OMP_NUM_THREADS);
variants alternate across repeats. Timing is taken the same way for every variant, outside the code under test: a
``perf_counter`` stamp at the end of each optimizer step (TRL: ``on_step_end``; lmtune: after
``optimizer.zero_grad``, the last call of its step) and the real (non-pad) tokens of both rows of every pair of
each trained batch (TRL: ``attention_mask.sum()`` of its (2B, T) batch in ``training_step``; lmtune: the same
count, ``num_real_tokens`` of its shared-prompt rows, where its task computes the loss; the prompt is counted
twice for both, although lmtune computes it once: the slot tokens, padding included, show what each computed on). Steady tokens/s = real tokens of the steps after ``--warmup-steps`` / time from the end of
the last warm-up step to the end of the last step. The time inside the loss call (the forward passes and the loss:
TRL ``compute_loss``, lmtune ``task.loss``) is recorded too; the rest of a step is backward, clipping and AdamW.

The reference precompute is a one-time cost, timed on its own (TRL: ``_precompute_ref_logps`` of the training
set, and the hash of every weight it keys its cache with; lmtune: its reference pass over the training split)
and reported in seconds, and folded into whole-run throughput for 1 and for 3 epochs: tokens/s over E epochs =
E / (p + E / steady), p = precompute seconds per training token (both precompute the same pairs; the figure does
not depend on the epoch's size).

Memory: peak RSS of each child (loading, tokenising, precompute, training and, for lmtune, its evaluation,
export and report: the larger of VmHWM read just before the first step and ``ru_maxrss`` from wait4, which
counts from the reset below), and the peak during the optimizer steps only (VmHWM reset through
``/proc/self/clear_refs`` at the first trained batch, read at the last step: what is resident then, the model,
a reference copy, data, plus everything the steps allocate), with the RSS at that reset.

    python benchmarks/bench_dpo.py --quick                                  # every variant runs (tiny model)
    python benchmarks/bench_dpo.py --threads 1 --output dpo.json            # full fine-tuning, SmolLM2-135M
    python benchmarks/bench_dpo.py --threads 1 --lora --output dpo-lora.json
    python benchmarks/bench_dpo.py --steps 4 --warmup-steps 1 --pairs 16 --mmap-threshold 131072   # memory
    python benchmarks/bench_dpo.py --profile lmtune_dpo --steps 6           # where a step's time goes
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("trl_dpo", "trl_dpo_precompute", "lmtune_dpo")
SEED = 42
BATCH_SIZE = 4  # pairs per optimizer step: (8, T) rows through the model
MAX_LENGTH = 192
BETA = 0.1
LEARNING_RATE = {"full": 5e-6, "lora": 5e-5}
WEIGHT_DECAY = 0.0
WARMUP_RATIO = 0.1
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
HELD_OUT = 8  # pairs in lmtune's validation/test file (its evaluation runs outside the timing)
EPOCHS = (1, 3)  # whole-run throughput, precompute included
# --model tiny (for --quick): a Llama with SmolLM2's real tokenizer (49,152 tokens), hidden 32, 2 layers.
TINY_LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 512, "tie_word_embeddings": True}


# ------------------------------------------------------------------------------------------ setup
# Imports sit inside the functions: the parent never loads torch, and each child loads only its side.
def build_model(workdir: Path, kind: str) -> Path:
    """The model folder every variant loads: the bundled SmolLM2-135M-Instruct, or a tiny Llama saved once."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmtune.models.registry import CHATML_TEMPLATE, IM_END, find_bundled, resolve_model

    if kind == "smollm2":
        return resolve_model("smollm2")
    bundled = find_bundled("smollm2")
    spec = importlib.util.find_spec(bundled.module)
    tok = AutoTokenizer.from_pretrained(next(iter(spec.submodule_search_locations)), gguf_file=bundled.source)
    tok.eos_token = tok.pad_token = IM_END
    tok.chat_template = tok.chat_template or CHATML_TEMPLATE
    tok.model_max_length = 2048
    folder = workdir / "model"
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, **TINY_LLAMA)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(workdir: Path, model_dir: Path, pairs: int) -> dict[str, Any]:
    """Render the chatterbot pairs once with lmtune; write what every variant reads.

    ``train.jsonl`` (a seeded sample of ``pairs`` pairs that fit max_length, a multiple of the batch size, in
    corpus order; TRL's conversational shape, read by both lmtune and TRL), ``tokens.jsonl`` (lmtune's token ids
    of the same pairs: prompt, chosen and rejected ids and the length lmtune batches by) and ``heldout.jsonl``
    (other pairs: lmtune's validation and test files).
    """
    from lmtune.config import DataConfig
    from lmtune.data.bundled import resolve_bundled_data
    from lmtune.data.preference import read_preference_pairs, render_pair
    from lmtune.models.registry import load_padded_tokenizer

    tok = load_padded_tokenizer(model_dir)
    source = str(resolve_bundled_data("chatterbot_pairs"))
    read, _ = read_preference_pairs(source, DataConfig(train=source))
    kept = [(p, r) for p in read if (r := render_pair(tok, p, max_length=MAX_LENGTH, too_long="skip")) is not None]
    for _, r in kept:  # the loss runs from the first answer token to the end of each row
        for side in (r.chosen, r.rejected):
            assert all(x != -100 for x in side.labels[side.prompt_tokens:]), "answer tokens without loss"
    picked = sorted(random.Random(SEED).sample(range(len(kept)), min(len(kept), pairs + HELD_OUT)))
    train_idx = picked[: len(picked) - HELD_OUT]
    train_idx = train_idx[: len(train_idx) // BATCH_SIZE * BATCH_SIZE]
    held_idx = picked[len(picked) - HELD_OUT:]

    def record(p: Any) -> dict[str, Any]:
        return {"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}]}

    with (workdir / "train.jsonl").open("w", encoding="utf-8") as train, \
            (workdir / "tokens.jsonl").open("w", encoding="utf-8") as ids:
        for i in train_idx:
            p, r = kept[i]
            train.write(json.dumps(record(p), ensure_ascii=False) + "\n")
            n = r.chosen.prompt_tokens
            ids.write(json.dumps({"prompt_ids": r.chosen.input_ids[:n], "chosen_ids": r.chosen.input_ids[n:],
                                  "rejected_ids": r.rejected.input_ids[r.rejected.prompt_tokens:],
                                  "length": max(len(r.chosen.input_ids), len(r.rejected.input_ids))}) + "\n")
    held = "".join(json.dumps(record(kept[i][0]), ensure_ascii=False) + "\n" for i in held_idx)
    (workdir / "heldout.jsonl").write_text(held, encoding="utf-8")
    rendered = [kept[i][1] for i in train_idx]
    tokens = sum(len(r.chosen.input_ids) + len(r.rejected.input_ids) for r in rendered)
    answers = sum(len(s.input_ids) - s.prompt_tokens for r in rendered for s in (r.chosen, r.rejected))
    every = sum(len(r.chosen.input_ids) + len(r.rejected.input_ids) for _, r in kept)
    return {"pairs": len(train_idx), "pairs_fitting": len(kept), "pairs_read": len(read),
            "tokens": tokens, "tokens_all_fitting": every, "mean_row_tokens": tokens / (2 * len(train_idx)),
            "mean_prompt_tokens": statistics.mean(r.chosen.prompt_tokens for r in rendered),
            "answer_fraction": answers / tokens}


# ------------------------------------------------------------------------------------------ children
def vm_kib(field: str = "VmHWM") -> int:
    """A memory field of this process from /proc/self/status (KiB): ``VmHWM``, the peak resident set since start
    or since the last reset, or ``VmRSS``, the resident set now."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next((int(line.split()[1]) for line in f if line.startswith(f"{field}:")), 0)


def reset_vm_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StepLog:
    """Per-step end times, token counts and seconds in the loss call, recorded identically for every variant."""

    def __init__(self, steps: int, warmup: int, profile: bool = False) -> None:
        self.steps, self.warmup = steps, warmup
        self.times: list[float] = []
        self.tokens: list[int] = []  # real (non-pad) tokens per step, both rows of every pair
        self.slots: list[int] = []  # tokens the step computed on, padding included
        self.computed: list[int] = []  # tokens the step computed on, padding excluded
        self.loss_seconds: list[float] = []  # inside the loss call (forward passes + loss) per step
        self.step_hwm_reset = False
        self.step_peak_kib = 0
        self.step_start_rss_kib = 0  # resident when the first step starts: the steps' peak minus it is theirs
        self.before_steps_peak_kib = 0  # the peak before the steps (loading, tokenising, precompute)
        self.precompute: list[dict[str, Any]] = []  # {"pairs", "seconds"} per reference pass
        # Step 1's mean summed log-probs of the chosen and the rejected answers (the policy is still the starting
        # model then): equal across variants only if they train on the same pairs, tokens and model.
        self.first_logps: list[float] | None = None
        self.profiler: Any = None
        self.profile_table = ""
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            self.profiler = torch_profile(activities=[ProfilerActivity.CPU])

    def batch(self, real: int, slots: int, computed: int | None = None) -> None:
        """Called once per trained batch (one batch per optimizer step: no gradient accumulation); ``computed``:
        the non-pad tokens the forward ran on, when fewer than ``real`` (lmtune's rows hold the prompt once)."""
        if not self.tokens:
            self.before_steps_peak_kib = vm_kib("VmHWM")
            self.step_start_rss_kib = vm_kib("VmRSS")
            self.step_hwm_reset = reset_vm_hwm()
        self.tokens.append(real)
        self.slots.append(slots)
        self.computed.append(real if computed is None else computed)

    def timed_loss(self, call: Any) -> Any:
        """Run the loss call, adding its seconds to the step's."""
        start = time.perf_counter()
        out = call()
        self.loss_seconds.append(time.perf_counter() - start)
        return out

    def step_end(self) -> None:
        """Called at the end of each optimizer step."""
        self.times.append(time.perf_counter())
        if self.profiler is not None and len(self.times) == self.warmup:
            self.profiler.start()
        if len(self.times) == self.steps:
            self.step_peak_kib = vm_kib("VmHWM")
            if self.profiler is not None:
                self.profiler.stop()
                self.profile_table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)

    def result(self) -> dict[str, Any]:
        """Steady-state real tokens/s after the warm-up steps, per-step records, precompute, step peak."""
        n, w = len(self.times), self.warmup
        if n != self.steps:
            raise RuntimeError(f"{n} optimizer steps timed, expected {self.steps}")
        seconds = self.times[-1] - self.times[w - 1]
        return {"steps": n, "steps_timed": n - w, "timed_seconds": seconds,
                "tokens_per_second": sum(self.tokens[w:n]) / seconds,
                "seconds_per_step": seconds / (n - w), "loss_seconds_per_step": statistics.mean(self.loss_seconds[w:n]),
                "real_tokens": sum(self.tokens[:n]), "slot_tokens": sum(self.slots[:n]),
                "computed_tokens": sum(self.computed[:n]),
                "step_tokens": self.tokens[:n], "step_slots": self.slots[:n],
                "step_seconds": [b - a for a, b in itertools.pairwise(self.times)],
                "step_peak_kib": self.step_peak_kib if self.step_hwm_reset else None,
                "step_start_rss_kib": self.step_start_rss_kib, "before_steps_peak_kib": self.before_steps_peak_kib,
                "precompute": self.precompute, "first_logps": self.first_logps, "profile": self.profile_table}


def lmtune_batches(lengths: list[int]) -> list[int]:
    """lmtune's training order (epoch 0, same lengths and seed), flattened; every batch is full."""
    from lmtune.data.features import LengthGroupedBatchSampler

    batches = LengthGroupedBatchSampler(lengths, BATCH_SIZE, seed=SEED).batches()
    assert all(len(b) == BATCH_SIZE for b in batches), "a short batch would shift TRL's batches"
    return [i for batch in batches for i in batch]


def child_trl(workdir: Path, model_dir: Path, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One DPOTrainer run on the conversational pairs (TRL tokenises them; checked equal to lmtune's ids)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer
    from trl.trainer import dpo_trainer

    from lmtune.models.registry import load_padded_tokenizer

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    records = [json.loads(line) for line in (workdir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    ids = [json.loads(line) for line in (workdir / "tokens.jsonl").read_text(encoding="utf-8").splitlines()]
    tok = load_padded_tokenizer(model_dir)  # lmtune's tokenizer object: same pad token and template
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    log = StepLog(args.steps, args.warmup_steps, profile=args.profile == variant)
    losses: list[float] = []
    order = lmtune_batches([r["length"] for r in ids])

    class Timing(TrainerCallback):
        def on_step_end(self, targs: Any, state: Any, control: Any, **kwargs: Any) -> None:
            log.step_end()

        def on_log(self, targs: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
            if logs and "logps/chosen" in logs and log.first_logps is None:
                log.first_logps = [float(logs["logps/chosen"]), float(logs["logps/rejected"])]

    class Counting(DPOTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            mask = inputs["attention_mask"]  # (2B, T): chosen rows then rejected rows
            log.batch(int(mask.sum()), mask.numel())
            return super().training_step(model, inputs, *a, **k)

        def compute_loss(self, *a: Any, **k: Any) -> Any:
            return log.timed_loss(lambda: super(Counting, self).compute_loss(*a, **k))

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return order

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            start = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            log.precompute.append({"split": name, "pairs": len(dataset), "seconds": time.perf_counter() - start})
            return out

    hash_module = dpo_trainer.hash_module

    def timed_hash(module: Any) -> str:
        # With precompute_ref_log_probs, DPOTrainer hashes every weight (the cache key): part of the precompute.
        start = time.perf_counter()
        out = hash_module(module)
        log.precompute.append({"split": "train", "what": "hash_module", "seconds": time.perf_counter() - start})
        return out

    dpo_trainer.hash_module = timed_hash
    method = "lora" if args.lora else "full"
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix=f"{variant}-", dir=workdir), max_steps=args.steps,
        per_device_train_batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE[method], weight_decay=WEIGHT_DECAY,
        warmup_steps=round(WARMUP_RATIO * args.steps), lr_scheduler_type="linear", max_grad_norm=1.0, seed=SEED,
        optim="adamw_torch_fused", bf16=False, gradient_checkpointing=False,  # DPOConfig's defaults are True
        eval_strategy="no", save_strategy="no", logging_steps=1, report_to="none", dataloader_num_workers=0,
        use_cpu=True, disable_tqdm=True, max_length=MAX_LENGTH, beta=BETA, loss_type=["sigmoid"],
        precompute_ref_log_probs=variant == "trl_dpo_precompute",
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM") if args.lora else None
    trainer = Counting(model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tok,
                       callbacks=[Timing()], peft_config=peft_config)
    built = trainer.train_dataset
    for i, (row, want) in enumerate(zip(built, ids, strict=True)):
        got = (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        if got != (want["prompt_ids"], want["chosen_ids"], want["rejected_ids"]):
            raise SystemExit(f"pair {i}: TRL's token ids differ from lmtune's")
    trainer.train()
    return {**log.result(), "first_loss": losses[0] if losses else None, "losses": losses,
            "same_token_ids": len(ids), "reference_model": trainer.ref_model is not None,
            "threads": torch.get_num_threads()}


def child_lmtune(workdir: Path, model_dir: Path, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``lmtune.train`` run, task dpo; independent timing through small patches outside its code."""
    import torch

    import lmtune
    from lmtune.tasks.dpo.task import DPOTask
    from lmtune.tasks.preference import PairTask
    from lmtune.training import loop as loop_mod

    log = StepLog(args.steps, args.warmup_steps, profile=args.profile == variant)
    original_loss, original_setup = DPOTask.loss, loop_mod.TrainingLoop.setup
    original_pass = PairTask._reference_pass

    def loss(self: Any, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # One row per pair (the prompt once, then both answers): the real tokens are both answers' rows as TRL
        # holds them (num_real_tokens), the slots what the forward computed on.
        mask = batch["attention_mask"]
        log.batch(int(batch["num_real_tokens"].sum()) if "num_real_tokens" in batch else int(mask.sum()),
                  mask.numel(), int(mask.sum()))
        if log.first_logps is None:  # step 1: the policy is the starting model, whose log-probs are cached
            reference = self.reference["train"][batch["index"].cpu()]  # (B, 2): chosen, rejected
            log.first_logps = [float(x) for x in reference.double().mean(dim=0)]
        return log.timed_loss(lambda: original_loss(self, model, batch))

    def setup(self: Any) -> None:
        original_setup(self)
        zero_grad = self.optimizer.zero_grad

        def timed_zero_grad(*a: Any, **k: Any) -> Any:
            out = zero_grad(*a, **k)  # the last call of lmtune's optimizer step
            log.step_end()
            return out

        self.optimizer.zero_grad = timed_zero_grad

    def reference_pass(self: Any, model: Any, accelerator: Any, dataset: Any, *a: Any, **k: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = original_pass(self, model, accelerator, dataset, *a, **k)
        log.precompute.append({"pairs": len(dataset), "seconds": time.perf_counter() - start})
        return out

    DPOTask.loss = loss  # type: ignore[method-assign]
    loop_mod.TrainingLoop.setup = setup  # type: ignore[method-assign]
    PairTask._reference_pass = reference_pass  # type: ignore[method-assign]
    method = {"name": "lora", **LORA, "target_modules": "all-linear", "merge": False} if args.lora else {"name": "full"}
    held = str(workdir / "heldout.jsonl")
    run = lmtune.train({
        "task": "dpo", "model": str(model_dir), "method": method,
        "data": {"train": str(workdir / "train.jsonl"), "validation": held, "test": held, "max_length": MAX_LENGTH,
                 "too_long": "skip", "deduplicate": False},
        "preference": {"loss": "sigmoid", "beta": BETA},
        "train": {"max_steps": args.steps, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE[method["name"]],
                  "weight_decay": WEIGHT_DECAY, "warmup_ratio": WARMUP_RATIO, "max_grad_norm": 1.0, "seed": SEED,
                  "precision": "fp32", "num_threads": args.threads, "log_every": 1,
                  "eval_every": 10**9, "save_every": 10**9},  # evaluate and save only after the last step
        "generation": {"max_new_tokens": 4, "eval_examples": 2},
        "output_dir": tempfile.mkdtemp(prefix=f"{variant}-", dir=workdir),
    }, show_progress=False)
    records = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    out = log.result()
    pairs = sum(1 for _ in (workdir / "train.jsonl").open(encoding="utf-8"))
    # The train split's pass: the one over as many pairs as the training file holds (held-out files are smaller).
    for p in out["precompute"]:
        p["split"] = "train" if p["pairs"] == pairs else "held-out"
    if not any(p["split"] == "train" for p in out["precompute"]):
        raise SystemExit(f"lmtune's train split is not the {pairs} pairs of train.jsonl: {out['precompute']}")
    return {**out, "first_loss": train[0]["loss"], "losses": [r["loss"] for r in train],
            "reference_model": False, "threads": torch.get_num_threads()}


def run_child(argv: list[str], workdir: Path, threads: int, mmap_threshold: int | None = None) -> dict[str, Any]:
    """Run this script as a child; its result plus peak RSS (``ru_maxrss`` from wait4) and wall time.

    ``mmap_threshold``: glibc's MALLOC_MMAP_THRESHOLD_ in the child. By default glibc raises its threshold as big
    blocks are freed, then keeps freed tensors in its heap, so the RSS peak depends on the order of allocations
    (the same run measured 4.1 to 5.3 GiB); a fixed threshold returns every bigger block to the system when it is
    freed, so RSS follows the live tensors (steadier peaks, slower steps: for memory runs).
    """
    result_path = Path(tempfile.mkstemp(prefix="result-", suffix=".json", dir=workdir)[1])
    log_path = result_path.with_suffix(".log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", *argv, "--result", str(result_path)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"child {argv[0]} failed; log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    # Resetting VmHWM at the first step also resets what ru_maxrss reports at exit (both read the same high-water
    # mark), so the whole process's peak is the larger of the two peaks.
    peak = max(usage.ru_maxrss, result.get("before_steps_peak_kib", 0))
    return {**result, "peak_rss_kib": peak, "process_seconds": time.perf_counter() - start,
            "log": str(log_path)}


# ------------------------------------------------------------------------------------------ report
def train_precompute(run: dict[str, Any]) -> float:
    """Seconds the run spent computing the reference log-probs of the training pairs (0 without a precompute)."""
    return sum(p["seconds"] for p in run["precompute"] if p.get("split") == "train")


def whole_run_tps(steady: float, precompute_s: float, tokens: int, epochs: int) -> float:
    """Tokens/s over ``epochs`` epochs of ``tokens`` real tokens, the one-time precompute included."""
    return epochs * tokens / (precompute_s + epochs * tokens / steady)


def summarise(runs: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """Per variant: medians (min, max) of steady tokens/s, precompute, whole-run tokens/s, memory; first loss."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name]
        tps = [r["tokens_per_second"] for r in rs]
        s: dict[str, Any] = {
            "repeats": len(rs), "steps_timed": rs[0]["steps_timed"],
            "tokens_per_second": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)},
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs),
            "loss_seconds_per_step": statistics.median(r["loss_seconds_per_step"] for r in rs),
            "pad_fraction": statistics.median(1 - r.get("computed_tokens", r["real_tokens"]) / r["slot_tokens"]
                                              for r in rs),
            "computed_tokens_per_step": statistics.median(r.get("computed_tokens", r["real_tokens"]) / r["steps"]
                                                          for r in rs),
            "real_tokens_per_step": statistics.median(r["real_tokens"] / r["steps"] for r in rs),
            "precompute_seconds": statistics.median(train_precompute(r) for r in rs),
            "peak_rss_gib": statistics.median(r["peak_rss_kib"] / 2**20 for r in rs),
            "first_loss": rs[0]["first_loss"], "reference_model": rs[0]["reference_model"],
        }
        steps_peak = [r["step_peak_kib"] for r in rs if r["step_peak_kib"] is not None]
        s["step_peak_gib"] = statistics.median(steps_peak) / 2**20 if steps_peak else None
        at_start = [r["step_start_rss_kib"] for r in rs if r.get("step_start_rss_kib")]  # older JSON lacks it
        s["step_start_rss_gib"] = statistics.median(at_start) / 2**20 if at_start else None
        for e in EPOCHS:  # per run, then the median
            s[f"tokens_per_second_{e}_epoch"] = statistics.median(
                whole_run_tps(r["tokens_per_second"], train_precompute(r), tokens, e) for r in rs)
        out[name] = s
    return out


def ratios(summary: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """lmtune / each TRL variant: steady and whole-run tokens/s, peak memory (whole process and steps).

    Besides the ratio of the medians, the steady ratio of each round (the lmtune run over the TRL run of the same
    round, minutes apart): on a machine shared with other jobs the load drifts between rounds, and the ratio
    within a round is the steadier figure (median, min, max over rounds).
    """
    if "lmtune_dpo" not in summary:
        return {}
    lm = summary["lmtune_dpo"]
    by_round = {(r["variant"], r["repeat"]): r["tokens_per_second"] for r in runs}
    out: dict[str, dict[str, Any]] = {}
    for name, s in summary.items():
        if name == "lmtune_dpo":
            continue
        per_round = [by_round[("lmtune_dpo", k)] / by_round[(name, k)] for v, k in by_round
                     if v == name and ("lmtune_dpo", k) in by_round]
        r: dict[str, Any] = {
            "tokens_per_second": lm["tokens_per_second"]["median"] / s["tokens_per_second"]["median"],
            "tokens_per_second_per_round": {"median": statistics.median(per_round), "min": min(per_round),
                                            "max": max(per_round), "rounds": per_round},
            "peak_rss": lm["peak_rss_gib"] / s["peak_rss_gib"]}
        for e in EPOCHS:
            r[f"tokens_per_second_{e}_epoch"] = lm[f"tokens_per_second_{e}_epoch"] / s[f"tokens_per_second_{e}_epoch"]
        if lm["step_peak_gib"] and s["step_peak_gib"]:
            r["step_peak"] = lm["step_peak_gib"] / s["step_peak_gib"]
        out[name] = r
    return out


def agreement(runs: list[dict[str, Any]]) -> str:
    """Whether the variants trained on the same pairs: step-1 loss (log 2 for every DPO run: the policy is the
    reference), step-1 mean log-probs of the chosen and rejected answers, and the largest loss difference to
    lmtune over all steps (same weights, batches, optimizer and schedule: only float summation order differs)."""
    first = {r["variant"]: r for r in runs if r["repeat"] == 0}
    lines = []
    for name, r in first.items():
        logps = r["first_logps"] or [float("nan")] * 2
        line = (f"{name}: step-1 loss {r['first_loss']:.7f}, step-1 mean log-prob chosen {logps[0]:.5f} "
                f"rejected {logps[1]:.5f}")
        if name != "lmtune_dpo" and "lmtune_dpo" in first:
            diff = max(abs(a - b) for a, b in zip(r["losses"], first["lmtune_dpo"]["losses"], strict=True))
            line += f"; largest loss difference to lmtune_dpo over {len(r['losses'])} steps {diff:.2e}"
        lines.append(line)
    return "\n".join(lines)


def markdown_tables(summary: dict[str, Any], rel: dict[str, dict[str, Any]]) -> str:
    """The results as two Markdown tables: per variant, and lmtune over each TRL variant."""
    lines = ["| variant | steady tokens/s, median (min-max) | s/step (in loss call) | precompute | tokens/s, 1 epoch "
             "| tokens/s, 3 epochs | peak RSS | peak RSS during steps (RSS at step 1) | step-1 loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        t = s["tokens_per_second"]
        loss = f"{s['first_loss']:.6f}" if s["first_loss"] is not None else "-"
        step_peak = f"{s['step_peak_gib']:.2f} GiB" if s["step_peak_gib"] else "-"
        if s["step_start_rss_gib"]:
            step_peak += f" ({s['step_start_rss_gib']:.2f})"
        pre = f"{s['precompute_seconds']:.1f} s" if s["precompute_seconds"] else "- (every step)"
        lines.append(f"| {name} | {t['median']:,.0f} ({t['min']:,.0f}-{t['max']:,.0f}) | "
                     f"{s['seconds_per_step']:.2f} ({s['loss_seconds_per_step']:.2f}) | {pre} | "
                     f"{s['tokens_per_second_1_epoch']:,.0f} | {s['tokens_per_second_3_epoch']:,.0f} | "
                     f"{s['peak_rss_gib']:.2f} GiB | {step_peak} | {loss} |")
    if rel:
        lines += ["", "| lmtune_dpo / | steady tokens/s | steady, same round: median (min-max) | tokens/s, 1 epoch "
                  "| tokens/s, 3 epochs | peak RSS | peak RSS during steps |", "|---|---|---|---|---|---|---|"]
        for name, r in rel.items():
            step = f"{r['step_peak']:.2f}" if "step_peak" in r else "-"
            pr = r["tokens_per_second_per_round"]
            lines.append(f"| {name} | {r['tokens_per_second']:.2f}x | {pr['median']:.2f}x ({pr['min']:.2f}-"
                         f"{pr['max']:.2f}) | {r['tokens_per_second_1_epoch']:.2f}x | "
                         f"{r['tokens_per_second_3_epoch']:.2f}x | {r['peak_rss']:.2f} | {step} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per run (warm-up included)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps excluded from timing")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the variants (alternating)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in every child (OMP_NUM_THREADS too); 1 is steadier on a shared machine")
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                   help="smollm2: the bundled SmolLM2-135M-Instruct; tiny: a 2-layer Llama with its tokenizer")
    p.add_argument("--lora", action="store_true", help="LoRA (r 16, all linear layers) instead of full fine-tuning")
    p.add_argument("--pairs", type=int, default=56,
                   help="training pairs (rounded down to a multiple of the batch size): the precompute covers them")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--profile", choices=VARIANTS, default=None,
                   help="run only this variant once, under torch.profiler for the steps after warm-up")
    p.add_argument("--output", type=Path, default=None, help="write the summary and every run as JSON here")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, model, logs and runs here")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc MALLOC_MMAP_THRESHOLD_ in the children (e.g. 131072): RSS follows live tensors; "
                   "steadier memory peaks, slower steps (for memory runs, not timing)")
    p.add_argument("--report", type=Path, default=None,
                   help="print the tables of a saved --output JSON again (with this version's summary) and exit")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 3 steps, 1 repeat, 16 pairs: checks that every variant runs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.warmup_steps, args.repeats, args.pairs = "tiny", 3, 1, 1, 16
    if args.profile:
        args.variants, args.repeats = [args.profile], 1
    if not 1 <= args.warmup_steps < args.steps:
        p.error("need 1 <= --warmup-steps < --steps")
    if args.pairs < args.steps * BATCH_SIZE:
        p.error(f"--pairs must cover the steps without a second epoch: at least {args.steps * BATCH_SIZE}")
    return args


def child_argv(variant: str, args: argparse.Namespace, workdir: Path, model_dir: Path) -> list[str]:
    """The child's command line: the variant and the settings every child shares."""
    argv = [variant, "--workdir", str(workdir), "--model-dir", str(model_dir), "--steps", str(args.steps),
            "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads), "--pairs", str(args.pairs)]
    return argv + (["--lora"] if args.lora else []) + (["--profile", args.profile] if args.profile else [])


def main(argv: list[str] | None = None) -> None:
    """Build the model and data once, run the variants alternately in subprocesses, report."""
    args = parse_args(argv)
    if args.child is not None:
        child = child_lmtune if args.child.startswith("lmtune") else child_trl
        result = child(args.workdir, args.model_dir, args.child, args)
        args.result.write_text(json.dumps(result), encoding="utf-8")
        return

    if args.report is not None:
        saved = json.loads(args.report.read_text(encoding="utf-8"))
        summary = summarise(saved["runs"], saved["settings"]["tokens"])
        print(markdown_tables(summary, ratios(summary, saved["runs"])) + "\n\n" + agreement(saved["runs"]))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_dir = build_model(workdir, args.model)
    data = write_data(workdir, model_dir, args.pairs)
    load_before = os.getloadavg()
    print(f"workdir {workdir}; model {model_dir}; {'LoRA' if args.lora else 'full fine-tuning'}; {data['pairs']} "
          f"pairs of {data['pairs_fitting']} that fit {MAX_LENGTH} tokens, mean row {data['mean_row_tokens']:.0f} "
          f"tokens (prompt {data['mean_prompt_tokens']:.0f}), {100 * data['answer_fraction']:.0f}% carry loss; "
          f"{args.threads} thread(s); load average {load_before[0]:.2f}", file=sys.stderr)
    runs = []
    for repeat in range(args.repeats):
        for variant in args.variants:
            run = run_child(child_argv(variant, args, workdir, model_dir), workdir, args.threads,
                            args.mmap_threshold)
            runs.append({**run, "variant": variant, "repeat": repeat, "load_average": os.getloadavg()[0]})
            pre = train_precompute(run)
            step_peak = f"{run['step_peak_kib'] / 2**20:.2f}" if run["step_peak_kib"] else "-"
            print(f"[{time.time() - started:5.0f}s] {repeat} {variant:<19} {run['tokens_per_second']:7,.0f} real "
                  f"tokens/s, {run['seconds_per_step']:.2f} s/step ({run['loss_seconds_per_step']:.2f} in loss), "
                  f"precompute {pre:.1f}s, peak RSS {run['peak_rss_kib'] / 2**20:.2f} GiB (steps {step_peak}), "
                  f"step-1 loss {run['first_loss']}, {run['process_seconds']:.0f}s", file=sys.stderr)
            if run["profile"]:
                print(run["profile"])
    summary = summarise(runs, data["tokens"])
    rel = ratios(summary, runs)
    table = markdown_tables(summary, rel)
    print()
    print(table)
    print("\n" + agreement(runs))
    load_after = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; total {time.time() - started:.0f}s")
    if args.output:
        import torch
        import transformers
        import trl

        result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "settings": {"steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
                               "threads": args.threads, "model": args.model, "lora": args.lora,
                               "mmap_threshold": args.mmap_threshold,
                               "batch_size": BATCH_SIZE, "max_length": MAX_LENGTH, "beta": BETA, "seed": SEED, **data},
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "trl": trl.__version__},
                  "load_average": [load_before[0], load_after[0]], "table": table, "summary": summary,
                  "ratios": rel, "runs": runs}
        args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
