"""``lmtune export RUN --format onnx|quantized --quantize Q [--max-drop X]``: a smaller model, and what it costs.

The quantized model is made from the checked float32 export of the same format (``--format onnx``: the ONNX
graph, quantized by onnxruntime to int8; ``--format quantized``: the merged transformers folder, its linear
weights quantized by torchao to int8 or int4; see :mod:`lmtune.models.quantize`). Both models, float32 and
quantized, are then scored by the run's own task on the run's test split (the validation split when there
is no test split), exactly as ``lmtune eval`` scores a model (:meth:`Run.evaluation_data`), on the run's
main metric (``train.metric``, else the task's ``TaskInfo.default_metric``). The export reports the metric
before and after and the drop (positive: worse, in the metric's units, whatever its direction), the weight
files' bytes on disk and the median per-example latency (one example per call: the task's forward pass,
``Task.logits``, on the same first examples of the split) of each. With ``max_drop`` an export that loses
more is refused and nothing is written. A format applies to a task whose ``TaskInfo.exports`` lists it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.config.tasks import TASK_INFOS
from lmtune.errors import RunError
from lmtune.models import export as merged_export
from lmtune.models.export_onnx import ONNX_FILE, export_onnx_folder
from lmtune.models.quantize import (
    INT4_GROUP_SIZE,
    ONNX_QUANTIZATIONS,
    WEIGHT_QUANTIZATIONS,
    OnnxModel,
    median_latency_ms,
    quantize_onnx,
    weight_bytes,
    write_weight_quantized,
)
from lmtune.workflows.export import auto_class, load_task_model_code
from lmtune.workflows.run import EvaluationData, Run

log = logging.getLogger("lmtune")

# The quantizations of each format that can quantize; the format must be in the task's TaskInfo.exports.
QUANTIZATIONS = {"onnx": ONNX_QUANTIZATIONS, "quantized": WEIGHT_QUANTIZATIONS}
# How many examples of the split are timed, one per call (each REPEATS times; see models.quantize).
LATENCY_EXAMPLES = 32


@dataclass
class QuantizedExportResult:
    """What a quantized export wrote and what it gave up and gained against its float32 export."""

    folder: Path
    format: str
    quantization: str
    metric: str
    greater_is_better: bool
    split: str
    before: float  # the float32 export's metric on the split
    after: float  # the quantized model's
    drop: float  # how much worse (positive) or better (negative) the quantized model is, in the metric's units
    max_drop: float | None
    bytes_before: int  # weight files on disk
    bytes_after: int
    latency_ms_before: float  # median per example
    latency_ms_after: float
    latency_examples: int

    @property
    def size_ratio(self) -> float:
        """Quantized bytes over float32 bytes (0.27: 73% smaller)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else math.nan

    @property
    def speedup(self) -> float:
        """Float32 latency over quantized latency (2.0: twice as fast)."""
        return self.latency_ms_before / self.latency_ms_after if self.latency_ms_after else math.nan


