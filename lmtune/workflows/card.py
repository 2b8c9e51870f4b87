"""The model card: a README.md beside the weights, in the Hugging Face format (YAML front matter)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData, metadata_load

from lmtune.config import Config
from lmtune.config.tasks import task_info
from lmtune.evaluate.fairness import card_lines
from lmtune.evaluate.memorisation import card_lines as memorisation_card_lines
from lmtune.models.registry import find_bundled
from lmtune.training.privacy import describe_privacy
from lmtune.workflows.pii_scan import card_lines as pii_card_lines


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _usage(cfg: Config, name: str) -> list[str]:
    """Lines of Python that use the model folder ``name`` with plain transformers (the task's ``info.usage``)."""
    # A neural baseline's model type is lmtune's own: importing its module registers it with transformers
    # (``import lmtune.tasks`` no longer does: task folders load their modules only when a task runs).
    register = ["import lmtune.models.neural_baselines  # registers model_type lmtune_baseline"] \
        if cfg.model.name.startswith("baseline:") else []
    return [*register, *task_info(cfg.task).usage.format(name=name).split("\n")]


# A path's folders (`/home/me/data/`, `C:\\Users\\me\\`): the card names files only, since `lmtune push` publishes it.
_FOLDERS = re.compile(r"(?:[A-Za-z]:)?[^\s`(),:]*[/\\]([^\s`(),:/\\]+)")


def file_names(text: str) -> str:
    """``text`` with every path cut to its file name (``held out of /home/me/data/train.csv`` -> ``held out of
    train.csv``)."""
    return _FOLDERS.sub(r"\1", text)


def _sources(cfg: Config, data_info: dict[str, Any]) -> list[tuple[str, str]]:
    """Each split and where it came from (a file, or a held-out share of the training file), by file name only:
    the folders of this machine are nobody's business once the card is on the Hub."""
    out = []
    for split in ("train", "validation", "test"):
        source = data_info.get(split, {}).get("source") or getattr(cfg.data, split)
        if source is not None:
            out.append((split, file_names(str(source))))
    return out


def _privacy_lines(cfg: Config, meta: dict[str, Any], metrics: dict[str, Any], decoder: bool) -> list[str]:
    """What was done about personal data, differential privacy and memorisation, saying plainly what was not."""
    privacy = metrics.get("summary", {}).get("privacy")
    lines = [*(pii_card_lines(meta) or ["- personal data: not scanned (`data.pii: off`); the training data may hold "
                                         "personal data, and the model may repeat it."])]
    lines.append(f"- {describe_privacy(privacy)}" if privacy else
                 "- differential privacy: none (`train.privacy` unset): no formal bound on what the model reveals "
                 "about any one training example.")
    audit = memorisation_card_lines(metrics)
    if audit:
        lines += audit
    elif decoder:
        lines.append("- memorisation audit: not run (`evaluate.memorisation`).")
    return lines


def hub_base_model(cfg: Config, meta: dict[str, Any]) -> str | None:
    """The Hub id of the model this one was fine-tuned from, for the card's ``base_model``: a Hub model's id, a
    bundled model's original id; None for a local folder, a model trained from scratch or a neural baseline
    (the Hub accepts only ids there)."""
    if cfg.model.init != "pretrained":
        return None
    hub = meta.get("base_model_hub")
    if isinstance(hub, dict) and hub.get("repo_id"):
        return str(hub["repo_id"])
    bundled = find_bundled(str(meta.get("base_model") or ""))
    return bundled.hf_id if bundled is not None else None


def base_model_license(cfg: Config, meta: dict[str, Any]) -> str | None:
    """The base model's license where it is known (a bundled model's, or the Hub model card's); else None."""
    if cfg.model.init != "pretrained":
        return None
    bundled = find_bundled(str(meta.get("base_model") or ""))
    if bundled is not None and not meta.get("base_model_hub"):
        return bundled.license
    card = Path(str(meta.get("base_model_path") or "")) / "README.md"
    try:
        license_ = (metadata_load(card) or {}).get("license") if meta.get("base_model_path") and card.is_file() else None
    except (OSError, ValueError):  # an unreadable card: no license claimed rather than a wrong one
        return None
    return str(license_) if isinstance(license_, str) else None


def card_metadata(cfg: Config, meta: dict[str, Any], metrics: dict[str, Any]) -> ModelCardData:
    """The card's Hub metadata (its YAML front matter): library, task, base model, license, tags and the
    headline metrics as a ``model-index`` (one EvalResult per metric, on the test split, else validation)."""
    info = task_info(cfg.task)
    test = metrics.get("test") or metrics.get("validation") or {}
    split = "test" if metrics.get("test") else "validation"
    # The training file's name, not its path: a card is meant to be shared, a path names the user's folders.
    dataset = file_names(cfg.data.train)
    results = [EvalResult(task_type=info.pipeline_tag, dataset_type="custom", dataset_name=dataset,
                          dataset_split=split, metric_type=k, metric_value=float(test[k]), metric_name=f"{split} {k}")
               for k in info.card_metrics[:3] if isinstance(test.get(k), int | float)]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=info.pipeline_tag,
        base_model=hub_base_model(cfg, meta),
        license=base_model_license(cfg, meta),
        # lmtune trains from local files: a Hub data set id is known for none of them.
        datasets=None,
        tags=["lmtune", cfg.task, cfg.method.name],
        model_name=Path(cfg.output_dir).name,
        eval_results=results or None,
    )


