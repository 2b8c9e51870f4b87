"""Neural baselines: each trains on the one loop through ``lmtune.train`` (model: baseline:NAME), saves a
folder plain transformers reloads, predicts the same however a batch is padded; word2vec or pretrained
vectors start the embeddings; listed in ``baselines`` they train beside the fine-tuned model and join
one comparison table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lmtune
from lmtune.errors import ConfigError, DataError
from lmtune.models.neural_baselines import (
    ARCHITECTURES,
    NeuralBaselineConfig,
    NeuralBaselineForSequenceClassification,
)

# Tiny sizes: a run takes a second or two.
TINY = {"embedding_dim": 16, "hidden_size": 16, "conv_filters": 16, "kernel_size": 3, "pool_size": 2, "heads": 2,
        "transformer_layers": 1, "dropout": 0.1}


def _config(train_file: Path, out: Path, model: str, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": "classification",
        "model": model,
        "data": {"train": str(train_file), "max_length": 32},
        "baseline": dict(TINY),
        "train": {"epochs": 4, "batch_size": 16, "learning_rate": 5e-3, "log_every": 5, "precision": "fp32"},
        "output_dir": str(out),
    }
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    return cfg


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(sentiment_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``trained(arch)``: a run of baseline ARCH on the sentiment data, trained once per module."""
    runs: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in runs:
            out = tmp_path_factory.mktemp(f"run-{arch}")
            runs[arch] = lmtune.train(_config(sentiment_csv, out / "run", f"baseline:{arch}"), show_progress=False)
        return runs[arch]

    return get


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_baseline_trains_on_the_loop_and_its_folder_reloads(arch: str, trained: Any) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmtune.models.neural_baselines import build_model

    run = trained(arch)
    m = run.metrics
    assert m["test"]["accuracy"] >= 0.9 and m["starting_point"]["test"]["accuracy"] <= 0.7
    train_rows = [r for r in _jsonl(run.path / "metrics.jsonl") if r["split"] == "train"]
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    # model/ is safetensors + config.json + tokenizer.json; plain transformers loads it (lmtune registered it)
    assert (run.model_dir / "model.safetensors").is_file() and (run.model_dir / "tokenizer.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir)
    assert isinstance(model, NeuralBaselineForSequenceClassification) and model.config.architecture == arch
    assert model.config.id2label == {0: "neg", 1: "pos"}
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    # the weights moved away from the seeded initial model
    fresh, _ = build_model(arch, lmtune.load_config(run.path / "config.yaml").baseline, tok, ["x"], ["neg", "pos"],
                           multi_label=False, max_length=32, seed=42)
    assert fresh.classifier.weight.shape == model.classifier.weight.shape
    assert not torch.allclose(fresh.classifier.weight, model.classifier.weight)
    assert "reload check: max logit difference" in (run.path / "report.md").read_text()
    assert run.predict(["great wonderful brilliant film", "dull awful boring plot"])[0]["label"] == "pos"
    assert [p["label"] for p in run.predict(["dull awful boring plot", "great wonderful superb"])] == ["neg", "pos"]
    meta = json.loads((run.model_dir / "lmtune.json").read_text())
    assert meta["base_model"] == f"baseline:{arch}" and meta["base_model_path"] is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_predictions_do_not_depend_on_padding(arch: str) -> None:
    cfg = NeuralBaselineConfig(architecture=arch, vocab_size=30, embedding_dim=8, hidden_size=8, conv_filters=8,
                               kernel_size=3, pool_size=2, num_heads=2, transformer_layers=1, num_labels=3,
                               max_position_embeddings=32)
    torch.manual_seed(0)
    model = NeuralBaselineForSequenceClassification(cfg).eval()
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14]]
    width = 12  # more padding than any row needs
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits  # (3, 3)
        for i, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r])).logits  # (1, 3), no padding, no mask given
            torch.testing.assert_close(alone[0], batched[i], atol=1e-5, rtol=1e-5)


