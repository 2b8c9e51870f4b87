"""``lmtune data inspect`` for preference data: pairs (dpo, orpo, simpo, reward) and unpaired examples (kto),
as training sees them.

Nothing is read, split or rendered here but through :mod:`lmtune.data.preference` (the reader, the splits,
:func:`~lmtune.data.preference.render_pair` with the chat template and ``data.too_long``), and the checks are
:func:`~lmtune.data.preference.pair_problems` / :func:`~lmtune.data.chat.check_rendered`; this module counts and
displays what those produce, as ``sft``'s inspection (``tasks/sft/inspect.py``) does for conversations.

Per split: records read and kept, those skipped (identical answers, an empty answer, too long) with their lines,
token lengths of prompt and answers (whole, before ``data.max_length``), what truncation does (prompts cut
from the left, or pairs skipped because an answer alone is too long) and answers that do not end with an
end-of-turn token. Then the first pairs as the model sees them: the shared prompt once, up to the token where
the two sides diverge, then each answer, loss tokens highlighted.

Inspect does not stop at the first definite pre-flight problem: each becomes an error row in ``checks`` and a
sentence in ``errors``. Errors in the records themselves (a missing column, an unknown role) still raise a
DataError that names file and line. The report is JSON-serialisable (``lmtune data inspect --json``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lmtune.config import Config
from lmtune.data.chat import (
    DOUBLE_BOS,
    NO_EOS,
    NO_LOSS,
    RenderedExample,
    check_rendered,
    end_of_turn_ids,
    format_conversation_for_display,
)
from lmtune.data.features import IGNORE_INDEX
from lmtune.data.preference import (
    PROMPT_DIFFERS,
    SAME_TOKENS,
    KTOExample,
    PreferencePair,
    RenderedPair,
    pair_problems,
    preference_splits,
    read_kto_examples,
    read_preference_pairs,
    render_completion,
    render_kto_examples,
    render_pair,
    render_pairs,
)
from lmtune.data.table import format_locations
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
)

# Longer than any record: renders it whole, to measure what max_length cuts.
_UNLIMITED = 2**31 - 1
# Log messages the report shows in its own columns (skipped records, pre-flight problems).
_SHOWN_ELSEWHERE = ("pre-flight", "skipped because")
# Lines listed per split for records skipped as too long.
_LINES_SHOWN = 1000


# ------------------------------------------------------------------------------------------ pairs
def inspect_pairs(config: Config, tokenizer: Any, source: str | None, *, examples: int = 3) -> dict[str, Any]:
    """Facts about a pair task's data (dpo, orpo, simpo, reward) as the model will see it.

    ``tokenizer``: the task's (with its chat template). Keys: ``config``, ``task``, ``model``, ``model_path``,
    ``max_length``, ``batch_size``, ``max_samples``, ``too_long``, ``packing`` (None), ``end_of_turn_tokens``,
    ``bos_token``, ``pad_token``, ``pad_is_eos``; ``splits`` (per split: ``source``, ``rows_read``, ``format``,
    ``format_detected``, ``skipped_on_read`` (``identical`` / ``empty_answer``: ``count`` and ``lines``; None for
    a split held out of train, whose records were read there), ``duplicates_removed``, ``pairs``, ``kept``,
    ``tokens`` (kept, both sides), ``lengths`` (whole, before max_length: ``prompt``, ``chosen``, ``rejected``
    answer tokens and ``longer_side``, the longer side's whole length), ``too_long`` (``over_max_length``: pairs
    longer than max_length, ``skipped``, ``skipped_lines``, ``answer_too_long``: pairs whose longer answer alone does not fit,
    ``truncated``: prompts cut from the left, ``tokens_cut``, ``truncate_left_keeps``: how many skipped pairs
    ``truncate_left`` would keep), ``no_eos``: kept pairs with an answer not ending in an end-of-turn token);
    ``checks``, ``errors``, ``warnings``, ``suggestions`` and ``examples`` (the first train pairs: ``line``,
    ``tokens`` and ``loss_tokens`` per side, ``prompt_tokens``, ``divergence``, ``truncated_tokens``, and the
    ``shared`` part and the ``chosen``/``rejected`` tails from the divergence, each as ``text`` and ``markup``).
    """
    d = config.data
    with collect_warnings(skip=_SHOWN_ELSEWHERE) as warnings:
        splits, info = preference_splits(d, lambda path: read_preference_pairs(path, d))
        order = sorted(splits, key=split_rank)
        rendered = {split: render_pairs(tokenizer, splits[split], d) for split in order}
        facts = {split: _pair_split_facts(config, tokenizer, splits[split], rendered[split], info, split)
                 for split in order}
    eos = end_of_turn_ids(tokenizer)
    train = [pair for pair in rendered["train"] if pair is not None]
    problems = Counter(problem for pair in train for problem in set(pair_problems(tokenizer, pair, eos)))
    checks, errors = _problem_checks(tokenizer, problems, len(train), "pairs", eos, (
        (NO_EOS, "both answers of every pair end with an end-of-turn token ({eos})"),
        (DOUBLE_BOS, "no pair starts with two BOS tokens ({bos})"),
        (NO_LOSS, "both answers of every pair carry loss"),
        (SAME_TOKENS, "chosen and rejected differ as tokens, not only as text"),
        (PROMPT_DIFFERS, "chosen and rejected keep the same prompt tokens"),
    ))
    model_path = _model_path(tokenizer)
    _fit_and_positions(config, model_path, facts, "pairs", checks, errors)
    shown = [
        _pair_example(tokenizer, pair, rendered_pair)
        for pair, rendered_pair in zip(splits["train"], rendered["train"], strict=True)
        if rendered_pair is not None
    ][: max(examples, 0)]
    report = _header(config, tokenizer, source, model_path, eos)
    report.update({"splits": facts, "checks": checks, "errors": errors, "warnings": warnings, "examples": shown})
    report["suggestions"] = _suggestions(report, "pairs", model_positions(config, model_path))
    return report


def _pair_split_facts(
    cfg: Config, tokenizer: Any, pairs: list[PreferencePair], rendered: list[RenderedPair | None],
    info: dict[str, Any], split: str,
) -> dict[str, Any]:
    """One split's pairs: read, kept, skipped, token lengths, and what data.max_length does to them."""
    d = cfg.data
    eos = end_of_turn_ids(tokenizer)
    kept = [pair for pair in rendered if pair is not None]
    whole = [render_pair(tokenizer, pair, max_length=_UNLIMITED, too_long="skip",
                         special_tokens_in_content=d.special_tokens_in_content) for pair in pairs]
    measured = [pair for pair in whole if pair is not None]  # nothing is too long for _UNLIMITED
    sides = [(pair.chosen, pair.rejected) for pair in measured]
    longer = [max(len(c.input_ids), len(r.input_ids)) for c, r in sides]
    answers = [max(_answer_tokens(c), _answer_tokens(r)) for c, r in sides]
    skipped = [pair.line for pair, out in zip(pairs, rendered, strict=True) if out is None]
    keeps = None
    if d.too_long == "skip":
        dropped = [pair for pair, out in zip(pairs, rendered, strict=True) if out is None]
        keeps = sum(render_pair(tokenizer, pair, max_length=d.max_length, too_long="truncate_left",
                                special_tokens_in_content=d.special_tokens_in_content) is not None
                    for pair in dropped)
    facts = _read_facts(info, split)
    facts.update({
        "pairs": len(pairs),
        "kept": len(kept),
        "tokens": sum(len(pair.chosen.input_ids) + len(pair.rejected.input_ids) for pair in kept),
        "lengths": {
            "prompt": length_stats([c.prompt_tokens for c, _ in sides], (95,)),
            "chosen": length_stats([_answer_tokens(c) for c, _ in sides], (95,)),
            "rejected": length_stats([_answer_tokens(r) for _, r in sides], (95,)),
            "longer_side": length_stats(longer, (95,)),
        },
        "too_long": _too_long_facts(d.max_length, longer, answers, _keeps_bos(tokenizer, sides),
                                    skipped, [pair.chosen for pair in kept], keeps),
        "no_eos": sum(NO_EOS in pair_problems(tokenizer, pair, eos) for pair in kept),
    })
    return facts


