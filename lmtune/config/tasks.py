"""What every layer may know about a task, declared by the task itself: ``TaskInfo`` and its registry.

A task folder (``lmtune/tasks/<name>/__init__.py``) registers one ``TaskInfo`` (through
``lmtune.tasks.base.register_task``). The registry lives here, at the bottom, so the config schema can
validate ``task:`` and run the task's own checks, and export or serve code can read a task's facts
without importing any task. Nothing here knows a task by name: the facts come from the registrations.

``import lmtune`` (the package root, run before any submodule) imports ``lmtune.tasks``, which fills the
registry; task folders are light to import (the task classes load when a task runs).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Every baseline a task may list, in the order reports show them: cheap ones fitted on the spot, then
# neural networks trained as sub-runs on the same loop (``models/neural_baselines.py``).
CLASSIC_BASELINES = ("majority", "tfidf_logreg")
NEURAL_BASELINES = ("cnn_lstm", "rnn", "bilstm", "gru", "transformer")
# Rules a task scores on its own held-out inputs, with nothing to train (summarization's lead-N: the document's
# first N sentences as its summary); the task's ``run_baselines`` gives their rows.
RULE_BASELINES = ("lead_1", "lead_3")
BASELINE_NAMES = CLASSIC_BASELINES + NEURAL_BASELINES + RULE_BASELINES
# Neural baselines that also come as per-token taggers: the name says the network, the task the shape (a text
# classification task builds a sentence classifier, a token classification task a tagger with one output per
# token: ``models/neural_baselines.py``).
TAGGER_BASELINES = ("bilstm",)


@dataclass(frozen=True)
class TaskInfo:
    """The declarative facts of a task: what the rest of lmtune needs without running it."""

    name: str
    summary: str
    # Validation metric that picks the best checkpoint unless ``train.metric`` names one.
    default_metric: str
    # The transformers auto class that loads the saved model folder (``from_pretrained``), by name.
    auto_class: str
    # Hugging Face pipeline tag for the model card, and how to use the folder with plain transformers
    # (``{name}`` is replaced by the model's name).
    pipeline_tag: str
    usage: str
    # (metric key, header) shown first in the report and by ``lmtune train``/``lmtune eval``; the metric
    # the comparison table ranks by; every metric the model card lists (where present).
    headline_metrics: tuple[tuple[str, str], ...]
    comparison_metric: str
    card_metrics: tuple[str, ...]
    # A causal LM trained on next-token loss: text generation, completions, ``lmtune chat`` if ``chat``.
    decoder: bool = False
    chat: bool = False
    # Predictions are generated text (``generation`` settings, ``--max-new-tokens`` ... apply).
    generates: bool = False
    # ``lmtune export`` formats and server endpoints (beside ``/v1/predict``) that apply.
    exports: tuple[str, ...] = ("merged",)
    endpoints: tuple[str, ...] = ()
    # Baselines this task can train beside the model (from BASELINE_NAMES); those run when the config
    # does not say.
    baselines: tuple[str, ...] = ()
    default_baselines: tuple[str, ...] = ()
    # ``evaluate.slices`` and ``evaluate.counterfactuals`` apply: the task's evaluation keeps each example's
    # slice columns and reports per-group metrics, and its predictor's outputs carry a ``label`` (or ``labels``)
    # to compare on term-swapped inputs (``Task.predictor_items``).
    slices: bool = False
    # ``train.privacy`` (DP-SGD) applies: the task's loss is a sum of per-example losses, one training record per
    # row (no packing), and its model's per-example gradients can be computed (lmtune/training/privacy.py).
    privacy: bool = False
    # ``data.packing`` is on when the config leaves it unset (several records share a row).
    packing_default: bool = False
    # ``evaluate.memorisation`` applies: the task inserts canaries among its training records and hands the
    # audit its data (``TaskData.extra["memorisation"]``: :class:`lmtune.evaluate.memorisation.AuditData`).
    memorisation: bool = False
    # ``data.streaming`` and ``model.init: scratch`` apply.
    streaming: bool = False
    scratch: bool = False
    # ``model.chat_template`` applies: the task renders its conversations with a chat template the user may
    # replace (``chatml-tools`` for tool calling).
    chat_template: bool = False
    # The task's own config checks, given the whole ``Config``: raise ValueError naming the keys (shown as
    # a config error). Typed with Any: the schema imports this module, so this one cannot import it back.
    check: Callable[[Any], None] | None = None
    # Bundled data sets (``bundled:NAME``) made for this task; ``*`` globs allowed (the most specific
    # pattern over all tasks wins: ``chatterbot_en_*`` beats ``chatterbot_*``).
    bundled_data: tuple[str, ...] = ()
    # What data the task reads, in a line for ``lmtune tasks`` (the columns or shapes, with their config keys).
    reads: str = ""
    # The task a config runs when it names none (exactly one registered task says so).
    default: bool = False
    # Wording of the report and model card: the comparison table names the untrained model's row
    # "MODEL <starting_point_name>"; the card's "Limitations" section says ``card_limitation``.
    starting_point_name: str = "before fine-tuning"
    card_limitation: str = ("A small model tuned on little data repeats its training data's style and facts, and "
                            "can state wrong things fluently.")


TASK_INFOS: dict[str, TaskInfo] = {}


def register_task_info(info: TaskInfo) -> None:
    """Make ``info`` known under ``info.name`` (a second registration under a name replaces the first)."""
    unknown = [b for b in info.baselines if b not in BASELINE_NAMES]
    if unknown:
        raise ValueError(f"task {info.name}: unknown baselines {unknown}; known: {', '.join(BASELINE_NAMES)}")
    TASK_INFOS[info.name] = info


def task_info(name: str) -> TaskInfo:
    """The registered facts of task ``name``; KeyError naming the known tasks otherwise."""
    try:
        return TASK_INFOS[name]
    except KeyError:
        raise KeyError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASK_INFOS))}") from None


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(TASK_INFOS)


def default_task() -> str:
    """The task a config without ``task:`` runs: the registered task whose info says ``default``."""
    defaults = [name for name, info in TASK_INFOS.items() if info.default]
    if len(defaults) != 1:
        raise RuntimeError(f"exactly one registered task must be the default, found {defaults or 'none'}")
    return defaults[0]


def bundled_data_task(dataset: str) -> str | None:
    """The task a bundled data set is made for, as the tasks declare it (``TaskInfo.bundled_data``); an
    exact name beats a pattern, a longer pattern a shorter one; None when no task claims it."""
    best: tuple[bool, int, str] | None = None
    for name, info in TASK_INFOS.items():
        for pattern in info.bundled_data:
            if fnmatch.fnmatchcase(dataset, pattern):
                rank = (pattern == dataset, len(pattern), name)
                best = rank if best is None or rank[:2] > best[:2] else best
    return None if best is None else best[2]
