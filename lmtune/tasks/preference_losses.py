"""The losses of preference tuning and RL from rewards (DPO and its variants, SimPO, ORPO, KTO, GRPO), as pure
functions of per-sequence or per-token log-probabilities, each equal to TRL 1.16's own computation.

The tasks compute log-probabilities with ``completion_token_logps`` from one forward pass (for pairs, one
concatenated batch: ``[chosen rows; rejected rows]``) and sum them per row. The training loop wants from a
task the *sum* of per-item losses of a micro-batch and divides by the item count of the whole step, so the
pair and example losses here are *per item*, shape ``(B,)``, and their *mean* over a batch is TRL's loss for
that batch; GRPO's are per token, shape ``(B, T)``, and their sum over the tokens divided by the number of
completion tokens is TRL's. ``tests/test_preference_losses.py`` checks losses and gradients against TRL's
trainers on a tiny model.

A shared module of the tasks, not a task folder: the preference task folders import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtune.data.features import IGNORE_INDEX

# The pair losses ``dpo_losses`` knows, with TRL's names (DPOConfig.loss_type).
PAIR_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
# How ``group_advantages`` scales the centred rewards (GRPOConfig.scale_rewards).
ADVANTAGE_SCALES = ("group", "batch", "none")
# Scored positions whose log-softmax runs at once: bounds the float32 copy to this many rows of the vocabulary.
LOGPS_CHUNK_TOKENS = 1024
# Added to the standard deviation before dividing by it (TRL's constant), so a group of equal rewards gives 0.
ADVANTAGE_STD_EPSILON = 1e-4


# ------------------------------------------------------------------------------------------ log-probabilities
def completion_token_logps(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    """The log-probability of each next token, ``(B, T)`` float32: column ``t`` holds
    ``log p(labels[:, t+1] | tokens <= t)``, 0 where ``labels[:, t+1]`` is ``IGNORE_INDEX`` and in the last column.

    ``labels`` ``(B, T)`` are aligned with ``input_ids`` (``IGNORE_INDEX`` on prompt and padding). ``logits`` are
    ``(B, T, V)``, or ``(B, k, V)`` for the last ``k`` positions only (a forward with transformers'
    ``logits_to_keep=k``): they then stand for positions ``T-k .. T-1``, so they score the labels from
    ``T-k+1`` on, and every earlier label must be ``IGNORE_INDEX`` (ValueError otherwise). The result is the same
    ``(B, T)`` either way. ``temperature`` divides the logits first (TRL's GRPO scores its samples so).

    The math is float32 whatever the logits' dtype, and touches only the scored positions: they are gathered
    once (a copy of ``(scored tokens, V)``, not of ``(B, T, V)``) and their log-softmax runs in chunks of
    ``LOGPS_CHUNK_TOKENS`` so the float32 temporary stays small. A row sum gives the sequence's log-probability.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits (B, k, V) and labels (B, T) expected, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    length, kept = labels.shape[1], logits.shape[1]
    if not 1 <= kept <= length:
        raise ValueError(f"logits cover {kept} positions of labels' {length}")
    first = length - kept  # the position of logits[:, 0]
    if first and bool((labels[:, 1:first + 1] != IGNORE_INDEX).any()):
        raise ValueError(f"labels before position {first + 1} carry loss but the logits cover only the last {kept} "
                         "positions (logits_to_keep too small)")
    targets = labels[:, first + 1:]  # (B, k-1): the token each kept position but the last predicts
    scored = targets != IGNORE_INDEX  # (B, k-1)
    hidden = logits[:, :-1][scored]  # (N, V): only the scored positions, in the logits' dtype
    wanted = targets[scored]  # (N,)
    parts = []
    for rows, ids in zip(hidden.split(LOGPS_CHUNK_TOKENS), wanted.split(LOGPS_CHUNK_TOKENS), strict=True):
        rows = rows.float()  # (n, V): a copy only when the logits are half precision
        if temperature != 1.0:
            rows = rows / temperature
        parts.append(rows.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(rows, dim=-1))
    picked = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    # masked_scatter keeps the result connected to the logits even when no token is scored.
    per_token = torch.zeros(scored.shape, dtype=torch.float32, device=logits.device).masked_scatter(scored, picked)
    return F.pad(per_token, (first, 1))  # (B, T): nothing before the kept positions, nothing after the last


# ------------------------------------------------------------------------------------------ pairs
def _check_smoothing(label_smoothing: float, upper: float, *, closed: bool) -> None:
    if not (0.0 <= label_smoothing <= upper if closed else 0.0 <= label_smoothing < upper):
        raise ValueError(f"label_smoothing must be in [0, {upper}{']' if closed else ')'}, got {label_smoothing}")


def _smoothed_logsigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    # The conservative form: the preference is taken to be flipped with probability `label_smoothing`.
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_losses(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
               chosen_tokens: Tensor, rejected_tokens: Tensor, *, loss: str, beta: float,
               label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO per pair: ``(loss (B,), chosen rewards (B,), rejected rewards (B,))``, the rewards
    ``beta * (logp - ref logp)`` detached. The mean of the losses is TRL 1.16's ``DPOTrainer`` loss.

    All inputs are ``(B,)``: the summed log-probabilities of each answer under the policy and the reference, and
    each answer's token count (IPO normalises by it). ``loss``, with ``d`` the difference of the chosen and the
    rejected log-ratios:

    - ``sigmoid``: ``-logsigmoid(beta d)``; with ``label_smoothing`` in (0, 0.5] the conservative DPO (cDPO)
      ``-(1-ls) logsigmoid(beta d) - ls logsigmoid(-beta d)``. TRL 1.16's sigmoid has no label smoothing (it equals
      this at 0); cDPO is TRL's CPO sigmoid formula applied to the log-ratios.
    - ``ipo``: ``(d' - 1/(2 beta))**2`` with ``d'`` the difference of the *per-token* log-ratios (TRL's form).
    - ``hinge``: ``relu(1 - beta d)``.
    - ``robust``: the unbiased noisy-label loss, ``label_smoothing`` in [0, 0.5).
    """
    if loss not in PAIR_LOSSES:
        raise ValueError(f"unknown pair loss {loss!r}; expected one of {', '.join(PAIR_LOSSES)}")
    if loss in ("ipo", "hinge") and label_smoothing:
        raise ValueError(f"the {loss} loss has no label smoothing (got {label_smoothing})")
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps
    margin = beta * (chosen_logratios - rejected_logratios)
    if loss == "sigmoid":
        _check_smoothing(label_smoothing, 0.5, closed=True)
        losses = _smoothed_logsigmoid_loss(margin, label_smoothing)
    elif loss == "ipo":
        per_token = (chosen_logratios / chosen_tokens.clamp(min=1)
                     - rejected_logratios / rejected_tokens.clamp(min=1))
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - margin)
    else:
        _check_smoothing(label_smoothing, 0.5, closed=False)
        losses = (-(1 - label_smoothing) * F.logsigmoid(margin)
                  + label_smoothing * F.logsigmoid(-margin)) / (1 - 2 * label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_losses(chosen_logps: Tensor, rejected_logps: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor, *,
                 beta: float, gamma_beta_ratio: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO per pair, no reference model: ``(loss (B,), chosen rewards (B,), rejected rewards (B,))``.

    The log-probabilities are averaged over each answer's tokens (an empty answer counts as one token);
    the loss is ``-logsigmoid(beta (avg_c - avg_r - gamma_beta_ratio))`` (label-smoothed as cDPO), the rewards
    ``beta * avg`` detached. The mean is TRL's ``CPOTrainer`` loss with ``loss_type="simpo"``, ``cpo_alpha=0``
    and ``simpo_gamma = gamma_beta_ratio * beta``.
    """
    _check_smoothing(label_smoothing, 0.5, closed=True)
    chosen_avg = chosen_logps / chosen_tokens.clamp(min=1)  # (B,)
    rejected_avg = rejected_logps / rejected_tokens.clamp(min=1)
    losses = _smoothed_logsigmoid_loss(beta * (chosen_avg - rejected_avg - gamma_beta_ratio), label_smoothing)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def _log1mexp(x: Tensor) -> Tensor:
    # log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2.
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(chosen_logps: Tensor, rejected_logps: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor, *,
                beta: float, nll_logps: Tensor | None = None, nll_tokens: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO per pair: ``(loss (B,), chosen rewards (B,), rejected rewards (B,), log odds ratio (B,))``.

    The loss is the batch token-mean NLL of the chosen answers plus ``-beta * mean(logsigmoid(log odds ratio))``,
    the odds from the token-averaged log-probabilities. Each pair carries its share of the NLL, so the *mean* of
    the losses is the batch's total (the share depends on the batch's token count: a pair's loss is not
    meaningful alone). Rewards ``beta * avg logp`` and the log odds ratio are detached.

    TRL's ``ORPOTrainer`` takes the NLL over the prompt *and* the chosen answer (every attended token of the
    chosen rows); pass their summed log-probabilities and counts as ``nll_logps``/``nll_tokens`` (B,) to get its
    loss exactly. By default the NLL covers the chosen answer only, as the ORPO paper writes it.
    """
    chosen_avg = (chosen_logps / chosen_tokens.clamp(min=1)).float()  # (B,)
    rejected_avg = (rejected_logps / rejected_tokens.clamp(min=1)).float()
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    if nll_logps is None or nll_tokens is None:
        if (nll_logps is None) != (nll_tokens is None):
            raise ValueError("nll_logps and nll_tokens go together")
        nll_logps, nll_tokens = chosen_logps, chosen_tokens
    # -sum(nll_logps) / sum(nll_tokens), spread over the B pairs so that their mean gives it back.
    nll = -nll_logps.float() * (nll_logps.shape[0] / nll_tokens.sum().clamp(min=1))
    losses = nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach(), log_odds.detach()


# ------------------------------------------------------------------------------------------ KTO
def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point, a 0-dim detached tensor: ``clamp(mean(policy - ref), min=0)`` over the summed
    log-probabilities ``(B,)`` of mismatched (prompt, completion) pairs (TRL rotates each batch's completions by
    one). On several processes TRL averages the unclamped means of all processes before the clamp."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_losses(logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor, *, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """KTO per example: ``(loss (B,), rewards (B,))``, the rewards ``beta * (logp - ref logp)`` detached.

    ``desirable`` (B,) bool marks the good completions: their loss is ``w_d (1 - sigmoid(beta (r - kl)))``,
    the others' ``w_u (1 - sigmoid(beta (kl - r)))`` with ``r`` the log-ratio and ``kl`` from ``kto_kl``.
    The mean is TRL's ``KTOTrainer`` loss (``loss_type="kto"``) for the batch.
    """
    logratios = logps - ref_logps  # (B,)
    good = desirable.to(torch.bool)
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))
    return losses, beta * logratios.detach()


# ------------------------------------------------------------------------------------------ GRPO
def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    # The sample (Bessel-corrected) standard deviation of the non-NaN values; NaN where fewer than two.
    mean = x.nanmean() if dim is None else x.nanmean(dim, keepdim=True)
    sq = (x - mean) ** 2
    var = sq.nanmean() if dim is None else sq.nanmean(dim, keepdim=True)
    count = (~x.isnan()).sum() if dim is None else (~x.isnan()).sum(dim, keepdim=True)
    return torch.where(count > 1, var * count / (count - 1), torch.nan).sqrt()


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group") -> Tensor:
    """GRPO's advantages ``(B,)`` for ``B = prompts x group_size`` rewards laid out group by group: each reward
    minus its group's mean, divided by ``std + 1e-4`` where ``scale`` (TRL's ``scale_rewards``) is ``"group"``
    (the group's sample std) or ``"batch"`` (the whole batch's), undivided for ``"none"``.

    A NaN reward (an unscorable completion) is left out of the statistics and gets advantage 0, as in TRL; so
    does every member of a group whose std is undefined (a single scorable reward)."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {', '.join(ADVANTAGE_SCALES)}")
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not form groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (prompts, group_size)
    centred = grouped - grouped.nanmean(1, keepdim=True)
    if scale == "group":
        std = _nanstd(grouped, 1) if group_size > 1 else torch.zeros_like(grouped)
        centred = centred / (std + ADVANTAGE_STD_EPSILON)
    elif scale == "batch":
        std = _nanstd(grouped) if grouped.numel() > 1 else grouped.new_zeros(())
        centred = centred / (std + ADVANTAGE_STD_EPSILON)
    return torch.nan_to_num(centred.view(-1), nan=0.0)


