"""``task: reward``: the scalar head, its Bradley-Terry loss against TRL's RewardTrainer, the token it reads,
a tiny run end to end (full and LoRA), and scoring through the predictor, ``lmtune predict`` and ``/v1/score``."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FILLER, NEGATIVE, POSITIVE, crash_after_checkpoint
from serve_helpers import assert_openai_error, post, running
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lmtune
from lmtune.config import load_config
from lmtune.data.chat import IM_END, end_of_turn_ids
from lmtune.data.preference import PreferencePair, render_completion, render_pair
from lmtune.errors import ConfigError, DataError
from lmtune.serve import ServeOptions
from lmtune.serve.app import create_app
from lmtune.tasks import get_task
from lmtune.tasks.reward.predict import RewardPredictor
from lmtune.tasks.reward.task import PAD_TOKEN, RewardTask, use_scoring_pad_token
from lmtune.workflows.run import Run

QUESTION = "What did you think of film {i}?"


def review_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs whose chosen review holds a praising word and whose rejected one, otherwise the same words, a
    damning one: a reward model must find the one word that differs, anywhere in the answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, 6)
        at = rng.randint(0, 6)
        rows.append({"prompt": QUESTION.format(i=i),
                     "chosen": " ".join([*words[:at], rng.choice(POSITIVE), *words[at:]]),
                     "rejected": " ".join([*words[:at], rng.choice(NEGATIVE), *words[at:]])})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def reward_config(root: Path, model: Path, **method: Any) -> dict[str, Any]:
    return {
        "task": "reward", "model": str(model), "method": {"name": "full", **method},
        "data": {"train": str(write_jsonl(root / "pairs.jsonl", review_pairs(96))), "max_length": 64,
                 "validation_size": 0.125, "test_size": 0.25},
        "train": {"epochs": 4, "batch_size": 12, "learning_rate": 5e-3, "warmup_ratio": 0.0, "log_every": 2,
                  "precision": "fp32"},
        "output_dir": str(root / "run"),
    }


def reward_task(model_dir: Path) -> tuple[RewardTask, Any, torch.nn.Module]:
    """The reward task on ``model_dir`` with its tokenizer and its model (new head, dropout off)."""
    task = get_task("reward")(load_config({"task": "reward", "model": str(model_dir), "data": {"train": "x.jsonl"},
                                           "output_dir": "unused"}))
    assert isinstance(task, RewardTask)
    tok = task.load_tokenizer(task.model_path())
    torch.manual_seed(0)
    model = task.build_model(task.model_path(), None, tok)  # type: ignore[arg-type]
    return task, tok, model.eval()


def pair_batch(task: RewardTask, tok: Any, pairs: list[PreferencePair]) -> dict[str, torch.Tensor]:
    rendered = [render_pair(tok, p, max_length=128, too_long="skip") for p in pairs]
    features = [{"chosen_input_ids": r.chosen.input_ids, "chosen_labels": r.chosen.labels,
                 "rejected_input_ids": r.rejected.input_ids, "rejected_labels": r.rejected.labels, "index": i}
                for i, r in enumerate(rendered) if r is not None]
    return task.collator(tok)(features)


def some_pairs() -> list[PreferencePair]:
    """Answers of different lengths, so both sides and both halves of the batch carry padding."""
    return [PreferencePair([{"role": "user", "content": f"question {i}?"}], "a fine answer " * (1 + 2 * i),
                           "no " * (3 - i), line=i + 1) for i in range(3)]


# ------------------------------------------------------------------------------------------ the scored token
@pytest.mark.parametrize(("unk", "bos", "expected"), [
    ("<|endoftext|>", "<|im_start|>", "<|endoftext|>"),  # SmolLM2 as shipped: pad == eos; unk never ends a turn
    (IM_END, "<|im_start|>", "<|im_start|>"),  # unk ends turns: bos, which only ever starts a sequence
    (IM_END, IM_END, PAD_TOKEN),  # neither will do: a pad token of its own
])
def test_the_pad_token_never_ends_a_turn(smollm2_tokenizer_dir: Path, unk: str, bos: str, expected: str) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert tok.pad_token == tok.eos_token == IM_END  # the trap: padding by EOS
    size = len(tok)
    tok.unk_token, tok.bos_token = unk, bos
    added = use_scoring_pad_token(tok)
    assert tok.pad_token == expected and tok.pad_token_id not in end_of_turn_ids(tok)
    assert added == (expected == PAD_TOKEN) and len(tok) == size + added
    assert not use_scoring_pad_token(tok)  # a safe pad token is kept


def test_a_row_is_scored_at_its_true_last_token_alone_and_padded(tiny_chat_llama_dir: Path) -> None:
    task, tok, model = reward_task(tiny_chat_llama_dir)
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    example = render_completion(tok, [{"role": "user", "content": "Hello?"}], "Hi there.", max_length=64,
                                too_long="skip")
    assert example is not None
    # A row ending with EOS (the template's newline cut off): the token a pad-by-EOS head would skip.
    row = example.input_ids[: example.input_ids.index(tok.eos_token_id, example.prompt_tokens) + 1]
    assert row[-1] == tok.eos_token_id
    longer = row + tok("and a much longer second row, to pad the first")["input_ids"]

    def scores(rows: list[list[int]]) -> torch.Tensor:
        ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        with torch.no_grad():
            return task.logits(model, {"input_ids": ids, "attention_mask": mask})[:, 0]

    with torch.no_grad():  # the head by hand at the last position: (1, T, H) -> (H,) -> score
        hidden = model.model(input_ids=torch.tensor([row])).last_hidden_state[0, -1]
        by_hand = float(model.score(hidden)[0])
    alone, padded = float(scores([row])[0]), float(scores([row, longer])[0])
    assert alone == pytest.approx(by_hand, abs=1e-5)
    assert padded == pytest.approx(alone, abs=1e-5)
    # The check can fail: with EOS as the pad id the head reads the row one token early.
    model.config.pad_token_id = tok.eos_token_id
    assert abs(float(scores([row, longer])[0]) - by_hand) > 1e-4


# ------------------------------------------------------------------------------------------ parity with TRL
def test_loss_and_gradients_equal_trl_reward_trainer(tiny_chat_llama_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    task, tok, model = reward_task(tiny_chat_llama_dir)
    rendered = [render_pair(tok, p, max_length=128, too_long="skip") for p in some_pairs()]
    data = Dataset.from_dict({"chosen_ids": [r.chosen.input_ids for r in rendered],  # type: ignore[union-attr]
                              "rejected_ids": [r.rejected.input_ids for r in rendered]})  # type: ignore[union-attr]
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None,
                        per_device_train_batch_size=len(data), disable_dropout=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trl_batch = trainer.data_collator([data[i] for i in range(len(data))])  # TRL's own collation of the pairs
    ours = pair_batch(task, tok, some_pairs())
    assert torch.equal(ours["input_ids"], trl_batch["input_ids"])  # [chosen rows; rejected rows], padded alike

    def loss_and_grads(compute: Any) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = compute()
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    trl_loss, trl_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(trl_batch)))
    # lmtune's loss is a sum over pairs; the loop divides by the step's pair count.
    our_loss, our_grads = loss_and_grads(lambda: task.loss(model, ours) / task.num_items(ours))
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    assert trl_loss == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=0.05)  # an untrained head
    assert set(our_grads) == set(trl_grads) and "score.weight" in our_grads
    for name, grad in trl_grads.items():
        assert torch.allclose(our_grads[name], grad, atol=1e-5, rtol=1e-4), name


# ------------------------------------------------------------------------------------------ a run end to end
@pytest.fixture(scope="module")
def reward_run(tmp_path_factory: pytest.TempPathFactory, tiny_chat_llama_dir: Path) -> Run:
    root = tmp_path_factory.mktemp("reward")
    return lmtune.train(reward_config(root, tiny_chat_llama_dir), show_progress=False)


def _train_rows(run: Run) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_a_reward_run_learns_which_answer_is_better(reward_run: Run) -> None:
    train = _train_rows(reward_run)
    assert train[-1]["loss"] < 0.5 * train[0]["loss"] and train[-1]["train_accuracy"] > train[0]["train_accuracy"]
    test, start = reward_run.metrics["test"], reward_run.metrics["starting_point"]["test"]
    assert test["pairs"] == start["pairs"] == 24
    assert test["accuracy"] >= 0.9 and test["accuracy"] >= start["accuracy"] + 0.2
    assert test["margin"] > 1.0 > abs(start["margin"]) * 100  # the untrained head barely tells them apart
    assert test["chosen_reward"] > test["rejected_reward"]
    assert test["loss"] < start["loss"] < 0.75
    assert len(test["margins"]) == 24 and sum(m > 0 for m in test["margins"]) / 24 == test["accuracy"]
    report = (reward_run.path / "report.md").read_text(encoding="utf-8")
    assert "Rewards on the test split" in report and "max logit difference" in report
    assert (reward_run.path / "plots" / "reward_margins_test.png").stat().st_size > 1000
    # The folder is a plain transformers reward model that reads the true last token.
    model = AutoModelForSequenceClassification.from_pretrained(reward_run.model_dir)
    tok = AutoTokenizer.from_pretrained(reward_run.model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert reward_run.meta["saved_as"] == "full" and reward_run.meta["columns"]["chosen"] == "chosen"
    # `lmtune eval` rebuilds the splits from the saved config and scores them with the saved folder, as training did.
    evaluated = reward_run.evaluate()["test"]
    assert evaluated["pairs"] == 24 and evaluated["accuracy"] == test["accuracy"]
    assert evaluated["margin"] == pytest.approx(test["margin"], abs=1e-4)


def test_the_lora_method_trains_the_head_and_merges(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    cfg = reward_config(tmp_path, tiny_chat_llama_dir, r=8, alpha=16)
    cfg["method"]["name"] = "lora"
    cfg["train"].update(epochs=2, learning_rate=1e-2)
    run = lmtune.train(cfg, show_progress=False)
    train = _train_rows(run)
    assert train[-1]["loss"] < train[0]["loss"]
    assert run.metrics["test"]["accuracy"] > run.metrics["starting_point"]["test"]["accuracy"]
    assert run.meta["saved_as"] == "merged" and (run.path / "adapter" / "adapter_model.safetensors").is_file()
    adapter = json.loads((run.path / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    assert "max logit difference" in (run.path / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(("override", "message"), [
    ({"preference": {"beta": 0.5}}, "preference.beta: not used by task reward"),
    ({"preference": {"label_smoothing": 0.1}}, "preference.label_smoothing"),
    ({"data": {"train": "x.jsonl", "packing": True}}, "data.packing does not apply"),
])
def test_settings_a_reward_model_cannot_use_are_refused(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"task": "reward", "model": "smollm2", "data": {"train": "x.jsonl"}, **override})


# ------------------------------------------------------------------------------------------ scoring
def test_the_predictor_scores_items_as_training_rendered_them(reward_run: Run) -> None:
    prompt = QUESTION.format(i=1000)
    good, bad = "the acting was superb and warm", "the acting was tedious and bland"
    items: list[Any] = [
        {"prompt": prompt, "completion": good},
        {"prompt": [{"role": "user", "content": prompt}], "completion": bad},
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}]},
        "raw text: the acting was superb",
    ]
    scores = [r["score"] for r in reward_run.predict(items)]
    assert scores[0] == pytest.approx(scores[2], abs=1e-5) and scores[0] > scores[1] + 0.5
    predictor = reward_run.predictor()
    assert isinstance(predictor, RewardPredictor)
    assert predictor.score([[{"role": "user", "content": prompt}]] * 2, [good, bad]) == \
        pytest.approx(scores[:2], abs=1e-5)
    # Plain transformers, as the model card says: the chat template saved with the model, then the head.
    tok = AutoTokenizer.from_pretrained(reward_run.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_run.model_dir).eval()
    ids = tok.apply_chat_template(items[2]["messages"], return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert float(model(**ids).logits[0, 0]) == pytest.approx(scores[0], abs=1e-4)
    # Unchanged by the company of a batch (padding), and by batch size.
    assert [r["score"] for r in reward_run.predict(items * 3, batch_size=5)] == pytest.approx(scores * 3, abs=1e-5)


@pytest.mark.parametrize(("item", "why"), [
    ({"prompt": "hi"}, "found an object with the keys prompt"),
    ({"prompt": "hi", "completion": "  "}, "the completion is empty"),
    ({"prompt": "", "completion": "yes"}, "the prompt is empty"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "completion": "yes"}, "must end with a user message"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant message"),
    ({"prompt": "hi", "completion": 3}, "must be text"),
    ({"prompt": "hi", "completion": "word " * 100}, "the completion alone is longer than the 64 tokens"),
    (["a", "list"], "found list"),
    ("", "the text is empty"),
])
def test_a_bad_item_is_refused_with_a_sentence(reward_run: Run, item: Any, why: str) -> None:
    predictor = reward_run.predictor()
    assert why in (predictor.check_item(item) or "")
    with pytest.raises(DataError, match="item 2: "):
        reward_run.predict(["fine text", item])


def test_lmtune_predict_scores_tables_of_answers_and_of_pairs(reward_run: Run, tmp_path: Path) -> None:
    rows = review_pairs(12, seed=7)
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert reward_run.predict_file(pairs_file, out, show_progress=False) == 12
    scored = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert sum(r["preferred"] == "chosen" for r in scored) >= 10
    first = scored[0]
    assert first["margin"] == pytest.approx(first["chosen_score"] - first["rejected_score"])
    assert first["chosen_score"] == pytest.approx(
        reward_run.predict({"prompt": rows[0]["prompt"], "completion": rows[0]["chosen"]})[0]["score"], abs=1e-5)
    # prompt/completion columns in a CSV, the prompt as JSON messages text in one row
    answers = tmp_path / "answers.csv"
    with answers.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerow({"prompt": rows[0]["prompt"], "completion": rows[0]["chosen"]})
        writer.writerow({"prompt": json.dumps([{"role": "user", "content": rows[0]["prompt"]}]),
                         "completion": rows[0]["chosen"]})
    out_csv = tmp_path / "answers_scored.csv"
    assert reward_run.predict_file(answers, out_csv, show_progress=False) == 2
    with out_csv.open(encoding="utf-8") as f:
        got = [float(r["score"]) for r in csv.DictReader(f)]
    assert got == pytest.approx([first["chosen_score"]] * 2, abs=1e-4)
    # a bad cell names its line and column; a table with nothing to score names what is read
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "fine"}, {"prompt": "q", "completion": 3}])
    with pytest.raises(DataError) as bad:
        reward_run.predict_file(tmp_path / "bad.jsonl", tmp_path / "x.jsonl", show_progress=False)
    assert bad.value.line == 2 and bad.value.field == "completion"
    write_jsonl(tmp_path / "none.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="no columns to score"):
        reward_run.predict_file(tmp_path / "none.jsonl", tmp_path / "y.jsonl", show_progress=False)


def test_the_server_answers_v1_score_as_run_predict(reward_run: Run) -> None:
    items = [{"prompt": "What did you think?", "completion": "superb and warm"},
             {"messages": [{"role": "user", "content": "What did you think?"},
                           {"role": "assistant", "content": "dull and awful"}]}]
    expected = reward_run.predict(items)
    with running(create_app(reward_run, ServeOptions(max_items=4))) as base:
        status, body = post(base, "/v1/score", {"input": items})
        assert status == 200, body
        assert [d["score"] for d in body["data"]] == pytest.approx([e["score"] for e in expected], abs=1e-5)
        assert [d["index"] for d in body["data"]] == [0, 1]
        status, generic = post(base, "/v1/predict", {"input": items})
        assert status == 200 and generic["data"] == body["data"] and generic["task"] == "reward"
        status, body = post(base, "/v1/score", {"input": [items[0], {"prompt": "no completion"}]})
        assert status == 400
        error = assert_openai_error(body)
        assert error["param"] == "input" and error["message"].startswith("item 2: a reward model scores")
        status, body = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 404 and "/v1/score" in assert_openai_error(body, code="unsupported_endpoint")["message"]


def test_a_resumed_reward_run_logs_the_rows_of_the_uninterrupted_one(tmp_path: Path, tiny_chat_llama_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The training accuracy and margin of the log row after a checkpoint cover the steps before it too."""
    def cfg(name: str) -> dict[str, Any]:
        c = reward_config(tmp_path, tiny_chat_llama_dir)
        c["train"].update({"epochs": 1, "max_steps": 4, "save_every": 2, "eval_every": 4, "log_every": 3})
        c["output_dir"] = str(tmp_path / name)
        return c

    whole = lmtune.train(cfg("whole"), show_progress=False)
    with crash_after_checkpoint(monkeypatch, 2):
        lmtune.train(cfg("broken"), show_progress=False)
    resumed = lmtune.train(cfg("broken"), resume=True, show_progress=False)
    keys = ("step", "loss", "train_accuracy", "train_margin")
    rows = lambda run: [[r[k] for k in keys] for r in _train_rows(run)]  # noqa: E731
    assert [r[0] for r in rows(whole)] == [3, 4]
    for got, want in zip(rows(resumed), rows(whole), strict=True):
        assert got == pytest.approx(want, rel=1e-6)
