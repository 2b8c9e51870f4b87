"""data.streaming: training data read as a stream of shards (datasets streaming), packed on the fly."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import story_text
from safetensors.torch import load_file

import lmtune
from lmtune.config import DataConfig, load_config
from lmtune.data.packing import pack_stream
from lmtune.data.streaming import StreamSource, TrainStream, content_key, first_fit_rows, single_rows
from lmtune.errors import ConfigError, DataError
from lmtune.training import checkpoint as ckpt


def _paragraphs(n: int, seed: int = 0) -> list[str]:
    return [p.strip() for p in story_text(n, seed=seed).split("\n\n")]


def _parquet_shards(folder: Path, texts: list[str], shards: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        pq.write_table(pa.table({"text": texts[s::shards]}), folder / f"train-{s:02d}.parquet")
    return folder


def _jsonl_shards(folder: Path, rows: list[dict[str, Any]], shards: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        (folder / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[s::shards]),
                                                encoding="utf-8")
    return folder


def _text_stream(pattern: str, *, shuffle_buffer: int = 16, rank: int = 0, world_size: int = 1,
                 held: set[bytes] | None = None) -> TrainStream:
    """A stream whose 'token sequences' are the texts themselves (one row each): what each pass reads."""
    source = StreamSource(DataConfig(train=pattern, streaming=True, validation_size=1, test_size=1))
    return TrainStream(source, seed=7, shuffle_buffer=shuffle_buffer, held_out=held or set(),
                       to_example=lambda r, _: r["text"] or None, key=lambda x: x,
                       encode=lambda batch: [([ord(c) for c in x], []) for x in batch],
                       to_rows=lambda seqs: ({"input_ids": ids} for ids, _ in seqs), rank=rank,
                       world_size=world_size)


def _texts(stream: TrainStream, epoch: int) -> list[str]:
    stream.set_epoch(epoch)
    return ["".join(map(chr, row["input_ids"])) for row in stream]


# ------------------------------------------------------------------------------------------ the stream itself
def test_stream_passes_are_shuffled_reproducible_and_complete(tmp_path: Path) -> None:
    texts = [f"doc {i}" for i in range(90)]
    _jsonl_shards(tmp_path / "d", [{"text": t} for t in texts], 3)
    stream = _text_stream(str(tmp_path / "d" / "part-*.jsonl"))
    first, again, second = _texts(stream, 0), _texts(stream, 0), _texts(stream, 1)
    assert sorted(first) == sorted(texts) == sorted(second)  # every example once per pass
    assert first == again  # a pass is a function of (seed, epoch): what exact resume needs
    assert first != second and first != texts  # shuffled, differently per epoch
    held = {content_key("doc 3"), content_key("doc 40")}
    # Parquet shards in a folder
    _parquet_shards(tmp_path / "p", texts, 3)
    kept = _texts(_text_stream(str(tmp_path / "p"), held=held), 0)
    assert sorted(kept) == sorted(set(texts) - {"doc 3", "doc 40"})


@pytest.mark.parametrize("shards", [4, 3])  # divisible by 2 processes: split by shard; else by example
def test_processes_read_disjoint_shares(tmp_path: Path, shards: int) -> None:
    texts = [f"doc {i}" for i in range(60)]
    _jsonl_shards(tmp_path / "d", [{"text": t} for t in texts], shards)
    pattern = str(tmp_path / "d" / "*.jsonl")
    shares = [_texts(_text_stream(pattern, rank=r, world_size=2), epoch=1) for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(texts)
    assert abs(len(shares[0]) - len(shares[1])) <= 60 // shards


def test_text_gzip_and_csv_shards(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("one two\nthree\n\nfour\n\n\nfive six\n", encoding="utf-8")
    source = StreamSource(DataConfig(train=str(tmp_path / "t" / "a.txt"), streaming=True, validation_size=1,
                                     test_size=1))
    assert [r["text"].strip("\n") for r in source.records()] == ["one two\nthree", "four", "five six"]
    with gzip.open(tmp_path / "g.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped"}\n{"text": "lines"}\n')
    assert [r["text"] for r in StreamSource(DataConfig(train=str(tmp_path / "g.jsonl.gz"), streaming=True,
                                                       validation_size=1, test_size=1)).records()] == ["zipped", "lines"]
    (tmp_path / "c.csv").write_text("text,other\nhello,1\n", encoding="utf-8")
    assert list(StreamSource(DataConfig(train=str(tmp_path / "c.csv"), streaming=True, validation_size=1,
                                        test_size=1)).records()) == [{"text": "hello", "other": 1}]


def test_bad_sources_are_data_errors(tmp_path: Path) -> None:
    def source(train: str) -> StreamSource:
        return StreamSource(DataConfig(train=train, streaming=True, validation_size=1, test_size=1))

    with pytest.raises(DataError, match="no file matches"):
        source(str(tmp_path / "missing-*.parquet"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "m" / "b.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="mix formats"):
        source(str(tmp_path / "m"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match="cannot read the stream") as err:
        list(source(str(tmp_path / "bad.jsonl")).records())
    assert "bad.jsonl" in str(err.value)


def test_buffer_shuffle_is_a_bounded_permutation() -> None:
    from lmtune.data.streaming import buffer_shuffle

    pulled = 0

    def items() -> Any:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield i

    out = []
    for x in buffer_shuffle(items(), 50, random.Random(0)):
        out.append(x)
        assert pulled - len(out) <= 50  # never more than the buffer held back
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    assert out == list(buffer_shuffle(range(1000), 50, random.Random(0)))


# ------------------------------------------------------------------------------------------ packing on the fly
def test_row_builders() -> None:
    rng = random.Random(0)
    seqs = [(list(range(n)), list(range(n))) for n in (rng.randint(1, 20) for _ in range(200))]
    # the generator behind pack_stream gives the same rows as before
    rows = pack_stream(iter(seqs), 32)
    assert all(len(r["input_ids"]) == 32 for r in rows[:-1])
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(s[0]) for s in seqs)
    # first fit over a bounded buffer: whole sequences, never cut, every token kept, rows well filled
    packed = list(first_fit_rows(iter(seqs), 32, open_rows=4))
    assert all(len(r["input_ids"]) <= 32 for r in packed)
    assert Counter(len(s[0]) for s in seqs) == Counter(
        p + 1 for r in packed for p in _segment_ends(r["position_ids"]))
    fill = sum(len(r["input_ids"]) for r in packed) / (32 * len(packed))
    assert fill > 0.9, fill
    assert all(r["labels"][0] == -100 for r in packed)
    cut = list(single_rows(iter([(list(range(10)), list(range(10)))]), 4))
    assert [len(r["input_ids"]) for r in cut] == [4, 4, 2]


def _segment_ends(positions: list[int]) -> list[int]:
    """The last position of each segment of a packed row (= its length - 1)."""
    return [p for p, nxt in zip(positions, [*positions[1:], 0], strict=True) if nxt == 0]


# ------------------------------------------------------------------------------------------ config
def _stream_cfg(tmp_path: Path, model: Path | str, data: dict[str, Any] | None = None,
                train: dict[str, Any] | None = None, task: str = "causal_lm") -> dict[str, Any]:
    return {
        "task": task, "model": str(model),
        "data": {"train": str(tmp_path / "shards" / "part-*.jsonl"), "streaming": True, "max_length": 32,
                 "validation_size": 12, "test_size": 12, "shuffle_buffer": 32, **(data or {})},
        "train": {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every": 1,
                  "precision": "fp32", "eval_every": 6, **(train or {})},
        "output_dir": str(tmp_path / "run"),
    }


@pytest.mark.parametrize(("change", "words"), [
    ({"train": {"max_steps": None}}, "train.max_steps"),
    ({"train": {"eval_every": None}}, "set train.eval_every"),
    ({"data": {"validation_size": 0.1}}, "data.validation_size must be a count"),
    ({"data": {"test_size": 0.2}}, "data.test_size must be a count"),
    ({"task": "classification"}, "data.streaming is for task causal_lm or sft"),
    ({"data": {"max_samples": 10}}, "data.max_samples"),
    ({"data": {"streaming": False, "validation_size": 12}}, "data.validation_size must be a fraction"),
])
def test_config_checks_name_the_keys(tmp_path: Path, change: dict[str, Any], words: str) -> None:
    cfg = _stream_cfg(tmp_path, "smollm2")
    for section, value in change.items():
        if isinstance(value, dict):
            cfg[section].update(value)
        else:
            cfg[section] = value
    with pytest.raises(ConfigError, match=words):
        load_config(cfg)
    # a file for the split makes its size irrelevant
    ok = _stream_cfg(tmp_path, "smollm2", data={"validation_size": 0.1, "validation": "v.jsonl", "test": "t.jsonl"})
    assert load_config(ok).data.streaming


# ------------------------------------------------------------------------------------------ training
def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_causal_lm_trains_on_a_stream(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    _jsonl_shards(tmp_path / "shards", [{"text": p} for p in _paragraphs(80)], 4)
    run = lmtune.train(_stream_cfg(tmp_path, tiny_chat_llama_dir, train={"max_steps": 24, "eval_every": 12}),
                       show_progress=False)
    m = run.metrics
    assert m["test"]["perplexity"] < m["starting_point"]["test"]["perplexity"] / 10
    log = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["split"] == "train"]
    assert losses[-1] < losses[0] / 2
    # more than one pass over the stream: epochs counted when a pass runs out
    assert max(r["epoch"] for r in log if r["split"] == "train") >= 1
    data = json.loads((run.path / "data.json").read_text())
    assert data["train"]["streaming"] and data["train"]["shards"] == 4
    assert data["validation"]["documents"] == 12 and data["test"]["documents"] == 12
    assert run.meta["task"] == "causal_lm"
    before = load_file(str(tiny_chat_llama_dir / "model.safetensors"))
    after = _weights(run.path)
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)


def test_resume_equals_uninterrupted_on_a_stream(tmp_path: Path, tiny_chat_llama_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash after a checkpoint in a later pass over the stream, resume: bit-identical weights."""
    _jsonl_shards(tmp_path / "shards", [{"text": p} for p in _paragraphs(60)], 2)

    def cfg(name: str) -> dict[str, Any]:
        c = _stream_cfg(tmp_path, tiny_chat_llama_dir, train={"max_steps": 12, "save_every": 4, "eval_every": 6,
                                                             "keep_checkpoints": 5, "gradient_accumulation": 2})
        c["output_dir"] = str(tmp_path / name)
        return c

    whole = lmtune.train(cfg("whole"), show_progress=False)
    epochs = {r["step"]: r["epoch"] for r in map(json.loads, (whole.path / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"}
    assert epochs[8] >= 1, epochs  # the crash lands in a later pass over the stream, not the first

    original = ckpt.save_checkpoint

    class Crash(Exception):
        pass

    def crash_after_step_8(*args: Any, **kwargs: Any) -> Any:
        path = original(*args, **kwargs)
        if path.name.endswith("08"):
            raise Crash
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", crash_after_step_8)
    with pytest.raises(Crash):
        lmtune.train(cfg("broken"), show_progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", original)
    resumed = lmtune.train(cfg("broken"), resume=True, show_progress=False)
    assert resumed.metrics["summary"]["steps"] == 12
    a, b = _weights(whole.path), _weights(resumed.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the training log after the crash is the same, epoch figures included
    tail = lambda p: [(r["step"], r["epoch"], r["loss"]) for r in map(json.loads, (p / "metrics.jsonl").read_text()  # noqa: E731
                                                                  .splitlines()) if r["split"] == "train" and r["step"] > 8]
    assert tail(whole.path) == tail(resumed.path)


def test_sft_trains_on_a_packed_stream(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    from test_sft import qa_rows

    _jsonl_shards(tmp_path / "chats", qa_rows(240), 3)
    cfg = _stream_cfg(tmp_path, tiny_chat_llama_dir, task="sft",
                      data={"train": str(tmp_path / "chats"), "max_length": 96, "packing": True,
                            "validation_size": 16, "test_size": 16},
                      train={"max_steps": 12, "batch_size": 4})
    cfg["generation"] = {"max_new_tokens": 4, "eval_examples": 4}
    run = lmtune.train(cfg, show_progress=False)
    assert run.metrics["test"]["loss"] < run.metrics["starting_point"]["test"]["loss"] * 0.8
    data = json.loads((run.path / "data.json").read_text())
    assert data["train"]["chat_format"] == "openai" and data["train"]["packing"]
    assert data["test"]["examples"] == 16


def test_data_inspect_refuses_a_stream_with_a_message(tmp_path: Path) -> None:
    from lmtune.tasks.decoder import inspect_generative

    cfg = load_config(_stream_cfg(tmp_path, "smollm2"))
    with pytest.raises(ConfigError, match="never loads"):
        inspect_generative(cfg, None)


def test_too_short_a_stream_is_a_data_error(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    _jsonl_shards(tmp_path / "shards", [{"text": p} for p in _paragraphs(20)], 2)
    with pytest.raises(DataError, match="too few to hold out"):
        lmtune.train(_stream_cfg(tmp_path, tiny_chat_llama_dir, data={"validation_size": 15, "test_size": 15}),
                     show_progress=False)
