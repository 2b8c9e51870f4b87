"""``lmtune export RUN --format gguf [--quantize f16|q8_0|q4_k_m] [--max-drop X]``: a decoder for llama.cpp / Ollama.

Opens the run, checks that its task exports GGUF (``TaskInfo.exports`` lists ``gguf``: the decoder tasks) and
hands the plain inputs to :func:`lmtune.models.export_gguf.export_gguf_folder`, together with the first
held-out token sequences of the run's test split (validation without one), rebuilt as ``lmtune eval`` does
(:meth:`Run.evaluation_data`): both the merged model and llama.cpp are scored on them (mean token NLL,
perplexity), and ``max_drop`` bounds the perplexity rise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmtune.config.tasks import TASK_INFOS
from lmtune.errors import LmtuneError, RunError
from lmtune.models import export as merged_export
from lmtune.models.export_gguf import (
    EVAL_SEQUENCES,
    QUANTIZATIONS,
    GgufExportResult,
    check_quantization,
    export_gguf_folder,
    require_llama_cpp,
)
from lmtune.workflows.export import load_task_model_code
from lmtune.workflows.run import Run

log = logging.getLogger("lmtune")

__all__ = ["QUANTIZATIONS", "GgufExportResult", "export_gguf"]


def export_gguf(run_dir: str | Path, output: str | Path, *, quantization: str = "f16", tolerance: float | None = None,
                max_drop: float | None = None, prompts: list[str] | None = None,
                overwrite: bool = False) -> GgufExportResult:
    """Write ``run_dir``'s decoder as ``output/model.gguf`` (+ Ollama ``Modelfile``), checked in llama.cpp."""
    check_quantization(quantization)
    require_llama_cpp()
    run = Run.load(run_dir)
    info = TASK_INFOS.get(str(run.meta.get("task")))
    if info is None or "gguf" not in info.exports:
        tasks = sorted(name for name, i in TASK_INFOS.items() if "gguf" in i.exports)
        raise RunError(f"GGUF export is for decoders (llama.cpp runs causal language models); the task "
                       f"'{run.meta.get('task')}' is not one", hint="GGUF export knows the tasks " + ", ".join(tasks)
                       + "; `--format merged` writes a transformers folder for every task")
    load_task_model_code(run.meta)
    sequences, split = _held_out(run, required=max_drop is not None)
    return export_gguf_folder(run.path, run.model_dir, run.meta, output, quantization=quantization,
                              tolerance=tolerance, max_drop=max_drop, sequences=sequences, split=split,
                              prompts=prompts, overwrite=overwrite)


def _held_out(run: Run, *, required: bool) -> tuple[list[tuple[list[int], list[int]]] | None, str | None]:
    """The first held-out ``(input_ids, labels)`` sequences of the run's test split (else validation), or
    (None, None) where the run has none (a bare model folder, a task whose records are not token sequences)."""
    try:
        evaluation = run.evaluation_data(merged_export.load_tokenizer(run.model_dir))
    except LmtuneError as exc:
        if required:
            raise RunError(f"--max-drop needs the run's held-out split, which cannot be rebuilt: {exc.message}",
                           file=run.path) from None
        log.info("GGUF export: no held-out split to score (%s)", exc.message)
        return None, None
    split = next((s for s in ("test", "validation") if evaluation.has(s)), None)
    if split is None:
        return None, None
    sequences = []
    for record in _first(evaluation.prepared.splits[split], EVAL_SEQUENCES):
        if isinstance(record, dict) and "input_ids" in record and "labels" in record:
            sequences.append((_ints(record["input_ids"]), _ints(record["labels"])))
    if not sequences:  # preference pairs and the like: no single scored sequence per record
        if required:
            raise RunError("--max-drop scores the held-out split's token sequences, and this task's records "
                           "are not token sequences")
        return None, None
    return sequences, split


def _first(records: Any, n: int) -> list[Any]:
    return [records[i] for i in range(min(n, len(records)))]


def _ints(values: Any) -> list[int]:
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
