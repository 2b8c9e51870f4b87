"""``task: kto``: Kahneman-Tversky optimisation on unpaired answers judged desirable or undesirable.

Each training example is one prompt with one answer and a judgement. Its implicit reward is the log-ratio
``r = log pi(answer) - log ref(answer)`` to the starting model; the loss pushes ``r`` above the reference point
``z`` for desirable answers (``w_d (1 - sigmoid(beta (r - z)))``) and below it for undesirable ones
(``w_u (1 - sigmoid(beta (z - r)))``). ``z`` estimates the KL divergence from the reference on mismatched
(prompt, answer) rows: each example's prompt with the answer of another example (the next one in the data whose
prompt differs), as TRL's KTOTrainer does; it is computed without gradient and clamped at 0. Equal to TRL's
KTO loss (tests/test_preference_losses.py).

Batches are laid out like a pair task's, the example rows then their mismatched rows
(:class:`lmtune.tasks.preference.PairCollator` with sides ``example``/``kl``), so the reference log-probs of
both are computed once before training by the same pass that serves dpo.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import torch

from lmtune.config.tasks import TaskInfo
from lmtune.data.chat import RenderedExample
from lmtune.data.features import FeatureDataset, cached_features, digest_records, features_cache_key
from lmtune.data.preference import KTOExample, preference_splits, read_kto_examples, render_completion
from lmtune.data.table import format_locations
from lmtune.errors import DataError
from lmtune.evaluate.report import Report
from lmtune.models.generation import chat_prompt
from lmtune.tasks.base import TaskData
from lmtune.tasks.chat_tuning import cell
from lmtune.tasks.kto.info import INFO
from lmtune.tasks.preference import PairCollator, PairTask, last_user_message, wins
from lmtune.tasks.preference_inspect import inspect_kto, render_kto_report
from lmtune.tasks.preference_losses import kto_kl, kto_losses

log = logging.getLogger(__name__)

# How many later examples are tried as a mismatched partner before an example is dropped.
PARTNER_TRIES = 8


class KTOTask(PairTask):
    """KTO on unpaired judged answers."""

    info: ClassVar[TaskInfo] = INFO
    uses_reference = True

    # ------------------------------------------------------------------------------ data
    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, split, render each answer and its mismatched row with the chat template (cached)."""
        self.tokenizer = tokenizer
        d = self.data_cfg
        splits, info = preference_splits(d, lambda source: read_kto_examples(source, d), what="examples")
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        prompts: dict[str, list[str]] = {}
        good: dict[str, list[str]] = {}
        bad: dict[str, list[str]] = {}
        for split, examples in splits.items():
            rows, skipped = self._render(examples, tokenizer)
            if skipped:
                log.warning("%s: %d of %d examples are longer than data.max_length %d (or have no mismatched row "
                            "that fits) and were skipped (lines %s)", split, len(skipped), len(examples),
                            d.max_length, format_locations(skipped))
            if not rows:
                raise DataError(f"no {split} example fits data.max_length {d.max_length}",
                                file=info[split].get("source", d.train), hint="raise data.max_length")
            kept = [examples[i] for i, _, _ in rows]
            if split == "train":
                desirable = sum(e.desirable for e in kept)
                if desirable in (0, len(kept)):
                    raise DataError(f"every training example is {'desirable' if desirable else 'undesirable'}: KTO "
                                    "needs both kinds", file=d.train)
                info["preflight"] = self.preflight_problems([r for _, r, _ in rows], tokenizer)
            features[split], lengths[split] = self._kto_features(rows, kept, tokenizer)
            info[split].update({"examples": len(kept), "desirable": sum(e.desirable for e in kept),
                                "skipped_too_long": len(skipped), "skipped_lines": skipped[:1000]})
            if split != "train":
                prompts[split], good[split], bad[split] = self._held_out_prompts(kept, tokenizer)
        info["chat_template"] = self.chat_template_source
        return TaskData(splits=features, lengths=lengths, info=info,
                        extra={"prompts": prompts, "references": good, "rejected": bad})

    def _render(self, examples: list[KTOExample], tokenizer: Any
                ) -> tuple[list[tuple[int, RenderedExample, RenderedExample]], list[int]]:
        """(index, rendered example, rendered mismatched row) of each kept example; lines of the skipped."""
        d = self.data_cfg

        def render(prompt: list[dict[str, str]], completion: str) -> RenderedExample | None:
            return render_completion(tokenizer, prompt, completion, max_length=d.max_length, too_long=d.too_long,
                                     special_tokens_in_content=d.special_tokens_in_content)

        rows, skipped = [], []
        n = len(examples)
        for i, example in enumerate(examples):
            own = render(example.prompt, example.completion)
            mismatched = None
            for step in range(1, min(PARTNER_TRIES, n - 1) + 1):
                other = examples[(i + step) % n]
                if other.prompt != example.prompt:
                    mismatched = render(example.prompt, other.completion)
                    if mismatched is not None:
                        break
            if own is None or mismatched is None:
                skipped.append(example.line)
            else:
                rows.append((i, own, mismatched))
        return rows, skipped

    def _kto_features(self, rows: list[tuple[int, RenderedExample, RenderedExample]], kept: list[KTOExample],
                      tokenizer: Any) -> tuple[FeatureDataset, list[int]]:
        seqs = [(own.input_ids, own.labels, kl.input_ids, kl.labels, int(e.desirable))
                for (_, own, kl), e in zip(rows, kept, strict=True)]
        key = features_cache_key(self.info.name, digest_records(seqs), tokenizer, {"max_length": self.data_cfg.max_length})

        def build() -> dict[str, list[Any]]:
            return {"example_input_ids": [s[0] for s in seqs], "example_labels": [s[1] for s in seqs],
                    "kl_input_ids": [s[2] for s in seqs], "kl_labels": [s[3] for s in seqs],
                    "desirable": [s[4] for s in seqs], "index": list(range(len(seqs))),
                    "length": [max(len(s[0]), len(s[2])) for s in seqs]}

        ds, _ = cached_features(key, build, use_cache=self.data_cfg.cache)
        lens = ds.with_format(None)["length"]
        ds.set_format(columns=[c for c in ds.column_names if c != "length"])
        return FeatureDataset(ds, lens), lens

    def _held_out_prompts(self, kept: list[KTOExample], tokenizer: Any) -> tuple[list[str], list[str], list[str]]:
        """Prompts of the held-out desirable answers, those answers, and an undesirable answer to the same prompt
        where the data has one (then generation is also checked for which one it resembles)."""
        undesirable: dict[str, str] = {}
        for e in kept:
            if not e.desirable:
                undesirable.setdefault(json.dumps(e.prompt, sort_keys=True), e.completion)
        chosen = [e for e in kept if e.desirable][: self.config.generation.eval_examples or None]
        rejected = [undesirable.get(json.dumps(e.prompt, sort_keys=True)) for e in chosen]
        paired = all(r is not None for r in rejected)
        return ([chat_prompt(tokenizer, e.prompt) for e in chosen], [e.completion for e in chosen],
                [r or "" for r in rejected] if paired else [])

    # ------------------------------------------------------------------------------ forward
    def collator(self, tokenizer: Any) -> PairCollator:
        """The example rows, then their mismatched rows, right-padded together, with ``desirable``."""
        return PairCollator(tokenizer.pad_token_id, sides=("example", "kl"), flags=("desirable",))

    def _kto_terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], split: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) losses, (B,) rewards and the KL estimate of one batch."""
        n = batch["index"].numel()
        examples, mismatched = _half(batch, slice(0, n)), _half(batch, slice(n, 2 * n))
        logps, _ = self.sequence_logps(model, examples)
        with torch.no_grad():
            kl_logps, _ = self.sequence_logps(model, mismatched)
        reference = self._reference_of(split, batch)
        assert reference is not None
        kl = kto_kl(kl_logps, reference[:, 1])
        accelerator = self.accelerator
        if accelerator is not None and accelerator.num_processes > 1:
            # TRL's reference point on several processes: the mean of every process's mean, then the clamp.
            local = (kl_logps - reference[:, 1]).mean().detach()
            kl = accelerator.reduce(local, reduction="mean").clamp(min=0)
        losses, rewards = kto_losses(logps, reference[:, 0], batch["desirable"].bool(), kl, beta=self.beta,
                                     desirable_weight=self.pref.desirable_weight,
                                     undesirable_weight=self.pref.undesirable_weight)
        return losses, rewards, kl

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed KTO losses of the micro-batch (the mismatched rows without gradient)."""
        return self._kto_terms(model, batch, "train")[0].sum()

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: Any, loader: Any, accelerator: Any, split: str, data: TaskData) -> dict[str, Any]:
        """Loss, how often the implicit reward's sign matches the judgement, rewards per kind, KL; generation
        scores at the final evaluation."""
        self._ensure_reference(split, data, accelerator)
        total = torch.zeros(8, dtype=torch.float64)
        for batch in loader:
            losses, rewards, kl = self._kto_terms(model, batch, split)
            good = batch["desirable"].double()
            r = rewards.double()
            rows = torch.stack([losses.double(), wins(torch.where(good.bool(), r, -r)), r * good, good,
                                r * (1 - good), 1 - good, kl.double().expand_as(r), torch.ones_like(r)], dim=1)
            total += accelerator.gather_for_metrics(rows).double().sum(dim=0).cpu()
        n = max(float(total[7]), 1.0)
        desirable = float(total[2] / max(float(total[3]), 1.0))
        undesirable = float(total[4] / max(float(total[5]), 1.0))
        metrics: dict[str, Any] = {
            "loss": float(total[0] / n), "accuracy": float(total[1] / n), "desirable_reward": desirable,
            "undesirable_reward": undesirable, "reward_margin": desirable - undesirable, "kl": float(total[6] / n),
            "examples": int(total[7]),
        }
        if self.phase == "final" or self.config.generation.eval_during_training:
            prompts = data.extra["prompts"].get(split, [])
            if prompts:
                self._rejected_answers = data.extra["rejected"][split]
                metrics.update(self.generation_scores(accelerator.unwrap_model(model), accelerator, prompts,
                                                      data.extra["references"][split]))
                metrics.update(self.kl_to_reference(accelerator.unwrap_model(model), accelerator, prompts, data))
        return metrics

    # ------------------------------------------------------------------------------ report and inspect
    def report_sections(self, report: Report, run_dir: Any, metrics: dict[str, Any], data: TaskData) -> None:
        """Judgement metrics and generation before and after."""
        start = metrics.get("starting_point", {})
        split = "test" if "test" in metrics else "validation"
        tuned, base = metrics.get(split, {}), start.get(split, {})
        if not tuned:
            return
        report.heading(f"Judged answers on the {split} split", 3)
        keys = ["accuracy", "reward_margin", "desirable_reward", "undesirable_reward", "kl", "kl_per_token", "loss",
                "prefers_chosen", "rouge_l", "token_f1", "stopped_fraction", "mean_generated_words"]
        report.table(["metric", "starting model", "tuned model"],
                     [[k, base.get(k), tuned.get(k)] for k in keys if k in tuned])
        report.paragraph(f"{tuned.get('examples')} held-out examples. `accuracy`: examples whose implicit reward "
                         "(log-ratio to the starting model) is positive for a desirable answer and negative for an "
                         "undesirable one (0 counts half: the starting model's rewards are all 0); generation is "
                         "scored against the desirable answers.")
        rows = [[cell(last_user_message(e["prompt"])), cell(e["reference"]), cell(e["generated"])]
                for e in tuned.get("examples", [])]
        if rows:
            report.table(["prompt", "desirable answer", "tuned model"], rows)

    def inspect(self, source: str | None, *, examples: int = 3) -> dict[str, Any] | None:
        """The examples as the model will see them (:mod:`lmtune.tasks.preference_inspect`)."""
        return inspect_kto(self.config, self.load_tokenizer(self.model_path()), source, examples=examples)

    def render_inspection(self, report: dict[str, Any], console: Any) -> bool:
        """Print :meth:`inspect`'s report as tables."""
        render_kto_report(report, console)
        return True


def _half(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The rows ``rows`` of a batch, without the padding columns no row of them uses."""
    mask = batch["attention_mask"][rows]
    width = int(mask.sum(dim=1).max())
    return {"input_ids": batch["input_ids"][rows, :width], "attention_mask": mask[:, :width],
            "labels": batch["labels"][rows, :width]}