def write_model_card(folder: Path, cfg: Config, meta: dict[str, Any], metrics: dict[str, Any],
                     data_info: dict[str, Any]) -> Path:
    """Write ``README.md``: what the model is, how it was trained, how well it does, how to use it."""
    info = task_info(cfg.task)
    test = metrics.get("test") or metrics.get("validation") or {}
    split = "test" if metrics.get("test") else "validation"
    keys = info.card_metrics
    summary = metrics.get("summary", {})
    start: dict[str, Any] = next(iter(metrics.get("starting_point", {}).values()), {})
    labels = meta.get("labels") or []
    lines = [
        "---", card_metadata(cfg, meta, metrics).to_yaml(), "---", "",
        f"# {Path(cfg.output_dir).name}", "",
        f"A `{meta.get('base_model')}` model fine-tuned with [lmtune](https://github.com/) for **{cfg.task}** "
        f"({cfg.method.name} fine-tuning" + (", LoRA merged into the weights" if meta.get("saved_as") == "merged" else "")
        + ").", "",
        "## Intended use", "",
        f"Made for {cfg.task} ({info.summary}) on inputs like its training data (`{file_names(str(cfg.data.train))}`)"
        + (f", answering with one of {len(labels)} labels" if labels else "") + ". Out of scope: inputs unlike "
        "that data (other domains, languages or formats), and decisions about people without checking the model "
        "on the groups they belong to (see Bias and fairness).", "",
        "## Results", "",
        f"| metric ({split}) | this model | starting point |", "|---|---|---|",
    ]
    for k in keys:
        if k in test:
            lines.append(f"| {k} | {_fmt(test[k])} | {_fmt(start.get(k, '–'))} |")
    lines += [
        "", "## Training data", "",
        *[f"- {s}: `{source}` ({data_info.get(s, {}).get('examples', '–')} examples)"
          for s, source in _sources(cfg, data_info)],
        *([f"- labels ({len(labels)}): " + ", ".join(f"`{x}`" for x in labels[:50])] if labels else []),
        "", "## Training", "",
        *([f"- chat template: {'the base model' + chr(39) + 's own' if meta.get('chat_template') == 'model' else 'lmtune default (ChatML)'}; "
           f"loss on {meta.get('train_on')} tokens; generation stops at token ids {meta.get('eos_token_ids')}"]
          if info.chat else []),
        *([f"- route: {meta.get('route_description')}; job: {meta.get('seq2seq_task')}"
           + (f" ({meta.get('source_language')} -> {meta.get('target_language')})" if meta.get("source_language") else "")
           + (f"; prompt `{meta.get('prompt_template')!r}`" if meta.get("prompt_template") else "")]
          if "route_description" in meta else []),
        f"- max length {cfg.data.max_length} tokens; {summary.get('steps', '–')} optimizer steps, "
        f"batch {cfg.train.batch_size} x accumulation {cfg.train.gradient_accumulation}, "
        f"learning rate {cfg.train.learning_rate:g} ({cfg.train.schedule}), precision {summary.get('precision', '–')}",
        f"- trainable parameters: {summary.get('trainable_parameters', 0):,} of {summary.get('total_parameters', 0):,}",
        "", "## Privacy", "",
        *_privacy_lines(cfg, meta, metrics, info.decoder),
        "", *(card_lines(metrics) if info.slices else []),
        "## Use", "", "```python",
        *_usage(cfg, folder.name if folder.name != ".model.tmp" else "model"), "```", "",
        "or `lmtune predict RUN --input FILE --output predictions.jsonl`"
        + (" and `lmtune chat RUN`" if info.chat else "") + ".", "",
        "## Limitations", "",
        "Scores hold for data like the training data; check on your own examples before relying on it.",
        info.card_limitation, "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
