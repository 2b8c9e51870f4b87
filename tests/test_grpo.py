"""``task: grpo``: online RL from rewards on the one training loop, on tiny Llamas with SmolLM2's real tokenizer.

The learning test uses a tiny model built to answer with one of a few words (``yes``/``no``/``maybe``) or the
end-of-turn token, the latter a little less likely: greedy decoding never stops at the start, sampling sometimes
does, so a reward for stopping has something to reinforce and a tiny model can learn it in a few steps.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from helpers import crash_after_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

import lmtune
from lmtune.config import load_config
from lmtune.data.arithmetic import arithmetic_records
from lmtune.data.bundled import BUNDLED_DATA, resolve_bundled_data
from lmtune.errors import ConfigError, DataError
from lmtune.models.methods import apply_task_method
from lmtune.tasks import get_predictor, get_task
from lmtune.tasks.grpo.prompts import read_prompts
from lmtune.tasks.grpo.rewards import RewardModel, Rewards, answer_in_completion, exact_answer, stops
from lmtune.tasks.grpo.task import GRPOTask
from lmtune.training import checkpoint as ckpt

WORDS = ("yes", "no", "maybe")
# A user's reward module, imported from the current folder as `grpo_rewards_demo:says_no`.
REWARD_MODULE = '''
def says_no(prompts, completions, **kwargs):
    return [1.0 if c.strip().lower().startswith("no") else 0.0 for c in completions]

def brief(completion_ids, max_tokens=4, **kwargs):
    return [1.0 - len(ids) / max_tokens for ids in completion_ids]

def wrong_length(completions, **kwargs):
    return [1.0]

def not_a_list(completions, **kwargs):
    return 1.0

def bad_value(completions, **kwargs):
    return ["high"] * len(completions)

def raises(completions, **kwargs):
    raise ValueError("boom")

def needs_column(completions, solution):
    return [0.0] * len(completions)

def only_named(completions, answer):
    return [float(c == a) for c, a in zip(completions, answer)]

NOT_CALLABLE = 3
'''


def steerable_llama(folder: Path, tokenizer_dir: Path, *, stop_gap: float = 0.1, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 Llama that answers with one of WORDS or <|im_end|> (``stop_gap`` logits per unit of
    the residual's dimension 0 less likely than each word), saved with SmolLM2's tokenizer.

    Every input embedding carries +4 on dimension 0, so the final hidden state always has a large positive value
    there; the (untied) output rows are +2 there for the answer tokens and -2 for every other token.
    """
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 4.0
        head = model.lm_head.weight  # (V, 32)
        head[:, 0] = -2.0
        head[[tok.convert_tokens_to_ids(w) for w in WORDS], 0] = 2.0
        head[tok.eos_token_id, 0] = 2.0 - stop_gap
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def steer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    return steerable_llama(tmp_path_factory.mktemp("steerable-llama"), smollm2_tokenizer_dir)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prompt_rows(n: int, seed: int = 0, *, answers: bool = True) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt": f"Question {i}: is it {rng.choice(['red', 'blue', 'green'])}?", "topic": i % 3,
             **({"answer": "no"} if answers else {})} for i in range(n)]


