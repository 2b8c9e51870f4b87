"""``lmtune studio``: a local web app over a workspace of data files, configs, run folders and studies.

It works with what the command line writes and reads: data files checked by lmtune's own readers,
configs checked by the config schema, ``lmtune data inspect`` and ``lmtune plan`` called in-process, runs
started as separate ``lmtune train`` processes (:mod:`lmtune.studio.jobs`) and watched through their run
folders (:mod:`lmtune.studio.progress`), so a run started from a terminal shows here and the other way
round. The HTTP contract is in ``docs/architecture.md`` ("Studio"). Every request passes the same gate
as ``lmtune serve`` (:class:`lmtune.serve.gate.Gate`: the Host header against DNS rebinding, the API key,
the body size), so the two servers refuse the same requests the same way. The page (``static/``) needs
nothing from the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import Body, FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmtune.config import load_config
from lmtune.config.schema import Config
from lmtune.config.tasks import TASK_INFOS, task_names
from lmtune.errors import ConfigError, LmtuneError, RunError
from lmtune.models.registry import list_models
from lmtune.serve import connections
from lmtune.serve.app import COMMON_STATIC_DIR
from lmtune.serve.gate import Gate
from lmtune.serve.metrics import RequestMetrics
from lmtune.serve.options import ServeOptions
from lmtune.studio import compare as comparing
from lmtune.studio.jobs import Jobs
from lmtune.studio.progress import progress
from lmtune.studio.workspace import Conflict, NotFound, Workspace, clean_json, read_json, served_file
from lmtune.workflows.inspect import inspect_data
from lmtune.workflows.plan import plan as make_plan
from lmtune.workflows.run import Run
from lmtune.workflows.run_folder import read_run_record

log = logging.getLogger("lmtune")

STATIC_DIR = Path(__file__).parent / "static"
# The settings the config form offers (the rest stay editable in the YAML).
MAIN_FIELDS = ("data.train", "data.validation", "data.test", "data.text_column", "data.label_column",
               "data.validation_size", "data.test_size", "data.max_length", "method.name", "method.r",
               "method.alpha", "method.dropout", "train.epochs", "train.max_steps", "train.batch_size",
               "train.learning_rate", "train.eval_every", "train.seed", "train.precision", "output_dir")
MAX_COMPARED = 8
MAX_NEW_TOKENS = 512
QA_PATH = "/v1/qa"


@dataclasses.dataclass(frozen=True)
class StudioOptions:
    """How ``lmtune studio`` listens and where its workspace is."""

    workspace: Path = Path(".")
    """The folder holding data/, configs/, runs/ and studies/ (created as needed)."""
    host: str = "127.0.0.1"
    """Address to bind: loopback by default; another address needs an API key (or --allowed-host)."""
    port: int = 7861
    """TCP port."""
    api_key: str | None = None
    """With a key, every /api/ endpoint needs ``Authorization: Bearer KEY`` (the page and /health do not)."""
    allowed_hosts: tuple[str, ...] = ()
    """``Host`` names answered besides the bound address's own (DNS rebinding), as for ``lmtune serve``."""
    max_upload_bytes: int = 200 * 2**20
    """Largest request body, so the largest data file an upload may carry (413 past it)."""

    def gate_options(self) -> ServeOptions:
        """The same checks ``lmtune serve`` makes (host, key, body size), for the shared gate; a ConfigError
        for a bad key, or a network-wide host without a key or host names."""
        return ServeOptions(host=self.host, port=self.port, api_key=self.api_key, allowed_hosts=self.allowed_hosts,
                            max_body_bytes=self.max_upload_bytes, read_timeout=600.0)


