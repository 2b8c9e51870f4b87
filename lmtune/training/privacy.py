"""Differentially private training (``train.privacy``): DP-SGD through Opacus, inside lmtune's one loop.

DP-SGD bounds what the trained weights can reveal about any one training example. Each step:

1. **Poisson sampling** (:class:`PoissonBatches`): every training example joins the batch independently with
   probability ``q = train.batch_size / N``, the sampling the privacy analysis assumes. Batches vary in size
   and may be empty (the step then adds noise only). Drawn from ``(seed, epoch)`` alone, like lmtune's other
   batch orders, so a resumed run draws the same batches.
2. **Per-example gradients**: Opacus's hooks (``GradSampleHooks``, attached to the model without wrapping it,
   so state-dict keys, checkpoints and the saved model stay as they are) compute each example's gradient of
   the task's summed loss (``loss_reduction="sum"``: the gradient of ``loss_i`` itself, whatever the batch).
   An embedding looked up once for the whole batch (BERT's position embeddings, ids of shape (1, T)) is looked
   up per example (:meth:`PrivateTraining._per_example_lookup`), or its per-example gradient would not exist.
3. **Clipping and noise** (Opacus's ``DPOptimizer`` around lmtune's AdamW): each example's whole gradient is
   clipped to ``train.privacy.max_grad_norm``, the clipped gradients are summed, Gaussian noise of standard
   deviation ``noise_multiplier * max_grad_norm`` is added, and the sum is divided by the *expected* batch size
   ``q * N`` (an unbiased mean that does not reveal the drawn batch's size). lmtune's own ``train.max_grad_norm``
   does not run on top.
4. **Accounting**: the noise multiplier is calibrated before training so that the planned steps spend exactly
   the target ``epsilon`` at ``delta`` (``opacus.accountants.utils.get_noise_multiplier``); the accountant
   counts every step taken, and the spent epsilon is logged in ``metrics.jsonl`` and reported. Its history goes
   into every checkpoint (``loop_state.json``, ``privacy``), so a resumed run reports what an uninterrupted one
   does. The noise is drawn from torch's global generator, whose state Accelerate checkpoints per process.

What DP cannot do correctly here is refused when the config loads (``config.schema.check_privacy_config``)
or before anything loads (:func:`check_privacy_supported`).
"""

from __future__ import annotations

import functools
import logging
import math
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmtune.config import Config
from lmtune.config.schema import PrivacyConfig
from lmtune.data.features import LengthGroupedBatchSampler
from lmtune.errors import ConfigError, LmtuneError, RunError

if TYPE_CHECKING:
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

log = logging.getLogger(__name__)

# opacus calls logging.basicConfig() when it is imported (opacus/utils/module_utils.py): a root handler on
# stderr that printed every lmtune message a second time, DEBUG lines included, under the console's own.
# Configuring logging is the application's job; only that handler (its exact format) is taken away.
_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


@functools.cache
def _opacus() -> types.SimpleNamespace:
    """What lmtune uses of Opacus, imported on first use: a private run's (Opacus and what it loads cost
    ~110 MB and ~1.4 s, which every other run and command would pay). Drops the root handler Opacus adds."""
    from opacus.accountants import create_accountant  # noqa: PLC0415  (loaded only for train.privacy)
    from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415  (loaded only for train.privacy)
    from opacus.grad_sample import GradSampleHooks  # noqa: PLC0415  (loaded only for train.privacy)
    from opacus.optimizers import DPOptimizer  # noqa: PLC0415  (loaded only for train.privacy)
    from opacus.validators import ModuleValidator  # noqa: PLC0415  (loaded only for train.privacy)

    for handler in list(logging.root.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler.formatter, "_fmt", None) == _OPACUS_FORMAT:
            logging.root.removeHandler(handler)
    return types.SimpleNamespace(create_accountant=create_accountant, get_noise_multiplier=get_noise_multiplier,
                                 GradSampleHooks=GradSampleHooks, DPOptimizer=DPOptimizer,
                                 ModuleValidator=ModuleValidator)

# How close the calibrated noise brings the planned run's epsilon to the target (from below).
EPSILON_TOLERANCE = 0.01


class PrivacyError(LmtuneError):
    """Differentially private training cannot go on correctly (a gradient that is not per example, ...)."""