def test_word2vec_and_pretrained_vectors_start_the_embeddings(sentiment_csv: Path, tmp_path: Path) -> None:
    from helpers import NEGATIVE, POSITIVE

    run = lmtune.train(_config(sentiment_csv, tmp_path / "w2v", "baseline:gru",
                               baseline={"embeddings": "word2vec", "word2vec_epochs": 3}), show_progress=False)
    emb = json.loads((run.model_dir / "lmtune.json").read_text())["embeddings"]
    assert emb["source"].startswith("word2vec cbow") and emb["vocabulary_coverage"] == 1.0
    assert run.metrics["test"]["accuracy"] >= 0.9
    # GloVe-format vectors for the sentiment words only (dim 6, unlike embedding_dim): used as given
    rng = np.random.default_rng(0)
    glove = tmp_path / "glove.txt"
    glove.write_text("".join(f"{w} " + " ".join(f"{x:.3f}" for x in rng.normal(size=6)) + "\n"
                             for w in POSITIVE + NEGATIVE), encoding="utf-8")
    run = lmtune.train(_config(sentiment_csv, tmp_path / "glove", "baseline:bilstm",
                               baseline={"embeddings": str(glove)}), show_progress=False)
    emb = json.loads((run.model_dir / "lmtune.json").read_text())["embeddings"]
    assert emb["source"] == str(glove) and emb["dim"] == 6 and 0 < emb["vocabulary_coverage"] < 1
    assert run.metrics["test"]["accuracy"] >= 0.9


def test_vectors_that_cover_no_training_word_are_a_clear_error(sentiment_csv: Path, tmp_path: Path) -> None:
    other = tmp_path / "german.txt"
    other.write_text("hund 0.1 0.2\nkatze 0.3 0.4\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        lmtune.train(_config(sentiment_csv, tmp_path / "run", "baseline:cnn_lstm", baseline={"embeddings": str(other)}),
                     show_progress=False)
    assert err.value.file == str(other) and "coverage 0.0%" in err.value.message
    assert "none of the" in err.value.message and err.value.field == "baseline.embeddings"


@pytest.mark.parametrize(("changes", "message"), [
    ({"method": {"name": "lora"}}, "method.name lora adapts a pretrained transformer"),
    ({"model": "baseline:cnn"}, "unknown neural baseline"),
    ({"task": "sft"}, "use it with task classification"),
    ({"baseline": {"embeddings": "/no/such/vectors.txt"}}, "neither random, word2vec nor an existing"),
])
def test_impossible_baseline_settings_fail_at_load_time(changes: dict[str, Any], message: str,
                                                        tmp_path: Path) -> None:
    raw = _config(tmp_path / "d.csv", tmp_path / "run", "baseline:gru")
    raw.update({k: v for k, v in changes.items() if not isinstance(v, dict) or k not in raw})
    for k, v in changes.items():
        if isinstance(v, dict) and k in raw:
            raw[k].update(v)
    with pytest.raises(ConfigError, match=message):
        lmtune.load_config(raw)


def test_baseline_models_take_the_baseline_training_defaults(tmp_path: Path) -> None:
    cfg = lmtune.load_config({"model": "baseline:gru", "data": {"train": "x.csv"}})
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.epochs) == (1e-3, 64, 3.0)
    cfg = lmtune.load_config({"model": "baseline:gru", "data": {"train": "x.csv"}, "train": {"learning_rate": 0.01}})
    assert cfg.train.learning_rate == 0.01
    assert lmtune.load_config({"data": {"train": "x.csv"}}).train.learning_rate == 5e-5


def test_run_baselines_refuses_neural_names() -> None:
    from lmtune.evaluate.baselines import is_subrun_baseline, run_baselines

    assert is_subrun_baseline("cnn_lstm") and not is_subrun_baseline("tfidf_logreg")
    with pytest.raises(ConfigError, match=r"sub-runs of lmtune\.train"):
        run_baselines(["gru"], ["a b", "c d"], np.array([0, 1]), {}, ["x", "y"])


