"""The report's explained examples, shared by the tasks whose predictor is an ``Explainer``: a few held-out
texts drawn with their words coloured by token attribution (``lmtune.models.explain``), under a heading.

The saved model folder is read back through the task's registered predictor (the report is written after
``model/`` is saved), so the figure shows what ``lmtune predict --explain`` gives for the same texts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmtune.evaluate.plots import plot_token_attributions
from lmtune.evaluate.report import Report
from lmtune.models.explain import DEFAULT_STEPS
from lmtune.tasks.base import Explainer, get_predictor

log = logging.getLogger("lmtune")

EXPLAINED_EXAMPLES = 4
"""Held-out texts the report explains (each costs ``DEFAULT_STEPS`` forward and backward passes per target)."""

# One picture per example: (caption, text, [(start, end, score)]) from an explained row (None: nothing to show).
Example = tuple[str, str, list[tuple[int, int, float]]]


def word_spans(attributions: dict[str, Any]) -> list[tuple[int, int, float]]:
    """The ``(start, end, score)`` of an explained answer's words in its (first) text."""
    return [(w["start"], w["end"], w["score"]) for w in attributions["word_attributions"] if not w.get("segment")]


def explanation_section(report: Report, run_dir: Path, task_name: str, split: str, items: list[Any],
                        example: Callable[[int, dict[str, Any]], Example | None], *, what: str) -> None:
    """Explain ``items`` (texts of ``split``) with the run's saved model and add the picture to ``report``.

    ``example(i, row)`` turns item ``i``'s explained row into what is drawn; ``what`` says what the attributions
    point at (one line under the picture). The section is an illustration: if the model cannot be explained
    (or anything fails) the report says so in one line and the run goes on.
    """
    if not items:
        return
    report.heading(f"Token attributions ({split})", 3)
    model_dir = run_dir / "model"
    try:
        meta = json.loads((model_dir / "lmtune.json").read_text(encoding="utf-8"))
        predictor = get_predictor(task_name)(model_dir, meta)
        if not isinstance(predictor, Explainer):
            raise TypeError(f"the {task_name} predictor gives no attributions")
        rows = predictor.explain(items[:EXPLAINED_EXAMPLES], n_steps=DEFAULT_STEPS)
        examples = [e for i, row in enumerate(rows) if (e := example(i, row)) is not None]
        rel = f"plots/attributions_{split}.png"
        plot_token_attributions(examples, run_dir / rel, title=f"Token attributions, first {split} examples")
    except Exception as exc:  # an illustration must not fail a finished run: say why it is missing
        log.warning("the report shows no token attributions: %s", exc)
        report.paragraph(f"No token attributions: {str(exc)[:300]}")
        return
    report.image(rel, f"token attributions, {split}")
    deltas = [abs(r["explained"]["convergence_delta"]) for row in rows for r in _explained(row)]
    report.bullets([
        f"integrated gradients on the input embeddings ({DEFAULT_STEPS} steps, all-padding baseline with the "
        f"special tokens kept) towards {what}; green words speak for it, red against, each text scaled to its "
        "strongest word",
        f"largest convergence delta (how far the attributions miss the score change they share out): "
        f"{max(deltas, default=0.0):.2e}",
        "the same for any file: `lmtune predict RUN --input FILE --output OUT.jsonl --explain`",
    ])


def _explained(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The explained parts of a row: the row itself (a label) or each of its entities."""
    if "explained" in row:
        return [row]
    return [e for e in row.get("entities", []) if "explained" in e]
