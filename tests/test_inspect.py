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

from lmtune.workflows.inspect import inspect_data


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


# ------------------------------------------------------------------------------------------ decoder tasks
# SmolLM2's real tokenizer (ChatML, a default system prompt, pad == eos == <|im_end|>) on a tiny Llama.

CAPITALS = {"France": "Paris", "Spain": "Madrid", "Peru": "Lima", "Japan": "Tokyo"}
# ChatML that forgets <|im_end|> after the assistant's content: the model would never learn to stop.
NO_EOS_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['role'] != 'assistant' %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _qa(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _capital_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    countries = list(CAPITALS)
    return [_qa(f"Capital of {countries[i % 4]}? ({i})", CAPITALS[countries[i % 4]]) for i in range(start, start + n)]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rendered_length(tok: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of a conversation rendered whole by the chat template (counted independently of lmtune)."""
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def _sft_config(model_dir: Path, train: Path, **data: Any) -> dict[str, Any]:
    return {"task": "sft", "model": str(model_dir), "data": {"train": str(train), "max_length": 96, **data},
            "train": {"batch_size": 8}}


def _check_row(report: dict[str, Any], starts: str) -> dict[str, Any]:
    rows = [c for c in report["checks"] if c["check"].startswith(starts)]
    assert len(rows) == 1, [c["check"] for c in report["checks"]]
    return rows[0]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chat")
    rows = _capital_rows(60)
    alpaca = [{"instruction": f"Name the capital of {c}. ({i})", "output": CAPITALS[c]}
              for i, c in enumerate(list(CAPITALS) * 3)][:10]
    return {"train": _write_jsonl(folder / "train.jsonl", rows + rows[:3]),  # 3 exact duplicates
            "test": _write_jsonl(folder / "test.jsonl", alpaca)}


@pytest.fixture(scope="module")
def sft_report(tiny_chat_llama_dir: Path, chat_files: dict[str, Path]) -> dict[str, Any]:
    return inspect_data(_sft_config(tiny_chat_llama_dir, chat_files["train"], test=str(chat_files["test"])),
                        examples=2)


def test_sft_report_counts_conversations_and_rendered_lengths(sft_report: dict[str, Any],
                                                              tiny_chat_llama_dir: Path) -> None:
    splits = sft_report["splits"]
    assert list(splits) == ["train", "validation", "test"]
    assert [(s["chat_format"], s["chat_format_detected"]) for s in splits.values()] == [
        ("openai", True), ("openai", False), ("alpaca", True)]
    assert splits["train"]["duplicates_removed"] == 3
    assert splits["train"]["conversations"] + splits["validation"]["conversations"] == 60
    assert splits["test"]["conversations"] == 10
    for facts in splits.values():
        assert facts["turns"] == 2 * facts["conversations"] == 2 * facts["assistant_turns"]
        assert facts["examples"] == facts["conversations"] and facts["too_long"]["examples"] == 0
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    full = [_rendered_length(tok, r["messages"]) for r in _capital_rows(60)]
    cut = [splits[s]["lengths"] for s in ("train", "validation")]
    assert min(s["min"] for s in cut) == min(full) and max(s["max"] for s in cut) == max(full)
    assert sft_report["chat_template"] == "model" and sft_report["vocab_grew"] is False
    json.dumps(sft_report)  # the whole report is plain data


def test_sft_checks_pass_and_name_the_eos_token_that_is_also_pad(sft_report: dict[str, Any]) -> None:
    from lmtune.tasks.inspection import PAD_IS_EOS_NOTE

    assert sft_report["end_of_turn_tokens"] == ["<|im_end|>"] and sft_report["pad_is_eos"]
    eos = _check_row(sft_report, "every target ends with an end-of-turn token")
    assert "<|im_end|>" in eos["check"] and PAD_IS_EOS_NOTE in eos["detail"]
    assert (eos["status"], eos["count"], eos["total"]) == ("ok", 0, sft_report["splits"]["train"]["examples"])
    assert _check_row(sft_report, "no example starts with two BOS")["status"] == "ok"
    assert _check_row(sft_report, "every example has loss tokens")["status"] == "ok"
    assert all(c["status"] == "ok" for c in sft_report["checks"]) and sft_report["errors"] == []


def test_sft_examples_highlight_the_assistant_answer(sft_report: dict[str, Any], tiny_chat_llama_dir: Path) -> None:
    from rich.text import Text

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    assert len(sft_report["examples"]) == 2
    for ex in sft_report["examples"]:
        assert ex["text"].startswith("<|im_start|>system\n")
        [target] = ex["targets"]  # one assistant turn, its end-of-turn token and newline included
        answer = target.removesuffix("<|im_end|>\n")
        assert answer in CAPITALS.values() and f"assistant\n{target}" in ex["text"]
        assert ex["target_tokens"] == len(tok(target, add_special_tokens=False)["input_ids"])
        shown = Text.from_markup(ex["markup"])
        assert shown.plain == ex["text"]
        highlighted = [shown.plain[s.start : s.end] for s in shown.spans if "green" in str(s.style)]
        assert highlighted == [target]


def test_template_without_eos_is_an_error_row_not_an_exception(
    tiny_chat_llama_dir: Path, chat_files: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from lmtune.config import load_config
    from lmtune.errors import DataError
    from lmtune.tasks.sft.task import SFTTask

    model = tmp_path / "no-eos-model"
    shutil.copytree(tiny_chat_llama_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = NO_EOS_TEMPLATE
    tok.save_pretrained(model)
    cfg = _sft_config(model, chat_files["train"], test=str(chat_files["test"]))
    got = inspect_data(cfg, examples=1)
    n = got["splits"]["train"]["examples"]
    eos = _check_row(got, "every target ends with an end-of-turn token")
    assert (eos["status"], eos["count"], eos["total"]) == ("error", n, n)
    assert _check_row(got, "no example starts with two BOS")["status"] == "ok"
    [error] = got["errors"]
    assert f"{n} of {n} training examples" in error and "<|im_end|>" in error
    assert got["examples"][0]["targets"][0] in {f"{c}\n" for c in CAPITALS.values()}
    # The error row is exactly what `train` stops at.
    task = SFTTask(load_config(cfg))
    with pytest.raises(DataError) as err:
        task.prepare(task.load_tokenizer(model))
    assert str(err.value) == error


@pytest.mark.parametrize("too_long", ["skip", "truncate_left"])
def test_too_long_conversations_are_counted_as_training_would_treat_them(
    too_long: str, tiny_chat_llama_dir: Path, chat_files: dict[str, Path], tmp_path: Path
) -> None:
    from lmtune.config import load_config
    from lmtune.tasks.sft.task import SFTTask

    short = _capital_rows(20)
    long_prompts = [_qa(" ".join(f"word{i}" for _ in range(20 + 7 * i)), "Paris") for i in range(4)]
    long_answers = [_qa(f"Tell me a story ({i})", " ".join(["story"] * (70 + 9 * i))) for i in range(3)]
    rows = short + long_prompts + long_answers
    train = _write_jsonl(tmp_path / "long.jsonl", rows)
    valid = _write_jsonl(tmp_path / "valid.jsonl", _capital_rows(5, start=100))
    cfg = _sft_config(tiny_chat_llama_dir, train, validation=str(valid), test=str(chat_files["test"]),
                      max_length=64, too_long=too_long)
    got = inspect_data(cfg, examples=0)

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    full = [_rendered_length(tok, r["messages"]) for r in rows]
    excess = [n - 64 for n in full if n > 64]
    prompt_excess = [_rendered_length(tok, r["messages"]) - 64 for r in long_prompts]
    assert all(n <= 64 for n in full[:20]) and len(excess) == 7  # the long rows, and only they, exceed 64
    facts = got["splits"]["train"]
    tl = facts["too_long"]
    assert facts["conversations"] == 27 and facts["lengths"]["max"] == max(full)
    assert (tl["examples"], tl["excess_max"], tl["excess_mean"]) == (7, max(excess), round(sum(excess) / 7, 1))
    fit = _check_row(got, "train: conversations fit")
    if too_long == "skip":
        assert (tl["skipped"], tl["truncated"], tl["tokens_cut"], tl["truncate_left_keeps"]) == (7, 0, 0, 4)
        assert any("truncate_left would keep 4 of the 7" in tip for tip in got["suggestions"])
    else:  # a long prompt is cut from the left; a long answer cannot be
        assert (tl["skipped"], tl["truncated"], tl["tokens_cut"]) == (3, 4, sum(prompt_excess))
        assert tl["truncate_left_keeps"] is None
    assert facts["examples"] == 27 - tl["skipped"]
    assert (fit["status"], fit["count"], fit["total"]) == ("warning", tl["skipped"], 27)
    # The same counts as training's own data preparation.
    task = SFTTask(load_config(cfg))
    info = task.prepare(task.load_tokenizer(tiny_chat_llama_dir)).info["train"]
    assert (info["skipped_too_long"], info["truncated"], info["examples"]) == (
        tl["skipped"], tl["truncated"], facts["examples"])
    assert info["target_tokens"] == facts["target_tokens"]["total"] and info["tokens"] == facts["tokens"]


def test_a_bad_record_still_raises_naming_its_line(tiny_chat_llama_dir: Path, tmp_path: Path) -> None:
    from lmtune.errors import DataError

    rows = _capital_rows(30)
    rows[4] = {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}
    with pytest.raises(DataError) as err:
        inspect_data(_sft_config(tiny_chat_llama_dir, _write_jsonl(tmp_path / "bad.jsonl", rows)), examples=0)
    assert "bad.jsonl:5" in str(err.value) and "tool" in str(err.value)


def test_causal_lm_report_counts_documents_rows_and_shows_their_beginnings(
    tiny_chat_llama_dir: Path, tmp_path: Path
) -> None:
    from helpers import story_text

    text = story_text(40)
    path = tmp_path / "stories.txt"
    path.write_text(text, encoding="utf-8")
    cfg = {"task": "causal_lm", "model": str(tiny_chat_llama_dir), "data": {"train": str(path), "max_length": 64}}
    got = inspect_data(cfg, examples=2)
    json.dumps(got)

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    # SmolLM2 puts no BOS before plain text: a document is its tokens and EOS.
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) + 1 for p in paragraphs]
    splits = got["splits"]
    assert got["bos_token"] is None and got["eos_token"] == "<|im_end|>" and got["packing"]
    assert sum(s["documents"] for s in splits.values()) == 40
    assert sum(s["tokens"] for s in splits.values()) == sum(lengths)
    assert min(s["lengths"]["min"] for s in splits.values()) == min(lengths)
    assert max(s["lengths"]["max"] for s in splits.values()) == max(lengths)
    for s in splits.values():
        assert s["rows"] == -(-s["tokens"] // 64)  # packed: every row full but the last
        assert s["fill"] == pytest.approx(s["tokens"] / (s["rows"] * 64))
        assert 0 < s["documents_split_across_rows"] < s["documents"] and s["missing_eos"] == 0
    eos = _check_row(got, "every document ends with EOS")
    assert (eos["status"], eos["count"], eos["total"]) == ("ok", 0, 40) and "pad == eos" in eos["detail"]
    assert got["errors"] == []
    first, second = got["examples"]
    assert (first["row"], first["position"]) == (0, 0)
    assert second["position"] == first["tokens"] and second["document"] == 1
    for ex in (first, second):  # short documents: shown whole, EOS included
        assert ex["shown_tokens"] == ex["tokens"] and ex["text"].endswith("<|im_end|>")
        assert ex["text"].removesuffix("<|im_end|>") in paragraphs

    unpacked = inspect_data(cfg, overrides={"data.packing": False, "data.max_length": 32}, examples=1)
    train = unpacked["splits"]["train"]
    assert train["rows"] == train["documents"] + train["documents_split_across_rows"]
    assert train["longer_than_max_length"] == train["documents_split_across_rows"] > 0
    fit = _check_row(unpacked, "train documents fit data.max_length 32")
    assert (fit["status"], fit["count"]) == ("warning", train["longer_than_max_length"])


def test_cli_inspects_an_sft_config(tiny_chat_llama_dir: Path, chat_files: dict[str, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console
    from typer.testing import CliRunner

    from lmtune import cli

    monkeypatch.setattr(cli, "console", Console(width=80))  # an 80-column terminal, whatever $COLUMNS says
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(_sft_config(tiny_chat_llama_dir, chat_files["train"])), encoding="utf-8")
    result = CliRunner().invoke(cli.app, ["data", "inspect", str(cfg), "--examples", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("conversations", "tokens per conversation", "longer than data.max_length", "checks",
                 "every target ends with an", "<|im_end|>", "pad == eos", "legend", "train example 1", "Capital of",
                 "learning rate: "):
        assert text in out, text
    assert any(f"{city}<|im_end|>" in out for city in CAPITALS.values())  # the answer, as rendered
    assert max(len(line) for line in out.splitlines()) <= 80


# ------------------------------------------------------------------------------------------ token classification
def _ner_rows() -> list[dict[str, Any]]:
    """Sentences with a PER and a LOC; every fifth is long enough that data.max_length 16 cuts its LOC."""
    rows = []
    for i in range(40):
        filler = ["and"] * (12 if i % 5 == 0 else 0)
        words = ["the", "friend", "met", ["Alice", "Okonkwo", "Bob"][i % 3], *filler, "in", ["Paris", "Kyoto"][i % 2],
                 f"w{i}"]
        tags = ["O", "O", "O", "B-PER", *["O"] * len(filler), "O", "B-LOC", "O"]
        rows.append({"tokens": words, "tags": tags})
    rows.append({"tokens": list("江泽民在北京"), "tags": ["I-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC"]})
    return rows


def _ner_config(model_dir: Path, train: Path, **data: Any) -> dict[str, Any]:
    return {"task": "token_classification", "model": str(model_dir),
            "data": {"train": str(train), "validation": str(train), "test": str(train), "deduplicate": False,
                     "max_length": 16, **data}}


def test_token_classification_facts_count_sub_tokens_unknowns_and_cut_entities(tiny_bert_dir: Path,
                                                                                tmp_path: Path) -> None:
    rows = _ner_rows()
    train = _write_jsonl(tmp_path / "ner.jsonl", rows)
    got = inspect_data(_ner_config(tiny_bert_dir, train), examples=2)
    json.dumps(got)
    facts = got["facts"]["train"]
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    pieces = [tok(w, add_special_tokens=False)["input_ids"] for r in rows for w in r["tokens"]]
    unknown = sum(t == tok.unk_token_id for p in pieces for t in p)
    assert unknown > 0  # MiniLM lacks some of these characters
    assert facts["sentences"] == 41 and facts["words"] == sum(len(r["tokens"]) for r in rows)
    assert facts["sub_tokens"] == sum(map(len, pieces))
    assert facts["unknown_sub_tokens"] == f"{unknown} ({round(100 * unknown / facts['sub_tokens'], 1)}%)"
    assert facts["entities"] == 82 and facts["entities_PER"] == 41 and facts["entities_LOC"] == 41
    assert facts["entities_starting_with_I"] == 1  # the I-PER opening the Chinese sentence
    # The 8 long sentences lose their LOC (and everything after the filler) to data.max_length 16.
    assert facts["sentences_truncated"] == "8 (19.5%)" and facts["entities_cut"] == 8
    assert got["summary"]["tag scheme"] == "BIO (read as BIO)"
    assert any("sentences are longer than data.max_length 16" in tip for tip in got["suggestions"])
    assert not any("extend_vocabulary" in tip for tip in got["suggestions"])  # few unknowns: no advice
    first = got["examples"][0]
    assert first["words"] == rows[0]["tokens"] and first["tags"] == rows[0]["tags"]
    assert first["tokens"][0] == "[CLS]" and len(first["tokens"]) == 16  # cut at data.max_length
    labelled = [(t, lab) for t, lab in zip(first["tokens"], first["token_labels"], strict=True) if lab is not None]
    assert labelled[:4] == [("the", "O"), ("friend", "O"), ("met", "O"), ("alice", "B-PER")]
    assert first["token_labels"][0] is None and first["token_labels"][-1] is None  # [CLS], [SEP]: -100


def test_mostly_unknown_characters_point_at_extend_vocabulary(tiny_bert_dir: Path, tmp_path: Path) -> None:
    # Characters MiniLM's vocabulary lacks (People's Daily on MiniLM is mostly [UNK] in the same way).
    chars = "泽莳甾铥鑫犇骉"
    rows = [{"tokens": [chars[i % 7], chars[(i + 1) % 7], chars[(i + 3) % 7], "京"],
             "tags": ["B-PER", "I-PER", "O", "B-LOC"]} for i in range(30)]
    train = _write_jsonl(tmp_path / "zh.jsonl", rows)
    got = inspect_data(_ner_config(tiny_bert_dir, train), examples=1)
    facts = got["facts"]["train"]
    assert facts["unknown_sub_tokens"].endswith("(75.0%)") and facts["unknown_words"] == 90
    [tip] = [t for t in got["suggestions"] if "unknown token [UNK]" in t]
    assert tip.startswith("75.0% of train sub-tokens") and "--data.extend_vocabulary" in tip
    # With the extension the unknown characters become words of their own.
    extended = inspect_data(_ner_config(tiny_bert_dir, train, extend_vocabulary=50), examples=0)
    assert extended["facts"]["train"]["unknown_sub_tokens"] == "0 (0.0%)"
    assert extended["facts"]["train"]["unknown_before_extension"] == facts["unknown_sub_tokens"]
    assert extended["summary"]["vocabulary extension"].startswith("7 of up to 50 words added")
    assert not any("unknown token" in t for t in extended["suggestions"])


# ------------------------------------------------------------------------------------------ seq2seq
EN = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
IT = ["uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto"]


def _pairs(n: int) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        idx = [(i * 7 + k * 3) % 8 for k in range(2 + i % 9)]
        rows.append({"source": " ".join(EN[j] for j in idx) + f" {i}", "target": " ".join(IT[j] for j in idx)})
    return rows


def _seq2seq_config(model_dir: Path, train: Path, **data: Any) -> dict[str, Any]:
    return {"task": "seq2seq", "model": str(model_dir),
            "data": {"train": str(train), "seq2seq_task": "translation", "source_language": "English",
                     "target_language": "Italian", "max_length": 10, "max_target_length": 8, **data}}


def test_seq2seq_warm_start_facts_lengths_and_cuts(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rows = _pairs(60)
    dirty = [*rows, rows[0], {"source": "", "target": "uno"}]  # a duplicate source, an empty one
    train = _write_jsonl(tmp_path / "pairs.jsonl", dirty)
    got = inspect_data(_seq2seq_config(tiny_bert_dir, train), examples=1)
    json.dumps(got)
    assert got["summary"]["route"].startswith("warm_start") and "encoder" in got["summary"]["why"]
    facts = got["facts"]
    assert list(facts) == ["train", "validation", "test"]
    assert sum(f["pairs"] for f in facts.values()) == 60
    assert (facts["train"]["rows_read"], facts["train"]["skipped_empty"]) == (62, 1)
    assert facts["train"]["duplicate_sources_removed"] == 1
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    src = [len(tok(r["source"])["input_ids"]) for r in rows]
    tgt = [len(tok(r["target"])["input_ids"]) - 1 for r in rows]  # the [CLS] start token is fed, not a label
    assert sum(f["sources_over_10"] for f in facts.values()) == sum(n > 10 for n in src)
    assert sum(f["targets_over_8"] for f in facts.values()) == sum(n > 8 for n in tgt)
    assert max(int(f["source_tokens_mean/p95/max"].split(" / ")[2]) for f in facts.values()) == max(src)
    assert any("data.max_target_length 8" in tip for tip in got["suggestions"])
    [ex] = got["examples"]
    assert ex["source_tokens"][0] == "[CLS]" and len(ex["source_tokens"]) <= 10
    assert ex["target_tokens"][-1] == "[SEP]" and "[CLS]" not in ex["target_tokens"]


def test_seq2seq_decoder_route_shows_the_loss_mask(tiny_chat_llama_dir: Path, tmp_path: Path) -> None:
    from rich.text import Text

    train = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(40))
    got = inspect_data(_seq2seq_config(tiny_chat_llama_dir, train, max_length=56), examples=1)
    assert got["summary"]["route"].startswith("decoder") and "causal LM" in got["summary"]["why"]
    assert got["summary"]["prompt"] == "Translate from English to Italian:\\n{source}"
    facts = got["facts"]
    assert sum(f["pairs"] for f in facts.values()) == 40
    skipped = sum(f["conversations_skipped_too_long"] for f in facts.values())
    assert 0 < skipped < 40  # the longer pairs do not fit 56 tokens with the system prompt
    [ex] = got["examples"]
    [target] = ex["targets"]
    assert target.removesuffix("<|im_end|>\n") in {r["target"] for r in _pairs(40)}
    shown = Text.from_markup(ex["markup"])
    assert [shown.plain[s.start:s.end] for s in shown.spans if "green" in str(s.style)] == [target]


def test_cli_inspects_ner_and_seq2seq_configs(tiny_bert_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console
    from typer.testing import CliRunner

    from lmtune import cli

    monkeypatch.setattr(cli, "console", Console(width=80))
    ner = tmp_path / "ner.yaml"
    ner.write_text(yaml.safe_dump(_ner_config(tiny_bert_dir, _write_jsonl(tmp_path / "ner.jsonl", _ner_rows()))),
                   encoding="utf-8")
    s2s = tmp_path / "s2s.yaml"
    s2s.write_text(yaml.safe_dump(_seq2seq_config(tiny_bert_dir, _write_jsonl(tmp_path / "p.jsonl", _pairs(40)))),
                   encoding="utf-8")
    for cfg, texts in ((ner, ("unknown sub tokens", "entities cut", "entities PER", "tag scheme: BIO",
                              "train sentence 1", "alice/B-PER", "legend")),
                       (s2s, ("route: warm_start", "source tokens", "targets over 8", "train pair 1", "target:"))):
        result = CliRunner().invoke(cli.app, ["data", "inspect", str(cfg), "--examples", "1"])
        assert result.exit_code == 0, result.output
        for text in texts:
            assert text in result.output, text
        assert max(len(line) for line in result.output.splitlines()) <= 80
