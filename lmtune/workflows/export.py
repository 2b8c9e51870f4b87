"""``lmtune export``: open a run, decide from its task what applies, and write the checked export.

The export code itself (``lmtune.models.export``: a merged transformers folder; ``lmtune.models.export_onnx``:
an ONNX graph) takes plain inputs; this verb reads them from the run: the model folder, ``lmtune.json``,
and the transformers auto class (the one the run recorded, else the task's ``TaskInfo.auto_class``). A
format applies to a task when its ``TaskInfo.exports`` lists it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from lmtune.config.tasks import TASK_INFOS, TaskInfo
from lmtune.errors import RunError
from lmtune.models.export import DEFAULT_TOLERANCE, ExportResult, export_merged_folder
from lmtune.models.export_onnx import DEFAULT_TOLERANCE as ONNX_TOLERANCE
from lmtune.models.export_onnx import OnnxExportResult, export_onnx_folder
from lmtune.tasks.base import get_predictor
from lmtune.workflows.run import Run

FORMATS = ("merged", "onnx")


def export_merged(run_dir: str | Path, output: str | Path, *, tolerance: float = DEFAULT_TOLERANCE,
                  prompts: list[str] | None = None, overwrite: bool = False) -> ExportResult:
    """Write ``run_dir``'s model as a merged, standalone transformers folder at ``output``, reloaded and
    checked against the model as trained (see :func:`lmtune.models.export.export_merged_folder`)."""
    run = Run.load(run_dir)
    info = _task_info(run.meta)
    if info is None or "merged" not in info.exports:
        raise RunError(f"cannot export a model for task '{run.meta.get('task')}'",
                       hint="export knows the tasks " + ", ".join(_tasks_exporting("merged")))
    load_task_model_code(run.meta)
    return export_merged_folder(run.path, run.model_dir, run.meta, Path(output), auto_class=auto_class(run.meta, info),
                                tolerance=tolerance, prompts=prompts, overwrite=overwrite)


def export_onnx(run_dir: str | Path, output: str | Path, *, tolerance: float = ONNX_TOLERANCE,
                texts: list[str] | None = None, overwrite: bool = False) -> OnnxExportResult:
    """Write ``run_dir``'s model as ``output/model.onnx`` (+ tokenizer), checked in onnxruntime (see
    :func:`lmtune.models.export_onnx.export_onnx_folder`); for tasks whose ``TaskInfo.exports`` has onnx."""
    run = Run.load(run_dir)
    info = _task_info(run.meta)
    if info is None or "onnx" not in info.exports:
        raise RunError(f"ONNX export is not implemented for '{run.meta.get('task')}' models, only for "
                       f"{', '.join(_tasks_exporting('onnx'))}",
                       hint="`--format merged` writes a transformers folder for every task")
    load_task_model_code(run.meta)
    return export_onnx_folder(run.path, run.model_dir, run.meta, output, auto_class=auto_class(run.meta, info),
                              tolerance=tolerance, texts=texts, overwrite=overwrite)


def auto_class(meta: dict[str, Any], info: TaskInfo) -> str:
    """The transformers class name that loads the run's model: what ``lmtune.json`` recorded
    (``model_class``), else the task's auto class."""
    recorded = meta.get("model_class")
    return str(recorded) if recorded else info.auto_class


def load_task_model_code(meta: dict[str, Any]) -> None:
    """Import the run's task predictor: a task whose model is its own type (relation extraction's
    ``lmtune_relation``) registers it with transformers' auto classes on import, so the folder loads."""
    with contextlib.suppress(KeyError):  # a task without a predictor: its models are plain transformers types
        get_predictor(str(meta.get("task")))


def _task_info(meta: dict[str, Any]) -> TaskInfo | None:
    """The registered facts of the run's task; None for a task this version does not know."""
    return TASK_INFOS.get(str(meta.get("task")))


def _tasks_exporting(format: str) -> list[str]:
    """The registered tasks whose models export in ``format``, sorted."""
    return sorted(name for name, info in TASK_INFOS.items() if format in info.exports)
