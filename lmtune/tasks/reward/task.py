"""Reward models (``task: reward``): a decoder with a scalar head, trained on preference pairs.

The model is ``AutoModelForSequenceClassification`` with one output (``num_labels=1``) on a pretrained decoder
(SmolLM2, a Llama ...): its new ``score`` head reads the hidden state of each sequence's last token. The loss
is Bradley-Terry's ``-log sigmoid(r_chosen - r_rejected)`` per pair, as TRL's ``RewardTrainer`` computes it
(``tests/test_reward_task.py`` checks the two agree, loss and gradients); a batch of B pairs goes through the
model as one (2B, T) batch, chosen rows first, right-padded together (:class:`lmtune.tasks.preference.PairCollator`).

Data: preference pairs read and rendered by :mod:`lmtune.data.preference` exactly as the chat tasks render a
conversation (the prompt and one answer with the model's chat template, end-of-turn token included), so the
reward model scores the text a policy tuned by ``sft``/``dpo``/``grpo`` writes.

Which token is scored: transformers' sequence-classification head reads the last token whose id is not
``config.pad_token_id``. Padding with EOS (SmolLM2 pads with its ``<|im_end|>``) would score a sequence that ends
with EOS at the token before it, so :func:`use_scoring_pad_token` gives the tokenizer a pad token that never
ends a turn (its unk or bos token, else a new ``<|pad|>``); the saved model and tokenizer keep it, and plain
transformers reads every row at its true last token.

Evaluation: loss, pair accuracy (``r_chosen > r_rejected``), mean margin and mean rewards of both answers,
gathered per pair across processes; the final evaluation also keeps the margins for the report's histogram.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification

from lmtune.config import Config
from lmtune.config.tasks import TaskInfo
from lmtune.data.chat import end_of_turn_ids, ensure_chat_template
from lmtune.data.preference import (
    PreferencePair,
    RenderedPair,
    preference_splits,
    read_preference_pairs,
)
from lmtune.errors import ConfigError, ModelError
from lmtune.evaluate.plots import figure, note, save_figure
from lmtune.evaluate.report import Report
from lmtune.evaluate.step_window import StepWindow
from lmtune.models.loading import load_pretrained
from lmtune.models.registry import load_padded_tokenizer, model_path_of
from lmtune.tasks.base import Task, TaskData
from lmtune.tasks.decoder import refuse_streaming
from lmtune.tasks.preference import PairCollator, count_pair_problems, pair_features, render_split
from lmtune.tasks.preference_inspect import inspect_pairs, render_pairs_report
from lmtune.tasks.reward.info import INFO
from lmtune.tasks.reward.predict import rewards

log = logging.getLogger(__name__)

# The pad token added to a tokenizer whose unk and bos tokens are missing or end a turn.
PAD_TOKEN = "<|pad|>"
# Margins kept per split for the report's histogram (the metrics themselves use every pair).
MARGINS_KEPT = 5000


def use_scoring_pad_token(tokenizer: Any) -> bool:
    """Give ``tokenizer`` a pad token that never ends a scored sequence; True when a token was added.

    The pad token is kept unless it is the EOS or an end-of-turn token (then a rendered answer ending with it
    would be scored one token early); the unk token, then the bos token, replace it where neither ends a turn;
    else ``<|pad|>`` is added (the model's embeddings must then grow by one row).
    """
    ends = end_of_turn_ids(tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ends:
        return False
    for token in (tokenizer.unk_token, tokenizer.bos_token):
        if token is not None and tokenizer.convert_tokens_to_ids(token) not in ends:
            tokenizer.pad_token = token
            return False
    return bool(tokenizer.add_special_tokens({"pad_token": PAD_TOKEN}))


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(B,) per-pair losses ``-log sigmoid(r_chosen - r_rejected)``; their mean is TRL's RewardTrainer loss."""
    return -F.logsigmoid(chosen - rejected)


class RewardTask(Task):
    """A scalar head on a decoder, trained so chosen answers score above rejected ones."""

    info: ClassVar[TaskInfo] = INFO
    model_class: ClassVar[type] = AutoModelForSequenceClassification
    peft_task_type: ClassVar[str | None] = "SEQ_CLS"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_cfg = config.data
        self.tokenizer: Any = None  # set by load_tokenizer (or by prepare, for a saved model's evaluation)
        self.phase = "training"
        self.chat_template_source = "model"
        self.base_vocab: int | None = None  # the tokenizer's size before lmtune added tokens
        self.new_modules: list[str] = []
        # Training pairs since the last log row: (right, summed margin, count), summed over processes when logged.
        self._step_sums = StepWindow(3)
        self._accelerator: Any = None  # the training run's (before_training)

    @property
    def rows_per_example(self) -> int:
        """A pair's chosen and rejected answers go through the model together."""
        return 2

    def model_path(self) -> Path | None:
        """The configured (pretrained) model's folder."""
        return model_path_of(self.config.model)

    def evaluation_phase(self, phase: str) -> None:
        """``final`` evaluations also keep the margins (for the report's histogram)."""
        self.phase = phase

    # ------------------------------------------------------------------------------ tokenizer
    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The model's tokenizer, right-padded, with a chat template (ChatML added when the model has none, as
        for ``sft``) and a pad token that never ends a turn (:func:`use_scoring_pad_token`)."""
        assert model_path is not None
        tok = load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)
        self.base_vocab = len(tok)
        had_template = bool(tok.chat_template)
        ensure_chat_template(tok)
        if not had_template:
            self.chat_template_source = "default"
            log.warning("the model has no chat template; using lmtune's ChatML default (saved with the model)")
        before = tok.pad_token
        if use_scoring_pad_token(tok) or tok.pad_token != before:
            log.info("pad token %r (was %r): the reward head reads each sequence's last non-pad token, and %r "
                     "ends turns", tok.pad_token, before, before)
        self.tokenizer = tok
        return tok

    def new_token_ids(self) -> list[int]:
        """Ids of tokens added to the vocabulary (chat markers, a pad token): LoRA trains their embeddings."""
        if self.tokenizer is None or self.base_vocab is None:
            return []
        return list(range(self.base_vocab, len(self.tokenizer)))

    # ------------------------------------------------------------------------------ data
    def read_pairs(self, source: str) -> tuple[list[PreferencePair], dict[str, Any]]:
        """Validated pairs of one source, and facts about it."""
        return read_preference_pairs(source, self.data_cfg)

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, split, render both answers with the chat template, and tokenise (cached)."""
        self.tokenizer = tokenizer
        d = self.data_cfg
        splits, info = preference_splits(d, self.read_pairs)
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        for split, pairs in splits.items():
            kept_pairs, skipped = render_split(split, pairs, tokenizer, d, info[split].get("source", d.train))
            kept = [r for _, r in kept_pairs]
            if split == "train":
                info["preflight"] = self._preflight(kept, tokenizer)
            features[split], lengths[split] = pair_features(self.info.name, split, kept, tokenizer, d)
            # Pairs the reader skipped (an empty answer, two identical answers), for the report's data table.
            read_skips = sum(reason["count"] for reason in info[split].get("skipped", {}).values())
            info[split].update({
                "pairs": len(kept), "examples": len(kept), "skipped_too_long": len(skipped), "skipped_empty": read_skips,
                "skipped_lines": skipped[:1000], "truncated": sum(r.chosen.truncated_tokens > 0 for r in kept),
                "tokens": sum(len(r.chosen.input_ids) + len(r.rejected.input_ids) for r in kept),
            })
        info["chat_template"] = self.chat_template_source
        info["pad_token"] = tokenizer.pad_token
        return TaskData(splits=features, lengths=lengths, info=info)

    @staticmethod
    def _preflight(pairs: list[RenderedPair], tokenizer: Any) -> dict[str, int]:
        """Counts of each problem of the rendered training pairs, logged. A reward model reads whole answers
        and never generates, so none stops training (``lmtune data inspect`` shows them)."""
        problems = count_pair_problems(pairs, tokenizer)
        for problem, count in problems.items():
            log.warning("pre-flight: %d of %d training pairs: %s", count, len(pairs), problem)
        return problems

    # ------------------------------------------------------------------------------ model
    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The pretrained decoder with a new one-output head (float32) that knows the tokenizer's pad id."""
        assert model_path is not None
        m = self.config.model
        try:
            cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the model config: {exc}", file=model_path) from None
        cfg.num_labels = 1
        cfg.id2label = {0: "reward"}
        cfg.label2id = {"reward": 0}
        # The head finds each row's last token by comparing ids with this (see use_scoring_pad_token).
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.get_text_config().pad_token_id = tokenizer.pad_token_id
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos and self.data_cfg.max_length > max_pos:
            raise ConfigError(f"data.max_length {self.data_cfg.max_length} is larger than the model's {max_pos} "
                              "positions", hint=f"set --data.max_length {max_pos} or less")
        model, loading = load_pretrained(
            AutoModelForSequenceClassification, model_path, allow_pickle=m.allow_pickle, config=cfg,
            error="this model cannot be loaded with a sequence-classification (reward) head",
            dtype=torch.float32, output_loading_info=True, trust_remote_code=m.trust_remote_code)
        # Modules the checkpoint did not provide are new (the head): always trained, LoRA's modules_to_save.
        self.new_modules = sorted({k.rsplit(".", 1)[0] for k in loading["missing_keys"]})
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            # Tokens lmtune added (chat markers, a pad token): their rows start as the mean of the others.
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # a reward model never generates: no key/value cache to build
        if m.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if self.config.method.name in ("lora", "qlora"):
                model.enable_input_require_grads()
        return model

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """Last-level names of the new modules: ``{'score'}`` for transformers' decoders."""
        names = {m.split(".")[-1] for m in self.new_modules}
        return names or {n for n, _ in model.named_children() if n != model.base_model_prefix}

    # ------------------------------------------------------------------------------ batches and loss
    def collator(self, tokenizer: Any) -> PairCollator:
        """Chosen rows then rejected rows, right-padded together with the scoring pad token."""
        return PairCollator(tokenizer.pad_token_id)

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs: the loss is a mean over pairs."""
        return int(batch["index"].numel())

    def pair_rewards(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) rewards of the chosen and (B,) of the rejected answers, from one (2B, T) forward."""
        scores = rewards(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
        chosen, rejected = scores.chunk(2)
        return chosen, rejected

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed Bradley-Terry losses of the micro-batch's pairs."""
        chosen, rejected = self.pair_rewards(model, batch)
        with torch.no_grad():  # this process's training accuracy and margin, for the training log
            margins = (chosen - rejected).double()
            self._step_sums.add(torch.stack([(margins > 0).double().sum(), margins.sum(),
                                             margins.new_tensor(float(margins.numel()))]))
        return bradley_terry_losses(chosen, rejected).sum()

    def before_training(self, model: torch.nn.Module, accelerator: Any, data: TaskData, run_dir: Path,
                        *, resuming: bool, progress: Any = None) -> None:
        """Keep the accelerator: the training figures are summed over its processes."""
        self._accelerator = accelerator

    def step_metrics(self) -> dict[str, float]:
        """Pair accuracy and mean margin of the training pairs since the last log row (every process's)."""
        correct, margin, n = self._step_sums.take(self._accelerator)
        return {"train_accuracy": correct / n, "train_margin": margin / n} if n else {}

    def step_metrics_state(self, accelerator: Any) -> list[float]:
        """The open window of training figures, for the checkpoint."""
        return self._step_sums.state(accelerator)

    def load_step_metrics_state(self, state: list[float], accelerator: Any) -> None:
        """Reopen a checkpoint's window of training figures."""
        self._step_sums.load(state, accelerator)

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward of every row, (2B, 1) float32 (compared before and after saving)."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: Any, loader: Any, accelerator: Any, split: str, data: TaskData) -> dict[str, Any]:
        """Loss, pair accuracy, mean margin and mean rewards over the split's pairs (and, at the final
        evaluation, the margins themselves for the report)."""
        gathered = []
        for batch in loader:
            chosen, rejected = self.pair_rewards(model, batch)
            # Per pair, so the rows Accelerate repeats to even out the last batches are dropped.
            gathered.append(accelerator.gather_for_metrics(torch.stack([chosen, rejected], dim=1)).double().cpu())
        pairs = torch.cat(gathered) if gathered else torch.zeros((0, 2), dtype=torch.float64)  # (N, 2)
        chosen, rejected = pairs[:, 0], pairs[:, 1]
        margins = chosen - rejected
        n = max(int(pairs.shape[0]), 1)
        metrics: dict[str, Any] = {
            "loss": float(bradley_terry_losses(chosen, rejected).sum() / n),
            "accuracy": float((margins > 0).double().sum() / n),
            "margin": float(margins.sum() / n),
            "chosen_reward": float(chosen.sum() / n),
            "rejected_reward": float(rejected.sum() / n),
            "reward_std": float(torch.cat([chosen, rejected]).std()) if pairs.shape[0] > 1 else 0.0,
            "pairs": int(pairs.shape[0]),
        }
        if self.phase == "final":
            metrics["margins"] = [round(float(x), 5) for x in margins[:MARGINS_KEPT]]
        return metrics

    # ------------------------------------------------------------------------------ saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """How the predictor renders and scores: lengths, template, pad token, the data's column names."""
        d = self.data_cfg
        return {
            "max_length": d.max_length,
            "too_long": d.too_long,
            "special_tokens_in_content": d.special_tokens_in_content,
            "chat_template": self.chat_template_source,
            "pad_token": self.tokenizer.pad_token if self.tokenizer is not None else None,
            "columns": {key: d.columns.get(key, key) for key in ("prompt", "chosen", "rejected", "system")},
        }

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """The starting model (untrained head) beside the tuned one, and a histogram of their margins."""
        split = "test" if "test" in metrics else "validation"
        tuned, base = metrics.get(split, {}), metrics.get("starting_point", {}).get(split, {})
        if not tuned:
            return
        report.heading(f"Rewards on the {split} split", 3)
        keys = ["accuracy", "margin", "chosen_reward", "rejected_reward", "reward_std", "loss"]
        report.table(["metric", "starting model", "tuned model"],
                     [[k, base.get(k), tuned.get(k)] for k in keys if k in tuned])
        report.paragraph(f"{tuned.get('pairs')} held-out pairs. `accuracy`: pairs whose chosen answer scores above "
                         "the rejected one; `margin`: the mean of r_chosen - r_rejected. The starting model is the "
                         "pretrained body with the new, untrained head: about half its pairs are right by chance.")
        if tuned.get("margins"):
            rel = f"plots/reward_margins_{split}.png"
            plot_margins({"starting model": base.get("margins") or [], "tuned model": tuned["margins"]},
                         run_dir / rel, title=f"r_chosen - r_rejected ({split})")
            report.image(rel, f"reward margins, {split}")

    # ------------------------------------------------------------------------------ inspect
    def inspect(self, source: str | None, *, examples: int = 3) -> dict[str, Any] | None:
        """The pairs as the model will see them (:mod:`lmtune.tasks.preference_inspect`)."""
        refuse_streaming(self.config)
        return inspect_pairs(self.config, self.load_tokenizer(self.model_path()), source, examples=examples)

    def render_inspection(self, report: dict[str, Any], console: Any) -> bool:
        """Print :meth:`inspect`'s report as tables."""
        render_pairs_report(report, console)
        return True


def plot_margins(series: dict[str, list[float]], path: Path, *, title: str) -> Path:
    """Overlaid histograms of reward margins (one per named series, shared bins) with a line at 0."""
    values = [np.asarray(v, dtype=np.float64) for v in series.values() if len(v)]
    with figure(figsize=(7.0, 3.6)) as (fig, ax):
        if not values:
            note(ax, "no margins")
        else:
            every = np.concatenate(values)
            low, high = float(every.min()), float(every.max())
            bins = np.linspace(low, high if high > low else low + 1.0, 31)
            for name, v in series.items():
                if len(v):
                    right = float(np.mean(np.asarray(v) > 0))
                    ax.hist(v, bins=bins, alpha=0.55, label=f"{name} ({100 * right:.0f}% > 0)")
            ax.axvline(0.0, color="0.3", linewidth=1, linestyle="--")
            ax.legend()
            ax.set_ylabel("pairs")
        ax.set_xlabel("r_chosen - r_rejected")
        ax.set_title(title)
        fig.tight_layout()
        return save_figure(fig, path)
