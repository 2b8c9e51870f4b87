"""The server commands, ``lmtune serve`` and ``lmtune studio`` (registered on the app in :mod:`lmtune.cli`):
the options they share are declared once here, with the help each command gives them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from lmtune.console import quiet_libraries
from lmtune.errors import ConfigError

console = Console()
err_console = Console(stderr=True)

# Shared by predict, chat, eval and serve: how a generative model's weights are loaded.
PRECISION_OPTION = typer.Option("fp32", "--precision", help="A generative model's weights: fp32 (the answers and "
                                "figures of the run's report), auto (bf16 where this GPU or CPU runs it faster, "
                                "measured once: faster decoding, some greedy answers change), bf16 or fp16 (GPU). "
                                "Label predictors run in fp32.")


def _host_option(other: str) -> Any:
    """``--host``: loopback by default; ``other`` says what listening elsewhere means (it needs a key or a host)."""
    return typer.Option("127.0.0.1", help=f"Address to listen on (loopback by default; {other} needs --api-key or "
                        "--allowed-host).")


def _port_option(default: int) -> Any:
    """``--port``, the command's own default."""
    return typer.Option(default, min=0, max=65535, help="TCP port.")


def _api_key_option(where: str) -> Any:
    """``--api-key`` (or ``LMTUNE_API_KEY``), required on ``where``."""
    return typer.Option(None, "--api-key", envvar="LMTUNE_API_KEY", show_envvar=True,
                        help=f"Require 'Authorization: Bearer KEY' on {where}.")


def _allowed_host_option(forms: str) -> Any:
    """``--allowed-host``, repeatable; ``forms`` says which names it takes."""
    return typer.Option([], "--allowed-host", help=f"A Host header name to answer besides the bound address's own "
                        f"({forms}). Other names get 400 (DNS rebinding).")


def _refuse_empty_key_variable(api_key: str | None, verb: str) -> None:
    """Refuse an empty ``LMTUNE_API_KEY``: click reads an empty environment variable as unset, so without this,
    ``LMTUNE_API_KEY=`` would ``verb`` with no key."""
    if api_key is None and "LMTUNE_API_KEY" in os.environ:
        raise ConfigError("LMTUNE_API_KEY is set but empty, so no key would be required", field="api_key",
                          hint=f"set it to a key, or unset it (unset LMTUNE_API_KEY) to {verb} without one")