def grpo_config(root: Path, model: Path, *, answers: bool = True, **sections: dict[str, Any]) -> dict[str, Any]:
    rows = prompt_rows(64, answers=answers)
    cfg: dict[str, Any] = {
        "task": "grpo", "model": str(model),
        "data": {"train": str(write_jsonl(root / "prompts.jsonl", rows)), "max_length": 64,
                 "validation_size": 0.125, "test_size": 0.125},
        "method": {"name": "full"},
        "train": {"max_steps": 10, "batch_size": 4, "learning_rate": 3e-2, "warmup_ratio": 0.0, "log_every": 1,
                  "eval_every": 10, "precision": "fp32"},
        "generation": {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "eval_examples": 8},
        "grpo": {"rewards": ["stops"], "num_generations": 4, "beta": 0.04},
        "output_dir": str(root / "run"),
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def train_rows(run_path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


# ------------------------------------------------------------------------------------------ learning
def test_grpo_learns_its_rewards(tmp_path: Path, steer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "grpo_rewards_demo.py").write_text(REWARD_MODULE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # the reward module is imported from the current folder, as python does
    cfg = grpo_config(tmp_path, steer_dir, grpo={"rewards": ["stops", "grpo_rewards_demo:brief"],
                                                 "reward_weights": [1.0, 0.5]})
    run = lmtune.train(cfg, show_progress=False)
    test, before = run.metrics["test"], run.metrics["starting_point"]["test"]
    # greedy answers of the starting model never stop (a word is likelier than <|im_end|>); the tuned ones do
    assert before["stopped_fraction"] == 0.0 and test["stopped_fraction"] >= 0.75
    assert test["reward"] >= before["reward"] + 0.5
    assert set(test) >= {"reward", "reward/stops", "reward/brief", "stopped_fraction", "mean_answer_tokens", "loss"}
    # the weighted sum: reward = stops + 0.5 brief, per answer, so also in the mean
    assert test["reward"] == pytest.approx(test["reward/stops"] + 0.5 * test["reward/brief"])
    assert test["mean_answer_tokens"] < before["mean_answer_tokens"] == 4
    # the data has an answer column: loss is the NLL of "no" as the reply (not the negative reward)
    assert test["loss"] > 0 and before["loss"] > 0
    rows = train_rows(run.path)
    assert len(rows) == 10
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "reward") > mean(first, "reward") + 0.3
    assert mean(last, "stopped_fraction") > mean(first, "stopped_fraction")
    assert mean(last, "mean_answer_tokens") < mean(first, "mean_answer_tokens")
    assert all(r["kl"] >= 0 and 0 <= r["zero_std_groups"] <= 1 for r in rows) and rows[-1]["kl"] > 0
    assert {"reward/stops", "reward/brief", "reward_std", "clip_ratio", "truncated_fraction"} <= set(rows[0])
    # the saved model stops by itself with plain transformers
    assert run.meta["rewards"] == ["stops", "brief"] and run.meta["eos_token_ids"]
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    model = AutoModelForCausalLM.from_pretrained(run.model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Question 99: is it red?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert tok.eos_token_id in out[0, ids["input_ids"].shape[1]:].tolist()
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "Rewards on the test split" in report and "Sampled answers during training" in report


# ------------------------------------------------------------------------------------------ the loss
def _task(root: Path, model_dir: Path, *, answers: bool = True, **sections: dict[str, Any]
          ) -> tuple[GRPOTask, Any, Any, torch.nn.Module]:
    root.mkdir(exist_ok=True)
    cfg = load_config(grpo_config(root, model_dir, answers=answers, **sections))
    task = get_task("grpo")(cfg)
    assert isinstance(task, GRPOTask)
    tok = task.load_tokenizer(model_dir)
    data = task.prepare(tok)
    model = task.build_model(model_dir, data, tok)
    return task, tok, data, model


def _hand_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], group: int, temperature: float
                ) -> torch.Tensor:
    """(N, C) answer-token log-probs from a full forward (no logits_to_keep), log_softmax written out."""
    prompt = batch["input_ids"].repeat_interleave(group, dim=0)
    prompt_mask = batch["attention_mask"].repeat_interleave(group, dim=0)
    ids = torch.cat([prompt, batch["completion_ids"]], dim=1)
    mask = torch.cat([prompt_mask, batch["completion_mask"]], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float() / temperature
    p = prompt.shape[1]
    logprobs = torch.log_softmax(logits[:, p - 1:-1], dim=-1)  # (N, C, V): positions that predict the answer
    picked = logprobs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return picked * batch["completion_mask"]


def test_loss_on_a_fixed_batch_is_the_grpo_formula(tmp_path: Path, steer_dir: Path) -> None:
    beta, temperature, group = 0.1, 0.8, 4
    task, tok, data, model = _task(tmp_path, steer_dir, grpo={"beta": beta, "num_generations": group,
                                                             "rewards": ["stops"]},
                                   generation={"temperature": temperature, "max_new_tokens": 5})
    task.before_training(model, Accelerator(cpu=True), data, tmp_path, resuming=False)
    assert task.reference == "copy"
    torch.manual_seed(0)
    with torch.no_grad():  # the policy moves away from the starting model: the KL term is not zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.manual_seed(3)
    batch = task.collator(tok)([data.splits["train"][i] for i in range(4)])
    items = task.num_items(batch)
    loss = task.loss(model, batch)
    mask = batch["completion_mask"].float()  # (N, C)
    assert items == int(mask.sum()) and batch["completion_ids"].shape[0] == 4 * group

    # rewards by hand: 1 when the answer holds <|im_end|>; advantages (r - group mean) / (group std + 1e-4)
    stopped = (batch["completion_ids"] == tok.eos_token_id).any(dim=1).float().view(-1, group)
    assert 0 < float(stopped.mean()) < 1  # some answers stop, some do not: advantages are not all zero
    advantages = ((stopped - stopped.mean(1, keepdim=True)) / (stopped.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.allclose(batch["advantages"], advantages, atol=1e-6)

    logps = _hand_logps(model, batch, group, temperature)
    starting = AutoModelForCausalLM.from_pretrained(steer_dir).eval()
    with torch.no_grad():
        reference = _hand_logps(starting, batch, group, temperature)
    assert torch.allclose(batch["reference_logps"] * mask, reference, atol=1e-5)
    gap = reference - logps
    # one update per sampling: ratio exp(logp - logp.detach()) is 1 in value, so the clipped objective is -A per
    # token; the k3 KL estimate is weighted by the ratio too (TRL 1.16's bias correction: it shows in the gradient)
    ratio = torch.exp(logps - logps.detach())
    per_token = -ratio * advantages.unsqueeze(1) + beta * ratio * (torch.exp(gap) - gap - 1)
    expected = (per_token * mask).sum()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    # and its gradient
    grads = torch.autograd.grad(loss, model.lm_head.weight)[0]
    want = torch.autograd.grad(expected, model.lm_head.weight)[0]
    assert float((grads - want).abs().max()) <= 1e-4 * float(want.abs().max()) and float(want.abs().max()) > 0


# ------------------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize(("method", "beta", "kind"), [("lora", 0.04, "adapter_off"), ("full", 0.04, "copy"),
                                                      ("freeze", 0.04, "copy"), ("lora", 0.0, "none")])
def test_reference_is_the_adapter_off_or_a_frozen_copy(tmp_path: Path, steer_dir: Path, method: str, beta: float,
                                                       kind: str, caplog: pytest.LogCaptureFixture) -> None:
    extra = {"unfrozen_layers": 1} if method == "freeze" else {}
    sections: dict[str, Any] = {"method": {"name": method, **extra}, "grpo": {"beta": beta}}
    if kind == "adapter_off":  # LoRA through the whole loop (sampling with the adapter, reference without it)
        run = lmtune.train(grpo_config(tmp_path, steer_dir, **sections, train={"max_steps": 2, "eval_every": 2}),
                           show_progress=False)
        assert "LoRA adapter switched off (no copy)" in (run.path / "train.log").read_text(encoding="utf-8")
        assert all(r["kl"] >= 0 for r in train_rows(run.path)) and (run.path / "adapter").is_dir()

    task, tok, data, model = _task(tmp_path / "unit", steer_dir, answers=kind != "none", **sections)
    model = apply_task_method(model, task, task.config.method, set())
    accelerator = Accelerator(cpu=True)
    with caplog.at_level(logging.INFO, logger="lmtune.tasks.grpo.task"):
        task.before_training(model, accelerator, data, tmp_path, resuming=False)
    expected = {"adapter_off": "LoRA adapter switched off (no copy)", "copy": "a frozen copy of the starting model",
                "none": "no reference model"}[kind]
    assert expected in caplog.text
    assert task.reference == kind
    if kind == "copy":
        assert task.reference_model is not None and task.reference_model is not model
        assert not any(p.requires_grad for p in task.reference_model.parameters())
        owned = {p.data_ptr() for p in model.parameters()}
        assert not owned & {p.data_ptr() for p in task.reference_model.parameters()}
    else:
        assert task.reference_model is None
    # the policy moves (LoRA: its adapter; full/freeze: its weights); the reference stays the starting model
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)
    batch = task.collator(tok)([data.splits["train"][i] for i in range(2)])
    task.num_items(batch)
    if kind == "none":
        assert "reference_logps" not in batch
        # without an answer column the evaluation's loss is the negative reward
        metrics = task.evaluate(model, None, accelerator, "test", data)
        assert metrics["loss"] == -metrics["reward"] and math.isfinite(metrics["loss"])
        return
    starting = AutoModelForCausalLM.from_pretrained(steer_dir).eval()
    temperature = task.config.generation.temperature
    with torch.no_grad():
        want = _hand_logps(starting, batch, 4, temperature)
        policy = _hand_logps(model.eval(), batch, 4, temperature)
    mask = batch["completion_mask"].float()
    assert torch.allclose(batch["reference_logps"] * mask, want, atol=1e-5)
    assert not torch.allclose(policy, want, atol=1e-3)


# ------------------------------------------------------------------------------------------ resume
def test_resumed_run_samples_and_ends_as_the_uninterrupted_one(tmp_path: Path, steer_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash after the checkpoint of step 2, resume: the same answers are sampled (the global RNG is restored
    from the checkpoint), so the same rewards, losses and bit-identical final weights; the log row of step 3
    covers steps 1-3 in both (the open window of figures is checkpointed)."""
    train = {"max_steps": 4, "save_every": 2, "eval_every": 4, "keep_checkpoints": 3, "batch_size": 2,
             "log_every": 3}

    def cfg(name: str) -> dict[str, Any]:
        c = grpo_config(tmp_path, steer_dir, train=train, grpo={"num_generations": 3},
                        generation={"eval_examples": 4})
        c["output_dir"] = str(tmp_path / name)
        return c

    whole = lmtune.train(cfg("whole"), show_progress=False)
    with crash_after_checkpoint(monkeypatch, 2):
        lmtune.train(cfg("broken"), show_progress=False)
    resumed = lmtune.train(cfg("broken"), resume=True, show_progress=False)
    assert resumed.metrics["summary"]["steps"] == 4
    a, b = load_file(str(whole.model_dir / "model.safetensors")), load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("loss", "reward", "mean_answer_tokens", "kl")
    tail = lambda p: [[r[k] for k in keys] for r in train_rows(p) if r["step"] > 2]  # noqa: E731
    assert tail(whole.path) == tail(resumed.path) and [r["step"] for r in train_rows(whole.path)] == [3, 4]
    # the sampling was not a constant: answers differ in length across the steps
    assert len({r["mean_answer_tokens"] for r in train_rows(whole.path)}) > 1
    # the window saved at step 2 holds the answers of steps 1 and 2 (2 prompts x 3 answers each)
    window = json.loads((tmp_path / "broken" / "checkpoints" / ckpt.checkpoint_name(2) / ckpt.STATE_FILE).read_text())
    assert window["task_window"][0] == 12


# ------------------------------------------------------------------------------------------ rewards
EXACT = [
    ("The answer is 42.", "42", 1.0),
    ("17 + 25 = 42", "42", 1.0),
    ("42.0", "42", 1.0),
    ("It is 1,000", "1000", 1.0),
    ("-8", "-8", 1.0),
    ("42 or maybe 41", "42", 0.0),
    ("41", "42", 0.0),
    ("Paris\n", "paris", 1.0),
    ("I think...\n  The  Capital is PARIS. ", "the capital is paris", 1.0),
    ("Paris is nice", "Paris", 0.0),
    ("anything", None, None),
]


@pytest.mark.parametrize(("completion", "answer", "score"), EXACT)
def test_exact_answer(completion: str, answer: Any, score: float | None) -> None:
    assert exact_answer([completion], [answer]) == [score]


@pytest.mark.parametrize(("completion", "answer", "score"), [
    ("The capital of France is Paris, of course.", "paris", 1.0),
    ("Parisian food", "Paris", 0.0),
    ("I count 1,000 sheep and 3 dogs", "1000", 1.0),
    ("420 sheep", "42", 0.0),
    ("nothing", "", None),
])
def test_answer_in_completion(completion: str, answer: str, score: float | None) -> None:
    assert answer_in_completion([completion], [answer]) == [score]


def test_stops() -> None:
    assert stops(["a", "b"], stopped=[True, False]) == [1.0, 0.0]


REWARD_ERRORS = [
    (["no_such_reward_module_xyz:f"], "no module named 'no_such_reward_module_xyz'"),
    (["grpo_rewards_demo:missing"], "has no function 'missing'"),
    (["grpo_rewards_demo:NOT_CALLABLE"], "is a int, not a function"),
    (["grpo_rewards_demo:wrong_length"], "returned 1 rewards for 3 completions"),
    (["grpo_rewards_demo:not_a_list"], "returned float; it must return a list of 3 numbers"),
    (["grpo_rewards_demo:bad_value"], "returned str for completion 0"),
    (["grpo_rewards_demo:raises"], "failed: ValueError: boom"),
]


@pytest.mark.parametrize(("rewards", "message"), REWARD_ERRORS, ids=[m.split(":")[0] for _, m in REWARD_ERRORS])
def test_reward_function_errors_name_the_key(rewards: list[str], message: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "grpo_rewards_demo.py").write_text(REWARD_MODULE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        scorer = Rewards.from_config(rewards, None, None)
        scorer.score(prompts=["p"] * 3, messages=[[{"role": "user", "content": "p"}]] * 3,
                     completions=["a", "b", "c"], completion_ids=[[1], [2], [3]], stopped=[True, False, True],
                     columns={"answer": ["a", "x", "c"]})
    assert err.value.field == "grpo.rewards" and message in err.value.message


def test_reward_arguments_and_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "grpo_rewards_demo.py").write_text(REWARD_MODULE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    # a function without **kwargs gets only what it names; weights sum the rewards
    rewards = Rewards.from_config(["grpo_rewards_demo:only_named", "stops"], [2.0, 1.0], None)
    scored = rewards.score(prompts=["p", "q"], messages=[[{"role": "user", "content": "p"}]] * 2,
                           completions=["a", "b"], completion_ids=[[1], [2]], stopped=[False, True],
                           columns={"answer": ["a", "x"], "topic": [1, 2]})
    assert scored.per_reward == {"only_named": [1.0, 0.0], "stops": [0.0, 1.0]}
    assert scored.totals() == [2.0, 1.0]
    # a required argument that is no column stops at prepare, naming the key
    with pytest.raises(ConfigError, match=r"reads the column\(s\) solution") as err:
        Rewards.from_config(["grpo_rewards_demo:needs_column"], None, None).check_columns({"answer"}, source="x")
    assert err.value.field == "grpo.rewards"
    with pytest.raises(ConfigError, match=r"reads the column\(s\) answer"):
        Rewards.from_config(["exact_answer"], None, None).check_columns({"topic"}, source="x")
    with pytest.raises(ConfigError, match="2 weights for 1 rewards"):
        Rewards.from_config(["stops"], [1.0, 2.0], None)
    # None marks an unscored answer: left out of the sum, and NaN when no reward scored it
    scored = Rewards.from_config(["exact_answer"], None, None).score(
        prompts=["p"], messages=[[{"role": "user", "content": "p"}]], completions=["1"], completion_ids=[[1]],
        stopped=[True], columns={"answer": [None]})
    assert math.isnan(scored.totals()[0])


@pytest.mark.parametrize(("grpo", "message"), [
    ({}, "task grpo learns from rewards"),
    ({"rewards": ["nope"]}, "unknown built-in reward 'nope'"),
    ({"rewards": ["mod:"]}, "neither a built-in reward nor module:function"),
    ({"rewards": ["stops", "stops"]}, "lists stops twice"),
    ({"rewards": ["stops"], "reward_weights": [1.0, 1.0]}, "2 weights for 1 rewards"),
])
def test_config_checks(grpo: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"task": "grpo", "model": "smollm2", "data": {"train": "x.jsonl"}, "grpo": grpo})
    with pytest.raises(ConfigError, match=r"generation\.stop does not apply"):
        load_config({"task": "grpo", "model": "smollm2", "data": {"train": "x.jsonl"},
                     "grpo": {"rewards": ["stops"]}, "generation": {"stop": ["\n"]}})


def test_bad_reward_stops_the_run_before_the_model_loads(tmp_path: Path, steer_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before the rewards were checked")

    monkeypatch.setattr(GRPOTask, "build_model", no_model)
    cfg = grpo_config(tmp_path, steer_dir, grpo={"rewards": ["missing_module_abc:f"]})
    with pytest.raises(ConfigError, match="no module named 'missing_module_abc'"):
        lmtune.train(cfg, show_progress=False)


# ------------------------------------------------------------------------------------------ data
def test_prompts_text_messages_and_columns(tmp_path: Path) -> None:
    rows = [{"question": "What is 2 + 2?", "solution": "4", "level": 1},
            {"question": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
             "solution": "Hello", "level": 2},
            {"question": json.dumps([{"role": "user", "content": "As JSON text"}]), "solution": "ok"},
            {"question": "[1, 2]: text that only looks like a list", "solution": "3"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = load_config({"task": "grpo", "model": "smollm2", "data": {"train": str(path),
                       "columns": {"prompt": "question", "answer": "solution"}}, "grpo": {"rewards": ["stops"]}})
    prompts, facts = read_prompts(str(path), cfg.data)
    assert [p.messages[-1]["content"] for p in prompts] == ["What is 2 + 2?", "Hi?", "As JSON text",
                                                             "[1, 2]: text that only looks like a list"]
    assert prompts[0].prompt == "What is 2 + 2?" and prompts[1].prompt == prompts[1].messages
    assert prompts[1].messages[0] == {"role": "system", "content": "Be brief."}
    # the answer column reaches the rewards as `answer`, the others under their own names; a missing cell is None
    assert prompts[0].columns == {"answer": "4", "level": 1} and prompts[2].columns == {"answer": "ok", "level": None}
    assert facts["format"] == "mixed" and facts["columns"] == ["answer", "level"]
    assert [p.line for p in prompts] == [1, 2, 3, 4] and prompts[3].prompt == rows[3]["question"]


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "  "}, "the prompt is empty"),
    ({"prompt": 7}, "expected text or a list of messages, found int"),
    ({"other": "x"}, "the record has no prompt"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "must end with a user"),
])
def test_bad_prompt_rows_name_file_line_and_column(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
    cfg = load_config({"task": "grpo", "model": "smollm2", "data": {"train": str(path)},
                       "grpo": {"rewards": ["stops"]}})
    with pytest.raises(DataError) as err:
        read_prompts(str(path), cfg.data)
    assert message in err.value.message and err.value.line == 2 and err.value.field == "prompt"
    assert err.value.file == str(path)


def test_no_prompt_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"promt": "x"}])
    cfg = load_config({"task": "grpo", "model": "smollm2", "data": {"train": str(path)},
                       "grpo": {"rewards": ["stops"]}})
    with pytest.raises(DataError, match="no column named 'prompt'") as err:
        read_prompts(str(path), cfg.data)
    assert "promt" in (err.value.hint or "")
    cfg = load_config({"task": "grpo", "model": "smollm2", "data": {"train": str(path), "columns": {"chosen": "x"}},
                       "grpo": {"rewards": ["stops"]}})
    with pytest.raises(ConfigError, match="unknown key 'chosen'"):
        read_prompts(str(path), cfg.data)


def test_arithmetic_data_is_generated_and_checkable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    records = arithmetic_records()
    assert records == arithmetic_records() and len(records) == 2000
    assert len({r["prompt"] for r in records}) == 2000
    for r in records:
        a, op, b = r["prompt"].removeprefix("What is ").split("?")[0].split()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert r["prompt"].endswith("Answer with the number only.") and r["operation"] == op
    dataset = BUNDLED_DATA["arithmetic"]
    assert dataset.task == "grpo" and dataset.is_installed() and "generated" in dataset.description.lower()
    path = resolve_bundled_data("arithmetic")
    cfg = load_config({"task": "grpo", "model": "smollm2", "data": {"train": "bundled:arithmetic"},
                       "grpo": {"rewards": ["exact_answer"]}})
    prompts, _ = read_prompts("bundled:arithmetic", cfg.data)
    assert path.is_file() and len(prompts) == 2000
    answers = [p.columns["answer"] for p in prompts[:50]]
    assert exact_answer([f"The result is {a}." for a in answers], answers) == [1.0] * 50
    assert exact_answer([str(int(a) + 1) for a in answers], answers) == [0.0] * 50


# ------------------------------------------------------------------------------------------ reward model
def test_reward_model_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an lmtune run or model folder") as err:
        RewardModel(str(tmp_path), 1.0)
    assert err.value.field == "grpo.reward_model"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "lmtune.json").write_text(json.dumps({"task": "sft"}))
    with pytest.raises(ConfigError, match="holds a sft model, not a reward model"):
        RewardModel(str(tmp_path), 1.0)


def test_reward_model_scores_the_answers(tmp_path: Path, steer_dir: Path, tiny_chat_llama_dir: Path) -> None:
    """A tiny ``task: reward`` run as grpo.reward_model: the logged rewards are its scores of the answers."""
    try:
        get_predictor("reward")
    except (KeyError, ImportError):
        pytest.skip("task reward has no predictor in this tree yet")
    pairs = [{"prompt": f"Question {i}?", "chosen": "yes indeed", "rejected": "no way"} for i in range(24)]
    reward_run = lmtune.train({
        "task": "reward", "model": str(tiny_chat_llama_dir), "method": {"name": "full"},
        "data": {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "max_length": 48},
        "train": {"max_steps": 1, "batch_size": 8, "precision": "fp32"}, "output_dir": str(tmp_path / "reward"),
    }, show_progress=False)
    cfg = grpo_config(tmp_path, steer_dir, grpo={"rewards": [], "reward_model": str(reward_run.path)},
                      train={"max_steps": 1, "eval_every": 1}, generation={"eval_examples": 4})
    run = lmtune.train(cfg, show_progress=False)
    test = run.metrics["test"]
    assert set(test) >= {"reward", "reward/reward_model"} and math.isfinite(test["reward"])
    predictor = get_predictor("reward")(reward_run.model_dir, reward_run.meta)
    examples = test["examples"]
    scores = predictor.score([[{"role": "user", "content": e["prompt"]}] for e in examples],
                             [e["generated"] for e in examples])
    assert scores == pytest.approx([e["reward"] for e in examples], abs=1e-4)
    assert all(math.isfinite(r["reward/reward_model"]) for r in train_rows(run.path))


def test_plan_sizes_rows_with_their_sampled_answers(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    """Each prompt's num_generations rows hold the prompt and an answer of up to generation.max_new_tokens."""
    from lmtune.workflows.plan import plan

    short = plan(grpo_config(tmp_path, tiny_chat_llama_dir), suggest=False).tokens
    long = plan(grpo_config(tmp_path, tiny_chat_llama_dir, generation={"max_new_tokens": 40}), suggest=False)
    tokens = long.tokens
    assert tokens["rows_per_example"] == 4
    assert tokens["sequence_length"] == short["sequence_length"] + 36
    assert "40 sampled tokens" in tokens["sequence_length_source"]
    assert tokens["micro_batch_tokens"] == 4 * 4 * tokens["sequence_length"]
    assert any("longest answer" in note for note in long.notes)
