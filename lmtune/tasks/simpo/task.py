"""``task: simpo``: simple preference optimisation, no reference model.

The implicit reward of an answer is ``beta`` times its mean per-token log-prob; the loss asks the chosen
answer's reward to beat the rejected one's by a margin ``gamma = gamma_beta_ratio * beta``:
``-log sigmoid(beta (avg log pi(chosen) - avg log pi(rejected)) - gamma)`` (``label_smoothing`` as in cDPO).
Equal to TRL's CPOTrainer with ``loss_type="simpo"`` (tests/test_preference_losses.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.preference import PairTask
from lmtune.tasks.preference_losses import simpo_losses
from lmtune.tasks.simpo.info import INFO


class SIMPOTask(PairTask):
    """SimPO on preference pairs."""

    info: ClassVar[TaskInfo] = INFO
    default_beta = 2.0

    def pair_losses(self, logps: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) SimPO losses and rewards ``beta * mean log-prob`` of both answers."""
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = tokens.chunk(2)
        return simpo_losses(chosen, rejected, n_chosen, n_rejected, beta=self.beta,
                            gamma_beta_ratio=self.pref.gamma_beta_ratio, label_smoothing=self.pref.label_smoothing)