class TryRunner:
    """One loaded run at a time, for the Try tab: loading a model takes seconds, so the last one stays."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded: tuple[Path, float, Run] | None = None

    def run(self, run_dir: Path) -> Run:
        """The loaded run of ``run_dir`` (reloaded when its run.json changed: a run trained again)."""
        stamp = (run_dir / "run.json").stat().st_mtime
        if self.loaded is None or self.loaded[0] != run_dir or self.loaded[1] != stamp:
            self.loaded = None  # free the previous model before loading the next
            self.loaded = (run_dir, stamp, Run.load(run_dir))
        return self.loaded[2]

    def answer(self, run_dir: Path, body: dict[str, Any]) -> list[Any]:
        """What the run answers for ``body``: ``messages`` (a chat model) or ``texts`` (+ ``contexts`` for QA)."""
        with self.lock:
            run = self.run(run_dir)
            if body.get("messages") is not None:
                messages = body["messages"]
                if not isinstance(messages, list) or not messages:
                    raise RunError("messages must be a non-empty list of {role, content}", field="messages")
                if not run.info.chat:
                    raise RunError(f"this run's model ({run.task}) does not chat; send texts", field="messages")
                return [run.chat(messages, max_new_tokens=_max_new_tokens(body))]
            texts = body.get("texts")
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise RunError("texts must be a non-empty list of strings", field="texts")
            if len(texts) > 64:
                raise RunError("at most 64 texts at a time", field="texts")
            contexts = body.get("contexts")
            if contexts is not None:
                if not isinstance(contexts, list) or len(contexts) != len(texts):
                    raise RunError("contexts must be a list with one context per text", field="contexts")
                return run.predict([{"question": q, "context": str(c)} for q, c in zip(texts, contexts, strict=True)])
            if run.generative:
                return run.generate(texts, max_new_tokens=_max_new_tokens(body))
            return run.predict(texts)


def _max_new_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_new_tokens", 64)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_NEW_TOKENS:
        raise RunError(f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}", field="max_new_tokens")
    return value


def try_kind(task: Any) -> str:
    """What the Try tab sends a run of ``task``: ``chat`` (messages), ``qa`` (questions with contexts) or ``texts``."""
    info = TASK_INFOS.get(task) if isinstance(task, str) else None
    if info is None:
        return "texts"
    if info.chat:
        return "chat"
    # A task serving /v1/qa answers {question, context} items (its predictor's input).
    return "qa" if QA_PATH in info.endpoints else "texts"


def _error(status: int, exc: LmtuneError) -> JSONResponse:
    return JSONResponse({"error": {"message": exc.message, "hint": exc.hint, "field": exc.field}}, status_code=status)


def _plain(value: Any) -> Any:
    """JSON-safe ``value`` (numpy numbers and arrays as Python ones, NaN as None)."""
    return clean_json(json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))))


async def _preflight(key: str, check: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> dict[str, Any]:
    """``check(config)`` (data inspect, plan) in a thread: ``{"ok": True, key: its result}``, or the problem it
    found as ``{"ok": False, "error": {message, hint, field}}``, a 200 (the page shows it by the form)."""
    try:
        result = await asyncio.to_thread(check, config)
    except LmtuneError as exc:
        return {"ok": False, "error": {"message": str(exc).split("\n  hint: ")[0], "hint": exc.hint, "field": exc.field}}
    return {"ok": True, key: _plain(result)}


def field_errors(raw: dict[str, Any]) -> list[dict[str, str]]:
    """The config's problems, one per field (``[]`` when it validates)."""
    try:
        load_config(raw)
        return []
    except ConfigError as exc:
        try:
            Config.model_validate(raw)
        except ValidationError as err:
            errors = []
            for e in err.errors():
                key = ".".join(str(p) for p in e["loc"]).replace("data.train_mix.", "data.train.") or "(top level)"
                msg = str(e["msg"]).removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    msg = "unknown key"
                elif e["type"] == "missing":
                    msg = "required"
                errors.append({"field": key, "message": msg})
            return errors
        return [{"field": exc.field or "(config)", "message": exc.message + (f" ({exc.hint})" if exc.hint else "")}]


def schema() -> dict[str, Any]:
    """Tasks, bundled models, methods and the main settings with the schema's own descriptions and bounds."""
    tasks = [{"name": name, "description": TASK_INFOS[name].summary, "metric": TASK_INFOS[name].default_metric,
              "generative": TASK_INFOS[name].decoder or TASK_INFOS[name].generates, "chat": TASK_INFOS[name].chat,
              "exports": list(TASK_INFOS[name].exports), "baselines": list(TASK_INFOS[name].baselines),
              "settings": [f for f in MAIN_FIELDS if _field(f) is not None]} for name in task_names()]
    models = [{"name": m["name"], "description": m.get("description") or m.get("architecture"),
               "params": m.get("params"), "installed": m.get("installed")} for m in list_models()]
    methods = list(typing.get_args(Config.model_fields["method"].annotation.model_fields["name"].annotation))  # type: ignore[union-attr]
    fields = {name: info for name in MAIN_FIELDS if (info := _field(name)) is not None}
    return clean_json({"tasks": tasks, "models": models, "methods": methods, "fields": fields})


