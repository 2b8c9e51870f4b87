"""Mixed data (issue 18, item 6): ``data.train`` as a list of sources with weights, mixed by exact quotas in
memory and interleaved by probability when streaming; counts per source in data.json and the report; bad
lists fail naming the source or the key."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import sentiment_rows, story_text, write_csv
from rich.console import Console

import lmtune
from lmtune.config import DataConfig, load_config, save_config
from lmtune.config.mix import MIX_COLUMN
from lmtune.data import mixing
from lmtune.data.pii import read_data_table
from lmtune.data.streaming import MixedStreamSource, TrainStream, stream_source
from lmtune.errors import ConfigError, DataError
from lmtune.workflows.inspect import inspect_config


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _two_sources(tmp_path: Path, n_a: int = 300, n_b: int = 1000) -> tuple[Path, Path]:
    """A JSON Lines source with columns text/label and a CSV source that calls them review/label."""
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}", "label": "x"} for i in range(n_a)])
    b = write_csv(tmp_path / "b.csv", [{"review": f"beta {i}", "label": "y"} for i in range(n_b)])
    return a, b


def _mix(a: Path, b: Path, wa: float = 3, wb: float = 1, **data: Any) -> DataConfig:
    return DataConfig(train=[{"path": str(a), "weight": wa}, {"path": str(b), "ratio": wb, "rename": {"review": "text"}}],
                      **data)


# ------------------------------------------------------------------------------------------ quotas
@pytest.mark.parametrize(("sizes", "weights", "stopping", "expected"), [
    ([100, 1000], [1, 1], "first_exhausted", [100, 100]),
    ([100, 1000], [1, 1], "all_exhausted", [1000, 1000]),
    ([300, 1000], [3, 1], "first_exhausted", [300, 100]),
    ([300, 1000], [3, 1], "all_exhausted", [3000, 1000]),
    ([50, 50, 50], [2, 1, 1], "first_exhausted", [50, 25, 25]),
    ([10, 1000], [0.5, 0.5], "first_exhausted", [10, 10]),
])
def test_quotas_are_exact_shares(sizes: list[int], weights: list[float], stopping: str, expected: list[int]) -> None:
    assert mixing.quotas(sizes, weights, stopping) == expected


# ------------------------------------------------------------------------------------------ in memory
def test_mix_follows_the_weights_is_deterministic_and_renames(tmp_path: Path) -> None:
    a, b = _two_sources(tmp_path)
    d = _mix(a, b)
    assert d.train == f"mix({a}: 3, {b}: 1)" and [s.weight for s in d.train_mix or []] == [3, 1]
    with mixing.recording() as records:
        table = read_data_table(d.train, d)
    counts = Counter(r[MIX_COLUMN] for r in table.rows)
    assert counts == {str(a): 300, str(b): 100}  # 3:1, the scarcer source used whole (first_exhausted)
    assert table.columns == ["text", "label", MIX_COLUMN]
    assert all(r["text"].startswith("alpha" if r[MIX_COLUMN] == str(a) else "beta") for r in table.rows)
    assert len({r["text"] for r in table.rows}) == 400  # no repeats
    # interleaved, not one source after the other: b's rows are spread over the whole epoch
    positions = [i for i, r in enumerate(table.rows) if r[MIX_COLUMN] == str(b)]
    assert positions[0] < 40 and positions[-1] > 360
    # in every quarter of the epoch the shares hold within sampling tolerance
    for q in range(4):
        part = table.rows[q * 100:(q + 1) * 100]
        assert 12 <= sum(r[MIX_COLUMN] == str(b) for r in part) <= 38
    (record,) = records
    assert [(s["rows"], s["taken"], s["unused"]) for s in record["sources"]] == [(300, 300, 0), (1000, 100, 900)]
    assert record["sources"][0]["share"] == pytest.approx(0.75)
    # the same config gives the same table; another split_seed another sample and order, same counts
    assert read_data_table(d.train, d).rows == table.rows
    other = read_data_table(d.train, _mix(a, b, split_seed=7))
    assert other.rows != table.rows and Counter(r[MIX_COLUMN] for r in other.rows) == counts


def test_oversampling_repeats_short_sources(tmp_path: Path) -> None:
    a, b = _two_sources(tmp_path, n_a=30, n_b=100)
    d = _mix(a, b, 1, 1, mix_stopping="all_exhausted", deduplicate=False, validation=str(a), test=str(a))
    table = read_data_table(d.train, d)
    counts = Counter(r[MIX_COLUMN] for r in table.rows)
    assert counts == {str(a): 100, str(b): 100}
    per_text = Counter(r["text"] for r in table.rows if r[MIX_COLUMN] == str(a))
    assert len(per_text) == 30 and set(per_text.values()) == {3, 4}  # 3 whole passes + 10 drawn once more


def test_formats_per_source_and_plain_strings(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [f"p {i}" for i in range(20)], "label": ["x"] * 20}), tmp_path / "p.parquet")
    (tmp_path / "odd.dat").write_text("".join(json.dumps({"text": f"o {i}", "label": "y"}) + "\n" for i in range(20)))
    d = DataConfig(train=[str(tmp_path / "p.parquet"), {"path": str(tmp_path / "odd.dat"), "format": "jsonl"}])
    table = read_data_table(d.train, d)
    assert Counter(r[MIX_COLUMN] for r in table.rows) == {str(tmp_path / "p.parquet"): 20, str(tmp_path / "odd.dat"): 20}


def test_saved_config_round_trips_and_an_override_replaces_the_mix(tmp_path: Path) -> None:
    a, b = _two_sources(tmp_path, 10, 10)
    raw = {"data": {"train": [{"path": str(a), "weight": 2}, str(b)]}}
    cfg = load_config(raw)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.data.train == cfg.data.train and again.data.train_mix == cfg.data.train_mix
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["train_mix"][0]["weight"] == 2
    replaced = load_config(tmp_path / "config.yaml", overrides={"data.train": str(a)})
    assert replaced.data.train == str(a) and replaced.data.train_mix is None


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("train", "words"), [
    ([], "empty list"),
    ([{"path": "a.csv", "weight": 0}], "'data.train.0': source 'a.csv': weight must be a finite number > 0"),
    ([{"path": "a.csv", "weight": -2}, "b.csv"], "weight must be a finite number > 0"),
    ([{"path": "a.csv", "weight": 1, "ratio": 2}], "weight or ratio, not both"),
    (["a.csv", "a.csv"], "a.csv more than once"),
    ([{"weight": 2}], "path"),
    ([{"path": "a.csv", "wieght": 2}], "data.train.0.wieght"),
])
def test_bad_lists_are_config_errors(train: list[Any], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config({"data": {"train": train}})


def test_oversampling_needs_no_dedupe_and_own_evaluation_files() -> None:
    with pytest.raises(ConfigError, match=r"data\.deduplicate: false"):
        load_config({"data": {"train": ["a.csv", "b.csv"], "mix_stopping": "all_exhausted"}})
    with pytest.raises(ConfigError, match=r"give data\.validation and data\.test"):
        load_config({"data": {"train": ["a.csv", "b.csv"], "mix_stopping": "all_exhausted", "deduplicate": False}})


def test_bad_sources_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    a, b = _two_sources(tmp_path, 10, 10)
    missing = DataConfig(train=[str(a), str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match=r"nope\.jsonl"):
        read_data_table(missing.train, missing)
    # b.csv calls the text column "review": without a rename the columns differ
    unmapped = DataConfig(train=[str(a), str(b)])
    with pytest.raises(DataError, match=r"b\.csv.*lacks 'text'.*has 'review' besides") as err:
        read_data_table(unmapped.train, unmapped)
    assert "rename" in str(err.value.hint)
    wrong = DataConfig(train=[str(a), {"path": str(b), "rename": {"reveiw": "text"}}])
    with pytest.raises(DataError, match="renames column 'reveiw'") as err:
        read_data_table(wrong.train, wrong)
    assert "review" in str(err.value.hint)


# ------------------------------------------------------------------------------------------ streaming
def test_streaming_interleaves_by_probability(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(2000)])
    b = tmp_path / "b"
    b.mkdir()
    for s in range(2):
        (b / f"part-{s}.txt").write_text("".join(f"beta {s} {i}\n" for i in range(1000)))
    d = DataConfig(train=[{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}], streaming=True,
                   validation_size=2, test_size=2, document_split="line")
    with mixing.recording() as records:
        source = stream_source(d)
    assert isinstance(source, MixedStreamSource) and source.format == "mixed" and source.n_shards == 3
    assert records[0]["streamed"] and [s["target_share"] for s in records[0]["sources"]] == [0.75, 0.25]

    def stream(seed: int) -> TrainStream:
        return TrainStream(source, seed=seed, shuffle_buffer=0, held_out=set(), to_example=lambda r, _: r,
                           key=lambda r: r["text"], encode=lambda batch: [([0], [0]) for _ in batch],
                           to_rows=lambda seqs: iter([]))

    first = list(stream(1)._records())
    assert list(stream(1)._records()) == first  # deterministic for (seed, epoch)
    other = stream(1)
    other.set_epoch(1)
    assert list(other._records()) != first
    # first_exhausted: the stream ends when a (2000 rows at 75%) runs out; until then 3:1 within tolerance
    counts = Counter(r[MIX_COLUMN] for r in first)
    assert counts[str(a)] == 2000 and 0.22 < counts[str(b)] / len(first) < 0.28
    assert all(set(r) == {"text", MIX_COLUMN} for r in first)  # the text source's column is the config's


def test_streaming_sources_must_share_columns(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "x"}] * 3)
    b = _jsonl(tmp_path / "b.jsonl", [{"body": "y"}] * 3)
    d = DataConfig(train=[str(a), str(b)], streaming=True, validation_size=1, test_size=1)
    with pytest.raises(DataError, match=r"b\.jsonl.*lacks 'text'"):
        stream_source(d)


# ------------------------------------------------------------------------------------------ training
def test_classification_trains_on_a_mix_with_per_source_metrics(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rows = sentiment_rows(360, seed=3)
    _jsonl(tmp_path / "a.jsonl", rows[:120])
    write_csv(tmp_path / "b.csv", [{"review": r["text"], "label": r["label"]} for r in rows[120:]])
    cfg = {"task": "classification", "model": str(tiny_bert_dir),
           "data": {"train": [{"path": str(tmp_path / "a.jsonl"), "weight": 1},
                              {"path": str(tmp_path / "b.csv"), "weight": 1, "rename": {"review": "text"}}],
                    "max_length": 32, "test_size": 0.2},
           "train": {"epochs": 5, "batch_size": 16, "learning_rate": 2e-3, "log_every": 5, "precision": "fp32"},
           "baselines": [], "evaluate": {"slices": [MIX_COLUMN]}, "output_dir": str(tmp_path / "run")}
    run = lmtune.train(cfg, show_progress=False)
    log = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["split"] == "train"]
    assert losses[-1] < losses[0] * 0.7
    m = run.metrics
    assert m["test"]["accuracy"] > m["starting_point"]["test"]["accuracy"]
    data = json.loads((run.path / "data.json").read_text())
    assert [(s["taken"], s["unused"]) for s in data["mix"]["sources"]] == [(120, 0), (120, 120)]
    # per-source metrics on the pooled test split; the counts add up
    groups = m["test"]["slices"][MIX_COLUMN]["groups"]
    assert set(groups) == {str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv")}
    assert sum(g["count"] for g in groups.values()) == m["test"]["num_examples"]
    report = (run.path / "report.md").read_text()
    assert "Mixed data.train: 240 examples per epoch" in report and "b.csv" in report


def test_causal_lm_trains_on_a_mix(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    paragraphs = [p.strip() for p in story_text(80, seed=5).split("\n\n")]
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs[:40]))
    _jsonl(tmp_path / "b.jsonl", [{"body": p} for p in paragraphs[40:]])
    cfg = {"task": "causal_lm", "model": str(tiny_chat_llama_dir),
           "data": {"train": [{"path": str(tmp_path / "a.txt"), "weight": 2},
                              {"path": str(tmp_path / "b.jsonl"), "weight": 1, "rename": {"body": "text"}}],
                    "max_length": 32},
           "train": {"epochs": 2, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every": 1,
                     "precision": "fp32"},
           "output_dir": str(tmp_path / "run")}
    run = lmtune.train(cfg, show_progress=False)
    m = run.metrics
    assert m["test"]["perplexity"] < m["starting_point"]["test"]["perplexity"] / 4
    data = json.loads((run.path / "data.json").read_text())
    assert [s["taken"] for s in data["mix"]["sources"]] == [40, 20]
    assert "Mixed data.train: 60 examples per epoch" in (run.path / "report.md").read_text()


@pytest.mark.slow
def test_causal_lm_trains_on_a_streamed_mix(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    paragraphs = [p.strip() for p in story_text(80, seed=6).split("\n\n")]
    (tmp_path / "a").mkdir()
    for s in range(2):
        _jsonl(tmp_path / "a" / f"part-{s}.jsonl", [{"text": p} for p in paragraphs[s:50:2]])
    (tmp_path / "b.txt").write_text("\n\n".join(paragraphs[50:]))
    cfg = {"task": "causal_lm", "model": str(tiny_chat_llama_dir),
           "data": {"train": [{"path": str(tmp_path / "a"), "weight": 3}, {"path": str(tmp_path / "b.txt")}],
                    "streaming": True, "mix_stopping": "all_exhausted", "deduplicate": False,
                    "max_length": 32, "validation_size": 8, "test_size": 8, "shuffle_buffer": 16},
           "train": {"max_steps": 16, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every": 1,
                     "precision": "fp32", "eval_every": 8},
           "output_dir": str(tmp_path / "run")}
    run = lmtune.train(cfg, show_progress=False)
    log = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["split"] == "train"]
    assert losses[-1] < losses[0] * 0.7
    mix = json.loads((run.path / "data.json").read_text())["mix"]
    assert mix["streamed"] and [s["target_share"] for s in mix["sources"]] == [0.75, 0.25]
    assert run.meta["data_mix"] == mix
    assert "Mixed data.train, streamed" in (run.path / "report.md").read_text()


def test_data_inspect_shows_the_mix(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rows = sentiment_rows(90, seed=4)
    _jsonl(tmp_path / "a.jsonl", rows[:30])
    write_csv(tmp_path / "b.csv", [{"review": r["text"], "label": r["label"]} for r in rows[30:]])
    cfg = {"task": "classification", "model": str(tiny_bert_dir),
           "data": {"train": [{"path": str(tmp_path / "a.jsonl"), "weight": 2},
                              {"path": str(tmp_path / "b.csv"), "rename": {"review": "text"}}], "max_length": 32}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    console = Console(record=True, width=160)
    report = inspect_config(tmp_path / "c.yaml", console)
    assert [(s["taken"], s["unused"]) for s in report["mix"]["sources"]] == [(30, 0), (15, 45)]
    assert report["splits"]["train"]["examples"] + report["splits"]["validation"]["examples"] \
        + report["splits"]["test"]["examples"] == 45
    assert "data mix" in console.export_text()
