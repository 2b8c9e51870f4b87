"""``task: dpo``: direct preference optimisation against the starting model (the reference).

The loss (``preference.loss``) compares the log-ratios to the reference of the chosen and the rejected answer,
``d = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))``: ``sigmoid`` is DPO's
``-log sigmoid(beta d)`` (with ``label_smoothing`` the conservative cDPO), ``ipo`` IPO's squared distance of
the per-token-normalised margin to ``1 / (2 beta)``, ``hinge`` SLiC's ``relu(1 - beta d)``, ``robust`` the
rDPO loss that is unbiased when a ``label_smoothing`` share of pairs is flipped. Equal to TRL's DPOTrainer
(tests/test_preference_losses.py). The reference log-probs are computed once (:mod:`lmtune.tasks.preference`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.dpo.info import INFO
from lmtune.tasks.preference import PairTask
from lmtune.tasks.preference_losses import dpo_losses


class DPOTask(PairTask):
    """DPO and its variants on preference pairs, relative to the starting model."""

    info: ClassVar[TaskInfo] = INFO
    uses_reference = True

    def pair_losses(self, logps: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) DPO losses and implicit rewards ``beta * (log pi - log ref)`` of both answers."""
        assert reference is not None
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = tokens.chunk(2)
        return dpo_losses(chosen, rejected, reference[:, 0], reference[:, 1], n_chosen, n_rejected,
                          loss=self.pref.loss, beta=self.beta, label_smoothing=self.pref.label_smoothing)