def _pair_example(tokenizer: Any, pair: PreferencePair, rendered: RenderedPair) -> dict[str, Any]:
    """One kept pair as the model sees it: the shared tokens once, then each side from the divergence."""
    chosen, rejected, at = rendered.chosen, rendered.rejected, rendered.divergence
    return {
        "line": pair.line,
        "prompt_tokens": chosen.prompt_tokens,
        "divergence": at,
        "truncated_tokens": chosen.truncated_tokens,
        "tokens": {"chosen": len(chosen.input_ids), "rejected": len(rejected.input_ids)},
        "loss_tokens": {"chosen": _loss_tokens(chosen), "rejected": _loss_tokens(rejected)},
        "shared": _shown(tokenizer, chosen, 0, at),
        "chosen": _shown(tokenizer, chosen, at, len(chosen.input_ids)),
        "rejected": _shown(tokenizer, rejected, at, len(rejected.input_ids)),
    }


def render_pairs_report(report: dict[str, Any], console: Console) -> None:
    """Print a pairs report (:func:`inspect_pairs`) as tables that fit an 80-column terminal."""
    _render_common(report, console, "pairs", ("prompt", "chosen", "rejected"))
    if report["examples"]:
        console.print(Text.assemble(("legend: ", "bold"), ("loss tokens", "black on green"),
                                    " (what the model learns to prefer or avoid), ", ("context", "dim"),
                                    " (read, not trained on)"))
    for i, ex in enumerate(report["examples"], 1):
        body = Text.from_markup(ex["shared"]["markup"])
        for side, style in (("chosen", "bold green"), ("rejected", "bold red")):
            body.append(f"\n── {side} from token {ex['divergence']} ──\n", style=style)
            body.append_text(Text.from_markup(ex[side]["markup"]))
        subtitle = (f"prompt {ex['prompt_tokens']} tokens; loss tokens: chosen {ex['loss_tokens']['chosen']}, "
                    f"rejected {ex['loss_tokens']['rejected']}"
                    + (f"; {ex['truncated_tokens']} cut from the left" if ex["truncated_tokens"] else ""))
        console.print(Panel(body, title=f"train pair {i} (line {ex['line']})", title_align="left",
                            subtitle=subtitle, subtitle_align="right"))


