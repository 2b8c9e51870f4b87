"""The offline preference tasks (dpo, orpo, simpo, kto) on lmtune's loop: tiny decoder, SmolLM2's real tokenizer.

The data is learnable in a few steps: the chosen answer to "Capital of X?" is X's capital, the rejected one
another country's. The losses themselves equal TRL's (tests/test_preference_losses.py); these tests check what
the tasks add: the one concatenated forward (and its logits_to_keep), the cached reference, the metrics, resume.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FILLER, NEGATIVE, POSITIVE, crash_after_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmtune
from lmtune.config import load_config
from lmtune.data.features import IGNORE_INDEX
from lmtune.errors import ConfigError
from lmtune.tasks import get_task
from lmtune.tasks.preference import PairCollator, separate_rows, shared_prefix
from lmtune.tasks.preference_losses import dpo_losses
from lmtune.workflows.plan import plan

CAPITALS = {"France": "Paris", "Spain": "Madrid", "Peru": "Lima", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo"}


def pair_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        country = rng.choice(list(CAPITALS))
        other = rng.choice([c for c in CAPITALS if c != country])
        rows.append({"prompt": f"Capital of {country}? ({i})", "chosen": CAPITALS[country],
                     "rejected": CAPITALS[other]})
    return rows


def kto_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for row in pair_rows(n // 2, seed):
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    random.Random(seed).shuffle(out)
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(tmp_path: Path, model_dir: Path, task: str = "dpo", *, name: str = "run", **sections: Any
            ) -> dict[str, Any]:
    rows = kto_rows(240) if task == "kto" else pair_rows(200)
    data = write_jsonl(tmp_path / f"{task}.jsonl", rows)
    cfg: dict[str, Any] = {
        "task": task, "model": str(model_dir),
        "data": {"train": str(data), "max_length": 64},
        "train": {"epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32"},
        "generation": {"max_new_tokens": 4, "eval_examples": 6},
        "output_dir": str(tmp_path / name),
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _naive_logps(model: Any, ids: list[int], labels: list[int]) -> float:
    """Summed log-probs of one row's answer tokens, from a plain forward of the row alone."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(labels[1:])
    keep = targets != IGNORE_INDEX
    return float(logp[keep].gather(-1, targets[keep].unsqueeze(-1)).sum())


