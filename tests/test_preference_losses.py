"""lmtune's preference and RL losses (lmtune/tasks/preference_losses.py) against TRL 1.16's own trainers.

Each parity test builds the real TRL trainer on a tiny decoder (2 layers, hidden 32, no dropout) with a tiny
dataset, collates a batch with the trainer's own collator and takes its ``compute_loss``; lmtune's loss comes
from the same rows through ``completion_token_logps`` on the model's logits and the loss functions here. Loss
and every parameter's gradient must agree. The reference model differs from the policy, so the log-ratios,
and the losses, are not trivial.

The tokenizer is a word-level one over a 64-word vocabulary built in the test (``w4 w17 ...``): the losses do
not depend on the text, and a small vocabulary keeps every test well under a second after TRL's import.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lmtune.data.features import IGNORE_INDEX
from lmtune.tasks.preference_losses import (
    completion_token_logps,
    dpo_losses,
    group_advantages,
    grpo_token_losses,
    kto_kl,
    kto_losses,
    orpo_losses,
    simpo_losses,
)

VOCAB = 64
SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]
ATOL = 1e-5


# ------------------------------------------------------------------------------------------ builders
@pytest.fixture(scope="module")
def trl() -> Any:
    """TRL, imported once for the module (a few seconds)."""
    return pytest.importorskip("trl")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A word-level tokenizer: ``<pad>`` 0, ``</s>`` 1 (EOS), ``<s>`` 2, ``<unk>`` 3, then ``w4`` .. ``w63``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIALS + [f"w{i}" for i in range(len(SPECIALS), VOCAB)]
    core = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def tiny_decoder(seed: int) -> Any:
    """A 2-layer, hidden-32 Llama with weights large enough that its next-token distributions are far from
    uniform (so policy and reference differ clearly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, attention_dropout=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg)


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(f"w{rng.randrange(len(SPECIALS), VOCAB)}" for _ in range(rng.randint(low, high)))


def pair_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": words(rng, 2, 5), "chosen": " " + words(rng, 1, 5), "rejected": " " + words(rng, 1, 5)}
            for _ in range(n)]


def trl_args(config_cls: Any, tmp_path: Path, **kwargs: Any) -> Any:
    """A TRL config for a CPU batch of four in float32 (TRL's configs default to bf16 autocast)."""
    return config_cls(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=4, use_cpu=True,
                      bf16=False, **kwargs)


