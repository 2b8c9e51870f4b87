"""How ``lmtune serve`` listens and what it accepts: :class:`ServeOptions`, validated when built.

Every limit answers in OpenAI's error shape when a request passes it (400, 413 or 429); the connection
limits (``max_connections``, ``read_timeout``) close connections instead, since no request has arrived.
"""

from __future__ import annotations

import ipaddress
import math
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from lmtune.config import PRECISIONS
from lmtune.errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Bind addresses meaning "every interface": no Host name can be derived from them.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
GUARD_SIDES = ("input", "output", "both")
GUARD_ACTIONS = ("refuse", "replace")
GUARD_MESSAGE = "This answer was withheld by the server's content filter."
MAX_GUARD_MESSAGE = 2000
API_KEY_HINT = "use letters, digits and punctuation, e.g. python -c \"import secrets; print(secrets.token_urlsafe(24))\""


def host_name(value: str) -> str | None:
    """The host name of a ``Host`` header value (``localhost:8000``, ``[::1]:8000``, ``Example.com.``):
    lowercased, without port, brackets or a trailing dot; None for a value that is not a plain host."""
    try:
        parts = urllib.parse.urlsplit("//" + value)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        return None
    if parts.username is not None or parts.password is not None or parts.path or parts.query or parts.fragment:
        return None  # "localhost:80@evil.example" names evil.example to some parsers
    name = (parts.hostname or "").rstrip(".")
    return _canonical(name) if name else None


def _canonical(name: str) -> str:
    """An IP address in one spelling (``0:0::1`` is ``::1``); a name as it is."""
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return name


def address_name(value: str) -> str | None:
    """:func:`host_name` of a bind address or an allowed host, where an IPv6 address may come bare (``::1``)."""
    try:
        return ipaddress.ip_address(value.strip("[]")).compressed
    except ValueError:
        return host_name(value)