# ------------------------------------------------------------------------------------------ kto
def inspect_kto(config: Config, tokenizer: Any, source: str | None, *, examples: int = 3) -> dict[str, Any]:
    """Facts about a kto config's unpaired examples as the model will see them.

    The keys of :func:`inspect_pairs`, with per split ``examples``, ``desirable``, ``undesirable`` and
    ``lengths`` of ``prompt`` and ``completion`` (``longer_side``: the whole example), ``skipped_on_read``
    holding ``empty_answer`` only, ``no_eos`` counting examples; and ``examples`` (the first train examples:
    ``line``, ``desirable``, ``tokens``, ``loss_tokens``, ``prompt_tokens``, ``truncated_tokens``, ``text``,
    ``markup``).
    """
    d = config.data
    with collect_warnings(skip=_SHOWN_ELSEWHERE) as warnings:
        splits, info = preference_splits(d, lambda path: read_kto_examples(path, d), what="examples")
        order = sorted(splits, key=split_rank)
        rendered = {split: render_kto_examples(tokenizer, splits[split], d) for split in order}
        facts = {split: _kto_split_facts(config, tokenizer, splits[split], rendered[split], info, split)
                 for split in order}
    eos = end_of_turn_ids(tokenizer)
    train = [example for example in rendered["train"] if example is not None]
    problems = Counter(problem for example in train for problem in check_rendered(tokenizer, example, eos))
    checks, errors = _problem_checks(tokenizer, problems, len(train), "examples", eos, (
        (NO_EOS, "every completion ends with an end-of-turn token ({eos})"),
        (DOUBLE_BOS, "no example starts with two BOS tokens ({bos})"),
        (NO_LOSS, "every example carries loss"),
    ))
    counts = facts["train"]
    missing = [name for name in ("desirable", "undesirable") if not counts[name]]
    balance = f"{counts['desirable']} desirable, {counts['undesirable']} undesirable"
    checks.append(check_row("train has desirable and undesirable examples", WARNING if missing else OK,
                            balance + (f": no {' or '.join(missing)} example" if missing else "")))
    model_path = _model_path(tokenizer)
    _fit_and_positions(config, model_path, facts, "examples", checks, errors)
    shown = [
        _kto_example(tokenizer, example, out)
        for example, out in zip(splits["train"], rendered["train"], strict=True)
        if out is not None
    ][: max(examples, 0)]
    report = _header(config, tokenizer, source, model_path, eos)
    report.update({"splits": facts, "checks": checks, "errors": errors, "warnings": warnings, "examples": shown})
    report["suggestions"] = _suggestions(report, "examples", model_positions(config, model_path))
    return report


