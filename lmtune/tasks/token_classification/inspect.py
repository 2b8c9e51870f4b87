"""``lmtune data inspect`` for token classification: facts the task's own data preparation produced, plus
what only a second look at the prepared records shows.

The task's ``inspect_facts`` / ``inspect_details`` call in here: :func:`tagging_facts` gives one row per fact
and one column per split, :func:`tagging_details` the run-wide facts (``summary``), ``suggestions`` naming
the setting to change, and rendered train ``examples`` (the generic facts table of ``lmtune data inspect``
shows them). Everything is counted on the records and features ``prepare`` built, with the tokenizer it
used, so the numbers are the ones training gets.
"""

from __future__ import annotations

from typing import Any

from lmtune.config import DataConfig
from lmtune.data import tagging
from lmtune.data.features import IGNORE_INDEX
from lmtune.tasks.base import TaskData
from lmtune.tasks.inspection import split_rank

# Suggest data.extend_vocabulary when more than this share of train's sub-tokens is the unknown token.
UNKNOWN_WARN_FRACTION = 0.05
# Suggest a larger limit when more than this share of a split is cut by it.
CUT_WARN_FRACTION = 0.05
# The order splits are looked at in (the first one cut often gets the suggestion).
_SPLIT_ORDER = ("train", "validation", "test")


def _percent(part: float, whole: float) -> float:
    return round(100 * part / whole, 1) if whole else 0.0


def tagging_counts(tok: Any, max_length: int, data: TaskData, split: str) -> dict[str, Any]:
    """Sub-tokens (before truncation, special tokens left out), unknown ones, and entities that
    ``max_length`` cuts, for one split's records, tokenised as ``prepare`` tokenised them."""
    rows = data.extra["records"][split]
    words = [r["words"] for r in rows]
    if not words:
        return {"sub_tokens": 0, "unknown": 0, "unknown_words": 0, "entities_cut": 0}
    full = tok(words, is_split_into_words=True, truncation=False, verbose=False)
    cut = tok(words, is_split_into_words=True, truncation=True, max_length=max_length)
    unk = tok.unk_token_id
    sub_tokens = unknown = unknown_words = entities_cut = 0
    for i, r in enumerate(rows):
        ids = full["input_ids"][i]
        pieces: dict[int, list[int]] = {}
        for token, wid in zip(ids, full.word_ids(i), strict=True):
            if wid is not None:  # special tokens ([CLS], [SEP]) belong to no word
                pieces.setdefault(wid, []).append(token)
        sub_tokens += sum(len(p) for p in pieces.values())
        if unk is not None:
            unknown += sum(t == unk for p in pieces.values() for t in p)
            unknown_words += sum(all(t == unk for t in p) for p in pieces.values())
        kept = {w for w in cut.word_ids(i) if w is not None}
        last_kept = max(kept, default=-1)
        # An entity is cut when any of its words lost its first sub-token to truncation.
        entities_cut += sum(last > last_kept for _, _, last in r["spans"])
    return {"sub_tokens": sub_tokens, "unknown": unknown, "unknown_words": unknown_words,
            "entities_cut": entities_cut}


def tagging_facts(data: TaskData, tokenizer: Any, max_length: int, *, base_tokenizer: Any = None
                  ) -> dict[str, dict[str, Any]]:
    """Per split: sentences, words, sub-tokens and the unknown-token share, entities per type, the tag
    scheme read, lenient-BIO repairs, empty and duplicate sentences, and what ``max_length`` cuts.

    ``tokenizer`` is the one ``prepare`` used; ``base_tokenizer`` (given when data.extend_vocabulary added
    words) the model's own, to show how many unknown tokens the extension repaired."""
    info = data.info
    base = base_tokenizer
    out: dict[str, dict[str, Any]] = {}
    for split in data.splits:
        s = info[split]
        counts = tagging_counts(tokenizer, max_length, data, split)
        n = int(s["examples"])
        facts: dict[str, Any] = {
            "sentences": n,
            "rows_read": s.get("rows_read", "(in train)"),
            "skipped_empty": s.get("skipped_empty", "(in train)"),
            "duplicates_removed": s.get("duplicates_removed", 0),
            "input_scheme": s.get("input_scheme", s.get("input_format", "(train's)")),
            "entities_starting_with_I": s.get("entities_starting_with_I", 0),
            "words": s["words"],
            "sub_tokens": counts["sub_tokens"],
            "unknown_sub_tokens": f"{counts['unknown']} ({_percent(counts['unknown'], counts['sub_tokens'])}%)",
            "unknown_words": counts["unknown_words"],
        }
        if base is not None:
            before = tagging_counts(base, max_length, data, split)
            facts["unknown_before_extension"] = (f"{before['unknown']} "
                                                 f"({_percent(before['unknown'], before['sub_tokens'])}%)")
        facts |= {
            "entities": sum(s["label_counts"].values()),
        }
        for kind in info["entity_types"]:
            facts[f"entities_{kind}"] = s["label_counts"].get(kind, 0)
        facts.update({
            "sentences_truncated": f"{s['truncated']} ({_percent(s['truncated'], n)}%)",
            "words_cut": s["truncated_words"],
            "entities_cut": counts["entities_cut"],
            "tokens_kept": s["tokens"],
        })
        # Plain numbers for callers (the table shows the strings above).
        facts["_unknown_fraction"] = counts["unknown"] / counts["sub_tokens"] if counts["sub_tokens"] else 0.0
        facts["_truncated_fraction"] = s["truncated"] / n if n else 0.0
        out[split] = facts
    return out


