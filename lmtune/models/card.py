"""The model card: a README.md beside the weights, in the Hugging Face format (YAML front matter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmtune.config import Config


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def write_model_card(folder: Path, cfg: Config, meta: dict[str, Any], metrics: dict[str, Any],
                     data_info: dict[str, Any]) -> Path:
    """Write ``README.md``: what the model is, how it was trained, how well it does, how to use it."""
    test = metrics.get("test") or metrics.get("validation") or {}
    split = "test" if metrics.get("test") else "validation"
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification" if cfg.task == "classification" else cfg.task,
        "base_model": meta.get("base_model"),
        "tags": ["lmtune", cfg.task, cfg.method.name],
        "model-index": [{
            "name": Path(cfg.output_dir).name,
            "results": [{
                "task": {"type": "text-classification" if cfg.task == "classification" else cfg.task},
                "dataset": {"name": str(cfg.data.train), "type": "custom", "split": split},
                "metrics": [{"type": k, "value": float(test[k])} for k in ("accuracy", "macro_f1") if k in test],
            }],
        }],
    }
    summary = metrics.get("summary", {})
    start: dict[str, Any] = next(iter(metrics.get("starting_point", {}).values()), {})
    labels = meta.get("labels") or []
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {Path(cfg.output_dir).name}", "",
        f"A `{meta.get('base_model')}` model fine-tuned with [lmtune](https://github.com/) for **{cfg.task}** "
        f"({cfg.method.name} fine-tuning" + (", LoRA merged into the weights" if meta.get("saved_as") == "merged" else "")
        + ").", "",
        "## Results", "",
        f"| metric ({split}) | this model | starting point |", "|---|---|---|",
    ]
    for k in ("accuracy", "macro_f1", "weighted_f1", "loss"):
        if k in test:
            lines.append(f"| {k} | {_fmt(test[k])} | {_fmt(start.get(k, '–'))} |")
    lines += [
        "", "## Training", "",
        f"- data: `{cfg.data.train}`; train/validation/test examples: "
        + ", ".join(str(data_info.get(s, {}).get("examples", "–")) for s in ("train", "validation", "test")),
        f"- labels ({len(labels)}): " + ", ".join(f"`{x}`" for x in labels[:50]),
        f"- max length {cfg.data.max_length} tokens; {summary.get('steps', '–')} optimizer steps, "
        f"batch {cfg.train.batch_size} x accumulation {cfg.train.gradient_accumulation}, "
        f"learning rate {cfg.train.learning_rate:g} ({cfg.train.schedule}), precision {summary.get('precision', '–')}",
        f"- trainable parameters: {summary.get('trainable_parameters', 0):,} of {summary.get('total_parameters', 0):,}",
        "", "## Use", "", "```python",
        "from transformers import pipeline",
        f'clf = pipeline("text-classification", model="{folder.name if folder.name != ".model.tmp" else "model"}")',
        'clf("an example sentence")', "```", "",
        "or `lmtune predict RUN --input texts.csv --output predictions.csv`.", "",
        "## Limitations", "",
        "Scores hold for data like the training data; check on your own examples before relying on it.",
        "The labels come from the training file: the model cannot predict a label it never saw.", "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
