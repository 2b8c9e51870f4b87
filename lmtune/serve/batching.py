"""Dynamic batching: concurrent requests collected for a few milliseconds and run together on the model.

The model is not thread-safe, and generation is several times faster per token in batches (batch 8
gives ~5x the tokens/s of batch 1 on a 2-core CPU, ../shared/PERFORMANCE.md), so every model call goes
through one worker thread (:class:`ModelWorker`) and the :class:`Batcher` feeds it: the first request
of an idle moment opens a window of ``wait_ms``; requests arriving in it (or while the worker is busy
with the previous batch) join, up to ``max_batch_size`` items. Requests whose settings differ (say,
another ``max_tokens``) cannot share one ``generate`` call: they are grouped by key and each group runs
as one call. The event loop never waits on the model.

A request whose client left (its handler was cancelled, which cancels its future) is not computed if it
is still queued; a model call whose requests have all gone is told so (``abandoned()``) and may stop
between its batches of rows by raising :class:`Abandoned`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger("lmtune")

T = TypeVar("T")

# run(key, context, items, abandoned) -> one result per item, in order; called in the worker thread.
# abandoned() turns True once every request of the call has gone; run may then raise Abandoned.
BatchFunction = Callable[[Hashable, Any, list[Any], Callable[[], bool]], list[Any]]


class Abandoned(Exception):
    """Raised by a batch function that stopped because every request of its call has gone."""


class ModelWorker:
    """The one thread that touches the model: batches and streams run here, one at a time, in order."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmtune-model")
        self._jobs = 0  # submitted and not finished (changed from the loop and the worker: under the lock)
        self._lock = threading.Lock()

    @property
    def idle(self) -> bool:
        """Whether no job is running or waiting."""
        return self._jobs == 0

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the worker thread and wait for it without blocking the event loop."""
        def job() -> T:
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._jobs -= 1

        with self._lock:
            self._jobs += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        except BaseException:
            with self._lock:
                self._jobs -= 1
            raise
        return await future

    def shutdown(self) -> None:
        """Let the running job finish; drop the queued ones."""
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Pending:
    key: Hashable
    context: Any
    items: list[Any]
    future: asyncio.Future[list[Any]]


@dataclass
class BatchStats:
    """What the batcher has run: batch sizes in requests and in items (``/metrics``)."""

    batches: int = 0
    requests: int = 0
    items: int = 0
    max_requests: int = 0
    # requests per batch -> how many batches had that many (1, 2, 3, ...)
    requests_histogram: dict[int, int] = field(default_factory=dict)
    busy_seconds: float = 0.0

    def record(self, requests: int, items: int, seconds: float) -> None:
        """Count one batch of ``requests`` requests holding ``items`` items."""
        self.batches += 1
        self.requests += requests
        self.items += items
        self.max_requests = max(self.max_requests, requests)
        self.requests_histogram[requests] = self.requests_histogram.get(requests, 0) + 1
        self.busy_seconds += seconds


class Batcher:
    """Collects requests for ``wait_ms`` (up to ``max_batch_size`` items) and runs them in batches.

    :meth:`submit` is called from request handlers; ``run`` is called in the worker thread with the
    items of all requests of one key, in arrival order, and must return one result per item.
    """

    def __init__(self, run: BatchFunction, worker: ModelWorker, *, max_batch_size: int, wait_ms: float) -> None:
        self.run = run
        self.worker = worker
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000.0
        self.stats = BatchStats()
        self.pending = 0
        """Requests submitted and not answered yet (queued or running)."""
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start collecting (on the running event loop)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="lmtune-batcher")

    async def stop(self) -> None:
        """Stop collecting; requests still waiting get an error."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, key: Hashable, context: Any, items: list[Any]) -> list[Any]:
        """Results for ``items`` (one per item), computed in a batch with other requests of the same key."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(key, context, list(items), future))
        self.pending += 1
        try:
            return await future  # a cancelled caller (its client left) cancels the future: it is skipped
        finally:
            self.pending -= 1

    async def _collect(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            size = len(batch[0].items)
            deadline = time.monotonic() + self.wait_s
            while size < self.max_batch_size:
                # Requests already waiting (they arrived while the previous batch ran) join at once;
                # otherwise wait for more until the window closes.
                if queue.empty():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        pending = await asyncio.wait_for(queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                else:
                    pending = queue.get_nowait()
                batch.append(pending)
                size += len(pending.items)
            try:
                await self._run_groups(batch)
            except Exception as exc:  # never let the collector die: every later request would hang
                log.exception("the batcher failed on a batch of %d requests", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    async def _run_groups(self, batch: list[_Pending]) -> None:
        groups: dict[Hashable, list[_Pending]] = {}
        for pending in batch:
            if not pending.future.done():  # a client that went away is not computed for
                groups.setdefault(pending.key, []).append(pending)
        for key, members in groups.items():
            try:
                await self._run_group(key, members)
            except Exception as exc:
                if len(members) == 1:
                    if not members[0].future.done():
                        members[0].future.set_exception(exc)
                    continue
                # One request must not fail the others it was batched with: run each alone.
                log.warning("a batch of %d requests failed (%s); running them one by one", len(members), exc)
                for p in members:
                    try:
                        await self._run_group(key, [p])
                    except Exception as single_exc:
                        if not p.future.done():
                            p.future.set_exception(single_exc)

    async def _run_group(self, key: Hashable, members: list[_Pending]) -> None:
        members = [p for p in members if not p.future.done()]
        if not members:
            return
        gone = threading.Event()  # read in the worker thread; set here, in the loop

        def left(_: asyncio.Future[list[Any]]) -> None:
            if all(p.future.cancelled() for p in members):
                gone.set()

        for p in members:
            p.future.add_done_callback(left)
        items = [item for p in members for item in p.items]
        started = time.perf_counter()
        try:
            results = await self.worker.call(self.run, key, members[0].context, items, gone.is_set)
        except Abandoned:
            log.info("stopped a model call of %d items: its %d request(s) had gone", len(items), len(members))
            return
        finally:
            for p in members:
                p.future.remove_done_callback(left)
        self.stats.record(len(members), len(items), time.perf_counter() - started)
        if len(results) != len(items):
            raise RuntimeError(f"a batch of {len(items)} items gave {len(results)} results")
        start = 0
        for p in members:
            if not p.future.done():
                p.future.set_result(results[start : start + len(p.items)])
            start += len(p.items)