def first_batch(trainer: Any) -> dict[str, Any]:
    """The trainer's first four prepared examples, through its own collator."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


def sequence_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of each row, and how many there are, as a task would."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    return completion_token_logps(logits, labels).sum(-1), (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def stack_pairs(batch: dict[str, torch.Tensor], key: str, fill: int) -> torch.Tensor:
    """``[chosen rows; rejected rows]`` of ``chosen_<key>``/``rejected_<key>``, padded to one width."""
    chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
    width = max(chosen.shape[1], rejected.shape[1])
    return torch.cat([F.pad(chosen, (0, width - chosen.shape[1]), value=fill),
                      F.pad(rejected, (0, width - rejected.shape[1]), value=fill)])


def assert_same_loss_and_grads(model: Any, trl_loss: Callable[[], torch.Tensor],
                               lmtune_loss: Callable[[], torch.Tensor]) -> None:
    """TRL's and lmtune's losses agree, and so does the gradient of every parameter."""
    model.zero_grad(set_to_none=True)
    expected = trl_loss()
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = lmtune_loss()
    got.backward()
    have = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(got, expected, atol=ATOL, rtol=0), (got.item(), expected.item())
    assert want and set(have) == set(want)
    for name, grad in want.items():
        assert torch.allclose(have[name], grad, atol=ATOL, rtol=1e-4), name
    assert any(g.abs().max() > 1e-4 for g in want.values()), "the gradient must not vanish"


# ------------------------------------------------------------------------------------------ log-probabilities
def naive_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logps = logits.float().log_softmax(-1)[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return F.pad(torch.where(targets != IGNORE_INDEX, picked, 0.0), (0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_completion_token_logps_equals_log_softmax_and_gather(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 7, 11)).to(dtype)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = IGNORE_INDEX  # the prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    got = completion_token_logps(logits, labels)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    assert torch.allclose(got, naive_logps(logits, labels), atol=1e-6)
    assert got[:, -1].eq(0).all() and got[:, :1].eq(0).all() and got[1, 4:].eq(0).all()
    # Column t scores labels[:, t+1]: moving one label moves exactly one entry.
    moved = labels.clone()
    moved[0, 4] = (moved[0, 4] + 1) % 11
    diff = (completion_token_logps(logits, moved) != got).nonzero().tolist()
    assert diff == [[0, 3]]


def test_completion_token_logps_temperature_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmtune.tasks import preference_losses

    torch.manual_seed(1)
    logits = torch.randn(2, 9, 13)
    labels = torch.randint(0, 13, (2, 9))
    whole = completion_token_logps(logits, labels, temperature=0.7)
    assert torch.allclose(whole, naive_logps(logits / 0.7, labels), atol=1e-6)
    monkeypatch.setattr(preference_losses, "LOGPS_CHUNK_TOKENS", 3)
    assert torch.allclose(completion_token_logps(logits, labels, temperature=0.7), whole, atol=1e-6)


def test_logits_to_keep_gives_the_same_logps() -> None:
    model = tiny_decoder(0)
    torch.manual_seed(2)
    input_ids = torch.randint(4, VOCAB, (3, 10))
    labels = input_ids.clone()
    labels[:, :6] = IGNORE_INDEX  # prompt of 6 tokens: the logits of positions 5.. score the completion
    labels[2, 8:] = IGNORE_INDEX
    full = completion_token_logps(model(input_ids=input_ids).logits, labels)
    for keep in (5, 7, 10):
        kept = model(input_ids=input_ids, logits_to_keep=keep).logits  # (B, keep, V)
        assert kept.shape[1] == keep
        assert torch.allclose(completion_token_logps(kept, labels), full, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        completion_token_logps(model(input_ids=input_ids, logits_to_keep=4).logits, labels)


# ------------------------------------------------------------------------------------------ direct checks
def test_dpo_sigmoid_at_zero_margin_is_log_2() -> None:
    logps = torch.tensor([-5.0, -9.0])
    tokens = torch.tensor([3, 4])
    losses, chosen, rejected = dpo_losses(logps, logps, logps, logps, tokens, tokens, loss="sigmoid", beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert chosen.eq(0).all() and rejected.eq(0).all()
    smoothed, _, _ = dpo_losses(logps, logps, logps, logps, tokens, tokens, loss="sigmoid", beta=0.1,
                                label_smoothing=0.3)
    assert torch.allclose(smoothed, torch.full((2,), math.log(2)))


@pytest.mark.parametrize(("loss", "smoothing", "match"), [
    ("dpo", 0.0, "unknown pair loss"),
    ("robust", 0.5, "label_smoothing"),
    ("sigmoid", 0.6, "label_smoothing"),
    ("ipo", 0.1, "no label smoothing"),
])
def test_dpo_losses_reject_bad_settings(loss: str, smoothing: float, match: str) -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_losses(x, x, x, x, x + 1, x + 1, loss=loss, beta=0.1, label_smoothing=smoothing)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0, 0.0, 4.0])
    # Groups of 2: means .5, 3, 2; sample stds .7071, 0, 2.8284.
    s1, s3 = math.sqrt(0.5), math.sqrt(8.0)
    expected = torch.tensor([0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.0, 0.0, -2 / (s3 + 1e-4), 2 / (s3 + 1e-4)])
    assert torch.allclose(group_advantages(rewards, 2), expected, atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 2, scale="none"), torch.tensor([0.5, -0.5, 0, 0, -2, 2]))
    batch_std = rewards.std().item()  # sample std of all six: 1.6330
    assert torch.allclose(group_advantages(rewards, 2, scale="batch"),
                          torch.tensor([0.5, -0.5, 0, 0, -2, 2]) / (batch_std + 1e-4), atol=1e-6)
    # Groups of 3: [1, 0, 3] (mean 4/3) and [3, 0, 4] (mean 7/3).
    assert torch.allclose(group_advantages(rewards, 3, scale="none"),
                          torch.tensor([-1 / 3, -4 / 3, 5 / 3, 2 / 3, -7 / 3, 5 / 3]))
    # An unscorable completion (NaN) is left out of its group's statistics and gets 0.
    with_nan = torch.tensor([1.0, float("nan"), 3.0, 0.0])
    got = group_advantages(with_nan, 2)
    assert got[:2].eq(0).all()  # one scorable reward: no std, no signal
    assert torch.allclose(got[2:], torch.tensor([1.5, -1.5]) / (math.sqrt(4.5) + 1e-4))
    nan_group = group_advantages(torch.tensor([1.0, float("nan"), 3.0, 5.0]), 4, scale="none")
    assert torch.allclose(nan_group, torch.tensor([-2.0, 0.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, 2, scale="std")


def test_group_advantages_match_trl_formula(trl: Any) -> None:
    """TRL computes advantages inside its generation step (impractical to run here), from its ``nanstd``."""
    from trl.trainer.utils import nanstd

    torch.manual_seed(3)
    rewards = torch.randn(12)
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    by_group = (rewards - mean) / (nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    by_batch = (rewards - mean) / (nanstd(rewards).expand_as(rewards) + 1e-4)
    assert torch.allclose(group_advantages(rewards, 4), by_group, atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, scale="batch"), by_batch, atol=1e-6)


def test_cdpo_is_trl_smoothed_sigmoid(trl: Any) -> None:
    """TRL 1.16's DPOTrainer has no label smoothing for ``sigmoid``; the cDPO formula lives in its CPO loss,
    which applied to the log-ratios is conservative DPO."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    torch.manual_seed(4)
    policy = (-10 * torch.rand(2, 5)).requires_grad_()
    ref = -10 * torch.rand(2, 5)
    cpo = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.3, label_smoothing=0.2,
                          accelerator=SimpleNamespace(device=torch.device("cpu")))
    expected = CPOTrainer.cpo_loss(cpo, policy[0] - ref[0], policy[1] - ref[1])[0].mean()
    (want,) = torch.autograd.grad(expected, policy)
    tokens = torch.ones(5)
    losses, _, _ = dpo_losses(policy[0], policy[1], ref[0], ref[1], tokens, tokens, loss="sigmoid", beta=0.3,
                              label_smoothing=0.2)
    (have,) = torch.autograd.grad(losses.mean(), policy)
    assert torch.allclose(losses.mean(), expected, atol=1e-6) and torch.allclose(have, want, atol=1e-6)


