"""How a saved question_answering model folder answers new inputs (``lmtune predict``, ``Run.predict``, the server)."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering

from lmtune.data.features import PaddingCollator, clip_text
from lmtune.data.readers import Table
from lmtune.errors import DataError
from lmtune.models.loading import load_for_prediction
from lmtune.tasks.question_answering.spans import best_span, tokenize_windows
from lmtune.tasks.question_answering.task import resolved_stride

log = logging.getLogger(__name__)

# Why an item is refused (the server answers 400 with it, after "item N: ").
NOT_QA_ITEM = 'a QA item is {"question": str, "context": str}'


class QuestionAnsweringPredictor:
    """Answers ``{"question", "context"}`` items with a saved QA model folder (plain transformers files)."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        self.meta = meta
        self.tokenizer, self.model, self.device = load_for_prediction(
            AutoModelForQuestionAnswering, model_dir, what="the question-answering model", device=device)
        self.tokenizer.padding_side = "right"
        self.max_length = int(meta.get("max_length") or 384)
        self.stride = resolved_stride(self.max_length, meta.get("doc_stride"))
        self.max_answer_length = int(meta.get("max_answer_length") or 30)
        self.n_best = int(meta.get("n_best_size") or 20)
        self.allow_unanswerable = bool(meta.get("allow_unanswerable"))
        self.threshold = float(meta.get("null_score_diff_threshold") or 0.0)
        self._collate = PaddingCollator({"input_ids": self.tokenizer.pad_token_id, "token_type_ids": 0})
        # Question tokens a window holds beside at least doc_stride + 1 context tokens (training skips longer ones;
        # the tokenizer cannot cut such a pair into windows at all).
        self.question_room = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=True) - self.stride - 1

    def check_item(self, item: Any) -> str | None:
        """Why ``item`` is not a ``{"question": str, "context": str}`` mapping, or None."""
        if isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("question", "context")):
            return self.too_long_message() if self._too_long([item["question"].lstrip()])[0] else None
        return NOT_QA_ITEM

    def too_long_message(self) -> str:
        """Why a question is refused when it leaves no room for the context."""
        return (f"the question is too long: a window of {self.max_length} tokens (doc_stride {self.stride}) leaves "
                f"room for {max(self.question_room, 0)} question tokens")

    def _too_long(self, questions: list[str]) -> list[bool]:
        """Per question, whether it has more tokens than a window leaves it (counted on the question clipped
        before tokenising: a megabyte question is refused without tokenising it whole)."""
        room = max(self.question_room, 0)
        clipped = [clip_text(q, room + 1) for q in questions]
        return [len(ids) > room for ids in self.tokenizer(clipped, add_special_tokens=False)["input_ids"]]

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None,
                source: str | None = None, lines: list[int] | None = None) -> list[dict[str, Any]]:
        """One ``{"answer", "start", "end", "score"}`` per item, in input order: ``start``/``end`` are
        character offsets into the context (``context[start:end] == answer``); an empty answer (0/0) means
        "no answer" (models trained with unanswerable questions). ``score``: the candidate's probability
        among the n-best spans."""
        questions, contexts = [], []
        for n, item in enumerate(items):
            line = lines[n] if lines else None
            if not isinstance(item, dict):
                raise DataError(f"item {n + 1} is {type(item).__name__}; expected a mapping with 'question' and "
                                "'context'", file=source, line=line)
            for key in ("question", "context"):
                value = item.get(key)
                if not isinstance(value, str) or not value.strip():
                    what = "missing" if value is None else ("empty" if isinstance(value, str) else
                                                            f"{type(value).__name__}, not text")
                    raise DataError(f"{key} is {what}" + ("" if source else f" (item {n + 1})"), file=source,
                                    line=line, field=key)
            questions.append(item["question"].lstrip())
            contexts.append(item["context"])
        if not items:
            return []
        for n, too_long in enumerate(self._too_long(questions)):
            if too_long:
                raise DataError(self.too_long_message() + ("" if source else f" (item {n + 1})"), file=source,
                                line=lines[n] if lines else None, field="question")
        win = tokenize_windows(self.tokenizer, questions, contexts, [None] * len(items), max_length=self.max_length,
                               stride=self.stride)
        fields = [k for k in ("input_ids", "token_type_ids") if k in win]
        order = sorted(range(len(win["input_ids"])), key=lambda w: -win["length"][w])
        logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        bar = progress.add_task("predict", total=len(order)) if progress is not None else None
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                batch = self._collate([{k: win[k][w] for k in fields} for w in idx])
                out = self.model(**{k: v.to(self.device) for k, v in batch.items()})
                for row, w in enumerate(idx):
                    n = win["length"][w]
                    logits[w] = (out.start_logits[row, :n].float().cpu().numpy(),
                                 out.end_logits[row, :n].float().cpu().numpy())
                if progress is not None:
                    progress.update(bar, advance=len(idx))
        per_item: dict[int, list[int]] = defaultdict(list)
        for w, ex in enumerate(win["example"]):
            per_item[ex].append(w)
        results = []
        for i, context in enumerate(contexts):
            spans = [(logits[w][0], logits[w][1], win["offsets"][w]) for w in per_item[i]]
            r = best_span(spans, context, n_best=self.n_best, max_answer_length=self.max_answer_length,
                          allow_unanswerable=self.allow_unanswerable, null_score_diff_threshold=self.threshold)
            results.append({"answer": r["answer"], "start": r["start"], "end": r["end"], "score": r["score"]})
        return results

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`predict` for every row of ``table``, reading the question and context columns named in
        ``lmtune.json`` (``columns``: ``{"question": ..., "context": ...}``; ``text`` names the question)."""
        columns = columns or {}
        q_col = columns.get("question") or columns.get("text") or self.meta.get("question_column") or "question"
        c_col = columns.get("context") or self.meta.get("context_column") or "context"
        items = [{"question": q, "context": c} for q, c in zip(table.column(q_col), table.column(c_col), strict=True)]
        for item in items:
            for key in ("question", "context"):
                if item[key] is not None and not isinstance(item[key], str):
                    item[key] = None if isinstance(item[key], float) and np.isnan(item[key]) else str(item[key])
        try:
            return self.predict(items, batch_size=batch_size, progress=progress, source=table.source,
                                lines=table.lines)
        except DataError as exc:
            exc.field = {"question": q_col, "context": c_col}.get(exc.field or "", exc.field)
            raise