def check_privacy_supported(config: Config, num_processes: int) -> None:
    """Refuse, before anything loads, what ``train.privacy`` cannot do on this launch (several processes)."""
    if config.train.privacy is not None and num_processes > 1:
        raise ConfigError(f"train.privacy trains in one process: {num_processes} processes would each draw their "
                          "own batches, which the privacy accounting does not cover",
                          hint="run with one process (no --num-processes), or leave out train.privacy")


def default_delta(train_size: int) -> float:
    """``delta`` when ``train.privacy.delta`` is unset: 1 / (10 N), well below the 1 / N at which an
    (epsilon, delta) guarantee would allow publishing one whole example."""
    return 1.0 / (10.0 * max(train_size, 1))


class PoissonBatches(LengthGroupedBatchSampler):
    """Poisson-sampled batches: each example joins each batch independently with probability ``q``.

    An "epoch" is ``ceil(N / batch_size)`` draws (N examples seen once each on average). The size of a draw is
    Binomial(N, q) and its members a uniform subset of that size, which is the same distribution as one coin
    per example, at the cost of the batch's size rather than N. Everything comes from ``(seed, epoch)``, never
    from global RNG state, so a resumed run (and a loader that skips the epoch's first batches) sees exactly
    the draws of the uninterrupted run.
    """

    def __init__(self, train_size: int, batch_size: int, *, seed: int) -> None:
        super().__init__([], batch_size, seed=seed, shuffle=True, group_by_length=False)
        self.train_size = train_size
        self.sample_rate = min(1.0, batch_size / max(train_size, 1))

    def batches(self) -> list[list[int]]:
        """All draws of the current epoch, in order (each sorted; possibly empty)."""
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, 0x5EED]))
        out = []
        for _ in range(len(self)):
            size = int(rng.binomial(self.train_size, self.sample_rate))
            out.append(sorted(rng.choice(self.train_size, size=size, replace=False).tolist()))
        return out

    def __len__(self) -> int:
        return max(1, math.ceil(self.train_size / self.batch_size))


