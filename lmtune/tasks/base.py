"""The Task protocol: what a task brings to the one training loop.

A task module carries its data preparation, model head, loss and metrics
together and joins the registry with one line (``@register_task``). The loop
only ever calls the methods below; it never knows which task it runs, and a task
never touches the loop's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    import datasets
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from lmtune.config import Config
    from lmtune.evaluate.report import Report


@dataclass
class TaskData:
    """Prepared features per split, ready for batching."""

    splits: dict[str, datasets.Dataset]
    # Token count of each example, for length grouping and throughput figures.
    lengths: dict[str, list[int]]
    # JSON-serialisable facts about the data (label set, counts, skipped rows, truncation).
    info: dict[str, Any] = field(default_factory=dict)
    # Task-private material (e.g. raw texts for the baselines); never saved.
    extra: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """One application (classification, NER, QA, ...) behind one interface."""

    name: ClassVar[str]
    # Validation metric that picks the best checkpoint unless the config names one.
    default_metric: ClassVar[str]

    config: Config

    def load_tokenizer(self, model_path: Path) -> Any:
        """The tokenizer for ``model_path``, configured for this task (pad token, padding side)."""
        ...

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, split and tokenise the configured data (cached)."""
        ...

    def build_model(self, model_path: Path, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The pretrained model with this task's head, in float32 (autocast handles precision)."""
        ...

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """Names of the modules the checkpoint did not provide (the new head): always trained."""
        ...

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Turns a list of features into a padded batch of tensors."""
        ...

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss-carrying items (examples, or target tokens) ``batch`` holds."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The *sum* of per-item losses of one micro-batch (a scalar tensor).

        The loop divides by the item count of the *whole* optimizer step (all
        micro-batches, all processes), so gradient accumulation and data
        parallelism give the same gradient as one big batch.
        """
        ...

    def evaluate(
        self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, split: str, data: TaskData
    ) -> dict[str, Any]:
        """Metrics on one split (``loss`` included), gathered across processes."""
        ...

    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Write task files beside the model (label map ...); return metadata for ``lmtune.json``."""
        ...

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Add the task's results (tables, plots) to the run report."""
        ...


TASKS: dict[str, type] = {}


def register_task(cls: type) -> type:
    """Class decorator: make a task available under ``cls.name``."""
    TASKS[cls.name] = cls  # type: ignore[attr-defined]
    return cls


# Predictors: how a saved model folder of a task answers new inputs (``Run.predict``, ``lmtune predict``,
# ``lmtune serve``). A predictor class is built as ``cls(model_dir, meta, device=None)`` and has
#   ``model``, ``tokenizer``                      the loaded model (eval mode) and its tokenizer;
#   ``predict(items, *, batch_size=...)``         one JSON-ready dict per input item, in input order
#                                                 (items are the task's inputs: texts, {question,
#                                                 context} mappings, source texts ...);
#   ``predict_table(table, *, columns=None, batch_size=..., progress=None)``
#                                                 the same for the rows of a ``readers.Table``, reading the
#                                                 columns named in ``lmtune.json`` (or ``columns``); bad
#                                                 cells raise DataError naming file, line and field.
# Classification keeps its own richer interface (probabilities/decode) and is wired in ``run.py``.
PREDICTORS: dict[str, Callable[..., Any]] = {}


def register_predictor(task_name: str) -> Callable[[type], type]:
    """Class decorator: the predictor used for model folders of task ``task_name``."""

    def wrap(cls: type) -> type:
        PREDICTORS[task_name] = cls
        return cls

    return wrap
