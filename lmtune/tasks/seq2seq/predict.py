"""Prediction for seq2seq model folders (both routes): ``Seq2SeqPredictor`` is what ``Run.predict``, ``lmtune
predict``, ``lmtune eval`` and the server use for a saved ``task: seq2seq`` model. Generation is the one
batched loop of :func:`lmtune.models.generation.generate` (encoder-decoders and decoders alike)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from lmtune.console import quiet_libraries
from lmtune.data.readers import Table
from lmtune.errors import DataError
from lmtune.models.generation import GenerationSettings, chat_prompt, generate
from lmtune.models.loading import load_saved_model
from lmtune.models.registry import load_padded_tokenizer
from lmtune.tasks.seq2seq.routes import clip_source


def is_blank(value: Any) -> bool:
    """A missing cell: None, NaN, or text of only whitespace."""
    return value is None or (isinstance(value, float) and np.isnan(value)) or (
        isinstance(value, str) and not value.strip())


class Seq2SeqPredictor:
    """A saved seq2seq model folder turning source texts into target texts (either route)."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        quiet_libraries()
        self.meta = meta
        self.route = str(meta.get("route", "encoder_decoder"))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_padded_tokenizer(model_dir)
        model_class = AutoModelForCausalLM if self.route == "decoder" else AutoModelForSeq2SeqLM
        self.model = load_saved_model(model_class, model_dir, error="cannot load the seq2seq model", dtype=torch.float32)
        self.model = self.model.to(self.device).eval()
        known = set(GenerationSettings.__dataclass_fields__)
        self.settings = GenerationSettings(**{k: v for k, v in (meta.get("generation") or {}).items() if k in known})
        self.source_column = str(meta.get("source_column") or "source")

    def _prompt(self, source: str) -> str:
        m = self.meta
        user = str(m["prompt_template"]).format(source=source, source_language=m.get("source_language") or "",
                                                target_language=m.get("target_language") or "")
        system = m.get("system_prompt")
        return chat_prompt(self.tokenizer, ([{"role": "system", "content": system}] if system else [])
                           + [{"role": "user", "content": user}])

    def check_item(self, item: Any) -> str | None:
        """Why ``item`` is not a source text (a sentence for a 400 answer), or None; an empty text is
        refused by :meth:`predict` (a DataError naming the source)."""
        return None if isinstance(item, str) else "a 'seq2seq' model takes texts (strings)"

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None,
                settings: GenerationSettings | None = None) -> list[dict[str, Any]]:
        """``{"text", "finish_reason", "source_tokens", "generated_tokens", "source_truncated"}`` per source text,
        in input order. A decoder-route summarizer cuts a long source at the end as its training did
        (``source_token_budget`` in ``lmtune.json``); ``source_truncated`` says whether it was cut."""
        for i, s in enumerate(items):
            if not isinstance(s, str) or not s.strip():
                raise DataError(f"source {i + 1} is {'empty' if isinstance(s, str) else type(s).__name__}, "
                                "not text", field="sources")
        settings = dataclasses.replace(settings or self.settings, batch_size=batch_size)
        if self.route != "decoder":
            first_eos = (self.meta.get("eos_token_ids") or [None])[0]
            out = generate(self.model, self.tokenizer, list(items), settings, progress=progress,
                           max_length=int(self.meta.get("max_length") or 512),
                           eos_token_ids=None if first_eos is None else [int(first_eos)])
            cut = [False] * len(items)
        else:
            budget = self.meta.get("source_token_budget")
            clipped = [clip_source(self.tokenizer, s, int(budget)) if budget else (s, False) for s in items]
            cut = [c for _, c in clipped]
            out = generate(self.model, self.tokenizer, [self._prompt(s) for s, _ in clipped], settings,
                           progress=progress, eos_token_ids=self.meta.get("eos_token_ids") or None)
        return [{"text": r["text"].strip(), "finish_reason": r["finish_reason"], "source_tokens": r["prompt_tokens"],
                 "generated_tokens": r["completion_tokens"], "source_truncated": c} for r, c in zip(out, cut, strict=True)]

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None, settings: GenerationSettings | None = None) -> list[dict[str, Any]]:
        """Outputs for the rows of a table, reading the source column (``columns["text"]`` overrides);
        each result is ``{"generated", "finish_reason", "source_tokens", "generated_tokens"}``. ``settings``
        replace the generation settings saved with the model (``lmtune predict --max-new-tokens`` ...)."""
        column = (columns or {}).get("text") or (self.source_column if self.source_column in table.columns else
                                                 "text" if "text" in table.columns else self.source_column)
        values = table.column(column)
        for v, line in zip(values, table.lines, strict=True):
            if is_blank(v):
                raise DataError("empty source", file=table.source, line=line, field=column)
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise DataError(f"expected text, found {type(v).__name__}", file=table.source, line=line, field=column)
        results = self.predict([str(v) for v in values], batch_size=batch_size, progress=progress, settings=settings)
        return [{"generated": r.pop("text"), **r} for r in results]
