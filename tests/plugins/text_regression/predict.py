"""How a saved text-regression model folder scores new texts (``lmtune predict``, ``Run.predict``, serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lmtune.data.table import Table
from lmtune.errors import DataError


class TextRegressionPredictor:
    """A score per text, batched, in input order."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        self.meta = meta
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        self.model.to(self.device).eval()
        self.max_length = int(meta.get("max_length") or 512)

    def check_item(self, item: Any) -> str | None:
        """A text-regression model takes texts."""
        return None if isinstance(item, str) and item.strip() else "a text-regression model takes non-empty texts"

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """``{"score": float}`` per text."""
        for i, item in enumerate(items):
            why = self.check_item(item)
            if why:
                raise DataError(f"item {i + 1}: {why}", field="input")
        scores: list[float] = []
        bar = progress.add_task("predict", total=len(items)) if progress is not None else None
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                enc = self.tokenizer(chunk, truncation=True, max_length=self.max_length, padding=True,
                                     return_tensors="pt").to(self.device)
                scores += self.model(**enc).logits.float().squeeze(-1).cpu().tolist()
                if progress is not None:
                    progress.update(bar, advance=len(chunk))
        return [{"score": s} for s in scores]

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """The same for a table's text column (``columns["text"]``, else the one trained on)."""
        column = (columns or {}).get("text") or self.meta.get("text_column") or "text"
        texts = table.column(column)
        for text, line in zip(texts, table.lines, strict=True):
            if not isinstance(text, str) or not text.strip():
                raise DataError("empty text", file=table.source, line=line, field=column)
        return self.predict(texts, batch_size=batch_size, progress=progress)
