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
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from lmtune.config import Config, load_config, save_config
from lmtune.console import log, make_progress, quiet_libraries, run_logging
from lmtune.data import mixing, pii
from lmtune.data.features import save_json_atomic
from lmtune.errors import LmtuneError, RunError, is_disk_full
from lmtune.evaluate.fairness import load_term_pairs, run_counterfactuals
from lmtune.models.hub import snapshot_of
from lmtune.models.methods import (
    build_task_model,
    check_method_supported,
    describe,
    initial_adapter,
    save_final_model,
)
from lmtune.tasks.base import Task, TaskData, get_predictor, get_task
from lmtune.training import checkpoint as ckpt
from lmtune.training import flops
from lmtune.training.distributed import (
    accelerator_plugins,
    check_distributed_supported,
    materialise_for_saving,
    on_main_then_shared,
    process_group_kwargs,
)
from lmtune.training.loop import MetricsLog, TrainingLoop, check_optimizer_supported
from lmtune.training.precision import resolve_precision
from lmtune.training.privacy import check_privacy_supported
from lmtune.version import __version__
from lmtune.workflows import memorisation
from lmtune.workflows.baselines import compare
from lmtune.workflows.card import write_model_card
from lmtune.workflows.report import write_report
from lmtune.workflows.run import Run
from lmtune.workflows.run_folder import (
    RUN_FILE,
    RUN_FORMAT_VERSION,
    RunLock,
    check_clearable,
    clear_run_folder,
    entries,
    is_legacy_run,
    is_marked_run,
    read_run_record,
    replaceable_without_overwrite,
    run_marker,
    run_status,
    started_training,
)

__all__ = ["RUN_FILE", "prepare_run_dir", "train"]


# ------------------------------------------------------------------------------------------ run folder
def prepare_run_dir(config: Config, *, resume: bool | str | Path, overwrite: bool,
                    lock: RunLock) -> tuple[Path, Path | None]:
    """Claim the run folder for this process (``lock``) and check or clear it; returns the folder and the
    checkpoint to resume from (if any).

    The lock is taken before the folder's contents are looked at, so what is decided here cannot change
    under it: one process writes a run folder (see :mod:`lmtune.workflows.run_folder`). Nothing is deleted
    silently: a run is replaced only with ``overwrite`` (or, without, when it failed before training began,
    leaving nothing to keep), only when ``run.json`` marks it as lmtune's, and only when nothing but
    lmtune's files is in it. A folder that is not an lmtune run is never written to.
    """
    if resume:
        return _prepare_resume(config, resume, lock)
    run_dir = _usable_dir(Path(config.output_dir))
    if run_dir.is_dir() and entries(run_dir):
        # Refused before the lock file is created: nothing is written into a folder lmtune did not make.
        record = _record_or_refuse(run_dir)
        if not (is_marked_run(record) or is_legacy_run(record)):
            _refuse_existing(run_dir, record, run_status(run_dir, record), overwrite)
    else:
        _make_dir(run_dir)
    lock.acquire(run_dir)
    if entries(run_dir):  # looked at again under the lock: another process may have finished a run here
        record = _record_or_refuse(run_dir)
        status = run_status(run_dir, record, locked=lock.held)
        if replaceable_without_overwrite(run_dir, record, status):
            check_clearable(run_dir)
            error = str((record or {}).get("error") or "no error recorded")[:200]
            log.info("replacing the run in %s: it %s before training began (%s)", run_dir,
                     "failed" if status == "failed" else "stopped", error)
        elif not overwrite or not (is_marked_run(record) or is_legacy_run(record)):
            _refuse_existing(run_dir, record, status, overwrite)
        else:
            check_clearable(run_dir)
            where = f" (a link to {run_dir.resolve()})" if run_dir.is_symlink() else ""
            log.warning("--overwrite: removing the previous run in %s%s", run_dir, where)
        clear_run_folder(run_dir)
    # Marked from the first moment, so a run stopped at any point after this is recognised as lmtune's.
    _write_run_file(run_dir, **run_marker(), status="running", lmtune_version=__version__, started_at=_now())
    return run_dir, None


