"""``report.md`` of a run: what was trained, how well it does against its starting point and
cheap baselines, how training went, and how to reproduce it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmtune.config import Config
from lmtune.data.mixing import describe_mix
from lmtune.evaluate import fairness, memorisation
from lmtune.evaluate.comparison import comparison_rows, table_cells, write_comparison
from lmtune.evaluate.plots import plot_metric_comparison, plot_training_curves
from lmtune.evaluate.report import Report
from lmtune.tasks.base import Task, TaskData
from lmtune.training.privacy import describe_privacy
from lmtune.workflows import pii_scan


def _batching(cfg: Config) -> str:
    """How training batches were drawn."""
    if cfg.train.privacy is not None:
        return "Poisson-sampled" if cfg.train.privacy.poisson_sampling else "random"
    return "length-grouped" if cfg.train.group_by_length else "random"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) if path.is_dir() else 0


def _utilisation(summary: dict[str, Any]) -> str:
    """The run's model FLOPs/s and MFU as a sentence (empty for runs without them: streams, lmtune 0.x)."""
    if summary.get("model_gflops_per_second") is None:
        return ""
    text = f" Model FLOPs: {summary['model_gflops_per_second']:,.1f} GFLOP/s"
    if summary.get("mfu") is not None:
        text += (f", {100 * summary['mfu']:.1f}% of this machine's measured {summary['precision']} matmul peak "
                 f"({summary['matmul_peak_gflops']:,.0f} GFLOP/s: model FLOP utilisation)")
    return text + "."


def write_report(
    run_dir: Path,
    cfg: Config,
    task: Task,
    data: TaskData,
    metrics: dict[str, Any],
    baselines: dict[str, Any],
    model_info: dict[str, Any],
) -> Path:
    """Compose and write ``report.md`` (with PNG plots under ``plots/``)."""
    summary = metrics["summary"]
    metric, _ = cfg.train.resolved_metric(task.info.default_metric)
    split = "test" if "test" in metrics else "validation"
    headline = task.headline_metrics
    r = Report(f"lmtune run: {run_dir.name}")
    hub = model_info.get("base_model_hub")
    at = f" (Hub commit `{hub['commit']}`)" if hub else ""
    r.paragraph(
        f"Task **{cfg.task}**; model `{cfg.model.name}`{at} with **{cfg.method.name}** fine-tuning; "
        f"data `{cfg.data.train}`. {summary['steps']} optimizer steps in {summary['train_seconds']:.0f} s "
        f"({summary['train_tokens_per_second']:,.0f} real tokens/s, precision {summary['precision']}, "
        f"{summary['num_processes']} process(es)); best checkpoint at step {summary['best_step']} by "
        f"validation {metric}.{_utilisation(summary)}"
    )

    # --- the comparison table: the fine-tuned model against its starting point and the baselines
    r.heading(f"Results on the {split} split")
    test = metrics.get(split, {})
    present = [(k, label) for k, label in headline if k in test]
    rows, main_metric = comparison_rows(cfg, metrics, baselines, split, _dir_size(run_dir / "model"),
                                        headline=[k for k, _ in headline], main_metric=task.comparison_metric,
                                        starting_point_name=task.info.starting_point_name)
    write_comparison(run_dir, rows, split, main_metric)
    header, cells = table_cells(rows, present)
    r.table(header, cells)
    if "predict_ms_per_example" in summary:
        latency = ("milliseconds per example to predict the same raw texts (the first of the split, tokenising "
                   "or vectorising included, after a warm-up) on this machine")
    else:
        latency = "batched evaluation time per example on this machine, over pre-tokenised, length-sorted batches"
    notes = [
        f"{split} examples: {test.get('num_examples', data.info.get(split, {}).get('examples', '–'))}; sorted by "
        f"{main_metric}, the best value of each column in bold. Latency: {latency}. Train time: the training "
        "loop (neural baselines: plus the word2vec training of their embeddings), or the baseline's fit."
    ]
    for name, b in baselines.items():
        run_link = f" (run folder `{b['run']}`)" if b.get("run") else ""
        notes.append(f"`{name}`: {b['description']}{run_link}" + (f" Failed: {b['error']}" if "error" in b else ""))
    r.bullets(notes)
    if test and main_metric in test:
        comparison = [(row["name"].replace("baseline: ", ""), row["metrics"].get(main_metric)) for row in rows]
        plot_metric_comparison(comparison, run_dir / "plots" / "comparison.png", metric=main_metric)
        r.image("plots/comparison.png", f"{main_metric} by model")

    # --- every split's headline metrics
    r.heading("Metrics per split")
    keys = list(dict.fromkeys([k for k, _ in present] + [k for k in ("micro_f1", "roc_auc", "loss", "perplexity")
                                                            if k in test]))
    split_rows = [[s, *[metrics[s].get(k) for k in keys]] for s in ("validation", "test") if s in metrics]
    r.table(["split", *keys], split_rows)

    # --- training curves
    r.heading("Training")
    records = _read_jsonl(run_dir / "metrics.jsonl")
    plot_training_curves(records, run_dir / "plots" / "training_curves.png", metric=metric)
    r.image("plots/training_curves.png", "training and validation curves")
    r.bullets(
        [
            f"trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,} "
            f"({100 * summary['trainable_fraction']:.2f}%)",
            f"batch {cfg.train.batch_size} x accumulation {cfg.train.gradient_accumulation}, learning rate "
            f"{cfg.train.learning_rate:g} ({cfg.train.schedule}, warmup {cfg.train.warmup_steps or cfg.train.warmup_ratio}),"
            f" {_batching(cfg)} batches, "
            + ("packed rows (no attention across examples)" if task.packing else "dynamic padding"),
            f"stopped early: {summary['stopped_early']}",
            *([describe_privacy(summary["privacy"])] if summary.get("privacy") else []),  # train.privacy
            f"saved model: {model_info.get('saved_as')}; reload check: "
            + (
                f"max logit difference {model_info['reload_check']['max_abs_logit_diff']:.1e} on "
                f"{model_info['reload_check']['examples']} examples"
                if model_info.get("reload_check")
                else "not run"
            ),
        ]
    )

    task.report_sections(r, run_dir, metrics, data)
    fairness.report_section(r, run_dir, metrics)
    memorisation.report_section(r, run_dir, metrics)  # evaluate.memorisation: canary exposure, extraction
    pii_scan.report_section(r, run_dir)  # what data.pii found and did

    # --- data
    r.heading("Data")
    info = data.info
    data_rows = []
    for s in ("train", "validation", "test"):
        i = info.get(s, {})
        data_rows.append(
            [
                s,
                i.get("examples"),
                i.get("tokens"),
                i.get("truncated", 0),
                i.get("skipped_empty", 0) + i.get("skipped_too_long", 0),
                i.get("duplicates_removed", 0),
                str(i.get("source", "")),
            ]
        )
    r.table(
        ["split", "examples", "tokens", "truncated", "skipped (empty or too long)", "duplicates removed", "source"],
        data_rows,
    )
    if info.get("mix"):  # a mixed data.train: each source's share
        sentence, header, mix_rows = describe_mix(info["mix"])
        r.paragraph(sentence)
        r.table(header, mix_rows)
    counts = info.get("train", {}).get("label_counts", {})
    if counts:
        r.paragraph(
            "Training label counts: "
            + ", ".join(f"`{k}` {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:30])
        )

    r.heading("Reproduce")
    r.code(f"lmtune train {run_dir}/config.yaml --output_dir {run_dir}-again", "bash")
    return r.write(run_dir / "report.md")
