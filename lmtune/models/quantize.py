"""Quantize an exported model, and the measurements a quality gate compares: bytes on disk and latency.

Two kinds of quantized export, each written from a checked float32 export:

- ONNX int8 (``quantize_onnx``): onnxruntime's dynamic quantization of ``model.onnx``: the MatMul/Gemm weights
  become int8 (per output channel), activations are quantized on the fly at run time; any onnxruntime runs it.
- Weight-only int8/int4 (``write_weight_quantized``) through torchao, for transformers folders: each
  ``nn.Linear`` weight of the blocks becomes an integer tensor with float scales (int8: one scale per
  row; int4: one per group of :data:`INT4_GROUP_SIZE` weights); activations stay float32. transformers
  saves the torchao tensors as safetensors (their layout in the file's metadata, read back through
  torchao's allow-list, no pickle) and records ``quantization_config`` in ``config.json``, so
  ``from_pretrained`` (and every lmtune verb) loads the folder quantized again. The embeddings and the
  output head stay float32 (torchao's default: quantizing them costs more quality than the blocks).
  On a CPU torchao 0.18 keeps int4 values one per byte (``IntxUnpackedToInt8Tensor``; its packed int4
  layouts need CUDA or Arm kernels): int4 files are no smaller than int8 ones.

:class:`OnnxModel` runs a graph as a torch module returning ``.logits``, so a task's own evaluation
scores the ONNX model exactly as it scores the PyTorch one.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
from torchao.quantization.granularity import PerGroup
from transformers import TorchAoConfig
from transformers.modeling_outputs import ModelOutput

from lmtune.errors import RunError
from lmtune.models.loading import load_saved_model

# The quantizations each quantized format offers (``lmtune export --format F --quantize Q``).
ONNX_QUANTIZATIONS = ("int8",)
WEIGHT_QUANTIZATIONS = ("int8", "int4")
# int4 weights share one scale per group of this many input features: torchao's default (128) leaves a
# hidden size of 576 (SmolLM2-135M) unquantized in part; 32 divides every hidden size lmtune trains.
INT4_GROUP_SIZE = 32
# Latency: each input is timed REPEATS times after WARMUP untimed calls of the first one; the median of all
# timings is reported (one slow call, a page fault or another process, does not move it).
WARMUP = 2
REPEATS = 3
# The files that hold a model's weights, for its size on disk (configs and tokenizers are the same in both).
WEIGHT_FILES = ("*.safetensors", "*.onnx", "*.onnx.data", "*.gguf")


def quantize_onnx(source: Path, target: Path, quantization: str) -> None:
    """Write ``source`` (a float32 ONNX graph) as ``target`` with int8 weights (onnxruntime dynamic
    quantization: weights per output channel, signed; activations quantized at run time)."""
    if quantization not in ONNX_QUANTIZATIONS:
        raise RunError(f"unknown ONNX quantization '{quantization}'; available: {', '.join(ONNX_QUANTIZATIONS)}")
    model = onnx.load(str(source))
    # The exporter annotates intermediate values with shapes (value_info) that onnx's shape inference, which the
    # quantizer runs first, finds inconsistent; they are optional hints, so they go and are inferred again.
    del model.graph.value_info[:]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing": its optimizer fusions are for image models
    try:
        # Per channel: one scale per output unit instead of one per matrix, so a single outlier weight does
        # not coarsen every weight of its matrix.
        quantize_dynamic(model, target, per_channel=True, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def weight_only_config(quantization: str) -> TorchAoConfig:
    """The transformers ``TorchAoConfig`` of a weight-only quantization (``int8`` or ``int4``)."""
    if quantization not in WEIGHT_QUANTIZATIONS:
        raise RunError(f"unknown weight quantization '{quantization}'; available: {', '.join(WEIGHT_QUANTIZATIONS)}")
    if quantization == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4,  # type: ignore[attr-defined]  # not in torch's stubs
                                             granularity=PerGroup(INT4_GROUP_SIZE)))


def write_weight_quantized(source: Path, target: Path, quantization: str, model_class: Any) -> None:
    """Load the float32 transformers folder ``source`` with ``model_class``, quantize its linear weights
    (``int8``/``int4``, see the module docstring) and save it, with every other file of ``source``
    (tokenizer, generation config, model card), to the new folder ``target`` as safetensors."""
    config = weight_only_config(quantization)
    model = load_saved_model(model_class, source, error="cannot load the model to quantize", dtype=torch.float32,
                             quantization_config=config)
    target.mkdir(parents=True)
    model.save_pretrained(target, safe_serialization=True)
    written = {p.name for p in target.iterdir()}
    for path in source.iterdir():
        if path.is_file() and path.name not in written and not path.name.endswith(".safetensors") \
                and path.name != "model.safetensors.index.json":
            shutil.copyfile(path, target / path.name)


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files in ``folder`` (safetensors, ONNX, GGUF)."""
    return sum(p.stat().st_size for pattern in WEIGHT_FILES for p in folder.glob(pattern) if p.is_file())


def median_latency_ms(call: Callable[[Any], Any], inputs: Sequence[Any]) -> float:
    """Median wall time (milliseconds) of ``call(x)`` over ``inputs``, each timed :data:`REPEATS` times after
    :data:`WARMUP` untimed calls (allocations, lazy kernel choice and caches happen then)."""
    if not inputs:
        raise RunError("latency needs at least one input")
    timings = []
    with torch.inference_mode():
        for _ in range(WARMUP):
            call(inputs[0])
        for x in inputs:
            for _ in range(REPEATS):
                start = time.perf_counter()
                call(x)
                timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


class OnnxModel(torch.nn.Module):
    """An ONNX graph (tokenizer tensors in, ``logits`` out: what ``lmtune export --format onnx`` writes) run
    in onnxruntime on the CPU behind the call of a transformers model: ``model(**inputs).logits``.

    Inputs the graph does not take are dropped; ``token_type_ids`` it takes but is not given are zeros.
    """

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        super().__init__()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **inputs: torch.Tensor) -> ModelOutput:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        feed = {}
        for name in self.input_names:
            value = given.get(name)
            if value is None:
                value = torch.ones_like(input_ids) if name == "attention_mask" else torch.zeros_like(input_ids)
            feed[name] = value.detach().cpu().numpy()
        logits = self.session.run(["logits"], feed)[0]
        return ModelOutput(logits=torch.from_numpy(logits))
