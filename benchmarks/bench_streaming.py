"""Peak memory as the training data grows, streamed (``data.streaming: true``) vs loaded.

The same tiny Llama (2 layers, hidden 32, SmolLM2's tokenizer; built once) trains causal_lm for the same
number of optimizer steps (batch 8 rows of 128 packed tokens, fp32) on generated story paragraphs
(``tests/helpers.story_text``) at each scale: ``--base`` paragraphs times 1, 10, ... The data is written
once per scale as one Parquet file (what the loaded run reads) and as Parquet shards of 2,500 rows each
(what the streamed run reads: 8 shards at scale 1, 80 at 10x; a data set grows by shards, and streaming
holds what it reads of one shard at a time), in row groups of 1,000 rows as ``datasets`` writes Parquet; validation and test are the same small JSONL files for every run. Only the
amount of training data changes between scales.

Each measurement runs in its own subprocess (fresh interpreter, fresh lmtune cache) and reports its own
peak resident set (``VmHWM`` from /proc/self/status at the end of the run, which covers reading,
tokenising, packing, training, evaluation and saving), wall time and training tokens/s.

    .venv/bin/python benchmarks/bench_streaming.py --scales 1 10 30 --out streaming.json   # ~10 min, 2 cores
    .venv/bin/python benchmarks/bench_streaming.py --base 2000 --scales 1 2    # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Rows per shard: a data set grows by more shards of the same size (train-00000-of-00240.parquet ...).
SHARD_ROWS = 2500
# Rows per Parquet row group, as datasets' own Dataset.to_parquet writes them (config.DEFAULT_MAX_BATCH_SIZE).
# Streaming reads a shard one row group at a time, so the row group, not the shard, sets that memory.
ROW_GROUP = 1000


def _write_data(folder: Path, paragraphs: int) -> tuple[Path, Path]:
    """``train.parquet`` (one file) and ``shards/train-*.parquet`` (the same rows in shards of SHARD_ROWS)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import story_text

    texts = [p.strip() for p in story_text(paragraphs, seed=1).split("\n\n")]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), folder / "train.parquet", row_group_size=ROW_GROUP)
    (folder / "shards").mkdir(exist_ok=True)
    for s, start in enumerate(range(0, len(texts), SHARD_ROWS)):
        pq.write_table(pa.table({"text": texts[start : start + SHARD_ROWS]}), folder / "shards" / f"train-{s:05d}.parquet",
                       row_group_size=ROW_GROUP)
    return folder / "train.parquet", folder / "shards" / "train-*.parquet"


def _texts_of(path: Path) -> list[bytes]:
    import pyarrow.parquet as pq

    return [t.encode("utf-8") for t in pq.read_table(path)["text"].to_pylist()]


def _write_eval(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import story_text

    out = []
    for name, seed in (("validation", 2), ("test", 3)):
        path = folder / f"{name}.jsonl"
        texts = [p.strip() for p in story_text(100, seed=seed).split("\n\n")]
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        out.append(path)
    return out[0], out[1]


def _child(args: argparse.Namespace) -> None:
    """One training run; prints a JSON line with its peak memory."""
    import lmtune

    start = time.perf_counter()
    cfg: dict[str, Any] = {
        "task": "causal_lm", "model": args.model,
        "data": {"train": args.data, "validation": args.validation, "test": args.test, "max_length": 128,
                 "streaming": args.mode == "streaming", "shuffle_buffer": 10_000},
        "train": {"max_steps": args.steps, "batch_size": 8, "learning_rate": 5e-3, "warmup_ratio": 0.0,
                  "log_every": 10, "eval_every": args.steps, "precision": "fp32"},
        "output_dir": args.run_dir,
    }
    run = lmtune.train(cfg, show_progress=False)
    wall = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    summary = run.metrics["summary"]
    print("RESULT " + json.dumps({
        "mode": args.mode, "peak_rss_mib": peak_kib / 1024, "wall_seconds": wall,
        "train_tokens_per_second": summary["train_tokens_per_second"], "steps": summary["steps"],
        "test_perplexity": run.metrics["test"]["perplexity"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=20_000, help="paragraphs of training text at scale 1")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every child")
    parser.add_argument("--out", type=Path, default=None)
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("mode", "data", "validation", "test", "model", "run_dir"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import smollm2_tokenizer, tiny_chat_llama

    work = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    model = tiny_chat_llama(work / "model", smollm2_tokenizer(work / "tokenizer"))
    validation, test = _write_eval(work)
    results = []
    for scale in args.scales:
        paragraphs = args.base * scale
        one_file, shards = _write_data(work / f"x{scale}", paragraphs)
        size_mib = sum(len(p) for p in _texts_of(one_file)) / 2**20
        for mode, data in (("loaded", one_file), ("streaming", shards)):
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LMTUNE_CACHE": str(work / f"cache-{mode}-{scale}"),
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--data", str(data), "--validation",
                   str(validation), "--test", str(test), "--model", str(model), "--run-dir",
                   str(work / f"run-{mode}-{scale}"), "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
                raise SystemExit(f"{mode} at scale {scale} failed")
            r = {"scale": scale, "paragraphs": paragraphs, "text_mib": round(size_mib, 2),
                 **json.loads(line.removeprefix("RESULT "))}
            results.append(r)
            print(f"x{scale:<3} {paragraphs:>8} paragraphs ({size_mib:6.1f} MiB of text)  {mode:<9}  peak RSS "
                  f"{r['peak_rss_mib']:7.0f} MiB  wall {r['wall_seconds']:6.1f} s  "
                  f"{r['train_tokens_per_second']:7.0f} tok/s  test ppl {r['test_perplexity']:.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