# ------------------------------------------------------------------------------------------ TRL parity
@pytest.mark.parametrize(("loss", "smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_matches_trl(trl: Any, tokenizer: Any, tmp_path: Path, loss: str, smoothing: float) -> None:
    from datasets import Dataset

    model, ref = tiny_decoder(0), tiny_decoder(1)
    beta = 0.5
    args = trl_args(trl.DPOConfig, tmp_path, max_length=None, loss_type=[loss], beta=beta,
                    label_smoothing=smoothing)
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(pair_rows(4)),
                             processing_class=tokenizer)
    batch = first_batch(trainer)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    found: dict[str, torch.Tensor] = {}

    def lmtune_loss() -> torch.Tensor:
        logps, tokens = sequence_logps(model, batch["input_ids"], batch["attention_mask"], labels)
        with torch.no_grad():
            ref_logps, _ = sequence_logps(ref, batch["input_ids"], batch["attention_mask"], labels)
        losses, found["chosen"], found["rejected"] = dpo_losses(
            *logps.chunk(2), *ref_logps.chunk(2), *tokens.chunk(2), loss=loss, beta=beta, label_smoothing=smoothing)
        return losses.mean()

    assert_same_loss_and_grads(model, lambda: trainer.compute_loss(model, batch), lmtune_loss)
    logged = trainer._metrics["train"]
    assert math.isclose(found["chosen"].mean().item(), logged["rewards/chosen"][-1], abs_tol=ATOL)
    assert math.isclose(found["rejected"].mean().item(), logged["rewards/rejected"][-1], abs_tol=ATOL)
    assert abs(logged["rewards/margins"][-1]) > 1e-3  # the reference differs from the policy


def test_simpo_matches_trl_cpo(trl: Any, tokenizer: Any, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model = tiny_decoder(0)
    beta, ratio, smoothing = 2.0, 0.5, 0.1
    args = trl_args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=ratio * beta, beta=beta,
                    label_smoothing=smoothing, max_length=64)
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pair_rows(4)),
                         processing_class=tokenizer)
    batch = first_batch(trainer)
    found: dict[str, torch.Tensor] = {}

    def lmtune_loss() -> torch.Tensor:
        logps, tokens = sequence_logps(model, stack_pairs(batch, "input_ids", tokenizer.pad_token_id),
                                       stack_pairs(batch, "attention_mask", 0),
                                       stack_pairs(batch, "labels", IGNORE_INDEX))
        losses, found["chosen"], _ = simpo_losses(*logps.chunk(2), *tokens.chunk(2), beta=beta,
                                                  gamma_beta_ratio=ratio, label_smoothing=smoothing)
        return losses.mean()

    assert_same_loss_and_grads(model, lambda: trainer.compute_loss(model, batch), lmtune_loss)
    logged = trainer._stored_metrics["train"]["rewards/chosen"][-1]
    assert math.isclose(found["chosen"].mean().item(), logged, abs_tol=ATOL)


