"""`lmtune data inspect`: facts about the prepared data, checked against counts made by hand."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import sentiment_rows, write_csv
from transformers import AutoTokenizer

from lmtune.inspect import inspect_data


def _config(model_dir: Path, train: Path, **data: Any) -> dict[str, Any]:
    return {"model": str(model_dir), "data": {"train": str(train), **data}, "train": {"batch_size": 8}}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def report(tiny_bert_dir: Path, sentiment_csv: Path) -> dict[str, Any]:
    return inspect_data(_config(tiny_bert_dir, sentiment_csv), examples=2)


def test_split_sizes_and_label_counts_match_the_csv(report: dict[str, Any], sentiment_csv: Path) -> None:
    rows = _csv_rows(sentiment_csv)
    splits = report["splits"]
    assert list(splits) == ["train", "validation", "test"]
    assert sum(s["examples"] for s in splits.values()) == len(rows)
    by_label = Counter(r["label"] for r in rows)
    assert report["labels"] == ["neg", "pos"]
    for name in report["labels"]:
        assert sum(s["label_counts"][name] for s in splits.values()) == by_label[name]
    train = splits["train"]
    assert train["skipped_empty"] == 0 and train["duplicates_removed"] == 0
    assert sum(train["label_percent"].values()) == pytest.approx(100)
    assert not any(s["imbalanced"] for s in splits.values())
    majority = report["majority_class"]
    assert majority["rates"]["train"] == pytest.approx(train["label_counts"][majority["label"]] / train["examples"])
    json.dumps(report)  # the whole report is plain data


def test_truncation_counts_match_the_tokenizer(tiny_bert_dir: Path, sentiment_csv: Path) -> None:
    got = inspect_data(_config(tiny_bert_dir, sentiment_csv), overrides={"data.max_length": 8}, examples=1)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    full = [len(tok(r["text"])["input_ids"]) for r in _csv_rows(sentiment_csv)]
    splits = got["splits"].values()
    assert sum(s["truncated"] for s in splits) == sum(n > 8 for n in full)
    assert sum(s["tokens_dropped"] for s in splits) == sum(max(0, n - 8) for n in full)
    assert sum(s["tokens"] for s in splits) == sum(min(n, 8) for n in full)
    assert max(s["lengths"]["max"] for s in splits) == max(full)
    assert min(s["lengths"]["min"] for s in splits) == min(full)
    # Nearly every example is cut at 8 tokens: the report says to raise max_length.
    assert any("--data.max_length" in tip and "truncated" in tip for tip in got["suggestions"])
    example = got["examples"][0]
    assert example["truncated"] and example["length"] == 8 and example["tokens"][-1] == "[SEP]"


def test_length_grouping_pads_less_than_fixed_padding(report: dict[str, Any]) -> None:
    pad = report["padding"]
    assert pad["used"] == "dynamic_grouped"
    assert pad["dynamic_grouped"]["pad_fraction"] < pad["dynamic_shuffled"]["pad_fraction"]
    assert pad["dynamic_grouped"]["pad_fraction"] < pad["fixed"]["pad_fraction"]
    assert pad["fixed"]["padded_tokens"] == report["splits"]["train"]["examples"] * report["max_length"]
    for key in ("fixed", "dynamic_shuffled", "dynamic_grouped"):
        assert pad[key]["padded_tokens"] - pad[key]["pad_tokens"] == report["splits"]["train"]["tokens"]


def test_examples_show_the_tokens_the_model_sees(report: dict[str, Any], sentiment_csv: Path) -> None:
    label_of = {r["text"]: r["label"] for r in _csv_rows(sentiment_csv)}
    assert len(report["examples"]) == 2
    for example in report["examples"]:
        assert example["tokens"][0] == "[CLS]" and example["tokens"][-1] == "[SEP]"
        assert example["labels"] == [label_of[example["text"]]]
        assert example["length"] == len(example["tokens"])


def test_dirty_imbalanced_data_is_counted_and_flagged(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rows: list[dict[str, str]] = [r for r in sentiment_rows(200) if r["label"] == "pos"][:60]
    rows += [r for r in sentiment_rows(200, seed=1) if r["label"] == "neg"][:10]
    rows += rows[:3]  # exact duplicates
    rows += [{"text": "", "label": "pos"}, {"text": "no label here", "label": ""}]
    got = inspect_data(_config(tiny_bert_dir, write_csv(tmp_path / "dirty.csv", rows)), examples=0)
    train = got["splits"]["train"]
    assert train["skipped_empty"] == 2
    assert train["duplicates_removed"] == 3
    assert sum(s["examples"] for s in got["splits"].values()) == 70
    assert train["imbalanced"] and train["imbalance_ratio"] > 5
    assert got["majority_class"]["label"] == "pos"
    assert any("imbalanced" in tip for tip in got["suggestions"])
    assert any("skipped 2" in note for note in got["warnings"])
    assert got["examples"] == []


def test_a_long_outlier_suggests_a_smaller_max_length(tiny_bert_dir: Path, tmp_path: Path) -> None:
    outlier = {"text": " ".join(["long"] * 100), "label": "pos"}  # 102 tokens; the rest about 7-20
    train = write_csv(tmp_path / "train.csv", [*sentiment_rows(300), outlier])
    validation = write_csv(tmp_path / "validation.csv", sentiment_rows(40, seed=2))
    test = write_csv(tmp_path / "test.csv", [*sentiment_rows(40, seed=3), {"text": " ", "label": "neg"}])
    got = inspect_data(_config(tiny_bert_dir, train, validation=str(validation), test=str(test)), examples=0)
    splits = got["splits"]
    assert [splits[s]["examples"] for s in ("train", "validation", "test")] == [301, 40, 40]
    assert splits["test"]["skipped_empty"] == 1 and splits["validation"]["skipped_empty"] == 0
    assert splits["train"]["lengths"]["max"] == 102 and splits["train"]["lengths"]["p99"] < 32
    assert splits["train"]["truncated"] == 0
    # With per-batch padding only the widest batch feels max_length: it is 102 wide, p99 fits in 32.
    tips = [tip for tip in got["suggestions"] if "bounds the widest batch" in tip]
    assert len(tips) == 1 and "instead of 102" in tips[0] and "truncating 1 train example" in tips[0]


def test_cli_prints_the_tables(tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    from lmtune import cli

    monkeypatch.setattr(cli, "console", Console(width=80))  # an 80-column terminal, whatever $COLUMNS says
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_config(tiny_bert_dir, sentiment_csv)), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["lmtune", "data", "inspect", str(cfg), "--examples", "1"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for heading in ("splits", "label balance", "tokens per example", "padding of one train epoch",
                    "train example 1", "[CLS]", "majority class"):
        assert heading in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_cli_reports_a_data_error_in_one_line(tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from lmtune.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_config(tiny_bert_dir, sentiment_csv, text_column="review")), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["lmtune", "data", "inspect", str(cfg)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "review" in err and "Traceback" not in err
