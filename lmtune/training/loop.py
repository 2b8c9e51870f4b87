"""The one training loop, for every task and method, on Accelerate.

Phases: ``setup`` (optimizer, schedule, data loaders, Accelerate) -> ``fit``
(optimizer steps with periodic evaluation, best-checkpoint tracking, early
stopping, checkpoints) -> ``restore_best``. Tasks plug in through the
:class:`~lmtune.tasks.base.Task` protocol; nothing here knows what a label is.

Loss normalisation. The task returns the *sum* of per-item losses of a
micro-batch and says how many items (examples, or target tokens) it holds. One
optimizer step covers ``gradient_accumulation`` micro-batches on every process;
the loop counts the items of the whole step first, then back-propagates
``loss_sum * world_size / items_in_step`` for each micro-batch. DDP averages
gradients over processes, so the result is exactly the gradient of the mean
loss over the whole global batch, however it is split (batch 8 x accumulation 1
equals batch 4 x accumulation 2; tested).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DistributedType, gather_object
from torch.utils.data import DataLoader, Sampler
from transformers import get_scheduler

from lmtune.config import Config, TrainConfig
from lmtune.data.features import LengthGroupedBatchSampler, SortedBatchSampler
from lmtune.errors import LmtuneError
from lmtune.models import encoder_attention
from lmtune.models.dropout import use_fast_dropout
from lmtune.models.methods import require_bitsandbytes_on_cuda
from lmtune.tasks.base import Task, TaskData
from lmtune.training import checkpoint as ckpt
from lmtune.training import host_memory, privacy

log = logging.getLogger(__name__)


class TrainingError(LmtuneError):
    """Training cannot go on (non-finite loss, ...)."""


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed (per process)
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    best_loss: float | None = None  # validation loss at the best step (breaks ties)
    evals_without_improvement: int = 0
    tokens_seen: int = 0  # real (non-pad) training tokens, all processes
    train_seconds: float = 0.0
    stopped_early: bool = False
    # The open logging window (sums since the last train log row), so a resumed run logs
    # exactly what the uninterrupted one does.
    window_loss: float = 0.0
    window_items: float = 0.0
    window_tokens: int = 0
    # data.streaming: micro-batches in one pass over the stream, once a pass has ended (for the epoch figure).
    stream_epoch_batches: int | None = None
    # Updates skipped for a non-finite loss/gradient (train.nonfinite: skip); where is in metrics.jsonl.
    skipped_steps: int = 0
    # The step at which the on_evaluate hook stopped the run (a pruned search trial); None otherwise.
    stopped_by_hook_at: int | None = None


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only) and to trackers."""

    def __init__(self, path: Path, accelerator: Any) -> None:
        self.path = path
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        """Log one record, e.g. ``{"step": 10, "split": "train", "loss": 0.4}``."""
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=float) + "\n")
        scalars = {
            f"{record.get('split', 'train')}/{k}": v
            for k, v in record.items()
            if isinstance(v, (int, float)) and k not in ("step", "epoch")
        }
        if scalars and self.accelerator.trackers:
            self.accelerator.log(scalars, step=record.get("step"))


def param_groups(model: torch.nn.Module, config: Config, head_names: set[str]) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norms; optional own learning rate for the new head;
    with ``method.loraplus_lr_ratio`` (LoRA+), the LoRA B matrices at ``learning_rate`` times the ratio."""
    t = config.train
    ratio = config.method.loraplus_lr_ratio
    groups: dict[tuple[bool, bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        is_head = any(part in head_names for part in name.split("."))
        # peft names them <module>.lora_B.<adapter>.weight (lora_embedding_B.<adapter> on embeddings).
        is_lora_b = ratio is not None and any(part in ("lora_B", "lora_embedding_B") for part in name.split("."))
        groups.setdefault((no_decay, is_head, is_lora_b), []).append(p)
    out = []
    for (no_decay, is_head, is_lora_b), params in groups.items():
        lr = t.head_learning_rate if (is_head and t.head_learning_rate) else t.learning_rate
        if is_lora_b and ratio is not None:
            lr = t.learning_rate * ratio
        out.append({"params": params, "weight_decay": 0.0 if no_decay else t.weight_decay, "lr": lr})
    if not out:
        raise TrainingError("no trainable parameters: check method.name and method.target_modules")
    return out


def check_optimizer_supported(train: TrainConfig) -> None:
    """Fail before anything loads when ``train.optimizer`` cannot run here (8-bit AdamW without CUDA)."""
    if train.optimizer == "adamw":
        return
    require_bitsandbytes_on_cuda(f"train.optimizer {train.optimizer}",
                                 f"train.optimizer {train.optimizer} keeps 8-bit optimizer states with bitsandbytes "
                                 "on a CUDA GPU; this machine has none", hint="use train.optimizer: adamw")


def build_optimizer(groups: list[dict[str, Any]], train: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names, over ``groups`` (:func:`param_groups`)."""
    if train.optimizer == "adamw":
        return _adamw(groups, train.learning_rate)
    check_optimizer_supported(train)
    # Imported here: bitsandbytes is optional (CUDA only), and importing it probes the GPU.
    bnb_optim = importlib.import_module("bitsandbytes.optim")
    optimizer_class = bnb_optim.PagedAdamW8bit if train.optimizer == "paged_adamw_8bit" else bnb_optim.AdamW8bit
    return cast(torch.optim.Optimizer, optimizer_class(groups, lr=train.learning_rate))


