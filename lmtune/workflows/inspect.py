"""``lmtune data inspect``: a pre-flight look at the data exactly as training will see it.

The config is loaded, the model resolved and the data prepared by the task itself
(validation, deduplication, the seeded split, tokenisation, the on-disk cache), so
every number here is what ``lmtune train`` would get: split sizes, rows dropped,
label balance and the trivial majority-class accuracy, token lengths and what
``data.max_length`` truncates, and the padding cost of the configured batching.
Errors the user can fix arrive as lmtune errors from the task and are not caught.

This module holds the generic report (labelled rows of tokens) and asks the task for the rest: a task
whose data is not such rows (chat, raw text) writes its whole report (``Task.inspect``) and may print it
(``Task.render_inspection``); a task may give its own facts per split and sections
(``Task.inspect_facts``, ``Task.inspect_details``).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lmtune.config import Config, load_config
from lmtune.config.schema import describe_learning_rates
from lmtune.console import quiet_libraries
from lmtune.data import mixing
from lmtune.data.features import LengthGroupedBatchSampler
from lmtune.data.mixing import describe_mix
from lmtune.tasks import Task, get_task
from lmtune.tasks.inspection import collect_warnings, length_stats, round_up, split_rank

if TYPE_CHECKING:
    from rich.console import Console

# A split is flagged as imbalanced when its largest class has more than this many times
# the examples of its smallest.
IMBALANCE_RATIO = 5.0
# Suggest a larger data.max_length when more than this fraction of a split is truncated.
TRUNCATION_WARN_FRACTION = 0.05
# Suggest a smaller data.max_length when train's p99 length is below this fraction of it.
SHORT_P99_FRACTION = 0.5


def inspect_data(
    config: Config | str | Path | dict[str, Any], *, overrides: dict[str, Any] | None = None, examples: int = 3
) -> dict[str, Any]:
    """Prepare a config's data as training would and return JSON-serialisable facts about it.

    ``config`` is a YAML path, a mapping or a ``Config``; ``overrides`` are dotted keys
    (``{"data.max_length": 64}``); ``examples`` is how many train examples to render.

    Keys: ``task``, ``model``, ``model_path``, ``max_length``, ``batch_size``, ``labels``,
    ``multi_label``, ``splits`` (per split: ``examples``, ``source``, ``skipped_empty``,
    ``duplicates_removed``, ``label_counts``, ``label_percent``, ``imbalance_ratio``,
    ``imbalanced``, ``lengths`` (min/median/p90/p99/max/mean before truncation, special
    tokens included), ``truncated``, ``tokens`` (as the model sees them), ``tokens_dropped``),
    ``majority_class``, ``padding``, ``suggestions``, ``examples`` and ``warnings`` (what
    data preparation logged).

    A task with a report of its own (``Task.inspect``: sft, causal_lm) returns that instead; a task with
    its own facts per split (``Task.inspect_facts``) returns ``facts``, ``summary``, ``suggestions`` and
    ``examples``.
    """
    task, source = _task(config, overrides)
    return _inspect(task, source, examples=examples)


def _with_learning_rates(report: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The report with the run's effective learning rates (method-aware defaults named), as ``plan`` shows."""
    report["learning_rates"] = cfg.learning_rates()
    return report


def _task(config: Config | str | Path | dict[str, Any], overrides: dict[str, Any] | None) -> tuple[Task, str | None]:
    """The configured task, and the config file's name (None for a mapping or a ``Config``)."""
    if isinstance(config, Config):
        cfg = load_config(config.to_dict(), overrides) if overrides else config
        source = None
    else:
        # A deep copy: overrides are applied in place, and the caller's mapping stays theirs.
        cfg = load_config(copy.deepcopy(config) if isinstance(config, dict) else config, overrides)
        source = None if isinstance(config, dict) else str(config)
    quiet_libraries()
    return get_task(cfg.task)(cfg), source


def _inspect(task: Task, source: str | None, *, examples: int) -> dict[str, Any]:
    """:func:`inspect_data`'s report for a built task; with a mixed data.train, ``mix``: what each source gave
    (:func:`lmtune.data.mixing.mix_record`)."""
    with mixing.recording() as mixes:
        report = _inspect_task(task, source, examples=examples)
    if mixes:
        report["mix"] = mixes[-1]
    return report


