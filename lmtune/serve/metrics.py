"""Request counts and latencies for ``GET /metrics``, in the Prometheus text format (version 0.0.4).

Hand-written rather than ``prometheus_client``: that library's Summary has no quantiles in Python, and
the server needs only counters and latency percentiles. Latencies are kept per endpoint in a bounded
window (the last ``WINDOW`` requests), so percentiles describe recent traffic and memory stays flat.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from lmtune.serve.batching import BatchStats

WINDOW = 10_000
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class _Endpoint:
    counts: dict[int, int] = field(default_factory=dict)  # status -> requests
    seconds_total: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation between order statistics."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class RequestMetrics:
    """Counts requests per (endpoint, status) and keeps their latencies; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._endpoints: dict[str, _Endpoint] = {}

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        """One finished request (a streamed one when its last byte was sent)."""
        with self._lock:
            e = self._endpoints.setdefault(endpoint, _Endpoint())
            e.counts[status] = e.counts.get(status, 0) + 1
            e.seconds_total += seconds
            e.recent.append(seconds)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Per endpoint: counts by status, total requests, and latency percentiles (seconds)."""
        with self._lock:
            out: dict[str, dict[str, object]] = {}
            for name, e in self._endpoints.items():
                recent = list(e.recent)
                out[name] = {"counts": dict(e.counts), "requests": sum(e.counts.values()),
                             "seconds_total": e.seconds_total,
                             **{f"p{round(q * 100)}": percentile(recent, q) for q in QUANTILES}}
            return out

    def prometheus(self, batches: BatchStats | None = None) -> str:
        """All metrics in the Prometheus text exposition format."""
        lines = [
            "# HELP lmtune_requests_total Requests answered, by endpoint and HTTP status.",
            "# TYPE lmtune_requests_total counter",
        ]
        with self._lock:
            endpoints = {name: (dict(e.counts), e.seconds_total, list(e.recent))
                         for name, e in sorted(self._endpoints.items())}
        for name, (counts, _, _) in endpoints.items():
            for status, n in sorted(counts.items()):
                lines.append(f'lmtune_requests_total{{endpoint="{_label(name)}",status="{status}"}} {n}')
        lines += [
            f"# HELP lmtune_request_duration_seconds Request latency (quantiles over the last {WINDOW} requests).",
            "# TYPE lmtune_request_duration_seconds summary",
        ]
        for name, (counts, total, recent) in endpoints.items():
            label = _label(name)
            for q in QUANTILES:
                lines.append(f'lmtune_request_duration_seconds{{endpoint="{label}",quantile="{q}"}} '
                             f"{percentile(recent, q):.6f}")
            lines.append(f'lmtune_request_duration_seconds_sum{{endpoint="{label}"}} {total:.6f}')
            lines.append(f'lmtune_request_duration_seconds_count{{endpoint="{label}"}} {sum(counts.values())}')
        if batches is not None:
            lines += [
                "# HELP lmtune_batches_total Batches run on the model.",
                "# TYPE lmtune_batches_total counter",
                f"lmtune_batches_total {batches.batches}",
                "# HELP lmtune_batched_requests_total Requests run in batches (divide by batches: mean batch size).",
                "# TYPE lmtune_batched_requests_total counter",
                f"lmtune_batched_requests_total {batches.requests}",
                "# HELP lmtune_batched_items_total Items (prompts x n, texts) run in batches.",
                "# TYPE lmtune_batched_items_total counter",
                f"lmtune_batched_items_total {batches.items}",
                "# HELP lmtune_batch_requests_max Most requests run together in one batch.",
                "# TYPE lmtune_batch_requests_max gauge",
                f"lmtune_batch_requests_max {batches.max_requests}",
                "# HELP lmtune_batch_busy_seconds_total Time the model spent on batches.",
                "# TYPE lmtune_batch_busy_seconds_total counter",
                f"lmtune_batch_busy_seconds_total {batches.busy_seconds:.6f}",
                "# HELP lmtune_batch_requests Batches by how many requests they held.",
                "# TYPE lmtune_batch_requests histogram",
            ]
            cumulative = 0
            for bound in (1, 2, 4, 8, 16, 32, 64):
                cumulative = sum(n for size, n in batches.requests_histogram.items() if size <= bound)
                lines.append(f'lmtune_batch_requests_bucket{{le="{bound}"}} {cumulative}')
            lines.append(f'lmtune_batch_requests_bucket{{le="+Inf"}} {batches.batches}')
            lines.append(f"lmtune_batch_requests_sum {batches.requests}")
            lines.append(f"lmtune_batch_requests_count {batches.batches}")
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