# ------------------------------------------------------------------------------------------ training
def test_dpo_learns_the_preference_and_caches_the_reference(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    run = lmtune.train(_config(tmp_path, tiny_chat_llama_dir), show_progress=False)
    test, before = run.metrics["test"], run.metrics["starting_point"]["test"]
    # Before the first step every implicit reward is 0: loss log 2, accuracy exactly chance (ties count half).
    assert before["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert before["accuracy"] == 0.5 and before["reward_margin"] == 0.0
    assert test["loss"] < before["loss"] - 0.02
    assert test["accuracy"] >= 0.7 and test["reward_margin"] > 0
    assert test["logp_accuracy"] > before["logp_accuracy"]
    # chosen answers gained probability relative to the starting model, rejected ones lost some
    assert test["chosen_reward"] > test["rejected_reward"]
    # the reference: the starting model's log-probs of every pair, computed once and kept in the run folder
    reference = load_file(str(run.path / "reference_logps.safetensors"))
    data = json.loads((run.path / "data.json").read_text())
    assert {s: t.shape[0] for s, t in reference.items()} == {s: data[s]["pairs"] for s in ("train", "validation", "test")}
    assert "computed once before training" in (run.path / "train.log").read_text()
    # the reference is what the starting model gives each pair alone (no padding, every logit)
    task = get_task("dpo")(load_config(run.path / "config.yaml"))
    tokenizer = task.load_tokenizer(Path(tiny_chat_llama_dir))
    prepared = task.prepare(tokenizer)
    start = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32).eval()
    for i in (0, 7):
        row = prepared.splits["test"][i]
        assert reference["test"][i, 0].item() == pytest.approx(
            _naive_logps(start, row["chosen_input_ids"], row["chosen_labels"]), abs=1e-4)
        assert reference["test"][i, 1].item() == pytest.approx(
            _naive_logps(start, row["rejected_input_ids"], row["rejected_labels"]), abs=1e-4)
    report = (run.path / "report.md").read_text()
    assert "Preferences on the test split" in report and "starting model" in report


def test_one_concatenated_forward_equals_each_row_alone(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    """The batch's logps (one row per pair, the prompt shared by both answers, logits only from the first answer
    position on) equal each answer's own, with SDPA, eager attention, through peft and as separate rows; the
    task's loss is dpo_losses of them."""
    cfg = load_config(_config(tmp_path, tiny_chat_llama_dir))
    task = get_task("dpo")(cfg)
    tokenizer = task.load_tokenizer(Path(tiny_chat_llama_dir))
    data = task.prepare(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32).eval()
    assert model.config._attn_implementation == "sdpa"
    features = [data.splits["train"][i] for i in range(6)]
    batch = task.collator(tokenizer)(features)
    lengths = [(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) for f in features]
    # (B, T): each row holds the prompt once, then both answers; T is well under the two rows it replaces
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].shape[1] < max(c + r for c, r in lengths)
    assert batch["num_real_tokens"].tolist() == [c + r for c, r in lengths]
    assert bool((batch["bridge_from"] > 0).all())  # every rejected answer's first token is scored from the prompt
    calls: list[dict[str, Any]] = []
    original = model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    model.forward = spy  # type: ignore[method-assign]
    with torch.no_grad():
        logps, tokens = task.sequence_logps(model, batch)
    assert len(calls) == 1 and 0 < calls[0]["logits_to_keep"] < batch["input_ids"].shape[1]
    assert calls[0]["attention_mask"].shape == (6, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    # eager attention takes the mask as additive floats; the same log-probs
    eager = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.allclose(get_task("dpo")(cfg).sequence_logps(eager, batch)[0], logps, atol=1e-4)
        # the same pairs as (2B, T) separate rows (attention that takes no 4D mask)
        separate = separate_rows(batch, tokenizer.pad_token_id)
        assert separate["input_ids"].shape[0] == 12
        assert torch.allclose(task.sequence_logps(model, separate)[0], logps, atol=1e-4)
        assert torch.equal(task.sequence_logps(model, separate)[1], tokens)
    # through peft's wrapper too (LoRA runs): the keywords reach the transformers model
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32),
                          LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).eval()
    lora_task = get_task("dpo")(cfg)
    with torch.no_grad():
        lora_logps, _ = lora_task.sequence_logps(lora, batch)
    assert lora_task._keeps_logits is True
    assert torch.allclose(lora_logps, logps, atol=1e-4)  # B = 0: the base model
    for i, f in enumerate(features):
        assert logps[i].item() == pytest.approx(_naive_logps(model, f["chosen_input_ids"], f["chosen_labels"]),
                                                abs=1e-4)
        assert logps[6 + i].item() == pytest.approx(
            _naive_logps(model, f["rejected_input_ids"], f["rejected_labels"]), abs=1e-4)
        assert tokens[i] == sum(label != IGNORE_INDEX for label in f["chosen_labels"][1:])
        assert tokens[6 + i] == sum(label != IGNORE_INDEX for label in f["rejected_labels"][1:])
    reference = torch.randn(6, 2) - 5
    task.reference = {"train": torch.zeros(len(data.splits["train"]), 2)}
    task.reference["train"][batch["index"]] = reference
    with torch.no_grad():
        loss = task.loss(model, batch)
    expected, _, _ = dpo_losses(logps[:6], logps[6:], reference[:, 0], reference[:, 1], tokens[:6], tokens[6:],
                                loss="sigmoid", beta=0.1)
    assert loss.item() == pytest.approx(expected.sum().item(), rel=1e-5)


@pytest.mark.parametrize(("task", "settings"), [
    ("dpo", {"loss": "ipo"}), ("dpo", {"loss": "hinge"}), ("dpo", {"loss": "robust", "label_smoothing": 0.1}),
    ("dpo", {"label_smoothing": 0.1}), ("orpo", {}), ("simpo", {}), ("kto", {}),
])
def test_every_preference_loss_trains(task: str, settings: dict[str, Any], tmp_path: Path,
                                      tiny_chat_llama_dir: Path) -> None:
    cfg = _config(tmp_path, tiny_chat_llama_dir, task, preference=settings, train={"max_steps": 60})
    if task == "simpo":
        cfg["train"]["learning_rate"] = 3e-3
    run = lmtune.train(cfg, show_progress=False)
    test, before = run.metrics["test"], run.metrics["starting_point"]["test"]
    assert test["loss"] < before["loss"]
    assert test["accuracy"] > before["accuracy"]
    assert test["reward_margin"] > before["reward_margin"]
    if task == "orpo":  # supervised on the chosen answers too: it learns to stop
        assert test["stopped_fraction"] > before["stopped_fraction"]


