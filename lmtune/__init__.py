"""lmtune: fine-tune a pretrained language model for one job, prove it with evaluation, use it.

Python API (the CLI is a thin layer over these):

    import lmtune
    run = lmtune.train("examples/classification.yaml", overrides={"train.epochs": 1})
    run.metrics["test"]["accuracy"]
    run.predict(["a gripping, beautifully shot film"])

    chat = lmtune.train("examples/sft_chatterbot_smollm2_lora.yaml")
    chat.chat([{"role": "user", "content": "Hello!"}])["text"]
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# Registers every built-in task (light: pydantic only; the task classes load when a task runs), so any
# entry point, `import lmtune.config` included, validates `task:` against the same registry.
from lmtune import tasks as _tasks  # noqa: F401
from lmtune.config.loader import load_config as _load_config
from lmtune.version import __version__

# transformers imports torchao (installed for quantized exports) with its first model class, before any verb
# can quiet libraries: torchao then warns that its CUDA-only kernels do not load on a CPU, and torch's pytree
# that torchao registers enums the old way. Neither concerns a user; set here, the first lmtune code to run.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

if TYPE_CHECKING:
    from lmtune.config import Config
    from lmtune.workflows.run import Run


def train(config: Any, **kwargs: Any) -> Run:
    """Train a model from a config (YAML path, mapping or ``Config``); see ``lmtune.workflows.train``."""
    from lmtune.workflows.train import train as _train  # noqa: PLC0415  (torch loads at the first call, not on import)

    return _train(config, **kwargs)


def load_config(source: Any, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a config (YAML path or mapping) with dotted overrides; see ``lmtune.config``."""
    return _load_config(source, overrides)


def load_run(path: Any) -> Run:
    """Open a finished run folder (or a bare model folder) to evaluate or predict."""
    from lmtune.workflows.run import Run  # noqa: PLC0415  (torch loads at the first call, not on import)

    return Run.load(path)


__all__ = ["__version__", "load_config", "load_run", "train"]