def _inspect_task(task: Task, source: str | None, *, examples: int) -> dict[str, Any]:
    cfg = task.config
    own = task.inspect(source, examples=examples)  # chat or raw text: the task's whole report
    if own is not None:
        return _with_learning_rates(own, cfg)
    # A task may have no model folder (a neural baseline builds its tokenizer from the data).
    model_path = task.model_path()
    tokenizer = task.load_tokenizer(model_path)
    with collect_warnings() as warnings:
        data = task.prepare(tokenizer)
    facts = task.inspect_facts(data)  # a task's own facts per split (question_answering: windows ...)
    if facts is not None:
        # Run-wide facts, suggestions and rendered examples (token_classification, seq2seq).
        details = task.inspect_details(data, facts, examples=examples)
        # Keys starting with "_" are numbers the task keeps for its suggestions, not table rows.
        facts = {s: {k: v for k, v in facts[s].items() if not k.startswith("_")} for s in sorted(facts, key=split_rank)}
        return _with_learning_rates(
            {"config": source, "task": cfg.task, "model": cfg.model.name, "max_length": cfg.data.max_length,
             "batch_size": cfg.train.batch_size, "facts": facts, "summary": details.get("summary", {}),
             "suggestions": details.get("suggestions", []), "examples": details.get("examples", []),
             "warnings": warnings}, cfg)

    d, t = cfg.data, cfg.train
    labels: list[str] = list(data.info["labels"])
    multi_label = bool(data.info["multi_label"])
    # Plain lists: the task's lengths may be a lazy Arrow column, slow to index one by one.
    lengths = {split: [int(n) for n in data.lengths[split]] for split in data.splits}
    splits: dict[str, Any] = {}
    full_lengths: dict[str, list[int]] = {}
    for split in sorted(data.splits, key=split_rank):
        full = _untruncated_lengths(tokenizer, *data.extra["inputs"][split])
        full_lengths[split] = full
        splits[split] = _split_facts(data.info[split], lengths[split], full, labels, d.max_length)

    majority = None
    if not multi_label and splits["train"]["examples"]:
        counts = splits["train"]["label_counts"]
        top = max(labels, key=lambda name: counts[name])
        majority = {
            "label": top,
            "rates": {s: _ratio(f["label_counts"][top], f["examples"]) for s, f in splits.items() if f["examples"]},
        }

    collator = task.collator(tokenizer)
    padding = _padding_costs(lengths["train"], t.batch_size, seed=t.seed, max_length=d.max_length,
                             multiple=getattr(collator, "pad_to_multiple_of", None))
    padding["used"] = "dynamic_grouped" if t.group_by_length else "dynamic_shuffled"

    report: dict[str, Any] = {
        "config": source,
        "task": cfg.task,
        "model": cfg.model.name,
        "model_path": None if model_path is None else str(model_path),
        "max_length": d.max_length,
        "batch_size": t.batch_size,
        "max_samples": d.max_samples,
        "labels": labels,
        "multi_label": multi_label,
        "splits": splits,
        "majority_class": majority,
        "padding": padding,
        "warnings": warnings,
    }
    report["suggestions"] = _suggestions(report, full_lengths["train"], _position_limit(model_path, tokenizer),
                                         group_by_length=t.group_by_length)
    report["examples"] = _examples(data, tokenizer, labels, examples, d.max_length, full_lengths["train"])
    return _with_learning_rates(report, cfg)


def inspect_config(config_path: Path, console: Console, *, examples: int = 3) -> dict[str, Any]:
    """Print :func:`inspect_data`'s facts about ``config_path`` as rich tables; return the same dict."""
    task, source = _task(config_path, None)
    report = _inspect(task, source, examples=examples)
    render(report, console, task)
    if report.get("mix"):
        sentence, header, rows = describe_mix(report["mix"])
        table = Table(title="data mix", title_justify="left")
        for name in header:
            table.add_column(name, justify="left" if name == "source" else "right")
        for row in rows:
            table.add_row(*map(str, row))
        console.print(table)
        console.print(sentence, highlight=False)
    console.print(Text.assemble(("learning rate: ", "bold"), describe_learning_rates(report["learning_rates"])), highlight=False)
    return report


# ------------------------------------------------------------------------------------------ facts


def _ratio(part: float, whole: float) -> float:
    return float(part) / whole if whole else 0.0