def test_lora_reference_is_the_base_model(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    cfg = _config(tmp_path, tiny_chat_llama_dir, method={"name": "lora", "r": 8, "dropout": 0.0},
                  train={"max_steps": 24, "learning_rate": 3e-2})
    # A preference LoRA learns in a few steps: praise (one of two words) over blame (one of two others).
    rng = random.Random(0)
    rows = []
    for i in range(160):
        words = rng.sample(FILLER, rng.randint(0, 2))
        rows.append({"prompt": f"Your view of film {i}?", "chosen": " ".join([*words, rng.choice(POSITIVE[:2])]),
                     "rejected": " ".join([*words, rng.choice(NEGATIVE[:2])])})
    cfg["data"]["train"] = str(write_jsonl(tmp_path / "reviews.jsonl", rows))
    run = lmtune.train(cfg, show_progress=False)
    assert run.metrics["test"]["accuracy"] > 0.5 and run.metrics["test"]["loss"] < 0.69
    reference = load_file(str(run.path / "reference_logps.safetensors"))
    task = get_task("dpo")(load_config(run.path / "config.yaml"))
    data = task.prepare(task.load_tokenizer(Path(tiny_chat_llama_dir)))
    start = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32).eval()
    row = data.splits["validation"][3]
    assert reference["validation"][3, 0].item() == pytest.approx(
        _naive_logps(start, row["chosen_input_ids"], row["chosen_labels"]), abs=1e-4)
    # the merged model serves as a plain chat model that stops at its end-of-turn token
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    assert run.meta["eos_token_ids"] == [tokenizer.eos_token_id]


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_resume_equals_uninterrupted(task: str, tmp_path: Path, tiny_chat_llama_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after a mid-epoch checkpoint and resumed: identical weights and logged losses; the reference
    log-probs are read back, not recomputed from the half-trained model."""
    train = {"max_steps": 14, "save_every": 5, "eval_every": 7, "keep_checkpoints": 5, "log_every": 1}
    whole = lmtune.train(_config(tmp_path, tiny_chat_llama_dir, task, name="whole", train=train), show_progress=False)
    cfg = _config(tmp_path, tiny_chat_llama_dir, task, name="broken", train=train)
    with crash_after_checkpoint(monkeypatch, 10):
        lmtune.train(cfg, show_progress=False)
    resumed = lmtune.train(cfg, resume=True, show_progress=False)
    assert "read back" in (resumed.path / "train.log").read_text()
    a = load_file(str(whole.path / "model" / "model.safetensors"))
    b = load_file(str(resumed.path / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0

    def tail(path: Path) -> list[float]:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["split"] == "train" and r["step"] > 10]

    assert tail(whole.path) == tail(resumed.path)


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(("task", "section", "message"), [
    ("orpo", {"preference": {"loss": "ipo"}}, "preference.loss"),
    ("dpo", {"preference": {"gamma_beta_ratio": 1.0}}, "gamma_beta_ratio"),
    ("dpo", {"preference": {"desirable_weight": 2.0}}, "desirable_weight"),
    ("dpo", {"preference": {"loss": "hinge", "label_smoothing": 0.1}}, "label_smoothing"),
    ("simpo", {"data": {"packing": True}}, "data.packing"),
])
def test_settings_that_do_not_apply_fail_at_load(task: str, section: dict[str, Any], message: str,
                                                 tmp_path: Path) -> None:
    cfg: dict[str, Any] = {"task": task, "model": "smollm2", "data": {"train": "pairs.jsonl"}}
    for key, values in section.items():
        cfg.setdefault(key, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_plan_counts_both_answers_and_the_reference(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    result = plan(_config(tmp_path, tiny_chat_llama_dir), suggest=False)
    tokens = result.tokens
    assert tokens["rows_per_example"] == 2
    assert tokens["micro_batch_tokens"] == 8 * 2 * tokens["sequence_length"]
    assert any("reference" in note and "computed once" in note for note in result.notes)
    orpo = plan(_config(tmp_path, tiny_chat_llama_dir, "orpo"), suggest=False)
    assert any("no reference" in note for note in orpo.notes)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_kl_to_the_reference_is_estimated_on_sampled_answers(method: str, tmp_path: Path,
                                                             tiny_chat_llama_dir: Path) -> None:
    """0 for the starting model; positive after tuning, whether the reference is LoRA's adapter-disabled base or
    the starting model loaded for the estimate; and equal to a direct computation with the starting model."""
    cfg = _config(tmp_path, tiny_chat_llama_dir, method={"name": method, "dropout": 0.0} if method == "lora"
                  else {"name": method}, train={"max_steps": 20, "learning_rate": 2e-2})
    run = lmtune.train(cfg, show_progress=False)
    test, before = run.metrics["test"], run.metrics["starting_point"]["test"]
    assert before["kl_per_token"] == 0.0
    assert test["kl_per_token"] > 0 and test["kl_answers"] == 6
    # the same estimate from the saved (merged) model and the starting model, outside the task
    task = get_task("dpo")(load_config(run.path / "config.yaml"))
    task.load_tokenizer(Path(tiny_chat_llama_dir))
    task.trained = True
    tuned = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32).eval()
    start = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32).eval()
    data = task.prepare(task.tokenizer)
    batch = task.sample_answers(tuned, data.extra["prompts"]["test"][:6])
    assert batch is not None
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        diff = task.token_logps(tuned, batch) - task.token_logps(start, batch)
    assert test["kl_per_token"] == pytest.approx(float(diff[:, :-1][mask].sum() / mask.sum()), rel=1e-3)


def test_shared_prompt_rows_score_every_answer_as_separate_rows_do(tmp_path: Path, tiny_chat_llama_dir: Path
                                                                   ) -> None:
    """Edge cases of the shared layout: answers with a common start (only the loss-free prompt is shared),
    prompts that differ after a common start (left truncation cut them differently: no bridge token), a
    one-token answer, and a batch that mixes them; log-probs, counts and gradients equal the separate rows'."""
    ignore = IGNORE_INDEX

    def feature(index: int, prompt: list[int], chosen: list[int], rejected: list[int],
                rejected_prompt: list[int] | None = None) -> dict[str, Any]:
        r_prompt = prompt if rejected_prompt is None else rejected_prompt
        return {"chosen_input_ids": prompt + chosen, "chosen_labels": [ignore] * len(prompt) + chosen,
                "rejected_input_ids": r_prompt + rejected, "rejected_labels": [ignore] * len(r_prompt) + rejected,
                "index": index}

    features = [
        feature(0, [5, 6, 7, 8], [20, 21, 22], [30, 31]),
        feature(1, [5, 6, 9], [40, 41, 42, 43], [40, 44]),  # both answers start with token 40
        feature(2, [5, 6, 7, 8, 9], [50, 51], [52, 53, 54], rejected_prompt=[5, 6, 11, 8, 9]),
        feature(3, [5, 10], [60], [61, 62, 63, 64, 65]),
    ]
    assert shared_prefix(features[1]["chosen_input_ids"], features[1]["chosen_labels"],
                         features[1]["rejected_input_ids"], features[1]["rejected_labels"]) == 3
    shared = PairCollator(0, share_prompt=True)(features)
    separate = PairCollator(0)(features)
    assert shared["bridge_from"].tolist() == [3, 2, -1, 1]  # sample 2's rejected side goes on with prompt tokens
    assert shared["segments"][2].tolist()[:2] == [0, 0]
    cfg = load_config(_config(tmp_path, tiny_chat_llama_dir))
    task = get_task("dpo")(cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32)
    logps, tokens = task.sequence_logps(model, shared)
    logps.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected, expected_tokens = task.sequence_logps(model, separate)
    expected.sum().backward()
    assert torch.allclose(logps, expected, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)
    assert tokens.tolist() == [3, 4, 2, 1, 2, 2, 3, 5]
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_the_lora_reference_pass_skips_adapters_only_while_they_add_nothing(tiny_chat_llama_dir: Path) -> None:
    """base_model_only switches a peft model's adapters off while every LoRA B is zero (the standard start: the
    same outputs, fewer matmuls), and leaves an adapter that changes the model, or a plain model, as it is."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from lmtune.tasks.preference import base_model_only

    plain = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32).eval()
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, dtype=torch.float32),
                          LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).eval()
    layers = [m for m in lora.modules() if isinstance(m, LoraLayer)]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = plain(ids).logits
        with base_model_only(lora):
            assert all(layer.disable_adapters for layer in layers)
            assert torch.allclose(lora(ids).logits, expected, atol=1e-5)
        assert not any(layer.disable_adapters for layer in layers)
        with base_model_only(plain):
            pass
        next(p for n, p in lora.named_parameters() if "lora_B" in n).fill_(0.5)  # a trained (or non-zero) adapter
        with base_model_only(lora):
            assert not any(layer.disable_adapters for layer in layers)
            assert not torch.allclose(lora(ids).logits, expected, atol=1e-3)
