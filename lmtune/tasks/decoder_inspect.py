"""``lmtune data inspect`` for the decoder tasks (``sft``, ``causal_lm``): the data as training sees it.

Nothing is rendered, split, tokenised or packed here: ``sft`` goes through ``SFTTask._splits``
and ``SFTTask.render`` (the chat template, the loss mask, ``data.too_long``) and the checks of
:func:`lmtune.data.chat.check_rendered` and ``SFTTask.preflight``; ``causal_lm`` through
``CausalLMTask.prepare`` (documents, BOS/EOS, packing, the feature cache). This module counts
and displays what those produce.

Unlike ``train``, inspect does not stop at the first definite pre-flight problem: each becomes
an error row in ``checks`` and a sentence in ``errors``, so the user sees every problem at once.
Errors in the records themselves (unknown roles, missing columns) still raise a DataError that
names file and line.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmtune.config import Config, load_config
from lmtune.errors import DataError
from lmtune.workflows.inspect import (
    TRUNCATION_WARN_FRACTION,
    collect_warnings,
    length_stats,
    round_up,
    split_rank,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from lmtune.data.chat import RenderedExample
    from lmtune.tasks.sft.task import SFTTask

OK, WARNING, ERROR = "ok", "warning", "error"
# How many tokens of each causal_lm document the report shows.
SHOWN_DOCUMENT_TOKENS = 64
# Longer than any conversation: renders an example whole, to measure what max_length cuts.
_UNLIMITED = 2**31 - 1
PAD_IS_EOS_NOTE = "pad == eos: lmtune masks padding by position, EOS stays a target"


def inspect_generative(cfg: Config, source: str | None, *, examples: int = 3) -> dict[str, Any]:
    """The report of :func:`inspect_sft` or :func:`inspect_causal_lm`, by ``cfg.task``."""
    if cfg.data.streaming:
        from lmtune.errors import ConfigError

        raise ConfigError("data inspect reads the whole training data, which data.streaming never loads",
                          hint="inspect one shard: a copy of the config with data.streaming: false and "
                          "data.train: one shard file")
    if cfg.task == "sft":
        return inspect_sft(cfg, source, examples=examples)
    if cfg.task == "causal_lm":
        return inspect_causal_lm(cfg, source, examples=examples)
    raise ValueError(f"not a decoder task: {cfg.task!r}")


def _check(name: str, status: str, detail: str = "", count: int | None = None,
           total: int | None = None) -> dict[str, Any]:
    """One row of the checks table: ``status`` is ok, warning or error (error: ``train`` would stop)."""
    return {"check": name, "status": status, "count": count, "total": total, "detail": detail}


def _model_positions(cfg: Config, model_path: Path | None) -> int | None:
    """The positions the model has (what ``build_model`` checks data.max_length against), if known."""
    if cfg.model.init == "scratch":
        return int(cfg.model.context_length)
    if model_path is None:
        return None
    try:
        config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    return int(positions) if isinstance(positions, int) and positions > 0 else None


def _positions_check(cfg: Config, model_path: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """The row (and error sentence) for data.max_length against the model's positions."""
    positions = _model_positions(cfg, model_path)
    if positions is None:
        return None, None
    max_length = cfg.data.max_length
    name = f"data.max_length {max_length} fits the model's positions"
    if max_length > positions:
        error = (f"data.max_length {max_length} is larger than the model's {positions} positions: "
                 f"set --data.max_length {positions} or less")
        return _check(name, ERROR, f"the model has {positions}"), error
    return _check(name, OK, f"the model has {positions}"), None


# ------------------------------------------------------------------------------------------ sft