@dataclass(frozen=True)
class ServeOptions:
    """How ``lmtune serve`` listens and what it accepts (every limit answers 4xx in the OpenAI error shape)."""

    host: str = "127.0.0.1"
    """Address to bind: loopback by default; another address exposes the model to the network."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """With a key, every endpoint but /health (and the page's static files) needs ``Authorization: Bearer KEY``.
    Printable ASCII only (HTTP headers carry nothing else reliably)."""
    allowed_hosts: tuple[str, ...] = ()
    """``Host`` header names answered besides the bound address's own (loopback: localhost, 127.0.0.1,
    ::1); ``*.example.com`` matches subdomains, ``*`` any name. Other names get 400: a web page whose
    domain was rebound to this address (DNS rebinding) cannot use the model."""
    max_batch_size: int = 16
    """Most items (prompts x n, texts) run together on the model."""
    batch_wait_ms: float = 5.0
    """How long the first request of a quiet moment waits for others to batch with."""
    batching: str = "window"
    """How generation requests share the model: ``window`` (requests arriving within ``batch_wait_ms`` run
    as one ``generate`` call, until its longest answer ends) or ``continuous`` (transformers' continuous
    batching: a request joins the running batch at the next decoding step, a finished one leaves it;
    greedy requests without stop strings or penalties, others run windowed)."""
    precision: str = "fp32"
    """The generative model's weights: ``fp32``, ``auto`` (bf16 where this GPU or CPU runs it faster, measured),
    ``bf16`` or ``fp16`` (GPU); see ``Run.load``."""
    max_tokens_limit: int = 1024
    """Largest ``max_tokens`` a request may ask for."""
    max_n: int = 8
    """Largest ``n`` (answers per prompt)."""
    max_items: int = 64
    """Most prompts (completions) or texts/items (classify, predict) in one request."""
    max_body_bytes: int = 1_000_000
    """Largest request body; larger bodies get 413."""
    max_request_tokens: int = 8_192
    """Most tokens one generation request may use: its prompt tokens + prompts x n x max_tokens (400 past it)."""
    max_request_chars: int = 200_000
    """Most characters in the texts of one request (prompts, messages, inputs), checked before anything is
    tokenised (400 past it)."""
    max_queue: int = 256
    """Most requests waiting for or using the model at once; more get 429 with Retry-After."""
    max_connections: int = 256
    """Most open connections; uvicorn answers 503 at the limit and connections past it are closed at once
    (each holds a file descriptor). Lowered at start-up to what the open-file limit (ulimit -n) allows."""
    read_timeout: float = 15.0
    """Seconds a client has to send a whole request (headers and body), from when it connects or its
    previous answer ends; slower connections are closed."""
    model_name: str | None = None
    """The model id in /v1/models and answers (default: the run folder's name)."""
    explain_steps: int = 32
    """Integration steps of an explanation (``explain: true``) whose request names none."""
    max_explain_steps: int = 128
    """Largest ``explain_steps`` a request may ask for (each step is a forward and backward pass per text)."""
    max_explain_items: int = 8
    """Most texts one request may ask to explain (an explanation costs ``explain_steps`` passes per text)."""
    guard: str | None = None
    """A classification run (its folder) that screens requests' texts and generated answers (``--guard``)."""
    guard_labels: tuple[str, ...] = ()
    """The guard's labels that block a text (``--guard-labels toxic,insult``); required with ``guard``."""
    guard_threshold: float = 0.5
    """A text is blocked when the guard gives any blocked label this probability or more, in (0, 1]."""
    guard_on: str = "both"
    """What the guard reads: ``input`` (requests' texts), ``output`` (generated answers) or ``both``."""
    guard_action: str = "refuse"
    """A blocked input: ``refuse`` (400, error type ``content_filter``) or ``replace`` (chat and completions
    answer ``guard_message`` with ``finish_reason: "content_filter"``; other endpoints refuse). A blocked
    answer is always replaced by ``guard_message``."""
    guard_message: str = GUARD_MESSAGE
    """The text standing in for a blocked answer."""
    redact_pii: bool = False
    """Mask personal data (e-mail addresses, phone numbers, names ...) in answers and in the server's log."""
    pii_ner: str | None = None
    """An NER model (an lmtune token_classification run, or its model folder) whose person names ``redact_pii``
    masks too (``data.pii_ner``'s recognizer)."""

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_batch_size": self.max_batch_size >= 1,
            "batch_wait_ms": 0 <= self.batch_wait_ms <= 1000,
            "max_tokens_limit": self.max_tokens_limit >= 1,
            "max_n": self.max_n >= 1,
            "max_items": self.max_items >= 1,
            "max_body_bytes": self.max_body_bytes >= 1024,
            "max_request_tokens": self.max_request_tokens >= 1,
            "max_request_chars": self.max_request_chars >= 1,
            "max_queue": self.max_queue >= 1,
            "max_connections": self.max_connections >= 1,
            "read_timeout": 0 < self.read_timeout <= 3600,
            "max_explain_steps": 1 <= self.max_explain_steps <= 1024,
            "explain_steps": 1 <= self.explain_steps <= self.max_explain_steps,
            "max_explain_items": self.max_explain_items >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if self.batching not in ("window", "continuous"):
            raise ConfigError(f"serve option batching = {self.batching!r} is not known", field="batching",
                              hint="use 'window' or 'continuous'")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"serve option precision = {self.precision!r} is not known", field="precision",
                              hint="use " + ", ".join(PRECISIONS))
        if bad:
            raise ConfigError(f"serve option {bad[0]} = {getattr(self, bad[0])!r} is out of range",
                              field=bad[0], hint="port 0-65535, batch_wait_ms 0-1000, max_body_bytes >= 1024, "
                              "read_timeout 0-3600 s, max_explain_steps 1-1024 and explain_steps up to it, the other limits >= 1")
        self._check_key()
        self._check_guard()
        if self.pii_ner is not None and not self.redact_pii:
            raise ConfigError("--pii-ner names the NER model that --redact-pii masks names with, but --redact-pii is "
                              "off", field="pii_ner", hint="add --redact-pii, or leave out --pii-ner")
        for pattern in self.allowed_hosts:
            name = pattern[2:] if pattern.startswith("*.") else pattern
            if pattern != "*" and (address_name(name) is None or "*" in name):
                raise ConfigError(f"allowed host {pattern!r} is not a host name", field="allowed_hosts",
                                  hint="a name or address (api.example.com, 192.168.1.5), *.example.com for its "
                                  "subdomains, or * for any name")
        if self.wildcard and self.api_key is None and not self.allowed_hosts:
            raise ConfigError(
                f"host {self.host!r} listens on every network interface and no API key is set: anyone who can reach "
                "this machine, or a web page one of its users opens (by DNS rebinding), could use the model",
                field="host", hint="set an API key (--api-key or LMTUNE_API_KEY), or name the host names clients "
                "use (--allowed-host NAME; '*' for any)")

    def _check_key(self) -> None:
        key = self.api_key
        if key is None:
            return
        if not key.strip():
            raise ConfigError("the API key is empty", field="api_key")
        if not (key.isascii() and key.isprintable()):
            raise ConfigError("the API key holds characters other than printable ASCII: HTTP headers cannot carry "
                              "them reliably, so no client could send it", field="api_key", hint=API_KEY_HINT)
        if key != key.strip():
            raise ConfigError("the API key starts or ends with spaces: HTTP clients drop them, so it would never "
                              "match", field="api_key", hint=API_KEY_HINT)

    def _check_guard(self) -> None:
        """The ``--guard*`` flags, each error naming its flag (the guard run itself is checked when it loads)."""
        if self.guard is None:
            given = {"guard_labels": bool(self.guard_labels), "guard_threshold": self.guard_threshold != 0.5,
                     "guard_on": self.guard_on != "both", "guard_action": self.guard_action != "refuse",
                     "guard_message": self.guard_message != GUARD_MESSAGE}
            for name, set_ in given.items():
                if set_:
                    flag = "--" + name.replace("_", "-")
                    raise ConfigError(f"{flag} applies with --guard RUN (the classifier that screens texts)",
                                      field=name, hint=f"add --guard RUN_FOLDER, or drop {flag}")
            return
        if not Path(self.guard).is_dir():
            what = "is not a folder" if Path(self.guard).exists() else "does not exist"
            raise ConfigError(f"--guard {self.guard} {what}", field="guard",
                              hint="pass the folder of a classification run (or of its model/)")
        if any(not label.strip() for label in self.guard_labels):
            raise ConfigError("--guard-labels holds an empty label", field="guard_labels",
                              hint="comma-separated label names, e.g. --guard-labels toxic,insult")
        if not (math.isfinite(self.guard_threshold) and 0 < self.guard_threshold <= 1):
            raise ConfigError(f"--guard-threshold is {self.guard_threshold}; it must be in (0, 1]",
                              field="guard_threshold", hint="a probability, e.g. 0.5; 1 blocks only certain texts")
        if self.guard_on not in GUARD_SIDES:
            raise ConfigError(f"--guard-on is {self.guard_on!r}; it must be one of {', '.join(GUARD_SIDES)}",
                              field="guard_on")
        if self.guard_action not in GUARD_ACTIONS:
            raise ConfigError(f"--guard-action is {self.guard_action!r}; it must be one of {', '.join(GUARD_ACTIONS)}",
                              field="guard_action")
        if len(self.guard_message) > MAX_GUARD_MESSAGE:
            raise ConfigError(f"--guard-message holds {len(self.guard_message)} characters; at most {MAX_GUARD_MESSAGE}",
                              field="guard_message")

    @property
    def loopback(self) -> bool:
        """Whether the server is reachable from this machine only."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    @property
    def wildcard(self) -> bool:
        """Whether the server listens on every interface (``0.0.0.0``, ``::``)."""
        return self.host in WILDCARD_HOSTS

    def host_names(self) -> frozenset[str] | None:
        """The ``Host`` names (and ``*.domain`` patterns) answered, or None for any: the bound address's
        own names plus ``allowed_hosts``; any name with ``*`` or on a wildcard bind with a key and no list."""
        patterns = {p.lower() if p.startswith("*") else address_name(p) or p for p in self.allowed_hosts}
        if "*" in patterns or (self.wildcard and not patterns):
            return None
        own = set(LOOPBACK_HOSTS) if self.loopback else set()
        if not self.wildcard:
            own.add(address_name(self.host) or self.host.lower())
        return frozenset(own | patterns)

    def allows_host(self, header: str) -> bool:
        """Whether a request with ``Host: header`` is answered (see :meth:`host_names`)."""
        names = self.host_names()
        if names is None:
            return True
        name = host_name(header)
        if name is None:
            return False
        return name in names or any(p.startswith("*.") and name.endswith(p[1:]) for p in names)
