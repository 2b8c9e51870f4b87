"""Load test of ``lmtune serve`` on loopback: throughput and latency with dynamic batching vs one at a time.

Serves one sft run (``lmtune serve`` in a subprocess, 127.0.0.1 only) and measures, with the same chat
request shape (greedy, ``max_tokens`` new tokens, prompts from the bundled chatterbot questions):

    one_at_a_time   a single client, each request sent when the previous answer arrived
    concurrent      ``--requests`` requests from ``--clients`` concurrent clients (keep-alive connections)
    unbatched       (``--unbatched``) the same concurrent clients (``--unbatched-requests`` requests) against a
                    server started with --max-batch-size 1: concurrency without batching

With ``--batching continuous`` it compares instead a ``--batching window`` server with a ``--batching continuous``
one (both running, rounds interleaved so a loaded machine slows both alike) at ``--client-levels`` clients
(``--requests-per-client`` requests each), ``--rounds`` rounds, and reports each figure's median over the rounds.

It reports requests/s, generated tokens/s, p50/p90/p99 latency, errors, and the batch sizes the server
ran (its /metrics). The load is bounded in count and time: each phase stops after its requests or after
``--max-seconds``, whichever comes first. The model is a ~28M-parameter Llama (SmolLM2's tokenizer, as
``bench_sft.py`` builds it) tuned for two steps on the chatterbot conversations, or ``--model smollm2``.

    python benchmarks/bench_serve.py --output serve.json                 # the BENCHMARKS.md measurement
    python benchmarks/bench_serve.py --requests 100 --clients 16 --sequential 10   # a quick check
    python benchmarks/bench_serve.py --model smollm2 --batching continuous --output cb.json   # window vs continuous
    python benchmarks/bench_serve.py --model smollm2 --batching continuous --llama-cpp-server f16 --output ll.json

``--llama-cpp-server f16|q8_0|q4_k_m`` adds llama.cpp's own server on the run's GGUF export; it needs the
server extras of llama-cpp-python (``pip install 'llama-cpp-python[server]==0.3.36'``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import build_model  # the same ~28M Llama with SmolLM2's tokenizer

HOST = "127.0.0.1"  # loopback only, ever


def train_run(workdir: Path, model: str) -> Path:
    """An sft run to serve: two LoRA-free steps on the bundled English chatterbot conversations."""
    import lmtune

    run_dir = workdir / "run"
    if (run_dir / "model" / "lmtune.json").is_file():
        return run_dir
    model_dir = build_model(workdir, model)
    cfg = {"task": "sft", "model": str(model_dir), "data": {"train": "bundled:chatterbot", "max_length": 256},
           "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32"},
           "generation": {"eval_examples": 4, "max_new_tokens": 16}, "baselines": [], "output_dir": str(run_dir)}
    lmtune.train(cfg, overwrite=True, show_progress=False)
    return run_dir


def prompts() -> list[str]:
    """User questions of the bundled chatterbot conversations (first turns), in file order."""
    from lmtune.data.bundled import resolve_bundled_data

    out = []
    for line in resolve_bundled_data("chatterbot").read_text(encoding="utf-8").splitlines():
        first = json.loads(line)["messages"][0]
        if first["role"] == "user" and first["content"].strip():
            out.append(first["content"])
    return out


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(command: list[str], port: int, log: Path, env: dict[str, str], what: str,
                 probe: str = "/health") -> subprocess.Popen[bytes]:
    """Start ``command`` (a server on ``port``), its output in ``log``; returns it once it answers ``probe`` (up
    to 5 minutes), or exits saying ``what`` did not start, with its log."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while True:
        try:
            if _call(port, "GET", probe, None)[0] == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start:\n{log.read_text()}")
        time.sleep(0.25)