def _kto_split_facts(
    cfg: Config, tokenizer: Any, examples: list[KTOExample], rendered: list[RenderedExample | None],
    info: dict[str, Any], split: str,
) -> dict[str, Any]:
    """One split's unpaired examples: read, kept, skipped, token lengths, and what data.max_length does."""
    d = cfg.data

    def render(example: KTOExample, max_length: int, too_long: str) -> RenderedExample | None:
        return render_completion(tokenizer, example.prompt, example.completion, max_length=max_length,
                                 too_long=too_long, special_tokens_in_content=d.special_tokens_in_content)

    eos = end_of_turn_ids(tokenizer)
    kept = [example for example in rendered if example is not None]
    measured = [out for out in (render(example, _UNLIMITED, "skip") for example in examples) if out is not None]
    whole = [len(example.input_ids) for example in measured]
    answers = [_answer_tokens(example) for example in measured]
    dropped = [example for example, out in zip(examples, rendered, strict=True) if out is None]
    keeps = None
    if d.too_long == "skip":
        keeps = sum(render(example, d.max_length, "truncate_left") is not None for example in dropped)
    facts = _read_facts(info, split)
    desirable = sum(example.desirable for example in examples)
    facts.update({
        "examples": len(examples),
        "desirable": desirable,
        "undesirable": len(examples) - desirable,
        "kept": len(kept),
        "tokens": sum(len(example.input_ids) for example in kept),
        "lengths": {
            "prompt": length_stats([example.prompt_tokens for example in measured], (95,)),
            "completion": length_stats(answers, (95,)),
            "longer_side": length_stats(whole, (95,)),
        },
        "too_long": _too_long_facts(d.max_length, whole, answers,
                                    _keeps_bos(tokenizer, [(example,) for example in measured]),
                                    [example.line for example in dropped], kept, keeps),
        "no_eos": sum(NO_EOS in check_rendered(tokenizer, example, eos) for example in kept),
    })
    return facts


def _kto_example(tokenizer: Any, example: KTOExample, rendered: RenderedExample) -> dict[str, Any]:
    """One kept unpaired example as the model sees it."""
    shown = _shown(tokenizer, rendered, 0, len(rendered.input_ids))
    return {
        "line": example.line,
        "desirable": example.desirable,
        "tokens": len(rendered.input_ids),
        "loss_tokens": _loss_tokens(rendered),
        "prompt_tokens": rendered.prompt_tokens,
        "truncated_tokens": rendered.truncated_tokens,
        "text": rendered.text,
        "markup": shown["markup"],
    }


