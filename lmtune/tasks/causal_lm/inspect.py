"""``lmtune data inspect`` for ``causal_lm``: the documents and the rows training reads.

Nothing is split, tokenised or packed here: the task's own ``prepare`` does it (documents, BOS/EOS,
packing, the feature cache); this module reads the prepared rows back and counts and displays what
they hold, so every number is what training gets.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

import numpy as np
import pyarrow.compute as pc
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lmtune.config import Config
from lmtune.data.chat import adds_bos
from lmtune.tasks.decoder import DecoderTask
from lmtune.tasks.inspection import (
    ERROR,
    OK,
    PAD_IS_EOS_NOTE,
    WARNING,
    check_row,
    collect_warnings,
    length_stats,
    positions_check,
    render_checks,
    render_header,
    split_rank,
    stats_row,
)

# How many tokens of each causal_lm document the report shows.
SHOWN_DOCUMENT_TOKENS = 64


def inspect_causal_lm(task: DecoderTask, source: str | None, *, examples: int = 3) -> dict[str, Any]:
    """Facts about a ``causal_lm`` config's documents and the rows training reads.

    Keys: ``config``, ``task``, ``model``, ``model_path``, ``max_length``, ``batch_size``,
    ``max_samples``, ``packing``, ``bos_token`` (None when documents get none), ``eos_token``,
    ``pad_is_eos``; ``splits`` (per split: ``source``, ``rows_read``, ``skipped_empty``,
    ``duplicates_removed``, ``documents``, ``tokens``, ``rows``, ``documents_split_across_rows``,
    ``lengths`` of documents in tokens with BOS/EOS (min/median/p95/max/mean),
    ``longer_than_max_length``, ``fill``: tokens / (rows x max_length), ``missing_eos``,
    ``missing_bos``); ``checks``, ``errors``, ``warnings``, ``suggestions`` and ``examples``
    (the first train documents' beginnings read from the prepared rows: ``document``, ``row``,
    ``position`` in it, ``tokens``, ``shown_tokens``, ``rows_spanned``, ``text`` decoded with
    the special tokens, ``markup``).
    """
    cfg = task.config
    d = cfg.data
    with collect_warnings() as warnings:
        model_path = task.model_path()
        tokenizer = task.load_tokenizer(model_path)
        data = task.prepare(tokenizer)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    eos = tokenizer.eos_token_id
    splits: dict[str, Any] = {}
    layouts: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
    for split in sorted(data.splits, key=split_rank):
        facts = data.info[split]
        docs = data.extra["documents"][split]
        # Documents as the task builds them: BOS (if the tokenizer uses one) + text + EOS.
        lengths = np.asarray([len(ids) + (bos is not None) + 1 for ids in
                              tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]], dtype=np.int64)
        stream = token_stream(data.splits[split])
        ends = np.cumsum(lengths)
        starts = ends - lengths
        in_order = bool(len(lengths)) and int(ends[-1]) == len(stream)
        layouts[split] = (stream, starts, in_order)
        rows = int(facts["rows"])
        splits[split] = {
            "source": facts.get("source"),
            "rows_read": facts.get("rows_read"),
            "skipped_empty": facts.get("skipped_empty"),
            "duplicates_removed": int(facts.get("duplicates_removed", 0)),
            "documents": int(facts["documents"]),
            "tokens": int(facts["tokens"]),
            "rows": rows,
            "documents_split_across_rows": int(facts["documents_split_across_rows"]),
            "lengths": length_stats(lengths.tolist(), (95,)),
            "longer_than_max_length": int((lengths > d.max_length).sum()),
            "fill": int(facts["tokens"]) / max(rows * d.max_length, 1),
            "missing_eos": int((stream[ends - 1] != eos).sum()) if in_order else None,
            "missing_bos": int((stream[starts] != bos).sum()) if in_order and bos is not None else 0,
        }

    checks, errors = causal_checks(cfg, tokenizer, splits, bos, layouts, packing=task.packing)
    row, error = positions_check(cfg, model_path)
    checks += [row] if row else []
    errors += [error] if error else []

    shown: list[dict[str, Any]] = []
    stream, starts, in_order = layouts["train"]
    if in_order:
        row_ends = np.cumsum(np.asarray(data.lengths["train"], dtype=np.int64))
        doc_lengths = np.diff(np.append(starts, len(stream)))
        for i in range(min(max(examples, 0), len(starts))):
            shown.append(document_example(tokenizer, stream, int(starts[i]), int(doc_lengths[i]), i, row_ends))

    report: dict[str, Any] = {
        "config": source,
        "task": task.info.name,
        "model": cfg.model.name if cfg.model.init == "pretrained" else f"{cfg.model.architecture} from scratch",
        "model_path": None if model_path is None else str(model_path),
        "max_length": d.max_length,
        "batch_size": cfg.train.batch_size,
        "max_samples": d.max_samples,
        "packing": task.packing,
        "bos_token": None if bos is None else tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_is_eos": tokenizer.pad_token_id == eos,
        "splits": splits,
        "checks": checks,
        "errors": errors,
        "warnings": warnings,
        "examples": shown,
    }
    report["suggestions"] = causal_suggestions(report)
    return report


def token_stream(dataset: Any) -> np.ndarray:
    """Every row's ``input_ids`` in row order, as one array (read through Arrow, not Python lists)."""
    ds = getattr(dataset, "ds", dataset)  # a FeatureDataset wraps the datasets.Dataset
    column = ds.with_format("arrow")["input_ids"]
    return np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False), dtype=np.int64)


