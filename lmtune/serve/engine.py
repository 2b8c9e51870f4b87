"""The model behind the server: a loaded run, its one worker thread and the batcher that feeds it.

Decoder runs answer through :class:`lmtune.models.text_generator.TextGenerator` (batched
``lmtune.models.generation.generate``; ``stream_text`` for streaming); every other task through its
registered predictor (``Predictor.predict``, as ``Run.predict``), ``/v1/classify`` through the label
scorer's class probabilities.

A model call whose clients have all gone stops at the end of its current batch of rows (generation: within
a decoding step): the predictors and ``generate`` report each finished batch (and ``generate`` each step)
to a rich-``Progress``-like object (``add_task``, ``update``, ``advance``), and the one the server passes
(:class:`StopWhenAbandoned`) raises there instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any, cast

from lmtune.models import generation
from lmtune.serve.batching import Abandoned, Batcher, ModelWorker
from lmtune.serve.continuous import ContinuousGenerator
from lmtune.serve.options import ServeOptions
from lmtune.tasks.base import Explainer
from lmtune.workflows.run import LabelScorer, Run

log = logging.getLogger("lmtune")


class StopWhenAbandoned:
    """Stands where model calls expect a rich ``Progress``: each finished batch of rows is reported to it,
    and it raises :class:`Abandoned` there once every request of the call has gone (its clients left)."""

    def __init__(self, abandoned: Callable[[], bool]) -> None:
        self.abandoned = abandoned

    def _check(self) -> None:
        if self.abandoned():
            raise Abandoned

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        """Called before the first batch."""
        self._check()
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Called after a batch (the predictors)."""
        self._check()

    def advance(self, *args: Any, **kwargs: Any) -> None:
        """Called after a batch and at every decoding step (``generation.generate``): a generation whose
        clients all left stops within a step."""
        self._check()


