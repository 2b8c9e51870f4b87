"""``task: grpo``: Group Relative Policy Optimization, online reinforcement learning of a chat decoder from rewards,
on lmtune's one training loop.

A micro-batch is a batch of PROMPTS. For each prompt ``grpo.num_generations`` answers are sampled from the current
model (``generation.temperature``, ``top_p``, ``max_new_tokens``; eval mode, no gradient), scored by the rewards
(:mod:`lmtune.tasks.grpo.rewards`), and each answer's advantage is its reward minus its group's mean, divided by
the group's standard deviation (``grpo.scale_rewards``). The loss of each answer token is TRL's clipped-ratio
objective plus ``grpo.beta`` times the k3 estimate of the KL to the starting model, weighted by the ratio (TRL
1.16's default bias correction; :func:`lmtune.tasks.preference_losses.grpo_token_losses`). One update per sampling (TRL's ``num_iterations=1``):
the old log-probabilities are the detached current ones, so the ratio is 1 in value and its gradient is the policy
gradient. The loop divides the summed token losses by the answer tokens of the whole step: TRL's default ``dapo``
loss. The answers are sampled from the global torch RNG, which every checkpoint saves and a resumed run restores,
so a resumed run samples the very answers the uninterrupted one does.

The loop counts a step's items (:meth:`GRPOTask.num_items`) before it computes any loss, so the sampling happens
there: answers, advantages and reference log-probabilities are stored in the batch itself, and :meth:`loss` reuses
them.

Reference for the KL term (``grpo.beta`` > 0): with LoRA the same model with its adapter switched off (peft's
``disable_adapter``: nothing copied); with ``full`` or ``freeze`` a frozen copy of the starting model, made once
before the first step (the weights held twice); ``grpo.beta`` 0: none, and no reference forward.

Evaluation (every validation, the starting model and the final one): answers to the first
``generation.eval_examples`` prompts of the split, GREEDY unless ``generation.do_sample`` (then seeded with
``generation.seed`` on a forked RNG), scored by the same rewards: ``reward`` (the mean weighted sum; the default
metric, greater is better), ``reward/<name>`` per reward, ``stopped_fraction`` (answers that ended with the
end-of-turn token), ``mean_answer_tokens``. ``loss`` is the mean per-token negative log-likelihood of the rows'
``answer`` column as the assistant's reply (end-of-turn token included) when every evaluated row has one, else the
negative mean reward: lower is better either way, and a tie on reward goes to the checkpoint that finds the
reference answers likelier. ``generation.stop`` does not apply: answers end at end-of-turn or at the length limit,
in training and in evaluation alike, so evaluation scores what training rewards.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch
from torch import Tensor

from lmtune.config import Config
from lmtune.config.tasks import TaskInfo
from lmtune.data.chat import end_of_turn_ids, render_conversation
from lmtune.data.features import IGNORE_INDEX, FeatureDataset
from lmtune.data.table import format_locations
from lmtune.errors import ConfigError, DataError
from lmtune.evaluate.report import Report
from lmtune.evaluate.step_window import StepWindow
from lmtune.models.generation import (
    GenerationSettings,
    chat_prompt,
    encode_prompt,
    generate_across_processes,
    rng_devices,
)
from lmtune.tasks.base import TaskData
from lmtune.tasks.chat_tuning import EXAMPLES_KEPT, ChatTuningTask, cell
from lmtune.tasks.grpo.info import INFO
from lmtune.tasks.grpo.prompts import PromptRow, prompt_splits
from lmtune.tasks.grpo.rewards import Rewards, Scored
from lmtune.tasks.grpo.rollout import Completions, complete, completion_logps, left_pad, takes_logits_to_keep
from lmtune.tasks.preference_losses import group_advantages, grpo_token_losses

log = logging.getLogger(__name__)

# Skipped line numbers kept in the data facts (the counts are exact).
LINES_KEPT = 1000
# Training-log rows the report's table of rewards during training shows at most.
PROGRESS_ROWS = 8


class PromptCollator:
    """Batches of prompts, left-padded as generation wants them: ``input_ids`` and ``attention_mask`` ``(B, P)``
    and ``index`` ``(B,)``, each prompt's position in its split (for its other columns)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        input_ids, mask = left_pad([list(f["input_ids"]) for f in features], self.pad)
        return {"input_ids": input_ids, "attention_mask": mask,
                "index": torch.tensor([int(f["index"]) for f in features], dtype=torch.long)}