def _prepare_resume(config: Config, resume: bool | str | Path, lock: RunLock) -> tuple[Path, Path | None]:
    """The folder and checkpoint a ``--resume [PATH]`` continues, locked: the config's output_dir, a run
    folder named by PATH, or the output_dir with the checkpoint PATH names."""
    run_dir = Path(config.output_dir)
    checkpoint: Path | None = None
    search = run_dir / "checkpoints"
    if isinstance(resume, (str, Path)) and not isinstance(resume, bool):
        path = Path(resume)
        if path.is_dir() and ckpt.is_complete(path):
            checkpoint = path
        else:
            run_dir = path if (path / RUN_FILE).is_file() else run_dir
            search = path / "checkpoints"
    run_dir = _usable_dir(run_dir)
    locked = run_dir.is_dir() and ((run_dir / RUN_FILE).is_file() or (run_dir / "checkpoints").is_dir())
    if locked:
        lock.acquire(run_dir)  # first: a run still training is named, whatever its checkpoints
    if checkpoint is None:
        checkpoint = ckpt.latest_checkpoint(search)
    if checkpoint is None:
        if search != run_dir / "checkpoints":
            raise RunError("no complete checkpoint to resume from", file=search.parent)
        # Stopped before its first checkpoint: nothing to continue, so say how to start over.
        record = _record_or_refuse(run_dir) if run_dir.is_dir() else None
        if record is None:
            hint = "start the run without --resume"
        elif is_marked_run(record) and not started_training(record):
            hint = "the run stopped before training began: start it again without --resume"
        else:
            hint = "the run stopped before its first checkpoint: start it again with --overwrite"
        raise RunError("no complete checkpoint to resume from", file=search, hint=hint)
    if not locked:  # a checkpoint named by path, resumed into another output_dir
        _make_dir(run_dir)
        lock.acquire(run_dir)
    record = _record_or_refuse(run_dir)
    if record is not None and isinstance(record.get("format_version"), int) \
            and record["format_version"] > RUN_FORMAT_VERSION:
        raise RunError(f"this run was written by a newer lmtune (run format {record['format_version']}, this "
                       f"version writes {RUN_FORMAT_VERSION})", file=run_dir / RUN_FILE,
                       hint="resume it with the lmtune version that started it")
    return run_dir, checkpoint


def _usable_dir(path: Path) -> Path:
    """``path`` if a run folder can live there (a folder, or nothing yet); a RunError naming it otherwise."""
    try:
        mode = path.stat().st_mode  # through a link: a link to a folder is used as that folder
    except FileNotFoundError:
        if path.is_symlink():
            raise RunError(f"output_dir is a symbolic link to {os.readlink(path)}, which does not exist",
                           file=path, hint="create the folder it points to, or point output_dir at a folder") from None
        return path
    except OSError as exc:  # a link loop, a file where a parent folder should be, no permission
        raise RunError(f"output_dir cannot be used: {exc.strerror or exc}", file=path,
                       hint="choose a folder for output_dir") from None
    if not stat.S_ISDIR(mode):
        kind = "a file" if stat.S_ISREG(mode) else "a device, pipe or socket"
        raise RunError(f"output_dir is {kind}, not a folder", file=path, hint="choose a folder for output_dir")
    return path


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create the run folder: {exc.strerror or exc}", file=path,
                       hint="choose a folder you can write to for output_dir") from None


def _record_or_refuse(run_dir: Path) -> dict[str, Any] | None:
    """``run.json`` of a folder about to be used; one that cannot be read makes it a folder not to touch."""
    try:
        return read_run_record(run_dir)
    except RunError as exc:
        raise RunError(f"{exc.message}; refusing to touch this folder", file=exc.file,
                       hint="choose another output_dir") from None


def _refuse_existing(run_dir: Path, record: dict[str, Any] | None, status: str | None, overwrite: bool) -> None:
    """The error for a folder that already holds something this run may not replace."""
    if status is None:
        raise RunError("output folder is not empty and does not hold an lmtune run; refusing to touch it",
                       file=run_dir, hint="choose another output_dir")
    ours = is_marked_run(record) or is_legacy_run(record)
    if overwrite and not ours:
        raise RunError("output folder holds a run.json that lmtune did not write (no lmtune run marker); refusing "
                       "to delete it", file=run_dir, hint="choose another output_dir")
    what = "a finished run" if status == "complete" else f"an unfinished run (status: {status})"
    if not ours:
        hint = "it is not marked as an lmtune run, so --overwrite will not delete it: choose another output_dir"
        hint += "" if status == "complete" else " (or continue it with --resume)"
    elif status == "complete":
        hint = "pass --overwrite to replace it"
    elif ckpt.latest_checkpoint(run_dir / "checkpoints") is not None:
        hint = "pass --resume to continue it from its last checkpoint, or --overwrite to replace it"
    else:
        hint = "pass --overwrite to replace it (it stopped before its first checkpoint: nothing to --resume)"
    raise RunError(f"output folder already holds {what}", file=run_dir, hint=hint)


