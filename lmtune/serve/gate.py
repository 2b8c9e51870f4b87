"""The gate in front of the app (pure ASGI middleware): what every request passes before a handler runs.

In order: the ``Host`` header (DNS rebinding), the API key, the body (read here up to the size limit
and replayed, so a lying Content-Length cannot get past it; a lone UTF-16 surrogate anywhere in its
JSON is a 400), and room in the queue for the model (429 with Retry-After when full). While a handler
runs, the gate listens for the client's disconnect and cancels the handler when it comes, so the
model never computes for a client that left. An exception no handler caught is logged with a request
id and answered with a 500 that carries only that id (never the exception's text), and the connection
stays open. Every request is counted in the metrics by endpoint and status (499: the client left).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmtune.serve.metrics import RequestMetrics
from lmtune.serve.options import ServeOptions

log = logging.getLogger("lmtune")

# Reachable without the API key: liveness, and the page's code (it holds no run data; everything the
# page shows comes from endpoints that need the key, which the page asks for).
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
BODY_METHODS = ("POST", "PUT", "PATCH")
CLIENT_LEFT = 499  # nginx's status for "the client closed the request": what the metrics count it as
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): only bodies holding one are parsed and searched.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class APIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """As a JSON response."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        return JSONResponse(self.body(), status_code=self.status, headers={**headers, **self.headers})


def internal_error(request_id: str) -> APIError:
    """The 500 a client sees for an error of the server: the request id to quote, nothing of its cause
    (exception text can hold paths, data or internals; the server log has it under the same id)."""
    return APIError(500, f"internal error while answering request {request_id}; the server log has the details "
                    "under this id", type="server_error", code="internal_error")


def lone_surrogate(body: bytes) -> str | None:
    """The place (``messages.0.content``; ``""`` for the whole body) of the first string in the JSON
    ``body`` that holds a lone UTF-16 surrogate, or None. Such a string is not Unicode text: tokenizers
    and UTF-8 encoders fail on it."""
    if not SURROGATE_ESCAPE.search(body):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None  # the app answers invalid JSON itself
    return _find_surrogate(value, [])


def _find_surrogate(value: Any, path: list[str]) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return ".".join(path)
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if _find_surrogate(key, []) is not None:
                return ".".join(path)  # the object holding the key: the key itself cannot be shown
            found = _find_surrogate(item, [*path, key])
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_surrogate(item, [*path, str(i)])
            if found is not None:
                return found
    return None


class Gate:
    """Pure ASGI middleware in front of the app (see the module's docstring)."""

    def __init__(self, app: ASGIApp, *, options: ServeOptions, metrics: RequestMetrics, known_paths: set[str],
                 retry_after: Callable[[int], int]) -> None:
        self.app = app
        self.options = options
        self.metrics = metrics
        self.known_paths = known_paths  # fixed paths: a label even when no route ran (401, 413)
        self.retry_after = retry_after  # requests in flight -> seconds a refused client should wait
        self.in_flight = 0  # requests with a body (the model's) between the queue check and their answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        state = {"status": 500, "started": False, "done": False}

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        admitted = False
        try:
            error = self._check_host(scope) or self._check_key(scope)
            body_read, replay = False, receive
            if error is None and scope.get("method") in BODY_METHODS:
                replay, error, gone = await self._read_body(scope, receive)
                if gone:
                    state["status"] = CLIENT_LEFT
                    return
                body_read = True
                if error is None:
                    error = self._admit()
                    admitted = error is None
            if error is not None:
                await error.response()(scope, receive, send_recording)
            elif body_read:
                if await self._run_until_client_leaves(scope, replay, receive, send_recording, state):
                    state["status"] = CLIENT_LEFT
            else:
                await self.app(scope, receive, send_recording)
        except Exception as exc:
            log.error("request %s: error serving %s %s", request_id, scope.get("method"), scope.get("path"),
                      exc_info=exc)
            if not state["started"]:
                await internal_error(request_id).response()(scope, receive, send_recording)
            # else the answer had begun and cannot change; not re-raising keeps the connection open
        finally:
            if admitted:
                self.in_flight -= 1
            route = scope.get("route")
            endpoint = str(getattr(route, "path", None) or "")
            if not endpoint:
                path = str(scope.get("path", ""))
                endpoint = path if path in self.known_paths else "other"
            self.metrics.record(endpoint, int(state["status"]), time.perf_counter() - started)

    # ------------------------------------------------------------------------------------ checks
    def _check_host(self, scope: Scope) -> APIError | None:
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1")
                if not self.options.allows_host(host):
                    return APIError(400, f"the Host header {host!r} is not a name this server answers to; start it "
                                    "with --allowed-host NAME to answer to that name", param="host", code="invalid_host")
                return None
        return None  # HTTP/1.0 without Host: no browser sends that, so no rebinding page either

    def _check_key(self, scope: Scope) -> APIError | None:
        key = self.options.api_key
        path = scope.get("path", "")
        if key is None or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return None
        given = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value.decode("latin-1")
        scheme, _, token = given.partition(" ")
        # latin-1 both ways: the header's own bytes; the key is printable ASCII (ServeOptions checks it)
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode("latin-1"),
                                                                    key.encode("latin-1")):
            what = "no API key was given" if not given else "the API key is not valid"
            return APIError(401, f"{what}: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        return None

    def _admit(self) -> APIError | None:
        """Room for one more request for the model, or the 429 saying when to come back."""
        if self.in_flight >= self.options.max_queue:
            seconds = self.retry_after(self.in_flight)
            return APIError(429, f"the server is busy: {self.in_flight} requests are waiting for or using the model, "
                            f"its limit (--max-queue {self.options.max_queue}); retry in {seconds} s",
                            type="server_error", code="server_busy", headers={"Retry-After": str(seconds)})
        self.in_flight += 1
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive, APIError | None, bool]:
        """(a receive that replays the body, an error, whether the client left before sending it all)."""
        limit = self.options.max_body_bytes
        too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                           code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return receive, too_big, False
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive, None, True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return receive, too_big, False
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        where = lone_surrogate(body)
        if where is not None:
            return receive, APIError(400, f"{where or 'the body'}: the text holds a lone UTF-16 surrogate (an escape "
                                     "such as \\ud800 without its pair), which is not a character; send valid Unicode",
                                     param=where or None, code="invalid_value"), False
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # waits for the client's disconnect (streaming responses listen for it)

        return replay, None, False

    async def _run_until_client_leaves(self, scope: Scope, replay: Receive, receive: Receive, send: Send,
                                       state: dict[str, Any]) -> bool:
        """Run the app; if the client disconnects before the answer is complete, cancel it (the model skips
        or stops the work of a cancelled request) and return True."""
        app = asyncio.ensure_future(self.app(scope, replay, send))

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({app, watch}, return_when=asyncio.FIRST_COMPLETED)
            if app.done() or state["done"]:
                await app  # re-raises what the app raised
                return False
            app.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await app
            return True
        finally:
            watch.cancel()
            if not app.done():
                app.cancel()