def test_neural_baselines_train_beside_the_fine_tuned_model_in_one_table(tiny_bert_dir: Path, sentiment_csv: Path,
                                                                         tmp_path: Path) -> None:
    cfg = _config(sentiment_csv, tmp_path / "run", str(tiny_bert_dir),
                  baseline={"epochs": 4, "batch_size": 16, "learning_rate": 5e-3},
                  train={"epochs": 2, "learning_rate": 2e-3})
    cfg["baselines"] = ["majority", "tfidf_logreg", "cnn_lstm", "transformer"]
    run = lmtune.train(cfg, show_progress=False)
    assert json.loads((run.path / "run.json").read_text())["status"] == "complete"
    baselines = json.loads((run.path / "baselines.json").read_text())
    assert list(baselines) == ["majority", "tfidf_logreg", "cnn_lstm", "transformer"]
    data = json.loads((run.path / "data.json").read_text())
    for name in ("cnn_lstm", "transformer"):
        b = baselines[name]
        assert b["kind"] == "neural" and b["metrics"]["test"]["accuracy"] >= 0.85, b["metrics"]["test"]
        assert b["parameters"] > 0 and b["size_bytes"] > 0 and b["predict_ms_per_example"] > 0
        assert b["train_seconds"] > 0 and b["run"] == f"baselines/{name}"
        sub = run.path / b["run"]
        assert json.loads((sub / "run.json").read_text())["status"] == "complete"
        assert (sub / "model" / "model.safetensors").is_file() and not (sub / "checkpoints").exists()
        # the same split: same examples and label counts per split
        sub_data = json.loads((sub / "data.json").read_text())
        for split in ("train", "validation", "test"):
            assert sub_data[split]["examples"] == data[split]["examples"]
            assert sub_data[split]["label_counts"] == data[split]["label_counts"]
        # its own training settings (baseline.*), not the fine-tuned model's
        assert lmtune.load_config(sub / "config.yaml").train.learning_rate == 5e-3
    for b in baselines.values():
        assert {"parameters", "size_bytes", "predict_ms_per_example", "train_seconds"} <= set(b)
    # one table, sorted by accuracy, best in bold, fine-tuned model and starting point included
    comparison = json.loads((run.path / "comparison.json").read_text())
    names = [r["name"] for r in comparison["rows"]]
    assert len(names) == 6 and names[0] != "baseline: majority"
    assert {"baseline: cnn_lstm", "baseline: transformer", "baseline: tfidf_logreg"} <= set(names)
    assert sum(n.startswith("fine-tuned ") for n in names) == 1 and sum("before fine-tuning" in n for n in names) == 1
    accuracies = [r["metrics"]["accuracy"] for r in comparison["rows"]]
    assert accuracies == sorted(accuracies, reverse=True)
    assert run.metrics["summary"]["predict_ms_per_example"] > 0
    report = (run.path / "report.md").read_text()
    table = report.split("## Results on the test split")[1].split("\n\n")[1]
    lines = table.splitlines()
    assert lines[0].startswith("| model | accuracy | macro F1") and "latency (ms/example)" in lines[0]
    assert "parameters" in lines[0] and "size (MB)" in lines[0] and "train time (s)" in lines[0]
    assert len(lines) == 2 + 6 and f"**{accuracies[0]:.4f}**" in lines[2]
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == names
    assert (run.path / "plots" / "comparison.png").stat().st_size > 1000


def test_cli_predicts_with_a_baseline_run(trained: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import run_cli, write_csv

    run = trained("bilstm")
    sample = write_csv(tmp_path / "in.csv", [{"text": "dull awful boring plot", "label": "neg"},
                                             {"text": "great wonderful brilliant film", "label": "pos"}])
    assert run_cli(["predict", str(run.path), "--input", str(sample), "--output", str(tmp_path / "p.jsonl")],
                   monkeypatch) == 0
    assert [json.loads(x)["label"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == ["neg", "pos"]
    assert run_cli(["eval", str(run.path), "--data", str(sample)], monkeypatch) == 0


@pytest.mark.slow
def test_demo_data_neural_baselines_beat_the_majority_class(tmp_path: Path) -> None:
    """The bundled Rotten Tomatoes reviews (3,000 training snippets): a GRU as the run's model, beside
    the classic baselines and two neural ones as sub-runs; all in one table (about a minute on 2 cores)."""
    root = Path(__file__).resolve().parent.parent
    overrides = {"model": "baseline:gru", "method.name": "full", "data.max_samples": 3000, "train.epochs": 3,
                 "train.learning_rate": 1e-3, "train.batch_size": 64, "train.eval_every": None,
                 "train.head_learning_rate": None, "baseline.epochs": 3, "baseline.embeddings": "random",
                 "baselines": ["majority", "tfidf_logreg", "cnn_lstm", "transformer"],
                 "output_dir": str(tmp_path / "run")}
    run = lmtune.train(root / "lmtune" / "configs" / "demo.yaml", overrides=overrides, show_progress=False)
    baselines = json.loads((run.path / "baselines.json").read_text())
    majority = baselines["majority"]["metrics"]["test"]["accuracy"]
    assert run.metrics["test"]["accuracy"] > majority + 0.05
    for name in ("cnn_lstm", "transformer"):
        assert "error" not in baselines[name], baselines[name].get("error")
        assert baselines[name]["metrics"]["test"]["accuracy"] > majority + 0.05, name
    rows = json.loads((run.path / "comparison.json").read_text())["rows"]
    assert len(rows) == 6 and rows[-1]["name"] in ("baseline: majority", "the same model at random initialisation")


def test_data_inspect_works_for_a_baseline_config(sentiment_csv: Path, tmp_path: Path) -> None:
    from lmtune.workflows.inspect import inspect_data

    report = inspect_data(_config(sentiment_csv, tmp_path / "run", "baseline:cnn_lstm"), examples=1)
    assert report["model_path"] is None and report["splits"]["train"]["examples"] == 384
    assert report["splits"]["train"]["truncated"] == 0