def _write_run_file(run_dir: Path, **fields: Any) -> None:
    """Set ``fields`` in ``run.json`` (written atomically), keeping the others."""
    path = run_dir / RUN_FILE
    current: Any = {}
    if path.is_file():
        with contextlib.suppress(ValueError):
            current = json.loads(path.read_text(encoding="utf-8"))
    current = {**current, **fields} if isinstance(current, dict) else fields
    save_json_atomic(path, current)


# ------------------------------------------------------------------------------------------ train
def train(
    config: Config | str | Path | dict[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    show_progress: bool = True,
    on_evaluate: Callable[[int, dict[str, Any]], bool] | None = None,
) -> Run:
    """Fine-tune, evaluate and save a model as ``config`` says; returns the finished run.

    ``on_evaluate(step, validation_metrics)`` is called after each validation evaluation; when it returns
    True training stops there like early stopping (``lmtune tune`` prunes a poor trial so), and the run,
    still evaluated and saved, records ``pruned_at_step``.

    Phases: setup (run folder, data, model, method) -> fit (the training loop) ->
    validate (best checkpoint on validation and test, baselines, starting point) ->
    save (model folder with model card, report).
    """
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if isinstance(config, Config) and overrides:
        cfg = load_config(config.to_dict(), overrides)
    check_method_supported(cfg.method, cfg.task)
    check_optimizer_supported(cfg.train)
    quiet_libraries()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    # The process group first (a no-op for one process), so only the main process touches the folder:
    # it alone takes the run folder's lock, for the run's whole life (the other processes write only
    # what the main one tells them to, and never wait on the lock, so they cannot deadlock on it).
    state = PartialState(**process_group_kwargs(cfg))
    check_distributed_supported(cfg, state.num_processes)
    check_privacy_supported(cfg, state.num_processes)
    with RunLock() as lock:
        run_dir, resume_from = on_main_then_shared(
            state, lambda: prepare_run_dir(cfg, resume=resume, overwrite=overwrite, lock=lock))
        return _train_in(cfg, run_dir, resume_from, state.num_processes, show_progress, on_evaluate)


def _train_in(cfg: Config, run_dir: Path, resume_from: Path | None, num_processes: int,
              show_progress: bool, on_evaluate: Callable[[int, dict[str, Any]], bool] | None = None) -> Run:
    """The phases of :func:`train` in a prepared (and, on the main process, locked) run folder."""
    started = time.perf_counter()

    # train.privacy trains in fp32 (the schema refuses bf16/fp16 with it; auto means fp32 there).
    precision = "no" if cfg.train.privacy is not None else resolve_precision(
        cfg.train.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    # Several runs in one process (notebooks, tests) may differ in precision: Accelerate keeps its
    # settings in a singleton, so clear them (the distributed set-up, PartialState, is kept).
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=list(cfg.train.trackers) or None,
        project_dir=str(run_dir),
        **accelerator_plugins(cfg, num_processes),
    )
    with run_logging(run_dir, accelerator.is_main_process):
        try:
            set_seed(cfg.train.seed)
            if accelerator.is_main_process:
                save_config(cfg, run_dir / "config.yaml")
                if resume_from is None:
                    _write_run_file(run_dir, status="running", task=cfg.task, lmtune_version=__version__,
                                    started_at=_now(), model=cfg.model.name, method=cfg.method.name)
                else:  # a run of lmtune 0.x gains the mark when it is resumed
                    _write_run_file(run_dir, **run_marker(), status="running", resumed_at=_now(),
                                    resumed_from=str(resume_from))
            log.info("run folder %s; device %s (%d threads); precision %s", run_dir, accelerator.device,
                     torch.get_num_threads(), "fp32" if precision == "no" else precision)
            task = get_task(cfg.task)(cfg)
            # A term-pair file that does not parse fails now, not after training.
            term_pairs = load_term_pairs(cfg.evaluate.counterfactuals) if cfg.evaluate.counterfactuals else None
            # The task says where its weights and tokenizer come from (None: nothing pretrained).
            model_path = task.model_path()
            hub = snapshot_of(model_path, cfg.model.revision)
            if hub is not None and accelerator.is_main_process:  # the exact commit a Hub id stood at
                _write_run_file(run_dir, base_model_hub=hub.record())
                log.info("model %s at commit %s (Hugging Face cache %s)", hub.repo_id, hub.commit, hub.path)
            tokenizer = task.load_tokenizer(model_path)
            # Tokenised once per machine: its main process fills the feature cache while the others wait,
            # then they read it (a node-local cache works; a shared one is written atomically).
            # data.pii's findings per source are recorded as the task reads its data (run folder pii.json).
            with accelerator.local_main_process_first(), pii.recording() as pii_found, \
                    mixing.recording() as mixes:
                data = task.prepare(tokenizer)
            if mixes:  # a mixed data.train: what each source gave (data.json, report, lmtune.json)
                data.info["mix"] = mixes[-1]
            log.info("data: %s", ", ".join(f"{s} {len(d) if hasattr(d, '__len__') else 'streamed'}"
                                           for s, d in data.splits.items()))
            # Reseeded so the model is built from the same RNG state whether the features were read from
            # the cache or not: a resumed LoRA/freeze run rebuilds the frozen weights its checkpoints leave
            # out (mean-resized embedding rows included) bit for bit, and checks that it did.
            set_seed(cfg.train.seed)
            model, head = build_task_model(task, model_path, data, tokenizer)
            # PiSSA/OLoRA adapters start from the weights' singular vectors: kept to save a plain LoRA at the end.
            initial = initial_adapter(model)
            params = describe(model)
            log.info("model %s, method %s: %s of %s parameters trainable", cfg.model.name, cfg.method.name,
                     f"{params['trainable_parameters']:,}", f"{params['total_parameters']:,}")
            if cfg.train.trackers:
                accelerator.init_trackers("lmtune", config=_flat(cfg.to_dict()))
            loop = TrainingLoop(task=task, model=model, tokenizer=tokenizer, data=data, config=cfg,
                                run_dir=run_dir, accelerator=accelerator,
                                metrics_log=MetricsLog(run_dir / "metrics.jsonl", accelerator), head_names=head,
                                on_evaluate=on_evaluate)
            loop.setup()
            with make_progress(show_progress and accelerator.is_main_process) as progress:
                task.before_training(loop.model, accelerator, data, run_dir, resuming=resume_from is not None,
                                     progress=progress)
            starting = _starting_point(loop, run_dir, accelerator, resume_from is not None)
            # evaluate.memorisation: the task's canaries and extraction prompts, scored on the starting model
            # (always before loop.resume: the model is still the untrained one; it is cheap and deterministic).
            audit_data = data.extra.get("memorisation")
            audit_start = _memorisation_audit(loop, tokenizer, audit_data, cfg) if audit_data else None
            if audit_data and accelerator.is_main_process:
                memorisation.record_canaries(run_dir, cfg, audit_data)
            if resume_from is not None:
                loop.resume(resume_from)
                if accelerator.is_main_process:  # rows logged after the checkpoint come again
                    ckpt.truncate_metrics_log(run_dir / "metrics.jsonl", loop.state.step)
                    ckpt.remove_leftovers(run_dir / "checkpoints")
            log.info("training: %d steps (%s per epoch), batch %d x accumulation %d x %d process(es)",
                     loop.total_steps, loop.steps_per_epoch or "a stream: unknown", cfg.train.batch_size,
                     cfg.train.gradient_accumulation, accelerator.num_processes)
            if accelerator.is_main_process and not started_training(read_run_record(run_dir)):
                # From here on the run has something to lose: it is no longer replaced without --overwrite.
                _write_run_file(run_dir, training_started_at=_now())
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
            audit = memorisation.memorisation_metrics(cfg, audit_data, audit_start, _memorisation_audit(
                loop, tokenizer, audit_data, cfg)) if audit_data else None
            baselines = task.run_baselines(data) if cfg.baselines else {}
            # Sharded weights (FSDP, ZeRO-3) are gathered by every process together; the main process
            # then saves a plain copy of the model.
            saved_model = materialise_for_saving(
                accelerator, loop.model, lambda: build_task_model(task, model_path, data, tokenizer)[0])
            if accelerator.is_main_process:
                summary = {
                    "best_step": best_step, "steps": state.step, "stopped_early": state.stopped_early,
                    "pruned_at_step": state.stopped_by_hook_at,
                    "skipped_steps": state.skipped_steps,
                    "train_seconds": state.train_seconds, "tokens_seen": state.tokens_seen,
                    "train_tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
                    "precision": "fp32" if precision == "no" else precision,
                    "num_processes": accelerator.num_processes, **params,
                    **({"privacy": loop.privacy.summary()} if loop.privacy is not None else {}),
                    "eval_ms_per_example": {s: 1000 * eval_seconds[s] / max(len(data.splits[s]), 1)
                                            for s in eval_seconds},
                    **_model_flops(loop, task, saved_model, precision, state),
                }
                metrics = {**final, "starting_point": starting, "summary": summary,
                           **({"memorisation": audit} if audit else {})}
                save_json_atomic(run_dir / "metrics.json", metrics)
                save_json_atomic(run_dir / "data.json", data.info)
                if cfg.data.pii != "off":
                    save_json_atomic(run_dir / pii.PII_FILE, pii.run_record(cfg.data, pii_found))
                model_info = _save_model(loop, task, tokenizer, data, cfg, run_dir, metrics, model_path,
                                         saved_model, initial=initial)
                if term_pairs:
                    metrics["counterfactuals"] = _counterfactuals(task, data, cfg, run_dir, model_info, term_pairs)
                    save_json_atomic(run_dir / "metrics.json", metrics)
                    # The card was written with the model; it now gains the counterfactual figures.
                    write_model_card(run_dir / "model", cfg, _meta(model_info), metrics, data.info)
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
                                wall_seconds=time.perf_counter() - started,
                                **({"pruned_at_step": state.stopped_by_hook_at}
                                   if state.stopped_by_hook_at is not None else {}))
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