class Server:
    """``lmtune serve RUN`` in a subprocess on a free loopback port."""

    def __init__(self, run_dir: Path, log: Path, *, max_batch_size: int, batch_wait_ms: float,
                 batching: str = "window", precision: str = "fp32") -> None:
        self.port = free_port()
        self.log = log
        self.proc = start_server(
            [sys.executable, "-m", "lmtune", "serve", str(run_dir), "--host", HOST, "--port", str(self.port),
             "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(batch_wait_ms), "--batching", batching,
             "--precision", precision],
            self.port, log,
            # no key (an empty LMTUNE_API_KEY is refused by lmtune serve: unset it)
            {k: v for k, v in os.environ.items() if k != "LMTUNE_API_KEY"}, "the server")

    def metrics(self) -> dict[str, float]:
        """The batching counters of /metrics."""
        _, body = _call(self.port, "GET", "/metrics", None)
        out = {}
        for line in body.decode().splitlines():
            if line.startswith(("lmtune_batches_total ", "lmtune_batched_requests_total ", "lmtune_batch_requests_max ")):
                name, value = line.split(" ")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        """Stop the server."""
        self.proc.terminate()
        self.proc.wait(timeout=60)


class TransformersServer(Server):
    """``transformers serve MODEL --continuous-batching`` (its OpenAI-compatible server) on a free loopback
    port, pinned to the run's model folder (offline: a local path), fp32 on the CPU as lmtune serves it."""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.model = str(model_dir)
        exe = Path(sys.executable).with_name("transformers")
        self.proc = start_server(
            [str(exe), "serve", self.model, "--continuous-batching", "--host", HOST, "--port", str(self.port),
             "--device", "cpu", "--dtype", "float32", "--no-cb-use-cuda-graph"],
            self.port, log, {**os.environ, "HF_HUB_OFFLINE": "1"}, "transformers serve")

    def metrics(self) -> dict[str, float]:
        """No lmtune batch counters here."""
        return {}


class LlamaCppServer(Server):
    """llama.cpp's own OpenAI-compatible server (``python -m llama_cpp.server``, llama-cpp-python's) on the run
    exported with ``lmtune export --format gguf --quantize QUANT`` (checked against the trained model there),
    on a free loopback port with the same thread count. It answers one request at a time (no batching across
    requests); the chat template is the one the export wrote into the GGUF."""

    def __init__(self, run_dir: Path, workdir: Path, log: Path, *, quantization: str, threads: int) -> None:
        from lmtune.workflows.export_gguf import export_gguf

        folder = workdir / f"gguf-{quantization}"
        if not (folder / "model.gguf").is_file():
            export_gguf(run_dir, folder, quantization=quantization, overwrite=True)
        self.port = free_port()
        self.log = log
        self.model = "model"
        self.proc = start_server(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(folder / "model.gguf"), "--model_alias", "model",
             "--host", HOST, "--port", str(self.port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
             "--n_ctx", "2048", "--verbose", "False"],
            self.port, log, dict(os.environ), "llama_cpp.server", probe="/v1/models")

    def metrics(self) -> dict[str, float]:
        """No lmtune batch counters here."""
        return {}


def _call(port: int, method: str, path: str, body: Any, conn: http.client.HTTPConnection | None = None,
          ) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def load(port: int, questions: list[str], *, requests: int, clients: int, max_tokens: int,
         max_seconds: float, model: str = "m") -> dict[str, Any]:
    """Send ``requests`` chat requests from ``clients`` threads (each with its own keep-alive connection)."""
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=600)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= requests or time.monotonic() > deadline:
                        return
                    next_index[0] += 1
                body = {"model": model, "messages": [{"role": "user", "content": questions[i % len(questions)]}],
                        "max_tokens": max_tokens, "temperature": 0}
                started = time.perf_counter()
                try:
                    status, data = _call(port, "POST", "/v1/chat/completions", body, conn)
                except OSError as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, port, timeout=600)
                    continue
                seconds = time.perf_counter() - started
                with lock:
                    if status != 200:
                        errors.append(f"{status}: {data[:200]!r}")
                    else:
                        latencies.append(seconds)
                        tokens.append(json.loads(data)["usage"]["completion_tokens"])
        finally:
            conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")

    return {"requests": len(latencies), "errors": len(errors), "error_examples": errors[:5], "clients": clients,
            "seconds": elapsed, "requests_per_s": len(latencies) / elapsed, "tokens_per_s": sum(tokens) / elapsed,
            "completion_tokens": sum(tokens), "latency_p50_s": pct(0.5), "latency_p90_s": pct(0.9),
            "latency_p99_s": pct(0.99), "latency_mean_s": statistics.fmean(latencies) if latencies else None,
            "stopped_by_time": len(latencies) + len(errors) < requests}


