"""``lmtune data inspect`` for masked_lm: the rows training reads and the tokens it will ask the model to predict.

:func:`masked_lm_facts` gives one row per fact and one column per split (the generic facts table of ``lmtune data
inspect`` shows it), :func:`masked_lm_details` the masking settings, suggestions naming the setting to change and
train rows rendered with their masked tokens. Everything is counted on the rows ``prepare`` built and masked as
training masks them (train: its first epoch; validation/test: the one masking every evaluation uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape

from lmtune.config import Config
from lmtune.data.features import IGNORE_INDEX
from lmtune.tasks.base import TaskData
from lmtune.tasks.inspection import split_rank
from lmtune.tasks.masked_lm.masking import MASK_SHARE, NO_WORD, RANDOM_SHARE, MaskedRows

# Suggest a model whose vocabulary covers the text when more than this share of train's tokens is unknown.
UNKNOWN_WARN_FRACTION = 0.05
LEGEND = ("red: replaced by the mask token, yellow: replaced by a random token, green: kept; each is a token the "
          "model must predict (the original in brackets)")


def _percent(part: float, whole: float) -> float:
    return round(100 * part / whole, 1) if whole else 0.0


def masked_counts(rows: MaskedRows) -> dict[str, int]:
    """Tokens that may be chosen (in a word) and tokens chosen, over every row of a split as it is masked now."""
    maskable = chosen = 0
    for start in range(0, len(rows), 256):
        indices = list(range(start, min(start + 256, len(rows))))
        words = rows.rows[indices]["word_ids"]
        maskable += sum(w != NO_WORD for row in words for w in row)
        chosen += sum(label != IGNORE_INDEX for item in rows.__getitems__(indices) for label in item["labels"])
    return {"maskable": maskable, "chosen": chosen}


def unknown_counts(tokenizer: Any, docs: list[str]) -> tuple[int, int]:
    """(unknown tokens, tokens) of ``docs`` tokenised without special tokens."""
    unk = tokenizer.unk_token_id
    unknown = tokens = 0
    for start in range(0, len(docs), 1000):
        for ids in tokenizer(docs[start:start + 1000], add_special_tokens=False, verbose=False)["input_ids"]:
            tokens += len(ids)
            unknown += sum(t == unk for t in ids) if unk is not None else 0
    return unknown, tokens


def masked_lm_facts(data: TaskData, *, tokenizer: Any = None, base_tokenizer: Any = None
                    ) -> dict[str, dict[str, Any]]:
    """Per split: documents, rows, tokens, words, unknown tokens, documents cut across rows, tokens masked.

    ``base_tokenizer`` (given when data.extend_vocabulary added words; ``tokenizer`` is then the extended one
    ``prepare`` used) is the model's own: ``unknown_before_extension`` is the unknown tokens it reads in the split's
    documents, beside ``unknown_tokens`` (those left after the extension)."""
    out: dict[str, dict[str, Any]] = {}
    for split in sorted(data.splits, key=split_rank):
        info = data.info[split]
        counts = masked_counts(data.splits[split])
        facts: dict[str, Any] = {
            "source": info.get("source"),
            "documents": info["documents"],
            "rows_read": info.get("rows_read", "(in train)"),
            "skipped_empty": info.get("skipped_empty", "(in train)"),
            "duplicates_removed": info.get("duplicates_removed", 0),
            "rows": info["rows"],
            "tokens": info["tokens"],
            "words": info["words"],
            "unknown_tokens": f"{info['unknown_tokens']} ({_percent(info['unknown_tokens'], info['tokens'])}%)",
        }
        if base_tokenizer is not None and tokenizer is not None:
            # The rows hold every token of the documents plus the frame and separators: the same extra tokens
            # are added to the model's own count, so both shares are of the tokens a row would hold.
            docs = data.extra.get("documents", {}).get(split, [])
            before, before_text = unknown_counts(base_tokenizer, docs)
            _, after_text = unknown_counts(tokenizer, docs)
            before_total = before_text + info["tokens"] - after_text
            facts["unknown_before_extension"] = f"{before} ({_percent(before, before_total)}%)"
            facts["_unknown_fraction_before_extension"] = before / max(before_total, 1)
        out[split] = facts | {
            "documents_split_across_rows": info["documents_split_across_rows"],
            "masked_tokens": f"{counts['chosen']} ({_percent(counts['chosen'], counts['maskable'])}% of "
                             f"{counts['maskable']} in words)",
            "_unknown_fraction": info["unknown_tokens"] / max(info["tokens"], 1),
        }
    return out


def _render_row(item: dict[str, list[int]], original: list[int], tokenizer: Any) -> str:
    """Rich markup of one masked row: every token, the chosen ones coloured by what the model sees there."""
    seen = tokenizer.convert_ids_to_tokens(item["input_ids"])
    parts = []
    for token, shown, label, orig in zip(item["input_ids"], seen, item["labels"], original, strict=True):
        if label == IGNORE_INDEX:
            parts.append(escape(shown))
            continue
        was = escape(tokenizer.convert_ids_to_tokens(orig))
        if token == tokenizer.mask_token_id:
            parts.append(f"[bold red]{escape(shown)}[/][dim]({was})[/]")
        elif token != orig:
            parts.append(f"[bold yellow]{escape(shown)}[/][dim]({was})[/]")
        else:
            parts.append(f"[bold green]{was}[/]")
    return " ".join(parts)


def masked_lm_details(data: TaskData, facts: dict[str, dict[str, Any]], tokenizer: Any, config: Config, *,
                      examples: int = 3, added_tokens: Sequence[str] = ()) -> dict[str, Any]:
    """The masking settings and vocabulary extension (``added_tokens``: the words it added) as ``summary``,
    ``suggestions`` and the first train rows as training masks them in its first epoch (``examples``)."""
    d = config.data
    masking = data.info.get("masking", {})
    summary = {
        "masking": f"{100 * d.mlm_probability:g}% of the tokens in words, "
                   + ("whole words" if masking.get("whole_words") else "sub-token by sub-token")
                   + f"; {100 * MASK_SHARE:g}% {tokenizer.mask_token} / {100 * RANDOM_SHARE:g}% random / "
                   f"{100 * (1 - MASK_SHARE - RANDOM_SHARE):g}% kept",
        "rows": ("documents packed into rows of data.max_length (separated by the separator token)" if
                 masking.get("packing") else "every document on rows of its own (data.packing: false)"),
        "held-out masking": f"fixed (data.split_seed {d.split_seed}): every evaluation scores the same positions",
    }
    if d.extend_vocabulary:
        added = list(added_tokens)
        summary["vocabulary extension"] = (f"{len(added)} of up to {d.extend_vocabulary} words added"
                                           + (f" ({' '.join(added[:10])}{' ...' if len(added) > 10 else ''})"
                                              if added else ""))
    suggestions = []
    unknown = facts.get("train", {}).get("_unknown_fraction", 0.0)
    if unknown > UNKNOWN_WARN_FRACTION:
        more = (f"--data.extend_vocabulary {max(2 * d.extend_vocabulary, 1000)} adds more of them" if
                d.extend_vocabulary else
                "--data.extend_vocabulary 2000 adds the most frequent unknown training words to the vocabulary "
                "(new embeddings the model learns to predict, handed on to a run started from this one)")
        suggestions.append(f"{100 * unknown:.1f}% of train's tokens are the unknown token {tokenizer.unk_token}: "
                           f"they are never masked, so the model learns nothing about them; {more}, or pick a "
                           "model whose vocabulary covers this text")
    rows: MaskedRows = data.splits["train"]
    shown = []
    for i in range(min(max(examples, 0), len(rows))):
        item = rows[i]
        original = rows.rows[i]["input_ids"]
        chosen = sum(label != IGNORE_INDEX for label in item["labels"])
        shown.append({"title": f"train row {i + 1}", "markup": _render_row(item, original, tokenizer),
                      "subtitle": f"{len(original)} tokens, {chosen} to predict", **({"legend": LEGEND} if not i
                                                                                      else {})})
    return {"summary": summary, "suggestions": suggestions, "examples": shown}
