"""How a saved classification model folder answers new inputs (``lmtune predict``, ``Run.predict``, the server)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from lmtune.data.features import clip_pairs, clip_text
from lmtune.data.readers import Table
from lmtune.errors import DataError
from lmtune.evaluate.metrics import classification_metrics
from lmtune.models import explain as attribution
from lmtune.models.loading import load_for_prediction
from lmtune.tasks.classification.labels import MULTI_LABEL_THRESHOLD, label_keys

log = logging.getLogger(__name__)

# Why an item is refused (the server answers 400 with it, after "item N: ").
NOT_TEXT = "a classifier takes texts (strings)"
NOT_TEXT_OR_PAIR = 'a classifier takes texts (strings) or {"text": str, "text_pair": str} items'


class ClassificationPredictor:
    """Batched prediction with a saved classification model folder (plain transformers files)."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        self.meta = meta
        self.tokenizer, self.model, self.device = load_for_prediction(
            AutoModelForSequenceClassification, model_dir, what="the classification model", device=device)
        self.labels: list[str] = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.multi_label = bool(meta.get("multi_label"))
        self.threshold = float(meta.get("threshold") or MULTI_LABEL_THRESHOLD)
        self.max_length = int(meta.get("max_length") or 512)

    # -------------------------------------------------------------------------------- the Predictor interface
    @property
    def takes_pairs(self) -> bool:
        """Whether the model was trained on text pairs (``{"text", "text_pair"}`` items apply)."""
        return bool(self.meta.get("text_pair_column"))

    def check_item(self, item: Any) -> str | None:
        """Why ``item`` is not a text (or, for a text-pair model, a ``{"text", "text_pair"}`` mapping), or None."""
        if isinstance(item, str):
            return None
        if not self.takes_pairs:
            if isinstance(item, dict) and "text_pair" in item:
                return "this model was trained on single texts: a text_pair does not apply (send the text alone)"
            return NOT_TEXT
        if isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("text", "text_pair")):
            return None
        return NOT_TEXT_OR_PAIR

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """Label(s), score and the probability map (:meth:`decode`) per item, in input order. An item is a
        text, or ``{"text", "text_pair"}`` for a text-pair model (a bare text then has no second text)."""
        texts, pairs = self._item_inputs(items)
        return self.decode(self.probabilities(texts, pairs, batch_size=batch_size, progress=progress))

    def _item_inputs(self, items: list[Any]) -> tuple[list[str], list[str] | None]:
        """The texts (and second texts) of predictor items; a refused item is a DataError naming it."""
        for n, item in enumerate(items):
            why = self.check_item(item)
            if why is not None:
                raise DataError(f"item {n + 1}: {why}", field="texts")
        texts = [item if isinstance(item, str) else item["text"] for item in items]
        pairs = None
        if any(isinstance(item, dict) for item in items):
            if not all(isinstance(item, dict) for item in items):
                raise DataError("give every item a text_pair, or none of them", field="texts")
            pairs = [item["text_pair"] for item in items]
        return texts, pairs

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`predict` for every row of ``table``: the text column (``columns["text"]``, else the one named
        in ``lmtune.json``, else ``text``) and, for a text-pair model, the second text column
        (``columns["text_pair"]``, else ``lmtune.json``'s); an empty cell is a DataError naming its line."""
        texts, pairs = self.table_inputs(table, columns)
        return self.decode(self.probabilities(texts, pairs, batch_size=batch_size, progress=progress))

    def table_inputs(self, table: Table, columns: dict[str, str | None] | None = None
                     ) -> tuple[list[str], list[str] | None]:
        """The texts (and second texts) of ``table``'s rows, read as :meth:`predict_table` reads them."""
        columns = columns or {}
        text_column = columns.get("text") or self.meta.get("text_column") or "text"
        pair_column = columns.get("text_pair") or self.meta.get("text_pair_column")
        texts = table.column(text_column)
        pairs = table.column(pair_column) if pair_column else None
        for values, col in ((texts, text_column), (pairs, pair_column)):
            if values is None:
                continue
            for v, line in zip(values, table.lines, strict=True):
                if v is None or (isinstance(v, float) and np.isnan(v)):
                    raise DataError("empty text", file=table.source, line=line, field=col)
        return [str(t) for t in texts], [str(t) for t in pairs] if pairs else None

    # -------------------------------------------------------------------------------- explanations
    def explain(self, items: list[Any], *, label: str | None = None, n_steps: int = attribution.DEFAULT_STEPS,
                batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`predict`'s rows, each with the token attributions (integrated gradients on the input
        embeddings, :mod:`lmtune.models.explain`) towards one label's log-odds: ``label`` when named, else the
        predicted label (multi-label: the most probable one).

        Each row gains ``attributions`` (per token: ``token``, ``start``/``end`` character offsets into the
        text, ``score`` in [-1, 1], positive for evidence for the label; ``segment`` 1 marks a second text's
        tokens), ``word_attributions`` (the same merged per word) and ``explained`` (``label``,
        ``score_change``: the label's log-odds on the text minus on the all-padding baseline, which the raw
        attributions add up to, and ``convergence_delta``: by how much they miss it)."""
        attribution.check_steps(n_steps)
        if label is not None and label not in self.labels:
            raise DataError(f"label '{label}' is not one the model knows ({', '.join(self.labels)})",
                            field="explain_label")
        texts, pairs = self._item_inputs(items)
        probs = self.probabilities(texts, pairs, batch_size=batch_size)
        rows = self.decode(probs)
        reference = attribution.reference_token_id(self.tokenizer)
        bar = progress.add_task("explain", total=len(texts)) if progress is not None else None
        for i, row in enumerate(rows):
            k = self.labels.index(label) if label is not None else int(probs[i].argmax())
            row.update(self._explain_one(texts[i], pairs[i] if pairs else None, k, reference, n_steps))
            if progress is not None:
                progress.update(bar, advance=1)
        return rows

    def explain_table(self, table: Table, *, columns: dict[str, str | None] | None = None,
                      label: str | None = None, n_steps: int = attribution.DEFAULT_STEPS, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`explain` for every row of ``table``, read as :meth:`predict_table` reads it."""
        texts, pairs = self.table_inputs(table, columns)
        items: list[Any] = ([{"text": t, "text_pair": p} for t, p in zip(texts, pairs, strict=True)] if pairs
                            else list(texts))
        return self.explain(items, label=label, n_steps=n_steps, batch_size=batch_size, progress=progress)

    def _explain_one(self, text: str, pair: str | None, k: int, reference: int, n_steps: int) -> dict[str, Any]:
        """The attribution fields of one text (and second text) towards label index ``k``."""
        side = self.tokenizer.truncation_side
        # Clipped as probabilities() clips (same tokens); offsets are moved back onto the whole texts.
        if pair is not None:
            (a,), (b,) = clip_pairs(self.tokenizer, [text], [pair], self.max_length)
        else:
            a, b = clip_text(text, self.max_length, side=side), None
        shifts = (len(text) - len(a) if side == "left" else 0,
                  len(pair) - len(b) if side == "left" and pair is not None and b is not None else 0)
        enc = self.tokenizer(a, b, truncation=True, max_length=self.max_length, return_tensors="pt",
                             return_offsets_mapping=True)
        if not enc.encodings:
            raise DataError("explanations need a fast tokenizer (character offsets); this model's is a slow one")
        offsets = enc.pop("offset_mapping")[0].tolist()
        segments = enc.sequence_ids(0)
        words = enc.word_ids(0)
        inputs = {key: value.to(self.device) for key, value in enc.items()}
        keep = torch.tensor([[s is None for s in segments]], device=self.device)  # special tokens stay
        result = attribution.integrated_gradients(
            self.model, inputs, lambda logits: attribution.log_odds(logits, k, multi_label=self.multi_label),
            keep=keep, reference_id=reference, n_steps=n_steps)
        spans = [None if s is None or start == end else (s, start + shifts[s], end + shifts[s], w)
                 for s, (start, end), w in zip(segments, offsets, words, strict=True)]
        originals = (text, pair or "")
        tokens, word_rows = attribution.describe(lambda s: originals[s], spans, result.scores)
        return {"attributions": tokens, "word_attributions": word_rows,
                "explained": {"label": self.labels[k], **attribution.summary(result)}}

    # -------------------------------------------------------------------------------- probabilities and labels
    def probabilities(
        self, texts: list[str], pairs: list[str] | None = None, *, batch_size: int = 64, progress: Any = None
    ) -> np.ndarray:
        """Class probabilities (N, L) in input order; batches are length-sorted for speed."""
        # Clipped before tokenising (same ids): a megabyte text costs what its first max_length tokens cost.
        if pairs:
            texts, pairs = clip_pairs(self.tokenizer, texts, pairs, self.max_length)
        else:
            texts = [clip_text(t, self.max_length, side=self.tokenizer.truncation_side) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        bar = progress.add_task("predict", total=len(texts)) if progress is not None else None
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None,
                    truncation=True, max_length=self.max_length, padding=True, return_tensors="pt",
                ).to(self.device)
                logits = self.model(**enc).logits.float()
                probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, -1)
                out[idx] = probs.cpu().numpy()
                if progress is not None:
                    progress.update(bar, advance=len(idx))
        return out

    def decode(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """Per-row results: label(s), score and the full probability map."""
        rows = []
        for p in probs:
            entry: dict[str, Any] = {"probabilities": {n: float(v) for n, v in zip(self.labels, p, strict=True)}}
            if self.multi_label:
                entry["labels"] = [n for n, v in zip(self.labels, p, strict=True) if v >= self.threshold]
            else:
                k = int(p.argmax())
                entry["label"] = self.labels[k]
                entry["score"] = float(p[k])
            rows.append(entry)
        return rows

    def targets(self, labels: list[Any], source: str, lines: list[int]) -> np.ndarray:
        """Label values from a file as indices (N,) or a 0/1 matrix (N, L); unknown labels are errors."""
        index = {n: i for i, n in enumerate(self.labels)}
        shape = (len(labels), len(self.labels)) if self.multi_label else (len(labels),)
        y: np.ndarray = np.zeros(shape, dtype=np.int64)
        for row, (value, line) in enumerate(zip(labels, lines, strict=True)):
            keys = label_keys(value, multi_label=self.multi_label, delimiter=self.meta.get("label_delimiter"))
            for key in keys:
                if key not in index:
                    raise DataError(f"label '{key}' is not one the model knows ({', '.join(self.labels)})",
                                    file=source, line=line, field=self.meta.get("label_column"))
                if self.multi_label:
                    y[row, index[key]] = 1
                else:
                    y[row] = index[key]
        return y

    def metrics(self, y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
        """The same metrics as training's evaluation."""
        if self.multi_label:
            pred = (probs >= self.threshold).astype(np.int64)
            return classification_metrics(y_true, pred, self.labels, probs=probs, multi_label=True)
        m = classification_metrics(y_true, probs.argmax(-1), self.labels, probs=probs)
        m["loss"] = float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1.0)).mean())
        return m
