"""Chat data: format detection, validation at file:line, and loss masks that match the real chat template.

The tokenizers are real: SmolLM2's (ChatML, eos == pad == <|im_end|>, bos == <|im_start|>, and a template
that injects a default system prompt) and MiniLM's WordPiece (no chat template at all).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from helpers import loss_runs
from transformers import AutoTokenizer

from lmtune.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    DOUBLE_BOS,
    FORMATS,
    IGNORE_INDEX,
    NO_EOS,
    NO_LOSS,
    RenderedExample,
    check_rendered,
    detect_format,
    end_of_turn_ids,
    ensure_chat_template,
    format_conversation_for_display,
    render_conversation,
    to_messages,
)
from lmtune.errors import ConfigError, DataError, ModelError

SOURCE = "chats.jsonl"
LINE = 7
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course.\nAnything else?"},
]
ASSISTANT_CONTENTS = ["Hello! How can I help?", "4, of course.\nAnything else?"]


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def minilm_chat() -> tuple[Any, bool]:
    """MiniLM's tokenizer after ensure_chat_template, and what that returned."""
    from helpers import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    return tok, ensure_chat_template(tok)


# ------------------------------------------------------------------------------------ detection

# rows, columns, expected format
DETECTION_CASES = [
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], {}, "openai"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}], {}, "sharegpt"),
    ([{"instruction": "q", "input": "", "output": "a"}], {}, "alpaca"),
    ([{"instruction": "q", "output": "a", "system": "s"}], {}, "alpaca"),
    ([{"question": "q", "answer": "a"}], {"instruction": "question", "output": "answer"}, "alpaca"),
    ([{"dialog": [{"role": "user", "content": "q"}]}], {"messages": "dialog"}, "openai"),
    ([{"chat": [{"from": "human", "value": "q"}]}], {"conversations": "chat"}, "sharegpt"),
    # An empty first record (a blank row read as None/"" everywhere) is looked past.
    ([{"instruction": None, "output": ""}, {"instruction": "q", "output": "a"}], {}, "alpaca"),
]


@pytest.mark.parametrize(("rows", "columns", "expected"), DETECTION_CASES)
def test_detect_format(rows: list[dict[str, Any]], columns: dict[str, str], expected: str) -> None:
    assert detect_format(rows, columns, SOURCE) == expected


def test_unknown_format_names_formats_tried_and_keys_found() -> None:
    rows = [{"question": "q", "answer": "a", "id": 3}]
    with pytest.raises(DataError) as info:
        detect_format(rows, {"instruction": "prompt"}, SOURCE)
    message = str(info.value)
    assert message.startswith(SOURCE)
    for fmt in FORMATS:
        assert fmt in message
    # What each format needs (the user's name for a mapped key) and what the records hold.
    for needed in ("'prompt' (for instruction)", "'output'", "'conversations'", "'messages'"):
        assert needed in message
    assert "keys found: 'question', 'answer', 'id'" in message
    assert "data.columns" in message


def test_ambiguous_format_asks_for_chat_format() -> None:
    rows = [{"messages": [{"role": "user", "content": "q"}], "instruction": "q", "output": "a"}]
    with pytest.raises(DataError, match=r"several chat formats \(alpaca, openai\)") as info:
        detect_format(rows, {}, SOURCE)
    assert info.value.hint is not None and "data.chat_format" in info.value.hint


@pytest.mark.parametrize(
    ("columns", "fragment"),
    [
        ({"question": "instruction"}, "did you mean {instruction: question}"),
        ({"prompt": "x"}, "unknown key 'prompt'"),
    ],
)
def test_bad_column_mapping_is_a_config_error(columns: dict[str, str], fragment: str) -> None:
    row = {"instruction": "q", "output": "a"}
    with pytest.raises(ConfigError, match=r"data\.columns") as info:
        detect_format([row], columns, SOURCE)
    assert fragment in str(info.value)
    # Also when data.chat_format is given and detection is skipped.
    with pytest.raises(ConfigError, match=r"data\.columns"):
        to_messages(row, "alpaca", columns, source=SOURCE, line=LINE)


