"""Task figures summed over the training steps since the last log row (``Task.step_metrics``), per process,
summed over every process when logged, and saved in checkpoints with the window still open
(``Task.step_metrics_state``), so a resumed run logs the rows the uninterrupted one does."""

from __future__ import annotations

from typing import Any

import torch


class StepWindow:
    """``size`` float64 sums, this process's, since the last log row."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.sums = torch.zeros(self.size, dtype=torch.float64)

    def add(self, values: torch.Tensor | list[float]) -> None:
        """Add ``size`` figures (or the first ones) to the sums."""
        values = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
        self.sums[: values.numel()] += values

    def state(self, accelerator: Any) -> list[float]:
        """The sums over every process (a collective: every process calls it); the window stays open."""
        sums = self.sums.clone()
        if accelerator is not None and accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        return [float(v) for v in sums]

    def take(self, accelerator: Any) -> list[float]:
        """The sums over every process (a collective), and a new window."""
        out = self.state(accelerator)
        self.reset()
        return out

    def load(self, state: list[float], accelerator: Any) -> None:
        """Reopen a saved window: its sums on the main process, zeros elsewhere (:meth:`take` adds them up)."""
        self.reset()
        if len(state) == self.size and (accelerator is None or accelerator.is_main_process):
            self.sums = torch.tensor(state, dtype=torch.float64)