def _split_facts(
    info: dict[str, Any], lengths: Sequence[int], full: Sequence[int], labels: list[str], max_length: int
) -> dict[str, Any]:
    """One split's sizes, dropped rows, label balance, lengths and truncation."""
    n = int(info["examples"])
    counts = {name: int(info["label_counts"].get(name, 0)) for name in labels}
    present = list(counts.values())
    largest, smallest = (max(present), min(present)) if present else (0, 0)
    ratio = None if smallest == 0 else largest / smallest
    truncated = sum(f > max_length for f in full)
    return {
        "examples": n,
        "source": info.get("source"),
        "rows_read": info.get("rows_read"),
        # Rows with empty text/label are dropped while reading a file; a split cut out of
        # train has none of its own (they are counted under train).
        "skipped_empty": info.get("skipped_empty"),
        "duplicates_removed": int(info.get("duplicates_removed", 0)),
        "conflicting_duplicates": int(info.get("conflicting_duplicates", 0)),
        "label_counts": counts,
        # Multi-label: the share of examples carrying each label (may sum past 100).
        "label_percent": {name: 100 * _ratio(c, n) for name, c in counts.items()},
        "imbalance_ratio": ratio,
        "imbalanced": n > 0 and (ratio is None or ratio > IMBALANCE_RATIO),
        "lengths": length_stats(full),
        "truncated": int(truncated),
        "truncated_percent": 100 * _ratio(truncated, n),
        "tokens": int(sum(lengths)),
        "tokens_dropped": int(sum(full) - sum(lengths)),
    }


def _untruncated_lengths(tokenizer: Any, texts: list[str], pairs: list[str] | None) -> list[int]:
    """Token counts before truncation, tokenised the way the task does (special tokens included)."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]]


def _padding_costs(
    lengths: Sequence[int], batch_size: int, *, seed: int, max_length: int, multiple: int | None
) -> dict[str, Any]:
    """Padding of one train epoch: fixed to max_length vs padded per batch, shuffled or length-grouped.

    The per-batch variants replay the training sampler's epoch-0 batches and the collator's
    ``pad_to_multiple_of``, so they are what the training loop will pad.
    """
    real = int(sum(lengths))

    def cost(padded: int) -> dict[str, Any]:
        return {"padded_tokens": padded, "pad_tokens": padded - real, "pad_fraction": 1 - _ratio(real, padded)}

    def width(batch: list[int]) -> int:
        w = max(lengths[i] for i in batch)
        return -(-w // multiple) * multiple if multiple else w

    out: dict[str, Any] = {"batch_size": batch_size, "tokens": real, "fixed": cost(len(lengths) * max_length)}
    for name, grouped in (("dynamic_shuffled", False), ("dynamic_grouped", True)):
        sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=seed, group_by_length=grouped)
        out[name] = cost(sum(len(b) * width(b) for b in sampler.batches()))
    return out


def _position_limit(model_path: Path | None, tokenizer: Any) -> int | None:
    """The most tokens the model takes: its tokenizer's limit or its position embeddings, if known."""
    limits = []
    if tokenizer.model_max_length and tokenizer.model_max_length < 10**6:
        limits.append(int(tokenizer.model_max_length))
    # No model folder (a neural baseline built from the data): the tokenizer's limit is the one.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8")) if model_path else {}
        positions = config.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
    return min(limits) if limits else None