# ------------------------------------------------------------------------------------ messages

U, A, S = "user", "assistant", "system"

# row, format, columns, expected messages
GOOD_RECORDS = [
    (
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "openai",
        {},
        [(S, "s"), (U, "q"), (A, "a")],
    ),
    (
        {
            "messages": [
                {
                    "role": "User",
                    "content": [{"type": "text", "text": "look "}, {"type": "text", "text": "here"}],
                },
                {"role": "assistant", "content": "ok"},
            ]
        },
        "openai",
        {},
        [(U, "look here"), (A, "ok")],
    ),
    (
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "User", "value": "q2"},
                {"from": "ChatGPT", "value": "a2"},
                {"from": "HUMAN", "value": "q3"},
                {"from": "bing", "value": "a3"},
                {"from": "user", "value": "q4"},
                {"from": "Bard", "value": "a4"},
                {"from": "human", "value": "q5"},
                {"from": "model", "value": "a5", "weight": 1},
            ]
        },
        "sharegpt",
        {},
        [(S, "s")] + [(r, f"{'q' if r == U else 'a'}{i}") for i in range(1, 6) for r in (U, A)],
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
        "sharegpt",
        {},
        [(U, "q"), (A, "a")],
    ),
    (
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        "alpaca",
        {},
        [(U, "Translate.\n\nchat"), (A, "cat")],
    ),
    ({"instruction": "Say hi.", "input": "  ", "output": "hi"}, "alpaca", {}, [(U, "Say hi."), (A, "hi")]),
    (
        {"instruction": "Say hi.", "input": None, "output": "hi", "system": "Be kind."},
        "alpaca",
        {},
        [(S, "Be kind."), (U, "Say hi."), (A, "hi")],
    ),
    ({"instruction": "Say hi.", "output": "hi", "system": ""}, "alpaca", {}, [(U, "Say hi."), (A, "hi")]),
    (
        {"q": "Why?", "ctx": "sky", "a": "Rayleigh.", "sys": "Be exact."},
        "alpaca",
        {"instruction": "q", "input": "ctx", "output": "a", "system": "sys"},
        [(S, "Be exact."), (U, "Why?\n\nsky"), (A, "Rayleigh.")],
    ),
    (
        {"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "openai",
        {"messages": "dialog"},
        [(U, "q"), (A, "a")],
    ),
]


