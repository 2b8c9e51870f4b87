"""Differentially private training (train.privacy, DP-SGD through Opacus) on tiny models, for real: per-example
gradients are each example's own, the noise spends the target epsilon over the planned steps, small epsilon costs
accuracy, a resumed run equals an uninterrupted one, and what DP cannot do is refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import crash_after_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lmtune
from lmtune.config import load_config
from lmtune.errors import ConfigError
from lmtune.training import privacy
from lmtune.training.privacy import PoissonBatches, PrivateTraining, check_privacy_supported


def _config(model: Path, train_file: Path, out: Path, **train: Any) -> dict[str, Any]:
    return {
        "task": "classification",
        "model": str(model),
        "data": {"train": str(train_file), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 32, "learning_rate": 2e-3, "log_every": 2, "precision": "fp32",
                  **train},
        "baselines": [],
        "output_dir": str(out),
    }


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_per_example_gradients_are_each_examples_own(tiny_bert_nodrop_dir: Path) -> None:
    """The hooks' gradient of example i equals the gradient of example i trained alone, for every weight, BERT's
    position embeddings (looked up once per batch, ids (1, T)) included."""
    tok = AutoTokenizer.from_pretrained(tiny_bert_nodrop_dir)
    texts = ["a great and moving film", "dull", "the plot was tedious and the cast weak", "superb"]
    labels = torch.tensor([1, 0, 0, 1])
    enc = tok(texts, padding=True, return_tensors="pt")

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(tiny_bert_nodrop_dir, num_labels=2)
        return m.train()

    alone = []
    for i in range(len(texts)):
        m = model()
        one = {k: v[i : i + 1, : int(enc["attention_mask"][i].sum())] for k, v in enc.items()}
        F.cross_entropy(m(**one).logits, labels[i : i + 1], reduction="sum").backward()
        alone.append({n: p.grad.clone() for n, p in m.named_parameters()})

    m = model()
    dp = PrivateTraining(load_config({"data": {"train": "x.csv"}, "train": {"privacy": {"epsilon": 8}}}).train.privacy,
                         train_size=400, batch_size=4, seed=0)
    dp.attach(m, torch.optim.AdamW(m.parameters()), planned_steps=10)
    F.cross_entropy(m(**enc).logits, labels, reduction="sum").backward()
    dp.before_step(len(texts))
    worst = 0.0
    for name, p in m.named_parameters():
        assert p.grad_sample.shape == (len(texts), *p.shape), name
        for i in range(len(texts)):
            worst = max(worst, float((p.grad_sample[i] - alone[i][name]).abs().max()))
    assert worst < 1e-5
    # the noise is calibrated to the planned steps: their epsilon is the target's, from below
    dp.accountant.history = [(dp.noise_multiplier, dp.sample_rate, 10)]
    assert 8 - privacy.EPSILON_TOLERANCE <= dp.spent_epsilon() <= 8


def test_poisson_batches_are_random_draws_of_the_expected_size() -> None:
    sampler = PoissonBatches(1000, 10, seed=3)
    sampler.set_epoch(0)
    first = sampler.batches()
    assert len(first) == 100
    sizes = [len(b) for b in first]
    assert 8 <= sum(sizes) / len(sizes) <= 12 and len(set(sizes)) > 3  # Binomial(1000, 0.01): varies around 10
    assert all(len(set(b)) == len(b) for b in first)  # no example twice in one draw
    sampler.set_epoch(0)
    assert sampler.batches() == first  # from (seed, epoch) only: a resumed run draws the same
    sampler.set_epoch(1)
    assert sampler.batches() != first
    small = PoissonBatches(40, 1, seed=0)
    assert any(not b for b in small.batches())  # expected size 1: empty draws happen (e^-1 of them)


@pytest.fixture(scope="module")
def pretrained_body(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT body fine-tuned (without DP) on other sentiment data: DP fine-tuning starts from pretrained
    features, as it does in practice (from a random tiny model the examples' gradients cancel out and any noise
    drowns them)."""
    from helpers import sentiment_rows, write_csv

    out = tmp_path_factory.mktemp("pretrained")
    data = write_csv(out / "other.csv", sentiment_rows(480, seed=1))
    run = lmtune.train(_config(tiny_bert_dir, data, out / "run", batch_size=16), show_progress=False)
    body = out / "body"
    AutoModelForSequenceClassification.from_pretrained(run.model_dir).bert.save_pretrained(body)
    AutoTokenizer.from_pretrained(run.model_dir).save_pretrained(body)
    return body


