"""``lmtune data inspect`` for seq2seq: facts the task's own data preparation produced, plus what only a second
look at the prepared records shows.

The task's ``inspect_facts`` / ``inspect_details`` call in here: :func:`seq2seq_facts` gives one row per fact
and one column per split, :func:`seq2seq_details` the run-wide facts (``summary``), ``suggestions`` naming
the setting to change, and rendered train ``examples``. Everything is counted on the records and features
``prepare`` built, with the tokenizer it used, so the numbers are the ones training gets.
"""

from __future__ import annotations

from typing import Any

from lmtune.tasks.base import TaskData
from lmtune.tasks.chat_tuning import chat_example
from lmtune.tasks.inspection import length_stats, split_rank
from lmtune.tasks.seq2seq.routes import ROUTE_DESCRIPTIONS

# Suggest a larger limit when more than this share of a split is cut by it.
CUT_WARN_FRACTION = 0.05


def _short_stats(values: list[int]) -> str:
    """``mean / p95 / max`` of token counts, as one table cell."""
    s = length_stats(values, (95,))
    return "–" if s is None else f"{s['mean']} / {s['p95']} / {s['max']}"


def _token_counts(tok: Any, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tok(texts, verbose=False)["input_ids"]] if texts else []


def seq2seq_facts(task: Any, data: TaskData) -> dict[str, dict[str, Any]]:
    """Per split: pairs, skipped and duplicate rows, source and target tokens (mean / p95 / max, before
    truncation) and how many exceed ``data.max_length`` / ``data.max_target_length``."""
    d, info = task.config.data, data.info
    tok = task.tokenizer
    records = task.pair_records()
    out: dict[str, dict[str, Any]] = {}
    for split in data.splits:
        s, rows = info[split], records[split]
        src = _token_counts(tok, [r["source"] for r in rows])
        if task.route == "decoder":
            tgt = [len(ids) for ids in tok([r["target"] for r in rows], add_special_tokens=False,
                                           verbose=False)["input_ids"]] if rows else []
        else:
            tgt = [len(task.target_ids(tok, r["target"])) for r in rows]
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


def seq2seq_details(task: Any, data: TaskData, facts: dict[str, dict[str, Any]],
                    examples: int) -> dict[str, Any]:
    """The route and why, suggestions, and rendered train examples (the loss mask for the decoder route)."""
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
        records = task.splits_cache[0]["train"]
        for r in records[:200]:  # the first that fit data.max_length (training skips the others)
            if len(out) >= n:
                break
            [ex] = task.render([r], task.tokenizer)[0]
            if ex is None:
                continue  # too long: skipped in training too
            shown = chat_example(task.tokenizer, r, ex)
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