def _suggestions(
    report: dict[str, Any], train_full: Sequence[int], limit: int | None, *, group_by_length: bool
) -> list[str]:
    """Plain sentences about settings worth changing, each naming the key."""
    out: list[str] = []
    max_length = report["max_length"]
    train = report["splits"]["train"]
    stats = train["lengths"]
    for split, facts in report["splits"].items():
        if facts["truncated_percent"] > 100 * TRUNCATION_WARN_FRACTION:
            want = round_up(stats["p99"]) if stats else max_length
            if limit is not None:
                want = min(want, limit)
            if want > max_length:
                out.append(f"{facts['truncated_percent']:.1f}% of {split} examples are truncated at "
                           f"data.max_length {max_length}; --data.max_length {want} keeps 99% of train whole "
                           "(longer batches cost more memory and time)")
            else:
                out.append(f"{facts['truncated_percent']:.1f}% of {split} examples are longer than the "
                           f"{max_length} tokens kept; the model takes at most {limit}, so the ends of long "
                           "inputs are lost (put the important part first)")
            break
    if stats and stats["p99"] < SHORT_P99_FRACTION * max_length:
        want = round_up(stats["p99"])
        widest = min(stats["max"], max_length)
        # With per-batch padding only the widest batch feels max_length; suggest a cut only where it bites.
        if want < 0.8 * widest:
            cut = sum(f > want for f in train_full)
            out.append(f"99% of train examples fit in {stats['p99']} tokens but data.max_length is {max_length}: "
                       f"--data.max_length {want} bounds the widest batch at {want} instead of {widest} tokens "
                       f"(less peak memory), truncating {cut} train example(s)")
    for split, facts in report["splits"].items():
        if facts["imbalanced"]:
            counts = facts["label_counts"]
            big = max(counts, key=lambda k: counts[k])
            small = min(counts, key=lambda k: counts[k])
            ratio = facts["imbalance_ratio"]
            how = "no examples of" if ratio is None else f"{ratio:.1f}x as many as"
            out.append(f"{split} is imbalanced: '{big}' has {counts[big]} examples, {how} '{small}' "
                       f"({counts[small]}); judge by macro F1, not accuracy alone")
    pad = report["padding"]
    if not group_by_length and pad["dynamic_grouped"]["pad_fraction"] < 0.5 * pad["dynamic_shuffled"]["pad_fraction"]:
        out.append(f"--train.group_by_length true would cut padding from "
                   f"{100 * pad['dynamic_shuffled']['pad_fraction']:.0f}% to "
                   f"{100 * pad['dynamic_grouped']['pad_fraction']:.0f}% of train tokens")
    return out


def _examples(
    data: Any, tokenizer: Any, labels: list[str], n: int, max_length: int, full: Sequence[int]
) -> list[dict[str, Any]]:
    """The first ``n`` train examples: text, tokens as the model sees them, label names."""
    ds = data.splits["train"]
    out = []
    for i in range(min(max(n, 0), len(ds))):
        row = ds[i]
        target = row["labels"]
        names = [labels[j] for j, on in enumerate(target) if on] if isinstance(target, list) else [labels[int(target)]]
        ids = [int(x) for x in row["input_ids"]]
        out.append({
            "text": data.extra["texts"]["train"][i],
            "tokens": tokenizer.convert_ids_to_tokens(ids),
            "labels": names,
            "length": len(ids),
            "truncated": full[i] > max_length,
        })
    return out


# ------------------------------------------------------------------------------------------ rendering


def _render_facts(report: dict[str, Any], console: Console) -> None:
    """A task's own facts (``inspect_facts``): the run-wide summary, one row per fact and one column per
    split, then the warnings, suggestions and examples (``inspect_details``)."""
    console.print(f"[bold]data inspect[/bold] {report['config'] or ''}\ntask {report['task']}, model "
                  f"{report['model']}, data.max_length {report['max_length']}", highlight=False)
    for key, value in report.get("summary", {}).items():
        console.print(Text.assemble((f"{key}: ", "bold"), str(value)), highlight=False)
    facts: dict[str, dict[str, Any]] = report["facts"]
    table = Table(title="splits", title_justify="left")
    table.add_column("")
    for split in facts:
        table.add_column(split, justify="right")
    for key in dict.fromkeys(k for f in facts.values() for k in f):
        table.add_row(key.replace("_", " "), *[str(f.get(key, "–")) for f in facts.values()])
    console.print(table)
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning[/yellow] {w}", highlight=False)
    for tip in report.get("suggestions", []):
        console.print(Text.assemble(("suggestion: ", "bold yellow"), tip))
    examples = report.get("examples", [])
    if examples and examples[0].get("legend"):
        console.print(Text(f"legend: {examples[0]['legend']}", style="dim"))
    for ex in examples:
        body = Text.from_markup(ex["markup"]) if "markup" in ex else Text(ex["body"])
        console.print(Panel(body, title=Text(ex["title"]), title_align="left", subtitle=ex.get("subtitle"),
                            subtitle_align="right"))


