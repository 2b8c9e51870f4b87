"""Console output shared by every verb: quiet third-party libraries, lmtune's log handlers, progress bars.

The ground floor of lmtune (with ``errors`` and ``paths``): anything may use it, it uses nothing of lmtune.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger("lmtune")

# Set beside HF_HUB_OFFLINE=1 when lmtune, not the user, set it (and inherited by worker processes), so that an
# explicit `model.download: true` can tell lmtune's default from the user's own offline switch.
HUB_OFFLINE_DEFAULT = "LMTUNE_HUB_OFFLINE_DEFAULT"


def quiet_libraries() -> None:
    """Silence third-party progress bars and load reports that would bury lmtune's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "HF_HUB_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ[HUB_OFFLINE_DEFAULT] = "1"
    # Imported here, not at the top: `lmtune --help` and the other light verbs must not pay for them.
    import datasets  # noqa: PLC0415  (start-up time: seconds of import for every verb otherwise)
    import transformers  # noqa: PLC0415  (start-up time, as above)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    # "Removed shared tensor ... while saving": tied embeddings are saved once, as intended.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    # peft asks transformers with a name deprecated in 5.x; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


@contextlib.contextmanager
def run_logging(run_dir: Path, main_process: bool) -> Iterator[None]:
    """Log lmtune's messages to the console (rich) and to ``train.log`` in the run folder."""
    handlers: list[logging.Handler] = []
    if main_process:
        console = RichHandler(show_path=False, markup=False, rich_tracebacks=False, log_time_format="[%X]")
        console.setLevel(logging.INFO)
        handlers.append(console)
        file = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file.setLevel(logging.DEBUG)
        handlers.append(file)
    old_level = log.level
    log.setLevel(logging.DEBUG)
    for h in handlers:
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(old_level)


def make_progress(enabled: bool) -> Any:
    """A rich progress bar with loss, learning rate, tokens/s, elapsed time and ETA."""
    class StatsColumn(ProgressColumn):
        """Loss, learning rate and throughput, shown once the loop has reported them."""

        def render(self, task: Any) -> Text:
            f = task.fields
            parts = []
            if "loss" in f:
                parts.append(f"loss {f['loss']:.4f}")
            if "lr" in f:
                parts.append(f"lr {f['lr']:.2e}")
            if "tok_s" in f:
                parts.append(f"{f['tok_s']:,.0f} tok/s")
            elif task.speed:
                parts.append(f"{task.speed:,.1f} it/s")
            return Text("  ".join(parts))

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        StatsColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
        refresh_per_second=2,
    )
