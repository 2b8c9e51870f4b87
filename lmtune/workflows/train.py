"""The train workflow: config -> data -> model -> loop -> evaluation -> report -> model folder.

``train()`` is the one function behind ``lmtune train`` and ``lmtune.train``.
Its phases are plain functions below, so each can be read (and tested) alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from lmtune.config import Config, load_config, save_config
from lmtune.console import log, make_progress, quiet_libraries, run_logging
from lmtune.data.features import save_json_atomic
from lmtune.errors import LmtuneError, RunError, is_disk_full
from lmtune.models.methods import build_task_model, check_method_supported, describe, save_final_model
from lmtune.tasks.base import Task, TaskData, get_task
from lmtune.training import checkpoint as ckpt
from lmtune.training.distributed import (
    accelerator_plugins,
    check_distributed_supported,
    materialise_for_saving,
    on_main_then_shared,
    process_group_kwargs,
)
from lmtune.training.loop import MetricsLog, TrainingLoop
from lmtune.training.precision import resolve_precision
from lmtune.version import __version__
from lmtune.workflows.baselines import compare
from lmtune.workflows.card import write_model_card
from lmtune.workflows.report import write_report
from lmtune.workflows.run import Run

RUN_FILE = "run.json"


# ------------------------------------------------------------------------------------------ run folder
def prepare_run_dir(config: Config, *, resume: bool | str | Path, overwrite: bool) -> tuple[Path, Path | None]:
    """Create or check the run folder; returns it and the checkpoint to resume from (if any).

    Never deletes anything silently: a folder holding a run is only replaced with
    ``overwrite``, and a folder that is not an lmtune run is never deleted.
    """
    run_dir = Path(config.output_dir)
    if resume:
        if isinstance(resume, (str, Path)) and not isinstance(resume, bool):
            path = Path(resume)
            if path.is_dir() and ckpt.is_complete(path):
                return run_dir, path
            found = ckpt.latest_checkpoint(path / "checkpoints")
            if found is None:
                raise RunError("no complete checkpoint to resume from", file=path)
            return path if (path / RUN_FILE).is_file() else run_dir, found
        found = ckpt.latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            # Killed before its first checkpoint: nothing to continue, so say how to start over.
            started = (run_dir / RUN_FILE).is_file()
            raise RunError("no complete checkpoint to resume from", file=run_dir / "checkpoints",
                           hint="the run stopped before its first checkpoint: start it again with --overwrite"
                           if started else "start the run without --resume")
        return run_dir, found
    if run_dir.exists() and any(run_dir.iterdir()):
        status = _read_status(run_dir)
        if status is None:
            raise RunError("output folder is not empty and does not hold an lmtune run; refusing to touch it",
                           file=run_dir, hint="choose another output_dir")
        if not overwrite:
            what = "a finished run" if status == "complete" else f"an unfinished run (status: {status})"
            hint = "pass --overwrite to replace it" + ("" if status == "complete" else ", or --resume to continue it")
            raise RunError(f"output folder already holds {what}", file=run_dir, hint=hint)
        log.warning("--overwrite: removing the previous run in %s", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def _read_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return None


def _write_run_file(run_dir: Path, **fields: Any) -> None:
    path = run_dir / RUN_FILE
    current: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(ValueError):
            current = json.loads(path.read_text(encoding="utf-8"))
    current.update(fields)
    save_json_atomic(path, current)


# ------------------------------------------------------------------------------------------ train
def train(
    config: Config | str | Path | dict[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Run:
    """Fine-tune, evaluate and save a model as ``config`` says; returns the finished run.

    Phases: setup (run folder, data, model, method) -> fit (the training loop) ->
    validate (best checkpoint on validation and test, baselines, starting point) ->
    save (model folder with model card, report).
    """
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if isinstance(config, Config) and overrides:
        cfg = load_config(config.to_dict(), overrides)
    check_method_supported(cfg.method, cfg.task)
    quiet_libraries()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    # The process group first (a no-op for one process), so only the main process touches the folder.
    state = PartialState(**process_group_kwargs(cfg))
    check_distributed_supported(cfg, state.num_processes)
    run_dir, resume_from = on_main_then_shared(state, lambda: prepare_run_dir(cfg, resume=resume,
                                                                                overwrite=overwrite))
    started = time.perf_counter()

    precision = resolve_precision(cfg.train.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    # Several runs in one process (notebooks, tests) may differ in precision: Accelerate keeps its
    # settings in a singleton, so clear them (the distributed set-up, PartialState, is kept).
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=list(cfg.train.trackers) or None,
        project_dir=str(run_dir),
        **accelerator_plugins(cfg, state.num_processes),
    )
    with run_logging(run_dir, accelerator.is_main_process):
        try:
            set_seed(cfg.train.seed)
            if accelerator.is_main_process:
                save_config(cfg, run_dir / "config.yaml")
                if resume_from is None:
                    _write_run_file(run_dir, status="running", task=cfg.task, lmtune_version=__version__,
                                    started_at=_now(), model=cfg.model.name, method=cfg.method.name)
                else:
                    _write_run_file(run_dir, status="running", resumed_at=_now(), resumed_from=str(resume_from))
            log.info("run folder %s; device %s (%d threads); precision %s", run_dir, accelerator.device,
                     torch.get_num_threads(), "fp32" if precision == "no" else precision)
            task = get_task(cfg.task)(cfg)
            # The task says where its weights and tokenizer come from (None: nothing pretrained).
            model_path = task.model_path()
            tokenizer = task.load_tokenizer(model_path)
            # Tokenised once per machine: its main process fills the feature cache while the others wait,
            # then they read it (a node-local cache works; a shared one is written atomically).
            with accelerator.local_main_process_first():
                data = task.prepare(tokenizer)
            log.info("data: %s", ", ".join(f"{s} {len(d) if hasattr(d, '__len__') else 'streamed'}"
                                           for s, d in data.splits.items()))
            model, head = build_task_model(task, model_path, data, tokenizer)
            params = describe(model)
            log.info("model %s, method %s: %s of %s parameters trainable", cfg.model.name, cfg.method.name,
                     f"{params['trainable_parameters']:,}", f"{params['total_parameters']:,}")
            if cfg.train.trackers:
                accelerator.init_trackers("lmtune", config=_flat(cfg.to_dict()))
            loop = TrainingLoop(task=task, model=model, tokenizer=tokenizer, data=data, config=cfg,
                                run_dir=run_dir, accelerator=accelerator,
                                metrics_log=MetricsLog(run_dir / "metrics.jsonl", accelerator), head_names=head)
            loop.setup()
            starting = _starting_point(loop, run_dir, accelerator, resume_from is not None)
            if resume_from is not None:
                loop.resume(resume_from)
                if accelerator.is_main_process:  # rows logged after the checkpoint come again
                    ckpt.truncate_metrics_log(run_dir / "metrics.jsonl", loop.state.step)
                    ckpt.remove_leftovers(run_dir / "checkpoints")
            log.info("training: %d steps (%s per epoch), batch %d x accumulation %d x %d process(es)",
                     loop.total_steps, loop.steps_per_epoch or "a stream: unknown", cfg.train.batch_size,
                     cfg.train.gradient_accumulation, accelerator.num_processes)
            with make_progress(show_progress and accelerator.is_main_process) as progress:
                # A run that stopped early and was killed before it finished must not train on.
                state = loop.fit(progress)
            best_step = loop.restore_best()
            task.evaluation_phase("final")
            final: dict[str, Any] = {}
            eval_seconds: dict[str, float] = {}
            for split in loop.eval_loaders:
                t0 = time.perf_counter()
                final[split] = loop.evaluate(split)
                eval_seconds[split] = time.perf_counter() - t0
            baselines = task.run_baselines(data) if cfg.baselines else {}
            # Sharded weights (FSDP, ZeRO-3) are gathered by every process together; the main process
            # then saves a plain copy of the model.
            saved_model = materialise_for_saving(
                accelerator, loop.model, lambda: build_task_model(task, model_path, data, tokenizer)[0])
            if accelerator.is_main_process:
                summary = {
                    "best_step": best_step, "steps": state.step, "stopped_early": state.stopped_early,
                    "skipped_steps": state.skipped_steps,
                    "train_seconds": state.train_seconds, "tokens_seen": state.tokens_seen,
                    "train_tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
                    "precision": "fp32" if precision == "no" else precision,
                    "num_processes": accelerator.num_processes, **params,
                    "eval_ms_per_example": {s: 1000 * eval_seconds[s] / max(len(data.splits[s]), 1)
                                            for s in eval_seconds},
                }
                metrics = {**final, "starting_point": starting, "summary": summary}
                save_json_atomic(run_dir / "metrics.json", metrics)
                save_json_atomic(run_dir / "data.json", data.info)
                model_info = _save_model(loop, task, tokenizer, data, cfg, run_dir, metrics, model_path,
                                         saved_model)
            if cfg.baselines:
                # Neural baselines are sub-runs of this workflow (each resets Accelerate's state), so they
                # start once this model is saved; then every model is timed on the same inputs.
                accelerator.wait_for_everyone()
                baselines.update(compare(cfg, task.timing_items(data), run_dir,
                                         metrics if accelerator.is_main_process else None, train))
            if accelerator.is_main_process:
                save_json_atomic(run_dir / "metrics.json", metrics)
                save_json_atomic(run_dir / "baselines.json", baselines)
                write_report(run_dir, cfg, task, data, metrics, baselines, model_info)
                _write_run_file(run_dir, status="complete", finished_at=_now(),
                                wall_seconds=time.perf_counter() - started)
            accelerator.wait_for_everyone()
            # Not accelerator.end_training(): it also destroys the process group, which neural-baseline
            # sub-runs and later runs in this process still need, and which a DDP model freed after it
            # would then tear down alone (a gloo process hung there; see end_processes).
            for tracker in accelerator.trackers:
                tracker.finish()
        except BaseException as exc:
            full = isinstance(exc, Exception) and not isinstance(exc, LmtuneError) and is_disk_full(exc, run_dir)
            if full:
                shutil.rmtree(run_dir / ".model.tmp", ignore_errors=True)  # a half-written model folder
            if accelerator.is_main_process and (run_dir / RUN_FILE).exists():
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                with contextlib.suppress(OSError):  # the disk may still be full
                    _write_run_file(run_dir, status=status, error=str(exc)[:2000], failed_at=_now())
            if full:
                raise RunError(f"the disk is full: could not write the run folder ({str(exc)[:200]})", file=run_dir,
                               hint="free disk space, then run again with --resume: the last complete "
                               "checkpoint is intact") from None
            raise
    return Run.load(run_dir)


def _starting_point(loop: TrainingLoop, run_dir: Path, accelerator: Accelerator, resuming: bool) -> dict[str, Any]:
    """Metrics of the untrained model (pretrained body, new head) on the evaluation splits.

    Computed once before training (read back on resume): the report puts the tuned model beside
    its starting point. Evaluation draws no random numbers, so training is unaffected.
    """
    path = run_dir / "starting_point.json"
    if resuming and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    split = "test" if "test" in loop.eval_loaders else "validation"
    if split not in loop.eval_loaders:
        return {}
    loop.task.evaluation_phase("final")
    try:
        with torch.random.fork_rng(devices=[]):
            metrics = {split: loop.evaluate(split)}
    finally:
        loop.task.evaluation_phase("training")
    if accelerator.is_main_process:
        save_json_atomic(path, metrics)
    return metrics


def _save_model(loop: TrainingLoop, task: Task, tokenizer: Any, data: TaskData, cfg: Config, run_dir: Path,
                metrics: dict[str, Any], base_path: Path | None,
                model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Write ``model/`` (safetensors, tokenizer, lmtune.json, model card), check it reloads identically.

    ``model`` is a plain copy of the trained model when the trained one is sharded across processes.
    """
    # Without Accelerate's autocast wrapper: the reload check compares float32 with float32 (under bf16
    # autocast QA start/end logits of ~10 differ from the float32 reload by ~5e-3, over the tolerance).
    if model is None:
        model = loop.accelerator.unwrap_model(loop.model, keep_fp32_wrapper=False)
    model.eval()
    tmp = run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    adapter_dir = run_dir / "adapter" if cfg.method.name in ("lora", "qlora") else None
    probe_batch = _probe_batch(loop)
    if probe_batch is not None:  # a gathered copy of a sharded model lives on the CPU
        device = next(model.parameters()).device
        probe_batch = {k: v.to(device) for k, v in probe_batch.items()}
    with torch.no_grad():
        before = task.logits(model, probe_batch) if probe_batch is not None else None
    saved_as = save_final_model(model, tmp, adapter_dir, cfg.method.merge, base_path=base_path,
                                quantized=cfg.method.name == "qlora")
    tokenizer.save_pretrained(tmp)
    meta = {
        "lmtune_version": __version__,
        "task": cfg.task,
        "base_model": cfg.model.name,
        "base_model_path": str(base_path) if base_path is not None and cfg.model.init == "pretrained" else None,
        "method": cfg.method.name,
        "saved_as": saved_as,
        **task.save_model_extras(tmp, data),
    }
    save_json_atomic(tmp / "lmtune.json", meta)
    write_model_card(tmp, cfg, meta, metrics, data.info)
    final = run_dir / "model"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    check = {}
    if before is not None and probe_batch is not None and saved_as != "adapter":
        check = _verify_saved(final, task, probe_batch, before)
    return {**meta, "reload_check": check}