def render_kto_report(report: dict[str, Any], console: Console) -> None:
    """Print a kto report (:func:`inspect_kto`) as tables that fit an 80-column terminal."""
    _render_common(report, console, "examples", ("prompt", "completion"))
    if report["examples"]:
        console.print(Text.assemble(("legend: ", "bold"), ("loss tokens", "black on green"),
                                    " (the completion the model learns to favour or avoid), ", ("context", "dim"),
                                    " (read, not trained on)"))
    for i, ex in enumerate(report["examples"], 1):
        judged = "desirable" if ex["desirable"] else "undesirable"
        subtitle = f"{ex['tokens']} tokens, {ex['loss_tokens']} with loss" + (
            f", {ex['truncated_tokens']} cut from the left" if ex["truncated_tokens"] else "")
        console.print(Panel(Text.from_markup(ex["markup"]), title=f"train example {i} (line {ex['line']}, {judged})",
                            title_align="left", subtitle=subtitle, subtitle_align="right"))


# ------------------------------------------------------------------------------------------ shared
def _header(config: Config, tokenizer: Any, source: str | None, model_path: Path | None,
            eos: set[int]) -> dict[str, Any]:
    d = config.data
    return {
        "config": source,
        "task": config.task,
        "model": config.model.name,
        "model_path": None if model_path is None else str(model_path),
        "max_length": d.max_length,
        "batch_size": config.train.batch_size,
        "max_samples": d.max_samples,
        "too_long": d.too_long,
        "packing": None,
        "end_of_turn_tokens": tokenizer.convert_ids_to_tokens(sorted(eos)),
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "pad_is_eos": tokenizer.pad_token_id in eos,
    }


def _model_path(tokenizer: Any) -> Path | None:
    """The folder the tokenizer was loaded from, when it is a model folder (its positions are checked)."""
    path = Path(str(getattr(tokenizer, "name_or_path", "") or "")).expanduser()
    return path if str(path) not in ("", ".") and (path / "config.json").is_file() else None


def _read_facts(info: dict[str, Any], split: str) -> dict[str, Any]:
    """What reading a split's source said; a split held out of train shows train's format (read there)."""
    own = info.get(split, {})
    return {
        "source": own.get("source"),
        "rows_read": own.get("rows_read"),
        "format": own.get("format") or info["train"].get("format"),
        "format_detected": "format" in own,
        "skipped_on_read": own.get("skipped"),
        "duplicates_removed": int(own.get("duplicates_removed", 0)),
    }


def _too_long_facts(max_length: int, whole: list[int], answers: list[int], keep_bos: list[int],
                    skipped: list[int], kept: Sequence[RenderedExample], keeps: int | None) -> dict[str, Any]:
    """What data.max_length does to a split: ``whole`` lengths (the longer side), the longer answer's tokens
    and whether a BOS is kept in front (``keep_bos``), the lines skipped, the kept renders (one per record)."""
    return {
        "over_max_length": sum(n > max_length for n in whole),
        "skipped": len(skipped),
        "skipped_lines": skipped[:_LINES_SHOWN],
        # truncate_left skips a record only when its (longer) answer, and a kept BOS, alone pass max_length.
        "answer_too_long": sum(answer + bos > max_length for answer, bos in zip(answers, keep_bos, strict=True)),
        "truncated": sum(example.truncated_tokens > 0 for example in kept),
        "tokens_cut": sum(example.truncated_tokens for example in kept),
        "truncate_left_keeps": keeps,
    }


