"""``lmtune serve``: a FastAPI app serving one run's model, OpenAI-compatible for decoder runs.

Endpoints (all answer errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``):

- decoder runs (``TaskInfo.decoder``): ``POST /v1/chat/completions`` (chat models, ``TaskInfo.chat``:
  the model's own chat template), ``POST /v1/completions`` (raw-text continuation), both with
  ``stream: true`` as server-sent events; ``GET /v1/models``.
- other tasks: ``POST /v1/predict`` and the task's own paths (``TaskInfo.endpoints``: ``/v1/classify``
  with text pairs, ``/v1/ner``, ``/v1/qa``, ``/v1/generate`` ...), through the task's registered predictor.
- ``GET /health`` (never needs the key), ``GET /metrics`` (Prometheus text), ``GET /v1/run`` and
  ``GET /v1/run/plots/NAME`` (the run view of the page), ``GET /`` (the page, ``static/``).

Concurrent requests are batched on the model (``lmtune.serve.batching``); streamed answers run alone.
Every request passes the gate first (``lmtune.serve.gate``: Host, key, body, queue, client left, crashes);
connections are bounded below it (``lmtune.serve.connections``). Handlers bound the work of one request:
its texts in characters before anything is tokenised, a generation's tokens (prompts + n x max_tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmtune.config.tasks import TASK_INFOS
from lmtune.errors import LmtuneError, RunError
from lmtune.models import generation
from lmtune.models.text_generator import validate_prompt_messages
from lmtune.serve import connections
from lmtune.serve.engine import Engine
from lmtune.serve.gate import APIError, Gate, internal_error
from lmtune.serve.guard import Safeguards
from lmtune.serve.metrics import RequestMetrics
from lmtune.serve.options import ServeOptions
from lmtune.serve.schemas import (
    UNSUPPORTED,
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    PredictRequest,
)
from lmtune.serve.tools import answer_message, request_tools, tool_call_deltas
from lmtune.tasks.base import Explainer
from lmtune.workflows.run import Run

log = logging.getLogger("lmtune")

STATIC_DIR = Path(__file__).parent / "static"
# The page's look and its API-key handling, shared with lmtune studio (which serves this folder too).
COMMON_STATIC_DIR = STATIC_DIR / "common"
CHAT_PATH, COMPLETIONS_PATH, CLASSIFY_PATH, PREDICT_PATH = (
    "/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/predict")
# Task endpoints (TaskInfo.endpoints) that answer as /v1/predict does, under the task's own name: every
# registered one but those with handlers of their own. All are routed whatever the run's task, so asking
# a model for another task's endpoint gets a clear 404 naming the ones it serves.
TASK_PATHS = sorted({path for info in TASK_INFOS.values() for path in info.endpoints}
                    - {CHAT_PATH, COMPLETIONS_PATH, CLASSIFY_PATH, PREDICT_PATH})
MAX_STOP_STRINGS = 4
MAX_RETRY_AFTER_S = 60


def _from_lmtune(exc: LmtuneError, param: str | None = None) -> APIError:
    text = exc.message + (f" ({exc.hint})" if exc.hint else "")
    return APIError(400, text, param=param or exc.field)


# ------------------------------------------------------------------------------------------ app
def create_app(run: Run | str | Path, options: ServeOptions | None = None) -> FastAPI:
    """The app serving ``run`` (a run folder or an lmtune model folder, opened with ``options.precision``;
    a :class:`Run` keeps its own); the model loads here."""
    options = options or ServeOptions()
    if not isinstance(run, Run):
        run = Run.load(run, precision=options.precision)
    safeguards = Safeguards(options)  # before the model loads: a bad --guard fails at once
    engine = Engine(run, options)
    metrics = RequestMetrics()
    notes = connections.LogOncePer(log)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        restore = connections.log_accept_errors(asyncio.get_running_loop(), notes)
        await engine.start()
        safeguards.start(engine.worker)
        try:
            yield
        finally:
            await safeguards.stop()
            await engine.stop()
            restore()

    def retry_after(in_flight: int) -> int:
        # About the time the model needs for the requests ahead, from the batches it has run so far.
        stats = engine.batcher.stats
        per_request = stats.busy_seconds / stats.requests if stats.requests else 1.0
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(per_request * in_flight)))

    app = FastAPI(title="lmtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.options = options
    app.state.notes = notes
    app.state.safeguards = safeguards
    _install_error_handlers(app)
    api = _Api(engine, options, safeguards)

    app.get("/health")(api.health)
    app.get("/metrics")(lambda: PlainTextResponse(
        metrics.prometheus(engine.batcher.stats)
        + safeguards.stats.prometheus(guard=safeguards.guard is not None, pii=safeguards.masker is not None),
        media_type="text/plain; version=0.0.4"))
    app.get("/v1/models")(api.models)
    app.get("/v1/run")(api.run_view)
    app.get("/v1/run/plots/{name}")(api.plot)
    app.post(CHAT_PATH)(api.chat_completions)
    app.post(COMPLETIONS_PATH)(api.completions)
    app.post(CLASSIFY_PATH)(api.classify)
    app.post(PREDICT_PATH)(api.predict)
    for path in TASK_PATHS:
        app.post(path)(api.task_predict)
    app.get("/")(lambda: FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"}))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    known = {path for r in app.routes if "{" not in (path := getattr(r, "path", "{"))}
    app.add_middleware(Gate, options=options, metrics=metrics, known_paths=known, retry_after=retry_after)
    return app


def server_config(app: FastAPI, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration serving ``app`` (from :func:`create_app`) with its options' connection
    limits; ``overrides`` are more ``uvicorn.Config`` arguments (``port=0``, ``log_config=None`` ...)."""
    return connections.server_config(app, app.state.options, app.state.notes, **overrides)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(LmtuneError)
    async def lmtune_error(request: Request, exc: LmtuneError) -> JSONResponse:
        return _from_lmtune(exc).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        # pydantic names the union member it tried in the location ("prompt.str", "content.list[...]"):
        # the parameter is the path of field names and list indices only.
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}".rstrip(": "),
                            code="invalid_json").response()
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        # The gate answers the app's errors; this is the last resort for an error in the gate itself.
        request_id = uuid.uuid4().hex[:16]
        log.error("request %s: error serving %s %s", request_id, request.method, request.url.path, exc_info=exc)
        return internal_error(request_id).response()


