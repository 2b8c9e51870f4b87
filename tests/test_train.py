"""The training loop end to end on tiny models: it learns, methods differ as they should, and
equivalent settings give equal results (accumulation, resume)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import crash_after_checkpoint
from safetensors.torch import load_file

import lmtune
from lmtune.errors import RunError
from lmtune.training import checkpoint as ckpt
from lmtune.training.loop import TrainingLoop


def _config(model: Path, train_file: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": "classification",
        "model": str(model),
        "data": {"train": str(train_file), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 16, "learning_rate": 2e-3, "log_every": 5, "precision": "fp32"},
        "output_dir": str(out),
    }
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    return cfg


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_full_fine_tuning_learns_and_writes_a_complete_run(tiny_bert_dir: Path, sentiment_csv: Path,
                                                          tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    run = lmtune.train(_config(tiny_bert_dir, sentiment_csv, tmp_path / "run"), show_progress=False)
    m = run.metrics
    # it learned: far above the starting point and chance, and the training loss fell
    assert m["test"]["accuracy"] >= 0.9
    assert m["starting_point"]["test"]["accuracy"] <= 0.7
    train_rows = [r for r in _jsonl(run.path / "metrics.jsonl") if r["split"] == "train"]
    assert train_rows[-1]["loss"] < 0.75 * train_rows[0]["loss"]
    assert {"accuracy", "macro_f1", "loss", "per_class", "confusion_matrix"} <= set(m["test"])
    assert set(m["test"]["per_class"]) == {"neg", "pos"}
    # the report links plots that exist, and shows the baselines
    report = (run.path / "report.md").read_text()
    for png in ("plots/training_curves.png", "plots/confusion_test.png", "plots/comparison.png"):
        assert png in report and (run.path / png).stat().st_size > 1000
    assert "baseline: tfidf_logreg" in report and "baseline: majority" in report
    # model FLOP utilisation (lmtune/training/flops.py): a full fine-tune costs 3x its counted forward
    s = m["summary"]
    assert s["model_flops_per_token"] > 0 and s["matmul_peak_gflops"] > 0 and 0 < s["mfu"] < 1
    assert s["model_gflops_per_second"] == pytest.approx(s["model_flops_per_token"] * s["train_tokens_per_second"] / 1e9)
    assert "model FLOP utilisation" in report
    # model/ is a plain transformers folder with the label map; weights changed from the start
    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    start = load_file(str(tiny_bert_dir / "model.safetensors"))
    after = load_file(str(run.model_dir / "model.safetensors"))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(start[key.removeprefix("bert.")], after[key])
    assert (run.model_dir / "README.md").read_text().startswith("---")
    assert json.loads((run.path / "run.json").read_text())["status"] == "complete"
    # predictions from the Python API agree with the test metrics' direction
    preds = run.predict(["great wonderful brilliant film", "dull awful boring plot"])
    assert [p["label"] for p in preds] == ["pos", "neg"]
    # files in, files out: eval on a labelled file, predict to CSV and JSONL (input order kept)
    from helpers import write_csv

    sample = write_csv(tmp_path / "sample.csv", [{"text": "dull awful boring plot", "label": "neg"},
                                                 {"text": "great wonderful brilliant film", "label": "pos"}])
    assert run.evaluate(sample)["accuracy"] == 1.0
    for name in ("p.csv", "p.jsonl"):
        assert run.predict_file(sample, tmp_path / name, show_progress=False) == 2
    import csv as _csv

    rows = list(_csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["label"] for r in rows] == ["neg", "pos"] and float(rows[0]["prob_neg"]) > 0.5
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [x["label"] for x in lines] == ["neg", "pos"] and lines[1]["text"] == "great wonderful brilliant film"
    assert run.evaluate()["test"]["accuracy"] == pytest.approx(m["test"]["accuracy"])


@pytest.mark.parametrize(
    ("method", "check"),
    [
        ("freeze", lambda names: names and all("classifier" in n for n in names)),
        ("lora", lambda names: any("lora_" in n for n in names) and any("classifier" in n for n in names)
         and not any("lora_" not in n and "classifier" not in n for n in names)),
    ],
)
def test_methods_train_what_they_should(method: str, check: Any, tiny_bert_dir: Path, sentiment_csv: Path,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[str]] = {}
    original = TrainingLoop.setup

    def spy(self: TrainingLoop) -> None:
        seen["trainable"] = [n for n, p in self.model.named_parameters() if p.requires_grad]
        original(self)

    monkeypatch.setattr(TrainingLoop, "setup", spy)
    cfg = _config(tiny_bert_dir, sentiment_csv, tmp_path / "run", method={"name": method})
    cfg["train"]["learning_rate"] = 5e-3
    run = lmtune.train(cfg, show_progress=False)
    assert check(seen["trainable"])
    rows = [r for r in _jsonl(run.path / "metrics.jsonl") if r["split"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    if method == "lora":
        from transformers import AutoModelForSequenceClassification

        assert (run.path / "adapter" / "adapter_config.json").is_file()
        # merged into a plain model: no peft needed to load it, and no lora weights left
        merged = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert run.metrics["summary"]["trainable_fraction"] < 0.5


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def test_accumulation_equals_bigger_batch(tiny_bert_nodrop_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    """batch 8 x accumulation 1 == batch 4 x accumulation 2 (no dropout, same example order)."""
    runs = []
    for bs, acc in ((8, 1), (4, 2)):
        cfg = _config(tiny_bert_nodrop_dir, sentiment_csv, tmp_path / f"b{bs}a{acc}",
                      train={"batch_size": bs, "gradient_accumulation": acc, "max_steps": 12, "group_by_length": False,
                             "eval_every": 100, "learning_rate": 1e-3})
        cfg["baselines"] = []
        runs.append(lmtune.train(cfg, show_progress=False))
    a, b = (_final_weights(r.path) for r in runs)
    _assert_same_weights(a, b, atol=2e-6)
    # and the weights did move: the invariant is not vacuous
    assert runs[0].metrics["summary"]["steps"] == 12


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_equals_uninterrupted(method: str, tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill after a checkpoint mid-epoch, resume: bit-identical weights to the uninterrupted run (dropout on)."""
    # 12 steps per epoch: the crash at step 14 lands inside the second epoch, so the resumed run
    # must rebuild that epoch's shuffled, length-grouped order and skip its first two batches.
    train = {"max_steps": 20, "save_every": 7, "eval_every": 10, "batch_size": 32, "keep_checkpoints": 5}

    def cfg(name: str) -> dict[str, Any]:
        c = _config(tiny_bert_dir, sentiment_csv, tmp_path / name, train=train, method={"name": method})
        c["baselines"] = []
        return c

    whole = lmtune.train(cfg("whole"), show_progress=False)

    with crash_after_checkpoint(monkeypatch, 14):
        lmtune.train(cfg("broken"), show_progress=False)
    assert json.loads((tmp_path / "broken" / "run.json").read_text())["status"] == "failed"
    resumed = lmtune.train(cfg("broken"), resume=True, show_progress=False)
    assert resumed.metrics["summary"]["steps"] == 20
    _assert_same_weights(_final_weights(whole.path), _final_weights(resumed.path), atol=0.0)
    # the logged training losses after the resume point match the uninterrupted ones exactly
    tail = lambda p: [r["loss"] for r in _jsonl(p / "metrics.jsonl") if r["split"] == "train" and r["step"] > 14]  # noqa: E731
    assert tail(whole.path) == tail(resumed.path)


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_checkpoints_leave_out_frozen_weights_and_check_them_on_resume(
        method: str, tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA/freeze checkpoint holds only what trains (plus buffers); resume rebuilds the rest from the base
    model and refuses a base model that changed since."""
    import shutil

    from safetensors import safe_open

    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    cfg = _config(base, sentiment_csv, tmp_path / "run", method={"name": method},
                  train={"max_steps": 10, "save_every": 4, "eval_every": 4, "batch_size": 32, "keep_checkpoints": 5})
    cfg["baselines"] = []

    with crash_after_checkpoint(monkeypatch, 8):
        lmtune.train(cfg, show_progress=False)

    step8 = tmp_path / "run" / "checkpoints" / "step-00000008"
    left_out = json.loads((step8 / ckpt.FROZEN_FILE).read_text())["left_out"]
    with safe_open(str(step8 / ckpt.MODEL_FILE), framework="pt") as f:
        saved = set(f.keys())
    full = load_file(str(base / "model.safetensors"))
    assert left_out and not saved & set(left_out)
    # most of the model is frozen: the checkpoint's weights are a fraction of the base model's
    assert (step8 / ckpt.MODEL_FILE).stat().st_size < 0.5 * (base / "model.safetensors").stat().st_size
    if method == "lora":
        assert any("lora_A" in k for k in saved) and not any("lora" in k for k in left_out)

    # a base model changed since the checkpoint: resume names the weight and refuses
    tampered = dict(full)
    key = next(k for k in tampered if "encoder.layer.0.attention.self.query.weight" in k)
    tampered[key] = tampered[key] + 0.01
    from safetensors.torch import save_file
    save_file(tampered, str(base / "model.safetensors"))
    with pytest.raises(RunError, match=r"now differ.*query"):
        lmtune.train(cfg, resume=True, show_progress=False)

    save_file(full, str(base / "model.safetensors"))  # the original again: the run resumes and finishes
    resumed = lmtune.train(cfg, resume=True, show_progress=False)
    assert resumed.metrics["summary"]["steps"] == 10


def test_multi_label_text_pairs_and_integer_labels(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import random

    from helpers import FILLER, write_csv

    rng = random.Random(0)
    rows = []
    for i in range(480):
        words = rng.sample(FILLER, rng.randint(3, 8))
        tags = []
        if i % 2:
            words += ["superb", "superb"]
            tags.append("pos")
        if i % 3 == 0:
            words += ["music", "music"]
            tags.append("music")
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "tags": ";".join(tags), "pair": "context", "stars": i % 2})
    data = write_csv(tmp_path / "ml.csv", rows)
    cfg = _config(tiny_bert_dir, data, tmp_path / "ml", data={"label_column": "tags", "label_delimiter": ";",
                                                             "text_pair_column": "pair"},
                  train={"epochs": 6, "learning_rate": 2e-3})
    cfg["baselines"] = ["majority"]
    run = lmtune.train(cfg, show_progress=False)
    assert run.meta["multi_label"] and run.meta["labels"] == ["music", "pos"]
    # it learns (a tiny random model picks up one cue word faster than the other, so the bar is modest) ...
    start = run.metrics["starting_point"]["test"]
    assert run.metrics["test"]["micro_f1"] >= max(0.6, start["micro_f1"] + 0.1)
    assert run.metrics["test"]["hamming_loss"] < start["hamming_loss"]
    # ... and the saved model, read back by the predictor, scores exactly what training's evaluation said
    again = run.evaluate()["test"]
    for key in ("accuracy", "micro_f1", "macro_f1", "hamming_loss"):
        assert again[key] == pytest.approx(run.metrics["test"][key], abs=1e-9)
    out = run.predict(["the film music was superb and its music superb", "the plot was"], ["context", "context"])
    assert all(isinstance(o["labels"], list) and set(o["probabilities"]) == {"music", "pos"} for o in out)
    # integer labels become a label set in numeric order
    cfg2 = _config(tiny_bert_dir, data, tmp_path / "int", data={"label_column": "stars"}, train={"epochs": 1})
    cfg2["baselines"] = []
    run2 = lmtune.train(cfg2, show_progress=False)
    assert run2.meta["labels"] == ["0", "1"]


def test_early_stopping_and_tensorboard(tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    """Patience counts evaluations without improvement; metrics also reach TensorBoard."""
    # "higher validation loss is better" while training lowers it: no evaluation after the first improves.
    cfg = _config(tiny_bert_dir, sentiment_csv, tmp_path / "es",
                  train={"max_steps": 40, "eval_every": 4, "metric": "loss", "greater_is_better": True,
                         "early_stopping_patience": 2, "trackers": ["tensorboard"]})
    cfg["baselines"] = []
    run = lmtune.train(cfg, show_progress=False)
    summary = run.metrics["summary"]
    evals = [r for r in _jsonl(run.path / "metrics.jsonl") if r["split"] == "validation"]
    # replay the rule on the logged validation losses: stop at the 2nd evaluation in a row without a new maximum
    best, misses, stop_at, best_at = None, 0, None, None
    for r in evals:
        if best is None or r["loss"] > best:
            best, misses, best_at = r["loss"], 0, r["step"]
        else:
            misses += 1
            if misses == 2:
                stop_at = r["step"]
                break
    assert stop_at is not None and stop_at < 40
    assert summary["stopped_early"] and summary["steps"] == stop_at == evals[-1]["step"]
    assert summary["best_step"] == best_at
    assert list(run.path.rglob("events.out.tfevents.*"))