def _keeps_bos(tokenizer: Any, sides: Sequence[tuple[RenderedExample, ...]]) -> list[int]:
    """1 where a record's render starts with the BOS token (left truncation keeps it), else 0."""
    bos = tokenizer.bos_token_id
    return [int(bos is not None and bool(side[0].input_ids) and side[0].input_ids[0] == bos) for side in sides]


def _answer_tokens(example: RenderedExample) -> int:
    """Tokens from the first loss-carrying one to the end: the answer and its end of turn."""
    return len(example.input_ids) - example.prompt_tokens


def _loss_tokens(example: RenderedExample) -> int:
    return sum(label != IGNORE_INDEX for label in example.labels)


def _shown(tokenizer: Any, example: RenderedExample, start: int, end: int) -> dict[str, str]:
    """Tokens ``start:end`` of ``example`` as text and as rich markup with the loss tokens highlighted."""
    part = RenderedExample(example.input_ids[start:end], example.labels[start:end], 0, 0, "")
    text = format_conversation_for_display(tokenizer, part)
    return {"text": text.plain, "markup": text.markup}


def _problem_checks(
    tokenizer: Any, problems: Counter[str], total: int, what: str, eos: set[int],
    rows: tuple[tuple[str, str], ...],
) -> tuple[list[dict[str, Any]], list[str]]:
    """One check row per problem, counted over the kept train records. As the tasks' pre-flight decides, a
    problem stops ``train`` when it is a double BOS or found in every record (error); in some only, a warning."""
    names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(eos))) or "none"
    pad_is_eos = tokenizer.pad_token_id in eos
    checks, errors = [], []
    for problem, name in rows:
        count = problems[problem]
        status = OK
        if count and ("BOS" in problem or count == total):
            status = ERROR
            errors.append(f"pre-flight check failed: {count} of {total} training {what}: {problem}")
        elif count:
            status = WARNING
        note = PAD_IS_EOS_NOTE if problem == NO_EOS and pad_is_eos else ""
        detail = "; ".join(x for x in (f"{count} of {total} train {what}" if count else "", note) if x)
        checks.append(check_row(name.format(eos=names, bos=tokenizer.bos_token or "no BOS"), status, detail,
                                count, total))
    return checks, errors


def _fit_and_positions(config: Config, model_path: Path | None, facts: dict[str, Any], what: str,
                       checks: list[dict[str, Any]], errors: list[str]) -> None:
    """Rows for each split fitting data.max_length (none fitting stops ``train``) and for the model's positions."""
    d = config.data
    for split, f in facts.items():
        tl = f["too_long"]
        total = f[what]
        name = f"{split}: {what} fit data.max_length {d.max_length}"
        if f["kept"] == 0:
            checks.append(check_row(name, ERROR, "none fits: raise data.max_length", tl["skipped"], total))
            errors.append(f"no {split} {what[:-1]} fits data.max_length {d.max_length}: raise data.max_length")
        elif tl["skipped"]:
            detail = f"{tl['skipped']} skipped (lines {format_locations(tl['skipped_lines'])})"
            if tl["truncate_left_keeps"]:
                detail += f"; data.too_long: truncate_left keeps {tl['truncate_left_keeps']}"
            checks.append(check_row(name, WARNING, detail, tl["skipped"], total))
        else:
            detail = f"{tl['truncated']} prompt(s) cut from the left" if tl["truncated"] else ""
            checks.append(check_row(name, OK, detail, 0, total))
    row, error = positions_check(config, model_path)
    checks += [row] if row else []
    errors += [error] if error else []


