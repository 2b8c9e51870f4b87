"""The fine-tuned model against its starting point and every baseline, in one table.

Neural baselines (``baselines: [cnn_lstm, bilstm, gru, transformer]``) train as sub-runs of the main
run, through the same workflow and training loop (``RUN/baselines/NAME/`` is a complete run folder
with its own model/ and report), on the same split: the split is a seeded function of the data and
``data.*`` settings, which the sub-run keeps. They start once the main model is saved, so nothing
they do (Accelerate's state is reset per run) can disturb it.

Every model is then timed the same way: predicting the same raw texts (the first
``LATENCY_EXAMPLES`` of the report split), tokenising or vectorising included, after a short warm-up,
in this process. The table (``report.md``, ``comparison.json``) is sorted by the task's comparison
metric, with the best value of each column in bold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtune.data.features import save_json_atomic
from lmtune.errors import LmtuneError

if TYPE_CHECKING:
    from lmtune.config import Config
    from lmtune.tasks.base import TaskData

log = logging.getLogger("lmtune")

# Texts each model predicts for the latency column (a bound on the time it costs).
LATENCY_EXAMPLES = 500
COMPARISON_FILE = "comparison.json"


# ------------------------------------------------------------------------------------------ latency
def latency_inputs(data: TaskData) -> tuple[str, tuple[list[str], list[str] | None], list[str]]:
    """The split timed, its first texts (and pairs) for model predictors, and the same as joined strings."""
    inputs = data.extra.get("inputs", {})
    split = "test" if inputs.get("test") and inputs["test"][0] else "validation"
    texts, pairs = inputs.get(split, ([], None))
    n = min(LATENCY_EXAMPLES, len(texts))
    joined = data.extra.get("texts", {}).get(split, texts)
    return split, (list(texts[:n]), list(pairs[:n]) if pairs else None), list(joined[:n])


def predict_latency_ms(model_dir: Path, texts: list[str], pairs: list[str] | None, batch_size: int) -> float | None:
    """Milliseconds per example for a saved classification model to predict ``texts`` (tokenising included)."""
    from lmtune.tasks.classification.predict import ClassificationPredictor

    if not texts:
        return None
    meta = json.loads((model_dir / "lmtune.json").read_text(encoding="utf-8"))
    predictor = ClassificationPredictor(model_dir, meta)
    predictor.probabilities(texts[:8], pairs[:8] if pairs else None, batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    predictor.probabilities(texts, pairs, batch_size=batch_size)
    return 1000.0 * (time.perf_counter() - start) / len(texts)


# ------------------------------------------------------------------------------------------ sub-runs
def baseline_config(cfg: Config, name: str, output_dir: Path) -> Config:
    """The main config with the model swapped for baseline ``name`` and the ``baseline`` training settings.

    ``data`` is kept as is (same split, same max_length); evaluation happens once per epoch and the best
    epoch is kept; nothing is tracked; no baselines of its own.
    """
    from lmtune.config import load_config

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
    from rich.logging import RichHandler

    logger = logging.getLogger("lmtune")
    detached = [h for h in logger.handlers if isinstance(h, RichHandler)]
    for h in detached:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in detached:
            logger.addHandler(h)


def compare(cfg: Config, data: TaskData, run_dir: Path, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Train the configured neural baselines as sub-runs and time every model's predictions.

    Runs on every process (a sub-run is a collective ``lmtune.train``); ``metrics`` is the main
    process's metrics (None elsewhere): its summary gets ``predict_ms_per_example`` of the fine-tuned
    model. Returns ``{name: entry}`` for the neural baselines, shaped like ``run_baselines``' entries
    plus ``parameters``, ``run`` (the sub-run folder) and, on failure, ``error``.
    """
    from lmtune.evaluate.baselines import is_subrun_baseline
    from lmtune.models.neural_baselines import describe_architecture

    names = [n for n in cfg.baselines if is_subrun_baseline(n)]
    results: dict[str, Any] = {}
    for name in names:
        results[name] = _train_subrun(cfg, name, run_dir, describe_architecture(name, cfg.baseline))
    if metrics is None:
        return results
    _, (texts, pairs), _ = latency_inputs(data)
    batch = cfg.train.eval_batch_size or cfg.train.batch_size
    if (run_dir / "model" / "lmtune.json").is_file():
        metrics.setdefault("summary", {})["predict_ms_per_example"] = predict_latency_ms(
            run_dir / "model", texts, pairs, batch)
    for entry in results.values():
        if "error" not in entry:
            entry["predict_ms_per_example"] = predict_latency_ms(run_dir / entry["run"] / "model", texts, pairs,
                                                                 batch)
    return results


def _train_subrun(cfg: Config, name: str, run_dir: Path, description: str) -> dict[str, Any]:
    """One neural baseline trained through ``lmtune.train``; a failure is reported, not raised."""
    from lmtune.workflows.train import train

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
    log.info("baseline %s: accuracy %.4f, %d steps in %.0f s", name, test.get("accuracy", float("nan")),
             entry["steps"] or 0, entry["train_seconds"])
    return entry


