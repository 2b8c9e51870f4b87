"""`lmtune tune`: search hyper-parameters with Optuna, one full run folder per trial.

The search space lives in the config (``tune.space``, checked at load: :mod:`lmtune.config.tune`). Each
trial samples values for its keys, becomes a config whose output_dir is ``<study>/trials/trial-NNNN``,
is checked with ``lmtune plan`` (a trial that does not fit this machine, or would pass the token budget,
is refused, not trained), and is trained in this process; the objective is the trained model's validation
``train.metric``. At each validation evaluation the trial reports to Optuna, and the pruner may stop it.

Several workers share one study through Optuna's database storage: a SQLite file by default (workers on
one machine, or on a shared file system), PostgreSQL for a cluster; each runs the same command. Trials
are counted across workers: with a SQLite study, a file lock makes "is the budget spent? if not, start a
trial" one step, so N trials are exactly N whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import sqlalchemy.exc
from filelock import FileLock
from optuna.trial import TrialState
from pydantic import ValidationError
from rich.table import Table

from lmtune.config import Config, load_config, save_config
from lmtune.config.tasks import TASK_INFOS
from lmtune.config.tune import TuneConfig, describe_spec
from lmtune.errors import ConfigError, LmtuneError, StudyError
from lmtune.workflows.plan import plan
from lmtune.workflows.run import Run
from lmtune.workflows.train import train
from lmtune.workflows.tune_report import (
    describe_study,
    list_studies,
    public_url,
    trial_rows,
    write_study_files,
    write_trials_table,
)

log = logging.getLogger(__name__)

__all__ = ["TuneResult", "default_storage", "describe_study", "list_studies", "open_study", "print_study", "tune"]


@dataclass
class TuneResult:
    """What a worker's search left: the study folder, its summary and trials, the best run (and re-run)."""

    study_dir: Path
    study_name: str
    storage: str
    summary: dict[str, Any]
    trials: list[dict[str, Any]]
    notes: list[str]
    best_config: Path | None = None
    retrained: Run | None = None


_SCHEMA_RETRIES = 5  # a server database's schema race (see open_study)
_STARTED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _study_names(cfg: Config, tune_cfg: TuneConfig) -> tuple[str, Path]:
    """The study's name and folder: tune.study_name / tune.output_dir, else from the run's output_dir."""
    name = tune_cfg.study_name or Path(cfg.output_dir).name or "study"
    folder = Path(tune_cfg.output_dir) if tune_cfg.output_dir else Path("studies") / name
    return name, folder