def _field(dotted: str) -> dict[str, Any] | None:
    """The schema's facts about a dotted setting: type, default, description, bounds, choices."""
    model: Any = Config
    parts = dotted.split(".")
    for part in parts[:-1]:
        info = model.model_fields.get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return None
        model = info.annotation
    info = model.model_fields.get(parts[-1])
    if info is None:
        return None
    out: dict[str, Any] = {"type": _type_name(info.annotation), "description": info.description or ""}
    if not info.is_required() and info.default_factory is None:
        default = info.default
        out["default"] = default if isinstance(default, (str, int, float, bool, type(None))) else str(default)
    for meta in info.metadata:
        for attr, key in (("ge", "minimum"), ("gt", "exclusive_minimum"), ("le", "maximum"), ("lt", "exclusive_maximum")):
            if getattr(meta, attr, None) is not None:
                out[key] = getattr(meta, attr)
    choices = [a for a in _flat_args(info.annotation) if isinstance(a, str)]
    if choices:
        out["enum"] = choices
    return out


def _flat_args(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [x for arg in typing.get_args(annotation) for x in _flat_args(arg)]


def _type_name(annotation: Any) -> str:
    names = {getattr(a, "__name__", str(a)) for a in (typing.get_args(annotation) or (annotation,))}
    names.discard("NoneType")
    if typing.get_origin(annotation) is typing.Literal or any(typing.get_origin(a) is typing.Literal
                                                              for a in typing.get_args(annotation)):
        return "enum"
    for kind in ("float", "int", "bool", "str"):
        if kind in names:
            return {"float": "number", "int": "integer", "bool": "boolean", "str": "string"}[kind]
    return "object"


# ------------------------------------------------------------------------------------------ app
def create_studio_app(options: StudioOptions | None = None) -> FastAPI:
    """The studio app over ``options.workspace`` (created if missing)."""
    options = options or StudioOptions()
    gate_options = options.gate_options()  # a bad key or host fails here, before anything is served
    ws = Workspace(options.workspace)
    jobs = Jobs(ws)
    trier = TryRunner()
    app = FastAPI(title="lmtune studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.options, app.state.gate_options, app.state.workspace, app.state.jobs = options, gate_options, ws, jobs
    app.state.notes = connections.LogOncePer(log)

    @app.exception_handler(LmtuneError)
    async def lmtune_error(request: Request, exc: LmtuneError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
        return _error(status, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, LmtuneError(f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, LmtuneError(f"{request.method} {request.url.path}: {exc.detail}"))

    def summary(name: str) -> dict[str, Any]:
        found = ws.summary(name, launched_by=jobs.launched_by(name), job_status=jobs.job_status(name))
        return {**found, "try": try_kind(found["task"])}

    def run_names() -> list[str]:
        jobs.reap()
        return sorted(set(ws.run_names()) | set(jobs.train_jobs))

    def existing(name: str) -> str:
        if name not in run_names():
            raise NotFound(f"no run {name!r} in runs/")
        return name

    def config_of(body: dict[str, Any]) -> dict[str, Any]:
        config = body.get("config")
        if not isinstance(config, dict):
            raise ConfigError("the request needs a config: a mapping like a YAML config holds", field="config")
        return config

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/workspace")
    def workspace() -> dict[str, Any]:
        return {"workspace": str(ws.root), "files": ws.data_files(), "runs": [summary(n) for n in run_names()],
                "studies": comparing.studies(ws)}

    @app.post("/api/files")
    async def upload(file: UploadFile = File(...)) -> dict[str, str]:
        content = await file.read()
        return {"path": await asyncio.to_thread(ws.save_upload, file.filename or "", content)}

    @app.post("/api/inspect")
    async def inspect(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return await _preflight("report", inspect_data, ws.resolved_config(config_of(body)))

    @app.get("/api/schema")
    def get_schema() -> dict[str, Any]:
        return schema()

    @app.post("/api/config")
    def check_config(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        raw = config_of(body)
        errors = field_errors(ws.resolved_config(raw))
        if errors:
            return {"ok": False, "errors": errors}
        return {"ok": True, "yaml": yaml.safe_dump(raw, sort_keys=False, allow_unicode=True),
                "config": _plain(load_config(raw).to_dict())}

    @app.post("/api/plan")
    async def plan(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return await _preflight("plan", lambda config: make_plan(config).to_json(),
                                ws.resolved_config(config_of(body)))

    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return {"runs": [summary(n) for n in run_names()]}

    @app.post("/api/runs", status_code=201)
    async def launch(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        name = str(body.get("name") or "")
        await asyncio.to_thread(jobs.launch, name, config_of(body))
        return {"run": summary(name)}

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        existing(name)
        run_dir = ws.run_dir(name)
        metrics = read_json(run_dir / "metrics.json")
        return {"run": summary(name), "config_yaml": ws.config_yaml(name), "metrics": clean_json(metrics),
                "progress": run_progress(name, 0)}

    def run_progress(name: str, since: int) -> dict[str, Any]:
        run_dir = ws.run_dir(name)
        try:
            record = read_run_record(run_dir)
        except RunError:
            record = None
        return clean_json(progress(run_dir, record, summary(name)["status"], since=since,
                                   log_file=jobs.log_file(name), start_step=jobs.start_step(name)))

    @app.get("/api/runs/{name}/progress")
    def get_progress(name: str, since: int = 0) -> dict[str, Any]:
        return run_progress(existing(name), since)

    @app.post("/api/runs/{name}/stop")
    async def stop(name: str) -> dict[str, Any]:
        existing(name)
        if not await asyncio.to_thread(jobs.stop, name):
            raise Conflict(f"run {name!r} is not running", hint="only a running run can be stopped")
        return {"run": summary(name)}

    @app.post("/api/runs/{name}/resume")
    async def resume(name: str) -> dict[str, Any]:
        await asyncio.to_thread(jobs.resume, existing(name))
        return {"run": summary(name)}

    @app.get("/api/compare")
    def compare(runs: str = "") -> dict[str, Any]:
        names = [n for n in (x.strip() for x in runs.split(",")) if n]
        if not 2 <= len(names) <= MAX_COMPARED:
            raise RunError(f"compare needs 2 to {MAX_COMPARED} runs, got {len(names)}", field="runs",
                           hint="?runs=a,b[,c]")
        return comparing.compare(ws, [existing(n) for n in names], [summary(n) for n in names])

    @app.get("/api/runs/{name}/report")
    def report(name: str) -> dict[str, Any]:
        return comparing.report(ws, existing(name))

    @app.get("/api/runs/{name}/files/{path:path}")
    def run_file(name: str, path: str) -> FileResponse:
        found, media = served_file(ws.run_dir(existing(name)), path)
        return FileResponse(found, media_type=media, headers={"Cache-Control": "no-cache"})

    @app.post("/api/runs/{name}/try")
    async def try_run(name: str, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        existing(name)
        if summary(name)["status"] != "complete":
            raise Conflict(f"run {name!r} is not complete; a run can be tried once it has finished")
        return {"results": _plain(await asyncio.to_thread(trier.answer, ws.run_dir(name), body))}

    @app.post("/api/runs/{name}/export", status_code=202)
    async def export(name: str, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        existing(name)
        quantize = body.get("quantize")
        job = await asyncio.to_thread(jobs.export, name, str(body.get("format") or "merged"),
                                      str(quantize) if quantize else None)
        return {"job": job.id, "output": job.output}

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        return jobs.describe(jobs.job(job_id))

    @app.get("/api/studies")
    def studies() -> dict[str, Any]:
        return {"studies": comparing.studies(ws)}

    @app.get("/api/studies/{name}")
    def study(name: str) -> dict[str, Any]:
        return comparing.study(ws, ws.study_dir(name))

    @app.get("/api/studies/{name}/files/{path:path}")
    def study_file(name: str, path: str) -> FileResponse:
        found, media = served_file(ws.study_dir(name), path)
        return FileResponse(found, media_type=media, headers={"Cache-Control": "no-cache"})

    app.get("/")(lambda: FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"}))
    STATIC_DIR.mkdir(exist_ok=True)
    # Before /static, which would take these paths too: the serve page's stylesheet and API-key script.
    app.mount("/static/common", StaticFiles(directory=COMMON_STATIC_DIR), name="common")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    known = {path for r in app.routes if "{" not in (path := getattr(r, "path", "{"))}
    app.add_middleware(Gate, options=gate_options, metrics=RequestMetrics(), known_paths=known,
                       retry_after=lambda in_flight: 1)
    return app


def studio(options: StudioOptions, announce: Callable[[], None] | None = None) -> None:
    """Serve the studio with uvicorn until interrupted (runs it started go on: they are separate processes)."""
    app = create_studio_app(options)
    if announce is not None:
        announce()
    config = connections.server_config(app, app.state.gate_options, app.state.notes)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise RunError(f"the studio could not start on {options.host}:{options.port}; the log above says why "
                       "(often: the port is in use, try --port)")