def _suggestions(report: dict[str, Any], what: str, positions: int | None) -> list[str]:
    """Settings worth changing, each naming the key."""
    out = []
    max_length = report["max_length"]
    train = report["splits"]["train"]
    tl = train["too_long"]
    if tl["truncate_left_keeps"]:
        out.append(f"--data.too_long truncate_left would keep {tl['truncate_left_keeps']} of the {tl['skipped']} "
                   f"skipped train {what} (their prompts cut from the left)")
    share = tl["over_max_length"] / max(train[what], 1)
    stats = train["lengths"]["longer_side"]
    if share > TRUNCATION_WARN_FRACTION and stats:
        want = round_up(stats["p95"])
        if positions is not None:
            want = min(want, positions)
        if want > max_length:
            out.append(f"{100 * share:.1f}% of train {what} are longer than data.max_length {max_length}; "
                       f"--data.max_length {want} fits {'95% of them' if want >= stats['p95'] else 'more'} "
                       "(longer rows cost more memory and time)")
    return out


def _render_common(report: dict[str, Any], console: Console, what: str, parts: tuple[str, ...]) -> None:
    """Header, the splits table, token lengths, truncation and the checks of a pairs or kto report."""
    render_header(report, console, f", data.too_long {report['too_long']}")
    eot = ", ".join(report["end_of_turn_tokens"]) or "none"
    console.print(Text(f"end of turn: {eot}; pad: {report['pad_token']}" + (" (== eos)" if report["pad_is_eos"]
                                                                               else "")), highlight=False)
    splits = report["splits"]
    table = Table(title=what, title_justify="left")
    table.add_column("split")
    table.add_column("source", overflow="fold")
    table.add_column("format")
    for column in ("read", "same", "empty", "dupes", what, "kept"):
        table.add_column(column, justify="right")
    for split, f in splits.items():
        skipped = f["skipped_on_read"] or {}
        counts = [str(skipped[k]["count"]) if k in skipped else "–" for k in ("identical", "empty_answer")]
        fmt = str(f["format"]) + ("" if f["format_detected"] else " (train)")
        table.add_row(split, Text(str(f["source"] or "")), fmt, str(f["rows_read"] if f["rows_read"] is not None
                                                                    else "–"),
                      *counts, str(f["duplicates_removed"]), str(f[what]), str(f["kept"]))
    console.print(table)
    console.print(f"read: records in the file; same / empty: skipped because the answers are the same text / an "
                  f"answer is empty; dupes: repeated records removed; kept: {what} that fit data.max_length",
                  style="dim", highlight=False)
    for split, f in splits.items():
        for reason, skipped in (f["skipped_on_read"] or {}).items():
            if skipped["count"]:
                console.print(Text(f"{split}: {skipped['count']} skipped ({reason.replace('_', ' ')}), lines "
                                   f"{format_locations(skipped['lines'])}", style="yellow"), highlight=False)

    table = Table(title="tokens (whole, before data.max_length)", title_justify="left")
    table.add_column("split")
    table.add_column("part")
    for column in ("min", "median", "p95", "max", "mean"):
        table.add_column(column, justify="right")
    for split, f in splits.items():
        for part in parts:
            stats = f["lengths"][part]
            cells = [str((stats or {}).get(k, "–")) for k in ("min", "median", "p95", "max", "mean")]
            table.add_row(split, part, *cells)
    console.print(table)
    console.print("prompt: tokens before the answer; answers: their tokens with the end of turn", style="dim",
                  highlight=False)

    table = Table(title=f"longer than data.max_length {report['max_length']} (data.too_long: {report['too_long']})",
                  title_justify="left")
    table.add_column("split")
    for column in ("too long", "skipped", "answer too long", "prompt cut", "no EOS"):
        table.add_column(column, justify="right")
    for split, f in splits.items():
        tl = f["too_long"]
        table.add_row(split, str(tl["over_max_length"]), str(tl["skipped"]), str(tl["answer_too_long"]), str(tl["truncated"]),
                      str(f["no_eos"]), style="yellow" if tl["skipped"] or f["no_eos"] else None)
    console.print(table)
    console.print("answer too long: the answer alone passes data.max_length (skipped even with truncate_left); "
                  "prompt cut: kept with the prompt cut from the left; no EOS: an answer does not end with an "
                  "end-of-turn token", style="dim", highlight=False)
    render_checks(report, console)

