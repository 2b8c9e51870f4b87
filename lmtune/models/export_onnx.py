"""``lmtune export RUN --format onnx``: a classifier as an ONNX graph, checked with onnxruntime.

The model folder is loaded (float32, eval mode), wrapped so the graph takes the tokenizer's inputs
(``input_ids``, ``attention_mask`` and, for BERT-style models, ``token_type_ids``) and returns only
``logits`` (batch, labels), and exported with ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript)
with dynamic batch and sequence axes. The written ``model.onnx`` is then run in onnxruntime on sample
inputs of several batch sizes and lengths (padded batches included); its logits must be within
``tolerance`` (max absolute difference) of PyTorch's, else nothing is exported. The folder also holds
the tokenizer, ``config.json`` (the label map), ``lmtune.json`` and ``export.json`` (the check's numbers).

It takes plain inputs (the run and model folders, ``lmtune.json``'s contents, the auto class name);
``lmtune.workflows.export`` opens the run and checks that the task declares the format.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
import transformers
from torch.export import Dim

from lmtune.errors import RunError
from lmtune.models import export as merged_export
from lmtune.version import __version__

log = logging.getLogger("lmtune")

ONNX_FILE = "model.onnx"
# float32 graph vs float32 eager PyTorch: measured 1.5e-8 on a tiny BERT and 6.0e-8 on MiniLM-L6 (onnxruntime
# fuses attention and layer norm, so sums are ordered differently); a wrong export is far above this
# (dropout left in the graph: 1e-2).
DEFAULT_TOLERANCE = 1e-4
# Batches of the check: one text alone, then several of very different lengths padded together (the
# padded positions must not change the logits), so dynamic batch and sequence axes are exercised.
CHECK_BATCHES = [merged_export.DEFAULT_PROMPTS[:1], merged_export.DEFAULT_PROMPTS[1:4],
                 merged_export.DEFAULT_PROMPTS]


@dataclass
class OnnxExportResult:
    """What the ONNX export wrote and how closely onnxruntime matches PyTorch."""

    folder: Path
    max_abs_logit_diff: float
    tolerance: float
    texts: int
    batch_sizes: list[int]
    opset: int
    inputs: list[str]


class _LogitsOnly(torch.nn.Module):
    """The model as the graph's function: tokenizer tensors in, logits out ((B, labels) for a classifier)."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(**kwargs).logits


