"""``task: orpo``: odds-ratio preference optimisation, no reference model.

One loss does supervised tuning and preference at once: the chosen answers' mean token NLL plus ``beta``
times ``-log sigmoid(log odds(chosen) - log odds(rejected))``, where ``odds(y) = p / (1 - p)`` of the answer's
mean per-token probability ``p``. The NLL covers the chosen answer's tokens, as the ORPO paper writes it and as
``sft`` trains; TRL's ORPOTrainer also counts the prompt's tokens in it. Given the same NLL tokens the loss and
its gradients equal TRL's (tests/test_preference_losses.py). Each pair carries its share of the batch's
token-mean NLL, so with gradient accumulation a step's NLL is the mean of its micro-batches' token means.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.orpo.info import INFO
from lmtune.tasks.preference import PairTask
from lmtune.tasks.preference_losses import orpo_losses


class ORPOTask(PairTask):
    """ORPO on preference pairs."""

    info: ClassVar[TaskInfo] = INFO

    def pair_losses(self, logps: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) ORPO losses and rewards ``beta * mean log-prob`` of both answers."""
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = tokens.chunk(2)
        losses, r_chosen, r_rejected, _ = orpo_losses(chosen, rejected, n_chosen, n_rejected, beta=self.beta)
        return losses, r_chosen, r_rejected