def _memorisation_audit(loop: TrainingLoop, tokenizer: Any, data: Any, cfg: Config) -> dict[str, Any]:
    """The memorisation audit of the model as it is now (:func:`lmtune.workflows.memorisation.audit`), on every
    process alike: through the prepared model, so a sharded one gathers its weights as in evaluation."""
    return memorisation.audit(loop.model, tokenizer, data, cfg, loop.accelerator.device)


def _save_model(loop: TrainingLoop, task: Task, tokenizer: Any, data: TaskData, cfg: Config, run_dir: Path,
                metrics: dict[str, Any], base_path: Path | None,
                model: torch.nn.Module | None = None, *,
                initial: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Write ``model/`` (safetensors, tokenizer, lmtune.json, model card), check it reloads identically.

    ``model`` is a plain copy of the trained model when the trained one is sharded across processes;
    ``initial`` the starting adapter of a PiSSA/OLoRA run (``models.methods.initial_adapter``).
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
                                quantized=cfg.method.name == "qlora", initial=initial)
    tokenizer.save_pretrained(tmp)
    meta = {
        "lmtune_version": __version__,
        "task": cfg.task,
        "base_model": cfg.model.name,
        "base_model_path": str(base_path) if base_path is not None and cfg.model.init == "pretrained" else None,
        "base_model_hub": hub.record() if (hub := snapshot_of(base_path, cfg.model.revision)) else None,
        "method": cfg.method.name,
        "saved_as": saved_as,
        **task.save_model_extras(tmp, data),
        **pii.model_policy(cfg.data, run_dir / pii.PII_FILE),  # predict applies a redact/mask policy too
        # A mixed data.train: which sources, with which weights and how many examples each gave.
        **({"data_mix": data.info["mix"]} if "mix" in data.info else {}),
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


def _meta(model_info: dict[str, Any]) -> dict[str, Any]:
    """``lmtune.json``'s content: the model info without the reload check."""
    return {k: v for k, v in model_info.items() if k != "reload_check"}


def _counterfactuals(task: Task, data: TaskData, cfg: Config, run_dir: Path, model_info: dict[str, Any],
                     pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``evaluate.counterfactuals``: the saved model predicts the test inputs (validation without a test split)
    that hold an identity term, before and after swapping it (``evaluate.fairness.run_counterfactuals``)."""
    split = next((s for s in ("test", "validation") if task.predictor_items(data, s)), None)
    if split is None:
        return {}
    predictor = get_predictor(cfg.task)(run_dir / "model", _meta(model_info))
    result = run_counterfactuals(task.predictor_items(data, split), pairs, predictor.predict,
                                 examples=cfg.evaluate.counterfactual_examples)
    log.info("counterfactual check (%s): %d of %d inputs hold a term; %d change their prediction", split,
             result["changed"], result["items"], result["flipped"])
    return {"split": split, **result}


def _model_flops(loop: TrainingLoop, task: Task, model: torch.nn.Module | None, precision: str,
                 state: Any) -> dict[str, Any]:
    """The run's model FLOPs per token and per second and its MFU (lmtune/training/flops.py): one counted
    forward pass over a validation (or test) batch, in eval mode, with the random state left as it was."""
    batch = _probe_batch(loop)
    if batch is None or "input_ids" not in batch or not state.tokens_seen:
        return {}
    if model is None:
        model = loop.accelerator.unwrap_model(loop.model, keep_fp32_wrapper=False)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            forward = flops.forward_flops(lambda: task.logits(model, batch))
    finally:
        model.train(was_training)
    per_token = forward / batch["input_ids"].numel() * flops.backward_factor(model)
    peak = flops.matmul_peak("fp32" if precision == "no" else precision, loop.accelerator.device.type)
    return flops.utilisation(per_token, state.tokens_seen / max(state.train_seconds, 1e-9), peak,
                             loop.accelerator.num_processes)


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
