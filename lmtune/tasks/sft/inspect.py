"""``lmtune data inspect`` for ``sft``: the conversations as training sees them.

Nothing is rendered, split or tokenised here: the task's own ``conversation_splits`` and ``render`` do it
(the chat template, the loss mask, ``data.too_long``), and the checks are those of
:func:`lmtune.data.chat.check_rendered` and the task's ``preflight``. This module counts and displays
what those produce.

Unlike ``train``, inspect does not stop at the first definite pre-flight problem: each becomes
an error row in ``checks`` and a sentence in ``errors``, so the user sees every problem at once.
Errors in the records themselves (unknown roles, missing columns) still raise a DataError that
names file and line.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lmtune.config import Config, load_config
from lmtune.data.chat import DOUBLE_BOS, NO_EOS, NO_LOSS, RenderedExample, end_of_turn_ids
from lmtune.data.features import IGNORE_INDEX
from lmtune.data.packing import pack_whole
from lmtune.errors import DataError
from lmtune.tasks.chat_tuning import ChatTuningTask, chat_example
from lmtune.tasks.inspection import (
    ERROR,
    OK,
    PAD_IS_EOS_NOTE,
    TRUNCATION_WARN_FRACTION,
    WARNING,
    check_row,
    collect_warnings,
    length_stats,
    model_positions,
    positions_check,
    render_checks,
    render_header,
    round_up,
    split_rank,
    stats_row,
)

# Longer than any conversation: renders an example whole, to measure what max_length cuts.
_UNLIMITED = 2**31 - 1


def inspect_sft(task: ChatTuningTask, source: str | None, *, examples: int = 3) -> dict[str, Any]:
    """Facts about an ``sft`` config's conversations as the model will see them.

    Keys: ``config``, ``task``, ``model``, ``model_path``, ``max_length``, ``batch_size``,
    ``max_samples``, ``train_on``, ``too_long``, ``packing`` (train rows and fill, or None),
    ``chat_template`` ("model" or "default"), ``vocab_grew``, ``end_of_turn_tokens``,
    ``bos_token``, ``pad_token``, ``pad_is_eos``; ``splits`` (per split: ``source``,
    ``chat_format``, ``conversations``, ``duplicates_removed``, ``turns``, ``examples`` kept,
    ``tokens``, ``lengths`` of the whole rendered conversations (min/median/p95/max/mean),
    ``target_tokens`` per kept example (stats and ``total``), ``too_long`` (``examples`` over
    data.max_length, ``excess_max``, ``excess_mean``, ``skipped``, ``truncated``,
    ``tokens_cut``, ``truncate_left_keeps``: how many skipped ones truncate_left would keep));
    ``checks`` (rows of ``check``, ``status`` ok/warning/error, ``count``, ``total``,
    ``detail``), ``errors`` (what would stop ``train``), ``warnings``, ``suggestions`` and
    ``examples`` (the first train examples: ``line``, ``tokens``, ``target_tokens``,
    ``truncated_tokens``, ``text`` as rendered, ``targets``: the loss-carrying text runs,
    ``markup``: rich markup with the loss tokens highlighted).
    """
    cfg = task.config
    d = cfg.data
    model_path = task.model_path()
    # The same task with other data settings: what max_length cuts, and what truncate_left would keep.
    whole = type(task)(load_config(cfg.to_dict(), {"data.max_length": _UNLIMITED, "data.too_long": "skip"}))
    left = type(task)(load_config(cfg.to_dict(), {"data.too_long": "truncate_left"}))
    # Pre-flight warnings become check rows; the report would repeat them.
    with collect_warnings(skip=("pre-flight",)) as warnings:
        tokenizer = task.load_tokenizer(model_path)
        records, info = task.conversation_splits()
        order = sorted(records, key=split_rank)
        rendered = {s: task.render(records[s], tokenizer)[0] for s in order}
        splits = {s: sft_split_facts(cfg, tokenizer, records[s], rendered[s], info, s, whole, left)
                  for s in order}

    eos = end_of_turn_ids(tokenizer)
    train = [ex for ex in rendered["train"] if ex is not None]
    checks, errors = sft_checks(task, tokenizer, train, eos)
    for split, facts in splits.items():
        row, error = fit_check(split, facts, d.max_length, d.too_long)
        checks.append(row)
        errors += [error] if error else []
    positions_row, error = positions_check(cfg, model_path)
    checks += [positions_row] if positions_row else []
    errors += [error] if error else []
    if task.chat_template_source == "model":
        checks.append(check_row("chat template", OK, "the model's own (as inference renders it)"))
    elif task.chat_template_source != "default":
        checks.append(check_row("chat template", OK, f"model.chat_template ({task.chat_template_source}), saved "
                                "with the tuned model" + (": adds <|im_start|>/<|im_end|> (new embeddings)"
                                                          if task.vocab_grew else "")))
    else:
        checks.append(check_row("chat template", WARNING, "the model has none: lmtune's ChatML default"
                             + (" adds <|im_start|>/<|im_end|> (new embeddings)" if task.vocab_grew else "")))

    packing = None
    if task.packing and train:
        rows, _ = pack_whole([(ex.input_ids, ex.labels) for ex in train], d.max_length)
        tokens = sum(len(ex.input_ids) for ex in train)
        packing = {"rows": len(rows), "fill": tokens / (len(rows) * d.max_length)}

    shown: list[dict[str, Any]] = []
    for record, ex in zip(records["train"], rendered["train"], strict=True):
        if len(shown) >= max(examples, 0):
            break
        if ex is not None:
            shown.append(chat_example(tokenizer, record, ex))

    report: dict[str, Any] = {
        "config": source,
        "task": task.info.name,
        "model": cfg.model.name,
        "model_path": str(model_path),
        "max_length": d.max_length,
        "batch_size": cfg.train.batch_size,
        "max_samples": d.max_samples,
        "train_on": d.train_on,
        "too_long": d.too_long,
        "packing": packing,
        "chat_template": task.chat_template_source,
        "vocab_grew": task.vocab_grew,
        "end_of_turn_tokens": tokenizer.convert_ids_to_tokens(sorted(eos)),
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "pad_is_eos": tokenizer.pad_token_id in eos,
        "splits": splits,
        "checks": checks,
        "errors": errors,
        "warnings": warnings,
        "examples": shown,
    }
    report["suggestions"] = sft_suggestions(report, model_positions(cfg, model_path))
    return report


def sft_split_facts(
    cfg: Config, tokenizer: Any, records: list[dict[str, Any]], rendered: list[RenderedExample | None],
    info: dict[str, Any], split: str, whole: ChatTuningTask, left: ChatTuningTask,
) -> dict[str, Any]:
    """One split's conversations, rendered lengths, loss tokens and what data.max_length does to them."""
    d = cfg.data
    kept = [ex for ex in rendered if ex is not None]
    dropped = [r for r, ex in zip(records, rendered, strict=True) if ex is None]
    # Skipped examples are rendered again, whole, to measure them; kept ones know what was cut.
    again = iter(whole.render(dropped, tokenizer)[0])
    full = []
    for ex in rendered:
        if ex is None:
            measured = next(again)
            assert measured is not None  # nothing is too long for _UNLIMITED
            full.append(len(measured.input_ids))
        else:
            full.append(len(ex.input_ids) + ex.truncated_tokens)
    excess = [n - d.max_length for n in full if n > d.max_length]
    targets = [sum(label != IGNORE_INDEX for label in ex.labels) for ex in kept]
    keeps = None
    if d.too_long == "skip":
        keeps = sum(ex is not None for ex in left.render(dropped, tokenizer)[0])
    split_info = info.get(split, {})
    own_format = split_info.get("chat_format")
    return {
        "source": split_info.get("source"),
        "rows_read": split_info.get("rows_read"),
        # A split cut out of train has train's format (and its rows were read there).
        "chat_format": own_format or info["train"].get("chat_format"),
        "chat_format_detected": own_format is not None,
        "conversations": len(records),
        "duplicates_removed": int(split_info.get("duplicates_removed", 0)),
        "turns": sum(len(r["messages"]) for r in records),
        "assistant_turns": sum(m["role"] == "assistant" for r in records for m in r["messages"]),
        "examples": len(kept),
        "tokens": sum(len(ex.input_ids) for ex in kept),
        "lengths": length_stats(full, (95,)),
        "target_tokens": {**(length_stats(targets, ()) or {}), "total": sum(targets)},
        "too_long": {
            "examples": len(excess),
            "excess_max": max(excess, default=0),
            "excess_mean": round(float(np.mean(excess)), 1) if excess else 0.0,
            "skipped": len(dropped),
            "truncated": sum(ex.truncated_tokens > 0 for ex in kept),
            "tokens_cut": sum(ex.truncated_tokens for ex in kept),
            "truncate_left_keeps": keeps,
        },
    }


