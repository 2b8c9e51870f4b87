"""Safeguards of a served model: a guard classifier screening texts (``--guard``) and personal-data masking of
answers and of the server's log (``--redact-pii``).

The guard is another lmtune run whose predictor scores a fixed label set (a
:class:`~lmtune.workflows.run.LabelScorer`: a classifier trained on single texts, say toxic / ok). A text is
blocked when the probability of any of ``--guard-labels`` is at or above ``--guard-threshold``. It reads the
requests' texts (``--guard-on input``: chat messages, prompts, classify and task inputs) and the generated
answers (``output``: chat and completions), batched on the served model's worker thread, so the model and the
guard never compute at once and the server's queue limit covers both. A blocked input is refused with a 400
whose error type is ``content_filter`` (``--guard-action replace``: chat and completions answer the guard's
message instead, with ``finish_reason: "content_filter"``, and the model does not run); a blocked answer is
replaced by the message, with ``finish_reason: "content_filter"``, as OpenAI's filter does.

``--redact-pii`` masks personal data (:mod:`lmtune.data.pii_engine`, offline presidio) in every answer before
it leaves the server (``<EMAIL_ADDRESS>``, ``<PHONE_NUMBER>`` ...) and in every log record the process writes
while the server runs (:meth:`PiiMasker.mask_logs`: a log-record factory rewrites each record's arguments,
message and traceback as it is made, whatever logger or handler writes it).

Streamed answers are buffered whole when an output guard or masking is on (see :attr:`Safeguards.buffers_streams`):
text already sent cannot be taken back, so the client gets the screened answer in one piece after generation
ends, rather than token by token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.errors import ConfigError, LmtuneError
from lmtune.serve.batching import Batcher, ModelWorker
from lmtune.serve.engine import StopWhenAbandoned
from lmtune.serve.gate import APIError
from lmtune.serve.options import ServeOptions
from lmtune.workflows.run import LabelScorer, Run

log = logging.getLogger("lmtune")

CONTENT_FILTER = "content_filter"
# The answer a chat or completion choice gets in place of a blocked text.
FINISH_FILTERED = CONTENT_FILTER
# A traceback's frame line (``  File "x.py", line 3, in f``): code locations are not data, and are kept as
# they are (presidio reads ``app.py`` as a URL).
_FRAME_LINE = re.compile(r'^(\s*)File ".*", line \d+')


@dataclass(frozen=True)
class Verdict:
    """The guard's reading of one text: whether it is blocked, and its most likely blocked label."""

    blocked: bool
    label: str
    probability: float


