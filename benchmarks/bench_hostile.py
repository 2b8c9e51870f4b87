"""Careless and hostile input (issue 13): the costs that used to be unbounded, measured.

    python benchmarks/bench_hostile.py                      # headers + long texts
    python benchmarks/bench_hostile.py --flood RUN_FOLDER   # also: 150 idle sockets against `lmtune serve`

- **Wide CSV headers:** seconds to read (or refuse) a CSV whose header has 40,000 and 1,000,000 columns.
  Run it with ``PYTHONPATH`` pointing at an older checkout to time the old header check (quadratic).
- **Long texts:** seconds to tokenise a 1 MB text whole (what data preparation and predictors did) and
  clipped first by characters (``data.features.clip_text``, what they do now), for ``max_length`` 128 and
  512 with the bundled MiniLM tokenizer; the ids of the first ``max_length`` tokens must be equal.
- **Idle-socket flood** (``--flood RUN``): ``lmtune serve RUN`` under a 128-file limit, 150 idle connections
  opened, then one request a second for 25 s: how many are answered, and how many bytes the server logs.

Medians of ``--repeats`` runs; the figures and the machine go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lmtune.data.readers import read_table
from lmtune.errors import DataError
from lmtune.models.registry import load_padded_tokenizer, resolve_model


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wide_headers(workdir: Path, repeats: int, columns: list[int]) -> None:
    for n in columns:
        path = workdir / f"wide{n}.csv"
        path.write_text(",".join(f"c{i}" for i in range(n)) + "\n" + ",".join("x" for _ in range(n)) + "\n")
        outcome: list[str] = []

        def read(path: Path = path, outcome: list[str] = outcome) -> None:
            try:
                outcome.append(f"read {len(read_table(path).columns)} columns")
            except DataError as exc:
                outcome.append(f"refused: {exc.message}")

        seconds = _median_seconds(read, repeats)
        print(f"header of {n:>9,} columns: {seconds:.3f} s ({outcome[-1]})")


def long_texts(repeats: int) -> None:
    # Imported here: absent in checkouts before issue 13, whose header figures --headers-only still times.
    from lmtune.data.features import clip_text

    tokenizer = load_padded_tokenizer(resolve_model("minilm"))
    text = ("The quick brown fox jumps over the lazy dog. " * 25_000)[:1_000_000]
    for max_length in (128, 512):
        def whole(max_length: int = max_length) -> list[int]:
            return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]

        def clipped(max_length: int = max_length) -> list[int]:
            return tokenizer(clip_text(text, max_length), truncation=True, max_length=max_length)["input_ids"]

        assert whole() == clipped(), "clipping changed the tokens"
        a, b = _median_seconds(whole, repeats), _median_seconds(clipped, repeats)
        print(f"1 MB text, max_length {max_length}: whole {a:.3f} s, clipped first {b:.4f} s ({a / b:.0f}x)")


def flood(run: Path, port: int) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        server = subprocess.Popen([sys.executable, "-m", "lmtune", "serve", str(run), "--port", str(port)],
                                  stdout=log, stderr=log, preexec_fn=limit)

        def ask(timeout: float) -> int | str:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                conn.request("POST", "/v1/classify", body=json.dumps({"input": ["great film"]}),
                             headers={"Content-Type": "application/json"})
                return conn.getresponse().status
            except OSError as exc:
                return type(exc).__name__
            finally:
                conn.close()

        try:
            start = time.time()
            while ask(1) != 200:
                if time.time() - start > 180:
                    raise SystemExit("the server did not come up")
                time.sleep(0.3)
            before = os.path.getsize(log.name)
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
            answers = []
            for _ in range(25):
                answers.append(ask(2))
                time.sleep(1)
            ok = sum(a == 200 for a in answers)
            print(f"150 idle sockets, 128-file limit: {ok} of 25 requests answered, "
                  f"{os.path.getsize(log.name) - before:,} log bytes in 25 s")
            for s in idle:
                s.close()
        finally:
            server.terminate()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flood", type=Path, help="a run folder to serve for the idle-socket flood")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--headers-only", action="store_true", help="only the header figures (any checkout)")
    parser.add_argument("--columns", type=int, nargs="+", default=[40_000, 1_000_000],
                        help="header widths to time (the old check needs hours for 1,000,000: use 10000 40000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wide_headers(Path(tmp), args.repeats, args.columns)
    if not args.headers_only:
        long_texts(args.repeats)
    if args.flood:
        flood(args.flood, args.port)


if __name__ == "__main__":
    main()