class StepFigures(StepWindow):
    """Sums of the figures since the last training log row (:meth:`GRPOTask.step_metrics`), per process: answers,
    scored answers, reward sum, groups, group std sum, groups of equal rewards, answer tokens, answers that
    stopped, then per reward its sum and count, then token-weighted KL and clip sums and the loss tokens."""

    def __init__(self, reward_names: list[str]) -> None:
        self.names = reward_names
        super().__init__(8 + 2 * len(reward_names) + 3)

    def add_samples(self, per_reward: Tensor, totals: Tensor, group_size: int, completions: Completions) -> None:
        """The figures of N sampled answers: ``per_reward`` ``(N, R)``, ``totals`` ``(N,)`` (NaN: unscored)."""
        scored = ~totals.isnan()
        groups = totals.view(-1, group_size)  # (prompts, G)
        stds = []
        for group in groups:
            values = group[~group.isnan()]
            stds.append(float(values.std()) if values.numel() > 1 else 0.0)
        s = self.sums
        s[0] += totals.numel()
        s[1] += int(scored.sum())
        s[2] += float(totals[scored].sum()) if bool(scored.any()) else 0.0
        s[3] += len(stds)
        s[4] += sum(stds)
        s[5] += sum(std == 0.0 for std in stds)
        s[6] += float(completions.mask.sum())
        s[7] += sum(completions.stopped)
        for r in range(len(self.names)):
            column = per_reward[:, r]
            known = ~column.isnan()
            s[8 + 2 * r] += float(column[known].sum()) if bool(known.any()) else 0.0
            s[9 + 2 * r] += int(known.sum())

    def add_loss(self, stats: dict[str, Tensor], tokens: int) -> None:
        """The KL and clip figures of one loss computation over ``tokens`` answer tokens."""
        base = 8 + 2 * len(self.names)
        self.sums[base] += float(stats["kl"]) * tokens
        self.sums[base + 1] += float(stats["clip_ratio/region"]) * tokens
        self.sums[base + 2] += tokens

    def figures(self, accelerator: Any, *, with_kl: bool) -> dict[str, float]:
        """The window's means, summed over every process (a collective: every process calls it), then reset."""
        s = self.take(accelerator)
        if s[0] == 0:
            return {}
        out = {"reward": s[2] / s[1] if s[1] else math.nan,
               "reward_std": s[4] / max(s[3], 1.0),
               "zero_std_groups": s[5] / max(s[3], 1.0)}
        for r, name in enumerate(self.names):
            out[f"reward/{name}"] = s[8 + 2 * r] / s[9 + 2 * r] if s[9 + 2 * r] else math.nan
        base = 8 + 2 * len(self.names)
        if with_kl:
            out["kl"] = s[base] / max(s[base + 2], 1.0)
        out["clip_ratio"] = s[base + 1] / max(s[base + 2], 1.0)
        out["mean_answer_tokens"] = s[6] / s[0]
        out["stopped_fraction"] = s[7] / s[0]
        out["truncated_fraction"] = 1.0 - s[7] / s[0]
        return out


