"""How a saved relation model folder answers new inputs (``lmtune predict``, ``Run.predict``, the server).

An item is a pair ``{text, head: {start, end, type}, tail: {...}}``, a text with SemEval's ``<e1>`` /
``<e2>`` markers, or a document ``{text, entities: [{start, end, type}]}``. A pair gets one triple
``{head: {text, start, end, type}, relation, tail: {...}, score}`` (offsets into the text as given), a
document every triple of its ordered entity pairs whose relation is not the no-relation label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lmtune.tasks.relation_extraction.records as rec
from lmtune.data.readers import Table
from lmtune.errors import DataError
from lmtune.models.loading import load_for_prediction
from lmtune.tasks.relation_extraction.encoding import encode_pairs
from lmtune.tasks.relation_extraction.model import RelationModel

NOT_A_PAIR = ("a relation model takes {text, head: {start, end, type}, tail: {...}} pairs, texts with "
              "<e1>..</e1> <e2>..</e2>, or {text, entities: [...]} documents")


class RelationPredictor:
    """Relation triples with a saved relation-extraction model folder."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        self.meta = meta
        self.tokenizer, self.model, self.device = load_for_prediction(RelationModel, model_dir,
                                                                      what="the relation model", device=device)
        self.labels: list[str] = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.entity_types: list[str] = list(meta.get("entity_types") or [rec.UNTYPED])
        self.no_relation: str | None = meta.get("no_relation_label")
        self.max_length = int(meta.get("max_length") or 128)
        self.columns = {**rec.DEFAULT_COLUMNS, **(meta.get("columns") or {})}

    # -------------------------------------------------------------------------------- items -> pairs
    def _pairs(self, item: Any, source: str = "input", line: int = 0) -> tuple[str, list[tuple[rec.Span, rec.Span]]]:
        """(text, [(head, tail)]) of one item; DataError naming the field when it is malformed."""
        if isinstance(item, str):
            text, head, tail = rec.parse_inline(item, source, line, "text")
            return text, [(head, tail)]
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise DataError(NOT_A_PAIR, file=source, line=line or None, field="texts")
        text = item["text"]
        if "entities" in item:
            entities = item["entities"]
            if isinstance(entities, str):
                entities = json.loads(entities) if entities.strip() else []
            if not isinstance(entities, list):
                raise DataError("entities must be a list", file=source, line=line or None, field="entities")
            spans = [rec.read_span(e, text, source, line, "entities") for e in entities]
            pairs = [(h, t) for i, h in enumerate(spans) for j, t in enumerate(spans)
                     if i != j and not (h[0] < t[1] and t[0] < h[1])]
            return text, pairs
        head = rec.read_span(item.get("head"), text, source, line, "head")
        tail = rec.read_span(item.get("tail"), text, source, line, "tail")
        rec.check_pair(head, tail, source, line, "tail")
        return text, [(head, tail)]

    def _check_types(self, pairs: list[tuple[rec.Span, rec.Span]], source: str, line: int) -> None:
        for head, tail in pairs:
            for span, field in ((head, "head"), (tail, "tail")):
                if span[2] not in self.entity_types:
                    raise DataError(f"entity type '{span[2]}' is not one the model knows "
                                    f"({', '.join(self.entity_types)})", file=source, line=line or None, field=field)

    def check_item(self, item: Any) -> str | None:
        """Why ``item`` is not a pair, marked text or document this model takes, or None."""
        try:
            _, pairs = self._pairs(item)
            self._check_types(pairs, "input", 0)
        except DataError as exc:
            return exc.message
        return None

    # -------------------------------------------------------------------------------- scoring
    def probabilities(self, pairs: list[tuple[str, rec.Span, rec.Span]], *, batch_size: int = 32,
                      progress: Any = None) -> np.ndarray:
        """Relation probabilities (N, L); a pair whose entities do not fit ``max_length`` together gets NaN."""
        ids, _ = encode_pairs(self.tokenizer, pairs, self.max_length, self.entity_types)
        out = np.full((len(pairs), len(self.labels)), np.nan, dtype=np.float32)
        order = sorted((i for i, x in enumerate(ids) if x is not None), key=lambda i: -len(ids[i] or []))
        bar = progress.add_task("predict", total=len(order)) if progress is not None else None
        pad = self.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                width = max(len(ids[i] or []) for i in idx)
                batch = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    seq = ids[i] or []
                    batch[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                logits = self.model(input_ids=batch.to(self.device), attention_mask=mask.to(self.device)).logits
                out[idx] = torch.softmax(logits.float(), -1).cpu().numpy()
                if progress is not None:
                    progress.update(bar, advance=len(idx))
        return out

    def _triple(self, text: str, head: rec.Span, tail: rec.Span, probs: np.ndarray) -> dict[str, Any]:
        if np.isnan(probs).any():
            return {"head": _span(text, head), "relation": None, "tail": _span(text, tail), "score": None,
                    "skipped": "the entities lie further apart than the model's max_length allows"}
        k = int(probs.argmax())
        return {"head": _span(text, head), "relation": self.labels[k], "tail": _span(text, tail),
                "score": float(probs[k]), "probabilities": {n: float(p) for n, p in zip(self.labels, probs,
                                                                                        strict=True)}}

    def _answer(self, parsed: list[tuple[Any, str, list[tuple[rec.Span, rec.Span]]]], batch_size: int,
                progress: Any) -> list[dict[str, Any]]:
        flat = [(text, h, t) for _, text, pairs in parsed for h, t in pairs]
        probs = self.probabilities(flat, batch_size=batch_size, progress=progress)
        out, k = [], 0
        for item, text, pairs in parsed:
            triples = [self._triple(text, h, t, probs[k + n]) for n, (h, t) in enumerate(pairs)]
            k += len(pairs)
            if isinstance(item, dict) and "entities" in item:
                out.append({"relations": [{key: v for key, v in tr.items() if key != "probabilities"}
                                          for tr in triples if tr["relation"] not in (None, self.no_relation)]})
            else:
                out.append(triples[0])
        return out

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """One answer per item, in input order: a triple for a pair or marked text, ``{relations: [...]}``
        for a document."""
        parsed = []
        for n, item in enumerate(items):
            try:
                text, pairs = self._pairs(item)
                self._check_types(pairs, "input", 0)
            except DataError as exc:
                raise DataError(f"item {n + 1}: {exc.message}", field="texts") from None
            parsed.append((item, text, pairs))
        return self._answer(parsed, batch_size, progress)

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`predict` for every row of ``table``: text + head + tail columns, text + entities (documents), or
        a text column with inline markers; a bad cell is a DataError naming its line."""
        text_col = (columns or {}).get("text") or str(self.meta.get("text_column") or "text")
        if text_col not in table.columns:
            raise DataError(f"needs a '{text_col}' column; the columns are: "
                            f"{', '.join(repr(c) for c in table.columns)}", file=table.source,
                            hint="name the column with --text-column")
        cols = self.columns
        parsed = []
        for row, line in zip(table.rows, table.lines, strict=True):
            text = row.get(text_col)
            if not isinstance(text, str) or not text.strip():
                raise DataError("empty text", file=table.source, line=line, field=text_col)
            if cols["entities"] in table.columns:
                item: Any = {"text": text, "entities": row.get(cols["entities"])}
            elif cols["head"] in table.columns and cols["tail"] in table.columns:
                item = {"text": text, "head": _cell(row.get(cols["head"]), table.source, line, cols["head"]),
                        "tail": _cell(row.get(cols["tail"]), table.source, line, cols["tail"])}
            else:
                item = text
            text_, pairs = self._pairs(item, table.source, line)
            self._check_types(pairs, table.source, line)
            parsed.append((item, text_, pairs))
        return self._answer(parsed, batch_size, progress)


def _span(text: str, span: rec.Span) -> dict[str, Any]:
    return {"text": text[span[0]:span[1]], "start": span[0], "end": span[1], "type": span[2]}


def _cell(value: Any, source: str, line: int, field: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg}", file=source, line=line, field=field) from None
    return value
