"""``lmtune data inspect`` for token classification and seq2seq: facts the task's own data preparation
produced, plus what only a second look at the prepared records shows.

The tasks call in here from their ``inspect_facts`` / ``inspect_details`` hooks (see
:func:`lmtune.inspect.inspect_data`): ``inspect_facts`` gives one row per fact and one column per split,
``inspect_details`` the run-wide facts (``summary``), ``suggestions`` naming the setting to change, and
rendered train ``examples``. Everything is counted on the records and features ``prepare`` built, with
the tokenizer it used, so the numbers are the ones training gets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmtune.workflows.inspect import collect_warnings, length_stats, split_rank

if TYPE_CHECKING:
    from lmtune.tasks.base import TaskData
    from lmtune.tasks.token_classification.task import TokenClassificationTask

# Suggest data.extend_vocabulary when more than this share of train's sub-tokens is the unknown token.
UNKNOWN_WARN_FRACTION = 0.05
# Suggest a larger limit when more than this share of a split is cut by it.
CUT_WARN_FRACTION = 0.05
IGNORE = -100


def _percent(part: float, whole: float) -> float:
    return round(100 * part / whole, 1) if whole else 0.0


def _short_stats(values: list[int]) -> str:
    """``mean / p95 / max`` of token counts, as one table cell."""
    s = length_stats(values, (95,))
    return "–" if s is None else f"{s['mean']} / {s['p95']} / {s['max']}"


# ------------------------------------------------------------------------------------------ token classification
def _tagging_counts(tok: Any, max_length: int, data: TaskData, split: str) -> dict[str, Any]:
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


def token_classification_facts(task: TokenClassificationTask, data: TaskData) -> dict[str, dict[str, Any]]:
    """Per split: sentences, words, sub-tokens and the unknown-token share, entities per type, the tag
    scheme read, lenient-BIO repairs, empty and duplicate sentences, and what ``data.max_length`` cuts."""
    info = data.info
    base = None
    if task.added_tokens:
        # The tokenizer as the model shipped it: what data.extend_vocabulary repaired.
        from lmtune.models.registry import load_padded_tokenizer, resolve_model

        m = task.config.model
        base = load_padded_tokenizer(resolve_model(m.name, allow_pickle=m.allow_pickle),
                                     trust_remote_code=m.trust_remote_code)
    out: dict[str, dict[str, Any]] = {}
    for split in data.splits:
        s = info[split]
        counts = _tagging_counts(task.tokenizer, task.data_cfg.max_length, data, split)
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
            before = _tagging_counts(base, task.data_cfg.max_length, data, split)
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


def token_classification_details(task: TokenClassificationTask, data: TaskData, facts: dict[str, dict[str, Any]],
                                 examples: int) -> dict[str, Any]:
    """The label set and scheme, vocabulary extension, suggestions, and rendered train sentences."""
    d, info = task.data_cfg, data.info
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
        added = task.added_tokens
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
                    f"{task.tokenizer.unk_token}: the model cannot tell those words apart; {where}, or pick a "
                    "model whose vocabulary covers this language")
    for split in sorted(facts, key=split_rank):
        f = facts[split]
        if f["_truncated_fraction"] > CUT_WARN_FRACTION:
            tips.append(f"{100 * f['_truncated_fraction']:.1f}% of {split} sentences are longer than data.max_length "
                        f"{d.max_length} tokens ({f['entities_cut']} entities cut, not trained on or scored); "
                        "raise --data.max_length")
            break
    return {"summary": summary, "suggestions": tips, "examples": _tagging_examples(task, data, examples)}


def _tagging_examples(task: TokenClassificationTask, data: TaskData, n: int) -> list[dict[str, Any]]:
    """The first ``n`` train sentences: words with their tags, and sub-tokens with the label each trains on."""
    from lmtune.data import tagging

    tok, labels = task.tokenizer, data.info["labels"]
    rows, ds = data.extra["records"]["train"], data.splits["train"]
    out = []
    for i in range(min(max(n, 0), len(rows))):
        r, feat = rows[i], ds[i]
        tags = tagging.spans_to_tags(r["spans"], len(r["words"]), data.info["tag_scheme"])
        ids = [int(x) for x in feat["input_ids"]]
        token_labels = [None if int(x) == IGNORE else labels[int(x)] for x in feat["labels"]]
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


# ------------------------------------------------------------------------------------------ seq2seq
def _token_counts(tok: Any, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tok(texts, verbose=False)["input_ids"]] if texts else []


def seq2seq_facts(task: Any, data: TaskData) -> dict[str, dict[str, Any]]:
    """Per split: pairs, skipped and duplicate rows, source and target tokens (mean / p95 / max, before
    truncation) and how many exceed ``data.max_length`` / ``data.max_target_length``."""
    d, info = task.config.data, data.info
    tok = task.tokenizer
    records = _pair_records(task)
    out: dict[str, dict[str, Any]] = {}
    for split in data.splits:
        s, rows = info[split], records[split]
        src = _token_counts(tok, [r["source"] for r in rows])
        if task.route == "decoder":
            tgt = [len(ids) for ids in tok([r["target"] for r in rows], add_special_tokens=False,
                                           verbose=False)["input_ids"]] if rows else []
        else:
            tgt = [len(task._target_ids(tok, r["target"])) for r in rows]
        facts: dict[str, Any] = {
            "pairs": len(rows),
            "rows_read": s.get("rows_read", "(in train)"),
            "skipped_empty": s.get("skipped_empty", "(in train)"),
            "duplicate_sources_removed": s.get("duplicate_sources_removed", "(in train)"),
            "also_in_train_removed": s.get("duplicates_removed", 0),
            "source_tokens_mean/p95/max": _short_stats(src),
            "target_tokens_mean/p95/max": _short_stats(tgt),
        }
        if task.route == "decoder":
            # One conversation (template + prompt + answer) must fit data.max_length.
            facts["conversations_skipped_too_long"] = s.get("skipped_too_long", 0)
            facts["conversations_truncated"] = s.get("truncated", 0)
            facts["_over"] = (int(s.get("skipped_too_long", 0)) + int(s.get("truncated", 0))) / max(len(rows), 1)
        else:
            facts[f"sources_over_{d.max_length}"] = s.get("truncated", sum(n > d.max_length for n in src))
            facts[f"targets_over_{d.max_target_length}"] = s.get("truncated_targets",
                                                                 sum(n > d.max_target_length for n in tgt))
            facts["_sources_over"] = sum(n > d.max_length for n in src) / max(len(rows), 1)
            facts["_targets_over"] = sum(n > d.max_target_length for n in tgt) / max(len(rows), 1)
        out[split] = facts
    return out


def _pair_records(task: Any) -> dict[str, list[dict[str, Any]]]:
    """``{source, target, line}`` per split, as ``prepare`` split them (the decoder route kept them;
    the encoder-decoder route reads and splits again, deterministically)."""
    if task.route == "decoder":
        splits = task._splits_cache[0]
        return {s: [{"source": r["source"], "target": r["messages"][-1]["content"], "line": r["line"]} for r in rows]
                for s, rows in splits.items()}
    with collect_warnings(skip=()):  # prepare already reported the skipped rows
        return task._pair_splits()[0]


def seq2seq_details(task: Any, data: TaskData, facts: dict[str, dict[str, Any]],
                    examples: int) -> dict[str, Any]:
    """The route and why, suggestions, and rendered train examples (the loss mask for the decoder route)."""
    from lmtune.tasks.seq2seq.task import ROUTE_DESCRIPTIONS

    d, m = task.config.data, task.config.model
    why = {
        "encoder_decoder": "the model is an encoder-decoder",
        "warm_start": "the model is an encoder (not a causal LM): its copy becomes the decoder, with new "
                      "cross-attention",
        "decoder": "the model is a causal LM: it answers the prompt in its chat template",
    }[task.route]
    summary: dict[str, Any] = {
        "route": f"{task.route}: {ROUTE_DESCRIPTIONS[task.route]}",
        "why": why + (f" (model.seq2seq: {m.seq2seq})" if m.seq2seq != "auto" else " (model.seq2seq: auto)"),
        "job": d.seq2seq_task + (f" from {d.source_language} to {d.target_language}" if d.source_language else ""),
    }
    if task.route == "decoder":
        prompt = task.prompt_template.format(source="{source}", source_language=d.source_language or "",
                                             target_language=d.target_language or "")
        summary["prompt"] = prompt.replace("\n", "\\n")
        summary["limit"] = f"data.max_length {d.max_length} tokens per conversation (prompt + answer)"
    else:
        summary["limit"] = f"data.max_length {d.max_length} source, data.max_target_length {d.max_target_length} " \
                           "target tokens"
    tips: list[str] = []
    cuts = (("_sources_over", "sources", "data.max_length", d.max_length, " (the model sees only their start)"),
            ("_targets_over", "targets", "data.max_target_length", d.max_target_length,
             " (the model learns to stop early)"),
            ("_over", "conversations", "data.max_length", d.max_length,
             " (training skips them)" if d.too_long == "skip" else " (their prompts are cut from the left)"))
    for key, what, setting, limit, why in cuts:
        # One sentence per limit, for the first split (train first) it cuts often.
        for split in sorted(facts, key=split_rank):
            share = facts[split].get(key, 0)
            if share > CUT_WARN_FRACTION:
                tips.append(f"{100 * share:.1f}% of {split} {what} are longer than {setting} {limit}{why}; "
                            f"raise --{setting}")
                break
    return {"summary": summary, "suggestions": tips, "examples": _seq2seq_examples(task, data, examples)}


def _seq2seq_examples(task: Any, data: TaskData, n: int) -> list[dict[str, Any]]:
    """The first ``n`` train pairs: the decoder route's conversation with its loss tokens highlighted, or
    the encoder-decoder's source and target tokens. ``task`` is either route of a Seq2SeqTask."""
    n = max(n, 0)
    out: list[dict[str, Any]] = []
    if task.route == "decoder":
        from lmtune.tasks.decoder_inspect import _sft_example

        records = task._splits_cache[0]["train"]
        for r in records[:200]:  # the first that fit data.max_length (training skips the others)
            if len(out) >= n:
                break
            [ex] = task.render([r], task.tokenizer)[0]
            if ex is None:
                continue  # too long: skipped in training too
            shown = _sft_example(task.tokenizer, r, ex)
            out.append({"title": f"train pair {len(out) + 1} (line {r['line']})",
                        "subtitle": f"{shown['tokens']} tokens, {shown['target_tokens']} with loss",
                        "markup": shown["markup"], "targets": shown["targets"], "text": shown["text"],
                        "legend": "green: loss tokens (the target the model learns to write); the rest is "
                                  "context, read but not trained on"})
        return out
    tok = task.tokenizer
    ds = data.splits["train"]
    for i in range(min(n, len(ds))):
        row = ds[i]
        src = tok.convert_ids_to_tokens([int(x) for x in row["input_ids"]])
        tgt = tok.convert_ids_to_tokens([int(x) for x in row["labels"]])
        start = tok.convert_ids_to_tokens([int(task.decoder_start_token_id or 0)])[0]
        out.append({"title": f"train pair {i + 1}", "subtitle": f"{len(src)} source, {len(tgt)} target tokens",
                    "body": f"source: {' '.join(src)}\n\ntarget: {' '.join(tgt)}",
                    "source_tokens": src, "target_tokens": tgt,
                    "legend": f"every target token carries loss (the decoder is fed {start} first, then the "
                              "target shifted right)"})
    return out

