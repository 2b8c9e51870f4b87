"""Every registered task goes through every verb: the conformance suite of the task boundary.

One parametrized test over ``task_names()``: each task trains a few steps of LoRA on a tiny model (2 layers,
hidden 32) and tiny data through ``lmtune train``, then is evaluated, predicts to a file, exports (merged,
and ONNX where its TaskInfo says), reloads in plain transformers with the run's logits, answers one request
through the server, and is planned and inspected. A registered task with no case below fails here, by name:
a new task joins lmtune with its case.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from helpers import FILLER, NEGATIVE, POSITIVE, run_cli, story_text, write_csv
from serve_helpers import get, post, running
from test_relation_extraction import write_documents
from transformers import AutoTokenizer

import lmtune
from lmtune.config.tasks import task_info, task_names
from lmtune.serve.app import create_app

LOGIT_TOLERANCE = 1e-4  # float32 weights written and read back: equal up to summation order


# ------------------------------------------------------------------------------------------ tiny data
def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _sentiment(folder: Path) -> Path:
    """Two sentiment words and at most two filler words per text: learnable in a few LoRA steps."""
    rng = random.Random(0)
    rows: list[dict[str, object]] = []
    for i in range(160):
        positive = i % 2 == 0
        words = rng.sample(FILLER, rng.randint(0, 2)) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" #{i}", "label": "pos" if positive else "neg"})
    return write_csv(folder / "sentiment.csv", rows)


NER_NAMES, NER_PLACES = ["Alice", "Okonkwo", "Dmitri", "Eleanor", "Bob"], ["Paris", "Kyoto", "Lima", "Zanzibar"]
NER_FILLER = ["the", "went", "to", "met", "in", "and", "saw", "visited", "yesterday", "with", "a", "friend"]


def _conll(folder: Path) -> Path:
    """Sentences whose names are PER and places LOC among filler words."""
    rng = random.Random(0)
    lines = []
    for _ in range(80):
        for _ in range(rng.randint(3, 8)):
            r = rng.random()
            word, tag = ((rng.choice(NER_NAMES), "B-PER") if r < 0.2 else (rng.choice(NER_PLACES), "B-LOC")
                         if r < 0.35 else (rng.choice(NER_FILLER), "O"))
            lines.append(f"{word}\tX\t{tag}")
        lines.append("")
    path = folder / "train.conll"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


QA_WORDS = ["apple", "river", "garden", "teacher", "window", "horse", "letter", "village", "music", "paper"]
CODES = ["zebra", "tiger", "eagle", "shark", "camel", "otter"]


def _qa(folder: Path) -> Path:
    """SQuAD-style rows: "the code is X" hidden among filler words (char offsets of X)."""
    rng = random.Random(0)
    rows = []
    for i in range(80):
        words = [rng.choice(QA_WORDS) for _ in range(rng.randint(4, 12))]
        k = rng.randint(0, len(words))
        pre = " ".join(words[:k]) + (" " if k else "")
        code = rng.choice(CODES)
        context = (f"{pre}the code is {code} " + " ".join(words[k:])).strip()
        rows.append({"id": f"q{i}", "question": "what is the code?", "context": context,
                     "answers": {"text": [code], "answer_start": [len(pre) + len("the code is ")]}})
    path = folder / "qa.jsonl"
    path.write_text(_jsonl(rows), encoding="utf-8")
    return path


EN = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
IT = ["uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto"]


def _pairs(folder: Path) -> Path:
    """English number words and their Italian, word for word."""
    rng = random.Random(0)
    rows = []
    for _ in range(96):
        idx = [rng.randrange(len(EN)) for _ in range(rng.randint(1, 3))]
        rows.append({"source": " ".join(EN[i] for i in idx), "target": " ".join(IT[i] for i in idx)})
    path = folder / "pairs.jsonl"
    path.write_text(_jsonl(rows), encoding="utf-8")
    return path


CAPITALS = {"France": "Paris", "Spain": "Madrid", "Peru": "Lima", "Japan": "Tokyo"}


def _chats(folder: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Capital of {c}? ({i})"},
                          {"role": "assistant", "content": CAPITALS[c]}]}
            for i, c in enumerate(list(CAPITALS) * 16)]
    path = folder / "chats.jsonl"
    path.write_text(_jsonl(rows), encoding="utf-8")
    return path


def _review_pairs(folder: Path) -> Path:
    """Reviews that differ in their last word: praise (chosen, one of two words) against blame (rejected, one of
    two others), learnable for held-out pairs in a few LoRA steps."""
    rng = random.Random(0)
    rows = []
    for i in range(64):
        words = rng.sample(FILLER, rng.randint(0, 2))
        rows.append({"prompt": f"Your view of film {i}?", "chosen": " ".join([*words, rng.choice(POSITIVE[:2])]),
                     "rejected": " ".join([*words, rng.choice(NEGATIVE[:2])])})
    path = folder / "reviews.jsonl"
    path.write_text(_jsonl(rows), encoding="utf-8")
    return path


def _judged_reviews(folder: Path) -> Path:
    """The same pairs unpaired: praise desirable, blame undesirable."""
    pairs = [json.loads(line) for line in _review_pairs(folder).read_text().splitlines()]
    rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]
    path = folder / "judged.jsonl"
    path.write_text(_jsonl(rows), encoding="utf-8")
    return path


def _questions(folder: Path) -> Path:
    """Prompts for grpo: answered by the steerable model with a word or by stopping."""
    rows = [{"prompt": f"Question {i}: is it {c}?"} for i, c in zip(range(48), ["red", "blue", "green"] * 16,
                                                                    strict=True)]
    path = folder / "prompts.jsonl"
    path.write_text(_jsonl(rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def steerable_chat_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """grpo's tiny model: it answers with a few words or stops, so a reward on stopping is learnable."""
    from test_grpo import steerable_llama

    return steerable_llama(tmp_path_factory.mktemp("steerable-llama"), smollm2_tokenizer_dir)


