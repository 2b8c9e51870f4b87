"""The task boundary: what a task brings to the one training loop, and how the rest of lmtune asks for it.

A task is one folder, ``lmtune/tasks/<name>/``. Its ``__init__.py`` declares a ``TaskInfo`` (the facts
other layers read without running the task: decoder or not, auto class, exports, endpoints, metrics) and
joins the registry with one ``register_task`` call; its modules carry the data preparation, model head,
loss, metrics, predictor, inspection and report pieces. Everything outside ``tasks/`` reaches a task only
through ``Task`` and ``Predictor`` below and ``TaskInfo``: never by its name, never by probing members.

``Task`` is a Protocol with defaults: a task class may subclass it to take the defaults of the members
marked *default* (the loop and the verbs call every member on every task).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from lmtune.config.tasks import TaskInfo, register_task_info, task_info

if TYPE_CHECKING:
    import datasets
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from lmtune.config.schema import Config
    from lmtune.data.readers import Table
    from lmtune.evaluate.report import Report


# The model inputs an encoder task's batches carry (collators add labels and bookkeeping beside them).
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def encoder_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model inputs of an encoder task's batch (:data:`ENCODER_INPUTS` that it holds)."""
    return {k: batch[k] for k in ENCODER_INPUTS if k in batch}


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

    info: ClassVar[TaskInfo]
    config: Config

    def __init__(self, config: Config) -> None:
        """A task for one validated config (built by the train workflow and the verbs: ``cls(cfg)``)."""
        ...

    # ---------------------------------------------------------------------------------- model and data
    def model_path(self) -> Path | None:
        """The folder the weights and tokenizer come from (None: nothing pretrained, e.g. a tokenizer
        trained on the corpus or a baseline network)."""
        ...

    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The tokenizer for ``model_path``, configured for this task (pad token, padding side)."""
        ...

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, split and tokenise the configured data (cached)."""
        ...

    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The pretrained model with this task's head, in float32 (autocast handles precision)."""
        ...

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """Names of the modules the checkpoint did not provide (the new head): always trained."""
        ...

    @property
    def model_class(self) -> type:
        """The transformers class the saved model folder reloads as (checked after saving)."""
        ...

    @property
    def peft_task_type(self) -> str | None:
        """peft's ``task_type`` for LoRA on this task's model (None: a generic ``PeftModel``)."""
        ...

    def new_token_ids(self) -> list[int]:
        """Token ids the task added to the vocabulary (LoRA trains their embedding rows). *default*: none."""
        return []

    @property
    def headline_metrics(self) -> list[tuple[str, str]]:
        """(metric, header) shown first in the report. *default*: ``info.headline_metrics``."""
        return list(self.info.headline_metrics)

    @property
    def comparison_metric(self) -> str:
        """The metric the comparison table ranks models by. *default*: ``info.comparison_metric``."""
        return self.info.comparison_metric

    @property
    def packing(self) -> bool:
        """Examples are packed into fixed-length rows (no padding). *default*: False."""
        return False

    @property
    def target_length(self) -> int | None:
        """Tokens of the decoder's own input per example, for a model that reads the source and the target
        separately (an encoder-decoder: ``data.max_target_length``); ``lmtune plan`` sizes its activations
        by it. *default*: None (one sequence per example)."""
        return None

    @property
    def rows_per_example(self) -> int:
        """Sequences one example puts through the model at once (a preference pair: 2, its chosen and its
        rejected answer in one concatenated forward); ``lmtune plan`` sizes activations by it. *default*: 1."""
        return 1

    @property
    def sampled_tokens(self) -> int:
        """Tokens each row can gain by sampling during training (GRPO's answers: ``generation.max_new_tokens``);
        ``lmtune plan`` adds them to the sequence length. *default*: 0."""
        return 0

    def plan_notes(self) -> list[str]:
        """Sentences ``lmtune plan`` adds about what the run costs beyond the model and its batches (a reference
        pass before training ...). *default*: none."""
        return []

    def planned_labels(self) -> tuple[list[str], str]:
        """The label set the head is built for when ``lmtune plan`` does not read the data, and where it
        comes from (the config's key, or what was assumed). *default*: no label head (``[], "none"``)."""
        return [], "none"

    # ---------------------------------------------------------------------------------- the loop
    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Turns a list of features into a padded batch of tensors."""
        ...

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss-carrying items (examples, or target tokens) ``batch`` holds."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The *sum* of per-item losses of one micro-batch (a scalar tensor).

        The loop divides by the item count of the *whole* optimizer step (all micro-batches, all
        processes), so gradient accumulation and data parallelism give the same gradient as one big batch.
        """
        ...

    def step_metrics(self) -> dict[str, float]:
        """Task figures of the optimizer steps since the last training log row (GRPO's rewards, KL, answer
        lengths ...), logged beside the loss; the task resets them when asked. *default*: none."""
        return {}

    def step_metrics_state(self, accelerator: Any) -> list[float]:
        """The open window of :meth:`step_metrics` (sums over every process: a collective, every process calls
        it), saved in each checkpoint so a resumed run logs what the uninterrupted one does. *default*: none."""
        return []

    def load_step_metrics_state(self, state: list[float], accelerator: Any) -> None:
        """Reopen a checkpoint's :meth:`step_metrics_state` window. *default*: nothing to do."""

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's raw output for ``batch`` as one tensor (compared before and after saving)."""
        ...

    def before_training(self, model: torch.nn.Module, accelerator: Accelerator, data: TaskData, run_dir: Path,
                        *, resuming: bool, progress: Any = None) -> None:
        """Work done once with the starting model (prepared by Accelerate) before the starting point is scored
        and the first step is taken: e.g. preference tuning's reference log-probs, cached in ``run_dir`` and
        read back when ``resuming`` (the model is still the starting one: checkpoints load after this).
        ``progress``: a rich Progress to show long work on (None: quiet). *default*: nothing."""
        return None

    def evaluation_phase(self, phase: str) -> None:
        """``"training"`` (cheap evaluations during the loop) or ``"final"`` (slow things such as
        generation may run). *default*: the same evaluation in both."""
        return None

    def evaluate(
        self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, split: str, data: TaskData
    ) -> dict[str, Any]:
        """Metrics on one split (``loss`` included), gathered across processes."""
        ...

    # ---------------------------------------------------------------------------------- baselines
    def run_baselines(self, data: TaskData) -> dict[str, Any]:
        """The configured baselines that are fitted on the spot (not sub-runs), scored on the same split:
        ``{name: entry}``. *default*: none."""
        return {}

    def timing_items(self, data: TaskData) -> list[Any]:
        """Inputs (in the predictor's item form) on which the tuned model and the neural baselines are timed.
        *default*: none (no timing)."""
        return []

    def predictor_items(self, data: TaskData, split: str) -> list[Any]:
        """Every input of ``split`` in the predictor's item form, in split order: the counterfactual check
        (``evaluate.counterfactuals``) swaps identity terms in them and predicts both versions. A task whose
        ``TaskInfo.slices`` is set gives them. *default*: none."""
        return []

    # ---------------------------------------------------------------------------------- saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Write task files beside the model (label map ...); return metadata for ``lmtune.json``."""
        ...

    def load_model_meta(self, meta: dict[str, Any]) -> None:
        """Take back what a saved model recorded in ``lmtune.json`` (e.g. a tuned threshold) before
        evaluating it. *default*: nothing to take."""
        return None

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Add the task's results (tables, plots) to the run report."""
        ...

    # ---------------------------------------------------------------------------------- data inspect
    def inspect(self, source: str | None, *, examples: int = 3) -> dict[str, Any] | None:
        """The task's whole ``lmtune data inspect`` report, for tasks whose data is not labelled rows of
        tokens (chat, raw text); None: the generic report over ``prepare`` applies. *default*: None."""
        return None

    def inspect_facts(self, data: TaskData) -> dict[str, dict[str, Any]] | None:
        """Per-split facts for the generic inspect report (None: token lengths of the texts). *default*."""
        return None

    def inspect_details(self, data: TaskData, facts: dict[str, dict[str, Any]], *, examples: int = 3
                        ) -> dict[str, Any]:
        """Task sections of the inspect report (shown by ``render_inspection``). *default*: none."""
        return {}

    def render_inspection(self, report: dict[str, Any], console: Any) -> bool:
        """Print the task's part of an inspect report; False: the generic rendering applies. *default*."""
        return False