def clip_grad_norm(accelerator: Any, parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` and return the norm before clipping, as
    ``accelerator.clip_grad_norm_`` does; on the CPU without sharding, the gradients are left alone when the
    clip factor would be 1. torch multiplies every gradient by the factor clamped to 1 (on a GPU that saves a
    host sync), which on the CPU is a pass over all gradients changing nothing: ~3 ms of a ~195 ms MiniLM
    step, a 47 MB embedding gradient included; most fine-tuning steps stay below the usual max norm of 1.
    Same tensors bit for bit (the factor is computed as torch computes it)."""
    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU)
    if accelerator.device.type != "cpu" or not plain or accelerator.scaler is not None:
        return cast(torch.Tensor, accelerator.clip_grad_norm_(parameters, max_norm))
    params = list(parameters)  # clip_grads_with_norm_ skips those without a gradient, as clip_grad_norm_ does
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0)
    if bool(max_norm / (total + 1e-6) < 1.0):  # torch's clip factor before its clamp to 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where torch has it (CPU and CUDA): several times faster
    than the per-tensor loop on big embedding tables, same arithmetic."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


class TrainingLoop:
    """Trains ``model`` on ``data`` for ``task`` according to ``config.train``."""

    def __init__(
        self,
        *,
        task: Task,
        model: torch.nn.Module,
        tokenizer: Any,
        data: TaskData,
        config: Config,
        run_dir: Path,
        accelerator: Any,
        metrics_log: MetricsLog,
        head_names: set[str] | None = None,
        on_evaluate: Callable[[int, dict[str, Any]], bool] | None = None,
    ) -> None:
        self.task = task
        # Called after each validation evaluation with (step, metrics); True stops training there, as early
        # stopping does (lmtune tune prunes poor trials through it). It must answer alike on every process.
        self.on_evaluate = on_evaluate
        self.last_validation: dict[str, Any] = {}
        self.model = model
        self.tokenizer = tokenizer
        self.data = data
        self.config = config
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.metrics_log = metrics_log
        self.head_names = head_names or set()
        self.state = LoopState()
        self.checkpoint_dir = run_dir / "checkpoints"
        self.metric, self.greater_is_better = config.train.resolved_metric(task.info.default_metric)
        # train.privacy: DP-SGD (lmtune/training/privacy.py); set up in `setup`, None without it.
        self.privacy: privacy.PrivateTraining | None = None

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Build optimizer, schedule and loaders, and hand them to Accelerate."""
        t = self.config.train
        collate = self.task.collator(self.tokenizer)
        # data.streaming: the training split is a stream with no length (lmtune.data.streaming).
        self.streaming = isinstance(self.data.splits["train"], torch.utils.data.IterableDataset)
        self.train_sampler = None if self.streaming else LengthGroupedBatchSampler(
            self.data.lengths["train"],
            t.batch_size,
            seed=t.seed,
            group_by_length=t.group_by_length,
        )
        train_collate = collate
        if t.privacy is not None:  # DP: Poisson-sampled batches (possibly empty) instead of length groups
            self.privacy = privacy.PrivateTraining(t.privacy, train_size=len(self.data.splits["train"]),
                                                   batch_size=t.batch_size, seed=t.seed)
            self.train_sampler = self.privacy.batch_sampler(list(self.data.lengths["train"]))
            train_collate = self.privacy.collator(collate)
        # A private generator: DataLoader iterators otherwise draw from the global RNG,
        # which would shift dropout masks between a resumed and an uninterrupted run.
        # Batches carry the training split's indices of their examples (`example_ids`), so a
        # non-finite loss can name them; the loop takes them out before the task sees the batch.
        train_loader = DataLoader(
            self.data.splits["train"], batch_size=t.batch_size, collate_fn=collate, num_workers=t.num_workers,
        ) if self.train_sampler is None else DataLoader(
            _WithIndex(self.data.splits["train"]),
            batch_sampler=VariableSizeBatches(self.train_sampler),
            collate_fn=_CollateWithIds(train_collate),
            num_workers=t.num_workers,
            generator=torch.Generator().manual_seed(t.seed),
        )
        # Same size as training by default: larger eval buffers fragment the heap and raise the
        # training peak (measured +165 MiB on MiniLM; BENCHMARKS.md).
        eval_bs = t.eval_batch_size or t.batch_size
        self.eval_loaders: dict[str, DataLoader] = {}
        for split in ("validation", "test"):
            if split in self.data.splits and len(self.data.splits[split]):
                loader = DataLoader(
                    self.data.splits[split],
                    batch_sampler=SortedBatchSampler(self.data.lengths[split], eval_bs),
                    collate_fn=collate,
                    num_workers=t.num_workers,
                )
                self.eval_loaders[split] = self.accelerator.prepare_data_loader(loader)

        if t.fast_dropout and self.accelerator.device.type == "cpu":
            changed = use_fast_dropout(self.model)
            if changed:
                log.info("train.fast_dropout: %d dropout layers draw their masks with numpy's PCG64", changed)
                patched = encoder_attention.patch_attention(self.model)
                if patched:
                    log.info("%d encoder attention blocks draw their attention-dropout masks with numpy's PCG64",
                             patched)
        optimizer = build_optimizer(param_groups(self.model, self.config, self.head_names), t)
        if self.streaming:
            self._prepare_stream(optimizer, train_loader)
        else:
            self.model, self.optimizer, self.train_loader = self.accelerator.prepare(self.model, optimizer,
                                                                                     train_loader)

        self.steps_per_epoch: int | None = (None if self.streaming else
                                            max(1, math.ceil(len(self.train_loader) / t.gradient_accumulation)))
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * (self.steps_per_epoch or 1)))
        warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * self.total_steps)
        # Not prepared by Accelerate on purpose: it would step once per process; we step once per update.
        self.scheduler = get_scheduler(
            t.schedule, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps
        )
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.frozen = ckpt.FrozenWeights(self.accelerator, self.model)
        if self.privacy is not None:
            # DP: per-example gradients on the model; the optimizer inside Accelerate's wrapper clips and noises
            # them, with the noise calibrated to the planned steps (the scheduler shares its param groups).
            self.optimizer.optimizer = self.privacy.attach(self.model, self.optimizer.optimizer, self.total_steps)

    def _prepare_stream(self, optimizer: torch.optim.Optimizer, train_loader: DataLoader) -> None:
        """Accelerate for model and optimizer; the stream's loader only placed on the device.

        Each process already reads its own share of the stream (``split_dataset_by_node``), so the
        loader must not be split again (``IterableDatasetShard``: every process would read and
        tokenise everything) nor dispatched (one process would read for all).
        """
        ds_plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if ds_plugin is not None and ds_plugin.is_auto("train_micro_batch_size_per_gpu"):
            # DeepSpeed reads the micro-batch size from a prepared loader, which a stream does not pass.
            ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.config.train.batch_size
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.train_loader = prepare_data_loader(train_loader, self.accelerator.device, num_processes=1,
                                                process_index=0, put_on_device=True, dispatch_batches=False)

    def _next_on_every_process(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """The next batch, or None once the loader of any process has run out.

        Every process must take part in every step, or the gradient all-reduce would wait forever:
        the epoch ends for all as soon as one process's share runs out (the others drop the rest of
        theirs for this epoch).
        """
        batch = next(batches, None)
        acc = self.accelerator
        if acc.num_processes > 1:
            have = torch.tensor([0.0 if batch is None else 1.0], device=acc.device)
            if float(acc.gather(have).min()) == 0.0:
                return None
        return batch

    def _stream_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches of a stream from the current position onwards, pass after pass.

        Resuming re-reads the epoch (the same ``(seed, epoch)`` gives the same rows) and skips the
        batches already used. A pass ends for every process when one process's share runs out
        (:meth:`_next_on_every_process`); optimizer steps run on across a pass's end.
        """
        acc = self.accelerator
        stream = self.data.splits["train"]
        while True:
            loader = self.train_loader
            if self.state.batch_in_epoch:
                loader = acc.skip_first_batches(self.train_loader, self.state.batch_in_epoch)
            # Accelerate's loader hands its own pass counter to the dataset at every __iter__ (0 again in a
            # resumed process and in a skip-loader): set it to the epoch, and the stream too.
            loader.set_epoch(self.state.epoch)
            stream.set_epoch(self.state.epoch)
            batches = iter(loader)
            while (batch := self._next_on_every_process(batches)) is not None:
                self.state.batch_in_epoch += 1
                yield batch
            if self.state.batch_in_epoch == 0:
                raise TrainingError("the training stream gave no batch in a whole pass: " + _NO_BATCH_HINT)
            self.state.stream_epoch_batches = self.state.batch_in_epoch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # ----------------------------------------------------------------------------- resume
    def resume(self, path: Path) -> None:
        """Restore model, optimizer, schedule, RNG and data position from a checkpoint."""
        if not ckpt.is_complete(path):
            raise TrainingError(f"not a complete checkpoint: {path}")
        self.frozen.load(path)
        saved = ckpt.read_state(path)
        self.state = LoopState(**saved["loop"])
        if self.privacy is not None:  # the accountant's history: the resumed run spends what the whole one does
            self.privacy.load_state_dict(saved.get("privacy"), path.name)
        self.task.load_step_metrics_state(list(saved.get("task_window") or []), self.accelerator)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step, self.state.epoch,
                 self.state.batch_in_epoch)

    # ----------------------------------------------------------------------------- fit
    def _micro_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """Micro-batches from the current data position onwards, across epochs, each with whether it
        ends its epoch (a stream's never do: steps run on across a stream's pass).

        An epoch ends when the loader runs out (on any process), not when ``len()`` says: the two
        disagreed once (issue 13), and waiting for a batch that never came re-created the loader
        forever. One batch is read ahead to know that a batch is the epoch's last. ``state.batch_in_epoch``
        counts what was handed out; the epoch number moves on lazily, when the next batch is asked
        for, so a checkpoint taken right at an epoch's end resumes into the next epoch (the loader
        that skips the epoch's batches yields nothing).
        """
        if self.train_sampler is None:
            for item in self._stream_batches():
                yield item, False
            return
        while True:
            loader = self.train_loader
            if self.state.batch_in_epoch:
                loader = self.accelerator.skip_first_batches(self.train_loader, self.state.batch_in_epoch)
            # Accelerate's loaders re-seed the sampler from their own iteration counter at every
            # __iter__ (which restarts at 0 in a resumed process, and in a skip-loader): set both.
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.state.epoch)
            self.train_sampler.set_epoch(self.state.epoch)
            batches = iter(loader)
            batch: dict[str, torch.Tensor] | None = self._next_on_every_process(batches)
            if batch is None and self.state.batch_in_epoch == 0:
                raise TrainingError("the training data gave no batch in a whole epoch: " + _NO_BATCH_HINT)
            while batch is not None:
                following = self._next_on_every_process(batches)
                self.state.batch_in_epoch += 1
                yield batch, following is None
                batch = following
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def fit(self, progress: Any = None) -> LoopState:
        """Run optimizer steps until ``total_steps`` or early stopping; returns the final state."""
        cpu = self.accelerator.device.type == "cpu"
        if cpu:  # the steps' big tensors reuse their pages (lmtune.training.host_memory; no result changes)
            host_memory.retain_freed_memory()
        try:
            return self._fit(progress)
        finally:
            if cpu:
                host_memory.release_freed_memory()

    def _fit(self, progress: Any) -> LoopState:
        t = self.config.train
        acc = self.accelerator
        self.model.train()
        stream = self._micro_batches()
        window_start = time.perf_counter()
        task_bar = progress.add_task("train", total=self.total_steps, completed=self.state.step) if progress else None
        # A run resumed after it stopped early is finished: it must not train on.
        while self.state.step < self.total_steps and not self.state.stopped_early:
            step_start = time.perf_counter()
            micro: list[dict[str, torch.Tensor]] = []
            # A step ends early at an epoch's end (a short final step, as mainstream trainers do).
            epoch_end = False
            while len(micro) < t.gradient_accumulation and not epoch_end:
                batch, epoch_end = next(stream)
                micro.append(batch)
            counts = torch.tensor([0.0 if self.privacy is not None and privacy.is_empty(b) else
                                   float(self.task.num_items(b)) for b in micro], device=acc.device)
            total_items = acc.reduce(counts.sum(), reduction="sum").item()
            if total_items == 0 and self.privacy is None:  # an empty Poisson draw is a noise-only DP step
                raise TrainingError(f"step {self.state.step + 1}: no items carry loss in this batch")
            step_loss = torch.zeros((), device=acc.device)
            tokens = 0
            # (B,) indices into the training split, per micro-batch; only read if the step goes wrong.
            example_ids = [b.pop("example_ids", None) for b in micro]
            for i, batch in enumerate(micro):
                if self.privacy is not None and privacy.is_empty(batch):
                    continue
                last = i == len(micro) - 1
                ctx = acc.no_sync(self.model) if not last else _nullcontext()
                with ctx:
                    loss_sum = self.task.loss(self.model, batch)
                    # DP: each example's gradient of its own loss; the DP optimizer clips, sums, noises and
                    # divides by the expected batch size, so the item count must not scale it here.
                    acc.backward(loss_sum if self.privacy is not None else loss_sum * acc.num_processes / total_items)
                step_loss += loss_sum.detach().float()
                tokens += _real_tokens(batch)
            step_loss = acc.reduce(step_loss, reduction="sum")
            grad_norm = None
            if torch.isfinite(step_loss) and t.max_grad_norm is not None and self.privacy is None:
                grad_norm = clip_grad_norm(acc, self.model.parameters(), t.max_grad_norm)
            # Every process sees the same reduced loss and the same global norm, so all agree to skip.
            bad = "loss" if not torch.isfinite(step_loss) else (
                "gradient norm" if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)) else None)
            if bad is None:
                if self.privacy is not None:  # DP: check (or, for an empty draw, make) the per-example gradients
                    self.privacy.before_step(sum(len(ids) for ids in example_ids if ids is not None))
                self.optimizer.step()
            else:
                self._nonfinite_step(bad, step_loss if bad == "loss" else grad_norm, example_ids)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            tokens_all = int(acc.reduce(torch.tensor(tokens, device=acc.device), reduction="sum").item())
            self.state.tokens_seen += tokens_all
            self.state.train_seconds += time.perf_counter() - step_start

            st = self.state
            if bad is None:  # a skipped step's NaN would poison the logged mean
                st.window_loss += step_loss.item()
                st.window_items += total_items
            st.window_tokens += tokens_all
            if progress is not None:
                progress.update(task_bar, advance=1, loss=step_loss.item() / max(total_items, 1.0),
                                lr=self.scheduler.get_last_lr()[0])
            if self.state.step % t.log_every == 0 or self.state.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": self.state.step,
                    "epoch": round(self._epoch_float(), 4),
                    "split": "train",
                    "loss": st.window_loss / max(st.window_items, 1.0),
                    "learning_rate": self.scheduler.get_last_lr()[0],
                    "tokens_per_second": st.window_tokens / max(elapsed, 1e-9),
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                record.update(self.task.step_metrics())
                if self.privacy is not None:
                    record.update(self.privacy.log_figures())  # the epsilon spent so far
                self.metrics_log.write(record)
                if progress is not None:
                    progress.update(task_bar, tok_s=record["tokens_per_second"])
                log.debug("step %d loss %.4f", self.state.step, record["loss"])
                st.window_loss, st.window_items, st.window_tokens = 0.0, 0.0, 0
                window_start = time.perf_counter()

            last_step = self.state.step == self.total_steps
            # Default cadence: evaluate at each epoch's end, save whenever evaluating.
            regular_eval = epoch_end if t.eval_every is None else self.state.step % t.eval_every == 0
            due_eval = regular_eval or last_step
            due_save = due_eval if t.save_every is None else (self.state.step % t.save_every == 0 or last_step)
            saved = False
            if due_eval:
                improved = self._evaluate_and_track()
                if improved:
                    self._save()
                    saved = True
                if (
                    t.early_stopping_patience is not None
                    and self.state.evals_without_improvement >= t.early_stopping_patience
                ):
                    log.info("early stopping at step %d: %s did not improve for %d evaluations",
                             self.state.step, self.metric, t.early_stopping_patience)
                    self.state.stopped_early = True
                    if not saved:
                        self._save()
                    break
                # Called at the last step too (a search records the final value), but a stop asked there
                # saves nothing, so the run ends as a whole one, not a pruned one.
                if self.on_evaluate is not None and self.last_validation \
                        and self.on_evaluate(self.state.step, self.last_validation) and not last_step:
                    log.info("stopped at step %d: the on_evaluate hook asked to stop (a pruned trial)",
                             self.state.step)
                    self.state.stopped_early = True
                    self.state.stopped_by_hook_at = self.state.step
                    if not saved:
                        self._save()
                    break
            if due_save and not saved:
                self._save()
        return self.state

    def _nonfinite_step(self, what: str, value: Any, example_ids: list[torch.Tensor | None]) -> None:
        """Stop (``train.nonfinite: stop``) or count a skipped update, naming the step and its examples."""
        t = self.config.train
        # The examples of this step on every process (micro-batch by micro-batch), for the message.
        local = [int(i) for ids in example_ids if ids is not None for i in ids.tolist()]
        ids = sorted(set(gather_object(local))) if self.accelerator.num_processes > 1 else local
        shown = ", ".join(map(str, ids[:32])) + (f" ... ({len(ids)} in all)" if len(ids) > 32 else "")
        where = (f"{what} is {float(value)} at step {self.state.step + 1} (epoch {self.state.epoch}); "
                 f"training examples (indices in the train split): {shown}")
        # Tasks that keep each example's origin let the message name the file and lines.
        lines = (self.data.extra.get("source_lines") or {}).get("train")
        if lines and ids and max(ids) < len(lines):
            by_file: dict[str, list[int]] = {}
            for i in ids:
                source, line = lines[i]
                by_file.setdefault(str(source), []).append(int(line))
            where += "; from " + "; ".join(
                f"{source} lines {', '.join(map(str, sorted(found)[:32]))}" for source, found in by_file.items())
        if t.nonfinite == "stop":
            raise TrainingError(where, hint="lower train.learning_rate, check those examples, or set "
                                "train.nonfinite skip to skip such steps")
        self.state.skipped_steps += 1
        log.warning("skipped the update: %s", where)
        self.metrics_log.write({"step": self.state.step + 1, "split": "skipped", "what": what,
                                "example_ids": ids[:256]})
        if self.state.skipped_steps > t.max_skipped_steps:
            raise TrainingError(f"{self.state.skipped_steps} steps skipped for a non-finite loss or gradient "
                                f"(train.max_skipped_steps {t.max_skipped_steps}); last: {where}",
                                hint="lower train.learning_rate or check the data")

    def _epoch_float(self) -> float:
        # A stream's pass length is known once a pass has ended (in this process); until then whole epochs.
        length = self.state.stream_epoch_batches if self.streaming else len(self.train_loader)
        return self.state.epoch + (self.state.batch_in_epoch / max(length, 1) if length else 0.0)

    # ----------------------------------------------------------------------------- validate
    def evaluate(self, split: str) -> dict[str, Any]:
        """Task metrics on ``split`` (model put back in train mode afterwards)."""
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = self.task.evaluate(self.model, self.eval_loaders[split], self.accelerator, split, self.data)
        finally:
            self.model.train()
        return metrics

    def _evaluate_and_track(self) -> bool:
        if "validation" not in self.eval_loaders:
            return False
        start = time.perf_counter()
        metrics = self.evaluate("validation")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.metrics_log.write(
            {"step": self.state.step, "epoch": round(self._epoch_float(), 4), "split": "validation", **scalars,
             "eval_seconds": time.perf_counter() - start}
        )
        value = metrics.get(self.metric)
        self.last_validation = scalars
        if value is None:
            raise TrainingError(
                f"train.metric '{self.metric}' is not computed by task '{self.task.info.name}'; "
                f"available: {', '.join(sorted(scalars))}"
            )
        best = self.state.best_metric
        improved = best is None or (value > best if self.greater_is_better else value < best)
        if not improved and value == best and self.metric != "loss" and "loss" in metrics:
            # A tie on a coarse metric (accuracy on a small set) goes to the lower loss.
            improved = self.state.best_loss is None or metrics["loss"] < self.state.best_loss
        log.info("step %d validation %s", self.state.step,
                 ", ".join(f"{k} {v:.4f}" for k, v in scalars.items() if k in (self.metric, "loss", "accuracy")))
        if improved:
            self.state.best_metric = float(value)
            self.state.best_step = self.state.step
            self.state.best_loss = float(metrics["loss"]) if "loss" in metrics else None
            self.state.evals_without_improvement = 0
        else:
            self.state.evals_without_improvement += 1
        return improved

    # ----------------------------------------------------------------------------- save
    def _save(self) -> None:
        name = ckpt.checkpoint_name(self.state.step)
        if self.state.best_step == self.state.step:
            self.state.best_checkpoint = name
        payload = {"loop": asdict(self.state), "metric": self.metric, "greater_is_better": self.greater_is_better,
                   "task_window": self.task.step_metrics_state(self.accelerator)}
        if self.privacy is not None:
            payload["privacy"] = self.privacy.state_dict()
        ckpt.save_checkpoint(self.accelerator, self.checkpoint_dir, self.state.step, payload)
        if self.accelerator.is_main_process:
            protect = {self.state.best_checkpoint} if self.state.best_checkpoint else set()
            ckpt.prune_checkpoints(self.checkpoint_dir, self.config.train.keep_checkpoints, protect)
        self.accelerator.wait_for_everyone()

    def restore_best(self) -> int | None:
        """Load the best checkpoint's weights into the model; returns its step (None if none)."""
        if self.state.best_checkpoint is None:
            return None
        path = self.checkpoint_dir / self.state.best_checkpoint
        if self.state.best_step != self.state.step:
            state = self.state
            self.frozen.load(path)
            self.state = state  # keep the final loop state; only weights (and optimizer) go back
            log.info("restored best checkpoint %s (%s %.4f)", path.name, self.metric, self.state.best_metric)
        return self.state.best_step


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a batch: packed batches say so; padded ones have an attention mask."""
    if "num_real_tokens" in batch:
        return int(batch["num_real_tokens"].sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel()) if "input_ids" in batch else 0


class VariableSizeBatches(Sampler[list[int]]):
    """A batch sampler's batches, declared to Accelerate as batches of varying size (``batch_size`` None).

    Accelerate deals a batch sampler's batches out to the processes in turns (``BatchSamplerShard``).
    Told a ``batch_size``, it assumes every batch but the last is full and skips any turn that ends
    with a short one. Length grouping shuffles the short batch in anywhere, so on two processes, in
    about half the epochs, both lost a batch (and its examples) while ``len()`` still counted it.
    Without one, Accelerate deals out every batch as it comes: ``len()`` batches on every process and
    every example in every epoch (batches from the epoch's start fill the last turn).
    """

    def __init__(self, batches: LengthGroupedBatchSampler) -> None:
        self.batches = batches
        self.batch_size: int | None = None
        self.drop_last = batches.drop_last

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches ``__iter__`` yields."""
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


_NO_BATCH_HINT = "check data.train (every example empty, too long for data.max_length, or held out)"


class _WithIndex(torch.utils.data.Dataset):
    """A map-style dataset whose items are ``(index, item)``; batched fetches stay batched."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.ds[i]

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to a split whose items change with it (masked_lm's masks); Accelerate's loader calls
        this at each pass (DataLoaderShard.set_epoch), after the loop has set the epoch."""
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)

    def __getitems__(self, indices: list[int]) -> list[tuple[int, Any]]:
        items = self.ds.__getitems__(indices) if hasattr(self.ds, "__getitems__") else [self.ds[i] for i in indices]
        return list(zip(indices, items, strict=True))


class _CollateWithIds:
    """Collates ``(index, item)`` pairs with the task's collator and adds ``example_ids`` (B,)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, pairs: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate([item for _, item in pairs])
        batch["example_ids"] = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        return batch


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