class GRPOTask(ChatTuningTask):
    """GRPO on prompts, rewarded by functions and/or a reward model, relative to the starting model."""

    info: ClassVar[TaskInfo] = INFO

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.grpo = config.grpo
        self.rewards: Rewards | None = None
        self.rows: dict[str, list[PromptRow]] = {}  # split -> the prompts kept, in feature order
        # What the KL term compares with: "none" (beta 0), "adapter_off" (LoRA) or "copy" (set by before_training).
        self.reference = "none"
        self.reference_model: torch.nn.Module | None = None
        self._policy: Any = None  # the unwrapped model that samples (before_training)
        self._accelerator: Any = None
        self._keeps_logits: bool | None = None
        self._figures: StepFigures | None = None

    # ------------------------------------------------------------------------------ facts
    @property
    def packing(self) -> bool:
        """Prompts are never packed."""
        return False

    @property
    def rows_per_example(self) -> int:
        """Each prompt's ``grpo.num_generations`` answers go through the model together."""
        return self.grpo.num_generations

    @property
    def sampled_tokens(self) -> int:
        """Every answer is sampled: up to ``generation.max_new_tokens`` after its prompt."""
        return self.config.generation.max_new_tokens

    @property
    def epsilon_high(self) -> float:
        """``grpo.epsilon_high``, else ``grpo.epsilon``."""
        return self.grpo.epsilon_high if self.grpo.epsilon_high is not None else self.grpo.epsilon

    def plan_notes(self) -> list[str]:
        """What sampling and the reference cost beyond the model and its batches."""
        g, t = self.grpo, self.config.train
        notes = [f"grpo: each micro-batch of {t.batch_size} prompts samples {g.num_generations} answers per prompt "
                 f"({t.batch_size * g.num_generations} sequences of up to data.max_length + generation.max_new_tokens "
                 f"= {self.data_cfg.max_length + self.config.generation.max_new_tokens} tokens) without gradients, "
                 "then trains on them; the sequence length above is the prompt's plus the longest answer"]
        if g.beta == 0:
            notes.append("grpo.beta 0: no KL term, no reference model and no reference forward")
        elif self.config.method.name in ("lora", "qlora"):
            notes.append("grpo reference: the model itself with its LoRA adapter switched off (no copy held); one "
                         "extra forward without gradients per micro-batch")
        else:
            notes.append(f"grpo reference: method {self.config.method.name} holds a frozen copy of the starting model "
                         "(as much memory again as the model's weights) and runs one extra forward without gradients "
                         "per micro-batch; with LoRA the reference costs no copy")
        return notes

    # ------------------------------------------------------------------------------ data
    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate and split the prompts, render them with the chat template, tokenise; load the rewards
        (functions imported now, so a bad ``grpo.rewards`` stops the run before the model loads)."""
        self.tokenizer = tokenizer
        d = self.data_cfg
        if d.streaming:
            raise ConfigError("data.streaming does not apply to task grpo")
        splits, info = prompt_splits(d)
        self.rewards = Rewards.from_config(list(self.grpo.rewards), self.grpo.reward_weights, self.grpo.reward_model)
        self._figures = StepFigures(self.rewards.names)
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        prompt_ids: dict[str, list[list[int]]] = {}
        for split, rows in splits.items():
            source = str(info[split].get("source") or d.train)
            self.rewards.check_columns(set(rows[0].columns) if rows else set(), source=source)
            kept: list[PromptRow] = []
            encoded: list[list[int]] = []
            skipped: list[int] = []
            for row in rows:
                ids = encode_prompt(tokenizer, chat_prompt(tokenizer, row.messages))
                if len(ids) > d.max_length:
                    skipped.append(row.line)
                    continue
                kept.append(row)
                encoded.append(ids)
            if skipped:
                log.warning("%s: %d of %d prompts are longer than data.max_length %d and were skipped (lines %s)",
                            split, len(skipped), len(rows), d.max_length, format_locations(skipped))
            if not kept:
                raise DataError(f"no {split} prompt fits data.max_length {d.max_length}", file=source,
                                hint="raise data.max_length")
            self.rows[split] = kept
            prompt_ids[split] = encoded
            lens = [len(ids) for ids in encoded]
            ds = datasets.Dataset.from_dict({"input_ids": encoded, "index": list(range(len(kept)))})
            features[split], lengths[split] = FeatureDataset(ds, lens), lens
            # `examples` and `tokens` as every task names them (the report's data table): prompts, prompt tokens.
            info[split].update({"examples": len(kept), "tokens": sum(lens), "skipped_too_long": len(skipped),
                                "skipped_lines": skipped[:LINES_KEPT]})
        info["chat_template"] = self.chat_template_source
        info["rewards"] = self.rewards.names
        return TaskData(splits=features, lengths=lengths, info=info,
                        extra={"rows": self.rows, "prompt_ids": prompt_ids})

    def collator(self, tokenizer: Any) -> PromptCollator:
        """Left-padded prompts."""
        return PromptCollator(tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------ reference
    def before_training(self, model: torch.nn.Module, accelerator: Any, data: TaskData, run_dir: Path,
                        *, resuming: bool, progress: Any = None) -> None:
        """Keep the model that samples and the accelerator; set up the KL term's reference (see the module)."""
        self._accelerator = accelerator
        self._policy = accelerator.unwrap_model(model)
        if self.grpo.beta == 0:
            self.reference = "none"
            log.info("grpo: no KL term (grpo.beta 0): no reference model")
        elif hasattr(self._policy, "disable_adapter"):
            self.reference = "adapter_off"
            log.info("grpo reference for the KL term (beta %g): the model with its LoRA adapter switched off (no copy)",
                     self.grpo.beta)
        else:
            # Before any checkpoint loads (before_training runs first): the copy is the starting model.
            reference = copy.deepcopy(self._policy)
            reference.eval()
            reference.requires_grad_(False)
            self.reference_model = reference
            self.reference = "copy"
            size = sum(p.numel() * p.element_size() for p in reference.parameters())
            log.info("grpo reference for the KL term (beta %g): a frozen copy of the starting model (%.1f MB more "
                     "memory; LoRA would need none)", self.grpo.beta, size / 2**20)

    def _reference_logps(self, prompt_ids: Tensor, prompt_mask: Tensor, completions: Completions) -> Tensor | None:
        """``(N, C)`` answer log-probs under the reference, in eval mode, without gradients; None without one."""
        if self.reference == "none":
            return None
        temperature, keep = self.config.generation.temperature, self._keep_logits()
        with torch.no_grad():
            if self.reference == "adapter_off":
                policy = self._policy
                was_training = policy.training
                policy.eval()
                try:
                    with policy.disable_adapter():
                        return completion_logps(policy, prompt_ids, prompt_mask, completions.ids, completions.mask,
                                                temperature=temperature, keep_logits=keep)
                finally:
                    policy.train(was_training)
            assert self.reference_model is not None
            with self._accelerator.autocast():
                return completion_logps(self.reference_model, prompt_ids, prompt_mask, completions.ids,
                                        completions.mask, temperature=temperature, keep_logits=keep)

    def _keep_logits(self) -> bool:
        if self._keeps_logits is None:
            self._keeps_logits = takes_logits_to_keep(self._policy)
        return self._keeps_logits

    # ------------------------------------------------------------------------------ sampling and scoring
    def _stop_ids(self, model: Any) -> list[int]:
        """The token ids that end an answer: the tokenizer's EOS, the template's end-of-turn, the model's EOS."""
        return sorted(end_of_turn_ids(self.tokenizer, getattr(model.generation_config, "eos_token_id", None)))

    def _score(self, rows: list[PromptRow], completions: Completions, device: Any) -> Scored:
        """Every reward of the answers to ``rows`` (one row per answer)."""
        assert self.rewards is not None, "prepare() loads the rewards"
        names = list(rows[0].columns) if rows else []
        return self.rewards.score(
            prompts=[row.prompt for row in rows], messages=[row.messages for row in rows],
            completions=completions.texts, completion_ids=completions.token_lists(), stopped=completions.stopped,
            columns={name: [row.columns.get(name) for row in rows] for name in names}, device=str(device))

    def _rollout(self, batch: dict[str, Tensor], model: Any = None) -> None:
        """Sample, score and weigh the answers to ``batch``'s prompts, stored in the batch (once per batch)."""
        if "completion_mask" in batch:
            return
        policy = self._policy if self._policy is not None else model
        if policy is None:
            raise RuntimeError("grpo samples with the model handed to before_training(); it was not called")
        self._policy = policy
        assert self.rewards is not None and self._figures is not None, "prepare() loads the rewards"
        group = self.grpo.num_generations
        prompt_ids = batch["input_ids"].repeat_interleave(group, dim=0)  # (B*G, P): each prompt G times in a row
        prompt_mask = batch["attention_mask"].repeat_interleave(group, dim=0)
        g = self.config.generation
        settings = GenerationSettings(max_new_tokens=g.max_new_tokens, do_sample=True, temperature=g.temperature,
                                      top_p=g.top_p, repetition_penalty=g.repetition_penalty)
        completions = complete(policy, self.tokenizer, prompt_ids, prompt_mask, settings=settings,
                               stop_ids=self._stop_ids(policy), pad_id=self.tokenizer.pad_token_id)
        rows = [self.rows["train"][i] for i in batch["index"].tolist() for _ in range(group)]
        scored = self._score(rows, completions, prompt_ids.device)
        per_reward = torch.tensor([scored.per_reward[name] for name in self.rewards.names],
                                  dtype=torch.float32).T.contiguous()  # (N, R), NaN: unscored
        weights = torch.tensor([scored.weights[name] for name in self.rewards.names], dtype=torch.float32)
        totals = (per_reward * weights).nansum(dim=1)  # (N,)
        totals[per_reward.isnan().all(dim=1)] = math.nan  # unscored by every reward: no advantage (as TRL)
        advantages = group_advantages(totals, group, scale=self.grpo.scale_rewards)  # (N,)
        batch["completion_ids"], batch["completion_mask"] = completions.ids, completions.mask
        batch["advantages"] = advantages.to(prompt_ids.device)
        reference = self._reference_logps(prompt_ids, prompt_mask, completions)
        if reference is not None:
            batch["reference_logps"] = reference
        self._figures.add_samples(per_reward, totals, group, completions)

    # ------------------------------------------------------------------------------ the loop
    def num_items(self, batch: dict[str, Tensor]) -> int:
        """Answer tokens of the batch's sampled answers (sampled here: the loop counts before any loss)."""
        self._rollout(batch)
        return int(batch["completion_mask"].sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Summed GRPO token losses over the batch's sampled answers (sampled first if :meth:`num_items` did not)."""
        self._rollout(batch, model)
        group = self.grpo.num_generations
        prompt_ids = batch["input_ids"].repeat_interleave(group, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(group, dim=0)
        if self._keeps_logits is None:
            self._keeps_logits = takes_logits_to_keep(model)
        logps = completion_logps(model, prompt_ids, prompt_mask, batch["completion_ids"], batch["completion_mask"],
                                 temperature=self.config.generation.temperature, keep_logits=self._keeps_logits)
        losses, stats = grpo_token_losses(logps, None, batch.get("reference_logps"), batch["advantages"],
                                          batch["completion_mask"], beta=self.grpo.beta,
                                          epsilon_low=self.grpo.epsilon, epsilon_high=self.epsilon_high)  # (N, C)
        if self._figures is not None:
            self._figures.add_loss(stats, int(batch["completion_mask"].sum()))
        return losses.sum()

    def step_metrics(self) -> dict[str, float]:
        """Mean reward (and per reward), the groups' reward spread, KL, clip fraction, answer length and how the
        answers ended, over the answers sampled since the last training log row (every process's)."""
        if self._figures is None:
            return {}
        return self._figures.figures(self._accelerator, with_kl=self.reference != "none")

    def step_metrics_state(self, accelerator: Any) -> list[float]:
        """The figures' open window (every process's sums), for the checkpoint."""
        return self._figures.state(accelerator) if self._figures is not None else []

    def load_step_metrics_state(self, state: list[float], accelerator: Any) -> None:
        """Reopen a checkpoint's window of figures."""
        if self._figures is not None:
            self._figures.load(state, accelerator)

    def logits(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Next-token logits of the prompts (compared before and after saving)."""
        mask = batch["attention_mask"]
        out = model(input_ids=batch["input_ids"], attention_mask=mask,
                    position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0), use_cache=False)
        return out.logits.float()  # (B, P, vocab)

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: Any, loader: Any, accelerator: Any, split: str, data: TaskData) -> dict[str, Any]:
        """Rewards of answers to the split's first ``generation.eval_examples`` prompts (see the module)."""
        rows: list[PromptRow] = data.extra["rows"][split]
        ids: list[list[int]] = data.extra["prompt_ids"][split]
        limit = self.config.generation.eval_examples or len(rows)
        rows, ids = rows[:limit], ids[:limit]
        policy = accelerator.unwrap_model(model)
        settings = GenerationSettings.from_config(self.config.generation)
        stop = self._stop_ids(policy)
        # Evaluation must not move the RNG that training samples from (nor depend on it).
        with torch.random.fork_rng(devices=rng_devices(accelerator.device)):
            torch.manual_seed(settings.seed)
            answers = generate_across_processes(
                accelerator, list(range(len(rows))), lambda mine: self._answers(policy, [ids[i] for i in mine],
                                                                                 settings, stop))
            completions = _stacked(answers, stop, self.tokenizer)
            scored = self._score(rows, completions, accelerator.device)
        totals = scored.totals()
        valid = [t for t in totals if not math.isnan(t)]
        reward = sum(valid) / len(valid) if valid else math.nan
        metrics: dict[str, Any] = {"reward": reward}
        for name, values in scored.per_reward.items():
            known = [v for v in values if not math.isnan(v)]
            metrics[f"reward/{name}"] = sum(known) / len(known) if known else math.nan
        n = max(len(rows), 1)
        metrics["stopped_fraction"] = sum(completions.stopped) / n
        metrics["mean_answer_tokens"] = float(completions.mask.sum()) / n
        nll = self._answer_nll(model, rows, accelerator)
        metrics["loss"] = nll if nll is not None else -reward
        metrics["generated_examples"] = len(rows)
        metrics["examples"] = [
            {"prompt": _last_user(row.messages), "answer": row.columns.get("answer"), "generated": text,
             "reward": total, "finish_reason": "stop" if done else "length"}
            for row, text, total, done in list(zip(rows, completions.texts, totals, completions.stopped,
                                                   strict=True))[:EXAMPLES_KEPT]
        ]
        return metrics

    def _answers(self, model: Any, prompts: list[list[int]], settings: GenerationSettings,
                 stop: list[int]) -> list[dict[str, Any]]:
        """This process's answers (``{"ids": answer ids as generated, without padding}``), in batches."""
        out: list[dict[str, Any]] = []
        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(prompts), settings.batch_size):
            input_ids, mask = left_pad(prompts[start:start + settings.batch_size], pad)
            done = complete(model, self.tokenizer, input_ids.to(device), mask.to(device), settings=settings,
                            stop_ids=stop, pad_id=pad)
            out += [{"ids": ids} for ids in done.token_lists()]
        return out

    def _answer_nll(self, model: Any, rows: list[PromptRow], accelerator: Any) -> float | None:
        """Mean per-token NLL of the rows' ``answer`` column as the assistant's reply; None when a row has none."""
        answers = [row.columns.get("answer") for row in rows]
        if not rows or any(a is None or not str(a).strip() for a in answers):
            return None
        d = self.data_cfg
        examples = []
        for row, answer in zip(rows, answers, strict=True):
            try:
                rendered = render_conversation(
                    self.tokenizer, [*row.messages, {"role": "assistant", "content": str(answer)}],
                    train_on="last_assistant", max_length=d.max_length + self.config.generation.max_new_tokens,
                    too_long="skip", special_tokens_in_content=d.special_tokens_in_content)
            except DataError as exc:  # a template that cannot mark the reply: the loss falls back to -reward
                log.warning("grpo: the answers cannot be scored as replies (%s); loss is the negative reward", exc)
                return None
            if rendered is not None:
                examples.append((rendered.input_ids, rendered.labels))
        if not examples:
            return None
        size = self.config.train.eval_batch_size or self.config.train.batch_size
        device = accelerator.device

        def score(mine: list[tuple[list[int], list[int]]]) -> list[dict[str, float]]:
            out = []
            for start in range(0, len(mine), size):
                chunk = mine[start:start + size]
                width = max(len(ids) for ids, _ in chunk)
                batch = {"input_ids": torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long),
                         "attention_mask": torch.zeros((len(chunk), width), dtype=torch.long),
                         "labels": torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)}
                for i, (ids, labels) in enumerate(chunk):
                    batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
                    batch["attention_mask"][i, :len(ids)] = 1
                    batch["labels"][i, :len(labels)] = torch.tensor(labels)
                batch = {k: v.to(device) for k, v in batch.items()}
                sums = self._row_losses(model, batch).tolist()  # (B,) summed answer-token NLL
                counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
                out += [{"nll": float(s), "tokens": float(c)} for s, c in zip(sums, counts, strict=True)]
            return out

        results = generate_across_processes(accelerator, examples, score)
        tokens = sum(r["tokens"] for r in results)
        return sum(r["nll"] for r in results) / tokens if tokens else None

    # ------------------------------------------------------------------------------ saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Generation config stopping at the end-of-turn token; chat and reward facts for ``lmtune.json``."""
        stop = sorted(end_of_turn_ids(self.tokenizer))
        self.write_generation_config(folder, self.tokenizer, stop)
        return {"eos_token_ids": stop, "chat_template": self.chat_template_source,
                "max_length": self.data_cfg.max_length, "rewards": self.rewards.names if self.rewards else [],
                "num_generations": self.grpo.num_generations, "beta": self.grpo.beta}

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Rewards of the starting and the tuned model, rewards during training, and example answers."""
        start = metrics.get("starting_point", {})
        split = "test" if "test" in metrics else "validation"
        tuned, base = metrics.get(split, {}), start.get(split, {})
        if "reward" not in tuned:
            return
        report.heading(f"Rewards on the {split} split", 3)
        keys = ["reward", *[k for k in tuned if k.startswith("reward/")], "stopped_fraction", "mean_answer_tokens",
                "loss"]
        report.table(["metric", "starting model", "tuned model"], [[k, base.get(k), tuned.get(k)] for k in keys])
        g = self.config.generation
        names = ", ".join(self.rewards.names) if self.rewards else "the configured rewards"
        report.paragraph(
            f"{tuned.get('generated_examples')} held-out prompts, answered {'with sampling' if g.do_sample else 'greedily'}"
            f" with at most {g.max_new_tokens} new tokens and scored by {names}. `reward`: the mean weighted sum of "
            "the rewards; `stopped_fraction`: answers that ended with the end-of-turn token (not cut by the limit); "
            "`loss`: the mean per-token negative log-likelihood of the `answer` column as the reply, or the negative "
            "reward where the data has no answers.")
        self._progress_table(report, run_dir)
        before = {e["prompt"]: e for e in base.get("examples", [])}
        rows = []
        for e in tuned.get("examples", []):
            b = before.get(e["prompt"], {})
            rows.append([cell(e["prompt"]), cell(str(e.get("answer") if e.get("answer") is not None else "–")),
                         cell(f"{_answer_text(b.get('generated', '–'))} ({_shown(b.get('reward'))})"),
                         cell(f"{_answer_text(e['generated'])} ({_shown(e.get('reward'))})")])
        if rows:
            report.heading("Example answers (reward in brackets)", 3)
            report.table(["prompt", "answer", "starting model", "tuned model"], rows)

    def _progress_table(self, report: Report, run_dir: Path) -> None:
        """A few training-log rows: the sampled answers' reward, KL and length as training went."""
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        train = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("split") == "train" and "reward" in record:
                train.append(record)
        if not train:
            return
        stride = max(1, math.ceil(len(train) / PROGRESS_ROWS))
        shown = train[::stride] + ([train[-1]] if (len(train) - 1) % stride else [])
        keys = [k for k in ("reward", "reward_std", "kl", "mean_answer_tokens", "stopped_fraction") if k in train[0]]
        report.heading("Sampled answers during training", 3)
        report.table(["step", *keys], [[r["step"], *[r.get(k) for k in keys]] for r in shown])
        report.paragraph(f"{self.grpo.num_generations} answers sampled per prompt (temperature "
                         f"{self.config.generation.temperature}); `reward_std`: the mean spread of rewards within a "
                         "prompt's group (0: nothing to learn from that prompt); `kl`: to the starting model.")

    # ------------------------------------------------------------------------------ inspect
    def inspect_facts(self, data: TaskData) -> dict[str, dict[str, Any]] | None:
        """Per split: prompts, where they come from, what was skipped, prompt tokens."""
        facts = {}
        for split, lengths in data.lengths.items():
            info = data.info[split]
            ordered = sorted(lengths)
            facts[split] = {"source": info.get("source"), "prompts": len(lengths),
                            "duplicates_removed": int(info.get("duplicates_removed", 0)),
                            "skipped_too_long": info.get("skipped_too_long", 0),
                            "prompt_tokens_min": ordered[0] if ordered else 0,
                            "prompt_tokens_median": ordered[len(ordered) // 2] if ordered else 0,
                            "prompt_tokens_max": ordered[-1] if ordered else 0}
        return facts

    def inspect_details(self, data: TaskData, facts: dict[str, dict[str, Any]], *, examples: int = 3
                        ) -> dict[str, Any]:
        """The rewards, the columns they receive, what a step samples, and the first prompts as rendered."""
        g = self.grpo
        columns = data.info["train"].get("columns", [])
        summary = {"rewards": ", ".join(self.rewards.names if self.rewards else []),
                   "columns passed to the rewards": ", ".join(columns) or "none",
                   "sampled per step": f"{self.config.train.batch_size} prompts x {g.num_generations} answers x "
                                       f"accumulation {self.config.train.gradient_accumulation}, up to "
                                       f"{self.config.generation.max_new_tokens} tokens each"}
        suggestions = []
        if any(f["skipped_too_long"] for f in facts.values()):
            suggestions.append(f"some prompts are longer than data.max_length {self.data_cfg.max_length}: raise it to "
                               "keep them")
        shown = []
        for i, row in enumerate(self.rows.get("train", [])[:max(examples, 0)]):
            extra = dict(row.columns)
            shown.append({"title": f"train prompt {i + 1} (line {row.line})",
                          "body": chat_prompt(self.tokenizer, row.messages)
                          + (f"\n\ncolumns: {json.dumps(extra, ensure_ascii=False)}" if extra else "")})
        return {"summary": summary, "suggestions": suggestions, "examples": shown}


def _stacked(answers: list[dict[str, Any]], stop: list[int], tokenizer: Any) -> Completions:
    """Answers gathered from every process (each its token ids, up to and including an end-of-turn token) as one
    :class:`Completions`."""
    lists = [list(a["ids"]) for a in answers]
    ids = torch.full((len(lists), max((len(t) for t in lists), default=1)), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(lists):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = 1
    stopped = [bool(tokens) and tokens[-1] in stop for tokens in lists]
    texts = [str(tokenizer.decode(tokens[:-1] if done else tokens, skip_special_tokens=True))
             for tokens, done in zip(lists, stopped, strict=True)]
    return Completions(ids, mask, texts, stopped)


def _last_user(messages: list[dict[str, str]]) -> str:
    """The last user message of a prompt, for display."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _answer_text(text: str) -> str:
    return text if text.strip() else "(empty: ends at once)"


def _shown(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"
