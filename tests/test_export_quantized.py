"""``lmtune export --quantize``: int8 ONNX (encoders) and torchao weight-only int8/int4 (decoders), each scored
against its float32 export on the run's test split; ``--max-drop`` refuses an export that loses more, leaving
nothing behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.config.tasks import TASK_INFOS
from lmtune.errors import RunError
from lmtune.workflows.export_quantized import export_quantized
from lmtune.workflows.run import Run


def _export_json(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "export.json").read_text(encoding="utf-8"))


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_onnx_int8_export_reports_quality_size_and_latency(
    serve_classifier_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    code = run_cli(["export", str(serve_classifier_run.path), "--format", "onnx", "--quantize", "int8",
                    "--max-drop", "0.05", "-o", str(out)], monkeypatch)
    printed = " ".join(capsys.readouterr().out.split())
    assert code == 0, printed
    assert "accuracy" in printed and "weights on disk" in printed and "latency per example" in printed
    assert "--max-drop 0.05: passed" in printed
    facts = _export_json(out)
    quality = facts["quality"]
    assert facts["format"] == "onnx" and facts["dtype"] == "int8" and quality["metric"] == "accuracy"
    assert quality["split"] == "test" and quality["greater_is_better"] is True
    # the tiny classifier learned its task; int8 keeps it (the gate held at 0.05)
    assert quality["float32"] >= 0.9, quality
    assert quality["drop"] == pytest.approx(quality["float32"] - quality["int8"]) and quality["drop"] <= 0.05
    sizes, latency = facts["size_bytes"], facts["latency_ms"]
    assert 0 < sizes["int8"] < sizes["float32"]
    assert sizes["ratio"] == pytest.approx(sizes["int8"] / sizes["float32"])
    assert latency["float32"] > 0 and latency["int8"] > 0 and latency["examples"] > 0
    assert facts["float32_export"]["max_abs_logit_diff"] <= 1e-4  # the float32 graph was checked first
    assert {"model.onnx", "tokenizer.json", "config.json", "export.json", "lmtune.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "lmtune.json").read_text())["exported"]["quantization"]["weights"] == "int8"
    # the graph really holds int8 weights and integer matmuls, and answers like the run's model
    graph = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops, ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.graph.initializer)
    tokenizer = AutoTokenizer.from_pretrained(out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    texts = ["a wonderful, charming film", "dull and tedious acting", "the plot was brilliant", "awful and bland"]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    logits = session.run(["logits"], {i.name: enc[i.name] for i in session.get_inputs()})[0]
    labels = json.loads((out / "config.json").read_text())["id2label"]
    assert [labels[str(i)] for i in np.argmax(logits, -1)] == [p["label"] for p in serve_classifier_run.predict(texts)]
    _no_leftovers(tmp_path)


def test_max_drop_refuses_and_leaves_nothing(serve_sft_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A bound no model can meet (the test loss would have to fall by a whole nat): refused, with the numbers."""
    out = tmp_path / "int8"
    code = run_cli(["export", str(serve_sft_run.path), "--format", "quantized", "--quantize", "int8",
                    "--max-drop", "-1", "-o", str(out)], monkeypatch)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "more than --max-drop -1" in err and "loss on the test split" in err and "nothing was exported" in err
    assert "float32 ->" in err
    assert not out.exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_decoder_weight_only_export_gates_and_reloads(serve_sft_run: Run, tmp_path: Path,
                                                      quantization: str) -> None:
    """A LoRA sft run: merged, quantized by torchao, saved as safetensors; the folder reloads quantized with
    plain transformers and answers through lmtune; its loss is scored against the float32 merge."""
    out = tmp_path / quantization
    result = export_quantized(serve_sft_run.path, out, format="quantized", quantization=quantization,
                              max_drop=0.5)
    assert result.metric == "loss" and result.greater_is_better is False and result.split == "test"
    assert result.drop == pytest.approx(result.after - result.before)  # loss: higher is worse
    assert abs(result.drop) <= 0.5 and result.after > 0
    assert 0 < result.bytes_after < result.bytes_before
    facts = _export_json(out)
    assert facts["quality"][quantization] == pytest.approx(result.after)
    assert facts["quantization"]["library"].startswith("torchao ")
    assert facts["float32_export"]["format"] == "merged" and facts["float32_export"]["max_abs_logit_diff"] <= 1e-3
    # safetensors only, with the quantization recorded for from_pretrained
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor")
    assert type(model.lm_head.weight).__name__ == "Parameter"  # the head stays float32
    # lmtune uses the exported folder as a model folder: generation and chat answer
    exported = Run.load(out)
    answers = exported.generate(["Capital of France?"], max_new_tokens=4)
    assert answers[0]["completion_tokens"] > 0
    _no_leftovers(tmp_path)


def test_bad_quantized_exports_are_refused(serve_classifier_run: Run, serve_sft_run: Run, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    clf, sft, out = str(serve_classifier_run.path), str(serve_sft_run.path), str(tmp_path / "x")
    cases = [
        (["export", clf, "--format", "onnx", "--quantize", "int3", "-o", out],
         "unknown quantization 'int3' for --format onnx; available: int8"),
        (["export", sft, "--format", "quantized", "--quantize", "fp4", "-o", out],
         "unknown quantization 'fp4' for --format quantized; available: int8, int4"),
        # the task declares which formats apply (TaskInfo.exports)
        (["export", clf, "--format", "quantized", "--quantize", "int8", "-o", out],
         "'quantized' export is not implemented for 'classification' models"),
        (["export", sft, "--format", "onnx", "--quantize", "int8", "-o", out],
         "'onnx' export is not implemented for 'sft' models"),
        (["export", clf, "--format", "merged", "--quantize", "int8", "-o", out],
         "--quantize applies to the formats onnx, quantized, not 'merged'"),
        (["export", sft, "--format", "quantized", "-o", out], "--format quantized needs --quantize"),
        (["export", clf, "--format", "onnx", "--max-drop", "0.01", "-o", out], "--max-drop needs --quantize"),
        (["export", clf, "--format", "onnx", "--quantize", "int8", "--tolerance", "1e-3", "-o", out],
         "--tolerance applies to float32 exports"),
    ]
    for args, message in cases:
        assert run_cli(args, monkeypatch) == 2, args
        err = " ".join(capsys.readouterr().err.split())
        assert message in err, (args, err)
    assert "quantized" in TASK_INFOS["sft"].exports and "quantized" not in TASK_INFOS["classification"].exports
    with pytest.raises(RunError, match="finite"):
        export_quantized(clf, out, format="onnx", quantization="int8", max_drop=float("nan"))
    assert not list(tmp_path.iterdir())