def default_storage(study_dir: Path) -> str:
    """The SQLite file a study keeps its trials in when no storage is named."""
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def open_study(storage: str, study_name: str, direction: Literal["maximize", "minimize"], sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the study, or load it when another worker already did; a StudyError naming the URL when the
    storage cannot be opened (a wrong URL, an unreachable server, a missing database driver)."""
    engine_kwargs: dict[str, Any] = {}
    if storage.startswith("sqlite:"):
        # Several workers write one SQLite file: wait for its lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 120}}
    hint = ("a SQLite file: sqlite:///path/to/study.db (its folder must exist and be writable); a cluster: "
            "postgresql://user:password@host/db with `pip install psycopg2-binary`")
    try:
        # Workers started together race to create the schema: Optuna's RDBStorage creates the tables and
        # stamps alembic's version row unguarded, and the loser fails on "UNIQUE constraint failed:
        # alembic_version.version_num". A SQLite study takes the lock file beside it; a server database,
        # which has no such file, retries once the winner has created the schema.
        with _study_lock(storage):
            for attempt in range(_SCHEMA_RETRIES):
                try:
                    rdb = optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
                    break
                except sqlalchemy.exc.IntegrityError:
                    if attempt == _SCHEMA_RETRIES - 1:
                        raise
                    time.sleep(0.5 * (attempt + 1))
            study = optuna.create_study(storage=rdb, study_name=study_name, direction=direction, sampler=sampler,
                                        pruner=pruner, load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise StudyError(f"cannot open the study storage '{public_url(storage)}': {reason}", hint=hint) from None
    if study.direction.name.lower() != direction:
        raise StudyError(f"study '{study_name}' in {public_url(storage)} already exists and is to "
                         f"{study.direction.name.lower()}, not {direction}",
                         hint="use another --study-name, or the same train.metric / tune.direction")
    return study


def _sampler(tune_cfg: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    if tune_cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(tune_cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if tune_cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune_cfg.prune_startup_trials,
                                           n_warmup_steps=tune_cfg.prune_warmup_steps)
    if tune_cfg.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _suggest(trial: optuna.Trial, key: str, spec: Any) -> Any:
    """A value for ``key`` drawn by the trial from its ``tune.space`` entry."""
    kind, values, step = describe_spec(key, spec)
    if kind == "categorical":
        return trial.suggest_categorical(key, values)
    lo, hi = values
    if kind == "int":
        return trial.suggest_int(key, int(lo), int(hi), step=step or 1)
    return trial.suggest_float(key, float(lo), float(hi), log=kind == "log_uniform")


def _current_value(cfg: Config, key: str) -> Any:
    node: Any = cfg.to_dict()
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _default_params(cfg: Config, space: dict[str, Any]) -> dict[str, Any] | None:
    """The config's own values of the searched keys, when each lies in its distribution (else None)."""
    params: dict[str, Any] = {}
    for key, spec in space.items():
        value = _current_value(cfg, key)
        kind, values, _ = describe_spec(key, spec)
        if kind == "categorical":
            if value not in values:
                return None
        elif value is None or not values[0] <= value <= values[1]:
            return None
        params[key] = value
    return params


@contextlib.contextmanager
def _study_lock(storage: str) -> Iterator[None]:
    """Held while a worker opens the study (creating its schema), and while it checks the trial budget and
    starts a trial. A SQLite study has a file every worker sees, so a file lock beside it makes the check and
    the start one step; a server database has no such file (there a worker may start one trial past the
    budget, closed at once, see ``_over_budget``). No lock when the file's folder is missing: opening the
    storage then reports that."""
    database = Path(storage.removeprefix("sqlite:///"))
    if storage.startswith("sqlite:///") and len(storage) > len("sqlite:///") and database.parent.is_dir():
        with FileLock(f"{database}.lock", timeout=600):
            yield
    else:
        yield


def _tokens_used(study: optuna.Study) -> int:
    return sum(int(t.user_attrs.get("tokens_seen") or 0) for t in study.get_trials(deepcopy=False))


def _planned_tokens(cfg: Config, study: optuna.Study, tokens_per_step: float | None) -> float | None:
    """A trial's training tokens before it runs: train.max_steps x tokens per step (from plan), else the mean
    of the finished trials (same data; None before any finished)."""
    if cfg.train.max_steps is not None and tokens_per_step:
        return cfg.train.max_steps * tokens_per_step
    seen = [t.user_attrs["tokens_seen"] for t in study.get_trials(deepcopy=False) if t.user_attrs.get("tokens_seen")]
    return sum(seen) / len(seen) if seen else None


def _run_trial(trial: optuna.Trial, base: dict[str, Any], tune_cfg: TuneConfig, study: optuna.Study,
               study_dir: Path, metric: str, show_progress: bool) -> float:
    """Sample, plan, train and score one trial; raises optuna.TrialPruned when refused or pruned."""
    params = {key: _suggest(trial, key, spec) for key, spec in tune_cfg.space.items()}
    run_dir = study_dir / "trials" / f"trial-{trial.number:04d}"
    trial.set_user_attr("run", str(run_dir))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it, with several workers
    cfg = load_config(base, {**params, "output_dir": str(run_dir)})
    log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
    tokens_per_step: float | None = None
    if not cfg.model.name.startswith("baseline:"):  # plan estimates pretrained transformers only
        try:
            estimate = plan(cfg, read_data=None, suggest=False)
        except LmtuneError as exc:  # an estimate that cannot be made does not stop a trial that may train
            log.warning("trial %d: lmtune plan could not estimate it (%s); training anyway", trial.number, exc)
        else:
            tokens_per_step = estimate.tokens.get("real_tokens_per_step_global")
            if estimate.fit["verdict"] == "does_not_fit":
                reason = f"refused by lmtune plan: {estimate.fit['message']}"
                trial.set_user_attr("refused", reason)
                raise optuna.TrialPruned(reason)
    if tune_cfg.max_tokens is not None:
        planned = _planned_tokens(cfg, study, tokens_per_step)
        used = _tokens_used(study)
        if planned is not None and used + planned > tune_cfg.max_tokens:
            reason = (f"refused: it would train on about {planned:,.0f} tokens, and {used:,} of the "
                      f"{tune_cfg.max_tokens:,} in tune.max_tokens are spent")
            trial.set_user_attr("refused", reason)
            raise optuna.TrialPruned(reason)

    def report(step: int, metrics: dict[str, Any]) -> bool:
        value = metrics.get(metric)
        if value is None or not math.isfinite(float(value)):
            return False
        trial.report(float(value), step)
        return trial.should_prune()

    run = train(cfg, show_progress=show_progress, on_evaluate=report)
    summary = run.metrics.get("summary", {})
    trial.set_user_attr("tokens_seen", int(summary.get("tokens_seen") or 0))
    trial.set_user_attr("train_seconds", float(summary.get("train_seconds") or 0.0))
    value = (run.metrics.get("validation") or {}).get(metric)
    if summary.get("pruned_at_step") is not None:
        trial.set_user_attr("pruned_at_step", summary["pruned_at_step"])
        raise optuna.TrialPruned(f"pruned at step {summary['pruned_at_step']}")
    if value is None:
        raise StudyError(f"trial {trial.number}: the run has no validation {metric} to optimise", file=run_dir,
                         hint="give the data a validation split (data.validation or data.validation_size)")
    if "test" in run.metrics and metric in run.metrics["test"]:
        trial.set_user_attr("test_value", run.metrics["test"][metric])
    return float(value)


def tune(
    config: Config | str | Path | dict[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    retrain_best: bool | None = None,
    show_progress: bool = False,
) -> TuneResult:
    """Run this worker's share of the study ``config``'s ``tune`` section describes; returns its results.

    The arguments override the matching ``tune`` keys. Every worker (the same call on another machine with
    the same ``storage``) takes trials until the budget is spent: ``trials`` in the study, this worker's
    ``timeout``, or the study's ``max_tokens``. Then it writes the study's table, plots and best config.
    """
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if isinstance(config, Config) and overrides:
        cfg = load_config(config.to_dict(), overrides)
    if cfg.tune is None or not cfg.tune.space:
        raise ConfigError("the config has no search space: add tune.space", field="tune.space",
                          hint="e.g. tune: {space: {train.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}}}")
    settings = {"trials": trials, "timeout": timeout, "storage": storage, "study_name": study_name,
                "retrain_best": retrain_best}
    try:  # the arguments get the file's checks
        tune_cfg = TuneConfig.model_validate({**cfg.tune.model_dump(),
                                              **{k: v for k, v in settings.items() if v is not None}})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{str(first['msg']).removeprefix('Value error, ')} (got {first.get('input')!r})",
                          field="tune." + ".".join(str(p) for p in first["loc"])) from None
    name, study_dir = _study_names(cfg, tune_cfg)
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot create the study folder: {exc.strerror or exc}", file=study_dir,
                         hint="set tune.output_dir to a folder you can write to") from None
    url = tune_cfg.storage or default_storage(study_dir)
    metric, greater = cfg.train.resolved_metric(_task_metric(cfg))
    direction: Literal["maximize", "minimize"] = tune_cfg.direction or ("maximize" if greater else "minimize")
    seed = tune_cfg.seed if tune_cfg.seed is not None else cfg.train.seed
    study = open_study(url, name, direction, pruner=_pruner(tune_cfg))
    with warnings.catch_warnings():  # experimental in Optuna, and only a label: the table names the metric
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])
    base = cfg.to_dict()
    base["tune"] = None  # a trial's config.yaml is a plain run config
    save_config(cfg, study_dir / "config.yaml")
    with _study_lock(url):
        if tune_cfg.include_default:
            defaults = _default_params(cfg, tune_cfg.space)
            if defaults is None:
                log.warning("tune.include_default: the config's own values are outside tune.space; not enqueued")
            else:  # once per study, whichever worker comes first
                study.enqueue_trial(defaults, user_attrs={"default": True}, skip_if_exists=True)

    started = time.monotonic()
    notes: list[str] = []
    seeded: int | None = None
    while True:
        if tune_cfg.timeout is not None and time.monotonic() - started >= tune_cfg.timeout:
            notes.append(f"stopped: tune.timeout of {tune_cfg.timeout:g} s passed")
            break
        if tune_cfg.max_tokens is not None and _tokens_used(study) >= tune_cfg.max_tokens:
            notes.append(f"stopped: the trials trained on {_tokens_used(study):,} tokens, tune.max_tokens is "
                         f"{tune_cfg.max_tokens:,}")
            break
        with _study_lock(url):
            # Enqueued trials (WAITING) are not yet spent: ask() takes them first.
            started_before = len(study.get_trials(deepcopy=False, states=_STARTED))
            if started_before >= tune_cfg.trials:
                break
            if seeded is None:
                # Workers with one seed would propose the same values: each seeds its sampler with the seed
                # plus the trials started before its first (a lone worker on a new study: the seed itself, so a
                # search repeats). Under the lock that guards starting a trial, so no two workers count alike.
                seeded = seed + started_before
                study.sampler = _sampler(tune_cfg, seeded)
            trial = study.ask()
        if trial.number >= tune_cfg.trials:  # a server database raced past the budget: close it unrun
            trial.set_user_attr("refused", "over the trial budget (another worker took the last trial)")
            study.tell(trial, state=TrialState.FAIL)
            break
        _run_and_tell(study, trial, base, tune_cfg, study_dir, metric, show_progress)
        write_trials_table(study, study_dir)  # the table is current after every trial (the studio reads it)

    best_config = write_study_files(study, study_dir, base, metric, url, notes)
    retrained = None
    if tune_cfg.retrain_best and best_config is not None:
        retrained = train(load_config(best_config, {"output_dir": str(study_dir / "best")}), overwrite=True,
                          show_progress=show_progress)
    summary = describe_study(study_dir)
    return TuneResult(study_dir=study_dir, study_name=name, storage=url, summary=summary["study"],
                      trials=trial_rows(study), notes=notes, best_config=best_config, retrained=retrained)