def _relations(folder: Path) -> Path:
    """Documents of three entities whose relations the words between them decide (works_for, based_in ...)."""
    return write_documents(folder / "relations.jsonl", 80)


def _stories(folder: Path) -> Path:
    path = folder / "stories.txt"
    path.write_text(story_text(60), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class Case:
    """How one task is exercised: its tiny model (a fixture), data, config extras and one input."""

    model: str  # fixture name of the tiny model folder
    data: Callable[[Path], Path]  # writes the training file into the folder, returns it
    item: Any  # one input in the predictor's item form (Run.predict, /v1/predict)
    predict_rows: list[dict[str, Any]]  # rows of the file given to `lmtune predict`
    data_settings: dict[str, Any] = field(default_factory=dict)
    train_settings: dict[str, Any] = field(default_factory=dict)
    # The text whose logits the merged export must reproduce.
    probe: str = "the small cat watched the river"
    # Further config sections, merged into the built config (grpo's rewards ...).
    config: dict[str, Any] = field(default_factory=dict)


PROMPTS = [{"prompt": "The small cat"}, {"prompt": "Capital of Peru?"}]

CASES: dict[str, Case] = {
    "classification": Case(
        model="tiny_bert_nodrop_dir", data=_sentiment, item="a wonderful and moving film",
        predict_rows=[{"text": "a wonderful and moving film"}, {"text": "dull and tedious"}],
        # A sentence head over a random encoder needs more steps than the token-level heads.
        train_settings={"max_steps": 30, "batch_size": 16}),
    "token_classification": Case(
        model="tiny_bert_nodrop_dir", data=_conll, item="Alice went to Paris",
        predict_rows=[{"text": "Alice went to Paris"}, {"text": "the friend saw Bob"}]),
    "question_answering": Case(
        model="tiny_bert_nodrop_dir", data=_qa,
        item={"question": "what is the code?", "context": "apple river the code is otter garden"},
        predict_rows=[{"question": "what is the code?", "context": "apple river the code is otter garden"},
                      {"question": "what is the code?", "context": "the code is camel"}],
        data_settings={"max_length": 24, "doc_stride": 6, "max_answer_length": 4}),
    "seq2seq": Case(
        model="tiny_t5_dir", data=_pairs, item="one two three",
        predict_rows=[{"source": "five six"}, {"source": "seven"}],
        data_settings={"seq2seq_task": "translation", "source_language": "English", "target_language": "Italian",
                       "max_target_length": 16}),
    "sft": Case(
        model="tiny_chat_llama_dir", data=_chats, item="Capital of Peru?", predict_rows=PROMPTS,
        data_settings={"max_length": 96}),  # the chat template's tokens come on top of the words
    **{task: Case(model="tiny_chat_llama_dir", data=_judged_reviews if task == "kto" else _review_pairs,
                  item="Your view?", predict_rows=PROMPTS, data_settings={"max_length": 64},
                  # A preference's gradient starts small (beta / 2 of the log-ratio's): more, larger LoRA steps.
                  # KTO's held-out loss moves least (0.5 -> ~0.495): 36 steps, or a seed's dropout draws can leave it
                  # at 0.5 (measured over seeds 42, 1, 2 with torch's masks and with fast dropout).
                  train_settings={"max_steps": 36 if task == "kto" else 24, "learning_rate": 3e-2})
       for task in ("dpo", "orpo", "simpo", "kto")},
    "reward": Case(
        model="tiny_chat_llama_dir", data=_review_pairs, item={"prompt": "Your view?", "completion": "warm and sharp"},
        predict_rows=[{"prompt": "Your view?", "completion": "warm and sharp"},
                      {"prompt": "Your view?", "completion": "a tedious plot"}],
        data_settings={"max_length": 64}, train_settings={"max_steps": 24, "learning_rate": 3e-2}),
    "grpo": Case(
        model="steerable_chat_llama_dir", data=_questions, item="Question 1: is it red?", predict_rows=PROMPTS,
        data_settings={"max_length": 64}, train_settings={"batch_size": 4},
        config={"grpo": {"rewards": ["stops"]}, "generation": {"temperature": 1.0}}),
    "relation_extraction": Case(
        model="tiny_bert_nodrop_dir", data=_relations,
        item={"text": "Alice works for Acme in Paris .", "head": {"start": 0, "end": 5, "type": "PER"},
              "tail": {"start": 16, "end": 20, "type": "ORG"}},
        predict_rows=[{"text": "Alice works for Acme in Paris .",
                       "entities": [{"start": 0, "end": 5, "type": "PER"}, {"start": 16, "end": 20, "type": "ORG"},
                                    {"start": 24, "end": 29, "type": "LOC"}]},
                      {"text": "Bob lives in Kyoto and met Globex .",
                       "entities": [{"start": 0, "end": 3, "type": "PER"}, {"start": 13, "end": 18, "type": "LOC"},
                                    {"start": 27, "end": 33, "type": "ORG"}]}],
        # A sentence head over a random encoder, as classification's.
        train_settings={"max_steps": 30, "batch_size": 16}),
    "causal_lm": Case(
        model="tiny_chat_llama_dir", data=_stories, item="The small cat", predict_rows=PROMPTS,
        data_settings={"max_length": 64}),
    "masked_lm": Case(
        model="tiny_bert_nodrop_dir", data=_stories, item="the small [MASK] watched the river",
        predict_rows=[{"text": "the small [MASK] watched the river"}, {"text": "The old [MASK] found the [MASK]."}],
        data_settings={"max_length": 64}),
}


# ------------------------------------------------------------------------------------------ helpers
def _outputs(model: Any, tokenizer: Any, text: str) -> torch.Tensor:
    """Every tensor the model returns for ``text`` (logits, or start/end logits), flattened into one."""
    enc = dict(tokenizer(text, return_tensors="pt"))
    if model.config.is_encoder_decoder:
        enc["decoder_input_ids"] = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        out = model.eval()(**enc)
    return torch.cat([t.float().flatten() for t in out.to_tuple() if torch.is_tensor(t)])


def _model_class(folder: Path, name: str) -> Any:
    """The class a plain-transformers user loads the folder with: the one lmtune.json records (a seq2seq run
    on a decoder: a causal LM), else the task's auto class."""
    recorded = json.loads((folder / "lmtune.json").read_text()).get("model_class")
    return getattr(transformers, recorded or task_info(name).auto_class)


def _request(endpoint: str, item: Any) -> dict[str, Any]:
    """One request body for ``endpoint`` carrying ``item``."""
    if endpoint == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": item}], "max_tokens": 4, "temperature": 0}
    if endpoint == "/v1/completions":
        return {"prompt": item, "max_tokens": 4, "temperature": 0}
    return {"input": [item]}


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text(_jsonl(rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ the suite
@pytest.mark.parametrize("name", task_names())
def test_task_conforms(name: str, request: pytest.FixtureRequest, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    if name not in CASES:
        pytest.fail(f"task '{name}' is registered but has no conformance case: add CASES['{name}'] in "
                    f"tests/test_conformance.py (tiny model, tiny data, one input)")
    case, info = CASES[name], task_info(name)
    model_dir: Path = request.getfixturevalue(case.model)
    run_dir = tmp_path / "run"
    config = {
        "task": name, "model": str(model_dir), "method": {"name": "lora", "r": 4},
        "data": {"train": str(case.data(tmp_path)), "max_length": 32, **case.data_settings},
        "train": {"max_steps": 12, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every": 2,
                  "precision": "fp32", **case.train_settings},
        "output_dir": str(run_dir),
    }
    if info.generates:
        config["generation"] = {"max_new_tokens": 4, "eval_examples": 2}
    for section, values in case.config.items():
        config[section] = {**config.get(section, {}), **values}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML

    # plan and inspect: before training, from the config alone
    assert run_cli(["plan", str(config_path), "--json"], monkeypatch) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["task"] == name and plan["parameters"], plan
    assert run_cli(["data", "inspect", str(config_path), "--examples", "1"], monkeypatch) == 0
    inspected = capsys.readouterr().out
    assert "train" in inspected and len(inspected.splitlines()) > 3, inspected

    # train: the loss falls and the run holds test metrics
    assert run_cli(["train", str(config_path), "--no-progress"], monkeypatch) == 0
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r.get("split") == "train" and "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"] and metrics["test"]["loss"] < metrics["starting_point"]["test"]["loss"], metrics["test"]

    # eval on the run's own splits
    scores = tmp_path / "eval.json"
    assert run_cli(["eval", str(run_dir), "--output", str(scores)], monkeypatch) == 0
    evaluated = json.loads(scores.read_text())
    assert "test" in evaluated and "loss" in evaluated["test"], evaluated

    # predict to a file: one row per input
    inputs = _write_rows(tmp_path / "inputs.jsonl", case.predict_rows)
    out = tmp_path / "predictions.jsonl"
    assert run_cli(["predict", str(run_dir), "-i", str(inputs), "-o", str(out), "--no-progress"], monkeypatch) == 0
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(predicted) == len(case.predict_rows), predicted
    assert all(set(row) > set(given) for row, given in zip(predicted, case.predict_rows, strict=True)), predicted

    # export merged: plain transformers reloads it with the run's outputs
    merged = tmp_path / "merged"
    assert run_cli(["export", str(run_dir), "--format", "merged", "--output", str(merged)], monkeypatch) == 0
    run = lmtune.load_run(run_dir)
    model_class = _model_class(merged, name)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    reloaded = _outputs(model_class.from_pretrained(merged, dtype=torch.float32), tokenizer, case.probe)
    reference = _outputs(model_class.from_pretrained(run.model_dir, dtype=torch.float32), tokenizer, case.probe)
    assert reloaded.shape == reference.shape and reloaded.numel() > 0
    assert (reloaded - reference).abs().max().item() <= LOGIT_TOLERANCE
    if "onnx" in info.exports:
        onnx_dir = tmp_path / "onnx"
        assert run_cli(["export", str(run_dir), "--format", "onnx", "--output", str(onnx_dir)], monkeypatch) == 0
        assert list(onnx_dir.glob("*.onnx")), sorted(p.name for p in onnx_dir.iterdir())

    # serve: the task's endpoints are listed, and the first answers one request
    with running(create_app(run)) as base:
        status, body = get(base, "/v1/run")
        assert status == 200, body
        listed = json.loads(body)["endpoints"]
        assert set(info.endpoints) <= set(listed), (info.endpoints, listed)
        endpoint = (info.endpoints or ("/v1/predict",))[0]
        status, answer = post(base, endpoint, _request(endpoint, case.item))
    assert status == 200, answer
    assert len(answer.get("choices") or answer.get("data") or []) == 1, answer