# ------------------------------------------------------------------------------------------ the table
def comparison_rows(cfg: Config, task: Any, metrics: dict[str, Any], baselines: dict[str, Any], split: str,
                    model_bytes: int) -> tuple[list[dict[str, Any]], str]:
    """One row per model (fine-tuned, starting point, each baseline), sorted best first; and the sort metric.

    A row: ``name``, ``kind``, ``metrics`` (the headline ones), ``train_seconds``, ``parameters``,
    ``size_mb``, ``predict_ms_per_example``, and ``error`` for a baseline that failed.
    """
    from lmtune.evaluate.plots import lower_is_better

    summary = metrics.get("summary", {})
    main_metric = getattr(task, "comparison_metric", cfg.train.resolved_metric(task.default_metric)[0])
    headline = [k for k, _ in getattr(task, "headline_metrics", [(main_metric, main_metric)])]
    test = metrics.get(split, {})
    start = metrics.get("starting_point", {}).get(split, {})
    model_name = Path(cfg.model.name).name or cfg.model.name
    latency = summary.get("predict_ms_per_example", summary.get("eval_ms_per_example", {}).get(split))
    params = summary.get("total_parameters")
    size = model_bytes / 1e6
    from_scratch = cfg.model.name.startswith("baseline:")  # a neural baseline as the run's own model
    tuned = f"trained {model_name}" if from_scratch else f"fine-tuned {model_name} ({cfg.method.name})"
    rows = [{"name": tuned, "kind": "fine-tuned",
             "metrics": {k: test.get(k) for k in headline}, "train_seconds": summary.get("train_seconds"),
             "parameters": params, "size_mb": size, "predict_ms_per_example": latency}]
    if start:
        name = f"{model_name} before fine-tuning" + (" (new head)" if cfg.task == "classification" else "")
        if cfg.model.init == "scratch" or from_scratch:
            name = "the same model at random initialisation"
        rows.append({"name": name, "kind": "starting point", "metrics": {k: start.get(k) for k in headline},
                     "train_seconds": None, "parameters": params, "size_mb": size, "predict_ms_per_example": latency})
    for bname, b in baselines.items():
        bm = b.get("metrics", {}).get(split, {})
        size_bytes = b.get("size_bytes")
        rows.append({"name": f"baseline: {bname}", "kind": b.get("kind", "classic"),
                     "metrics": {k: bm.get(k) for k in headline}, "train_seconds": b.get("train_seconds"),
                     "parameters": b.get("parameters"), "size_mb": None if size_bytes is None else size_bytes / 1e6,
                     "predict_ms_per_example": b.get("predict_ms_per_example"),
                     **({"error": b["error"]} if "error" in b else {})})
    sign = 1.0 if lower_is_better(main_metric) else -1.0

    def key(row: dict[str, Any]) -> tuple[bool, float]:
        value = row["metrics"].get(main_metric)
        return (value is None, sign * float(value) if value is not None else 0.0)

    # Stable: equal scores keep the order fine-tuned, starting point, baselines as configured.
    return sorted(rows, key=key), main_metric


def write_comparison(run_dir: Path, rows: list[dict[str, Any]], split: str, metric: str) -> Path:
    """``comparison.json``: the report's comparison table as data."""
    path = run_dir / COMPARISON_FILE
    save_json_atomic(path, {"split": split, "sorted_by": metric, "latency_examples": LATENCY_EXAMPLES,
                            "rows": rows})
    return path


def table_cells(rows: list[dict[str, Any]], present: list[tuple[str, str]]) -> tuple[list[str], list[list[Any]]]:
    """Header and cells of the comparison table, the best value of each column in bold."""
    from lmtune.evaluate.plots import lower_is_better
    from lmtune.evaluate.report import Bold

    columns: list[tuple[str, Any, bool]] = [
        (label, (lambda r, k=k: r["metrics"].get(k)), lower_is_better(k)) for k, label in present]
    columns += [
        ("train time (s)", lambda r: r["train_seconds"], True),
        ("parameters", lambda r: r["parameters"], True),
        ("size (MB)", lambda r: r["size_mb"], True),
        ("latency (ms/example)", lambda r: r["predict_ms_per_example"], True),
    ]
    best: list[Any] = []
    for _, get, lower in columns:
        values = [get(r) for r in rows if get(r) is not None and "error" not in r]
        best.append((min(values) if lower else max(values)) if values else None)
    cells = []
    for r in rows:
        name = r["name"] + (f" (failed: {r['error'].splitlines()[0][:80]})" if "error" in r else "")
        row: list[Any] = [name]
        for (_, get, _), top in zip(columns, best, strict=True):
            value = get(r)
            row.append(Bold(value) if value is not None and value == top and len(rows) > 1 else value)
        cells.append(row)
    return ["model", *[c[0] for c in columns]], cells