@pytest.mark.parametrize(("row", "fmt", "columns", "expected"), GOOD_RECORDS)
def test_to_messages(
    row: dict[str, Any], fmt: str, columns: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    messages = to_messages(row, fmt, columns, source=SOURCE, line=LINE)
    assert messages == [{"role": role, "content": content} for role, content in expected]


def _openai(*turns: Any) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# row, format, columns, field named in the error, fragment of the message
BAD_RECORDS = [
    (
        {"messages": '[{"role": "user"}]'},
        "openai",
        {},
        "messages",
        "expected a list of messages, found a string",
    ),
    ({"messages": None}, "openai", {}, "messages", "expected a list of messages, found null"),
    ({"text": "hi", "messages": None}, "openai", {"messages": "dialog"}, "dialog", "found null"),
    ({"messages": []}, "openai", {}, "messages", "has no messages"),
    ({"messages": ["hi"]}, "openai", {}, "messages", "message 1 (index 0) is a string, not an object"),
    (
        {"messages": [{"role": "user", "text": "q"}]},
        "openai",
        {},
        "messages",
        "lacks the key 'content'; it has 'role', 'text'",
    ),
    (
        {"conversations": [{"role": "user", "content": "q"}]},
        "sharegpt",
        {},
        "conversations",
        "lacks the keys 'from' and 'value'; it has 'role', 'content'",
    ),
    (
        _openai((U, "q"), ("tool", "{}")),
        "openai",
        {},
        "messages",
        "message 2 (index 1) is 'tool': a tool message must follow an assistant message with tool_calls",
    ),
    (
        _openai((U, "q"), ("function", "{}")),
        "openai",
        {},
        "messages",
        "message 2 (index 1) has the unknown role 'function'; known roles: system, user, assistant, tool",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f()"}]},
        "sharegpt",
        {},
        "conversations",
        "unknown role 'function_call'; known roles: system, human, user, gpt",
    ),
    (
        _openai((U, "q"), (A, "a"), (S, "s"), (U, "q2"), (A, "a2")),
        "openai",
        {},
        "messages",
        "message 3 (index 2) is 'system': a system message is only allowed first",
    ),
    (
        _openai((S, "s"), (A, "a")),
        "openai",
        {},
        "messages",
        "message 2 (index 1) is 'assistant': the conversation must start with a user message",
    ),
    (
        _openai((S, "s"), (U, "q"), (U, "q2"), (A, "a")),
        "openai",
        {},
        "messages",
        "message 3 (index 2) is 'user' after 'user': turns must alternate user/assistant",
    ),
    (
        _openai((U, "q"), (A, "a"), (A, "a2")),
        "openai",
        {},
        "messages",
        "message 3 (index 2) is 'assistant' after 'assistant'",
    ),
    (
        _openai((U, "q"), (A, "a"), (U, "q2")),
        "openai",
        {},
        "messages",
        "must end with an assistant message; the last, message 3 (index 2), is 'user'",
    ),
    (_openai((S, "s")), "openai", {}, "messages", "must end with an assistant message"),
    (
        _openai((U, "q"), (A, " \n ")),
        "openai",
        {},
        "messages",
        "message 2 (index 1): the assistant content is empty",
    ),
    (_openai((U, ""), (A, "a")), "openai", {}, "messages", "message 1 (index 0): the user content is empty"),
    (
        _openai((U, "q"), (A, 4)),
        "openai",
        {},
        "messages",
        "message 2 (index 1): 'content' must be a string, found a number",
    ),
    (_openai((U, "q"), (A, None)), "openai", {}, "messages", "'content' must be a string, found null"),
    (
        _openai((U, [{"type": "image_url", "image_url": {"url": "x"}}]), (A, "a")),
        "openai",
        {},
        "messages",
        "'content' must be a string, found a list",
    ),
    (
        {"conversations": [{"from": "human", "value": ["q"]}, {"from": "gpt", "value": "a"}]},
        "sharegpt",
        {},
        "conversations",
        "'value' must be a string, found a list",
    ),
    (
        {"question": "q", "answer": None},
        "alpaca",
        {"instruction": "question", "output": "answer"},
        "answer",
        "expected a string, found null",
    ),
    ({"instruction": "q", "output": "   "}, "alpaca", {}, "output", "the assistant content is empty"),
    (
        {"instruction": "", "input": "x", "output": "a"},
        "alpaca",
        {},
        "instruction",
        "the user content is empty",
    ),
    (
        {"instruction": "q", "input": 3, "output": "a"},
        "alpaca",
        {},
        "input",
        "expected a string, found a number",
    ),
    (
        {"instruction": "q", "output": "a", "system": ["s"]},
        "alpaca",
        {},
        "system",
        "expected a string, found a list",
    ),
]


@pytest.mark.parametrize(("row", "fmt", "columns", "field", "fragment"), BAD_RECORDS)
def test_bad_record_is_a_data_error_at_file_line_field(
    row: dict[str, Any], fmt: str, columns: dict[str, str], field: str, fragment: str
) -> None:
    with pytest.raises(DataError) as info:
        to_messages(row, fmt, columns, source=SOURCE, line=LINE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}:{LINE}: field '{field}': ")
    assert fragment in message
    assert (info.value.file, info.value.line, info.value.field) == (SOURCE, LINE, field)


@pytest.mark.parametrize(
    ("row", "fmt", "hint"),
    [
        ({"conversations": [{"role": "user", "content": "q"}]}, "sharegpt", "data.chat_format: openai"),
        ({"messages": [{"from": "human", "value": "q"}]}, "openai", "data.chat_format: sharegpt"),
        ({"messages": '[{"role": "user", "content": "q"}]'}, "openai", "JSON text"),
    ],
)
def test_bad_record_hints(row: dict[str, Any], fmt: str, hint: str) -> None:
    with pytest.raises(DataError) as info:
        to_messages(row, fmt, {}, source=SOURCE, line=LINE)
    assert info.value.hint is not None and hint in info.value.hint


# ------------------------------------------------------------------------------------ rendering


def test_labels_are_exactly_the_assistant_turns_with_their_end_of_turn(smol: Any) -> None:
    example = render_conversation(smol, CONVERSATION, max_length=512)
    assert example is not None
    # The same text the model sees at inference, tokenised once, with no tokens added.
    assert example.text == smol.apply_chat_template(CONVERSATION, tokenize=False)
    assert example.input_ids == smol(example.text, add_special_tokens=False)["input_ids"]
    assert loss_runs(smol, example) == [content + "<|im_end|>\n" for content in ASSISTANT_CONTENTS]
    # System and user tokens (and the assistant header) carry no loss.
    assert loss_runs(smol, example, loss=False) == [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    ]
    labelled = [i for i in example.labels if i != IGNORE_INDEX]
    assert labelled == [
        t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX
    ]
    prompt = smol.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert example.prompt_tokens == len(smol(prompt, add_special_tokens=False)["input_ids"])
    assert example.truncated_tokens == 0


def test_eos_is_labelled_although_it_is_the_pad_token(smol: Any) -> None:
    """The SmolLM2 trap: masking labels by pad id would also mask every <|im_end|>, so the model never stops."""
    assert smol.eos_token_id == smol.pad_token_id == smol.convert_tokens_to_ids("<|im_end|>")
    example = render_conversation(smol, CONVERSATION, max_length=512)
    assert example is not None
    eos = smol.eos_token_id
    # 5 <|im_end|> in the text, one ends each of the 2 assistant turns: those two are labels.
    assert example.input_ids.count(eos) == 5
    assert example.labels.count(eos) == 2
    assert check_rendered(smol, example, end_of_turn_ids(smol)) == []


# train_on, expected loss runs, whether prompt_tokens is the prompt of the last turn
TRAIN_ON_CASES = [
    ("assistant", [c + "<|im_end|>\n" for c in ASSISTANT_CONTENTS]),
    ("last_assistant", [ASSISTANT_CONTENTS[-1] + "<|im_end|>\n"]),
    ("all", [None]),
]


@pytest.mark.parametrize(("train_on", "expected"), TRAIN_ON_CASES)
def test_train_on(smol: Any, train_on: str, expected: list[str | None]) -> None:
    example = render_conversation(smol, CONVERSATION, train_on=train_on, max_length=512)
    assert example is not None
    if train_on == "all":
        assert example.labels == example.input_ids
        assert example.prompt_tokens == 0
        expected = [example.text]
    assert loss_runs(smol, example) == expected
    if train_on == "last_assistant":
        # The tokens before the response are exactly what generation is given for the last turn.
        prompt = smol.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
        assert (
            example.input_ids[: example.prompt_tokens] == smol(prompt, add_special_tokens=False)["input_ids"]
        )
    assert check_rendered(smol, example, end_of_turn_ids(smol)) == []


def test_template_default_system_prompt_is_prompt_not_target(smol: Any) -> None:
    """SmolLM2's own template writes a default system prompt when there is none: it is rendered, unlabelled."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    example = render_conversation(smol, messages, max_length=512)
    assert example is not None
    assert SMOL_DEFAULT_SYSTEM in example.text
    assert loss_runs(smol, example) == ["Hello!<|im_end|>\n"]


def test_alpaca_record_end_to_end(smol: Any) -> None:
    row = {"question": "Name a colour.", "context": "", "answer": "Blue."}
    columns = {"instruction": "question", "input": "context", "output": "answer"}
    fmt = detect_format([row], columns, SOURCE)
    example = render_conversation(smol, to_messages(row, fmt, columns, source=SOURCE, line=2), max_length=512)
    assert example is not None
    assert loss_runs(smol, example) == ["Blue.<|im_end|>\n"]


LONG_CONVERSATION = [
    {"role": "user", "content": "Summarise: " + "the quick brown fox jumps over the lazy dog " * 20},
    {"role": "assistant", "content": "A fox jumps over a dog, repeatedly."},
]


def test_truncate_left_keeps_the_response_and_counts_the_cut(smol: Any) -> None:
    full = render_conversation(smol, LONG_CONVERSATION, max_length=10_000)
    assert full is not None
    max_length = len(full.input_ids) - 50
    cut = render_conversation(smol, LONG_CONVERSATION, max_length=max_length, too_long="truncate_left")
    assert cut is not None
    assert len(cut.input_ids) == len(cut.labels) == max_length
    assert cut.truncated_tokens == 50
    # The whole response still carries loss; the end of the prompt is untouched.
    assert loss_runs(smol, cut) == ["A fox jumps over a dog, repeatedly.<|im_end|>\n"]
    assert cut.input_ids[-80:] == full.input_ids[-80:]
    assert cut.prompt_tokens == full.prompt_tokens - 50
    # The first token is the BOS (for SmolLM2 that is <|im_start|>) and is kept; the cut starts after it.
    assert cut.input_ids[0] == full.input_ids[0] == smol.bos_token_id
    assert cut.input_ids[1:] == full.input_ids[51:]
    assert cut.text.startswith("<|im_start|>") and cut.text.endswith(full.text[-200:])
    assert check_rendered(smol, cut, end_of_turn_ids(smol)) == []


def test_truncate_left_landing_on_a_turn_start_keeps_one_bos(smol: Any) -> None:
    """SmolLM2's BOS is <|im_start|>, which also opens every turn: a cut that leaves a turn's <|im_start|> first
    starts there, rather than in front of the kept BOS (a double BOS, which the pre-flight refuses)."""
    conversation = [{"role": "system", "content": "You are terse."}, *LONG_CONVERSATION]
    full = render_conversation(smol, conversation, max_length=10_000)
    assert full is not None and full.input_ids[0] == smol.bos_token_id
    user_turn = full.input_ids.index(smol.bos_token_id, 1)
    max_length = len(full.input_ids) - (user_turn - 1)  # cut everything between the BOS and the user turn
    cut = render_conversation(smol, conversation, max_length=max_length, too_long="truncate_left")
    assert cut is not None
    assert cut.input_ids == full.input_ids[user_turn:] and cut.labels == full.labels[user_turn:]
    assert cut.input_ids[:2] != [smol.bos_token_id] * 2 and len(cut.input_ids) == max_length - 1
    assert cut.truncated_tokens == user_turn and cut.prompt_tokens == full.prompt_tokens - user_turn
    assert cut.text == full.text[full.text.index("<|im_start|>user"):]
    assert check_rendered(smol, cut, end_of_turn_ids(smol)) == []
    # one token less cut: the BOS leads as before, then the rest of the system turn
    cut = render_conversation(smol, conversation, max_length=max_length + 1, too_long="truncate_left")
    assert cut is not None and cut.input_ids == full.input_ids[:1] + full.input_ids[user_turn - 1:]


@pytest.mark.parametrize(
    ("too_long", "room_after_response", "kept"),
    [
        ("skip", -1, False),  # one token too long: skipped
        ("skip", 0, True),  # exactly max_length: kept whole
        ("truncate_left", 0, True),
        ("truncate_left", -1, False),  # the response (+ BOS) alone does not fit
    ],
)
def test_too_long(smol: Any, too_long: str, room_after_response: int, kept: bool) -> None:
    full = render_conversation(smol, LONG_CONVERSATION, max_length=10_000)
    assert full is not None
    response = len(full.input_ids) - full.prompt_tokens
    max_length = (len(full.input_ids) if too_long == "skip" else response + 1) + room_after_response
    example = render_conversation(smol, LONG_CONVERSATION, max_length=max_length, too_long=too_long)
    assert (example is not None) == kept
    if example is not None:
        assert len(example.input_ids) == max_length


@pytest.fixture
def smol_with_bos(smol: Any) -> Any:
    """SmolLM2's tokenizer given a real BOS (<|endoftext|>) that both the template and the tokenizer add."""
    tok = copy.deepcopy(smol)
    tok.bos_token = "<|endoftext|>"
    tok.add_bos_token = True
    tok.chat_template = "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE
    return tok


def test_no_double_bos_when_template_writes_it(smol_with_bos: Any) -> None:
    tok = smol_with_bos
    bos = tok.bos_token_id
    example = render_conversation(tok, CONVERSATION, max_length=512)
    assert example is not None
    assert example.input_ids[0] == bos and example.input_ids[1] != bos
    assert example.input_ids.count(bos) == 1
    # The trap it avoids: tokenising the rendered text with special tokens puts a second BOS in front.
    assert tok(example.text)["input_ids"][:2] == [bos, bos]
    assert check_rendered(tok, example, end_of_turn_ids(tok)) == []
    assert loss_runs(tok, example) == [c + "<|im_end|>\n" for c in ASSISTANT_CONTENTS]
    # Truncation keeps the BOS in front of what remains.
    cut = render_conversation(tok, LONG_CONVERSATION, max_length=40, too_long="truncate_left")
    assert cut is not None and cut.input_ids[0] == bos and cut.input_ids.count(bos) == 1


def test_template_that_is_not_incremental_is_refused(smol: Any) -> None:
    tok = copy.deepcopy(smol)
    # Writes the number of messages first, so a shorter conversation does not render as a prefix.
    tok.chat_template = "{{ messages | length }}" + DEFAULT_CHAT_TEMPLATE
    with pytest.raises(DataError, match="does not render conversations incrementally"):
        render_conversation(tok, CONVERSATION, max_length=512)
    # Training on every token needs no turn boundaries.
    assert render_conversation(tok, CONVERSATION, train_on="all", max_length=512) is not None


def test_template_that_rejects_the_conversation_is_a_data_error(smol: Any) -> None:
    tok = copy.deepcopy(smol)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + DEFAULT_CHAT_TEMPLATE
    )
    with pytest.raises(DataError, match="refused the conversation: System role not supported"):
        render_conversation(tok, CONVERSATION, max_length=512)


