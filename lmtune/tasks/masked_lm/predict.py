"""How a saved masked_lm model folder answers new inputs (``lmtune predict``, ``Run.predict``, ``/v1/fill-mask``):
the likeliest fillers of each mask token in a text, as transformers' ``fill-mask`` pipeline gives them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForMaskedLM

from lmtune.data.features import clip_text
from lmtune.data.readers import Table
from lmtune.errors import DataError, ModelError
from lmtune.models.loading import load_for_prediction


class FillMaskPredictor:
    """Fillers for the mask tokens of texts, with a saved masked-language-model folder."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        self.meta = meta
        self.tokenizer, self.model, self.device = load_for_prediction(
            AutoModelForMaskedLM, model_dir, what="the masked language model", device=device)
        if self.tokenizer.mask_token is None:
            raise ModelError("the tokenizer has no mask token", file=model_dir)
        self.mask_token: str = self.tokenizer.mask_token
        self.top_k = int(meta.get("top_k") or 5)
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = min(int(meta.get("max_length") or 512), int(positions))
        # WordPiece marks a word's later pieces ("##ing"): a filler that continues a word is written without it.
        model = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
        self.continuing = getattr(model, "continuing_subword_prefix", None) or None

    def check_item(self, item: Any) -> str | None:
        """Why ``item`` is not a text holding the mask token (a sentence for a 400 answer), or None."""
        if not isinstance(item, str):
            return f"a 'masked_lm' model takes texts with {self.mask_token} where a word is missing, " \
                   f"found {type(item).__name__}"
        if self.mask_token not in item:
            return f"no {self.mask_token} in the text: write {self.mask_token} where the model should fill in a token"
        return None

    def _text(self, token_id: int) -> str:
        text = str(self.tokenizer.decode([token_id])).strip()
        if self.continuing and text.startswith(self.continuing):
            text = text[len(self.continuing):]
        return text

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """Per text: ``masks`` (per mask token, in order: ``fillers``, the ``top_k`` likeliest tokens as
        ``{"token", "text", "score"}``) and ``text`` with each mask replaced by its best filler. A mask that the
        model's ``max_length`` cuts off gets no fillers (and stays in ``text``)."""
        for i, item in enumerate(items):
            why = self.check_item(item)
            if why is not None:
                raise DataError(why, field="texts", hint=f"item {i + 1}")
        texts = [clip_text(str(t), self.max_length) for t in items]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # longest first: least padding
        fills: list[list[list[dict[str, Any]]]] = [[] for _ in texts]
        bar = progress.add_task("predict", total=len(texts)) if progress is not None else None
        mask_id = self.tokenizer.mask_token_id
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                enc = self.tokenizer([texts[i] for i in chunk], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits  # (B, T, vocab)
                probs = torch.softmax(logits.float(), dim=-1)
                top, ids = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)  # (B, T, k)
                for row, i in enumerate(chunk):
                    positions = (enc["input_ids"][row] == mask_id).nonzero()[:, 0].tolist()
                    fills[i] = [[{"token": self.tokenizer.convert_ids_to_tokens(int(t)), "text": self._text(int(t)),
                                  "score": float(p)} for p, t in zip(top[row, pos].tolist(), ids[row, pos].tolist(),
                                                                      strict=True)]
                                for pos in positions]
                if progress is not None:
                    progress.update(bar, advance=len(chunk))
        out = []
        for item, masks in zip(items, fills, strict=True):
            pieces = str(item).split(self.mask_token)
            filled = pieces[0]
            for k, rest in enumerate(pieces[1:]):
                filled += (masks[k][0]["text"] if k < len(masks) else self.mask_token) + rest
            out.append({"text": filled, "masks": [{"fillers": f} for f in masks]})
        return out

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`predict` for every row of ``table``: its text column (``columns["text"]``, else the training
        text column, else ``text``); each result is ``{"filled", "masks"}``. An empty cell, or one without the mask
        token, is a DataError naming file, line and column."""
        given = (columns or {}).get("text")
        column = given or next((c for c in (str(self.meta.get("text_column") or "text"), "text")
                                if c in table.columns), "text")
        texts: list[str] = []
        for value, line in zip(table.column(column), table.lines, strict=True):
            if not isinstance(value, str) or not value.strip():
                raise DataError("empty text" if value is None or isinstance(value, str) else
                                f"expected text, found {type(value).__name__}", file=table.source, line=line,
                                field=column)
            why = self.check_item(value)
            if why is not None:
                raise DataError(why, file=table.source, line=line, field=column)
            texts.append(value)
        results = self.predict(texts, batch_size=batch_size, progress=progress)
        return [{"filled": r["text"], "masks": r["masks"]} for r in results]
