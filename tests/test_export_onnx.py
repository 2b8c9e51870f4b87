"""``lmtune export RUN --format onnx``: the graph's logits equal PyTorch's (onnxruntime), on batch sizes and
lengths the export never saw; a failed check leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import run_cli, sentiment_rows, write_csv
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lmtune
from lmtune.errors import RunError
from lmtune.models import export_onnx as onnx_export
from lmtune.workflows.export import export_onnx


@pytest.fixture(scope="module")
def clf_run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("onnx-clf")
    data = write_csv(root / "s.csv", sentiment_rows(200))
    cfg = {"task": "classification", "model": str(tiny_bert_dir), "baselines": [],
           "data": {"train": str(data), "max_length": 32},
           "train": {"max_steps": 6, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32"},
           "output_dir": str(root / "run")}
    return lmtune.train(cfg, show_progress=False).path


def test_onnx_export_cli_logits_equal_pytorch_on_unseen_shapes(
    clf_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "onnx"
    assert run_cli(["export", str(clf_run_dir), "--format", "onnx", "-o", str(out)], monkeypatch) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "model.onnx" in printed and "max logit difference vs PyTorch" in printed
    assert {"model.onnx", "tokenizer.json", "config.json", "export.json", "lmtune.json"} <= {p.name for p in out.iterdir()}
    facts = json.loads((out / "export.json").read_text())
    assert facts["format"] == "onnx" and facts["max_abs_logit_diff"] <= 1e-5
    assert facts["tolerance"] == onnx_export.DEFAULT_TOLERANCE and facts["batch_sizes"] == [1, 3, 6]
    assert facts["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    # the graph runs on its own: tokenizer from the folder, labels from config.json, shapes never exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == facts["inputs"]
    reference = AutoModelForSequenceClassification.from_pretrained(clf_run_dir / "model").eval()
    for texts in (["a"], ["great " * 25 + "film", "dull", "the plot was boring and the acting awful", "ok", "x y",
                          "warm", "superb charming delightful"]):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            expected = reference(**enc).logits.numpy()  # (B, 2)
        got = session.run(["logits"], {k: v.numpy() for k, v in enc.items()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5
    assert not list(tmp_path.glob(".*"))  # no temporary folder left
    # a second export needs --overwrite (checked before anything is exported); unknown formats are named
    assert run_cli(["export", str(clf_run_dir), "--format", "onnx", "-o", str(out)], monkeypatch) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(["export", str(clf_run_dir), "--format", "tflite", "-o", str(out)], monkeypatch) == 2
    assert "available formats: merged, onnx" in capsys.readouterr().err


def test_failed_onnx_check_leaves_nothing(clf_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that computes something else (simulated: weights perturbed before exporting) is not exported."""
    real_write = onnx_export._write_onnx

    def faulty_write(wrapper: torch.nn.Module, *args: object) -> int:
        import copy

        broken = copy.deepcopy(wrapper)
        with torch.no_grad():
            next(p for n, p in broken.named_parameters() if "classifier.weight" in n).add_(0.5)
        return real_write(broken, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_export, "_write_onnx", faulty_write)
    with pytest.raises(RunError, match=r"differ by .* more than the tolerance"):
        export_onnx(clf_run_dir, tmp_path / "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_minilm_classifier_onnx_export_is_within_tolerance(tmp_path: Path) -> None:
    """The bundled MiniLM fine-tuned briefly on the bundled reviews: the real model's graph (fused attention
    and layer norm in onnxruntime) still matches PyTorch far inside the default tolerance."""
    demo = Path(__file__).parents[1] / "lmtune" / "configs" / "demo.yaml"
    run = lmtune.train(demo, overrides={
        "output_dir": str(tmp_path / "run"), "data.max_samples": 400, "train.max_steps": 4, "baselines": []},
        show_progress=False)
    result = export_onnx(run.path, tmp_path / "onnx")
    print(f"MiniLM ONNX max abs logit difference: {result.max_abs_logit_diff:.2e}")
    assert result.max_abs_logit_diff <= 1e-5
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "onnx")
    texts = ["A gripping, beautifully shot film.", "A tedious, lifeless mess that goes nowhere at all, sadly."]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    logits = session.run(["logits"], {k: enc[k] for k in result.inputs})[0]
    expected = [p["label"] for p in run.predict(texts)]
    labels = json.loads((tmp_path / "onnx" / "config.json").read_text())["id2label"]
    assert [labels[str(i)] for i in logits.argmax(-1)] == expected