def export_onnx_folder(run_dir: Path, model_dir: Path, meta: dict[str, Any], output: str | Path, *,
                       auto_class: str, tolerance: float = DEFAULT_TOLERANCE, texts: list[str] | None = None,
                       overwrite: bool = False) -> OnnxExportResult:
    """Write the model of the run at ``run_dir`` (its model folder ``model_dir``, whose ``lmtune.json``
    holds ``meta``; loaded with the transformers class ``auto_class``) as ``output/model.onnx``
    (+ tokenizer) and check it in onnxruntime.

    Only a folder whose ONNX logits are within ``tolerance`` of PyTorch's on the check's inputs
    (``texts``, default: short varied texts in batches of 1, 3 and 6) appears at ``output``; a failed
    export leaves nothing there. An existing non-empty ``output`` is replaced only with ``overwrite``
    and only if it holds an earlier lmtune export.
    """
    run_dir, model_dir = Path(run_dir).resolve(), Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise RunError("the model folder holds only an adapter; export it merged first",
                       file=model_dir, hint="`lmtune export RUN --format merged -o merged/`, then "
                       "`lmtune export merged/ --format onnx -o onnx/`")
    output = Path(output).expanduser().resolve()
    merged_export.check_output_folder(output, run_dir, [model_dir], overwrite=overwrite)
    batches = [list(texts)] if texts is not None else [list(b) for b in CHECK_BATCHES]
    if not any(batches):
        raise RunError("the ONNX check needs at least one text")

    tokenizer = merged_export.load_tokenizer(model_dir)
    model = merged_export.load_model(merged_export.auto_model_class(auto_class), model_dir)
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    if "attention_mask" not in input_names:
        input_names.insert(1, "attention_mask")
    # eval() on the wrapper: torch.export keeps the top module's training flag, and dropout in the
    # graph would make every ONNX answer random.
    wrapper = _LogitsOnly(model, input_names).eval()
    max_length = int(meta.get("max_length") or merged_export.MAX_PROMPT_TOKENS)
    encoded = [_encode(tokenizer, b, input_names, max_length) for b in batches if b]

    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    try:
        tmp.mkdir(parents=True)
        opset = _write_onnx(wrapper, encoded[-1], input_names, tmp / ONNX_FILE)
        diff = _check_onnx(wrapper, tmp / ONNX_FILE, encoded, tolerance)
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)  # the label map (id2label) for whoever runs the graph
        if (model_dir / "README.md").is_file():
            shutil.copyfile(model_dir / "README.md", tmp / "README.md")
        result = OnnxExportResult(folder=output, max_abs_logit_diff=diff, tolerance=tolerance,
                                  texts=sum(len(b) for b in batches), batch_sizes=[len(b) for b in batches if b],
                                  opset=opset, inputs=input_names)
        facts = _facts(result, run_dir)
        merged_export.finish_export(tmp, output, meta, facts, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (ONNX opset %d; max logit difference %.1e vs PyTorch over %d texts, "
             "tolerance %g)", run_dir, output / ONNX_FILE, opset, diff, result.texts, tolerance)
    return result


def _encode(tokenizer: Any, texts: list[str], input_names: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {name: enc[name] if name in enc else torch.ones_like(enc["input_ids"]) for name in input_names}


def _write_onnx(wrapper: torch.nn.Module, example: dict[str, torch.Tensor], input_names: list[str],
                path: Path) -> int:
    """Export ``wrapper`` with dynamic (batch, sequence) axes on every input; returns the opset used."""
    if importlib.util.find_spec("onnxscript") is None:  # torch.onnx's dynamo exporter needs it
        raise RunError("ONNX export needs the packages onnx and onnxscript",
                       hint="pip install onnx onnxscript onnxruntime (pinned in pyproject.toml)")
    batch, sequence = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=8192)
    dynamic = {name: {0: batch, 1: sequence} for name in input_names}
    quiet = io.StringIO()
    try:
        # The exporter prints its progress and warns about things that do not concern the user
        # (torchvision missing, axis renames); failures still raise.
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, (), f=None, kwargs=dict(example), input_names=input_names,
                                        output_names=["logits"], dynamic_shapes=dynamic, dynamo=True,
                                        external_data=False)
    except Exception as exc:
        raise RunError(f"torch.onnx could not export the model: {type(exc).__name__}: {exc}".split("\n")[0],
                       hint="set LMTUNE_DEBUG=1 for the exporter's traceback") from None
    assert program is not None
    program.save(str(path), external_data=False)
    opsets = program.model.opset_imports
    return int(opsets.get("", 0))


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_onnx(wrapper: torch.nn.Module, path: Path, encoded: list[dict[str, torch.Tensor]],
                tolerance: float) -> float:
    """Max absolute logit difference between onnxruntime and PyTorch over the check's batches."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    diff = 0.0
    with torch.inference_mode():
        for enc in encoded:
            expected = wrapper(**enc).float().numpy()  # (B, labels)
            got = session.run(["logits"], {k: v.numpy() for k, v in enc.items()})[0]
            if got.shape != expected.shape:
                raise RunError(f"the ONNX model returned logits of shape {got.shape}, PyTorch {expected.shape}; "
                               "nothing was exported")
            diff = max(diff, float(abs(got - expected).max()))
    if not diff <= tolerance:  # NaN fails too
        raise RunError(f"the ONNX model's logits and PyTorch's differ by {diff:.3e}, more than the tolerance "
                       f"{tolerance:g}; nothing was exported",
                       hint="a looser --tolerance accepts it; a large difference points to an exporter problem")
    return diff


def _facts(result: OnnxExportResult, run_dir: Path) -> dict[str, Any]:
    facts = {**asdict(result), "format": "onnx", "file": ONNX_FILE, "run": str(run_dir), "dtype": "float32",
             "dynamic_axes": {"batch": 0, "sequence": 1}, "outputs": ["logits"],
             "checked_with": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
             "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "lmtune_version": __version__, "torch_version": torch.__version__, "onnx_version": onnx.__version__,
             "transformers_version": transformers.__version__}
    del facts["folder"]
    return facts
