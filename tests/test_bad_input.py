"""Every kind of bad input gets one clear message through the CLI: non-zero exit, no traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import sentiment_rows, write_csv

from lmtune.cli import main


def _run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["lmtune", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out + out.err


def _config_file(tmp_path: Path, model: Path, **data: Any) -> Path:
    cfg = {"task": "classification", "model": str(model), "data": {"max_length": 32, **data},
           "train": {"epochs": 1}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _csv(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = "text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(20))

CASES: list[tuple[str, Any, list[str]]] = [
    # (case id, function building data-section kwargs from tmp_path, fragments the message must hold)
    ("missing file", lambda t: {"train": str(t / "nope.csv")}, ["nope.csv", "file not found"]),
    ("empty file", lambda t: {"train": str(_csv(t, "empty.csv", ""))}, ["empty.csv", "no records"]),
    ("header only", lambda t: {"train": str(_csv(t, "h.csv", "text,label\n"))}, ["h.csv", "only a header"]),
    ("missing text column", lambda t: {"train": str(_csv(t, "d.csv", GOOD)), "text_column": "review"},
     ["review", "text", "label"]),
    ("missing label column", lambda t: {"train": str(_csv(t, "d.csv", GOOD)), "label_column": "sentiment"},
     ["sentiment", "label"]),
    ("malformed csv row", lambda t: {"train": str(_csv(t, "m.csv", GOOD + "x,pos,extra\n"))}, ["m.csv:42", "fields"]),
    ("malformed jsonl", lambda t: {"train": str(_csv(t, "m.jsonl", '{"text": "a", "label": "x"}\n{"text": \n'))},
     ["m.jsonl:2"]),
    ("empty text is an error when asked", lambda t: {"train": str(_csv(t, "e.csv", GOOD + ",pos\n")),
                                                    "empty_text": "error"}, ["e.csv:42", "text", "empty"]),
    ("unseen label in test", lambda t: {"train": str(_csv(t, "d.csv", GOOD)),
                                        "test": str(_csv(t, "t.csv", "text,label\nnice,pos\nhmm,meh\n"))},
     ["t.csv:3", "meh", "never occurs in training", "neg, pos"]),
    ("single class", lambda t: {"train": str(_csv(t, "one.csv", "text,label\n" + "".join(
        f"film {i},pos\n" for i in range(30))))}, ["single class", "pos"]),
    ("non utf-8", lambda t: {"train": str(_write_bytes(t / "latin.csv", GOOD.encode() + "caf\xe9,pos\n".encode("latin-1")))},
     ["latin.csv:42", "encoding"]),
    ("max_length beyond the model", lambda t: {"train": str(_csv(t, "d.csv", GOOD)), "max_length": 4096},
     ["max_length 4096", "larger than the model allows"]),
]


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("case", "data", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_data_gives_a_clear_error(case: str, data: Any, fragments: list[str], tmp_path: Path,
                                      tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = _config_file(tmp_path, tiny_bert_dir, **data(tmp_path))
    code, out = _run_cli(["train", str(config), "--no-progress"], monkeypatch, capsys)
    assert code != 0
    assert "Traceback" not in out
    flat = " ".join(out.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in {flat!r}"


@pytest.mark.parametrize(
    ("model", "fragments"),
    [("{tmp}/no-such-model", ["model folder not found"]), ("{tmp}", ["no config.json"])],
    ids=["missing", "not a model"],
)
def test_bad_model_path(model: str, fragments: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    data = _csv(tmp_path, "d.csv", GOOD)
    config = _config_file(tmp_path, Path(model.format(tmp=tmp_path)), train=str(data))
    code, out = _run_cli(["train", str(config)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in out
    for fragment in fragments:
        assert fragment in " ".join(out.split())


def test_empty_rows_are_skipped_and_counted(tmp_path: Path, tiny_bert_dir: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from lmtune.config import load_config
    from lmtune.tasks.classification.task import ClassificationTask

    path = _csv(tmp_path, "gaps.csv", GOOD + ",pos\n   ,neg\nfine film,\n")
    task = ClassificationTask(load_config({"model": str(tiny_bert_dir), "data": {"train": str(path)}}))
    data = task.prepare(task.load_tokenizer(tiny_bert_dir))
    assert data.info["train"]["skipped_empty"] == 3
    assert data.info["train"]["skipped_lines"] == [42, 43, 44]
    assert "skipped 3" in caplog.text and "42, 43, 44" in caplog.text
    assert sum(data.info[s]["examples"] for s in ("train", "validation", "test")) == 40


def test_finished_run_is_not_overwritten(tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = _config_file(tmp_path, tiny_bert_dir, train=str(write_csv(tmp_path / "d.csv", sentiment_rows(40))))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "complete"}))
    (run / "metrics.json").write_text("{}")
    code, out = _run_cli(["train", str(config)], monkeypatch, capsys)
    assert code == 2 and "already holds a finished run" in out and "--overwrite" in out
    assert (run / "metrics.json").exists()
    # an interrupted run suggests --resume; resuming without a checkpoint says so
    (run / "run.json").write_text(json.dumps({"status": "failed"}))
    code, out = _run_cli(["train", str(config)], monkeypatch, capsys)
    assert code == 2 and "--resume" in out
    code, out = _run_cli(["train", str(config), "--resume"], monkeypatch, capsys)
    assert code == 2 and "no complete checkpoint" in out
    # a folder that is not a run is never deleted, even with --overwrite
    (run / "run.json").unlink()
    code, out = _run_cli(["train", str(config), "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "does not hold an lmtune run" in out and (run / "metrics.json").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "{tmp}/missing.yaml"], ["config file not found"]),
        (["train", "{cfg}", "--train.epoch", "2"], ["unknown key 'train.epoch'", "epochs"]),
        (["train", "{cfg}", "--train.batch_size"], ["needs a value"]),
        (["predict", "{tmp}", "--input", "x.csv", "--output", "y.csv"], ["not an lmtune run"]),
        (["eval", "{tmp}/nothing"], ["run folder not found"]),
    ],
    ids=["missing config", "unknown override", "override without value", "predict on non-run", "eval missing"],
)
def test_bad_commands(args: list[str], fragments: list[str], tmp_path: Path, tiny_bert_dir: Path,
                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config_file(tmp_path, tiny_bert_dir, train="x.csv")
    code, out = _run_cli([a.format(tmp=tmp_path, cfg=config) for a in args], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in out
    for fragment in fragments:
        assert fragment in " ".join(out.split())


def _chat_line(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


_CHAT_OK = [_chat_line(("user", f"hello {i}"), ("assistant", f"hi {i}")) for i in range(30)]

CHAT_CASES: list[tuple[str, Any, dict[str, Any], list[str]]] = [
    # (case id, bad record (placed on line 5), extra data settings, fragments the message must hold)
    ("roles do not alternate", _chat_line(("user", "a"), ("user", "b"), ("assistant", "c")), {},
     ["c.jsonl:5", "messages", "'user' after 'user'"]),
    ("empty assistant turn", _chat_line(("user", "a"), ("assistant", "  ")), {}, ["c.jsonl:5", "empty"]),
    ("unknown role", _chat_line(("user", "a"), ("robot", "b")), {}, ["c.jsonl:5", "robot"]),
    ("ends with the user", _chat_line(("user", "a"), ("assistant", "b"), ("user", "c")), {},
     ["c.jsonl:5", "assistant"]),
    ("record of another format", {"question": "a", "reply": "b"}, {}, ["c.jsonl:5", "messages"]),
]


@pytest.mark.parametrize(("case", "bad", "extra", "fragments"), CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_bad_chat_data_gives_a_clear_error(case: str, bad: dict[str, Any], extra: dict[str, Any],
                                           fragments: list[str], tmp_path: Path, tiny_chat_llama_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rows = list(_CHAT_OK)
    rows[4] = bad
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {"task": "sft", "model": str(tiny_chat_llama_dir), "data": {"train": str(data), "max_length": 64, **extra},
           "train": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out = _run_cli(["train", str(path), "--no-progress"], monkeypatch, capsys)
    flat = " ".join(out.split())
    assert code == 2 and "Traceback" not in out, flat
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in {flat!r}"


def test_unknown_chat_format_lists_what_was_tried(tmp_path: Path, tiny_chat_llama_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"q": f"a{i}", "a": "b"}) + "\n" for i in range(10)), encoding="utf-8")
    cfg = {"task": "sft", "model": str(tiny_chat_llama_dir), "data": {"train": str(data)},
           "output_dir": str(tmp_path / "run")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out = _run_cli(["train", str(path)], monkeypatch, capsys)
    flat = " ".join(out.split())
    assert code == 2 and "Traceback" not in out
    for fragment in ("alpaca", "sharegpt", "openai", "'q'", "'a'"):
        assert fragment in flat, f"{fragment!r} not in {flat!r}"


def test_conversations_longer_than_max_length_are_skipped_or_cut(tmp_path: Path, tiny_chat_llama_dir: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from lmtune.config import load_config
    from lmtune.tasks.sft.task import SFTTask

    rows = list(_CHAT_OK) + [_chat_line(("user", "word " * 200), ("assistant", "short")) for _ in range(1)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    infos = {}
    for mode in ("skip", "truncate_left"):
        cfg = load_config({"task": "sft", "model": str(tiny_chat_llama_dir),
                           "data": {"train": str(data), "max_length": 64, "too_long": mode,
                                    "validation": str(data), "test": str(data), "deduplicate": False}})
        task = SFTTask(cfg)
        infos[mode] = task.prepare(task.load_tokenizer(tiny_chat_llama_dir)).info["train"]
    assert infos["skip"]["skipped_too_long"] == 1 and infos["skip"]["examples"] == 30
    assert infos["skip"]["skipped_lines"] == [31]
    # reported with the count, the limit, the line and the setting that keeps them
    assert "train: 1 of 31 conversations are longer than data.max_length 64 and were skipped (lines 31)" in caplog.text
    assert "data.too_long: truncate_left keeps them" in caplog.text
    assert infos["truncate_left"]["skipped_too_long"] == 0 and infos["truncate_left"]["truncated"] == 1