def export_quantized(run_dir: str | Path, output: str | Path, *, format: str, quantization: str,
                     max_drop: float | None = None, overwrite: bool = False) -> QuantizedExportResult:
    """Write ``run_dir``'s model at ``output`` quantized (``format`` onnx: ``quantization`` int8; ``format``
    quantized: int8 or int4 weight-only), with its quality, size and latency against the float32 export of
    the same format in ``export.json``. With ``max_drop``, a drop of the run's main metric beyond it is a
    RunError with the numbers, and nothing is written at ``output``."""
    run = Run.load(run_dir)
    info = TASK_INFOS.get(str(run.meta.get("task")))
    if format not in QUANTIZATIONS:
        raise RunError(f"--quantize applies to the formats {', '.join(QUANTIZATIONS)}, not '{format}'",
                       hint="`--format onnx --quantize int8` (encoders) or `--format quantized --quantize int8` "
                       "(decoders)")
    if quantization not in QUANTIZATIONS[format]:
        raise RunError(f"unknown quantization '{quantization}' for --format {format}; available: "
                       f"{', '.join(QUANTIZATIONS[format])}")
    if info is None or format not in info.exports:
        exporting = sorted(name for name, i in TASK_INFOS.items() if format in i.exports)
        raise RunError(f"'{format}' export is not implemented for '{run.meta.get('task')}' models, only for "
                       f"{', '.join(exporting)}",
                       hint="formats this task exports: " + ", ".join(info.exports if info else ("merged",)))
    if max_drop is not None and not math.isfinite(max_drop):
        raise RunError(f"--max-drop must be a finite number, not {max_drop}")
    if not (run.path / "config.yaml").is_file():
        raise RunError("the quality check scores the model on its run's test split, and a bare model folder has "
                       "none", file=run.path, hint="quantize from the run folder the model was trained in")
    output = Path(output).expanduser().resolve()
    merged_export.check_output_folder(output, run.path.resolve(), [run.model_dir.resolve()], overwrite=overwrite)
    load_task_model_code(run.meta)
    model_class = merged_export.auto_model_class(auto_class(run.meta, info))

    evaluation = run.evaluation_data()
    split = next((s for s in ("test", "validation") if evaluation.has(s)), None)
    if split is None:
        raise RunError("the run has neither a test nor a validation split to check the quantized model on",
                       file=run.path)
    metric, greater = evaluation.config.train.resolved_metric(info.default_metric)

    reference = output.parent / f".{output.name}.float32"
    tmp = output.parent / f".{output.name}.tmp"
    for leftover in (reference, tmp):  # left by an export that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        if format == "onnx":
            export_onnx_folder(run.path, run.model_dir, run.meta, reference, auto_class=auto_class(run.meta, info))
            shutil.copytree(reference, tmp, ignore=shutil.ignore_patterns(ONNX_FILE))
            quantize_onnx(reference / ONNX_FILE, tmp / ONNX_FILE, quantization)
            models = [OnnxModel(reference / ONNX_FILE), OnnxModel(tmp / ONNX_FILE)]
        else:
            merged_export.export_merged_folder(run.path, run.model_dir, run.meta, reference,
                                               auto_class=auto_class(run.meta, info))
            write_weight_quantized(reference, tmp, quantization, model_class)
            # The quantized model as any user will load it: from the written folder.
            models = [merged_export.load_model(model_class, folder) for folder in (reference, tmp)]
        scores = [_score(evaluation, model, split, metric) for model in models]
        timed = _latency_inputs(evaluation, split)
        latency = [median_latency_ms(functools.partial(evaluation.task.logits, model), timed) for model in models]
        drop = (scores[0] - scores[1]) if greater else (scores[1] - scores[0])
        result = QuantizedExportResult(
            folder=output, format=format, quantization=quantization, metric=metric, greater_is_better=greater,
            split=split, before=scores[0], after=scores[1], drop=drop, max_drop=max_drop,
            bytes_before=weight_bytes(reference), bytes_after=weight_bytes(tmp), latency_ms_before=latency[0],
            latency_ms_after=latency[1], latency_examples=len(timed))
        if max_drop is not None and not drop <= max_drop:  # NaN fails too
            raise RunError(f"quantizing to {quantization} costs {drop:+.4g} {metric} on the {split} split "
                           f"({scores[0]:.4g} float32 -> {scores[1]:.4g} {quantization}), more than --max-drop "
                           f"{max_drop:g}; nothing was exported",
                           hint="keep the float32 export, or accept the loss with a larger --max-drop")
        facts = _facts(result, _read_json(reference / merged_export.EXPORT_FILE))
        meta = _read_json(reference / "lmtune.json")
        merged_export.finish_export(tmp, output, meta, facts, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(reference, ignore_errors=True)
    log.info("exported %s to %s (%s %s): %s %.4g -> %.4g on %s, %d -> %d bytes, %.2f -> %.2f ms per example",
             run.path, output, format, quantization, metric, result.before, result.after, split,
             result.bytes_before, result.bytes_after, result.latency_ms_before, result.latency_ms_after)
    return result


def _score(evaluation: EvaluationData, model: Any, split: str, metric: str) -> float:
    """The model's ``metric`` on ``split`` by the task's own evaluation."""
    metrics = evaluation.evaluate(model, split)
    value = metrics.get(metric)
    if not isinstance(value, (int, float)):
        raise RunError(f"the task's evaluation gives no '{metric}' to compare (it gives "
                       f"{', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))})",
                       field="train.metric")
    return float(value)


def _latency_inputs(evaluation: EvaluationData, split: str) -> list[dict[str, Any]]:
    """The first :data:`LATENCY_EXAMPLES` examples of ``split``, each collated alone (a batch of one)."""
    dataset = evaluation.prepared.splits[split]
    collate = evaluation.task.collator(evaluation.tokenizer)
    return [collate([dataset[i]]) for i in range(min(LATENCY_EXAMPLES, len(dataset)))]


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object the float32 export just wrote."""
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _facts(result: QuantizedExportResult, float32_export: dict[str, Any]) -> dict[str, Any]:
    """``export.json`` of a quantized export: what was quantized how, quality, size and latency against the
    float32 export, whose own check's facts (parity with the model as trained) come under ``float32_export``."""
    format = result.format
    library = "onnxruntime" if format == "onnx" else "torchao"
    quantization: dict[str, Any] = {"method": "onnxruntime dynamic quantization (int8 weights per channel, activations at run "
                    "time)" if format == "onnx" else "torchao weight-only (linear weights; embeddings and "
                    "head float32)", "weights": result.quantization,
                    "library": f"{library} {importlib.metadata.version(library)}"}
    if format == "quantized" and result.quantization == "int4":
        quantization["group_size"] = INT4_GROUP_SIZE
        quantization["storage"] = "one int4 value per byte (torchao on CPU has no packed int4 layout)"
    kept = ("run", "created", "lmtune_version", "torch_version", "transformers_version", "onnx_version", "inputs",
            "outputs", "dynamic_axes", "opset", "file", "checked_with")
    return {**{k: float32_export[k] for k in kept if k in float32_export}, "format": format,
            "dtype": result.quantization, "quantization": quantization,
            "quality": {"metric": result.metric, "split": result.split, "float32": result.before,
                        result.quantization: result.after, "drop": result.drop, "max_drop": result.max_drop,
                        "greater_is_better": result.greater_is_better},
            "size_bytes": {"float32": result.bytes_before, result.quantization: result.bytes_after,
                           "ratio": result.size_ratio},
            "latency_ms": {"float32": result.latency_ms_before, result.quantization: result.latency_ms_after,
                           "speedup": result.speedup, "examples": result.latency_examples,
                           "measure": "median wall time of one forward pass of one example"},
            "float32_export": float32_export}