def inspect_sft(cfg: Config, source: str | None, *, examples: int = 3) -> dict[str, Any]:
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
    from lmtune.data.chat import end_of_turn_ids
    from lmtune.models.registry import resolve_model
    from lmtune.tasks.sft.task import SFTTask

    d = cfg.data
    task = SFTTask(cfg)
    model_path = resolve_model(cfg.model.name, allow_pickle=cfg.model.allow_pickle)
    # The same task with other data settings: what max_length cuts, and what truncate_left would keep.
    whole = SFTTask(load_config(cfg.to_dict(), {"data.max_length": _UNLIMITED, "data.too_long": "skip"}))
    left = SFTTask(load_config(cfg.to_dict(), {"data.too_long": "truncate_left"}))
    # Pre-flight warnings become check rows; the report would repeat them.
    with collect_warnings(skip=("pre-flight",)) as warnings:
        tokenizer = task.load_tokenizer(model_path)
        records, info = task._splits()
        order = sorted(records, key=split_rank)
        rendered = {s: task.render(records[s], tokenizer)[0] for s in order}
        splits = {s: _sft_split_facts(cfg, tokenizer, records[s], rendered[s], info, s, whole, left)
                  for s in order}

    eos = end_of_turn_ids(tokenizer)
    train = [ex for ex in rendered["train"] if ex is not None]
    checks, errors = _sft_checks(task, tokenizer, train, eos)
    for split, facts in splits.items():
        row, error = _fit_check(split, facts, d.max_length, d.too_long)
        checks.append(row)
        errors += [error] if error else []
    positions_row, error = _positions_check(cfg, model_path)
    checks += [positions_row] if positions_row else []
    errors += [error] if error else []
    if task.chat_template_source == "model":
        checks.append(_check("chat template", OK, "the model's own (as inference renders it)"))
    else:
        checks.append(_check("chat template", WARNING, "the model has none: lmtune's ChatML default"
                             + (" adds <|im_start|>/<|im_end|> (new embeddings)" if task.vocab_grew else "")))

    packing = None
    if task.packing and train:
        from lmtune.data.packing import pack_whole

        rows, _ = pack_whole([(ex.input_ids, ex.labels) for ex in train], d.max_length)
        tokens = sum(len(ex.input_ids) for ex in train)
        packing = {"rows": len(rows), "fill": tokens / (len(rows) * d.max_length)}

    shown: list[dict[str, Any]] = []
    for record, ex in zip(records["train"], rendered["train"], strict=True):
        if len(shown) >= max(examples, 0):
            break
        if ex is not None:
            shown.append(_sft_example(tokenizer, record, ex))

    report: dict[str, Any] = {
        "config": source,
        "task": "sft",
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
    report["suggestions"] = _sft_suggestions(report, _model_positions(cfg, model_path))
    return report


def _sft_split_facts(
    cfg: Config, tokenizer: Any, records: list[dict[str, Any]], rendered: list[RenderedExample | None],
    info: dict[str, Any], split: str, whole: SFTTask, left: SFTTask,
) -> dict[str, Any]:
    """One split's conversations, rendered lengths, loss tokens and what data.max_length does to them."""
    from lmtune.data.chat import IGNORE_INDEX

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


def _sft_checks(
    task: SFTTask, tokenizer: Any, train: list[RenderedExample], eos: set[int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The pre-flight checks of the kept train examples, each counted, none stopping the others."""
    from lmtune.data.chat import DOUBLE_BOS, NO_EOS, NO_LOSS

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
        checks.append(_check(name, status, detail, count, n))
    return checks, errors


def _fit_check(split: str, facts: dict[str, Any], max_length: int, too_long: str) -> tuple[dict[str, Any], str | None]:
    """Whether a split's conversations fit data.max_length; none fitting stops ``train``."""
    tl = facts["too_long"]
    name = f"{split}: conversations fit data.max_length {max_length}"
    n = facts["conversations"]
    if facts["examples"] == 0:
        return (_check(name, ERROR, "none fits: raise data.max_length", tl["skipped"], n),
                f"no {split} conversation fits data.max_length {max_length}: raise data.max_length")
    if tl["skipped"]:
        detail = f"{tl['skipped']} skipped"
        if too_long == "skip" and tl["truncate_left_keeps"]:
            detail += f"; data.too_long: truncate_left keeps {tl['truncate_left_keeps']}"
        return _check(name, WARNING, detail, tl["skipped"], n), None
    detail = f"{tl['truncated']} prompt(s) cut from the left" if tl["truncated"] else ""
    return _check(name, OK, detail, 0, n), None


def _sft_example(tokenizer: Any, record: dict[str, Any], ex: RenderedExample) -> dict[str, Any]:
    """One kept example as the model sees it, with its loss-carrying text runs."""
    from lmtune.data.chat import IGNORE_INDEX, format_conversation_for_display

    targets = []
    position = 0
    for loss, run in groupby(ex.labels, key=lambda label: label != IGNORE_INDEX):
        length = len(list(run))
        if loss:
            ids = ex.input_ids[position : position + length]
            targets.append(str(tokenizer.decode(ids, clean_up_tokenization_spaces=False)))
        position += length
    return {
        "line": record["line"],
        "tokens": len(ex.input_ids),
        "target_tokens": sum(label != IGNORE_INDEX for label in ex.labels),
        "truncated_tokens": ex.truncated_tokens,
        "text": ex.text,
        "targets": targets,
        "markup": format_conversation_for_display(tokenizer, ex).markup,
    }


def _sft_suggestions(report: dict[str, Any], positions: int | None) -> list[str]:
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


# ------------------------------------------------------------------------------------------ causal_lm


def inspect_causal_lm(cfg: Config, source: str | None, *, examples: int = 3) -> dict[str, Any]:
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
    from lmtune.tasks.causal_lm.task import CausalLMTask
    from lmtune.tasks.decoder import adds_bos

    d = cfg.data
    task = CausalLMTask(cfg)
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
        stream = _token_stream(data.splits[split])
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

    checks, errors = _causal_checks(cfg, tokenizer, splits, bos, layouts, packing=task.packing)
    row, error = _positions_check(cfg, model_path)
    checks += [row] if row else []
    errors += [error] if error else []

    shown: list[dict[str, Any]] = []
    stream, starts, in_order = layouts["train"]
    if in_order:
        row_ends = np.cumsum(np.asarray(data.lengths["train"], dtype=np.int64))
        doc_lengths = np.diff(np.append(starts, len(stream)))
        for i in range(min(max(examples, 0), len(starts))):
            shown.append(_document_example(tokenizer, stream, int(starts[i]), int(doc_lengths[i]), i, row_ends))

    report: dict[str, Any] = {
        "config": source,
        "task": "causal_lm",
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
    report["suggestions"] = _causal_suggestions(report)
    return report


def _token_stream(dataset: Any) -> np.ndarray:
    """Every row's ``input_ids`` in row order, as one array (read through Arrow, not Python lists)."""
    import pyarrow.compute as pc

    ds = getattr(dataset, "ds", dataset)  # a FeatureDataset wraps the datasets.Dataset
    column = ds.with_format("arrow")["input_ids"]
    return np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False), dtype=np.int64)


def _causal_checks(
    cfg: Config, tokenizer: Any, splits: dict[str, Any], bos: int | None,
    layouts: dict[str, tuple[np.ndarray, np.ndarray, bool]], *, packing: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Document boundaries as training sees them: EOS after each, BOS before each, cuts."""
    checks = []
    errors = []
    broken = [s for s, (_, _, in_order) in layouts.items() if not in_order]
    if broken:
        checks.append(_check("rows hold the documents in order", ERROR, f"not in {', '.join(broken)}"))
        errors.append(f"the prepared rows of {', '.join(broken)} do not hold the documents' tokens in order "
                      "(a stale feature cache? run with --data.cache false)")
    docs = sum(f["documents"] for s, f in splits.items() if s not in broken)
    missing = sum(f["missing_eos"] or 0 for f in splits.values())
    note = PAD_IS_EOS_NOTE if tokenizer.pad_token_id == tokenizer.eos_token_id else ""
    checks.append(_check(f"every document ends with EOS ({tokenizer.eos_token})", ERROR if missing else OK,
                         "; ".join(x for x in (f"{missing} without" if missing else "", note) if x), missing, docs))
    if missing:
        errors.append(f"{missing} of {docs} documents do not end with EOS: the model would not learn where text ends")
    if bos is None:
        checks.append(_check("documents start with BOS", OK, "the tokenizer adds no BOS to plain text; none added"))
    else:
        no_bos = sum(f["missing_bos"] for f in splits.values())
        checks.append(_check(f"every document starts with BOS ({tokenizer.bos_token})", ERROR if no_bos else OK,
                             f"{no_bos} without" if no_bos else "", no_bos, docs))
    train = splits["train"]
    cut = train["documents_split_across_rows"]
    if packing:
        checks.append(_check("train documents cut across rows", OK,
                             f"{cut} continue in the next row (no attention across documents; the rest of a "
                             "cut document loses its start)" if cut else "", cut, train["documents"]))
    else:
        long = train["longer_than_max_length"]
        checks.append(_check(f"train documents fit data.max_length {cfg.data.max_length}", WARNING if long else OK,
                             f"{long} cut into several rows, each piece without the context before it"
                             if long else "", long, train["documents"]))
    return checks, errors


def _document_example(tokenizer: Any, stream: np.ndarray, start: int, length: int, index: int,
                      row_ends: np.ndarray) -> dict[str, Any]:
    """The beginning of one document as it lies in the rows, special tokens shown."""
    from rich.text import Text

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


def _causal_suggestions(report: dict[str, Any]) -> list[str]:
    """Settings worth changing, each naming the key."""
    out = []
    train = report["splits"]["train"]
    if not report["packing"] and train["rows"]:
        per_row = train["tokens"] / train["rows"]
        if per_row < 0.5 * report["max_length"]:
            out.append(f"unpacked rows hold {per_row:.0f} tokens on average of data.max_length "
                       f"{report['max_length']}: --data.packing true fills them (fewer, fuller rows)")
    return out


# ------------------------------------------------------------------------------------------ rendering

_STATUS_STYLE = {OK: "green", WARNING: "yellow", ERROR: "bold red"}


def render_generative(report: dict[str, Any], console: Console) -> None:
    """Print an sft or causal_lm report as tables that fit an 80-column terminal."""
    from rich.text import Text

    header = (f"task {report['task']}, model {report['model']}, data.max_length {report['max_length']}, "
              f"train.batch_size {report['batch_size']}")
    if report["task"] == "sft":
        header += f", data.train_on {report['train_on']}, data.too_long {report['too_long']}"
    header += f", packing {'on' if report['packing'] else 'off'}"
    if report["max_samples"]:
        header += f", data.max_samples {report['max_samples']}"
    console.print(Text.assemble(("data inspect", "bold"), f" {report['config']}\n" if report["config"] else "\n",
                                header), highlight=False)
    if report["task"] == "sft":
        _render_sft(report, console)
    else:
        _render_causal(report, console)


def _render_checks(report: dict[str, Any], console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="pre-flight checks (an `error` row would stop `lmtune train`)", title_justify="left")
    table.add_column("check", overflow="fold", ratio=3)
    table.add_column("status")
    table.add_column("count", justify="right")
    table.add_column("detail", overflow="fold", ratio=3)
    for c in report["checks"]:
        count = "" if c["count"] is None else (f"{c['count']}/{c['total']}" if c["total"] is not None else str(c["count"]))
        table.add_row(Text(c["check"]), Text(c["status"], style=_STATUS_STYLE[c["status"]]), count, Text(c["detail"]))
    console.print(table)
    for error in report["errors"]:
        console.print(Text.assemble(("error: ", "bold red"), error))
    for note in report["warnings"]:
        console.print(Text(f"note: {note}", style="dim"))
    for tip in report["suggestions"]:
        console.print(Text.assemble(("suggestion: ", "bold yellow"), tip))


def _stats_row(table: Table, split: str, stats: dict[str, Any] | None, *extra: str) -> None:
    s = stats or {}
    table.add_row(split, *[str(s.get(k, "–")) for k in ("min", "median", "p95", "max", "mean")], *extra)


def _render_sft(report: dict[str, Any], console: Console) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    template = ("the model's own" if report["chat_template"] == "model" else "lmtune's ChatML default (the model has "
                "none)") + (", vocabulary grows (<|im_start|>, <|im_end|> added)" if report["vocab_grew"]
                            else ", vocabulary unchanged")
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
        _stats_row(table, split, f["lengths"], str(f["target_tokens"].get("median", "–")))
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

    _render_checks(report, console)

    if report["examples"]:
        console.print(Text.assemble(("legend: ", "bold"), ("loss tokens", "black on green"),
                                    " (what the model learns to write), ", ("context", "dim"),
                                    " (read, not trained on)"))
    for i, ex in enumerate(report["examples"], 1):
        subtitle = f"{ex['tokens']} tokens, {ex['target_tokens']} with loss" + (
            f", {ex['truncated_tokens']} cut from the left" if ex["truncated_tokens"] else "")
        console.print(Panel(Text.from_markup(ex["markup"]), title=f"train example {i} (line {ex['line']})",
                            title_align="left", subtitle=subtitle, subtitle_align="right"))


def _render_causal(report: dict[str, Any], console: Console) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

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
        _stats_row(table, split, f["lengths"], str(f["longer_than_max_length"]))
    console.print(table)

    _render_checks(report, console)
    for ex in report["examples"]:
        title = f"train document {ex['document'] + 1}: row {ex['row']}, position {ex['position']}"
        subtitle = f"first {ex['shown_tokens']} of {ex['tokens']} tokens" + (
            f", spans {ex['rows_spanned']} rows" if ex["rows_spanned"] > 1 else "")
        console.print(Panel(Text.from_markup(ex["markup"]), title=title, title_align="left", subtitle=subtitle,
                            subtitle_align="right"))
