"""Extractive QA in tokens: long contexts cut into overlapping windows with span labels, and the best answer
span chosen back in characters across all windows of a question.

Both follow transformers' ``examples/pytorch/question-answering`` (``run_qa.py`` prepare_*_features and
``utils_qa.postprocess_qa_predictions``): the tokenizer cuts the context (``truncation="only_second"``,
``return_overflowing_tokens``, ``stride`` tokens of overlap, ``return_offsets_mapping``); a window whose
context does not hold the whole answer is labelled with the CLS index; at prediction the ``n_best`` start
and end logits of every window are paired, spans that leave the context, end before they start or run past
``max_answer_length`` tokens are discarded, and the best-scoring span (start logit + end logit) wins. With
unanswerable questions the "null" score is the smallest CLS score over the question's windows, and the
answer is empty when ``null - best span`` exceeds the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Offsets of a token outside the context (question, special tokens, padding).
NOT_CONTEXT = (-1, -1)


def tokenize_windows(
    tokenizer: Any, questions: Sequence[str], contexts: Sequence[str],
    answers: Sequence[tuple[int, int] | None], *, max_length: int, stride: int,
) -> dict[str, list[Any]]:
    """Windows of every (question, context) pair with their labels.

    ``answers[i]`` is the answer's character span ``(start, end)`` in ``contexts[i]`` (end exclusive) or
    None (no answer). Returns per window: ``input_ids``, ``token_type_ids`` (when the tokenizer makes them),
    ``start_positions`` / ``end_positions`` (token indices of the answer; the CLS index when the window
    does not hold the whole answer), ``example`` (index into the inputs), ``offsets`` (character span of
    each token in the context, ``(-1, -1)`` outside it), ``length``.
    """
    enc = tokenizer(list(questions), list(contexts), truncation="only_second", max_length=max_length,
                    stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    out: dict[str, list[Any]] = {"input_ids": [], "start_positions": [], "end_positions": [], "example": [],
                                 "offsets": [], "length": []}
    if "token_type_ids" in enc:
        out["token_type_ids"] = []
    cls_id = tokenizer.cls_token_id
    for w, ids in enumerate(enc["input_ids"]):
        sample = enc["overflow_to_sample_mapping"][w]
        seq = enc.sequence_ids(w)
        offsets = [tuple(o) if s == 1 else NOT_CONTEXT for o, s in zip(enc["offset_mapping"][w], seq, strict=True)]
        cls_index = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
        start_tok = end_tok = cls_index
        span = answers[sample]
        ctx = [k for k, s in enumerate(seq) if s == 1]
        if span is not None and ctx:
            first, last = ctx[0], ctx[-1]
            start_char, end_char = span
            # The whole answer must lie in this window's context; a cut answer is "not here" (CLS).
            if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                # Last token starting at or before the answer's start; first token ending at or after its end.
                start_tok = max(k for k in ctx if offsets[k][0] <= start_char)
                end_tok = min(k for k in ctx if offsets[k][1] >= end_char)
        out["input_ids"].append(ids)
        if "token_type_ids" in out:
            out["token_type_ids"].append(enc["token_type_ids"][w])
        out["start_positions"].append(start_tok)
        out["end_positions"].append(end_tok)
        out["example"].append(sample)
        out["offsets"].append([list(o) for o in offsets])
        out["length"].append(len(ids))
    return out


def best_span(
    windows: Sequence[tuple[np.ndarray, np.ndarray, Sequence[Sequence[int]]]], context: str, *,
    n_best: int = 20, max_answer_length: int = 30, allow_unanswerable: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, Any]:
    """The answer of one question from the logits of all its windows.

    ``windows``: ``(start_logits (T,), end_logits (T,), offsets (T, 2))`` per window, offsets as from
    :func:`tokenize_windows` (padding positions beyond the offsets are ignored). Returns ``answer``,
    ``start``/``end`` (character offsets into ``context``, end exclusive; 0/0 for no answer), ``score``
    (softmax probability of the chosen candidate among the n-best, as ``utils_qa`` computes it),
    ``best_text`` / ``best_start`` / ``best_end`` (the best non-empty span, whatever the threshold) and
    ``null_score_diff`` (null score minus the best span's score; None without unanswerable questions).
    """
    candidates: list[tuple[float, int, int]] = []  # (score, char start, char end)
    null_score: float | None = None
    for start_logits, end_logits, offsets in windows:
        t = len(offsets)
        s_log, e_log = np.asarray(start_logits[:t], dtype=np.float64), np.asarray(end_logits[:t], dtype=np.float64)
        off = np.asarray(offsets, dtype=np.int64).reshape(t, 2)
        cls_score = float(s_log[0] + e_log[0])  # the CLS token is first for BERT-style inputs
        null_score = cls_score if null_score is None else min(null_score, cls_score)
        starts = np.argsort(s_log)[::-1][:n_best]  # (k,)
        ends = np.argsort(e_log)[::-1][:n_best]  # (k,)
        si, ei = np.meshgrid(starts, ends, indexing="ij")  # (k, k) every pairing
        ok = (off[si, 0] >= 0) & (off[ei, 0] >= 0) & (ei >= si) & (ei - si + 1 <= max_answer_length)
        for a, b in zip(si[ok].tolist(), ei[ok].tolist(), strict=True):
            candidates.append((float(s_log[a] + e_log[b]), int(off[a, 0]), int(off[b, 1])))
    candidates.sort(key=lambda c: -c[0])
    candidates = candidates[:n_best]
    pool = list(candidates)
    if allow_unanswerable and null_score is not None:
        pool.append((null_score, 0, 0))
    scores = np.array([c[0] for c in pool]) if pool else np.zeros(0)
    probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum() if len(pool) else scores
    best = candidates[0] if candidates else None
    result: dict[str, Any] = {
        "best_text": context[best[1]:best[2]] if best else "",
        "best_start": best[1] if best else 0, "best_end": best[2] if best else 0,
        "null_score_diff": None,
    }
    answer_null = best is None
    if allow_unanswerable and null_score is not None:
        diff = null_score - best[0] if best else float("inf")
        result["null_score_diff"] = diff
        answer_null = diff > null_score_diff_threshold
    if answer_null:
        null_prob = float(probs[-1]) if allow_unanswerable and len(pool) else 0.0
        result.update(answer="", start=0, end=0, score=null_prob)
    else:
        assert best is not None
        result.update(answer=context[best[1]:best[2]], start=best[1], end=best[2], score=float(probs[0]))
    return result