def grpo_token_losses(per_token_logps: Tensor, old_per_token_logps: Tensor | None,
                      ref_per_token_logps: Tensor | None, advantages: Tensor, completion_mask: Tensor, *,
                      beta: float, epsilon_low: float = 0.2, epsilon_high: float = 0.2, delta: float | None = None,
                      bias_corrected_kl: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO per completion token: ``(loss (B, T), stats)``, 0 where ``completion_mask`` is 0.

    The clipped ratio objective ``-min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A)`` with
    ``ratio = exp(logp - old logp)`` per token, plus ``beta`` times the k3 estimate of the KL to the reference
    (``exp(ref - logp) - (ref - logp) - 1``), multiplied by the (differentiable) ratio when ``bias_corrected_kl``
    (TRL's ``use_bias_correction_kl``, on by default in 1.16: the unbiased reverse-KL gradient; it changes the
    gradient even on-policy, where the ratio is 1). ``old_per_token_logps`` None: the detached current log-probs
    (one update per generation); ``ref_per_token_logps`` None: no KL term. ``delta`` caps the unclipped ratio
    (TRL's two-sided clipping, off when None). Inputs are ``(B, T)`` over the completion tokens (log-probs under
    the sampling temperature, see ``completion_token_logps``), ``advantages`` ``(B,)``.

    TRL 1.16's default ``loss_type`` is ``"dapo"``: the sum of these losses over the completion tokens of the
    whole accumulated generation batch divided by their count; so the SUM of this ``(B, T)`` divided by the
    step's completion-token count is TRL's loss. Stats (0-dim, detached): ``kl`` (mean of the KL term over
    completion tokens, ratio-weighted as it enters the loss; 0 without a reference), ``clip_ratio/low``,
    ``clip_ratio/high``, ``clip_ratio/region`` (fractions of completion tokens whose ratio the clip holds back),
    each as TRL logs it.
    """
    mask = completion_mask.to(torch.bool)  # (B, T)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    ratio = torch.exp(per_token_logps - old)  # (B, T)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    losses = -torch.min(unclipped * adv, clipped * adv)
    tokens = mask.sum().clamp(min=1)

    def token_mean(x: Tensor) -> Tensor:
        return (x.detach().float() * mask).sum() / tokens

    kl = torch.zeros((), device=per_token_logps.device)
    if ref_per_token_logps is not None:
        gap = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(gap) - gap - 1  # (B, T), >= 0
        if bias_corrected_kl:
            per_token_kl = per_token_kl * ratio
        losses = losses + beta * per_token_kl
        kl = token_mean(per_token_kl)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    stats = {"kl": kl, "clip_ratio/low": token_mean(low), "clip_ratio/high": token_mean(high),
             "clip_ratio/region": token_mean(low | high)}
    return torch.where(mask, losses, torch.zeros_like(losses)), stats
