"""Continuous batching for decoder runs (``lmtune serve --batching continuous``), on transformers' engine.

The window batcher (:mod:`lmtune.serve.batching`) runs a group of requests as one ``generate`` call that
lasts as long as its longest answer; a request arriving meanwhile waits for the whole call. Here every
request goes to transformers' ``ContinuousBatchingManager`` (``model.init_continuous_batching``): its
own thread decodes one step at a time for all running requests over a paged KV cache, a new request
joins at the next step, a finished one leaves at once (its cache pages are freed). Results come back per
request through ``register_result_handler`` (the callback runs on the event loop): no polling of a shared
queue.

The manager decodes greedily with one EOS list per request and a per-request ``max_new_tokens``. What it
does not do per request here (sampling, stop strings, repetition penalty, beam search, no-repeat n-grams)
is served by the window engine instead: :meth:`ContinuousGenerator.supports` says which requests come here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

from transformers import ContinuousBatchingConfig, GenerationConfig

from lmtune.models import generation

log = logging.getLogger("lmtune")

# KV-cache pages of 32 tokens: small pages waste little on short chat answers (a CPU has no kernel that
# needs 256-token pages, transformers' default).
PAGE_SIZE = 32
# Cache room per running request, in tokens: prompt + answer of a typical chat turn. Longer requests still
# run: the scheduler admits fewer at a time.
TOKENS_PER_REQUEST = 1024
# Most prompt tokens processed in one step (prefill chunks): larger chunks stall the decoding rows longer.
MAX_BATCH_TOKENS = 512


class ContinuousGenerator:
    """Greedy generation for many concurrent requests on one decoder, continuously batched.

    ``generator`` is the run's :class:`lmtune.models.text_generator.TextGenerator` (model, tokenizer,
    EOS ids); at most ``max_batch_size`` requests decode together, the others wait for a free row.
    """

    def __init__(self, generator: Any, *, max_batch_size: int) -> None:
        self.generator = generator
        self.tokenizer = generator.tokenizer
        model = generator.model
        self.eos_ids: list[int] = list(generator.eos_token_ids or _model_eos(model, self.tokenizer))
        pad = self.tokenizer.pad_token_id
        config = GenerationConfig(do_sample=False, eos_token_id=self.eos_ids,
                                  pad_token_id=pad if pad is not None else self.eos_ids[0])
        blocks = max(8, max_batch_size * TOKENS_PER_REQUEST // PAGE_SIZE)
        cb_config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE, num_blocks=blocks, max_batch_tokens=MAX_BATCH_TOKENS,
            max_requests_per_batch=max_batch_size,
            # CPU serving: no CUDA graphs, no double buffering (it doubles the cache for GPU overlap), no
            # switch to flash attention; prefix sharing off (answers must not depend on other requests).
            use_cuda_graph=False, use_async_batching=False, auto_switch_to_flash=False, allow_block_sharing=False,
        )
        model.eval()
        self.manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
        self._ids = itertools.count()
        self.running = 0
        """Requests added and not finished (``/metrics``-style count, read by tests)."""

    @staticmethod
    def supports(settings: Any) -> bool:
        """Whether a request with these :class:`~lmtune.models.generation.GenerationSettings` runs here
        (greedy, no stop strings, no penalties, no beams); others go to the window engine."""
        return (not settings.do_sample and not settings.stop and settings.repetition_penalty == 1.0
                and settings.num_beams == 1 and settings.no_repeat_ngram_size == 0)

    def start(self) -> None:
        """Start the manager's decoding thread."""
        # The manager's thread does not inherit the caller's inference mode: no_grad is set inside its loop.
        self.manager.start()

    def stop(self) -> None:
        """Stop decoding (running requests are failed) and free the cache."""
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=10, hard_stop=True)
        self.manager.destroy()

    async def generate(self, rendered: list[str], settings: Any) -> list[dict[str, Any]]:
        """One answer per rendered prompt, as :meth:`TextGenerator.generate` gives it
        (``text``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``)."""
        return list(await asyncio.gather(*(self._answer(p, settings) for p in rendered)))

    async def _answer(self, prompt: str, settings: Any) -> dict[str, Any]:
        info: dict[str, Any] = {}
        pieces = [piece async for piece in self._run(prompt, settings, info, streaming=False)]
        return {"text": "".join(pieces), **info}

    async def stream(self, rendered: str, settings: Any, info: dict[str, Any]) -> AsyncIterator[str]:
        """Text pieces of one answer as they are decoded; ``info`` gets finish_reason and token counts.
        Closing the iterator (a client that went away) cancels the request: its row is freed."""
        async for piece in self._run(rendered, settings, info, streaming=True):
            yield piece

    async def _run(self, prompt: str, settings: Any, info: dict[str, Any], *, streaming: bool) -> AsyncIterator[str]:
        prompt_ids = generation.encode_prompt(self.tokenizer, prompt)
        if not prompt_ids:
            raise ValueError("generate: the prompt is empty (no tokens)")
        request_id = f"lmtune-{next(self._ids)}"
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        # Registered before the request is added, so its first output cannot miss the handler.
        self.manager.register_result_handler(request_id, outputs.put_nowait)
        added = self.manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=settings.max_new_tokens,
                                         streaming=streaming, eos_token_id=self.eos_ids)
        if added is None:
            self._forget(request_id)
            raise RuntimeError("the continuous batching engine is not accepting requests (stopping)")
        self.running += 1
        finished = False
        sent = ""
        tokens: list[int] = []
        try:
            while not finished:
                output = await outputs.get()
                if output.error is not None:
                    raise RuntimeError(f"continuous batching failed on a request: {output.error}")
                finished = output.is_finished()
                tokens, reason = self._answer_tokens(output.generated_tokens, settings.max_new_tokens)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                # Hold back a trailing replacement char: a multi-byte character still being decoded.
                safe = text if finished else text.rstrip("\ufffd")
                if safe.startswith(sent) and len(safe) > len(sent):
                    yield safe[len(sent):]
                    sent = safe
            info.update(finish_reason=reason, prompt_tokens=len(prompt_ids),
                        completion_tokens=len(tokens) + 1 if reason == "stop" else len(tokens))  # the EOS counts
        finally:
            self.running -= 1
            if not finished:  # the client went away (or an error): free the row now
                self.manager.cancel_request(request_id)
                self._forget(request_id)

    def _answer_tokens(self, generated: list[int], max_new_tokens: int) -> tuple[list[int], str]:
        """The answer's tokens (up to the first EOS, which ends it) and the finish reason so far."""
        for i, token in enumerate(generated):
            if token in self.eos_ids:
                return generated[:i], "stop"
        return generated[:max_new_tokens], "length"

    def _forget(self, request_id: str) -> None:
        # The manager drops a handler only when its request finishes; a cancelled one would stay.
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)


def _model_eos(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids of the model's generation config, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError("the model has no EOS token: continuous batching needs one to end answers")
    return [int(i) for i in ids]