def _probe_batch(loop: TrainingLoop) -> dict[str, torch.Tensor] | None:
    loader = loop.eval_loaders.get("validation") or loop.eval_loaders.get("test")
    if loader is None:
        return None
    batch = next(iter(loader))
    # Decoder logits are (B, T, vocab): a few rows are plenty.
    rows = 4 if batch["input_ids"].ndim == 2 and "labels" in batch and batch["labels"].ndim == 2 else 16
    return {k: v[:rows] for k, v in batch.items()}


def _verify_saved(folder: Path, task: Task, batch: dict[str, torch.Tensor], before: torch.Tensor) -> dict[str, Any]:
    """Reload the saved model with plain transformers and compare logits with the in-memory model."""
    reloaded = task.model_class.from_pretrained(folder, dtype=torch.float32)  # type: ignore[attr-defined]
    reloaded.eval()
    with torch.no_grad():
        after = task.logits(reloaded, {k: v.cpu() for k, v in batch.items()})
    diff = float((after - before.cpu()).abs().max())
    tolerance = 1e-3
    if diff > tolerance:
        raise RunError(f"the saved model's logits differ from the trained model's by {diff:.2e} "
                       f"(tolerance {tolerance:g}); the model folder is not trustworthy", file=folder)
    log.info("saved model reloads with plain transformers; max logit difference %.1e", diff)
    return {"max_abs_logit_diff": diff, "tolerance": tolerance, "examples": int(before.shape[0])}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