# ------------------------------------------------------------------------------------ checks


def _example(tok: Any, pieces: list[tuple[str, bool]], prefix: list[int] | None = None) -> RenderedExample:
    """A hand-built example: text pieces, each with whether it carries loss."""
    ids: list[int] = list(prefix or [])
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for text, loss in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if loss else [IGNORE_INDEX] * len(piece)
    prompt_tokens = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return RenderedExample(ids, labels, prompt_tokens, 0, tok.decode(ids))


CHECK_CASES = [
    (
        "sound",
        [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False), ("Hello<|im_end|>\n", True)],
        [],
    ),
    ("eos without newline", [("<|im_start|>user\nHi<|im_end|>\n", False), ("Hello<|im_end|>", True)], []),
    (
        "target without eos",
        [
            ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
            ("Hello", True),
            ("<|im_end|>\n", False),
        ],
        [NO_EOS],
    ),
    (
        "eos inside, not at the end",
        [("<|im_start|>user\nHi<|im_end|>\n", False), ("Hello<|im_end|>\nmore", True)],
        [NO_EOS],
    ),
    (
        "one of two turns without eos",
        [
            ("<|im_start|>user\nHi<|im_end|>\n", False),
            ("A<|im_end|>\n", True),
            ("<|im_start|>user\nHi<|im_end|>\n", False),
            ("B", True),
        ],
        [NO_EOS],
    ),
    (
        "no loss",
        [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n", False)],
        [NO_LOSS],
    ),
]