def tagging_details(data: TaskData, facts: dict[str, dict[str, Any]], tokenizer: Any, d: DataConfig,
                    added_tokens: list[str], examples: int) -> dict[str, Any]:
    """The label set and scheme, vocabulary extension (``added_tokens``: the words it added), suggestions, and
    rendered train sentences; ``facts`` from :func:`tagging_facts`, ``d`` the data settings."""
    info = data.info
    read = info["train"].get("input_scheme")
    scheme = str(info["tag_scheme"]).upper()
    scheme_note = scheme if read is None else (f"{scheme} (read as {read.upper()}" +
                                               (", converted)" if read != info["tag_scheme"] else ")"))
    summary = {
        "entity types": ", ".join(info["entity_types"]),
        "labels": len(info["labels"]),
        "tag scheme": scheme_note,
        "word split (raw text)": info["word_split"],
        "labelled sub-tokens": "all sub-tokens of a word" if d.label_all_subtokens else "first sub-token of a word",
    }
    if d.extend_vocabulary:
        added = added_tokens
        summary["vocabulary extension"] = (f"{len(added)} of up to {d.extend_vocabulary} words added"
                                           + (f" ({' '.join(added[:10])}{' ...' if len(added) > 10 else ''})"
                                              if added else ""))
    tips: list[str] = []
    train = facts["train"]
    share = train["_unknown_fraction"]
    if share > UNKNOWN_WARN_FRACTION:
        where = (f"--data.extend_vocabulary {max(2 * d.extend_vocabulary, 1000)} adds more of them"
                 if d.extend_vocabulary else
                 "--data.extend_vocabulary 2000 adds the most frequent unknown training words to the vocabulary "
                 "(new embeddings, trained with the head)")
        tips.append(f"{100 * share:.1f}% of train sub-tokens are the tokenizer's unknown token "
                    f"{tokenizer.unk_token}: the model cannot tell those words apart; {where}, or pick a "
                    "model whose vocabulary covers this language")
    for split in sorted(facts, key=split_rank):
        f = facts[split]
        if f["_truncated_fraction"] > CUT_WARN_FRACTION:
            tips.append(f"{100 * f['_truncated_fraction']:.1f}% of {split} sentences are longer than data.max_length "
                        f"{d.max_length} tokens ({f['entities_cut']} entities cut, not trained on or scored); "
                        "raise --data.max_length")
            break
    return {"summary": summary, "suggestions": tips, "examples": tagging_examples(data, tokenizer, examples)}


def tagging_examples(data: TaskData, tok: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` train sentences: words with their tags, and sub-tokens with the label each trains on
    (``tok``: the tokenizer ``prepare`` used)."""
    labels = data.info["labels"]
    rows, ds = data.extra["records"]["train"], data.splits["train"]
    out = []
    for i in range(min(max(n, 0), len(rows))):
        r, feat = rows[i], ds[i]
        tags = tagging.spans_to_tags(r["spans"], len(r["words"]), data.info["tag_scheme"])
        ids = [int(x) for x in feat["input_ids"]]
        token_labels = [None if int(x) == IGNORE_INDEX else labels[int(x)] for x in feat["labels"]]
        # Words added by data.extend_vocabulary come back padded with the normaliser's spaces.
        shown = [t.strip() or t for t in tok.convert_ids_to_tokens(ids)]
        words_line = " ".join(w if t == "O" else f"{w}/{t}" for w, t in zip(r["words"], tags, strict=True))
        tokens_line = " ".join(f"{t}" if lab is None else f"{t}/{lab}"
                               for t, lab in zip(shown, token_labels, strict=True))
        out.append({
            "title": f"train sentence {i + 1} (line {r['line']})",
            "subtitle": f"{len(r['words'])} words, {len(ids)} tokens",
            "body": f"{words_line}\n\n{tokens_line}",
            "words": r["words"], "tags": tags, "tokens": shown, "token_labels": token_labels,
        })
    if out:
        out[0]["legend"] = ("words: word/TAG (untagged words are O); tokens: sub-token/LABEL where the loss is, "
                            "bare where it is -100 (special tokens, later sub-tokens of a word)")
    return out