class Engine:
    """A loaded run plus the worker thread and batcher; all model work goes through here."""

    def __init__(self, run: Run, options: ServeOptions) -> None:
        self.run = run
        self.options = options
        self.task = run.task
        self.info = run.info
        self.generative = run.generative
        self.model_id = options.model_name or run.path.resolve().name
        # Loaded now, in the starting thread: the first request should not pay for it.
        self.loaded: Any = run.generator() if self.generative else run.predictor()
        self.worker = ModelWorker()
        self.batcher = Batcher(self._run_batch, self.worker, max_batch_size=options.max_batch_size,
                               wait_ms=options.batch_wait_ms)
        self._alone = 0  # counter making the batch keys of "alone" requests unique
        # --batching continuous: greedy decoder requests go to transformers' continuous batching; the rest
        # (sampling, stop strings, penalties, beams; encoder-decoders) keep the window batcher.
        decoder = self.generative and not getattr(self.loaded.model.config, "is_encoder_decoder", False)
        self.continuous = (ContinuousGenerator(self.loaded, max_batch_size=options.max_batch_size)
                           if options.batching == "continuous" and decoder else None)

    async def start(self) -> None:
        """Start the batcher on the running loop (and the continuous batching thread)."""
        self.batcher.start()
        if self.continuous is not None:
            self.continuous.start()

    async def stop(self) -> None:
        """Stop batching and the worker."""
        await self.batcher.stop()
        self.worker.shutdown()
        if self.continuous is not None:
            self.continuous.stop()

    # ------------------------------------------------------------------------------------ batched calls
    async def generate(self, rendered: list[str], settings: Any, *, alone: bool = False) -> list[dict[str, Any]]:
        """One answer per rendered prompt, batched with concurrent requests of the same settings.

        ``alone``: run in a batch of its own (sampling with a caller's seed: the same request then
        gives the same answers whatever else is being served).
        """
        if self.continuous is not None and self.continuous.supports(settings):
            return await self.continuous.generate(rendered, settings)
        key: tuple[Any, ...] = ("generate", json.dumps(dataclasses.asdict(settings), sort_keys=True))
        if alone:
            self._alone += 1
            key = (*key, self._alone)
        return await self.batcher.submit(key, settings, rendered)

    async def classify(self, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        """Labels and probabilities per text, with optional second texts (label scorers: ``/v1/classify``)."""
        items = list(zip(texts, pairs, strict=True)) if pairs is not None else [(t, None) for t in texts]
        return await self.batcher.submit(("classify", pairs is not None), None, items)

    async def explain(self, items: list[Any], label: str | None, n_steps: int) -> list[dict[str, Any]]:
        """Predictions with token attributions per item (an ``Explainer`` predictor: ``/v1/classify`` with
        ``explain``), batched with concurrent requests of the same label and steps."""
        return await self.batcher.submit(("explain", label, n_steps), None, items)

    async def predict(self, items: list[Any]) -> list[dict[str, Any]]:
        """The task predictor's answer per item (labels, entities, answer spans, generated texts ...)."""
        return await self.batcher.submit(("predict",), None, items)

    def _run_batch(self, key: Hashable, context: Any, items: list[Any], abandoned: Callable[[], bool]) -> list[Any]:
        """Worker thread: one model call for the items of all requests batched under ``key``; it stops
        between batches of rows once ``abandoned()`` (every request of it has gone)."""
        kind = key[0]  # type: ignore[index]
        watch = StopWhenAbandoned(abandoned)
        # One forward pass per batch: the batch is what the batcher collected, capped at max_batch_size
        # rows for generation (one request may hold up to max_items x n prompts), at 64 texts otherwise.
        if kind == "generate":
            settings = dataclasses.replace(context, batch_size=min(len(items), self.options.max_batch_size))
            return list(self.loaded.generate(items, settings, progress=watch))
        rows = min(len(items), max(64, self.options.max_batch_size))
        if kind == "classify":
            texts = [t for t, _ in items]
            pairs = [p for _, p in items] if key[1] else None  # type: ignore[index]
            p = cast(LabelScorer, self.loaded)
            return list(p.decode(p.probabilities(texts, pairs, batch_size=rows, progress=watch)))
        if kind == "predict":
            return list(self.loaded.predict(items, batch_size=rows, progress=watch))
        if kind == "explain":
            label: str | None = key[1]  # type: ignore[index]
            n_steps: int = key[2]  # type: ignore[index]
            explainer = cast(Explainer, self.loaded)
            return list(explainer.explain(items, label=label, n_steps=n_steps, batch_size=rows, progress=watch))
        raise ValueError(f"unknown batch kind {kind!r}")

    # ------------------------------------------------------------------------------------ streaming
    async def stream(self, rendered: str, settings: Any, info: dict[str, Any]) -> AsyncIterator[str]:
        """Text pieces of one answer as they are generated (not batched: runs alone in the worker).

        ``info`` receives finish_reason and token counts when the answer ends. Closing the iterator
        (a client that went away) stops generation.
        """
        if self.continuous is not None and self.continuous.supports(settings):
            pieces = self.continuous.stream(rendered, settings, info)
            try:
                async for piece in pieces:
                    yield piece
            finally:
                await pieces.aclose()  # type: ignore[attr-defined]  # cancels the request: its row is freed
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()
        g = self.loaded

        def put(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us (server shutdown)
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def job() -> None:
            try:
                if cancel.is_set():
                    return
                pieces = generation.stream_text(g.model, g.tokenizer, rendered, settings, eos_token_ids=g.eos_token_ids,
                                     info=info)
                try:
                    for piece in pieces:
                        put("piece", piece)
                        if cancel.is_set():
                            break
                finally:
                    pieces.close()  # type: ignore[attr-defined]  # a generator: stops the generation thread
                put("end", None)
            except Exception as exc:
                put("error", exc)

        done = self.worker.call(job)
        task = asyncio.ensure_future(done)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            cancel.set()
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