@pytest.mark.parametrize(("name", "pieces", "problems"), CHECK_CASES, ids=[case[0] for case in CHECK_CASES])
def test_check_rendered(smol: Any, name: str, pieces: list[tuple[str, bool]], problems: list[str]) -> None:
    assert check_rendered(smol, _example(smol, pieces), end_of_turn_ids(smol)) == problems


def test_check_rendered_flags_double_bos(smol_with_bos: Any) -> None:
    tok = smol_with_bos
    bos = tok.bos_token_id
    pieces = [("<|im_start|>user\nHi<|im_end|>\n", False), ("Hello<|im_end|>\n", True)]
    assert check_rendered(tok, _example(tok, pieces, prefix=[bos]), end_of_turn_ids(tok)) == []
    assert check_rendered(tok, _example(tok, pieces, prefix=[bos, bos]), end_of_turn_ids(tok)) == [DOUBLE_BOS]


def test_end_of_turn_ids(smol: Any) -> None:
    im_end = smol.convert_tokens_to_ids("<|im_end|>")
    endoftext = smol.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_ids(smol) == {im_end}
    assert end_of_turn_ids(smol, endoftext) == {im_end, endoftext}
    assert end_of_turn_ids(smol, [endoftext, im_end]) == {im_end, endoftext}


