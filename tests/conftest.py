"""Test setup: offline, a private lmtune cache per session, and shared tiny-model fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests must not read or fill the user's cache; slow tests that want the converted
    # SmolLM2 set LMTUNE_CACHE themselves.
    if "LMTUNE_TEST_KEEP_CACHE" not in os.environ:
        os.environ["LMTUNE_CACHE"] = str(tmp_path_factory.mktemp("lmtune-cache"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.1)


@pytest.fixture(scope="session")
def tiny_bert_nodrop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 encoder-decoder (2 layers, d_model 32) with MiniLM's tokenizer."""
    from helpers import tiny_t5

    return tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import sentiment_rows, write_csv

    return write_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", sentiment_rows(480))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer (ChatML, eos == pad == <|im_end|>): the EOS-masking trap in a small folder."""
    from helpers import smollm2_tokenizer

    return smollm2_tokenizer(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random Llama causal LM (2 layers, hidden 32) with SmolLM2's tokenizer."""
    from helpers import tiny_chat_llama

    return tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat-llama"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def serve_sft_run(tmp_path_factory: pytest.TempPathFactory, tiny_chat_llama_dir: Path) -> object:
    """A tiny sft LoRA run for the server tests (tests/serve_helpers.py), trained once per session."""
    from serve_helpers import train_sft_run

    return train_sft_run(tmp_path_factory.mktemp("serve-sft"), tiny_chat_llama_dir)


@pytest.fixture(scope="session")
def serve_tool_run(tmp_path_factory: pytest.TempPathFactory, tiny_chat_llama_dir: Path) -> object:
    """A tiny sft run trained (60 steps) to answer every question with one fixed get_weather call, and a tool
    result with a fixed answer, through a short tool template (tests/helpers.py): the server's tool tests."""
    from helpers import train_tool_run

    return train_tool_run(tmp_path_factory.mktemp("serve-tools"), tiny_chat_llama_dir, steps=60)


@pytest.fixture(scope="session")
def serve_classifier_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> object:
    """A tiny BERT classifier run for the server tests, trained once per session."""
    from serve_helpers import train_classifier_run

    return train_classifier_run(tmp_path_factory.mktemp("serve-clf"), tiny_bert_dir)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The inputs tests/test_fuzz.py tried, per target (issue 6 asks for the fuzz counts)."""
    fuzz = sys.modules.get("test_fuzz")
    lines = fuzz.summary_lines() if fuzz is not None else []
    if lines:
        terminalreporter.write_sep("-", "fuzzing: inputs tried (tests/test_fuzz.py)")
        for line in lines:
            terminalreporter.write_line(line)