class _Api:
    """The request handlers (bound to one engine)."""

    def __init__(self, engine: Engine, options: ServeOptions, safeguards: Safeguards) -> None:
        self.engine = engine
        self.options = options
        self.safeguards = safeguards
        self.run = engine.run

    # ------------------------------------------------------------------------------------ info
    def endpoints(self) -> list[str]:
        """The POST endpoints this model answers: its task's (``TaskInfo.endpoints``; chat only with a chat
        template), and ``/v1/predict`` for every task answered by a predictor."""
        info = self.engine.info
        if self.engine.generative:
            chat = info.chat and self.engine.loaded.has_chat_template
            return [path for path in info.endpoints if path != CHAT_PATH or chat]
        return [PREDICT_PATH, *(path for path in info.endpoints if path != PREDICT_PATH)]

    async def health(self) -> dict[str, Any]:
        """Liveness: the model is loaded and the server answers."""
        return {"status": "ok", "model": self.engine.model_id, "task": self.engine.task}

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one model served."""
        created = int(self.run.model_dir.stat().st_mtime)
        return {"object": "list", "data": [{"id": self.engine.model_id, "object": "model", "created": created,
                                            "owned_by": "lmtune", "task": self.engine.task}]}

    async def run_view(self) -> JSONResponse:
        """What the page shows about the run: task, limits, config, metrics and the plot names. Absolute
        paths (the base model's folder, data files, output_dir) show as ``.../NAME``: where files live on
        the server is not the client's business."""
        config_text = ""
        config_file = self.run.path / "config.yaml"
        if config_file.is_file():
            try:
                config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                log.warning("the run view shows no config: %s cannot be read (%s)", config_file, exc)
            else:
                config_text = yaml.safe_dump(_hide_paths(config), sort_keys=False, allow_unicode=True)
        g = self.engine.loaded
        o = self.options
        view = {
            "model": self.engine.model_id, "task": self.engine.task, "generative": self.engine.generative,
            "chat": "/v1/chat/completions" in self.endpoints(), "endpoints": self.endpoints(),
            "labels": list(getattr(g, "labels", []) or []),
            "meta": _hide_paths({k: v for k, v in self.run.meta.items() if k not in ("base_model_path",)}),
            "config": config_text, "metrics": _hide_paths(self.run.metrics), "plots": sorted(self._plots()),
            "explain": isinstance(g, Explainer), **self.safeguards.describe(),
            "limits": {"max_tokens": o.max_tokens_limit, "n": o.max_n, "items": o.max_items,
                       "body_bytes": o.max_body_bytes, "request_tokens": o.max_request_tokens,
                       "request_chars": o.max_request_chars, "explain_items": o.max_explain_items,
                       "explain_steps": o.max_explain_steps},
        }
        return JSONResponse(_finite(view))

    def _plots(self) -> dict[str, Path]:
        folder = self.run.path / "plots"
        if not folder.is_dir():
            return {}
        root = folder.resolve()
        out = {}
        for f in folder.iterdir():
            # Only regular PNG files that really live in plots/ (a symlink out of it is not served).
            if f.suffix.lower() == ".png" and f.is_file() and f.resolve().parent == root:
                out[f.name] = f.resolve()
        return out

    async def plot(self, name: str) -> FileResponse:
        """One PNG of the run's ``plots/`` folder, by its exact file name (nothing else is reachable)."""
        plots = self._plots()
        if name not in plots:
            raise APIError(404, f"no plot named {name!r} in this run", param="name", code="not_found")
        return FileResponse(plots[name], media_type="image/png")

    # ------------------------------------------------------------------------------------ helpers
    def _require(self, endpoint: str) -> None:
        if endpoint not in self.endpoints():
            why = ""
            if endpoint == CHAT_PATH and self.engine.generative:
                why = (" (it was trained on raw text: use /v1/completions)" if not self.engine.info.chat
                       else " (its tokenizer has no chat template)")
            raise APIError(404, f"{endpoint} is not served for this model: it is a '{self.engine.task}' model"
                           f"{why}; it serves {', '.join(self.endpoints())}", code="unsupported_endpoint")

    def _check_supported(self, body: Any) -> None:
        for name, defaults in UNSUPPORTED.items():
            if name in type(body).model_fields and getattr(body, name) not in defaults:
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")

    def _settings(self, body: Any, max_tokens: int | None) -> tuple[Any, bool]:
        """Generation settings of a request (the run's ``generation`` section where it says nothing),
        and whether it must run alone (sampling with the caller's seed)."""
        limit = self.options.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limit}",
                           param="max_tokens", code="invalid_value")
        if body.n > self.options.max_n:
            raise APIError(400, f"n is {body.n}; this server allows at most {self.options.max_n}", param="n",
                           code="invalid_value")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        if stop is not None and (len(stop) > MAX_STOP_STRINGS or any(not s for s in stop)):
            raise APIError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings", param="stop",
                           code="invalid_value")
        overrides: dict[str, Any] = {"stop": stop, "seed": body.seed, "top_p": body.top_p}
        if body.temperature is not None:
            overrides["do_sample"] = body.temperature > 0
            if body.temperature > 0:
                overrides["temperature"] = body.temperature
        if body.top_p == 0:  # the limit of nucleus sampling: the single most likely token
            overrides["do_sample"], overrides["top_p"] = False, None
        settings = self.run.generation_settings(max_new_tokens=max_tokens, **overrides)
        if max_tokens is None and settings.max_new_tokens > limit:
            settings = dataclasses.replace(settings, max_new_tokens=limit)
        return settings, bool(settings.do_sample and body.seed is not None)

    def _check_chars(self, texts: list[str], param: str) -> None:
        """A 400 before anything is tokenised when the request's texts hold more than --max-request-chars
        characters (tokenising a long text costs time even where the model reads only its start)."""
        total = sum(map(len, texts))
        if total > self.options.max_request_chars:
            raise APIError(400, f"the texts of this request hold {total} characters; this server takes at most "
                           f"{self.options.max_request_chars} per request (--max-request-chars): split the request "
                           "or shorten the texts", param=param, code="request_too_large")

    def _check_tokens(self, rendered: list[str], settings: Any, n: int) -> None:
        """400s for a prompt that does not fit the model's positions with its answer, and for a request
        whose prompt tokens + prompts x n x max_tokens pass --max-request-tokens."""
        g = self.engine.loaded
        param = "messages" if len(rendered) == 1 else "prompt"
        counts = [g.count_tokens(r) for r in rendered]
        for i, tokens in enumerate(counts):
            if g.positions is not None and tokens + settings.max_new_tokens > g.positions:
                raise APIError(400, f"prompt {i + 1}: {g.too_long_message(tokens, settings.max_new_tokens)}",
                               param=param, code="context_length_exceeded")
        total = sum(counts) + len(rendered) * n * settings.max_new_tokens
        limit = self.options.max_request_tokens
        if total > limit:
            raise APIError(400, f"this request may use {total} tokens ({sum(counts)} prompt tokens + {len(rendered)} "
                           f"prompt(s) x n {n} x max_tokens {settings.max_new_tokens}); this server allows at most "
                           f"{limit} per request (--max-request-tokens): lower max_tokens or n, or split the request",
                           param="max_tokens", code="too_many_tokens")

    async def _answers(self, rendered: list[str], settings: Any, n: int, alone: bool) -> list[dict[str, Any]]:
        """n answers per prompt, prompt-major (OpenAI's choice order). Greedy answers are computed once
        and repeated: greedy decoding gives the same answer every time."""
        if settings.do_sample:
            results = await self.engine.generate([p for p in rendered for _ in range(n)], settings, alone=alone)
            return results
        once = await self.engine.generate(rendered, settings)
        return [r for r in once for _ in range(n)]

    async def _screened_answers(self, rendered: list[str], settings: Any, n: int, alone: bool,
                                withheld: bool) -> list[dict[str, Any]]:
        """:meth:`_answers` through the safeguards (output guard, personal-data masking); for a ``withheld``
        input (a blocked input, ``--guard-action replace``) the guard's message in every choice, nothing generated."""
        if withheld:
            g = self.engine.loaded
            return [self.safeguards.withheld(g.count_tokens(r)) for r in rendered for _ in range(n)]
        return await self.safeguards.screen_answers(await self._answers(rendered, settings, n, alone))

    async def _pieces(self, rendered: str, settings: Any, info: dict[str, Any], withheld: bool) -> AsyncIterator[str]:
        """The text pieces of a streamed answer; ``info`` gets its finish_reason and token counts. With an output
        guard or masking, the answer is generated whole and sent screened in one piece (what was sent cannot
        be taken back), so the first piece comes when generation ends."""
        if withheld:
            info.update(self.safeguards.withheld(self.engine.loaded.count_tokens(rendered)))
            yield info["text"]
            return
        if not self.safeguards.buffers_streams:
            async for piece in self.engine.stream(rendered, settings, info):
                yield piece
            return
        text = "".join([piece async for piece in self.engine.stream(rendered, settings, info)])
        (screened,) = await self.safeguards.screen_answers([{**info, "text": text}])
        info.update(screened)
        if screened["text"]:
            yield screened["text"]

    def _labels(self) -> list[str]:
        """The served model's label names (kept as they are when answers are masked)."""
        return list(getattr(self.engine.loaded, "labels", []) or [])

    @staticmethod
    def _usage(results: list[dict[str, Any]], n: int) -> dict[str, int]:
        prompt = sum(r["prompt_tokens"] for r in results[::n])  # the prompt is counted once, not per answer
        completion = sum(r["completion_tokens"] for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ------------------------------------------------------------------------------------ generation
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        """``POST /v1/chat/completions``: the assistant's answer(s), rendered with the model's chat template."""
        self._require(CHAT_PATH)
        self._check_supported(body)
        messages: list[dict[str, Any]] = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
                content = "".join(part.text or "" for part in content)
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.tool_calls is not None:
                message["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if content is None and not m.tool_calls:
                message["content"] = ""
            messages.append(message)
        # Tool definitions and calls are text the model reads too.
        tool_json = json.dumps([body.tools or [], [m.get("tool_calls") or [] for m in messages]])
        self._check_chars([*(m["content"] or "" for m in messages), tool_json], "messages")
        try:
            conversation = validate_prompt_messages(messages, source="request", line=None, field="messages")
        except LmtuneError as exc:
            raise APIError(400, exc.message, param="messages", code="invalid_value") from None
        tools = request_tools(body.tools, body.tool_choice, self.engine.loaded.tokenizer, conversation)
        settings, alone = self._settings(body, body.max_completion_tokens or body.max_tokens)
        rendered = generation.chat_prompt(self.engine.loaded.tokenizer, conversation, tools=tools)
        self._check_tokens([rendered], settings, body.n)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream and body.n != 1:
            raise APIError(400, "stream with n > 1 is not supported", param="n", code="unsupported_parameter")
        withheld = await self.safeguards.check_input([m["content"] for m in conversation], "messages",
                                                     replaceable=True)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(self._chat_chunks(ident, created, rendered, settings, include_usage, withheld, tools))
        results = await self._screened_answers([rendered], settings, body.n, alone, withheld)
        choices = []
        for j, r in enumerate(results):
            message, finish = answer_message(r["text"], tools, r["finish_reason"])
            choices.append({"index": j, "message": message, "logprobs": None, "finish_reason": finish})
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": self.engine.model_id,
            "system_fingerprint": None, "choices": choices, "usage": self._usage(results, body.n),
        }

    async def _chat_chunks(self, ident: str, created: int, rendered: str, settings: Any,
                           include_usage: bool, withheld: bool,
                           tools: list[dict[str, Any]] | None = None) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streamed chat answer. With ``tools`` the answer is generated whole before anything is
        sent (a call cannot be told from text until it ends): then its calls come as one ``delta.tool_calls``
        chunk (each call whole, with its ``index``) after any text, and finish_reason ``tool_calls``."""
        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": self.engine.model_id, "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        info: dict[str, Any] = {}
        yield chunk({"role": "assistant", "content": ""}, None)
        if tools:
            text = "".join([piece async for piece in self._pieces(rendered, settings, info, withheld)])
            message, finish = answer_message(text, tools, info.get("finish_reason", "stop"))
            if message["content"]:
                yield chunk({"content": message["content"]}, None)
            if "tool_calls" in message:
                yield chunk({"tool_calls": tool_call_deltas(message["tool_calls"])}, None)
            yield chunk({}, finish)
        else:
            async for piece in self._pieces(rendered, settings, info, withheld):
                yield chunk({"content": piece}, None)
            yield chunk({}, info.get("finish_reason", "stop"))
        if include_usage:
            yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.engine.model_id,
                   "choices": [], "usage": self._usage([info], 1)}

    async def completions(self, body: CompletionRequest) -> Any:
        """``POST /v1/completions``: continuations of raw-text prompts (no chat template is applied)."""
        self._require(COMPLETIONS_PATH)
        self._check_supported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt is an empty list", param="prompt", code="invalid_value")
        if len(prompts) > self.options.max_items:
            raise APIError(400, f"{len(prompts)} prompts in one request; this server allows at most "
                           f"{self.options.max_items}", param="prompt", code="invalid_value")
        self._check_chars(prompts, "prompt")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise APIError(400, f"prompt {i + 1} is empty", param="prompt", code="invalid_value")
        settings, alone = self._settings(body, body.max_tokens)
        self._check_tokens(prompts, settings, body.n)
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream and (body.n != 1 or len(prompts) != 1):
            raise APIError(400, "stream needs one prompt and n = 1", param="n" if body.n != 1 else "prompt",
                           code="unsupported_parameter")
        withheld = await self.safeguards.check_input(prompts, "prompt", replaceable=True)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(self._completion_chunks(ident, created, prompts[0], settings, include_usage, withheld))
        results = await self._screened_answers(prompts, settings, body.n, alone, withheld)
        return {
            "id": ident, "object": "text_completion", "created": created, "model": self.engine.model_id,
            "system_fingerprint": None,
            "choices": [{"index": j, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                        for j, r in enumerate(results)],
            "usage": self._usage(results, body.n),
        }

    async def _completion_chunks(self, ident: str, created: int, prompt: str, settings: Any,
                                 include_usage: bool, withheld: bool) -> AsyncIterator[dict[str, Any]]:
        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": ident, "object": "text_completion", "created": created, "model": self.engine.model_id,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        info: dict[str, Any] = {}
        async for piece in self._pieces(prompt, settings, info, withheld):
            yield chunk(piece, None)
        yield chunk("", info.get("finish_reason", "stop"))
        if include_usage:
            yield {"id": ident, "object": "text_completion", "created": created, "model": self.engine.model_id,
                   "choices": [], "usage": self._usage([info], 1)}

    @staticmethod
    def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                async for c in chunks:
                    yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            except LmtuneError as exc:  # the answer has begun: the error travels as an event
                yield f"data: {json.dumps(_from_lmtune(exc).body(), ensure_ascii=False)}\n\n"
            except Exception as exc:
                request_id = uuid.uuid4().hex[:16]
                log.error("request %s: error while streaming", request_id, exc_info=exc)
                yield f"data: {json.dumps(internal_error(request_id).body(), ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------ tasks
    def _items(self, value: Any, name: str) -> list[Any]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise APIError(400, f"{name} is an empty list", param=name, code="invalid_value")
        if len(items) > self.options.max_items:
            raise APIError(400, f"{len(items)} items in one request; this server allows at most "
                           f"{self.options.max_items}", param=name, code="invalid_value")
        return items

    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        """``POST /v1/classify``: label(s), score and probabilities per text."""
        self._require(CLASSIFY_PATH)
        texts = self._items(body.input, "input")
        pairs = None
        if body.text_pair is not None:
            pairs = [body.text_pair] if isinstance(body.text_pair, str) else list(body.text_pair)
            if len(pairs) != len(texts):
                raise APIError(400, f"text_pair has {len(pairs)} texts for {len(texts)} inputs", param="text_pair",
                               code="invalid_value")
            # The predictor knows whether its model reads pairs: a pair item it refuses is a 400, not
            # a second text silently fed to a model trained on single texts.
            why = self.engine.loaded.check_item({"text": texts[0], "text_pair": pairs[0]})
            if why is not None:
                raise APIError(400, f"text_pair: {why}", param="text_pair", code="invalid_value")
        self._check_chars([*texts, *(pairs or [])], "input")
        await self.safeguards.check_input([*texts, *(pairs or [])], "input", replaceable=False)
        if body.explain:
            results = await self._explain(body, texts, pairs)
        else:
            if body.explain_label is not None or body.explain_steps is not None:
                raise APIError(400, "explain_label and explain_steps apply with explain: true",
                               param="explain_label" if body.explain_label is not None else "explain_steps",
                               code="invalid_value")
            results = await self.engine.classify(texts, pairs)
        results = await self.safeguards.mask_results(results, self._labels())
        return {"object": "list", "model": self.engine.model_id,
                "data": [{"index": i, **r} for i, r in enumerate(results)]}

    async def _explain(self, body: ClassifyRequest, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        """Answers with token attributions, within the explanation limits (texts, steps)."""
        o = self.options
        if not isinstance(self.engine.loaded, Explainer):
            raise APIError(400, f"this '{self.engine.task}' model cannot explain its predictions", param="explain",
                           code="unsupported_parameter")
        if len(texts) > o.max_explain_items:
            raise APIError(400, f"{len(texts)} texts to explain in one request; this server explains at most "
                           f"{o.max_explain_items} (each costs explain_steps forward and backward passes)",
                           param="input", code="invalid_value")
        steps = body.explain_steps or o.explain_steps
        if steps > o.max_explain_steps:
            raise APIError(400, f"explain_steps is {steps}; this server allows at most {o.max_explain_steps}",
                           param="explain_steps", code="invalid_value")
        labels = list(getattr(self.engine.loaded, "labels", []) or [])
        if body.explain_label is not None and body.explain_label not in labels:
            raise APIError(400, f"explain_label '{body.explain_label}' is not one the model knows "
                           f"({', '.join(labels)})", param="explain_label", code="invalid_value")
        items: list[Any] = (list(texts) if pairs is None
                            else [{"text": t, "text_pair": p} for t, p in zip(texts, pairs, strict=True)])
        return await self.engine.explain(items, body.explain_label, steps)

    async def predict(self, body: PredictRequest) -> dict[str, Any]:
        """``POST /v1/predict``: the task's answer per item (labels, entities, answer spans, texts)."""
        self._require(PREDICT_PATH)
        items = self._items(body.input, "input")
        self._check_chars(_strings(items), "input")
        self._check_items(items)
        await self.safeguards.check_input(_strings(items), "input", replaceable=False)
        results = await self.safeguards.mask_results(await self.engine.predict(items), self._labels())
        return {"object": "list", "model": self.engine.model_id, "task": self.engine.task,
                "data": [{"index": i, **r} for i, r in enumerate(results)]}

    async def task_predict(self, request: Request, body: PredictRequest) -> dict[str, Any]:
        """A task's own endpoint (``/v1/ner``, ``/v1/qa``, ``/v1/generate`` ...): :meth:`predict` under its name."""
        self._require(request.url.path)
        return await self.predict(body)

    def _check_items(self, items: list[Any]) -> None:
        """A 400 naming the first item the task's predictor does not take (``Predictor.check_item``)."""
        for i, item in enumerate(items):
            why = self.engine.loaded.check_item(item)
            if why is not None:
                raise APIError(400, f"item {i + 1}: {why}", param="input", code="invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or any(c in part for c in "[]-"))


def _is_absolute_path(text: str) -> bool:
    windows = len(text) > 2 and text[1] == ":" and text[0].isalpha() and text[2] in "\\/"
    return os.path.isabs(text) or text.startswith(("~", "\\\\")) or windows


def _hide_paths(value: Any) -> Any:
    """``value`` with every string that is an absolute path replaced by ``.../`` and its last part."""
    if isinstance(value, str) and "\n" not in value and _is_absolute_path(value):
        name = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return f".../{name}" if name else "..."
    if isinstance(value, dict):
        return {k: _hide_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hide_paths(v) for v in value]
    return value


def _strings(value: Any) -> list[str]:
    """Every string in a JSON value (the texts of a request's items, whatever their shape)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf floats as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def serve(run: str | Path, options: ServeOptions, announce: Callable[[], None] | None = None) -> None:
    """Load ``run`` and serve it with uvicorn until interrupted; ``announce`` runs once the model loaded
    (so a refused model folder never prints "serving ...")."""
    app = create_app(run, options)
    if announce is not None:
        announce()
    server = uvicorn.Server(server_config(app))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise RunError(f"the server could not start on {options.host}:{options.port}; the log above says why "
                       "(often: the port is in use, try --port)")


__all__ = ["APIError", "ServeOptions", "create_app", "serve", "server_config"]
