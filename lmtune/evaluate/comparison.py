"""The fine-tuned model against its starting point and every baseline, in one table.

The train workflow fits the baselines (classic ones on the spot, neural ones as sub-runs) and times every
model on the same inputs (``lmtune.workflows.baselines``); this module turns the results into the report's
table (``report.md``) and ``comparison.json``, sorted by the task's comparison metric, with the best value
of each column in bold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.config import Config
from lmtune.data.features import save_json_atomic
from lmtune.evaluate.plots import lower_is_better
from lmtune.evaluate.report import Bold

# Inputs each model predicts for the latency column (a task's ``timing_items`` give at most this many: a bound
# on the time timing costs).
LATENCY_EXAMPLES = 500
COMPARISON_FILE = "comparison.json"


# ------------------------------------------------------------------------------------------ the table
def comparison_rows(cfg: Config, metrics: dict[str, Any], baselines: dict[str, Any], split: str, model_bytes: int,
                    *, headline: list[str], main_metric: str, starting_point_name: str = "before fine-tuning",
                    ) -> tuple[list[dict[str, Any]], str]:
    """One row per model (fine-tuned, starting point, each baseline), sorted best first; and the sort metric.

    ``headline`` are the metrics each row shows, ``main_metric`` the one rows are sorted by (the task's
    ``headline_metrics`` and ``comparison_metric``); the starting point's row is named "MODEL
    ``starting_point_name``" (the task's ``info.starting_point_name``). A row: ``name``, ``kind``,
    ``metrics`` (the headline ones), ``train_seconds``, ``parameters``, ``size_mb``,
    ``predict_ms_per_example``, and ``error`` for a baseline that failed.
    """
    summary = metrics.get("summary", {})
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
        name = f"{model_name} {starting_point_name}"
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
