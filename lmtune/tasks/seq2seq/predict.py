"""Generation and prediction for seq2seq model folders (both routes): ``generate_seq2seq`` runs an
encoder-decoder's ``generate`` in batches; ``Seq2SeqPredictor`` is what ``Run.predict``, ``lmtune
predict`` and ``lmtune eval`` use for a saved ``task: seq2seq`` model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import AutoModelForSeq2SeqLM

from lmtune.errors import DataError, ModelError

if TYPE_CHECKING:
    from lmtune.models.generation import GenerationSettings


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def generate_seq2seq(model: Any, tokenizer: Any, sources: list[str], settings: GenerationSettings, *,
                     max_length: int, eos_token_id: int | None = None, progress: Any = None) -> list[dict[str, Any]]:
    """One output per source from an encoder-decoder, batched (longest first), results in input order.

    Each result is ``{"text", "finish_reason", "source_tokens", "generated_tokens"}``; ``finish_reason``
    is ``"stop"`` when the end token was generated, ``"length"`` at ``max_new_tokens``. Sources are cut
    to ``max_length`` tokens. Sampling is seeded on a forked RNG; beam search, length penalty and
    n-gram blocking come from ``settings``; its ``stop`` strings cut the decoded text (``"stop"``).
    """
    from lmtune.models.generation import _find_stop, _generate_kwargs, _rng_devices

    if not sources:
        return []
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    eos_ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos or []]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    encoded = [tokenizer(s, truncation=True, max_length=max_length)["input_ids"] for s in sources]
    order = sorted(range(len(sources)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    kwargs = _generate_kwargs(settings, eos_ids, pad)
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is not None:
        kwargs["decoder_start_token_id"] = start
    results: list[dict[str, Any] | None] = [None] * len(sources)
    task = progress.add_task("generate", total=len(sources)) if progress is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(settings.seed)
            for begin in range(0, len(order), settings.batch_size):
                rows = order[begin : begin + settings.batch_size]
                width = len(encoded[rows[0]])
                input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, S)
                mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, S)
                for b, i in enumerate(rows):
                    input_ids[b, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[b, : len(encoded[i])] = 1
                out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
                for b, i in enumerate(rows):
                    tokens = out[b].tolist()  # (1 + new): the decoder start token, then the output
                    if start is not None and tokens and tokens[0] == start:
                        tokens = tokens[1:]
                    end = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
                    kept = tokens if end is None else tokens[:end]
                    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                    # Stop strings cut the decoded text (generate has no stopping criterion for them here).
                    cut = _find_stop(text, settings.stop) if settings.stop else None
                    results[i] = {"text": text if cut is None else text[:cut].rstrip(),
                                  "finish_reason": "length" if end is None and cut is None else "stop",
                                  "source_tokens": len(encoded[i]),
                                  "generated_tokens": len(kept) + (end is not None)}
                if progress is not None and task is not None:
                    progress.advance(task, len(rows))
    finally:
        if was_training:
            model.train()
    return [r for r in results if r is not None]


class Seq2SeqPredictor:
    """A saved seq2seq model folder turning source texts into target texts (either route)."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], device: str | None = None) -> None:
        from transformers import AutoModelForCausalLM

        from lmtune.console import quiet_libraries
        from lmtune.models.generation import GenerationSettings
        from lmtune.models.registry import load_padded_tokenizer

        quiet_libraries()
        self.meta = meta
        self.route = str(meta.get("route", "encoder_decoder"))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_padded_tokenizer(model_dir)
        model_class = AutoModelForCausalLM if self.route == "decoder" else AutoModelForSeq2SeqLM
        try:
            self.model = model_class.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the seq2seq model: {exc}", file=model_dir) from None
        self.model = self.model.to(self.device).eval()  # type: ignore[arg-type]
        known = set(GenerationSettings.__dataclass_fields__)
        self.settings = GenerationSettings(**{k: v for k, v in (meta.get("generation") or {}).items() if k in known})
        self.source_column = str(meta.get("source_column") or "source")

    def _prompt(self, source: str) -> str:
        from lmtune.models.generation import chat_prompt

        m = self.meta
        user = str(m["prompt_template"]).format(source=source, source_language=m.get("source_language") or "",
                                                target_language=m.get("target_language") or "")
        system = m.get("system_prompt")
        return chat_prompt(self.tokenizer, ([{"role": "system", "content": system}] if system else [])
                           + [{"role": "user", "content": user}])

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None,
                settings: GenerationSettings | None = None) -> list[dict[str, Any]]:
        """``{"text", "finish_reason", "source_tokens", "generated_tokens"}`` per source text, in input order."""
        import dataclasses

        from lmtune.models.generation import generate

        for i, s in enumerate(items):
            if not isinstance(s, str) or not s.strip():
                raise DataError(f"source {i + 1} is {'empty' if isinstance(s, str) else type(s).__name__}, "
                                "not text", field="sources")
        settings = dataclasses.replace(settings or self.settings, batch_size=batch_size)
        if self.route != "decoder":
            return generate_seq2seq(self.model, self.tokenizer, list(items), settings,
                                    max_length=int(self.meta.get("max_length") or 512),
                                    eos_token_id=(self.meta.get("eos_token_ids") or [None])[0], progress=progress)
        out = generate(self.model, self.tokenizer, [self._prompt(s) for s in items], settings, progress=progress,
                       eos_token_ids=self.meta.get("eos_token_ids") or None)
        return [{"text": r["text"].strip(), "finish_reason": r["finish_reason"], "source_tokens": r["prompt_tokens"],
                 "generated_tokens": r["completion_tokens"]} for r in out]

    def predict_table(self, table: Any, *, columns: dict[str, str] | None = None, batch_size: int = 32,
                      progress: Any = None, settings: GenerationSettings | None = None) -> list[dict[str, Any]]:
        """Outputs for the rows of a table, reading the source column (``columns["text"]`` overrides);
        each result is ``{"generated", "finish_reason", "source_tokens", "generated_tokens"}``. ``settings``
        replace the generation settings saved with the model (``lmtune predict --max-new-tokens`` ...)."""
        column = (columns or {}).get("text") or (self.source_column if self.source_column in table.columns else
                                                 "text" if "text" in table.columns else self.source_column)
        values = table.column(column)
        for v, line in zip(values, table.lines, strict=True):
            if _is_blank(v):
                raise DataError("empty source", file=table.source, line=line, field=column)
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise DataError(f"expected text, found {type(v).__name__}", file=table.source, line=line, field=column)
        results = self.predict([str(v) for v in values], batch_size=batch_size, progress=progress, settings=settings)
        return [{"generated": r.pop("text"), **r} for r in results]