def test_orpo_matches_trl(trl: Any, tokenizer: Any, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = tiny_decoder(0)
    beta = 0.5
    trainer = ORPOTrainer(model=model, args=trl_args(ORPOConfig, tmp_path, beta=beta, max_length=64),
                          train_dataset=Dataset.from_list(pair_rows(4)), processing_class=tokenizer)
    batch = first_batch(trainer)
    found: dict[str, torch.Tensor] = {}

    def lmtune_loss() -> torch.Tensor:
        input_ids = stack_pairs(batch, "input_ids", tokenizer.pad_token_id)
        attention_mask = stack_pairs(batch, "attention_mask", 0)
        labels = stack_pairs(batch, "labels", IGNORE_INDEX)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        per_token = completion_token_logps(logits, labels)
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
        # TRL's NLL covers every attended token of the chosen rows, prompt included.
        everything = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        nll_logps = completion_token_logps(logits, everything).sum(-1).chunk(2)[0]
        nll_tokens = (everything[:, 1:] != IGNORE_INDEX).sum(-1).chunk(2)[0]
        losses, found["chosen"], _, found["log_odds"] = orpo_losses(
            *per_token.sum(-1).chunk(2), *tokens.chunk(2), beta=beta, nll_logps=nll_logps, nll_tokens=nll_tokens)
        return losses.mean()

    assert_same_loss_and_grads(model, lambda: trainer.compute_loss(model, batch), lmtune_loss)
    logged = trainer._stored_metrics["train"]
    assert math.isclose(found["log_odds"].mean().item(), logged["log_odds_chosen"][-1], abs_tol=ATOL)
    assert math.isclose(found["chosen"].mean().item(), logged["rewards/chosen"][-1], abs_tol=ATOL)


def test_orpo_default_nll_is_the_chosen_answer() -> None:
    chosen, rejected = torch.tensor([-6.0, -2.0]), torch.tensor([-9.0, -8.0])
    tokens = torch.tensor([3, 1])
    losses, _, _, log_odds = orpo_losses(chosen, rejected, tokens, torch.tensor([3, 4]), beta=0.1)
    assert torch.allclose(losses.mean(), 8.0 / 4 - 0.1 * F.logsigmoid(log_odds).mean())


def test_kto_matches_trl(trl: Any, tokenizer: Any, tmp_path: Path) -> None:
    from datasets import Dataset

    model, ref = tiny_decoder(1), tiny_decoder(0)  # this way round the KL estimate is positive
    beta, w_good, w_bad = 0.5, 1.0, 1.5
    rng = random.Random(5)
    rows = [{"prompt": words(rng, 2, 5), "completion": " " + words(rng, 1, 5), "label": i != 1} for i in range(4)]
    args = trl_args(trl.KTOConfig, tmp_path, max_length=None, beta=beta, desirable_weight=w_good,
                    undesirable_weight=w_bad)
    trainer = trl.KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    batch = first_batch(trainer)
    assert trainer.calculate_KL and not batch["label"].all()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    kl_labels = batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, IGNORE_INDEX)
    found: dict[str, torch.Tensor] = {}

    def lmtune_loss() -> torch.Tensor:
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], labels)
        with torch.no_grad():
            ref_logps, _ = sequence_logps(ref, batch["input_ids"], batch["attention_mask"], labels)
            kl_logps, _ = sequence_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], kl_labels)
            ref_kl_logps, _ = sequence_logps(ref, batch["KL_input_ids"], batch["KL_attention_mask"], kl_labels)
        found["kl"] = kto_kl(kl_logps, ref_kl_logps)
        losses, found["rewards"] = kto_losses(logps, ref_logps, batch["label"], found["kl"], beta=beta,
                                              desirable_weight=w_good, undesirable_weight=w_bad)
        return losses.mean()

    assert_same_loss_and_grads(model, lambda: trainer.compute_loss(model, batch), lmtune_loss)
    logged = trainer._metrics["train"]
    assert math.isclose(found["kl"].item(), logged["kl"][-1], abs_tol=ATOL)
    assert found["kl"].item() > 0.1  # the reference point is not clamped away: the test sees it
    good = batch["label"]
    assert math.isclose(found["rewards"][good].mean().item(), logged["rewards/chosen"][-1], abs_tol=ATOL)
    assert math.isclose(found["rewards"][~good].mean().item(), logged["rewards/rejected"][-1], abs_tol=ATOL)