class Predictor(Protocol):
    """How a saved model folder of a task answers new inputs (``Run.predict``, ``lmtune predict``, serve).

    Built as ``cls(model_dir, meta, device=None)``; ``meta`` is the folder's ``lmtune.json``.
    """

    model: Any
    tokenizer: Any

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        """Load the saved model folder (``meta``: its ``lmtune.json``) on ``device`` (default: CUDA if any)."""
        ...

    def check_item(self, item: Any) -> str | None:
        """Why ``item`` is not an input this predictor takes (a sentence for a 400 answer), or None."""
        ...

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """One JSON-ready dict per input item, in input order."""
        ...

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """The same for the rows of a table, reading the columns named in ``lmtune.json`` (or ``columns``);
        a bad cell raises DataError naming file, line and field."""
        ...


@runtime_checkable
class Explainer(Protocol):
    """A :class:`Predictor` that can also say which input tokens its answers rest on (``lmtune predict
    --explain``, the server's ``explain`` option, the report's highlighted examples): an optional capability,
    asked with ``isinstance(predictor, Explainer)``.

    The rows are :meth:`Predictor.predict`'s with attribution fields added (token and word attributions with
    character offsets into the text, the explained target, the convergence figures); the attribution math is
    :mod:`lmtune.models.explain` (integrated gradients on the input embeddings).
    """

    def explain(self, items: list[Any], *, label: str | None = None, n_steps: int = 32, batch_size: int = 32,
                progress: Any = None) -> list[dict[str, Any]]:
        """Predictions for ``items`` with their attributions; ``label`` names the label to explain where the
        task has one choice to make (else the predicted one), ``n_steps`` the integration steps. A ``label``
        the task cannot take is a DataError."""
        ...

    def explain_table(self, table: Table, *, columns: dict[str, str | None] | None = None, label: str | None = None,
                      n_steps: int = 32, batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`explain` for the rows of a table, read as ``predict_table`` reads them."""
        ...


@dataclass(frozen=True)
class _Registration:
    load_task: Callable[[], type[Task]]
    load_predictor: Callable[[], type[Predictor]] | None


_REGISTRY: dict[str, _Registration] = {}


def register_task(info: TaskInfo, task: Callable[[], type[Task]],
                  predictor: Callable[[], type[Predictor]] | None = None) -> None:
    """Join the registry: ``info`` for every layer, and how to load the task class and its predictor.

    ``task`` and ``predictor`` are functions that import the classes when first needed, so listing the
    tasks (``import lmtune``) costs no torch or transformers import.
    """
    register_task_info(info)
    _REGISTRY[info.name] = _Registration(task, predictor)


def _registration(name: str) -> _Registration:
    task_info(name)  # KeyError naming the known tasks
    return _REGISTRY[name]


def get_task(name: str) -> type[Task]:
    """The task class registered under ``name``."""
    return _registration(name).load_task()


def get_predictor(name: str) -> type[Predictor]:
    """The predictor class for model folders of task ``name``."""
    load = _registration(name).load_predictor
    if load is None:
        raise KeyError(f"task '{name}' has no predictor")
    return load()
