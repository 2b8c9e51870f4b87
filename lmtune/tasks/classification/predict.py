"""How a saved classification model folder answers new inputs (``lmtune predict``, ``Run.predict``, the server)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lmtune.errors import DataError
from lmtune.tasks.classification.task import label_keys

log = logging.getLogger(__name__)

# Multi-label decisions: a label is on when its sigmoid probability passes this.
MULTI_LABEL_THRESHOLD = 0.5


class ClassificationPredictor:
    """Batched prediction with a saved classification model folder (plain transformers files)."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        self.meta = meta
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        self.model.to(self.device).eval()
        self.labels: list[str] = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.multi_label = bool(meta.get("multi_label"))
        self.threshold = float(meta.get("threshold") or MULTI_LABEL_THRESHOLD)
        self.max_length = int(meta.get("max_length") or 512)

    def probabilities(
        self, texts: list[str], pairs: list[str] | None = None, *, batch_size: int = 64, progress: Any = None
    ) -> np.ndarray:
        """Class probabilities (N, L) in input order; batches are length-sorted for speed."""
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
        from lmtune.evaluate.metrics import classification_metrics

        if self.multi_label:
            pred = (probs >= self.threshold).astype(np.int64)
            return classification_metrics(y_true, pred, self.labels, probs=probs, multi_label=True)
        m = classification_metrics(y_true, probs.argmax(-1), self.labels, probs=probs)
        m["loss"] = float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1.0)).mean())
        return m
