"""Neural baselines as sub-runs of the train workflow, and every model timed on the same inputs.

Neural baselines (``baselines: [cnn_lstm, rnn, bilstm, gru, transformer]``) train as sub-runs of the main
run, through the same workflow and training loop (``RUN/baselines/NAME/`` is a complete run folder
with its own model/ and report), on the same split: the split is a seeded function of the data and
``data.*`` settings, which the sub-run keeps. They start once the main model is saved, so nothing
they do (Accelerate's state is reset per run) can disturb it.

Every model is then timed the same way: its predictor answers the same inputs (the task's
``timing_items``), tokenising or vectorising included, after a short warm-up, in this process. The
comparison table itself is drawn by ``lmtune.evaluate.comparison``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.logging import RichHandler

from lmtune.config import Config, load_config
from lmtune.config.tasks import NEURAL_BASELINES, task_info
from lmtune.console import log
from lmtune.errors import LmtuneError
from lmtune.models.neural_baselines import describe_architecture
from lmtune.tasks.base import get_predictor
from lmtune.workflows.run import Run

# Inputs the predictor answers once before the timed call (loads kernels, fills caches).
WARM_UP_ITEMS = 8


def predict_latency_ms(model_dir: Path, items: list[Any], batch_size: int) -> float | None:
    """Milliseconds per item for the saved model in ``model_dir`` to predict ``items`` (tokenising included);
    None without items."""
    if not items:
        return None
    meta = json.loads((model_dir / "lmtune.json").read_text(encoding="utf-8"))
    predictor = get_predictor(meta["task"])(model_dir, meta)
    predictor.predict(items[:WARM_UP_ITEMS], batch_size=batch_size)
    start = time.perf_counter()
    predictor.predict(items, batch_size=batch_size)
    return 1000.0 * (time.perf_counter() - start) / len(items)


def baseline_config(cfg: Config, name: str, output_dir: Path) -> Config:
    """The main config with the model swapped for baseline ``name`` and the ``baseline`` training settings.

    ``data`` is kept as is (same split, same max_length); evaluation happens once per epoch and the best
    epoch is kept; nothing is tracked; no baselines of its own.
    """
    raw = cfg.to_dict()
    b = cfg.baseline
    raw["model"] = {"name": f"baseline:{name}"}
    raw["method"] = {"name": "full"}
    raw["baselines"] = []
    raw["train"].update(epochs=b.epochs, batch_size=b.batch_size, learning_rate=b.learning_rate,
                        head_learning_rate=None, max_steps=None, eval_every=None, save_every=None,
                        gradient_accumulation=1, early_stopping_patience=None, trackers=[], keep_checkpoints=1,
                        eval_batch_size=None)
    raw["output_dir"] = str(output_dir)
    return load_config(raw)


@contextlib.contextmanager
def _quiet_console() -> Iterator[None]:
    """Detach the main run's console handler while a sub-run logs (it adds its own); train.log keeps all."""
    logger = logging.getLogger("lmtune")
    detached = [h for h in logger.handlers if isinstance(h, RichHandler)]
    for h in detached:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in detached:
            logger.addHandler(h)


def compare(cfg: Config, timing_items: list[Any], run_dir: Path, metrics: dict[str, Any] | None,
            train: Callable[..., Run]) -> dict[str, Any]:
    """Train the configured neural baselines as sub-runs and time every model's predictions.

    Runs on every process (a sub-run is a collective ``train``: the train workflow passes itself, so this
    module does not import it back); ``metrics`` is the main process's metrics (None elsewhere): its
    summary gets ``predict_ms_per_example`` of the fine-tuned model, timed on ``timing_items`` (the task's
    ``timing_items``). Returns ``{name: entry}`` for the neural baselines, shaped like the classic
    baselines' entries plus ``parameters``, ``run`` (the sub-run folder) and, on failure, ``error``.
    """
    names = [n for n in cfg.baselines if n in NEURAL_BASELINES]
    # The task's auto class decides the baseline's shape (a sentence classifier, or a tagger per token).
    auto_class = task_info(cfg.task).auto_class
    results: dict[str, Any] = {}
    for name in names:
        results[name] = _train_subrun(cfg, name, run_dir, describe_architecture(name, cfg.baseline, auto_class),
                                      train)
    if metrics is None:
        return results
    batch = cfg.train.eval_batch_size or cfg.train.batch_size
    if (run_dir / "model" / "lmtune.json").is_file():
        metrics.setdefault("summary", {})["predict_ms_per_example"] = predict_latency_ms(
            run_dir / "model", timing_items, batch)
    for entry in results.values():
        if "error" not in entry:
            entry["predict_ms_per_example"] = predict_latency_ms(run_dir / entry["run"] / "model", timing_items,
                                                                 batch)
    return results


def _train_subrun(cfg: Config, name: str, run_dir: Path, description: str,
                  train: Callable[..., Run]) -> dict[str, Any]:
    """One neural baseline trained through ``train``; a failure is reported, not raised."""
    out = run_dir / "baselines" / name
    entry: dict[str, Any] = {"description": description, "kind": "neural", "run": f"baselines/{name}",
                             "train_seconds": None, "predict_ms_per_example": None, "size_bytes": None,
                             "parameters": None, "metrics": {}}
    log.info("baseline %s: training on the same split (sub-run in %s)", name, out)
    start = time.perf_counter()
    try:
        sub_cfg = baseline_config(cfg, name, out)
        with _quiet_console():
            run = train(sub_cfg, overwrite=True, show_progress=False)
    except LmtuneError as exc:
        log.warning("baseline %s failed: %s", name, exc)
        return {**entry, "error": str(exc)}
    summary = run.metrics.get("summary", {})
    embeddings = run.meta.get("embeddings") or {}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # model/ holds the best weights
    entry.update(
        # Loop time plus the word2vec training that built its starting embeddings (if any).
        train_seconds=float(summary.get("train_seconds", 0.0)) + float(embeddings.get("train_seconds", 0.0)),
        wall_seconds=time.perf_counter() - start,
        size_bytes=int(sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))),
        parameters=int(summary.get("total_parameters", 0)),
        steps=summary.get("steps"), best_step=summary.get("best_step"),
        metrics={s: run.metrics[s] for s in ("validation", "test") if s in run.metrics},
        **({"embeddings": embeddings} if embeddings else {}),
    )
    test = entry["metrics"].get("test") or entry["metrics"].get("validation") or {}
    metric = task_info(cfg.task).comparison_metric
    log.info("baseline %s: %s %.4f, %d steps in %.0f s", name, metric, test.get(metric, float("nan")),
             entry["steps"] or 0, entry["train_seconds"])
    return entry