def _run_and_tell(study: optuna.Study, trial: optuna.Trial, base: dict[str, Any], tune_cfg: TuneConfig,
                  study_dir: Path, metric: str, show_progress: bool) -> None:
    """Run one trial and record its outcome: complete with its value, pruned, or failed with the error (a
    user-fixable error fails the trial and the search goes on; anything else fails it and stops)."""
    try:
        value = _run_trial(trial, base, tune_cfg, study, study_dir, metric, show_progress)
    except optuna.TrialPruned as exc:
        log.info("trial %d pruned: %s", trial.number, exc)
        study.tell(trial, state=TrialState.PRUNED)
    except LmtuneError as exc:
        log.warning("trial %d failed: %s", trial.number, exc)
        trial.set_user_attr("error", str(exc)[:2000])
        study.tell(trial, state=TrialState.FAIL)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:2000]}")
            study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        log.info("trial %d: validation %s %.4f", trial.number, metric, value)
        study.tell(trial, value)


def _task_metric(cfg: Config) -> str:
    """The task's default validation metric (train.metric when unset)."""
    return TASK_INFOS[cfg.task].default_metric


def print_study(result: TuneResult, console: Any) -> None:
    """The study as a rich table, the best trial, the files written and how to add a worker."""
    summary = result.summary
    metric = (describe_study(result.study_dir).get("info") or {}).get("metric") or "objective"
    keys = sorted({k for r in result.trials for k in r["params"]})
    table = Table(title=f"study {result.study_name}: {summary['trials']} trials ({summary['complete']} complete, "
                        f"{summary['pruned']} pruned, {summary['failed']} failed)")
    for col in ("trial", "state", f"validation {metric}", *keys, "seconds", "note"):
        table.add_column(col, justify="right" if col not in ("state", "note") else "left")
    best_number = (summary.get("best") or {}).get("number")
    for r in result.trials:
        note = "default config" if r["default"] else ""
        if r["pruned_at_step"] is not None:
            note = f"pruned at step {r['pruned_at_step']}"
        elif r["note"]:
            note = str(r["note"])[:80]
        table.add_row(str(r["number"]), r["state"], "" if r["value"] is None else f"{r['value']:.4f}",
                      *(_cell(r["params"].get(k)) for k in keys),
                      "" if r["duration_seconds"] is None else f"{r['duration_seconds']:.0f}", note,
                      style="bold green" if r["number"] == best_number else None)
    console.print(table)
    best = summary.get("best")
    if best is not None:
        console.print(f"best: trial {best['number']}, validation {metric} {best['value']:.4f}; run {best['run']}; "
                      f"config {result.best_config}", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if result.retrained is not None:
        test = result.retrained.metrics.get("test") or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
        console.print(f"best config re-trained in {result.retrained.path}; test: {shown or 'no test split'}",
                      highlight=False)
    console.print(f"study folder {result.study_dir} (trials.csv, study.md, plots); storage "
                  f"{public_url(result.storage)}; another worker: the same command with --storage "
                  f"'{public_url(result.storage)}'", highlight=False)


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