def causal_checks(
    cfg: Config, tokenizer: Any, splits: dict[str, Any], bos: int | None,
    layouts: dict[str, tuple[np.ndarray, np.ndarray, bool]], *, packing: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Document boundaries as training sees them: EOS after each, BOS before each, cuts."""
    checks = []
    errors = []
    broken = [s for s, (_, _, in_order) in layouts.items() if not in_order]
    if broken:
        checks.append(check_row("rows hold the documents in order", ERROR, f"not in {', '.join(broken)}"))
        errors.append(f"the prepared rows of {', '.join(broken)} do not hold the documents' tokens in order "
                      "(a stale feature cache? run with --data.cache false)")
    docs = sum(f["documents"] for s, f in splits.items() if s not in broken)
    missing = sum(f["missing_eos"] or 0 for f in splits.values())
    note = PAD_IS_EOS_NOTE if tokenizer.pad_token_id == tokenizer.eos_token_id else ""
    checks.append(check_row(f"every document ends with EOS ({tokenizer.eos_token})", ERROR if missing else OK,
                         "; ".join(x for x in (f"{missing} without" if missing else "", note) if x), missing, docs))
    if missing:
        errors.append(f"{missing} of {docs} documents do not end with EOS: the model would not learn where text ends")
    if bos is None:
        checks.append(check_row("documents start with BOS", OK, "the tokenizer adds no BOS to plain text; none added"))
    else:
        no_bos = sum(f["missing_bos"] for f in splits.values())
        checks.append(check_row(f"every document starts with BOS ({tokenizer.bos_token})", ERROR if no_bos else OK,
                             f"{no_bos} without" if no_bos else "", no_bos, docs))
    train = splits["train"]
    cut = train["documents_split_across_rows"]
    if packing:
        checks.append(check_row("train documents cut across rows", OK,
                             f"{cut} continue in the next row (no attention across documents; the rest of a "
                             "cut document loses its start)" if cut else "", cut, train["documents"]))
    else:
        long = train["longer_than_max_length"]
        checks.append(check_row(f"train documents fit data.max_length {cfg.data.max_length}", WARNING if long else OK,
                             f"{long} cut into several rows, each piece without the context before it"
                             if long else "", long, train["documents"]))
    return checks, errors


def document_example(tokenizer: Any, stream: np.ndarray, start: int, length: int, index: int,
                      row_ends: np.ndarray) -> dict[str, Any]:
    """The beginning of one document as it lies in the rows, special tokens shown."""
    window = [int(t) for t in stream[start : start + min(length, SHOWN_DOCUMENT_TOKENS)]]
    first_row = int(np.searchsorted(row_ends, start, side="right"))
    last_row = int(np.searchsorted(row_ends, start + length - 1, side="right"))
    special = set(tokenizer.all_special_ids)
    shown = Text()
    for is_special, run in groupby(window, key=lambda t: t in special):
        piece = str(tokenizer.decode(list(run), skip_special_tokens=False, clean_up_tokenization_spaces=False))
        shown.append(piece, style="bold magenta" if is_special else None)
    return {
        "document": index,
        "row": first_row,
        "position": start - (int(row_ends[first_row - 1]) if first_row else 0),
        "tokens": length,
        "shown_tokens": len(window),
        "rows_spanned": last_row - first_row + 1,
        "text": shown.plain,
        "markup": shown.markup,
    }


def causal_suggestions(report: dict[str, Any]) -> list[str]:
    """Settings worth changing, each naming the key."""
    out = []
    train = report["splits"]["train"]
    if not report["packing"] and train["rows"]:
        per_row = train["tokens"] / train["rows"]
        if per_row < 0.5 * report["max_length"]:
            out.append(f"unpacked rows hold {per_row:.0f} tokens on average of data.max_length "
                       f"{report['max_length']}: --data.packing true fills them (fewer, fuller rows)")
    return out


def render_causal(report: dict[str, Any], console: Console) -> None:
    """Print a causal_lm report (:func:`inspect_causal_lm`) as tables that fit an 80-column terminal."""
    render_header(report, console)
    console.print(Text(f"each document: {report['bos_token'] + ' + ' if report['bos_token'] else ''}text + "
                       f"{report['eos_token']}" + ("; pad == eos" if report["pad_is_eos"] else "")), highlight=False)
    splits = report["splits"]
    table = Table(title="documents and rows", title_justify="left")
    table.add_column("split")
    table.add_column("source", overflow="fold")
    for col in ("documents", "dupes", "tokens", "rows", "cut", "fill"):
        table.add_column(col, justify="right")
    for split, f in splits.items():
        table.add_row(split, Text(str(f["source"] or "")), str(f["documents"]), str(f["duplicates_removed"]),
                      f"{f['tokens']:,}", str(f["rows"]), str(f["documents_split_across_rows"]),
                      f"{100 * f['fill']:.0f}%")
    console.print(table)
    console.print(f"dupes: repeated documents removed; cut: documents continued across a row boundary; "
                  f"fill: tokens / (rows x data.max_length "
                  f"{report['max_length']})", style="dim", highlight=False)

    table = Table(title="tokens per document (BOS/EOS included)", title_justify="left")
    table.add_column("split")
    for col in ("min", "median", "p95", "max", "mean", f"> {report['max_length']}"):
        table.add_column(col, justify="right")
    for split, f in splits.items():
        stats_row(table, split, f["lengths"], str(f["longer_than_max_length"]))
    console.print(table)

    render_checks(report, console)
    for ex in report["examples"]:
        title = f"train document {ex['document'] + 1}: row {ex['row']}, position {ex['position']}"
        subtitle = f"first {ex['shown_tokens']} of {ex['tokens']} tokens" + (
            f", spans {ex['rows_spanned']} rows" if ex["rows_spanned"] > 1 else "")
        console.print(Panel(Text.from_markup(ex["markup"]), title=title, title_align="left", subtitle=subtitle,
                            subtitle_align="right"))