def serve(
    run: Path = typer.Argument(..., help="A run folder or an lmtune model folder."),
    host: str = _host_option("0.0.0.0 exposes the model to the network and"),
    port: int = _port_option(8000),
    api_key: str | None = _api_key_option("every endpoint but /health (printable ASCII)"),
    allowed_host: list[str] = _allowed_host_option("repeatable; *.example.com for subdomains, * for any"),
    max_batch_size: int = typer.Option(16, min=1, help="Most prompts/texts run together on the model."),
    batch_wait_ms: float = typer.Option(5.0, min=0, max=1000, help="How long a request waits for others to "
                                        "batch with."),
    batching: str = typer.Option("window", help="Generation batching: 'window' (requests arriving together run "
                                 "as one call) or 'continuous' (a request joins the running batch at the next "
                                 "decoding step; greedy requests without stop strings)."),
    precision: str = PRECISION_OPTION,
    max_tokens_limit: int = typer.Option(1024, min=1, help="Largest max_tokens a request may ask for."),
    max_items: int = typer.Option(64, min=1, help="Most prompts or texts in one request."),
    max_n: int = typer.Option(8, min=1, help="Largest n (answers per prompt) a request may ask for."),
    max_body_bytes: int = typer.Option(1_000_000, min=1024, help="Largest request body (bytes)."),
    max_request_tokens: int = typer.Option(8_192, min=1, help="Most tokens one generation request may use: "
                                           "prompt tokens + prompts x n x max_tokens."),
    max_request_chars: int = typer.Option(200_000, min=1, help="Most characters in one request's texts, checked "
                                          "before tokenising."),
    max_queue: int = typer.Option(256, min=1, help="Most requests waiting for or using the model; more get 429 "
                                  "with Retry-After."),
    max_connections: int = typer.Option(256, min=1, help="Most open connections (503 at the limit, closed past "
                                        "it; lowered to what ulimit -n allows)."),
    read_timeout: float = typer.Option(15.0, min=0.001, max=3600, help="Seconds a client has to send a whole "
                                       "request; slower connections are closed."),
    explain_steps: int = typer.Option(32, min=1, max=1024, help="Integrated-gradient steps of an explanation "
                                      "(/v1/classify with explain: true) whose request names none."),
    max_explain_steps: int = typer.Option(128, min=1, max=1024, help="Largest explain_steps a request may ask for "
                                          "(each step is a forward and backward pass per text)."),
    max_explain_items: int = typer.Option(8, min=1, help="Most texts one request may ask to explain."),
    model_name: str | None = typer.Option(None, help="Model id in /v1/models (default: the run folder's name)."),
    guard: Path | None = typer.Option(None, "--guard", help="A classification run that screens requests' texts and "
                                      "generated answers (see --guard-labels)."),
    guard_labels: str = typer.Option("", "--guard-labels", help="The guard's labels that block a text, comma-separated "
                                     "(e.g. toxic,insult); required with --guard."),
    guard_threshold: float = typer.Option(0.5, "--guard-threshold", help="Block a text when the guard gives a blocked "
                                          "label this probability or more (0 < t <= 1)."),
    guard_on: str = typer.Option("both", "--guard-on", help="What the guard reads: input, output (generated answers) "
                                 "or both."),
    guard_action: str = typer.Option("refuse", "--guard-action", help="A blocked input: refuse (400, error type "
                                     "content_filter) or replace (chat/completions answer --guard-message). A blocked "
                                     "answer is always replaced by --guard-message (finish_reason content_filter)."),
    guard_message: str | None = typer.Option(None, "--guard-message", help="The text standing in for a blocked "
                                             "answer (default: \"This answer was withheld by the server's content "
                                             "filter.\")."),
    redact_pii: bool = typer.Option(False, "--redact-pii", help="Mask personal data (e-mail addresses, phone numbers, "
                                    "names ...) in answers and in the server's log; streamed answers then arrive whole."),
    pii_ner: Path | None = typer.Option(None, "--pii-ner", help="With --redact-pii: an NER run (token_classification) "
                                        "whose person names are masked too, as data.pii_ner finds them."),
) -> None:
    """Serve a run's model over HTTP: OpenAI-compatible chat/completions (sft, causal_lm), /v1/classify and
    task endpoints, /metrics, and a web page at /."""
    from lmtune.serve import ServeOptions  # noqa: PLC0415  (the server and torch load only for `serve`)

    _refuse_empty_key_variable(api_key, "serve")
    options = ServeOptions(host=host, port=port, api_key=api_key, allowed_hosts=tuple(allowed_host),
                           max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, batching=batching, precision=precision,
                           max_tokens_limit=max_tokens_limit, max_items=max_items, max_n=max_n,
                           max_body_bytes=max_body_bytes, max_request_tokens=max_request_tokens,
                           max_request_chars=max_request_chars, max_queue=max_queue, max_connections=max_connections,
                           read_timeout=read_timeout, model_name=model_name, explain_steps=explain_steps,
                           max_explain_steps=max_explain_steps, max_explain_items=max_explain_items,
                           guard=str(guard) if guard is not None else None,
                           guard_labels=tuple(x.strip() for x in guard_labels.split(",")) if guard_labels else (),
                           guard_threshold=guard_threshold, guard_on=guard_on, guard_action=guard_action,
                           redact_pii=redact_pii, pii_ner=str(pii_ner) if pii_ner is not None else None,
                           **({"guard_message": guard_message} if guard_message is not None else {}))
    # Imported once the options hold: a refused key or host costs no torch import.
    from lmtune.serve.app import serve as run_server  # noqa: PLC0415  (the server and torch load only for `serve`)

    quiet_libraries()

    def announce() -> None:
        console.print(f"serving {run} on http://{host}:{port}/ "
                      f"({'API key required' if options.api_key else 'no API key'})", highlight=False)
        if not options.loopback and options.api_key is None:
            err_console.print(f"warning: {host} is reachable from other machines and no API key is set: anyone "
                              "who can reach it can use the model (--api-key or LMTUNE_API_KEY)", highlight=False)

    run_server(run, options, announce)


def studio(
    workspace: Path = typer.Option(Path("."), "--workspace", help="The folder holding data/, configs/, runs/ and "
                                   "studies/ (created as needed; default: the current folder)."),
    host: str = _host_option("another address"),
    port: int = _port_option(7861),
    api_key: str | None = _api_key_option("every /api/ endpoint (printable ASCII; the page asks for it)"),
    allowed_host: list[str] = _allowed_host_option("repeatable"),
) -> None:
    """A local web app over a workspace: upload and inspect data, build and plan a config, launch, watch,
    stop and resume runs, compare them, read their reports, try and export them."""
    from lmtune.studio.app import StudioOptions  # noqa: PLC0415  (the server and torch load only for `studio`)
    from lmtune.studio.app import studio as run_studio  # noqa: PLC0415  (the server and torch load only for `studio`)

    _refuse_empty_key_variable(api_key, "run")
    options = StudioOptions(workspace=workspace, host=host, port=port, api_key=api_key,
                            allowed_hosts=tuple(allowed_host))
    options.gate_options()  # a refused key or host fails before anything starts
    if not options.gate_options().loopback and api_key is None:
        raise ConfigError(f"host {host!r} is reachable from other machines and no API key is set: anyone who can "
                          "reach it could read the workspace and start processes", field="host",
                          hint="set an API key (--api-key or LMTUNE_API_KEY), or keep the default 127.0.0.1")
    quiet_libraries()

    def announce() -> None:
        console.print(f"lmtune studio on http://{host}:{port}/ (workspace {workspace.resolve()}; "
                      f"{'API key required' if api_key else 'no API key'})", highlight=False)

    run_studio(options, announce)
