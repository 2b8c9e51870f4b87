"""Instruction/chat fine-tuning on tiny decoders with SmolLM2's real tokenizer (pad == eos)."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmtune
from lmtune.errors import DataError

CAPITALS = {"France": "Paris", "Spain": "Madrid", "Peru": "Lima", "Japan": "Tokyo"}


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """Short question-answer conversations with one fixed answer per question (learnable, must stop)."""
    rng = random.Random(seed)
    rows = []
    countries = list(CAPITALS)
    for i in range(n):
        c = rng.choice(countries)
        rows.append({"messages": [{"role": "user", "content": f"Capital of {c}? ({i})"},
                                  {"role": "assistant", "content": CAPITALS[c]}]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(tmp_path, model_dir, **over):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(240))
    cfg = {
        "task": "sft", "model": str(model_dir),
        "data": {"train": str(data), "max_length": 96},
        "train": {"epochs": 4, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32"},
        "generation": {"max_new_tokens": 8, "eval_examples": 12},
        "output_dir": str(tmp_path / "run"),
    }
    for k, v in over.items():
        section, key = k.split(".")
        cfg[section][key] = v
    return cfg


def test_sft_learns_answers_and_to_stop(tmp_path, tiny_chat_llama_dir):
    run = lmtune.train(_config(tmp_path, tiny_chat_llama_dir), show_progress=False)
    m = run.metrics
    test, before = m["test"], m["starting_point"]["test"]
    assert test["loss"] < before["loss"] / 3
    assert test["exact_match"] >= 0.25 > before["exact_match"]
    # answers end with <|im_end|>, which is also the pad token: the untrained model never stops, the tuned one does
    assert test["stopped_fraction"] >= 0.5 > before["stopped_fraction"]
    # the saved model stops by itself with plain transformers, through its chat template
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    stopped = [e for e in test["examples"] if e["finish_reason"] == "stop"]
    assert stopped
    prompt = stopped[0]["prompt"]
    assert prompt == tok.apply_chat_template(
        [{"role": "user", "content": prompt.split("user\n")[1].split("<|im_end|>")[0]}], tokenize=False,
        add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id and len(new) < 10
    assert tok.decode(new, skip_special_tokens=True).strip() == stopped[0]["generated"]
    assert run.meta["eos_token_ids"] == [tok.eos_token_id]


@pytest.mark.parametrize("method", ["lora", "freeze", "lora+checkpointing"])
def test_sft_methods_train(tmp_path, tiny_chat_llama_dir, method):
    cfg = _config(tmp_path, tiny_chat_llama_dir, **{"train.max_steps": 6})
    name = method.split("+")[0]
    cfg["method"] = {"name": name, **({"unfrozen_layers": 1} if name == "freeze" else {})}
    if method.endswith("checkpointing"):
        cfg["model"] = {"name": str(tiny_chat_llama_dir), "gradient_checkpointing": True}
    run = lmtune.train(cfg, show_progress=False)
    assert run.metrics["test"]["loss"] < run.metrics["starting_point"]["test"]["loss"]
    assert run.metrics["summary"]["trainable_parameters"] < run.metrics["summary"]["total_parameters"]


def test_packed_sft_trains(tmp_path, tiny_chat_llama_dir):
    cfg = _config(tmp_path, tiny_chat_llama_dir, **{"data.packing": True, "train.max_steps": 6})
    run = lmtune.train(cfg, show_progress=False)
    data = json.loads((run.path / "data.json").read_text())
    assert data["train"]["examples"] > 100
    assert run.metrics["test"]["loss"] < run.metrics["starting_point"]["test"]["loss"]


def test_bad_conversation_names_line(tmp_path, tiny_chat_llama_dir):
    rows = qa_rows(30)
    rows[6] = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    cfg = _config(tmp_path, tiny_chat_llama_dir)
    write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg["data"]["train"] = str(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        lmtune.train(cfg, show_progress=False)
    assert "bad.jsonl:7" in str(err.value)


def test_sft_on_tool_calls_with_chatml_tools_trains(tmp_path, tiny_chat_llama_dir):
    """A short real run on tool-calling records through the built-in chatml-tools template: loss falls, and the
    tuned model is saved with that template (so serving renders tools as training did)."""
    from helpers import tool_rows

    from lmtune.data.chat_tools import CHATML_TOOLS_TEMPLATE

    cfg = _config(tmp_path, tiny_chat_llama_dir, **{"train.max_steps": 6, "train.learning_rate": 3e-2,
                                                    "data.max_length": 384, "generation.eval_examples": 2})
    cfg["model"] = {"name": str(tiny_chat_llama_dir), "chat_template": "chatml-tools"}
    cfg["data"]["train"] = str(write_jsonl(tmp_path / "tools.jsonl", tool_rows(40)))
    run = lmtune.train(cfg, show_progress=False)
    assert run.metrics["test"]["loss"] < 0.8 * run.metrics["starting_point"]["test"]["loss"]
    data = json.loads((run.path / "data.json").read_text())
    assert data["train"]["tool_conversations"] == data["train"]["rows_read"] == 40
    assert run.meta["chat_template"] == "chatml-tools"
    assert AutoTokenizer.from_pretrained(run.model_dir).chat_template == CHATML_TOOLS_TEMPLATE