def test_kto_kl_is_clamped_at_zero() -> None:
    assert kto_kl(torch.tensor([-5.0, -6.0]), torch.tensor([-4.0, -4.0])).item() == 0.0
    assert kto_kl(torch.tensor([-2.0, -5.0]), torch.tensor([-4.0, -4.0])).item() == pytest.approx(0.5)


@pytest.mark.parametrize("bias_corrected_kl", [True, False])
def test_grpo_matches_trl(trl: Any, tokenizer: Any, tmp_path: Path, bias_corrected_kl: bool) -> None:
    """GRPOTrainer's loss on fixed completions, advantages and old/reference log-probs (its default ``dapo``
    loss, sampling temperature 0.7, asymmetric clipping, a KL term with and without TRL's ratio weighting)."""
    from datasets import Dataset

    tiny_decoder(0).save_pretrained(tmp_path / "policy")  # with beta > 0 TRL loads its reference by path
    beta, temperature, eps_low, eps_high = 0.5, 0.7, 0.2, 0.28
    rng = random.Random(6)
    args = trl_args(trl.GRPOConfig, tmp_path, num_generations=2, beta=beta, temperature=temperature,
                    epsilon=eps_low, epsilon_high=eps_high, max_completion_length=6,
                    use_bias_correction_kl=bias_corrected_kl)
    trainer = trl.GRPOTrainer(model=str(tmp_path / "policy"),
                              reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                              train_dataset=Dataset.from_list([{"prompt": words(rng, 2, 4)} for _ in range(4)]),
                              processing_class=tokenizer)
    assert trainer.loss_type == "dapo"
    model = trainer.model
    model.eval()  # TRL's evaluation normaliser: this batch's completion tokens (no accumulation window)

    torch.manual_seed(7)
    prompt_ids = torch.randint(4, VOCAB, (4, 4))
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0  # prompts are left-padded
    prompt_ids[1, :2] = tokenizer.pad_token_id
    completion_ids = torch.randint(4, VOCAB, (4, 6))
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, 3:] = 0
    completion_mask[2, 5:] = 0
    completion_ids[completion_mask == 0] = tokenizer.pad_token_id
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # (4, 10)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX

    def completion_logps() -> torch.Tensor:  # (4, 6): the completion tokens' log-probs, as the task computes them
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=7).logits
        return completion_token_logps(logits, labels, temperature=temperature)[:, 3:-1]

    with torch.no_grad():
        current = completion_logps()
    old = current + 0.3 * torch.randn_like(current)  # some ratios fall outside the clip range
    ref = current + 0.5 * torch.randn_like(current)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.2, 0.9]), 2)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    found: dict[str, torch.Tensor] = {}

    def lmtune_loss() -> torch.Tensor:
        losses, stats = grpo_token_losses(completion_logps(), old, ref, advantages, completion_mask, beta=beta,
                                          epsilon_low=eps_low, epsilon_high=eps_high,
                                          bias_corrected_kl=bias_corrected_kl)
        found.update(stats)
        assert losses[completion_mask == 0].eq(0).all()
        return losses.sum() / completion_mask.sum()

    assert_same_loss_and_grads(model, lambda: trainer.compute_loss(model, inputs), lmtune_loss)
    logged = trainer._metrics["eval"]
    assert math.isclose(found["kl"].item(), logged["kl"][-1], abs_tol=ATOL)
    for ours, theirs in (("low", "low_mean"), ("high", "high_mean"), ("region", "region_mean")):
        assert math.isclose(found[f"clip_ratio/{ours}"].item(), logged[f"clip_ratio/{theirs}"][-1], abs_tol=ATOL)
    assert found["clip_ratio/region"].item() > 0  # the clip was exercised


def test_grpo_without_old_or_reference_is_the_plain_policy_gradient() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    losses, stats = grpo_token_losses(logps, None, None, torch.tensor([2.0]), mask, beta=0.1)
    assert torch.allclose(losses, torch.tensor([[-2.0, -2.0, 0.0]]))  # ratio 1 everywhere
    assert stats["kl"].item() == 0 and stats["clip_ratio/region"].item() == 0
    (grad,) = torch.autograd.grad(losses.sum(), logps)
    assert torch.allclose(grad, torch.tensor([[-2.0, -2.0, 0.0]]))  # -A d(logp)