def sft_checks(
    task: ChatTuningTask, tokenizer: Any, train: list[RenderedExample], eos: set[int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The pre-flight checks of the kept train examples, each counted, none stopping the others."""
    problems = Counter(task.preflight_problems(train, tokenizer))
    raised: DataError | None = None
    try:
        task.preflight(train, tokenizer, task.data_cfg.train)
    except DataError as exc:  # train stops here; inspect shows it beside the other checks
        raised = exc
    n = len(train)
    names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(eos))) or "none"
    pad_is_eos = tokenizer.pad_token_id in eos
    rows = [
        (NO_EOS, f"every target ends with an end-of-turn token ({names})", PAD_IS_EOS_NOTE if pad_is_eos else ""),
        (DOUBLE_BOS, f"no example starts with two BOS tokens ({tokenizer.bos_token or 'no BOS'})", ""),
        (NO_LOSS, "every example has loss tokens", f"data.train_on: {task.data_cfg.train_on}"),
    ]
    checks = []
    errors = [str(raised)] if raised else []
    for problem, name, note in rows:
        count = problems[problem]
        if not count:
            status = OK
        elif raised is not None and problem in str(raised):
            status = ERROR
        # preflight raises on the first definite problem only; the others are shown too.
        elif task.is_definite(problem, count, n):
            status = ERROR
            errors.append(f"pre-flight check failed: {count} of {n} training examples: {problem}")
        else:
            status = WARNING
        detail = "; ".join(x for x in (f"{count} of {n} train examples" if count else "", note) if x)
        checks.append(check_row(name, status, detail, count, n))
    return checks, errors


def fit_check(split: str, facts: dict[str, Any], max_length: int, too_long: str) -> tuple[dict[str, Any], str | None]:
    """Whether a split's conversations fit data.max_length; none fitting stops ``train``."""
    tl = facts["too_long"]
    name = f"{split}: conversations fit data.max_length {max_length}"
    n = facts["conversations"]
    if facts["examples"] == 0:
        return (check_row(name, ERROR, "none fits: raise data.max_length", tl["skipped"], n),
                f"no {split} conversation fits data.max_length {max_length}: raise data.max_length")
    if tl["skipped"]:
        detail = f"{tl['skipped']} skipped"
        if too_long == "skip" and tl["truncate_left_keeps"]:
            detail += f"; data.too_long: truncate_left keeps {tl['truncate_left_keeps']}"
        return check_row(name, WARNING, detail, tl["skipped"], n), None
    detail = f"{tl['truncated']} prompt(s) cut from the left" if tl["truncated"] else ""
    return check_row(name, OK, detail, 0, n), None


def sft_suggestions(report: dict[str, Any], positions: int | None) -> list[str]:
    """Settings worth changing, each naming the key."""
    out = []
    max_length = report["max_length"]
    train = report["splits"]["train"]
    tl = train["too_long"]
    if tl["truncate_left_keeps"]:
        out.append(f"--data.too_long truncate_left would keep {tl['truncate_left_keeps']} of the {tl['skipped']} "
                   "skipped train conversations (their prompts cut from the left)")
    share = tl["examples"] / max(train["conversations"], 1)
    stats = train["lengths"]
    if share > TRUNCATION_WARN_FRACTION and stats:
        want = round_up(stats["p95"])
        if positions is not None:
            want = min(want, positions)
        if want > max_length:
            out.append(f"{100 * share:.1f}% of train conversations are longer than data.max_length {max_length}; "
                       f"--data.max_length {want} fits {'95% of them' if want >= stats['p95'] else 'more'} "
                       "(longer rows cost more memory and time)")
    return out


def render_sft(report: dict[str, Any], console: Console) -> None:
    """Print an sft report (:func:`inspect_sft`) as tables that fit an 80-column terminal."""
    render_header(report, console, f", data.train_on {report['train_on']}, data.too_long {report['too_long']}")
    source = report["chat_template"]
    template = {"model": "the model's own", "default": "lmtune's ChatML default (the model has none)"}.get(
        source, f"model.chat_template ({source})") + (
        ", vocabulary grows (<|im_start|>, <|im_end|> added)" if report["vocab_grew"] else ", vocabulary unchanged")
    eot = ", ".join(report["end_of_turn_tokens"]) or "none"
    console.print(Text(f"chat template: {template}; end of turn: {eot}; pad: {report['pad_token']}"
                       + (" (== eos)" if report["pad_is_eos"] else "")), highlight=False)

    splits = report["splits"]
    table = Table(title="conversations", title_justify="left")
    table.add_column("split")
    table.add_column("source", overflow="fold")
    table.add_column("format")
    for col in ("convs", "dupes", "turns", "kept"):
        table.add_column(col, justify="right")
    for split, f in splits.items():
        fmt = f["chat_format"] + ("" if f["chat_format_detected"] else " (train)")
        table.add_row(split, Text(str(f["source"] or "")), fmt, str(f["conversations"]), str(f["duplicates_removed"]),
                      str(f["turns"]), str(f["examples"]))
    console.print(table)
    console.print("convs: conversations after removing duplicates (dupes); turns: messages; kept: conversations "
                  "that fit data.max_length, as trained on", style="dim", highlight=False)

    table = Table(title="tokens per conversation as rendered (whole, before data.max_length)", title_justify="left")
    table.add_column("split")
    for col in ("min", "median", "p95", "max", "mean", "loss/ex"):
        table.add_column(col, justify="right")
    for split, f in splits.items():
        stats_row(table, split, f["lengths"], str(f["target_tokens"].get("median", "–")))
    console.print(table)
    console.print("loss/ex: median loss-carrying (target) tokens per kept example", style="dim", highlight=False)

    table = Table(title=f"longer than data.max_length {report['max_length']} "
                        f"(data.too_long: {report['too_long']})", title_justify="left")
    table.add_column("split")
    for col in ("too long", "max excess", "mean excess", "skipped", "truncated"):
        table.add_column(col, justify="right")
    for split, f in splits.items():
        tl = f["too_long"]
        table.add_row(split, str(tl["examples"]), str(tl["excess_max"]), str(tl["excess_mean"]), str(tl["skipped"]),
                      str(tl["truncated"]), style="yellow" if tl["skipped"] else None)
    console.print(table)
    if report["packing"]:
        p = report["packing"]
        console.print(f"packing: {splits['train']['examples']} train examples in {p['rows']} rows "
                      f"({100 * p['fill']:.0f}% filled)", highlight=False)

    render_checks(report, console)

    if report["examples"]:
        console.print(Text.assemble(("legend: ", "bold"), ("loss tokens", "black on green"),
                                    " (what the model learns to write), ", ("context", "dim"),
                                    " (read, not trained on)"))
    for i, ex in enumerate(report["examples"], 1):
        subtitle = f"{ex['tokens']} tokens, {ex['target_tokens']} with loss" + (
            f", {ex['truncated_tokens']} cut from the left" if ex["truncated_tokens"] else "")
        console.print(Panel(Text.from_markup(ex["markup"]), title=f"train example {i} (line {ex['line']})",
                            title_align="left", subtitle=subtitle, subtitle_align="right"))
