"""Connections, before any request: how many may be open, how long a client may take to send a request,
and what is logged when the process runs out of file descriptors.

uvicorn bounds requests (``limit_concurrency`` answers 503 at the limit), the size of a request's head
(``h11_max_incomplete_event_size``) and idle time between requests (``timeout_keep_alive``, reset by
every byte received), but nothing bounds a connection that never completes a request: an idle socket or
a client sending a header byte now and then (slowloris) holds a file descriptor for as long as it likes,
and enough of them leave none for real clients. :func:`guarded_protocol` is uvicorn's h11 protocol with
the two missing bounds: past ``max_connections`` the connection that has waited longest without a
request in progress is closed to make room (the new one, if every connection is busy), and a client has
``read_timeout`` seconds to send a whole request (head and body) from when it connects or its previous
answer ends. uvicorn's ``limit_concurrency`` counts idle connections as well, so at its limit it would
answer 503 to every request, the very outage a flood of idle sockets aims at: it is set one above
``max_connections``, a backstop only. asyncio logs a failed ``accept()`` (EMFILE: "Too many open files") with a traceback for
every attempt, thousands a second; :func:`log_accept_errors` logs them once per interval instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmtune.serve.options import ServeOptions

if sys.platform != "win32":  # Windows has no open-file limit to read
    import resource

log = logging.getLogger("lmtune")

LOG_INTERVAL_S = 10.0
KEEP_ALIVE_S = 5  # uvicorn's default: an idle keep-alive connection is closed after this many seconds
MAX_HEAD_BYTES = 16 * 1024  # request line + headers (h11's default; a longer head is a 400)
FILES_RESERVED = 64  # file descriptors kept for the model, logs and the page's files (not connections)
RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class LogOncePer:
    """Logs a kind of message the first time, then at most once per ``interval`` seconds, saying how many
    were held back: a flood of identical warnings must not fill the disk or hide everything else."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_S) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (when last logged, held back since)

    def note(self, kind: str, message: str) -> None:
        """Log ``message`` unless a message of ``kind`` was logged less than ``interval`` seconds ago."""
        now = time.monotonic()
        last, held = self._last.get(kind, (-float("inf"), 0))
        if now - last < self.interval:
            self._last[kind] = (last, held + 1)
            return
        more = f" ({held} more like it in the last {now - last:.0f} s)" if held else ""
        self.logger.warning("%s%s", message, more)
        self._last[kind] = (now, 0)


def guarded_protocol(options: ServeOptions, notes: LogOncePer) -> type[H11Protocol]:
    """uvicorn's h11 protocol closing connections past ``options.max_connections`` and those that do not
    send a whole request within ``options.read_timeout`` seconds."""

    class GuardedH11Protocol(H11Protocol):
        read_deadline: asyncio.TimerHandle | None = None
        waiting_since: float | None = None  # loop time since when it waits for a request (None: busy)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > options.max_connections:
                waiting = [c for c in self.connections
                           if isinstance(c, GuardedH11Protocol) and c is not self and c.waiting_since is not None]
                if not waiting:
                    notes.note("full", f"closed new connections: all {options.max_connections} open ones are busy "
                               "(--max-connections)")
                    self.transport.close()
                    return
                oldest = min(waiting, key=lambda c: c.waiting_since or 0.0)
                notes.note("evicted", f"closed connections waiting without a request to make room: "
                           f"{options.max_connections} are open, the limit (--max-connections)")
                oldest.transport.close()
                oldest.waiting_since = None  # not chosen again before its close completes
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self.waiting_since = None  # a request is in progress: never closed to make room
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the whole request is in (or the connection is ending)

        def on_response_complete(self) -> None:
            # Armed first: a pipelined request already received is handled inside and disarms it.
            if not self.transport.is_closing():
                self._arm()
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self.read_deadline = self.loop.call_later(options.read_timeout, self._too_slow)
            self.waiting_since = self.loop.time()

        def _disarm(self) -> None:
            self.waiting_since = None
            if self.read_deadline is not None:
                self.read_deadline.cancel()
                self.read_deadline = None

        def _too_slow(self) -> None:
            self.read_deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                notes.note("slow", f"closed connections that did not send a whole request within "
                           f"{options.read_timeout:g} s (--read-timeout)")
                self.transport.close()  # a handler waiting for the body sees the client leave

    return GuardedH11Protocol


def log_accept_errors(loop: asyncio.AbstractEventLoop, notes: LogOncePer) -> Callable[[], None]:
    """Route ``loop``'s out-of-resource ``accept()`` errors to ``notes``; returns what restores the handler."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            notes.note("accept", f"cannot accept connections: {exc.strerror}; new clients wait until descriptors "
                       "are freed (raise the open-file limit, ulimit -n, or lower --max-connections)")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)


def open_file_room() -> int | None:
    """File descriptors this process may open for connections (the soft limit less a reserve), or None
    where there is no limit to read (no ``resource`` module, or unlimited)."""
    if sys.platform == "win32":
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - FILES_RESERVED)


def server_config(app: Any, options: ServeOptions, notes: LogOncePer, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration serving ``app`` with ``options``' connection limits (``overrides``: more
    ``uvicorn.Config`` arguments, e.g. ``port=0`` or ``log_config=None`` in tests)."""
    room = open_file_room()
    max_connections = options.max_connections
    if room is not None and max_connections > room:
        log.warning("max_connections lowered from %d to %d: this process may open only %d files (ulimit -n)",
                    max_connections, room, room + FILES_RESERVED)
        max_connections = room
    bounded = dataclasses.replace(options, max_connections=max_connections)
    settings: dict[str, Any] = {
        "host": options.host, "port": options.port, "log_level": "info", "access_log": False,
        "timeout_graceful_shutdown": 5, "limit_concurrency": max_connections + 1, "timeout_keep_alive": KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES, "http": guarded_protocol(bounded, notes),
    }
    return uvicorn.Config(app, **{**settings, **overrides})
