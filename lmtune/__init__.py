"""lmtune: fine-tune a pretrained language model for one job, prove it with evaluation, use it.

Python API (the CLI is a thin layer over these):

    import lmtune
    run = lmtune.train("examples/classification.yaml", overrides={"train.epochs": 1})
    run.metrics["test"]["accuracy"]
    run.predict(["a gripping, beautifully shot film"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lmtune.run import Run


def train(config: Any, **kwargs: Any) -> Run:
    """Train a model from a config (YAML path, mapping or ``Config``); see ``lmtune.workflow.train``."""
    from lmtune.workflow import train as _train

    return _train(config, **kwargs)


def load_run(path: Any) -> Run:
    """Open a finished run folder (or a bare model folder) to evaluate or predict."""
    from lmtune.run import Run

    return Run.load(path)


__all__ = ["__version__", "load_run", "train"]