# ------------------------------------------------------------------------------------ template set-up


def test_ensure_chat_template_on_a_tokenizer_without_one(minilm_chat: tuple[Any, bool]) -> None:
    from helpers import minilm_path

    tok, grew = minilm_chat
    original = AutoTokenizer.from_pretrained(minilm_path())
    assert original.chat_template is None
    assert grew is True
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert len(tok) == len(original) + 2
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert {im_start, im_end} == {len(original), len(original) + 1}
    assert tok.eos_token == "<|im_end|>"
    assert im_end in end_of_turn_ids(tok)
    # Special: never split or lower-cased by BERT's normaliser, and skipped when decoding for display.
    assert tok("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"][0] == im_start
    assert tok.decode([im_start, im_end], skip_special_tokens=True) == ""
    # A second call changes nothing.
    assert ensure_chat_template(tok) is False
    assert len(tok) == len(original) + 2


def test_render_with_the_default_template(minilm_chat: tuple[Any, bool]) -> None:
    tok, _ = minilm_chat
    example = render_conversation(tok, CONVERSATION, max_length=512)
    assert example is not None
    # ChatML, and no system prompt is invented when there is none.
    assert example.text.startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    bare = render_conversation(tok, CONVERSATION[1:3], max_length=512)
    assert (
        bare is not None
        and bare.text
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    )
    # WordPiece lower-cases and drops newlines; the labelled tokens are still exactly the turns + <|im_end|>.
    assert loss_runs(tok, example) == [
        "hello! how can i help? <|im_end|>",
        "4, of course. anything else? <|im_end|>",
    ]
    assert check_rendered(tok, example, end_of_turn_ids(tok)) == []


def test_ensure_chat_template_keeps_an_existing_template(smol: Any) -> None:
    tok = copy.deepcopy(smol)
    before = (tok.chat_template, len(tok), tok.eos_token)
    assert ensure_chat_template(tok) is False
    assert (tok.chat_template, len(tok), tok.eos_token) == before


def test_render_without_a_template_is_a_model_error() -> None:
    from helpers import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    with pytest.raises(ModelError, match="no chat template"):
        render_conversation(tok, CONVERSATION, max_length=512)


def test_display_highlights_the_loss_tokens(smol: Any) -> None:
    example = render_conversation(smol, CONVERSATION, max_length=512)
    assert example is not None
    shown = format_conversation_for_display(smol, example)
    assert shown.plain == example.text
    highlighted = [shown.plain[span.start : span.end] for span in shown.spans if "green" in str(span.style)]
    assert highlighted == [c + "<|im_end|>\n" for c in ASSISTANT_CONTENTS]
