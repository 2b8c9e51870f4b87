"""Coverage-guided fuzzing of the readers and the config loader with atheris (optional).

    pip install atheris==3.0.0      # a cp311 manylinux wheel; no compiler needed
    python tests/fuzz/atheris_fuzz.py TARGET [RUNS] [libFuzzer flags, e.g. -max_total_time=600 CORPUS_DIR]

TARGET is one of :data:`TARGETS` (csv, tsv, jsonl, json, parquet, text, conll, squad, chat, config, gz);
RUNS (default 10000) inputs are tried, then the counts are printed. The property is the one of
tests/test_fuzz.py: an input gives a clean result or an LmtuneError naming the file; any other
exception is a crash, which libFuzzer reports with the input saved as ``crash-*`` in the current folder
(replay it: ``python tests/fuzz/atheris_fuzz.py TARGET crash-FILE``). ``-timeout=20`` (the default
here) makes an input slower than 20 s a crash too.

lmtune and PyYAML are instrumented, so inputs that reach new branches of them are kept and mutated.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import atheris
except ImportError:  # pragma: no cover - only when atheris is missing
    sys.exit("atheris is not installed: pip install atheris==3.0.0 (a cp311 manylinux wheel)")

with atheris.instrument_imports(include=["lmtune", "yaml"]):
    from lmtune.config import DataConfig, load_config
    from lmtune.data import chat
    from lmtune.data.readers import read_table
    from lmtune.data.squad import clean_items, read_qa_items
    from lmtune.errors import LmtuneError


def _squad(path: Path) -> Any:
    items, source, _ = read_qa_items(str(path), DataConfig(train="x"))
    return clean_items(items, source, allow_unanswerable=True, empty_text="skip")


def _chat(path: Path) -> Any:
    table = read_table(path)
    fmt = chat.detect_format(table.rows, {}, str(path))
    return [chat.to_messages(r, fmt, {}, source=str(path), line=n) for r, n in zip(table.rows, table.lines, strict=True)]


# target -> (file name, what reads it)
TARGETS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "csv": ("fuzz.csv", read_table),
    "tsv": ("fuzz.tsv", read_table),
    "jsonl": ("fuzz.jsonl", read_table),
    "json": ("fuzz.json", read_table),
    "parquet": ("fuzz.parquet", read_table),
    "text": ("fuzz.txt", read_table),
    "conll": ("fuzz.conll", read_table),
    "gz": ("fuzz.csv.gz", read_table),
    "squad": ("fuzz-squad.json", _squad),
    "chat": ("fuzz-chat.jsonl", _chat),
    "config": ("fuzz.yaml", load_config),
}


# Valid inputs libFuzzer starts mutating from (it grows inputs slowly from nothing).
_ROOT = Path(__file__).resolve().parents[2]
SEEDS: dict[str, list[bytes]] = {
    "csv": [b'text,label\ngood film,pos\n"dull, slow",neg\n'],
    "tsv": [b"text\tlabel\ngood film\tpos\ndull\tneg\n"],
    "jsonl": [b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg", "tags": [1, 2]}\n'],
    "json": [b'[{"text": "good", "label": "pos"}]', b'{"text": ["a", "b"], "label": [1, 0]}'],
    "text": [b"one line\nanother\r\n"],
    "conll": [b"-DOCSTART- O\n\nEU B-ORG\nrejects O\n\nPeter B-PER\n"],
    "squad": [b'{"data": [{"title": "t", "paragraphs": [{"context": "abc def", "qas": [{"id": "1", "question": "q?",'
              b' "answers": [{"text": "def", "answer_start": 4}]}]}]}]}'],
    "chat": [b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
             b'{"instruction": "add", "input": "1 1", "output": "2"}\n'],
    "config": [p.read_bytes() for p in sorted((_ROOT / "examples").glob("*.yaml"))][:8],
}


def _seed_corpus(target: str) -> str:
    import gzip
    import io

    folder = Path(tempfile.mkdtemp(prefix=f"lmtune-atheris-{target}-corpus-"))
    seeds = SEEDS.get(target, [])
    if target == "gz":
        seeds = [gzip.compress(s) for s in SEEDS["csv"]]
    if target == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(pa.table({"text": ["good", "bad"], "label": ["pos", "neg"]}), sink)
        seeds = [sink.getvalue()]
    for i, seed in enumerate(seeds):
        (folder / f"seed-{i}").write_bytes(seed)
    return str(folder)


def main() -> None:
    """Fuzz the target named by argv[1] for argv[2] runs (libFuzzer flags may follow)."""
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} TARGET [RUNS] [libFuzzer flags]; TARGET: {', '.join(TARGETS)}")
    name, reader = TARGETS[sys.argv[1]]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 10_000
    flags = [a for a in sys.argv[2:] if not a.isdigit()]
    path = Path(tempfile.mkdtemp(prefix="lmtune-atheris-")) / name
    counts: Counter[str] = Counter()

    def one_input(data: bytes) -> None:
        path.write_bytes(data)
        counts["inputs"] += 1
        try:
            reader(path)
            counts["clean"] += 1
        except LmtuneError as err:
            counts[type(err).__name__] += 1
            if str(path) not in str(err):
                raise AssertionError(f"the error does not name the file: {err}") from None
        if counts["inputs"] >= runs:
            # libFuzzer's own exit skips Python's atexit, so the counts are printed here.
            print(f"{sys.argv[1]}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()), flush=True)
            os._exit(0)

    if not any(not f.startswith("-") for f in flags):  # no corpus folder or crash file given: start from seeds
        flags.append(_seed_corpus(sys.argv[1]))
    atheris.Setup([sys.argv[0], "-timeout=20", *flags], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
