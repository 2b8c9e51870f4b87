"""The model behind the server: a loaded run, its one worker thread and the batcher that feeds it.

Decoder runs answer through :class:`lmtune.models.text_generator.TextGenerator` (batched
``lmtune.models.generation.generate``; ``stream_text`` for streaming); every other task through its
registered predictor (``Predictor.predict``, as ``Run.predict``), ``/v1/classify`` through the label
scorer's class probabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from typing import Any, cast

from lmtune.errors import ConfigError
from lmtune.models import generation
from lmtune.serve.batching import Batcher, ModelWorker
from lmtune.workflows.run import LabelScorer, Run

log = logging.getLogger("lmtune")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeOptions:
    """How ``lmtune serve`` listens and what it accepts (every limit answers 4xx in the OpenAI error shape)."""

    host: str = "127.0.0.1"
    """Address to bind: loopback by default; another address exposes the model to the network."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """With a key, every endpoint but /health (and the page's static files) needs ``Authorization: Bearer KEY``."""
    max_batch_size: int = 16
    """Most items (prompts x n, texts) run together on the model."""
    batch_wait_ms: float = 5.0
    """How long the first request of a quiet moment waits for others to batch with."""
    max_tokens_limit: int = 1024
    """Largest ``max_tokens`` a request may ask for."""
    max_n: int = 8
    """Largest ``n`` (answers per prompt)."""
    max_items: int = 64
    """Most prompts (completions) or texts/items (classify, predict) in one request."""
    max_body_bytes: int = 1_000_000
    """Largest request body; larger bodies get 413."""
    model_name: str | None = None
    """The model id in /v1/models and answers (default: the run folder's name)."""

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_batch_size": self.max_batch_size >= 1,
            "batch_wait_ms": 0 <= self.batch_wait_ms <= 1000,
            "max_tokens_limit": self.max_tokens_limit >= 1,
            "max_n": self.max_n >= 1,
            "max_items": self.max_items >= 1,
            "max_body_bytes": self.max_body_bytes >= 1024,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"serve option {bad[0]} = {getattr(self, bad[0])!r} is out of range",
                              field=bad[0], hint="port 0-65535, batch_wait_ms 0-1000, max_body_bytes >= 1024, "
                              "the other limits >= 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty", field="api_key")

    @property
    def loopback(self) -> bool:
        """Whether the server is reachable from this machine only."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")


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

    async def start(self) -> None:
        """Start the batcher on the running loop."""
        self.batcher.start()

    async def stop(self) -> None:
        """Stop batching and the worker."""
        await self.batcher.stop()
        self.worker.shutdown()

    # ------------------------------------------------------------------------------------ batched calls
    async def generate(self, rendered: list[str], settings: Any, *, alone: bool = False) -> list[dict[str, Any]]:
        """One answer per rendered prompt, batched with concurrent requests of the same settings.

        ``alone``: run in a batch of its own (sampling with a caller's seed: the same request then
        gives the same answers whatever else is being served).
        """
        key: tuple[Any, ...] = ("generate", json.dumps(dataclasses.asdict(settings), sort_keys=True))
        if alone:
            self._alone += 1
            key = (*key, self._alone)
        return await self.batcher.submit(key, settings, rendered)

    async def classify(self, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        """Labels and probabilities per text, with optional second texts (label scorers: ``/v1/classify``)."""
        items = list(zip(texts, pairs, strict=True)) if pairs is not None else [(t, None) for t in texts]
        return await self.batcher.submit(("classify", pairs is not None), None, items)

    async def predict(self, items: list[Any]) -> list[dict[str, Any]]:
        """The task predictor's answer per item (labels, entities, answer spans, generated texts ...)."""
        return await self.batcher.submit(("predict",), None, items)

    def _run_batch(self, key: Hashable, context: Any, items: list[Any]) -> list[Any]:
        """Worker thread: one model call for the items of all requests batched under ``key``."""
        kind = key[0]  # type: ignore[index]
        # One forward pass per batch: the batch is what the batcher collected, capped at max_batch_size
        # rows for generation (one request may hold up to max_items x n prompts), at 64 texts otherwise.
        if kind == "generate":
            settings = dataclasses.replace(context, batch_size=min(len(items), self.options.max_batch_size))
            return list(self.loaded.generate(items, settings))
        rows = min(len(items), max(64, self.options.max_batch_size))
        if kind == "classify":
            texts = [t for t, _ in items]
            pairs = [p for _, p in items] if key[1] else None  # type: ignore[index]
            p = cast(LabelScorer, self.loaded)
            return list(p.decode(p.probabilities(texts, pairs, batch_size=rows)))
        if kind == "predict":
            return list(self.loaded.predict(items, batch_size=rows))
        raise ValueError(f"unknown batch kind {kind!r}")

    # ------------------------------------------------------------------------------------ streaming
    async def stream(self, rendered: str, settings: Any, info: dict[str, Any]) -> AsyncIterator[str]:
        """Text pieces of one answer as they are generated (not batched: runs alone in the worker).

        ``info`` receives finish_reason and token counts when the answer ends. Closing the iterator
        (a client that went away) stops generation.
        """
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