def render(report: dict[str, Any], console: Console, task: Task) -> None:
    """Print an :func:`inspect_data` report of ``task`` as tables that fit an 80-column terminal (the task
    prints what it reported itself: ``Task.render_inspection``)."""
    if task.render_inspection(report, console):
        return
    if "facts" in report:
        _render_facts(report, console)
        return

    splits = report["splits"]
    console.print(Text.assemble(
        ("data inspect", "bold"), f" {report['config']}\n" if report["config"] else "\n",
        f"task {report['task']}, model {report['model']}, data.max_length {report['max_length']}, "
        f"train.batch_size {report['batch_size']}"
        + (f", data.max_samples {report['max_samples']}" if report["max_samples"] else ""),
    ), highlight=False)

    table = Table(title="splits", title_justify="left")
    table.add_column("split")
    table.add_column("source", overflow="fold")
    for col in ("examples", "skipped", "duplicates"):
        table.add_column(col, justify="right")
    for split, f in splits.items():
        dupes = f"{f['duplicates_removed']}" + (f" ({f['conflicting_duplicates']} conflicting)"
                                                if f["conflicting_duplicates"] else "")
        table.add_row(split, Text(str(f["source"] or "")), f"{f['examples']}",
                      "–" if f["skipped_empty"] is None else str(f["skipped_empty"]), dupes)
    console.print(table)
    console.print("skipped: rows with empty text or label (a split cut from train has its rows counted "
                  "there); duplicates: repeated texts, and evaluation rows whose text is in train",
                  style="dim", highlight=False)

    table = Table(title="label balance" + (" (share of examples with each label)" if report["multi_label"] else ""),
                  title_justify="left")
    table.add_column("label", overflow="fold")
    for split in splits:
        table.add_column(split, justify="right")
    for name in report["labels"]:
        table.add_row(Text(name), *[f"{f['label_counts'][name]} ({f['label_percent'][name]:.1f}%)"
                                    for f in splits.values()])
    table.add_row("largest/smallest", *[_ratio_cell(f) for f in splits.values()], style="dim")
    console.print(table)
    majority = report["majority_class"]
    if majority:
        rates = ", ".join(f"{s} {100 * r:.1f}%" for s, r in majority["rates"].items())
        console.print(Text(f"majority class '{majority['label']}' (the accuracy of always predicting it): {rates}"),
                      highlight=False)

    table = Table(title="tokens per example before truncation (special tokens included)", title_justify="left")
    table.add_column("split")
    for col in ("min", "median", "p90", "p99", "max", "mean", "truncated", "dropped"):
        table.add_column(col, justify="right")
    for split, f in splits.items():
        s = f["lengths"] or {}
        table.add_row(split, *[str(s.get(k, "–")) for k in ("min", "median", "p90", "p99", "max", "mean")],
                      f"{f['truncated']}", f"{f['tokens_dropped']}",
                      style="yellow" if f["truncated_percent"] > 100 * TRUNCATION_WARN_FRACTION else None)
    console.print(table)
    console.print(f"truncated: examples longer than data.max_length {report['max_length']}; "
                  "dropped: tokens those lose", style="dim", highlight=False)

    pad = report["padding"]
    table = Table(title=f"padding of one train epoch (batch size {pad['batch_size']}, {pad['tokens']:,} tokens)",
                  title_justify="left")
    table.add_column("padding")
    for col in ("padded tokens", "of which pad"):
        table.add_column(col, justify="right")
    for key, label in (("fixed", f"fixed to {report['max_length']}"), ("dynamic_shuffled", "per batch"),
                       ("dynamic_grouped", "per batch, length-grouped")):
        used = " (this config)" if pad["used"] == key else ""
        table.add_row(label + used, f"{pad[key]['padded_tokens']:,}", f"{100 * pad[key]['pad_fraction']:.1f}%",
                      style="bold" if used else None)
    console.print(table)

    for note in report["warnings"]:
        console.print(Text(f"note: {note}", style="dim"))
    for tip in report["suggestions"]:
        console.print(Text.assemble(("suggestion: ", "bold yellow"), tip))

    for i, ex in enumerate(report["examples"], 1):
        body = Text()
        body.append(ex["text"])
        body.append("\n\n")
        body.append(" ".join(ex["tokens"]), style="cyan")
        title = Text(f"train example {i}: {', '.join(ex['labels'])}")
        subtitle = f"{ex['length']} tokens" + (" (truncated)" if ex["truncated"] else "")
        console.print(Panel(body, title=title, title_align="left", subtitle=subtitle, subtitle_align="right"))


def _ratio_cell(facts: dict[str, Any]) -> str:
    if not facts["examples"]:
        return "–"
    ratio = facts["imbalance_ratio"]
    text = "a label absent" if ratio is None else f"{ratio:.1f}x"
    return text + (" imbalanced" if facts["imbalanced"] else "")
