"""Preference data: TRL's pair and unpaired shapes read at file:line, rendered exactly as SFT renders, the bundled
demo sets, and the `data inspect` report for them.

The tokenizer is SmolLM2's real one (ChatML; eos == pad == <|im_end|>, the EOS-masking trap; bos == <|im_start|>;
a template that adds a default system prompt).
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from transformers import AutoTokenizer

from lmtune.config import DataConfig, load_config
from lmtune.data.bundled import BUNDLED_DATA, resolve_bundled_data
from lmtune.data.chat import NO_EOS, RenderedExample, render_conversation
from lmtune.data.chatterbot_pairs import chatterbot_pair_records
from lmtune.data.features import IGNORE_INDEX
from lmtune.data.preference import (
    PROMPT_DIFFERS,
    SAME_TOKENS,
    KTOExample,
    PreferencePair,
    RenderedPair,
    pair_problems,
    preference_splits,
    read_kto_examples,
    read_preference_pairs,
    render_completion,
    render_pair,
)
from lmtune.errors import ConfigError, DataError
from lmtune.tasks.preference_inspect import inspect_kto, inspect_pairs, render_kto_report, render_pairs_report

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What colour is the sky?"}
BLUE = {"role": "assistant", "content": "Blue."}
GREEN = {"role": "assistant", "content": "Green."}
# A template that writes no end-of-turn token: every answer lacks its EOS.
NO_EOS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ':\n' + message['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)
# Its generation prompt ends with a space, which byte-level BPE joins to the answer's first word (" Blue"): that
# token straddles prompt and answer, so the two sides' prompt tokens differ and the first word carries no loss.
SPACE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _data(train: str, **settings: Any) -> DataConfig:
    return DataConfig(train=train, **settings)


def _pairs(tmp_path: Path, rows: list[dict[str, Any]], **settings: Any) -> tuple[list[PreferencePair], dict]:
    source = _jsonl(tmp_path / "pairs.jsonl", rows)
    return read_preference_pairs(source, _data(source, **settings))


# ------------------------------------------------------------------------------------------ reading pairs
SHAPES = [
    # (name, record, data.columns, format, prompt, chosen, rejected)
    ("standard", {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."}, {},
     "standard", [USER], "Blue.", "Green."),
    ("standard with system column",
     {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green.", "system": "Be brief."}, {},
     "standard", [SYSTEM, USER], "Blue.", "Green."),
    ("conversational", {"prompt": [SYSTEM, USER], "chosen": [BLUE], "rejected": [GREEN]}, {},
     "conversational", [SYSTEM, USER], "Blue.", "Green."),
    ("conversational multi-turn prompt",
     {"prompt": [USER, BLUE, {"role": "user", "content": "Sure?"}], "chosen": [BLUE], "rejected": [GREEN]}, {},
     "conversational", [USER, BLUE, {"role": "user", "content": "Sure?"}], "Blue.", "Green."),
    ("implicit", {"chosen": [SYSTEM, USER, BLUE], "rejected": [SYSTEM, USER, GREEN]}, {},
     "implicit", [SYSTEM, USER], "Blue.", "Green."),
    ("implicit multi-turn", {"chosen": [USER, BLUE, USER, BLUE], "rejected": [USER, BLUE, USER, GREEN]}, {},
     "implicit", [USER, BLUE, USER], "Blue.", "Green."),
    ("implicit beside a text prompt (TRL's maybe_extract_prompt)",
     {"prompt": "ignored", "chosen": [USER, BLUE], "rejected": [USER, GREEN]}, {},
     "implicit", [USER], "Blue.", "Green."),
    ("implicit ShareGPT keys",
     {"chosen": [{"from": "human", "value": "What colour is the sky?"}, {"from": "gpt", "value": "Blue."}],
      "rejected": [{"from": "human", "value": "What colour is the sky?"}, {"from": "gpt", "value": "Green."}]},
     {}, "implicit", [USER], "Blue.", "Green."),
    ("OpenAI text parts",
     {"prompt": [{"role": "user", "content": [{"type": "text", "text": "What colour "},
                                              {"type": "text", "text": "is the sky?"}]}],
      "chosen": [BLUE], "rejected": [GREEN]}, {}, "conversational", [USER], "Blue.", "Green."),
    ("renamed columns", {"question": "What colour is the sky?", "good": "Blue.", "bad": "Green.", "sys": "Be brief."},
     {"prompt": "question", "chosen": "good", "rejected": "bad", "system": "sys"},
     "standard", [SYSTEM, USER], "Blue.", "Green."),
    ("roles normalised", {"prompt": [{"role": " User ", "content": "What colour is the sky?"}],
                          "chosen": [{"role": "ASSISTANT", "content": "Blue."}], "rejected": "Green."}, {},
     "conversational", [USER], "Blue.", "Green."),
]


@pytest.mark.parametrize(("name", "record", "columns", "fmt", "prompt", "chosen", "rejected"), SHAPES,
                         ids=[case[0] for case in SHAPES])
def test_pair_shapes(tmp_path: Path, name: str, record: dict[str, Any], columns: dict[str, str], fmt: str,
                     prompt: list[dict[str, str]], chosen: str, rejected: str) -> None:
    other = copy.deepcopy(record)  # a second record on line 2, so the line numbers are checked too
    pairs, facts = _pairs(tmp_path, [record, other], columns=columns)
    assert facts["format"] == fmt and facts["rows_read"] == 2 and facts["pairs"] == 2
    assert pairs[1] == PreferencePair(prompt, chosen, rejected, 2)


def test_csv_cells_with_json_lists(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerow({"prompt": json.dumps([SYSTEM, USER]), "chosen": json.dumps([BLUE]),
                         "rejected": json.dumps([GREEN])})
        # Text that merely looks like a list stays text.
        writer.writerow({"prompt": "[1, 2] or [3]?", "chosen": "[1, 2]", "rejected": "[3]"})
    pairs, facts = read_preference_pairs(str(path), _data(str(path)))
    assert pairs[0] == PreferencePair([SYSTEM, USER], "Blue.", "Green.", 2)
    assert pairs[1] == PreferencePair([{"role": "user", "content": "[1, 2] or [3]?"}], "[1, 2]", "[3]", 3)
    assert facts["format"] == "mixed"


GOOD = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}
BAD_PAIRS = [
    # (name, record placed on line 2, data.columns, field, message pattern)
    ("prompt not text", {"prompt": 3, "chosen": "A", "rejected": "B"}, {}, "prompt",
     "expected text or a list of messages, found a number"),
    ("empty prompt", {"prompt": " ", "chosen": "A", "rejected": "B"}, {}, "prompt", "the prompt is empty"),
    ("unknown role", {"prompt": [{"role": "tool", "content": "x"}], "chosen": "A", "rejected": "B"}, {}, "prompt",
     "message 1 \\(index 0\\) has the unknown role 'tool'"),
    ("prompt ends with the assistant", {"prompt": [USER, BLUE], "chosen": "A", "rejected": "B"}, {}, "prompt",
     "the prompt must end with a user message; the last is 'assistant'"),
    ("prompt starts with the assistant", {"prompt": [BLUE, USER], "chosen": "A", "rejected": "B"}, {}, "prompt",
     "must start with a user message"),
    ("system not first", {"prompt": [USER, SYSTEM, USER], "chosen": "A", "rejected": "B"}, {}, "prompt",
     "a system message is only allowed first"),
    ("message without role", {"prompt": [{"text": "hi"}], "chosen": "A", "rejected": "B"}, {}, "prompt",
     "lacks 'role' and 'content'"),
    ("content not text", {"prompt": [{"role": "user", "content": 5}], "chosen": "A", "rejected": "B"}, {}, "prompt",
     "'content' must be text"),
    ("answer is a conversation beside a message prompt", {"prompt": [USER], "chosen": [USER, BLUE], "rejected": "B"},
     {}, "chosen", "expected the answer alone, one assistant message; found 2 message"),
    ("answer is a user message", {"prompt": "Q", "chosen": "A", "rejected": [USER]}, {}, "rejected",
     "expected the answer alone"),
    ("answer not text", {"prompt": "Q", "chosen": {"text": "A"}, "rejected": "B"}, {}, "chosen",
     "expected text or a list holding the assistant message, found an object"),
    ("implicit: rejected not a conversation", {"chosen": [USER, BLUE], "rejected": "Green."}, {}, "rejected",
     "chosen is a conversation but rejected is text"),
    ("implicit: differ before the answer", {"chosen": [USER, BLUE, USER, BLUE],
                                            "rejected": [USER, GREEN, USER, GREEN]}, {}, "chosen",
     "share their first 1 message\\(s\\) and differ from message 2 \\(index 1\\)"),
    ("implicit: nothing shared", {"chosen": [USER, BLUE], "rejected": [{"role": "user", "content": "Other?"}, GREEN]},
     {}, "chosen", "share their first 0 message"),
    ("implicit: ends with a user turn", {"chosen": [USER, BLUE, USER], "rejected": [USER, GREEN, USER]}, {},
     "chosen", "continues with 2 message\\(s\\): assistant, user"),
    ("system column beside a system message", {"prompt": [SYSTEM, USER], "chosen": "A", "rejected": "B",
                                               "system": "Be kind."}, {}, "system", "also starts with a system"),
    ("system not text", {"prompt": "Q", "chosen": "A", "rejected": "B", "system": 1}, {}, "system",
     "expected text, found a number"),
    ("a value missing from the record", {"prompt": "Q", "chosen": "A"}, {}, "rejected", "the record has no rejected"),
    ("renamed column missing from the record", {"prompt": "Q", "rejected": "B"},
     {"chosen": "good"}, "good", "the record has no chosen"),
]


@pytest.mark.parametrize(("name", "record", "columns", "field", "pattern"), BAD_PAIRS,
                         ids=[case[0] for case in BAD_PAIRS])
def test_bad_pairs(tmp_path: Path, name: str, record: dict[str, Any], columns: dict[str, str], field: str,
                   pattern: str) -> None:
    first = {columns.get(key, key): value for key, value in GOOD.items()}
    if "prompt" not in record:
        first = {"chosen": [USER, BLUE], "rejected": [USER, GREEN]}
    with pytest.raises(DataError, match=pattern) as caught:
        _pairs(tmp_path, [first, record], columns=columns)
    assert (caught.value.line, caught.value.field) == (2, field)
    assert caught.value.file == str(tmp_path / "pairs.jsonl")


def test_missing_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no column named 'rejected'; the columns are: 'prompt', 'chosen', 'bad'") as e:
        _pairs(tmp_path, [{"prompt": "Q", "chosen": "A", "bad": "B"}])
    assert e.value.field == "rejected" and "data.columns" in str(e.value.hint)
    with pytest.raises(DataError, match="no column named 'good' \\(for chosen\\)") as e:
        _pairs(tmp_path, [{"prompt": "Q", "Good": "A", "rejected": "B"}], columns={"chosen": "good"})
    assert "did you mean 'Good'" in str(e.value.hint)
    # Text answers without a prompt column: the prompt is missing, not guessed.
    with pytest.raises(DataError, match="no column named 'prompt'") as e:
        _pairs(tmp_path, [{"chosen": "A", "rejected": "B"}])
    assert (e.value.line, e.value.field) == (1, "prompt") and "whole conversations" in str(e.value.hint)


def test_unknown_column_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'answer'") as e:
        _pairs(tmp_path, [GOOD], columns={"answer": "chosen"})
    assert e.value.field == "data.columns"
    with pytest.raises(ConfigError, match="did you mean \\{chosen: good\\}"):
        _pairs(tmp_path, [GOOD], columns={"good": "chosen"})


def test_identical_and_empty_answers_are_skipped_and_counted(tmp_path: Path, caplog: Any) -> None:
    rows = [
        GOOD,
        {"prompt": "Q2", "chosen": "Same.", "rejected": " Same.\n"},  # line 2: identical up to whitespace
        {"prompt": "Q3", "chosen": "", "rejected": "B"},  # line 3: empty
        {"prompt": "Q4", "chosen": [{"role": "assistant", "content": "  "}], "rejected": [GREEN]},  # line 4: empty
        {"chosen": [USER, BLUE], "rejected": [USER, BLUE]},  # line 5: the same conversation
        {"prompt": "Q6", "chosen": "A6", "rejected": "B6"},
    ]
    with caplog.at_level("WARNING", logger="lmtune"):
        pairs, facts = _pairs(tmp_path, rows)
    assert [pair.line for pair in pairs] == [1, 6]
    assert facts["skipped"] == {"identical": {"count": 2, "lines": [2, 5]}, "empty_answer": {"count": 2, "lines": [3, 4]}}
    assert facts["pairs"] == 2 and facts["rows_read"] == 6
    assert "2 pair(s) skipped because chosen and rejected are the same text (lines 2, 5)" in caplog.text
    with pytest.raises(DataError, match="no usable preference pairs among 2 records: 1 skipped because chosen and "
                                        "rejected are the same text; 1 skipped because an answer is empty"):
        _pairs(tmp_path, rows[1:3])


# ------------------------------------------------------------------------------------------ reading KTO
LABELS = [(True, True), (False, False), (1, True), (0, False), ("true", True), (" False ", False), ("1", True),
          ("0", False), ("Desirable", True), ("undesirable", False)]


@pytest.mark.parametrize(("label", "desirable"), LABELS)
def test_kto_labels(tmp_path: Path, label: Any, desirable: bool) -> None:
    source = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q", "completion": "A", "label": label}])
    examples, facts = read_kto_examples(source, _data(source))
    assert examples == [KTOExample([{"role": "user", "content": "Q"}], "A", desirable, 1)]
    assert (facts["desirable"], facts["undesirable"]) == ((1, 0) if desirable else (0, 1))


@pytest.mark.parametrize("label", ["maybe", 2, 0.5, None, [True]])
def test_kto_bad_labels(tmp_path: Path, label: Any) -> None:
    rows = [{"prompt": "Q", "completion": "A", "label": True}, {"prompt": "Q", "completion": "B", "label": label}]
    source = _jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match=r"the label|the record has no label") as e:
        read_kto_examples(source, _data(source))
    assert (e.value.line, e.value.field) == (2, "label")


def test_kto_shapes_and_skips(tmp_path: Path) -> None:
    rows = [
        {"prompt": [SYSTEM, USER], "completion": [BLUE], "label": "desirable"},
        {"prompt": "Q", "completion": "", "label": False},  # empty: skipped
        {"q": "Q3", "answer": "A3", "ok": 0, "system": "Be brief."},
    ]
    source = _jsonl(tmp_path / "kto.jsonl", rows)
    columns = {"prompt": "q", "completion": "answer", "label": "ok"}
    with pytest.raises(DataError, match="the record has no prompt") as e:
        read_kto_examples(source, _data(source, columns=columns))
    assert (e.value.line, e.value.field) == (1, "q")
    rows = [{"q" if k == "prompt" else "answer" if k == "completion" else "ok" if k == "label" else k: v
             for k, v in row.items()} for row in rows]
    source = _jsonl(tmp_path / "kto.jsonl", rows)
    examples, facts = read_kto_examples(source, _data(source, columns=columns))
    assert examples == [KTOExample([SYSTEM, USER], "Blue.", True, 1),
                        KTOExample([SYSTEM, {"role": "user", "content": "Q3"}], "A3", False, 3)]
    assert facts["skipped"] == {"empty_answer": {"count": 1, "lines": [2]}}
    assert facts["format"] == "mixed" and facts["examples"] == 2
    with pytest.raises(DataError, match="expected the answer alone") as e:
        source = _jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q", "completion": [USER, BLUE], "label": 1}])
        read_kto_examples(source, _data(source))
    assert (e.value.line, e.value.field) == (1, "completion")


# ------------------------------------------------------------------------------------------ rendering
PROMPTS = [[USER], [SYSTEM, USER], [USER, BLUE, {"role": "user", "content": "Are you sure?"}]]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["user", "system", "multi-turn"])
def test_render_pair_is_sft_rendering(smol: Any, prompt: list[dict[str, str]]) -> None:
    pair = PreferencePair(prompt, "The sky is blue.", "The sky is green, I think.", 1)
    rendered = render_pair(smol, pair, max_length=256, too_long="skip")
    assert rendered is not None
    for side, answer in ((rendered.chosen, pair.chosen), (rendered.rejected, pair.rejected)):
        sft = render_conversation(smol, [*prompt, {"role": "assistant", "content": answer}],
                                  train_on="last_assistant", max_length=256)
        assert side == sft
        assert side == render_completion(smol, prompt, answer, max_length=256, too_long="skip")
        # Loss on the final answer only, and it ends with <|im_end|> (== pad == eos), then ChatML's newline.
        targets = [label for label in side.labels if label != IGNORE_INDEX]
        assert smol.decode(targets) == answer + "<|im_end|>\n"
        assert smol.pad_token_id == smol.eos_token_id == targets[-2]
        assert side.labels[: side.prompt_tokens] == [IGNORE_INDEX] * side.prompt_tokens
        assert all(label != IGNORE_INDEX for label in side.labels[side.prompt_tokens:])
    # Both answers start "The sky is": the pair diverges after those shared tokens.
    chosen, rejected, at = rendered.chosen.input_ids, rendered.rejected.input_ids, rendered.divergence
    assert at > rendered.chosen.prompt_tokens == rendered.rejected.prompt_tokens
    assert chosen[:at] == rejected[:at] and chosen[at] != rejected[at]
    assert smol.decode(chosen[rendered.chosen.prompt_tokens:at]) == "The sky is"
    assert pair_problems(smol, rendered) == []


def test_render_pair_too_long(smol: Any) -> None:
    prompt = [{"role": "user", "content": " ".join(f"w{i}" for i in range(60))}]
    short, long = "Yes.", " ".join(["maybe"] * 60)
    pair = PreferencePair(prompt, short, long, 1)
    whole = render_pair(smol, pair, max_length=10_000, too_long="skip")
    assert whole is not None
    n_chosen, n_rejected = len(whole.chosen.input_ids), len(whole.rejected.input_ids)
    # The short side fits, the long one does not. (A cut of 20 would keep the BOS <|im_start|> right before the
    # user turn's <|im_start|>: two in a row, as SFT's truncation would too.)
    limit = n_rejected - 30
    assert n_chosen < limit
    # skip: the pair goes as a whole, though its chosen side alone would fit.
    assert render_pair(smol, pair, max_length=limit, too_long="skip") is None
    assert render_completion(smol, prompt, short, max_length=limit, too_long="skip") is not None

    cut = render_pair(smol, pair, max_length=limit, too_long="truncate_left")
    assert cut is not None
    assert cut.chosen.truncated_tokens == cut.rejected.truncated_tokens == 30
    assert len(cut.rejected.input_ids) == limit and len(cut.chosen.input_ids) == n_chosen - 30
    for side, full in ((cut.chosen, whole.chosen), (cut.rejected, whole.rejected)):
        # The leading <|im_start|> (the BOS) is kept; the next 30 prompt tokens go; the answer is untouched.
        assert side.input_ids == full.input_ids[:1] + full.input_ids[31:]
        assert side.labels == full.labels[:1] + full.labels[31:]
        assert side.prompt_tokens == full.prompt_tokens - 30
        text = pair.chosen if side is cut.chosen else pair.rejected
        assert side.text.startswith("<|im_start|>") and side.text.endswith(text + "<|im_end|>\n")
    assert cut.chosen.input_ids[: cut.chosen.prompt_tokens] == cut.rejected.input_ids[: cut.rejected.prompt_tokens]
    assert cut.divergence == cut.chosen.prompt_tokens
    assert pair_problems(smol, cut) == []
    # The long answer alone (with the BOS) does not fit: skipped even with truncate_left.
    answer = n_rejected - whole.rejected.prompt_tokens
    assert render_pair(smol, pair, max_length=answer, too_long="truncate_left") is None
    assert render_pair(smol, pair, max_length=answer + 1, too_long="truncate_left") is not None


def test_pair_problems(smol: Any) -> None:
    no_eos = copy.deepcopy(smol)
    no_eos.chat_template = NO_EOS_TEMPLATE
    pair = PreferencePair([USER], "Blue.", "Green.", 1)
    rendered = render_pair(no_eos, pair, max_length=128, too_long="skip")
    assert rendered is not None and pair_problems(no_eos, rendered) == [NO_EOS]

    space = copy.deepcopy(smol)
    space.chat_template = SPACE_TEMPLATE
    rendered = render_pair(space, pair, max_length=128, too_long="skip")
    assert rendered is not None and pair_problems(space, rendered) == [PROMPT_DIFFERS]

    sound = render_pair(smol, pair, max_length=128, too_long="skip")
    assert sound is not None
    same = RenderedPair(sound.chosen, sound.chosen, len(sound.chosen.input_ids))
    assert pair_problems(smol, same) == [SAME_TOKENS]
    shifted = RenderedExample([smol.bos_token_id, *sound.rejected.input_ids[1:]], sound.rejected.labels,
                              sound.rejected.prompt_tokens, 0, "")
    shifted.input_ids[3] += 1
    assert PROMPT_DIFFERS in pair_problems(smol, RenderedPair(sound.chosen, shifted, 3))


# ------------------------------------------------------------------------------------------ splits
def test_preference_splits(tmp_path: Path) -> None:
    rows = [{"prompt": f"Q{i}", "chosen": f"A{i}", "rejected": f"B{i}"} for i in range(40)]
    rows.insert(5, dict(rows[0]))  # a repeat (line 6)
    train = _jsonl(tmp_path / "train.jsonl", rows)
    data = _data(train, validation_size=0.1, test_size=0.1)
    splits, info = preference_splits(data, lambda source: read_preference_pairs(source, data))
    assert info["train"]["duplicates_removed"] == 1
    assert {split: len(records) for split, records in splits.items()} == {"validation": 4, "test": 4, "train": 32}
    lines = [pair.line for records in splits.values() for pair in records]
    assert sorted(lines) == [line for line in range(1, 42) if line != 6]
    assert info["validation"] == {"source": f"{train} (split 0.1)", "duplicates_removed": 0}

    # A validation file: records also in train are dropped (leakage); max_samples per split, in line order.
    validation = _jsonl(tmp_path / "validation.jsonl", [rows[1], {"prompt": "V", "chosen": "x", "rejected": "y"}])
    data = _data(train, validation=validation, test_size=0.1, max_samples=10)
    splits, info = preference_splits(data, lambda source: read_preference_pairs(source, data))
    assert [pair.prompt[0]["content"] for pair in splits["validation"]] == ["V"]
    assert info["validation"]["duplicates_removed"] == 1 and info["validation"]["rows_read"] == 2
    assert len(splits["train"]) == 10 and [p.line for p in splits["train"]] == sorted(p.line for p in splits["train"])

    kto_rows = [{"prompt": f"Q{i}", "completion": f"A{i}", "label": i % 2} for i in range(20)] * 2
    kto = _jsonl(tmp_path / "kto.jsonl", kto_rows)
    data = _data(kto)
    splits, info = preference_splits(data, lambda source: read_kto_examples(source, data), what="examples")
    assert info["train"]["duplicates_removed"] == 20 and sum(map(len, splits.values())) == 20
    with pytest.raises(DataError, match="2 examples are too few to hold out validation and test"):
        small = _jsonl(tmp_path / "small.jsonl", kto_rows[:2])
        preference_splits(_data(small), lambda source: read_kto_examples(source, _data(small)), what="examples")


# ------------------------------------------------------------------------------------------ bundled sets
def test_bundled_chatterbot_pairs() -> None:
    assert BUNDLED_DATA["chatterbot_pairs"].columns == ("prompt", "chosen", "rejected", "topic")
    records = [json.loads(line) for line in resolve_bundled_data("chatterbot_pairs").read_text().splitlines()]
    assert len(records) == 1957  # the English corpus's one-question conversations
    answers_to: dict[str, set[str]] = {}
    topic_of: dict[str, set[str]] = {}
    for record in records:
        question, answer = record["prompt"][0]["content"], record["chosen"][0]["content"]
        answers_to.setdefault(question, set()).add(answer)
        topic_of.setdefault(answer, set()).add(record["topic"])
    for record in records:
        assert set(record) == {"prompt", "chosen", "rejected", "topic"}
        assert [m["role"] for m in record["prompt"]] == ["user"]
        chosen, rejected = record["chosen"][0]["content"], record["rejected"][0]["content"]
        assert chosen != rejected
        # The rejected answer is one the corpus never gives to this question, from another topic.
        assert rejected not in answers_to[record["prompt"][0]["content"]]
        assert topic_of[rejected] - {record["topic"]}
    # Seeded: the same records every time.
    folder = BUNDLED_DATA["chatterbot_pairs"].source_path()
    assert folder is not None and chatterbot_pair_records(folder) == records
    pairs, facts = read_preference_pairs("bundled:chatterbot_pairs", _data("bundled:chatterbot_pairs"))
    assert facts["format"] == "conversational" and len(pairs) == 1957
    assert facts["skipped"]["identical"]["count"] == facts["skipped"]["empty_answer"]["count"] == 0


def test_bundled_chatterbot_kto() -> None:
    records = [json.loads(line) for line in resolve_bundled_data("chatterbot_kto").read_text().splitlines()]
    pairs = [json.loads(line) for line in resolve_bundled_data("chatterbot_pairs").read_text().splitlines()]
    assert len(records) == 2 * len(pairs)
    assert sum(record["label"] for record in records) == len(pairs)
    first = pairs[0]
    rows = [record for record in records if record["prompt"] == first["prompt"]
            and record["completion"] in (first["chosen"], first["rejected"])]
    assert {(r["completion"][0]["content"], r["label"]) for r in rows} >= {
        (first["chosen"][0]["content"], True), (first["rejected"][0]["content"], False)}
    assert [record["label"] for record in records[:20]] != [True, False] * 10  # shuffled, not in pair order
    examples, facts = read_kto_examples("bundled:chatterbot_kto", _data("bundled:chatterbot_kto"))
    assert facts["desirable"] == facts["undesirable"] == len(pairs) and facts["format"] == "conversational"
    assert len(examples) == len(records)


# ------------------------------------------------------------------------------------------ inspect
def _config(train: str, model: Path, **data: Any) -> Any:
    return load_config({"task": "dpo", "model": str(model), "data": {"train": train, "max_length": 64, **data},
                        "train": {"batch_size": 4}})


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    rows: list[dict[str, Any]] = [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)}
                                  for i in range(20)]
    rows[3] = {"prompt": "Same?", "chosen": "Yes", "rejected": "Yes"}  # line 4: identical
    rows[7] = {"prompt": "Empty?", "chosen": "", "rejected": "No"}  # line 8: empty
    rows[11] = {"prompt": "long " * 80, "chosen": "a", "rejected": "b"}  # line 12: the prompt does not fit
    rows[15] = {"prompt": "Hi", "chosen": "ok", "rejected": "word " * 80}  # line 16: an answer does not fit
    folder = tmp_path_factory.mktemp("pairs")
    return _jsonl(folder / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("eval")
    return {"validation": _jsonl(folder / "validation.jsonl", [{"prompt": "V?", "chosen": "v", "rejected": "w"}]),
            "test": _jsonl(folder / "test.jsonl", [{"prompt": "T?", "chosen": "t", "rejected": "u"}])}


def test_inspect_pairs(smol: Any, smollm2_tokenizer_dir: Path, pair_file: str, eval_files: dict[str, str]) -> None:
    report = inspect_pairs(_config(pair_file, smollm2_tokenizer_dir, **eval_files), smol, "pairs.yaml", examples=2)
    json.dumps(report)  # `lmtune data inspect --json`
    assert list(report["splits"]) == ["train", "validation", "test"]
    train = report["splits"]["train"]
    assert (train["rows_read"], train["format"], train["format_detected"]) == (20, "standard", True)
    assert train["skipped_on_read"] == {"identical": {"count": 1, "lines": [4]},
                                        "empty_answer": {"count": 1, "lines": [8]}}
    assert (train["pairs"], train["kept"]) == (18, 16)
    assert train["too_long"] == {"over_max_length": 2, "skipped": 2, "skipped_lines": [12, 16], "answer_too_long": 1,
                                 "truncated": 0, "tokens_cut": 0, "truncate_left_keeps": 1}
    assert train["no_eos"] == 0 and report["errors"] == []
    assert train["lengths"]["chosen"]["min"] == 3  # one digit, <|im_end|>, newline
    assert train["lengths"]["rejected"]["max"] > 64 and train["lengths"]["prompt"]["max"] > 64
    assert {row["status"] for row in report["checks"] if "every pair" in row["check"]} == {"ok"}
    fit = next(row for row in report["checks"] if row["check"].startswith("train: pairs fit"))
    assert fit["status"] == "warning" and (fit["count"], fit["total"]) == (2, 18)
    assert any("truncate_left would keep 1 of the 2" in tip for tip in report["suggestions"])
    first = report["examples"][0]
    assert first["line"] == 1 and first["divergence"] == first["prompt_tokens"]
    assert first["shared"]["text"].endswith("<|im_start|>assistant\n")
    assert (first["chosen"]["text"], first["rejected"]["text"]) == ("0<|im_end|>\n", "1<|im_end|>\n")
    assert first["loss_tokens"] == {"chosen": 3, "rejected": 3}
    assert len(report["examples"]) == 2
    console = Console(record=True, width=80)
    render_pairs_report(report, console)
    shown = console.export_text()
    assert "train pair 1 (line 1)" in shown and "rejected from token" in shown

    # truncate_left keeps the long prompt (cut from the left) and still skips the long answer.
    cfg = _config(pair_file, smollm2_tokenizer_dir, too_long="truncate_left", **eval_files)
    report = inspect_pairs(cfg, smol, None, examples=0)
    tl = report["splits"]["train"]["too_long"]
    assert (tl["skipped_lines"], tl["answer_too_long"], tl["truncated"], tl["truncate_left_keeps"]) == ([16], 1, 1, None)
    assert tl["tokens_cut"] > 0 and report["splits"]["train"]["kept"] == 17
    assert report["examples"] == []


def test_inspect_pairs_errors(smol: Any, tmp_path: Path, pair_file: str, eval_files: dict[str, str]) -> None:
    # A model folder with only 50 positions: data.max_length 64 is an error; a template without EOS another.
    model = tmp_path / "model"
    shutil.copytree(Path(smol.name_or_path), model)
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 50}))
    no_eos = AutoTokenizer.from_pretrained(model)
    no_eos.chat_template = NO_EOS_TEMPLATE
    report = inspect_pairs(_config(pair_file, model, **eval_files), no_eos, None)
    assert report["model_path"] == str(model)
    assert report["splits"]["train"]["pairs"] == 18 and report["splits"]["validation"]["rows_read"] == 1
    assert report["splits"]["train"]["no_eos"] == report["splits"]["train"]["kept"] == 16
    assert any("end-of-turn" in row["check"] and row["status"] == "error" for row in report["checks"])
    assert any(NO_EOS in error for error in report["errors"])
    assert any("larger than the model's 50 positions" in error for error in report["errors"])
    render_pairs_report(report, Console(record=True, width=80))


def test_inspect_kto(smol: Any, smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"What is {i} + {i}?", "completion": str(2 * i), "label": True} for i in range(10)]
    rows[2] = {"prompt": "Empty?", "completion": " ", "label": False}  # line 3: skipped
    rows[5] = {"prompt": "Hi", "completion": "word " * 80, "label": True}  # line 6: too long
    source = _jsonl(tmp_path / "kto.jsonl", rows)
    validation = _jsonl(tmp_path / "v.jsonl", [{"prompt": "V?", "completion": "v", "label": False}])
    report = inspect_kto(_config(source, smollm2_tokenizer_dir, validation=validation, test=validation), smol, None,
                         examples=1)
    json.dumps(report)
    train = report["splits"]["train"]
    assert train["skipped_on_read"] == {"empty_answer": {"count": 1, "lines": [3]}}
    assert (train["examples"], train["kept"], train["desirable"], train["undesirable"]) == (9, 8, 9, 0)
    assert train["too_long"]["skipped_lines"] == [6] and train["too_long"]["answer_too_long"] == 1
    assert report["splits"]["test"]["duplicates_removed"] == 0
    balance = next(row for row in report["checks"] if row["check"].startswith("train has desirable"))
    assert balance["status"] == "warning" and "no undesirable example" in balance["detail"]
    assert report["examples"][0]["line"] == 1 and report["examples"][0]["loss_tokens"] == 3
    console = Console(record=True, width=80)
    render_kto_report(report, console)
    assert "train example 1 (line 1, desirable)" in console.export_text()