class SafeguardStats:
    """Counts for ``/metrics``; safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.checked: Counter[str] = Counter()  # "input": requests screened, "output": answers screened
        self.blocked: Counter[str] = Counter()  # the same, blocked
        self.replaced = 0  # answers whose text became the guard's message
        self.masked: Counter[tuple[str, str]] = Counter()  # (entity type, "answer" | "log") -> findings masked

    def count(self, *, checked: str | None = None, blocked: str | None = None, replaced: int = 0) -> None:
        """Add one screened request or answer (``checked``), one blocked, and ``replaced`` answers."""
        with self._lock:
            if checked:
                self.checked[checked] += 1
            if blocked:
                self.blocked[blocked] += 1
            self.replaced += replaced

    def count_masked(self, counts: Counter[str], where: str) -> None:
        """Add personal-data findings masked in an answer or a log record, per entity type."""
        with self._lock:
            for entity, n in counts.items():
                self.masked[(entity, where)] += n

    def prometheus(self, *, guard: bool, pii: bool) -> str:
        """The counters in the Prometheus text format (those of the safeguards that are on)."""
        with self._lock:
            checked, blocked, replaced, masked = dict(self.checked), dict(self.blocked), self.replaced, dict(self.masked)
        lines: list[str] = []
        if guard:
            lines += ["# HELP lmtune_guard_checked_total Requests whose inputs (on=input) and answers (on=output) "
                      "the guard screened.", "# TYPE lmtune_guard_checked_total counter"]
            lines += [f'lmtune_guard_checked_total{{on="{on}"}} {checked.get(on, 0)}' for on in ("input", "output")]
            lines += ["# HELP lmtune_guard_blocked_total Requests (on=input) and answers (on=output) the guard blocked.",
                      "# TYPE lmtune_guard_blocked_total counter"]
            lines += [f'lmtune_guard_blocked_total{{on="{on}"}} {blocked.get(on, 0)}' for on in ("input", "output")]
            lines += ["# HELP lmtune_guard_replaced_total Answers replaced by the guard's message.",
                      "# TYPE lmtune_guard_replaced_total counter", f"lmtune_guard_replaced_total {replaced}"]
        if pii:
            lines += ["# HELP lmtune_pii_masked_total Personal data masked, by entity type, in answers and log records.",
                      "# TYPE lmtune_pii_masked_total counter"]
            lines += [f'lmtune_pii_masked_total{{entity="{entity}",where="{where}"}} {n}'
                      for (entity, where), n in sorted(masked.items())]
        return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------------------------------------- the guard
class Guard:
    """A classifier run screening texts (see the module's docstring); loaded and checked when built."""

    def __init__(self, options: ServeOptions) -> None:
        assert options.guard is not None
        self.options = options
        self.path = Path(options.guard)
        try:
            run = Run.load(self.path)
            scorer = None if run.generative else run.predictor()
        except LmtuneError as exc:
            raise ConfigError(f"--guard {self.path}: {exc.message}", field="guard", hint=exc.hint) from None
        # A guard is asked, never named: any predictor that scores a label set for single texts will do.
        single_texts = scorer is not None and scorer.check_item("text") is None
        if not isinstance(scorer, LabelScorer) or not single_texts:
            raise ConfigError(f"--guard {self.path} is a '{run.task}' run; a guard must be a classifier of single "
                              "texts (a run whose predictor gives label probabilities)", field="guard",
                              hint="train a classification run (texts -> labels such as toxic / ok) and pass its folder")
        self.scorer: LabelScorer = scorer
        labels = list(scorer.labels)
        if not options.guard_labels:
            raise ConfigError("--guard needs --guard-labels: which of the guard's labels block a text", field="guard_labels",
                              hint=f"the guard's labels are {', '.join(labels)} (e.g. --guard-labels {labels[-1]})")
        unknown = [label for label in options.guard_labels if label not in labels]
        if unknown:
            raise ConfigError(f"--guard-labels names {', '.join(repr(u) for u in unknown)}, which the guard does not "
                              f"know", field="guard_labels", hint=f"the guard's labels are {', '.join(labels)}")
        self.blocked_columns = [labels.index(label) for label in options.guard_labels]
        self.labels = labels
        self.batcher: Batcher | None = None

    @property
    def on_input(self) -> bool:
        """Whether requests' texts are screened."""
        return self.options.guard_on in ("input", "both")

    @property
    def on_output(self) -> bool:
        """Whether generated answers are screened."""
        return self.options.guard_on in ("output", "both")

    def start(self, worker: ModelWorker) -> None:
        """Batch on ``worker`` (the served model's thread; on the running loop)."""
        self.batcher = Batcher(self._run_batch, worker, max_batch_size=self.options.max_batch_size,
                               wait_ms=self.options.batch_wait_ms)
        self.batcher.start()

    async def stop(self) -> None:
        """Stop batching (before the worker stops)."""
        if self.batcher is not None:
            await self.batcher.stop()

    async def check(self, texts: list[str]) -> list[Verdict]:
        """One verdict per text, batched with the texts of concurrent requests."""
        assert self.batcher is not None, "Guard.start() was not called"
        return await self.batcher.submit(("guard",), None, texts)

    def _run_batch(self, key: Hashable, context: Any, texts: list[str], abandoned: Callable[[], bool]) -> list[Verdict]:
        """Worker thread: the guard's probabilities for ``texts``, read against the blocked labels."""
        rows = min(len(texts), max(64, self.options.max_batch_size))
        probs = self.scorer.probabilities(texts, None, batch_size=rows, progress=StopWhenAbandoned(abandoned))  # (N, L)
        verdicts = []
        for row in probs:
            column = max(self.blocked_columns, key=lambda c: float(row[c]))
            p = float(row[column])
            verdicts.append(Verdict(p >= self.options.guard_threshold, self.labels[column], p))
        return verdicts


# ---------------------------------------------------------------------------------------------- personal data
class PiiMasker:
    """Masks personal data in texts as ``<TYPE>`` (every type of :data:`lmtune.data.pii.PII_ENTITIES`; person names
    also from the ``ner`` model folder, ``--pii-ner``), counting what it masked; built once at server start (the
    analyzer takes seconds to build)."""

    def __init__(self, stats: SafeguardStats, ner: str | None = None) -> None:
        from lmtune.data.pii_engine import PiiScanner, ner_names  # noqa: PLC0415  (presidio and spaCy: ~200 MB, loaded only by a server that masks personal data)

        self.scanner = PiiScanner(ner=ner_names(ner, None) if ner else None)
        self.stats = stats
        self._lock = threading.Lock()  # one analysis at a time: the analyzer is shared by every thread
        self._busy = threading.local()  # inside a masking call on this thread (presidio's own log records)

    def mask(self, text: str) -> tuple[str, Counter[str]]:
        """``text`` with its personal data replaced by ``<TYPE>``, and the findings per type."""
        with self._lock:
            findings = self.scanner.find(text)
            if not findings:
                return text, Counter()
            return self.scanner.rewrite(text, findings, "redact"), Counter(f.entity for f in findings)

    def mask_answer(self, text: str) -> str:
        """:meth:`mask`, counted as an answer's."""
        masked, counts = self.mask(text)
        self.stats.count_masked(counts, "answer")
        return masked

    def mask_value(self, value: Any, keep: frozenset[str]) -> Any:
        """Every string in a JSON value masked (an answer of ``/v1/predict``: entity texts, answer spans,
        generated texts), but those in ``keep`` (the model's label names) and the keys."""
        if isinstance(value, str):
            return value if value in keep else self.mask_answer(value)
        if isinstance(value, dict):
            return {k: self.mask_value(v, keep) for k, v in value.items()}
        if isinstance(value, list):
            return [self.mask_value(v, keep) for v in value]
        return value

    # ------------------------------------------------------------------------------------ the log
    def mask_logs(self) -> Callable[[], None]:
        """From now on, mask every log record of the process as it is made; returns the function that stops it.

        A record factory rather than a handler filter: it sees the records of every logger (``lmtune.*``,
        uvicorn, libraries) whatever handlers are attached now or later. Each record's arguments are masked
        (the data in ``log.error("... %s", text)``), its message (an f-string) and its traceback (exception
        messages; frame lines stay as they are). A record that cannot be masked is replaced by a notice.
        """
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if getattr(self._busy, "on", False):
                return record  # a record of the analyzer itself, made while it masks another one
            self._busy.on = True
            try:
                self._mask_record(record)
            except Exception as exc:  # never let raw text through because masking failed
                record.msg, record.args = f"(log record withheld: masking personal data failed: {type(exc).__name__})", None
                record.exc_info = record.exc_text = record.stack_info = None
            finally:
                self._busy.on = False
            return record

        logging.setLogRecordFactory(factory)

        def restore() -> None:
            if logging.getLogRecordFactory() is factory:
                logging.setLogRecordFactory(previous)

        return restore

    def _mask_record(self, record: logging.LogRecord) -> None:
        counts: Counter[str] = Counter()

        def masked(text: str) -> str:
            out, found = self.mask(text)
            counts.update(found)
            return out

        # The arguments first (where data usually is), keeping the format string, which formatters such as
        # uvicorn's coloured one format again; then the whole message, for data in the format string itself
        # (an f-string) or spread over arguments.
        if isinstance(record.args, tuple):
            record.args = tuple(self._masked_arg(a, masked) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._masked_arg(a, masked) for k, a in record.args.items()}
        message = record.getMessage()
        rewritten = masked(message)
        if rewritten != message:
            record.msg, record.args = rewritten, None
        if record.exc_info:
            # Formatters print exc_text when it is set and exc_info is not (handlers that render exc_info
            # themselves, such as rich tracebacks, then have nothing raw to render).
            record.exc_text = self._masked_traceback(logging.Formatter().formatException(record.exc_info), masked)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self._masked_traceback(record.exc_text, masked)
        if record.stack_info:
            record.stack_info = self._masked_traceback(record.stack_info, masked)
        self.stats.count_masked(counts, "log")

    @staticmethod
    def _masked_arg(arg: Any, masked: Callable[[str], str]) -> Any:
        if isinstance(arg, (int, float, bool)) or arg is None:
            return arg  # %d and %.2f need numbers; numbers alone are not what the recognizers find
        text = arg if isinstance(arg, str) else str(arg)
        out = masked(text)
        return arg if out == text else out

    @staticmethod
    def _masked_traceback(text: str, masked: Callable[[str], str]) -> str:
        """A traceback with its exception messages masked; frame lines and the code lines under them kept."""
        out, code_indent = [], None
        for line in text.splitlines():
            frame = _FRAME_LINE.match(line)
            if frame is not None:
                out.append(line)
                code_indent = frame.group(1) + "  "
            elif code_indent is not None and line.startswith(code_indent) and line.strip():
                out.append(line)  # the source line of the frame above (and its ^^^ markers)
            else:
                code_indent = None
                out.append(masked(line))
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------- together
class Safeguards:
    """The guard and the masker a server runs with (either may be off); what the request handlers call."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.stats = SafeguardStats()
        # Built before the served model loads: a bad --guard fails fast, and the analyzer's build is paid once.
        self.guard = Guard(options) if options.guard is not None else None
        self.masker = PiiMasker(self.stats, options.pii_ner) if options.redact_pii else None
        self._restore_log: Callable[[], None] | None = None

    @property
    def buffers_streams(self) -> bool:
        """Whether a streamed answer is generated whole and screened before any of it is sent."""
        return self.masker is not None or (self.guard is not None and self.guard.on_output)

    def start(self, worker: ModelWorker) -> None:
        """Start the guard's batching on the served model's worker and mask the log (on the running loop)."""
        if self.guard is not None:
            self.guard.start(worker)
        if self.masker is not None:
            self._restore_log = self.masker.mask_logs()

    async def stop(self) -> None:
        """Stop the guard's batching and the log masking."""
        if self.guard is not None:
            await self.guard.stop()
        if self._restore_log is not None:
            self._restore_log()
            self._restore_log = None

    def describe(self) -> dict[str, Any]:
        """What the page and ``/v1/run`` show: the guard's labels, threshold and sides, and masking."""
        o = self.options
        guard = None if self.guard is None else {
            "labels": list(o.guard_labels), "threshold": o.guard_threshold, "on": o.guard_on, "action": o.guard_action}
        return {"guard": guard, "redact_pii": self.masker is not None}

    async def check_input(self, texts: list[str], param: str, *, replaceable: bool) -> bool:
        """Screen a request's texts: False when they pass (or no input guard), True when the answer is to be the
        guard's message (``--guard-action replace`` and a ``replaceable`` endpoint); a 400 ``content_filter``
        error otherwise."""
        guard = self.guard
        if guard is None or not guard.on_input:
            return False
        places = [i for i, t in enumerate(texts) if t.strip()]
        verdicts = await guard.check([texts[i] for i in places]) if places else []
        self.stats.count(checked="input")
        hit = next(((i, v) for i, v in zip(places, verdicts, strict=True) if v.blocked), None)
        if hit is None:
            return False
        self.stats.count(blocked="input")
        if self.options.guard_action == "replace" and replaceable:
            return True
        i, verdict = hit
        where = f"{param} text {i + 1}" if len(texts) > 1 else param
        raise APIError(400, f"{where} was refused by the server's content filter ('{verdict.label}' "
                       f"{verdict.probability:.2f} at or above the threshold {self.options.guard_threshold:g})",
                       type=CONTENT_FILTER, param=param, code=CONTENT_FILTER)

    def withheld(self, prompt_tokens: int) -> dict[str, Any]:
        """The answer standing for one choice of a blocked input (``--guard-action replace``): the guard's message,
        nothing generated."""
        self.stats.count(replaced=1)
        return {"text": self.options.guard_message, "finish_reason": FINISH_FILTERED, "prompt_tokens": prompt_tokens,
                "completion_tokens": 0}

    async def screen_answers(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generated answers (``text``, ``finish_reason`` ...) as they may leave the server: a blocked one replaced
        by the guard's message (``finish_reason: "content_filter"``), personal data masked in the others.
        Returns new dicts; the same dict may stand for several choices (greedy answers repeated)."""
        out = [dict(r) for r in results]
        guard = self.guard
        if guard is not None and guard.on_output:
            texts = sorted({r["text"] for r in out if r["text"].strip()})
            verdicts = dict(zip(texts, await guard.check(texts), strict=True)) if texts else {}
            for r in out:
                verdict = verdicts.get(r["text"])
                blocked = verdict is not None and verdict.blocked
                self.stats.count(checked="output", blocked="output" if blocked else None, replaced=int(blocked))
                if blocked:
                    r["text"], r["finish_reason"] = self.options.guard_message, FINISH_FILTERED
        masker = self.masker
        if masker is not None:
            todo = [r for r in out if r.get("finish_reason") != FINISH_FILTERED]
            # The analyzer is Python work of a few ms per text: off the event loop.
            texts = await asyncio.to_thread(lambda: [masker.mask_answer(r["text"]) for r in todo])
            for r, text in zip(todo, texts, strict=True):
                r["text"] = text
        return out

    async def mask_results(self, results: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
        """Task answers (``/v1/predict``, ``/v1/classify`` ...) with the personal data in their strings masked,
        the model's label names left as they are; as they are without ``--redact-pii``."""
        masker = self.masker
        if masker is None:
            return results
        keep = frozenset(labels)
        return await asyncio.to_thread(lambda: [masker.mask_value(r, keep) for r in results])