class _EmptySafeCollate:
    """The task's collator, except that an empty Poisson draw becomes an empty batch ``{}`` (the loop adds
    ``example_ids``; :func:`is_empty` recognises it) instead of reaching a collator that expects examples."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return self.collate(items) if items else {}


def is_empty(batch: dict[str, torch.Tensor]) -> bool:
    """Whether a training batch is an empty Poisson draw (nothing but, perhaps, its empty ``example_ids``)."""
    return not (set(batch) - {"example_ids"})


class PrivateTraining:
    """DP-SGD for one run: the sampler, the per-example gradients, the DP optimizer and the accountant."""

    def __init__(self, settings: PrivacyConfig, *, train_size: int, batch_size: int, seed: int) -> None:
        self.settings = settings
        self.train_size = train_size
        self.batch_size = batch_size
        self.seed = seed
        self.delta = settings.delta if settings.delta is not None else default_delta(train_size)
        if self.delta >= 1.0 / max(train_size, 1):
            log.warning("train.privacy.delta %g is at least 1 / N (N = %d training examples): such a guarantee "
                        "allows one example to be published whole; choose delta well below %g", self.delta,
                        train_size, 1.0 / max(train_size, 1))
        self.sample_rate = min(1.0, batch_size / max(train_size, 1))
        self.accountant = _opacus().create_accountant(mechanism=settings.accountant)
        self.noise_multiplier: float | None = None
        self.planned_steps: int | None = None
        self.hooks: GradSampleHooks | None = None
        self.params: list[torch.nn.Parameter] = []
        self._names: dict[int, str] = {}
        self._handles: list[Any] = []
        self._batch_size_now = 0

    # ----------------------------------------------------------------------------- data
    def batch_sampler(self, lengths: list[int]) -> LengthGroupedBatchSampler:
        """Poisson draws (``poisson_sampling``), or shuffled fixed-size batches without length grouping (the
        common approximation: the accounting then assumes Poisson sampling it did not get)."""
        if self.settings.poisson_sampling:
            return PoissonBatches(len(lengths), self.batch_size, seed=self.seed)
        return LengthGroupedBatchSampler(lengths, self.batch_size, seed=self.seed, group_by_length=False)

    def collator(self, collate: Callable[[list[Any]], dict[str, torch.Tensor]]) -> Callable[[list[Any]], Any]:
        """``collate`` made safe for empty draws."""
        return _EmptySafeCollate(collate)

    # ----------------------------------------------------------------------------- model and optimizer
    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               planned_steps: int) -> DPOptimizer:
        """Compute per-example gradients on ``model`` and return ``optimizer`` wrapped to clip and noise them,
        with the noise calibrated to spend ``epsilon`` over ``planned_steps``."""
        training = model.training
        model.train()  # the validator checks the training-mode model (and refuses an eval-mode one)
        opacus = _opacus()
        problems = (opacus.ModuleValidator.validate(model, strict=False)
                    + opacus.GradSampleHooks.validate(model, strict=False))
        model.train(training)
        if problems:
            raise ConfigError(f"train.privacy: this model has layers whose per-example gradients Opacus cannot "
                              f"compute: {'; '.join(str(p) for p in problems[:3])}",
                              hint="use another model or method, or leave out train.privacy")
        self.planned_steps = planned_steps
        self.noise_multiplier = self._calibrate(planned_steps)
        # Opacus's full backward hooks on the first trainable layer fire with no input needing a gradient (the
        # token ids); torch warns at every step though the per-example gradients are right.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs")
        self.hooks = opacus.GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=True)
        self._per_example_lookup(model)
        dp = opacus.DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                         max_grad_norm=self.settings.max_grad_norm,
                         expected_batch_size=self.sample_rate * self.train_size,  # batch_size (float division)
                         loss_reduction="mean")
        dp.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        self.params = [p for p in dp.params if p.requires_grad]
        self._names = {id(p): name for name, p in model.named_parameters()}
        log.info("train.privacy: epsilon %g, delta %.3g over %d planned steps -> noise multiplier %.4f "
                 "(sample rate %.5f, per-example gradients clipped to %g, %s accountant)",
                 self.settings.epsilon, self.delta, planned_steps, self.noise_multiplier, self.sample_rate,
                 self.settings.max_grad_norm, self.settings.accountant)
        return dp

    def _calibrate(self, steps: int) -> float:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(_opacus().get_noise_multiplier(target_epsilon=self.settings.epsilon, target_delta=self.delta,
                                                  sample_rate=self.sample_rate, steps=steps,
                                                  accountant=self.settings.accountant,
                                                  epsilon_tolerance=EPSILON_TOLERANCE))
        except ValueError as exc:  # "The privacy budget is too low." (RDP has a floor near log(1/delta) / 62)
            raise ConfigError(f"train.privacy.epsilon {self.settings.epsilon:g} cannot be reached at delta "
                              f"{self.delta:.3g} over {steps} steps with sample rate {self.sample_rate:.4g} "
                              f"({exc})", hint="raise train.privacy.epsilon or delta, train fewer steps, or use "
                              "train.privacy.accountant prv (tighter for small epsilon)") from None

    def _per_example_lookup(self, model: torch.nn.Module) -> None:
        """Make trainable embeddings that are looked up once for the whole batch look up per example.

        BERT adds position embeddings of ids (1, T) to (B, T, H) word embeddings by broadcasting; the hook then
        sees one lookup, and the gradient of each example is lost in the sum. Expanding the ids to (B, T)
        gives the same values, and a per-example gradient for each row.
        """

        def remember_batch(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            first = next((v for v in (*kwargs.values(), *args) if isinstance(v, torch.Tensor) and v.ndim), None)
            self._batch_size_now = int(first.shape[0]) if first is not None else 0

        def per_example(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            ids = args[0]
            if (module.training and torch.is_grad_enabled() and isinstance(ids, torch.Tensor) and ids.ndim >= 1
                    and ids.shape[0] == 1 and self._batch_size_now > 1):
                return (ids.expand(self._batch_size_now, *ids.shape[1:]), *args[1:])
            return None

        self._handles.append(model.register_forward_pre_hook(remember_batch, with_kwargs=True))
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad:
                self._handles.append(module.register_forward_pre_hook(per_example))

    def before_step(self, num_examples: int) -> None:
        """Check the per-example gradients of this step's ``num_examples`` examples before the DP optimizer
        clips and noises them; an empty draw gets empty ones (its step adds noise only)."""
        for p in self.params:
            grad_sample = getattr(p, "grad_sample", None)
            if grad_sample is None:
                # An empty draw, or a trainable weight this batch did not use: its per-example gradients are 0.
                p.grad_sample = torch.zeros(  # type: ignore[attr-defined]  # Opacus's attribute on parameters
                    (num_examples, *p.shape), dtype=p.dtype, device=p.device)
            elif isinstance(grad_sample, torch.Tensor) and grad_sample.shape[0] != num_examples:
                name = self._names.get(id(p), "a weight")
                raise PrivacyError(f"train.privacy: {name} has per-example gradients for {grad_sample.shape[0]} "
                                   f"examples in a batch of {num_examples}: the model applies it to the batch as "
                                   "a whole, so its gradient is not per example",
                                   hint="freeze that weight (method freeze or lora), or leave out train.privacy")

    # ----------------------------------------------------------------------------- accounting
    def spent_epsilon(self) -> float:
        """The epsilon spent by the steps taken so far (at ``delta``)."""
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(self.accountant.get_epsilon(delta=self.delta))

    def steps_taken(self) -> int:
        """Noised optimizer steps the accountant counted."""
        return int(sum(steps for _, _, steps in self.accountant.history))

    def log_figures(self) -> dict[str, float]:
        """Figures for a ``metrics.jsonl`` train row."""
        return {"epsilon": self.spent_epsilon()}

    def summary(self) -> dict[str, Any]:
        """What the run spent and how, for ``metrics.json``'s summary, the report and the model card."""
        return {
            "epsilon": self.spent_epsilon(), "target_epsilon": self.settings.epsilon, "delta": self.delta,
            "delta_default": self.settings.delta is None, "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.settings.max_grad_norm, "sample_rate": self.sample_rate,
            "expected_batch_size": self.sample_rate * self.train_size, "train_examples": self.train_size,
            "steps": self.steps_taken(), "planned_steps": self.planned_steps,
            "accountant": self.settings.accountant, "poisson_sampling": self.settings.poisson_sampling,
        }

    def state_dict(self) -> dict[str, Any]:
        """The accountant's history and the settings it was taken under (JSON), for ``loop_state.json``."""
        return {"mechanism": self.accountant.mechanism(), "history": [list(h) for h in self.accountant.history],
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "delta": self.delta}

    def load_state_dict(self, state: dict[str, Any] | None, checkpoint: str) -> None:
        """Reopen the accountant where the checkpoint left it; refuse one taken under other privacy settings."""
        if not state:
            raise RunError(f"checkpoint {checkpoint} was written without train.privacy, so the privacy spent "
                           "before it is unknown", hint="start the run again with --overwrite")
        mine = {"mechanism": self.accountant.mechanism(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta}
        differ = [k for k, v in mine.items() if state.get(k) != v]
        if differ:
            raise RunError(f"checkpoint {checkpoint} was written under other train.privacy settings "
                           f"({', '.join(f'{k} {state.get(k)} now {mine[k]}' for k in differ)})",
                           hint="resume with the settings the run started with, or start again with --overwrite")
        self.accountant.history = [tuple(h) for h in state["history"]]


def describe_privacy(summary: dict[str, Any]) -> str:
    """One sentence on what a DP run spent, for ``report.md`` and the model card (from :meth:`PrivateTraining.summary`)."""
    delta = f"{summary['delta']:.2g}" + (" (default 1/(10 N))" if summary.get("delta_default") else "")
    sampling = "Poisson-sampled batches" if summary.get("poisson_sampling") else "shuffled fixed-size batches"
    return (f"differential privacy (DP-SGD, Opacus): epsilon {summary['epsilon']:.3g} spent of "
            f"{summary['target_epsilon']:g} at delta {delta} ({summary['accountant']} accountant) over "
            f"{summary['steps']} steps; each example's gradient clipped to {summary['max_grad_norm']:g}, noise "
            f"multiplier {summary['noise_multiplier']:.3g}, sample rate {summary['sample_rate']:.3g} "
            f"({sampling}, expected batch {summary['expected_batch_size']:.0f} of {summary['train_examples']:,} "
            "training examples)")