@pytest.fixture(scope="module")
def dp_runs(pretrained_body: Path, sentiment_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same run (a new head on the pretrained body) without DP, with epsilon 8 and with epsilon 0.5."""
    out = tmp_path_factory.mktemp("dp")
    runs = {}
    for name, extra in (("none", {}), ("eps8", {"privacy": {"epsilon": 8}}), ("eps0.5", {"privacy": {"epsilon": 0.5}})):
        cfg = _config(pretrained_body, sentiment_csv, out / name, learning_rate=1e-2, **extra)
        cfg["method"] = {"name": "freeze"}
        runs[name] = lmtune.train(cfg, show_progress=False)
    return runs


def test_dp_run_spends_its_epsilon_and_reports_it(dp_runs: dict[str, Any]) -> None:
    run = dp_runs["eps8"]
    p = run.metrics["summary"]["privacy"]
    assert p["steps"] == p["planned_steps"] == run.metrics["summary"]["steps"]
    # the planned steps spend the target, from below
    assert 8 - 2 * privacy.EPSILON_TOLERANCE <= p["epsilon"] <= 8 and p["noise_multiplier"] > 0
    assert p["delta"] == pytest.approx(1 / (10 * p["train_examples"])) and p["delta_default"]
    assert p["sample_rate"] == pytest.approx(32 / p["train_examples"])
    rows = [r for r in _jsonl(run.path / "metrics.jsonl") if r["split"] == "train"]
    spent = [r["epsilon"] for r in rows]
    assert spent == sorted(spent) and spent[0] < spent[-1] == pytest.approx(p["epsilon"])
    assert "grad_norm" not in rows[-1]  # lmtune's own clipping does not run on top of DP's
    assert run.metrics["summary"]["precision"] == "fp32"
    for text in ((run.path / "report.md").read_text(), (run.model_dir / "README.md").read_text()):
        assert "differential privacy (DP-SGD, Opacus): epsilon" in text and "Poisson-sampled" in text


def test_dp_trains_and_a_smaller_epsilon_costs_more(dp_runs: dict[str, Any]) -> None:
    """DP trains (its loss falls), and the figures move the right way: less epsilon, more noise, a worse model."""
    for run in dp_runs.values():
        rows = [r for r in _jsonl(run.path / "metrics.jsonl") if r["split"] == "train"]
        assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
        assert run.metrics["test"]["accuracy"] >= 0.9
    noise = {n: r.metrics["summary"]["privacy"]["noise_multiplier"] for n, r in dp_runs.items() if n != "none"}
    assert noise["eps0.5"] > 3 * noise["eps8"]
    loss = {name: run.metrics["test"]["loss"] for name, run in dp_runs.items()}
    # (epsilon 8 adds little noise to a 66-weight head: it lands near the run without DP, on either side)
    assert loss["eps0.5"] > 1.5 * max(loss["none"], loss["eps8"]), loss


def test_empty_poisson_draws_are_noise_only_steps(tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    """batch_size 1: about a third of the draws are empty; each still takes a (noise-only) step and is counted."""
    cfg = _config(tiny_bert_dir, sentiment_csv, tmp_path / "run", batch_size=1, max_steps=12, eval_every=12,
                  privacy={"epsilon": 8})
    cfg["method"] = {"name": "freeze"}
    run = lmtune.train(cfg, show_progress=False)
    p = run.metrics["summary"]["privacy"]
    assert p["steps"] == 12 == run.metrics["summary"]["steps"] and p["expected_batch_size"] == pytest.approx(1.0)


def test_dp_resume_equals_uninterrupted(tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after a checkpoint mid-epoch and resumed: same weights bit for bit (Poisson draws from (seed, epoch),
    noise from the checkpointed RNG), same logged losses and the same spent epsilon (the accountant's history)."""
    def cfg(name: str) -> dict[str, Any]:
        return _config(tiny_bert_dir, sentiment_csv, tmp_path / name, max_steps=16, save_every=6, eval_every=8,
                       keep_checkpoints=5, privacy={"epsilon": 4})

    whole = lmtune.train(cfg("whole"), show_progress=False)
    with crash_after_checkpoint(monkeypatch, 12):
        lmtune.train(cfg("broken"), show_progress=False)
    saved = json.loads((tmp_path / "broken" / "checkpoints" / "step-00000012" / "loop_state.json").read_text())
    assert saved["privacy"]["history"][0][2] == 12  # the accountant's steps so far
    resumed = lmtune.train(cfg("broken"), resume=True, show_progress=False)
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tail = lambda r: [(x["loss"], x["epsilon"]) for x in _jsonl(r.path / "metrics.jsonl")  # noqa: E731
                      if x["split"] == "train" and x["step"] > 12]
    assert tail(whole) == tail(resumed)
    assert resumed.metrics["summary"]["privacy"] == whole.metrics["summary"]["privacy"]


BAD = [
    ({"train": {"privacy": {"epsilon": 0}}}, "train.privacy.epsilon"),
    ({"train": {"privacy": {"epsilon": -1}}}, "train.privacy.epsilon"),
    ({"train": {"privacy": {}}}, "train.privacy.epsilon"),
    ({"train": {"privacy": {"epsilon": 3, "delta": 1}}}, "train.privacy.delta"),
    ({"train": {"privacy": {"epsilon": 3, "max_grad_norm": 0}}}, "train.privacy.max_grad_norm"),
    ({"train": {"privacy": {"epsilon": 3}, "precision": "bf16"}}, "train.precision"),
    ({"train": {"privacy": {"epsilon": 3}, "gradient_accumulation": 2}}, "train.gradient_accumulation"),
    ({"train": {"privacy": {"epsilon": 3}, "group_by_length": True}}, "train.group_by_length"),
    ({"train": {"privacy": {"epsilon": 3}, "max_grad_norm": 1.0}}, "train.privacy.max_grad_norm"),
    ({"train": {"privacy": {"epsilon": 3}}, "baselines": ["bilstm"]}, "leave them out with train.privacy"),
    ({"train": {"privacy": {"epsilon": 3}}, "task": "masked_lm"}, "train.privacy is for task causal_lm, classification"),
    ({"train": {"privacy": {"epsilon": 3}}, "task": "causal_lm"}, "packs unless told not to"),
    ({"train": {"privacy": {"epsilon": 3}}, "task": "sft", "data": {"packing": True}},
     "data.packing puts several records in one row"),
    ({"train": {"privacy": {"epsilon": 3}}, "model": {"name": "minilm", "gradient_checkpointing": True}},
     "model.gradient_checkpointing"),
    ({"train": {"privacy": {"epsilon": 3}}, "model": "baseline:gru"}, "not model.name 'baseline:gru'"),
    ({"train": {"privacy": {"epsilon": 3}}, "method": {"name": "lora", "use_dora": True}}, "method.use_dora"),
]


@pytest.mark.parametrize(("override", "names"), BAD, ids=[n for _, n in BAD])
def test_bad_privacy_settings_fail_naming_the_key(override: dict[str, Any], names: str) -> None:
    raw: dict[str, Any] = {"data": {"train": "x.csv"}}
    for key, value in override.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(raw)


def test_privacy_refuses_several_processes_and_an_unreachable_budget(tiny_bert_dir: Path, sentiment_csv: Path,
                                                                      tmp_path: Path) -> None:
    cfg = load_config(_config(tiny_bert_dir, sentiment_csv, tmp_path / "p", privacy={"epsilon": 3}))
    with pytest.raises(ConfigError, match=r"train\.privacy trains in one process"):
        check_privacy_supported(cfg, 2)
    check_privacy_supported(cfg, 1)
    # RDP cannot certify an epsilon this small at this delta: the error names the key before any step runs
    with pytest.raises(ConfigError, match=r"train\.privacy\.epsilon 0\.05 cannot be reached"):
        lmtune.train(_config(tiny_bert_dir, sentiment_csv, tmp_path / "tiny", privacy={"epsilon": 0.05}),
                     show_progress=False)


def test_importing_opacus_leaves_the_root_logger_alone() -> None:
    """opacus calls logging.basicConfig() on import: its root handler printed every lmtune line twice."""
    import subprocess
    import sys

    code = "import logging, lmtune.workflows.train; print(len(logging.root.handlers))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stderr


# ------------------------------------------------------------------------------------------ decoders
def _token_loss_sum(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of the real tokens (the decoder tasks' loss: a sum of per-record losses)."""
    labels = ids.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_decoder_per_example_gradients_are_each_records_own(tiny_chat_llama_dir: Path, method: str) -> None:
    """A Llama decoder (rotary positions, RMSNorm, tied embeddings), LoRA adapters or every weight: the hooks'
    gradient of record i of a right-padded batch equals the gradient of record i alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    texts = ["the cat sat on the mat", "hello", "my secret code is 123456, keep it", "a b c d"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert tok.padding_side == "right" and int(enc["attention_mask"].sum(1).min()) < enc["input_ids"].shape[1]

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir, attn_implementation="sdpa")
        if method == "lora":
            torch.manual_seed(1)
            m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        return m.train()

    alone = []
    for i in range(len(texts)):
        m = model()
        n = int(enc["attention_mask"][i].sum())
        _token_loss_sum(m, enc["input_ids"][i : i + 1, :n], enc["attention_mask"][i : i + 1, :n]).backward()
        alone.append({name: p.grad.clone() for name, p in m.named_parameters() if p.requires_grad})

    m = model()
    dp = PrivateTraining(load_config({"data": {"train": "x.csv"}, "train": {"privacy": {"epsilon": 8}}}).train.privacy,
                         train_size=400, batch_size=4, seed=0)
    dp.attach(m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]), planned_steps=10)
    _token_loss_sum(m, enc["input_ids"], enc["attention_mask"]).backward()
    dp.before_step(len(texts))
    trainable = [(name, p) for name, p in m.named_parameters() if p.requires_grad]
    assert trainable and alone[0].keys() == {name for name, _ in trainable}
    worst = 0.0
    for name, p in trainable:
        assert p.grad_sample.shape == (len(texts), *p.shape), name
        for i in range(len(texts)):
            worst = max(worst, float((p.grad_sample[i] - alone[i][name]).abs().max()))
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def decoder_dp_runs(tiny_chat_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama trained on short stories holding canaries (2 inserted once, 2 inserted 24 times), one paragraph
    per row, without DP and with epsilon 1 (the memorisation audit of each: test_memorisation.py)."""
    from helpers import story_text

    out = tmp_path_factory.mktemp("dp-decoder")
    text = out / "stories.txt"
    text.write_text(story_text(32, seed=3), encoding="utf-8")
    runs = {}
    for name, extra in (("none", {}), ("eps1", {"privacy": {"epsilon": 1}})):
        cfg = {"task": "causal_lm", "model": str(tiny_chat_llama_dir),
               "data": {"train": str(text), "max_length": 64, "validation_size": 0.25, "test_size": 0.1,
                        "packing": False},
               "train": {"batch_size": 8, "max_steps": 60, "eval_every": 60, "learning_rate": 3e-2,
                         "warmup_ratio": 0.0, "precision": "fp32", "log_every": 5, **extra},
               "evaluate": {"memorisation": {"canaries": 2, "canary_repeats": [1, 24], "canary_digits": 3,
                                             "extraction_prompts": 8, "extraction_prefix_tokens": 8,
                                             "extraction_suffix_tokens": 8}},
               "output_dir": str(out / name)}
        runs[name] = lmtune.train(cfg, show_progress=False)
    return runs


def test_dp_decoder_trains_spends_its_epsilon_and_hides_the_repeated_canary(decoder_dp_runs: dict[str, Any]) -> None:
    """DP-SGD on a causal LM: every weight trains (loss falls), the planned steps spend epsilon 1, and the canary
    the plain run learns (24 copies: near the top of its 1,000 secrets) stays far less exposed under DP, at a
    cost in held-out loss."""
    none, dp = decoder_dp_runs["none"], decoder_dp_runs["eps1"]
    p = dp.metrics["summary"]["privacy"]
    assert p["steps"] == p["planned_steps"] == 60 and 1 - 2 * privacy.EPSILON_TOLERANCE <= p["epsilon"] <= 1
    assert p["train_examples"] == json.loads((dp.path / "data.json").read_text())["train"]["rows"]
    rows = [r for r in _jsonl(dp.path / "metrics.jsonl") if r["split"] == "train"]
    first, last = (sum(r["loss"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    assert last < first - 0.2, [r["loss"] for r in rows]  # from a random model, under heavy noise: it learns slowly

    def exposure(run: Any) -> dict[int, float]:
        return {g["repeats"]: g["mean_exposure"] for g in run.metrics["memorisation"]["tuned"]["exposure"]["by_repeats"]}

    assert exposure(none)[24] > 7.0 and exposure(dp)[24] < exposure(none)[24] - 2.0, (exposure(none), exposure(dp))
    assert dp.metrics["test"]["loss"] > none.metrics["test"]["loss"]  # privacy costs utility
    report = (dp.path / "report.md").read_text()
    assert "differential privacy (DP-SGD, Opacus): epsilon" in report and "## Memorisation audit" in report