def phase(server: Server, name: str, questions: list[str], **kwargs: Any) -> dict[str, Any]:
    """One load phase, with the server's batch counters over it."""
    before = server.metrics()
    result = load(server.port, questions, model=getattr(server, "model", "m"), **kwargs)
    after = server.metrics()
    batches = after.get("lmtune_batches_total", 0) - before.get("lmtune_batches_total", 0)
    batched = after.get("lmtune_batched_requests_total", 0) - before.get("lmtune_batched_requests_total", 0)
    result.update(phase=name, batches=batches, mean_batch_requests=batched / batches if batches else None,
                  max_batch_requests=after.get("lmtune_batch_requests_max"))
    print(f"{name:>14}: {result['requests']} requests ({result['errors']} errors) in {result['seconds']:.1f} s: "
          f"{result['requests_per_s']:.2f} req/s, {result['tokens_per_s']:.0f} tok/s, p50 "
          f"{result['latency_p50_s']:.3f} s, p99 {result['latency_p99_s']:.3f} s, mean batch "
          f"{result['mean_batch_requests'] or 0:.1f} requests", flush=True)
    return result


def compare_batching(run_dir: Path, workdir: Path, questions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Window vs continuous batching: both servers up, phases interleaved per round; medians over rounds."""
    common = {"max_tokens": args.max_tokens, "max_seconds": args.max_seconds}
    servers = {name: Server(run_dir, workdir / f"serve-{name}.log", max_batch_size=args.max_batch_size,
                            batch_wait_ms=args.batch_wait_ms, batching=name, precision=args.precision)
               for name in ("window", "continuous")}
    if args.transformers_serve:
        servers["transformers"] = TransformersServer(run_dir / "model", workdir / "serve-transformers.log")
    if args.llama_cpp_server:
        servers[f"llama.cpp {args.llama_cpp_server}"] = LlamaCppServer(
            run_dir, workdir, workdir / "serve-llama-cpp.log", quantization=args.llama_cpp_server,
            threads=args.threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    rounds: dict[str, list[dict[str, Any]]] = {}
    try:
        for server in servers.values():
            load(server.port, questions, requests=8, clients=4, model=getattr(server, "model", "m"),
                 **common)  # warm-up (first calls allocate)
        for r in range(args.rounds):
            for clients in args.client_levels:
                # alternate which variant goes first, so neither always meets the same machine load
                names = list(servers) if (r + clients) % 2 == 0 else list(reversed(list(servers)))
                for name in names:
                    result = phase(servers[name], f"{name} x{clients}", questions,
                                   requests=clients * args.requests_per_client, clients=clients, **common)
                    rounds.setdefault(f"{name}_{clients}", []).append(result)
    finally:
        for server in servers.values():
            server.stop()
    figures = ("requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p99_s")
    summary: dict[str, Any] = {}
    print(f"{'variant':>16} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} errors (medians of {args.rounds})")
    for key, runs in rounds.items():
        row = {f: statistics.median(x[f] for x in runs) for f in figures}
        row["errors"] = sum(x["errors"] for x in runs)
        row["requests"] = sum(x["requests"] for x in runs)
        summary[key] = row
        print(f"{key:>16} {row['requests_per_s']:7.2f} {row['tokens_per_s']:7.0f} {row['latency_p50_s']:7.3f} "
              f"{row['latency_p99_s']:7.3f} {row['errors']}")
    return {"rounds": rounds, "medians": summary}


def main() -> None:
    """Run the phases and print / save the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=500, help="Requests of the concurrent phase.")
    p.add_argument("--clients", type=int, default=32, help="Concurrent clients.")
    p.add_argument("--sequential", type=int, default=40, help="Requests of the one-at-a-time phase.")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request (greedy).")
    p.add_argument("--max-batch-size", type=int, default=32, help="The server's --max-batch-size.")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="The server's --batch-wait-ms.")
    p.add_argument("--max-seconds", type=float, default=600, help="Time cap of each phase.")
    p.add_argument("--unbatched", action="store_true", help="Also run the concurrent load with --max-batch-size 1.")
    p.add_argument("--unbatched-requests", type=int, default=100, help="Requests of the unbatched phase.")
    p.add_argument("--batching", choices=("window", "continuous"), default="window",
                   help="continuous: compare a --batching window server with a --batching continuous one instead.")
    p.add_argument("--transformers-serve", action="store_true",
                   help="With --batching continuous: also `transformers serve --continuous-batching` on the model.")
    p.add_argument("--llama-cpp-server", choices=("f16", "q8_0", "q4_k_m"), default=None,
                   help="With --batching continuous: also llama.cpp's server (llama_cpp.server) on the run exported "
                        "to GGUF at this quantization (needs `pip install 'llama-cpp-python[server]==0.3.36'`).")
    p.add_argument("--client-levels", type=int, nargs="+", default=[1, 8, 32], help="With --batching continuous.")
    p.add_argument("--requests-per-client", type=int, default=2, help="With --batching continuous.")
    p.add_argument("--rounds", type=int, default=3, help="With --batching continuous: interleaved rounds.")
    p.add_argument("--precision", choices=("fp32", "auto", "bf16"), default="fp32",
                   help="lmtune serve --precision (with --batching continuous): the weights' dtype; auto is bf16 "
                        "on a CPU that runs it faster (16-bit weights, as llama.cpp's f16 GGUF)")
    p.add_argument("--model", choices=("small", "smollm2"), default="small")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server.")
    p.add_argument("--workdir", type=Path, default=None, help="Keep the run and the server logs here.")
    p.add_argument("--output", type=Path, default=None, help="Write the results as JSON here.")
    args = p.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lmtune-bench-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = train_run(workdir, args.model)
    questions = prompts()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "load_average_start": os.getloadavg()}
    if args.batching == "continuous":
        results["load_average_start"] = os.getloadavg()
        results.update(compare_batching(run_dir, workdir, questions, args))
        results["load_average_end"] = os.getloadavg()
        if args.output:
            args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        return
    common = {"max_tokens": args.max_tokens, "max_seconds": args.max_seconds}
    server = Server(run_dir, workdir / "serve.log", max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms)
    try:
        load(server.port, questions, requests=8, clients=4, **common)  # warm-up (first calls allocate)
        results["one_at_a_time"] = phase(server, "one_at_a_time", questions, requests=args.sequential, clients=1,
                                         **common)
        results["concurrent"] = phase(server, "concurrent", questions, requests=args.requests, clients=args.clients,
                                      **common)
    finally:
        server.stop()
    if args.unbatched:
        server = Server(run_dir, workdir / "serve-unbatched.log", max_batch_size=1, batch_wait_ms=0)
        try:
            load(server.port, questions, requests=4, clients=2, **common)
            results["unbatched"] = phase(server, "unbatched", questions, requests=args.unbatched_requests,
                                         clients=args.clients, **common)
        finally:
            server.stop()
    results["load_average_end"] = os.getloadavg()
    speedup = results["concurrent"]["requests_per_s"] / results["one_at_a_time"]["requests_per_s"]
    results["throughput_vs_one_at_a_time"] = speedup
    print(f"throughput under load: {speedup:.1f}x the one-at-a-time rate; load average "
          f"{results['load_average_start'][0]:.1f} -> {results['load_average_end'][0]:.1f}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
