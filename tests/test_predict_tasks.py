"""Prediction files of the task predictors: generation options for seq2seq runs, and predicted fields
that share a name with an input column (NER's gold ``tags``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import minilm_path, run_cli
from test_seq2seq import number_pairs, write_jsonl
from test_token_classification import synthetic_conll
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

import lmtune
from lmtune.errors import RunError


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory: pytest.TempPathFactory) -> lmtune.Run:
    """A tiny T5 trained briefly on number words (its outputs need not be good, only long)."""
    folder = tmp_path_factory.mktemp("s2s")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=2, dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(folder / "t5")
    tok.save_pretrained(folder / "t5")
    return lmtune.train({
        "task": "seq2seq", "model": str(folder / "t5"),
        "data": {"train": str(write_jsonl(folder / "pairs.jsonl", number_pairs(60))), "seq2seq_task": "translation",
                 "source_language": "English", "target_language": "Italian", "max_length": 16,
                 "max_target_length": 16},
        "train": {"epochs": 1, "batch_size": 16, "precision": "fp32"},
        "generation": {"max_new_tokens": 6, "eval_examples": 4},
        "output_dir": str(folder / "run"),
    }, show_progress=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_seq2seq_predict_file_takes_generation_options(seq2seq_run: lmtune.Run, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"source": r["source"]} for r in number_pairs(6, seed=5)])
    seq2seq_run.predict_file(source, tmp_path / "saved.jsonl", show_progress=False)
    saved = _jsonl(tmp_path / "saved.jsonl")
    assert all(r["generated_tokens"] <= 6 for r in saved)  # the run's generation.max_new_tokens
    assert any(r["generated_tokens"] > 2 for r in saved)  # a briefly trained model runs on: the cap matters
    seq2seq_run.predict_file(source, tmp_path / "short.jsonl", show_progress=False, max_new_tokens=2)
    short = _jsonl(tmp_path / "short.jsonl")
    assert all(r["generated_tokens"] <= 2 for r in short)
    for full, cut in zip(saved, short, strict=True):  # greedy: the same first tokens, cut at 2
        if full["generated_tokens"] > 2:
            assert cut["finish_reason"] == "length" and full["generated"].startswith(cut["generated"])
    # The CLI passes the flags through, a stop string too.
    k, row = next((i, r) for i, r in enumerate(saved) if r["generated"].strip())
    word = row["generated"].split()[-1]
    code = run_cli(["predict", str(seq2seq_run.path), "-i", str(source), "-o", str(tmp_path / "cli.jsonl"),
                    "--max-new-tokens", "2", "--no-progress"], monkeypatch)
    assert code == 0 and _jsonl(tmp_path / "cli.jsonl") == short
    stopped = seq2seq_run.predict_file(source, tmp_path / "stop.jsonl", show_progress=False, stop=[word])
    cut_row = _jsonl(tmp_path / "stop.jsonl")[k]
    assert stopped == 6 and word not in cut_row["generated"] and cut_row["finish_reason"] == "stop"
    assert row["generated"].startswith(cut_row["generated"])


def test_generation_options_are_refused_for_label_tasks(ner_run: lmtune.Run, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("text\nAlice went to Paris\n", encoding="utf-8")
    with pytest.raises(RunError, match="generation settings \\(max_new_tokens\\)"):
        ner_run.predict_file(source, tmp_path / "out.jsonl", show_progress=False, max_new_tokens=3)


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_nodrop_dir: Path) -> lmtune.Run:
    folder = tmp_path_factory.mktemp("ner")
    (folder / "train.conll").write_text(synthetic_conll(120), encoding="utf-8")
    return lmtune.train({
        "task": "token_classification", "model": str(tiny_bert_nodrop_dir),
        "data": {"train": str(folder / "train.conll"), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32"},
        "output_dir": str(folder / "run"),
    }, show_progress=False)


def test_predicted_fields_never_overwrite_input_columns(ner_run: lmtune.Run, tmp_path: Path) -> None:
    gold = [{"id": str(i), "tokens": ["met", name, "in", place], "tags": ["O", "B-PER", "O", "B-LOC"]}
            for i, (name, place) in enumerate([("Alice", "Paris"), ("Bob", "Kyoto"), ("Dmitri", "Lima")])]
    source = write_jsonl(tmp_path / "gold.jsonl", gold)
    assert ner_run.predict_file(source, tmp_path / "out.jsonl", show_progress=False) == 3
    rows = _jsonl(tmp_path / "out.jsonl")
    for row, given in zip(rows, gold, strict=True):
        assert row["tags"] == given["tags"] and row["tokens"] == given["tokens"]  # the input, kept
        assert len(row["predicted_tags"]) == 4 and row["predicted_tokens"] == given["tokens"]
        assert {"id", "entities"} <= set(row)
    # Gold tags differ from a (deliberately) wrong input: the output shows both, side by side.
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{**g, "tags": ["O"] * 4} for g in gold])
    ner_run.predict_file(wrong, tmp_path / "wrong.csv", show_progress=False)
    cells = list(csv.DictReader((tmp_path / "wrong.csv").open(encoding="utf-8")))
    assert list(cells[0]) == ["id", "tokens", "tags", "entities", "predicted_tokens", "predicted_tags"]
    assert all(json.loads(c["tags"]) == ["O"] * 4 for c in cells)
    assert json.loads(cells[0]["predicted_tags"]) == rows[0]["predicted_tags"]
