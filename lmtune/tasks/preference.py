"""What the offline preference tasks share (``dpo``, ``orpo``, ``simpo``): pairs in, one concatenated forward,
per-pair losses, reference log-probs computed once, preference metrics and generation before/after.

Data: preference pairs (a prompt, a chosen and a rejected answer) in TRL's standard, conversational or
implicit-prompt shapes, read and rendered by :mod:`lmtune.data.preference` with the model's chat template
exactly as ``sft`` renders a conversation; each answer carries loss up to and including its end-of-turn token.

Forward: a batch of B pairs is B rows of ``prompt + chosen answer + rejected answer`` (:class:`PairCollator`
with ``share_prompt``): the prompt goes through the model once, and a 4D attention mask keeps the rejected
answer from seeing the chosen one, so each answer's log-probs are those of its own row. Only the answer
positions need the language-model head: the model computes logits from the first answer position on only
(``logits_to_keep``), so the prompt's logits (most of a chat example) are never built.

Reference (``dpo``): the starting model's log-probs of every pair of every split, computed once before the
first step in evaluation mode (no dropout) with the model being trained (a LoRA adapter is still zero then,
so the model *is* the base) and cached in ``reference_logps.safetensors`` in the run folder: no second copy
of the model is held, whatever the method, and a resumed run reads the cache back.

Evaluation: loss, preference accuracy (implicit reward of chosen > rejected, as TRL's ``rewards/accuracies``),
reward margins, per-token log-probs of both answers, the starting model's own length-normalised preference
(``logp_accuracy``, meaningful before training too), the mean per-token log-ratio to the reference on the
chosen answers; at the final evaluation answers generated for held-out prompts, scored against the chosen
answers with the SFT text metrics and checked for which answer they resemble more (``prefers_chosen``).

A shared module, not a task folder: the task folders import it, never each other.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from lmtune.config import Config
from lmtune.data.chat import end_of_turn_ids
from lmtune.data.features import (
    IGNORE_INDEX,
    FeatureDataset,
    SortedBatchSampler,
    cached_features,
    digest_records,
    features_cache_key,
)
from lmtune.data.preference import (
    PreferencePair,
    RenderedPair,
    pair_problems,
    preference_splits,
    read_preference_pairs,
    render_pair,
)
from lmtune.data.table import format_locations
from lmtune.errors import ConfigError, DataError, RunError
from lmtune.evaluate.report import Report
from lmtune.evaluate.text_metrics import generation_metrics
from lmtune.models.generation import chat_prompt, encode_prompt, rng_devices
from lmtune.tasks.base import TaskData
from lmtune.tasks.chat_tuning import ChatTuningTask, cell
from lmtune.tasks.decoder import refuse_streaming
from lmtune.tasks.preference_inspect import inspect_pairs, render_pairs_report
from lmtune.tasks.preference_losses import completion_token_logps

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.safetensors"


def render_split(split: str, pairs: list[PreferencePair], tokenizer: Any, data: Any, source: str
                 ) -> tuple[list[tuple[PreferencePair, RenderedPair]], list[int]]:
    """Each pair of a split rendered with the chat template (:func:`render_pair`): the kept ones with their
    rendering, and the lines of those skipped as longer than ``data.max_length`` (logged); a DataError naming
    ``source`` when none fits."""
    rendered = [render_pair(tokenizer, p, max_length=data.max_length, too_long=data.too_long,
                            special_tokens_in_content=data.special_tokens_in_content) for p in pairs]
    kept = [(p, r) for p, r in zip(pairs, rendered, strict=True) if r is not None]
    skipped = [p.line for p, r in zip(pairs, rendered, strict=True) if r is None]
    if skipped:
        log.warning("%s: %d of %d pairs are longer than data.max_length %d and were skipped (lines %s)%s",
                    split, len(skipped), len(pairs), data.max_length, format_locations(skipped),
                    "" if data.too_long == "truncate_left" else "; data.too_long: truncate_left keeps those "
                    "whose answers fit")
    if not kept:
        raise DataError(f"no {split} pair fits data.max_length {data.max_length}", file=source,
                        hint="raise data.max_length")
    return kept, skipped


def count_pair_problems(pairs: list[RenderedPair], tokenizer: Any) -> dict[str, int]:
    """How many rendered pairs have each pre-flight problem (:func:`pair_problems`: no EOS at an answer's end
    ...)."""
    problems: dict[str, int] = {}
    eos = end_of_turn_ids(tokenizer)  # once: looking it up scans the vocabulary
    for pair in pairs:
        for problem in set(pair_problems(tokenizer, pair, eos)):
            problems[problem] = problems.get(problem, 0) + 1
    return problems


def pair_features(task: str, split: str, pairs: list[RenderedPair], tokenizer: Any, data: Any
                  ) -> tuple[FeatureDataset, list[int]]:
    """The token features of a split's rendered pairs (both answers' ids and labels, the pair's index), from
    the feature cache when it has them, and each pair's length: its longer side (length grouping, evaluation
    order, plan)."""
    seqs = [(p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids, p.rejected.labels) for p in pairs]
    key = features_cache_key(task, digest_records(seqs), tokenizer, {"max_length": data.max_length, "pairs": True})

    def build() -> dict[str, list[Any]]:
        return {"chosen_input_ids": [s[0] for s in seqs], "chosen_labels": [s[1] for s in seqs],
                "rejected_input_ids": [s[2] for s in seqs], "rejected_labels": [s[3] for s in seqs],
                "index": list(range(len(seqs))), "length": [max(len(s[0]), len(s[2])) for s in seqs]}

    ds, hit = cached_features(key, build, use_cache=data.cache)
    if hit:
        log.info("%s pairs read from the feature cache (%s)", split, key[:12])
    lens = ds.with_format(None)["length"]
    ds.set_format(columns=[c for c in ds.column_names if c != "length"])
    return FeatureDataset(ds, lens), lens


class PairCollator:
    """Batches of B pairs, in one of two layouts.

    Separate rows (``share_prompt`` False; KTO, reward models): a (2B, T) batch, chosen rows then rejected rows,
    right-padded together, with the mask and the labels (-100 off the answers).

    Shared prompt (``share_prompt`` True; dpo, orpo, simpo): one row per pair, ``prompt + chosen answer + rejected
    answer``, so the prompt goes through the model once instead of twice. ``segments`` (B, T) mark each
    position: 0 the prompt both sides share (the longest common start without loss), 1 the rest of the chosen
    side, 2 the rest of the rejected side, -1 padding; ``position_ids`` restart the rejected part where the
    prompt ends, and :func:`shared_prompt_mask` lets its tokens see the prompt and each other, never the chosen
    answer, so every token gets the log-probability it has in its own row. ``labels`` hold both answers at their
    places in the row, except the rejected side's first token after the prompt: the position before it is the
    prompt's last, so it is scored apart (``bridge_token``, predicted from position ``bridge_from``; -100 and -1
    when there is none). ``num_real_tokens`` counts the tokens of both sides, as the separate layout holds them.

    Both layouts carry each pair's index in its split (for the cached reference log-probs). ``sides`` names the
    two rows of a feature (``chosen``/``rejected``; KTO: ``example``/``kl``); ``flags`` are per-example
    features passed through as (B,) tensors (KTO's ``desirable``)."""

    def __init__(self, pad_token_id: int, sides: tuple[str, str] = ("chosen", "rejected"),
                 flags: tuple[str, ...] = (), *, share_prompt: bool = False) -> None:
        self.pad = pad_token_id
        self.sides = sides
        self.flags = flags
        self.share_prompt = share_prompt

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._shared(features) if self.share_prompt else self._separate(features)
        batch["index"] = torch.tensor([int(f["index"]) for f in features], dtype=torch.long)
        for flag in self.flags:
            batch[flag] = torch.tensor([int(f[flag]) for f in features], dtype=torch.long)
        return batch

    def _separate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        first, second = self.sides
        rows = [(f[f"{first}_input_ids"], f[f"{first}_labels"]) for f in features]
        rows += [(f[f"{second}_input_ids"], f[f"{second}_labels"]) for f in features]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            labels[i, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _shared(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        first, second = self.sides
        rows = []
        for f in features:
            c_ids, c_lab = list(f[f"{first}_input_ids"]), list(f[f"{first}_labels"])
            r_ids, r_lab = list(f[f"{second}_input_ids"]), list(f[f"{second}_labels"])
            shared = shared_prefix(c_ids, c_lab, r_ids, r_lab)
            rows.append((c_ids, c_lab, r_ids, r_lab, shared))
        width = max(len(c) + len(r) - s for c, _, r, _, s in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        segments = torch.full((n, width), -1, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        bridge_token = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
        bridge_from = torch.full((n,), -1, dtype=torch.long)
        real = torch.zeros((n,), dtype=torch.long)
        for i, (c_ids, c_lab, r_ids, r_lab, s) in enumerate(rows):
            c, r = len(c_ids), len(r_ids)
            end = c + r - s
            input_ids[i, :c] = torch.as_tensor(c_ids, dtype=torch.long)
            input_ids[i, c:end] = torch.as_tensor(r_ids[s:], dtype=torch.long)
            labels[i, :c] = torch.as_tensor(c_lab, dtype=torch.long)
            labels[i, c:end] = torch.as_tensor(r_lab[s:], dtype=torch.long)
            segments[i, :s], segments[i, s:c], segments[i, c:end] = 0, 1, 2
            positions[i, :c] = torch.arange(c)
            positions[i, c:end] = torch.arange(s, r)
            positions[i, end:] = torch.arange(width - end)
            if s and s < r and r_lab[s] != IGNORE_INDEX:
                # The rejected side's first token after the prompt: its predecessor is the prompt's last token.
                labels[i, c] = IGNORE_INDEX
                bridge_token[i], bridge_from[i] = r_lab[s], s - 1
            real[i] = c + r
        return {"input_ids": input_ids, "attention_mask": (segments >= 0).long(), "labels": labels,
                "segments": segments, "position_ids": positions, "bridge_token": bridge_token,
                "bridge_from": bridge_from, "num_real_tokens": real}


def shared_prefix(c_ids: list[int], c_lab: list[int], r_ids: list[int], r_lab: list[int]) -> int:
    """How many leading tokens two rows share without loss on either (their prompt), at most all but one
    token of each row (so each side keeps a token of its own)."""
    limit = min(len(c_ids), len(r_ids)) - 1
    s = 0
    while s < limit and c_ids[s] == r_ids[s] and c_lab[s] == IGNORE_INDEX and r_lab[s] == IGNORE_INDEX:
        s += 1
    return s


def shared_prompt_mask(segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (B, 1, T, T) attention mask of shared-prompt rows (:class:`PairCollator`): causal, no padding keys,
    and no rejected token sees a chosen one. Boolean (True: attend) for SDPA, or additive in ``dtype`` (0 or its
    lowest value) for eager attention."""
    width = segments.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=segments.device).tril()
    keys, queries = segments[:, None, :], segments[:, :, None]  # (B, 1, T) and (B, T, 1)
    allow = causal & (keys >= 0) & ~((queries == 2) & (keys == 1))
    allow = allow[:, None]  # (B, 1, T, T)
    if dtype is None:
        return allow
    return torch.zeros(allow.shape, dtype=dtype, device=segments.device).masked_fill(~allow, torch.finfo(dtype).min)


def separate_rows(batch: dict[str, torch.Tensor], pad: int = 0) -> dict[str, torch.Tensor]:
    """The (2B, T) separate-rows batch (chosen rows, then rejected rows) of a shared-prompt batch: for models
    whose attention takes no 4D mask."""
    chosen, rejected = [], []
    for i in range(batch["input_ids"].shape[0]):
        seg, ids, lab = batch["segments"][i], batch["input_ids"][i], batch["labels"][i]
        c, r = (seg == 0) | (seg == 1), (seg == 0) | (seg == 2)
        r_lab = lab[r].clone()
        if int(batch["bridge_from"][i]) >= 0:
            r_lab[int(batch["bridge_from"][i]) + 1] = batch["bridge_token"][i]
        chosen.append((ids[c], lab[c]))
        rejected.append((ids[r], r_lab))
    rows = chosen + rejected
    width = max(len(ids) for ids, _ in rows)
    device = batch["input_ids"].device
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)], labels[i, : len(lab)], mask[i, : len(ids)] = ids, lab, 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class PairTask(ChatTuningTask):
    """A decoder tuned on preference pairs; subclasses give :meth:`pair_losses` (and ``info``)."""

    # Whether the loss compares with a reference model (dpo); orpo and simpo have none.
    uses_reference = False

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.pref = config.preference
        self.reference: dict[str, torch.Tensor] = {}  # split -> (N, 2) reference log-probs (chosen, rejected)
        self._keeps_logits: bool | None = None
        self._starting_model: str | None = None  # a saved run's base model folder (load_model_meta)
        self.accelerator: Any = None  # the training run's (before_training)
        # Whether the model may differ from the reference: it took a step here, or it is a saved run's.
        self.trained = False
        # The rejected answers of the prompts being scored by generation (set by evaluate, read by text_scores).
        self._rejected_answers: list[str] = []

    @property
    def packing(self) -> bool:
        """Pairs are never packed (see :func:`check_pair_config`)."""
        return False

    @property
    def rows_per_example(self) -> int:
        """A pair's chosen and rejected answers go through the model together (in one row that holds the
        prompt once: :class:`PairCollator`; the plan's two rows of ``max_length`` bound it)."""
        return 2

    @property
    def beta(self) -> float:
        """``preference.beta``, or the task's default."""
        return self.pref.beta if self.pref.beta is not None else self.default_beta

    default_beta = 0.1

    # ------------------------------------------------------------------------------ data
    def read_pairs(self, source: str) -> tuple[list[PreferencePair], dict[str, Any]]:
        """Validated pairs of one source, and facts about it."""
        return read_preference_pairs(source, self.data_cfg)

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, split, render both answers with the chat template, check, and tokenise (cached)."""
        self.tokenizer = tokenizer
        if self.data_cfg.streaming:
            raise ConfigError(f"data.streaming does not apply to task {self.config.task}")
        splits, info = preference_splits(self.data_cfg, self.read_pairs)
        d = self.data_cfg
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        prompts: dict[str, list[str]] = {}
        chosen: dict[str, list[str]] = {}
        rejected: dict[str, list[str]] = {}
        for split, pairs in splits.items():
            kept, skipped = render_split(split, pairs, tokenizer, d, info[split].get("source", d.train))
            if split == "train":
                info["preflight"] = self.pair_preflight([r for _, r in kept], tokenizer, d.train)
            features[split], lengths[split] = pair_features(self.info.name, split, [r for _, r in kept], tokenizer,
                                                            d)
            info[split].update({
                "pairs": len(kept), "skipped_too_long": len(skipped), "skipped_lines": skipped[:1000],
                "truncated": sum(r.chosen.truncated_tokens > 0 for _, r in kept),
                "tokens": sum(len(r.chosen.input_ids) + len(r.rejected.input_ids) for _, r in kept),
            })
            if split != "train":
                limit = self.config.generation.eval_examples or len(kept)
                prompts[split] = [chat_prompt(tokenizer, p.prompt) for p, _ in kept[:limit]]
                chosen[split] = [p.chosen for p, _ in kept[:limit]]
                rejected[split] = [p.rejected for p, _ in kept[:limit]]
        info["chat_template"] = self.chat_template_source
        return TaskData(splits=features, lengths=lengths, info=info,
                        extra={"prompts": prompts, "references": chosen, "rejected": rejected})

    def pair_preflight(self, pairs: list[RenderedPair], tokenizer: Any, source: str) -> dict[str, int]:
        """Pre-flight checks of the rendered training pairs (no EOS at an answer's end ...): counts per problem;
        a DataError for a problem in every pair or any double BOS, as for SFT."""
        problems = count_pair_problems(pairs, tokenizer)
        for problem, count in problems.items():
            msg = f"{count} of {len(pairs)} training pairs: {problem}"
            if self.is_definite(problem, count, len(pairs)):
                raise DataError(f"pre-flight check failed: {msg}", file=source,
                                hint="`lmtune data inspect CONFIG` shows every check and the pairs as the model sees "
                                "them")
            log.warning("pre-flight: %s", msg)
        return problems

    # ------------------------------------------------------------------------------ forward
    def collator(self, tokenizer: Any) -> PairCollator:
        """One row per pair, the prompt shared by both answers."""
        return PairCollator(tokenizer.pad_token_id, share_prompt=True)

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs: the loss is a mean over pairs."""
        return int(batch["index"].numel())

    def _inner(self, model: torch.nn.Module) -> PreTrainedModel | None:
        """The transformers model inside the wrappers (DDP, peft, Accelerate's autocast)."""
        return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)

    def _can_keep_logits(self, model: torch.nn.Module) -> bool:
        """Whether the model's forward takes ``logits_to_keep`` (every causal LM of transformers 5 does). The
        wrappers pass the keyword through."""
        if self._keeps_logits is None:
            inner = self._inner(model)
            self._keeps_logits = inner is not None and "logits_to_keep" in inspect.signature(
                type(inner).forward).parameters
        return self._keeps_logits

    def _shared_mask(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The 4D attention mask of a shared-prompt batch for this model, or None when its attention cannot
        take one as it is (not SDPA or eager attention, or a sliding window shorter than the rows): the batch
        then goes through as separate rows."""
        inner = self._inner(model)
        config = getattr(inner, "config", None)
        attention = getattr(config, "_attn_implementation", None) or "eager"
        window = getattr(config, "sliding_window", None)
        if attention not in ("sdpa", "eager") or (window and batch["input_ids"].shape[1] > int(window)):
            return None
        dtype = None if attention == "sdpa" else next(model.parameters()).dtype
        return shared_prompt_mask(batch["segments"], dtype)

    def _as_separate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokenizer = getattr(self, "tokenizer", None)
        pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        return separate_rows(batch, pad)

    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) summed log-probs of each answer and (2B,) their token counts, chosen answers first, in one
        forward, whichever layout the batch has (:class:`PairCollator`)."""
        if "segments" in batch:
            mask = self._shared_mask(model, batch)
            if mask is not None:
                return self._shared_logps(model, batch, mask)
            batch = self._as_separate(batch)
        labels = batch["labels"]  # (2B, T)
        has_loss = labels[:, 1:] != IGNORE_INDEX  # (2B, T-1): position t predicts token t+1
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       **self._forward_kwargs(model, labels, has_loss)).logits
        per_token = completion_token_logps(logits, labels)  # (2B, T), 0 off the answers
        return per_token.sum(dim=1), has_loss.sum(dim=1)

    def _forward_kwargs(self, model: torch.nn.Module, labels: torch.Tensor, has_loss: torch.Tensor,
                        earliest: int | None = None) -> dict[str, Any]:
        """``use_cache`` off and, where the model takes it, logits only from the first position that predicts an
        answer token (or ``earliest``, if before) on."""
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._can_keep_logits(model):
            first = int(has_loss.float().argmax(dim=1).min()) if bool(has_loss.any()) else 0
            if earliest is not None:
                first = min(first, earliest)
            kwargs["logits_to_keep"] = labels.shape[1] - first
        return kwargs

    def _shared_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sequence_logps` of a shared-prompt batch: one row per pair, the two answers told apart by
        ``segments``, the rejected answer's first token scored from the prompt's last position."""
        labels, segments = batch["labels"], batch["segments"]  # (B, T)
        width = labels.shape[1]
        has_loss = labels[:, 1:] != IGNORE_INDEX
        source, bridged = batch["bridge_from"], batch["bridge_from"] >= 0
        earliest = int(source[bridged].min()) if bool(bridged.any()) else None
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                       **self._forward_kwargs(model, labels, has_loss, earliest)).logits
        per_token = completion_token_logps(logits, labels)  # (B, T): column t scores labels[:, t + 1]
        side = F.pad(segments[:, 1:], (0, 1), value=-1)  # (B, T): the segment of the token column t scores
        scored = F.pad(has_loss, (0, 1))
        chosen = (per_token * (side == 1)).sum(dim=1)
        rejected = (per_token * (side == 2)).sum(dim=1)
        n_chosen, n_rejected = (scored & (side == 1)).sum(dim=1), (scored & (side == 2)).sum(dim=1)
        if bool(bridged.any()):
            rows = bridged.nonzero().squeeze(1)
            at = logits[rows, source[rows] - (width - logits.shape[1])].float()  # (n, V)
            first = at.gather(-1, batch["bridge_token"][rows, None]).squeeze(-1) - torch.logsumexp(at, dim=-1)
            rejected = rejected.index_add(0, rows, first)
            n_rejected = n_rejected + bridged.long()
        return torch.cat([chosen, rejected]), torch.cat([n_chosen, n_rejected])

    def pair_losses(self, logps: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) per-pair losses and (B,) chosen and rejected rewards from (2B,) log-probs and token counts;
        ``reference`` (B, 2) for tasks that use one."""
        raise NotImplementedError

    def load_model_meta(self, meta: dict[str, Any]) -> None:
        """Remember the starting model of a saved run: evaluating it on new data needs its reference log-probs."""
        self._starting_model = meta.get("base_model_path")
        self.trained = True

    def _ensure_reference(self, split: str, data: TaskData, accelerator: Any) -> None:
        """Reference log-probs of a split that has none yet (``lmtune eval`` of a saved run, on its splits or a
        file): computed with the starting model, loaded for this once, as training did before its first step."""
        if not self.uses_reference or split in self.reference:
            return
        if not self._starting_model or not Path(self._starting_model).is_dir():
            raise RunError(f"the {split} pairs need the starting model's log-probs, and its folder is not there "
                           f"({self._starting_model})", hint="evaluate on the machine that trained the run")
        log.info("reference: loading the starting model %s to score the %s pairs", self._starting_model, split)
        reference = self.build_model(Path(self._starting_model), data, self.tokenizer)
        reference.to(accelerator.device).eval()
        with torch.no_grad():
            self.reference[split] = self._reference_pass(reference, accelerator, data.splits[split],
                                                         data.lengths[split])
        del reference

    def _reference_of(self, split: str, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.uses_reference:
            return None
        table = self.reference.get(split)
        if table is None:
            raise RuntimeError(f"reference log-probs of the {split} split were not computed (before_training)")
        return table[batch["index"].cpu()].to(batch["input_ids"].device)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed per-pair losses of the micro-batch."""
        self.trained = True
        logps, tokens = self.sequence_logps(model, batch)
        losses, _, _ = self.pair_losses(logps, tokens, self._reference_of("train", batch))
        return losses.sum()

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits of every position (compared before and after saving): (B, T, vocab) for a
        shared-prompt batch, (2B, T, vocab) for separate rows."""
        if "segments" in batch:
            mask = self._shared_mask(model, batch)
            if mask is not None:
                return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                             use_cache=False).logits.float()
            batch = self._as_separate(batch)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits.float()

    # ------------------------------------------------------------------------------ reference
    def before_training(self, model: torch.nn.Module, accelerator: Any, data: TaskData, run_dir: Path,
                        *, resuming: bool, progress: Any = None) -> None:
        """The reference log-probs of every pair, computed once with the starting model (or read back)."""
        self.accelerator = accelerator
        if not self.uses_reference:
            return
        path = run_dir / REFERENCE_FILE
        sizes = {split: len(ds) for split, ds in data.splits.items()}
        if resuming and path.is_file():
            cached = load_file(str(path))
            if {s: int(t.shape[0]) for s, t in cached.items()} == sizes:
                self.reference = cached
                log.info("reference: log-probs of the starting model read back from %s", path.name)
                return
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), base_model_only(accelerator.unwrap_model(model)):
                self.reference = {split: self._reference_pass(model, accelerator, ds, data.lengths[split],
                                                              progress, f"reference {split}")
                                  for split, ds in data.splits.items()}
        finally:
            model.train(was_training)
        if accelerator.is_main_process:
            save_file({s: t.contiguous() for s, t in self.reference.items()}, str(path))
        log.info("reference: the starting model's log-probs of %s pairs, computed once before training in %.1f s "
                 "and cached in %s (no second model in memory)", " + ".join(f"{n:,} {s}" for s, n in sizes.items()),
                 time.perf_counter() - start, path.name)

    def _reference_pass(self, model: torch.nn.Module, accelerator: Any, dataset: Any, lengths: list[int],
                        progress: Any = None, what: str = "reference") -> torch.Tensor:
        """(N, 2) summed answer log-probs (chosen, rejected) of one split, shared out across processes;
        ``progress`` (a rich Progress) shows the pairs done."""
        t = self.config.train
        loader = DataLoader(dataset, batch_sampler=SortedBatchSampler(lengths, t.eval_batch_size or t.batch_size),
                            collate_fn=self.collator(self.tokenizer), num_workers=t.num_workers)
        loader = accelerator.prepare_data_loader(loader)
        table = torch.zeros((len(dataset), 2), dtype=torch.float32)
        bar = progress.add_task(what, total=len(dataset)) if progress is not None else None
        for batch in loader:
            logps, _ = self.sequence_logps(model, batch)
            chosen, rejected = logps.float().chunk(2)
            rows = torch.stack([batch["index"].float(), chosen, rejected], dim=1)  # (B, 3)
            rows = accelerator.gather_for_metrics(rows).cpu()
            table[rows[:, 0].long()] = rows[:, 1:]
            if bar is not None:
                progress.advance(bar, rows.shape[0])
        return table

    def plan_notes(self) -> list[str]:
        """What the reference costs (dpo): one forward pass over the data before training, 8 bytes per pair."""
        if not self.uses_reference:
            return [f"task {self.config.task} needs no reference model"]
        return ["reference: the starting model's log-probs of every pair are computed once before training (one "
                "forward pass without gradients over every split, about a third of an epoch's compute) and cached "
                "in the run folder; no second copy of the model is held"]

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: Any, loader: Any, accelerator: Any, split: str, data: TaskData) -> dict[str, Any]:
        """Preference metrics over the split's pairs; generation scores at the final evaluation."""
        self._ensure_reference(split, data, accelerator)
        total = torch.zeros(10, dtype=torch.float64)
        for batch in loader:
            logps, tokens = self.sequence_logps(model, batch)
            ref = self._reference_of(split, batch)
            losses, r_chosen, r_rejected = self.pair_losses(logps, tokens, ref)
            lc, lr = logps.double().chunk(2)
            nc, nr = tokens.double().clamp(min=1).chunk(2)
            logratio = (lc - ref[:, 0].double()) / nc if ref is not None else torch.zeros_like(lc)
            rows = torch.stack([
                losses.double(), wins(r_chosen - r_rejected), (r_chosen - r_rejected).double(),
                r_chosen.double(), r_rejected.double(), lc / nc, lr / nr, wins(lc / nc - lr / nr), logratio,
                torch.ones_like(lc),
            ], dim=1)  # (B, 10)
            # Per row, so the rows Accelerate repeats to even out the last batches are dropped.
            total += accelerator.gather_for_metrics(rows).double().sum(dim=0).cpu()
        n = max(int(total[-1]), 1)
        names = ["loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp_per_token",
                 "rejected_logp_per_token", "logp_accuracy", "logratio_per_token"]
        metrics: dict[str, Any] = {name: float(total[i] / n) for i, name in enumerate(names)}
        if not self.uses_reference:
            del metrics["logratio_per_token"]
        metrics["pairs"] = n
        if self.phase == "final" or self.config.generation.eval_during_training:
            prompts = data.extra["prompts"].get(split, [])
            if prompts:
                self._rejected_answers = data.extra["rejected"][split]
                metrics.update(self.generation_scores(accelerator.unwrap_model(model), accelerator, prompts,
                                                      data.extra["references"][split]))
                if self.uses_reference:
                    metrics.update(self.kl_to_reference(accelerator.unwrap_model(model), accelerator, prompts,
                                                        data))
        return metrics

    def kl_to_reference(self, model: Any, accelerator: Any, prompts: list[str], data: TaskData) -> dict[str, Any]:
        """``kl_per_token``: a Monte-Carlo estimate of KL(policy || reference) per answer token, from one answer
        sampled (temperature 1, no top-p) from the tuned model for each of up to ``KL_PROMPTS`` held-out
        prompts: the mean of ``log pi(token) - log ref(token)`` over the sampled tokens. The reference is
        the LoRA model with its adapter disabled, or else the starting model loaded for this once (say so in the
        log); before the first step the model is the reference and the estimate is 0."""
        mine = prompts[: self.KL_PROMPTS][accelerator.process_index:: accelerator.num_processes]
        if not self.trained:
            return {"kl_per_token": 0.0, "kl_answers": min(len(prompts), self.KL_PROMPTS)}
        batch = self.sample_answers(model, mine)
        sums = torch.zeros(3, dtype=torch.float64)  # (log-ratio sum, tokens, answers)
        if batch is not None:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    policy = self.token_logps(model, batch)
                    disable = getattr(model, "disable_adapter", None)
                    if disable is not None:
                        with disable():
                            reference = self.token_logps(model, batch)
                    else:
                        starting = self._starting_model or str(self.model_path())
                        log.info("KL to the reference: loading the starting model %s once to score %d sampled "
                                 "answers", starting, batch["input_ids"].shape[0])
                        ref_model = self.build_model(Path(starting), data, self.tokenizer).to(
                            batch["input_ids"].device).eval()
                        reference = self.token_logps(ref_model, batch)
                        del ref_model
            finally:
                model.train(was_training)
            mask = batch["labels"][:, 1:] != IGNORE_INDEX
            sums += torch.tensor([float((policy - reference)[:, :-1][mask].sum()), float(mask.sum()),
                                  float(mask.shape[0])], dtype=torch.float64)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        return {"kl_per_token": float(sums[0] / sums[1].clamp(min=1)), "kl_answers": int(sums[2])}

    KL_PROMPTS = 32

    def token_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, T) per-token log-probs of the answer tokens of ``batch`` under ``model``."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return completion_token_logps(logits, batch["labels"])

    def sample_answers(self, model: Any, prompts: list[str]) -> dict[str, torch.Tensor] | None:
        """One answer sampled per prompt (temperature 1, seeded, the caller's RNG untouched), as right-padded
        rows of prompt + answer with labels on the answer (its end-of-turn token included)."""
        if not prompts:
            return None
        tokenizer = self.tokenizer
        eos = sorted(end_of_turn_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None)))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        encoded = [encode_prompt(tokenizer, p) for p in prompts]
        width = max(len(ids) for ids in encoded)
        device = next(model.parameters()).device
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices(device)):
                torch.manual_seed(self.config.generation.seed)
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                     do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                     max_new_tokens=self.config.generation.max_new_tokens, eos_token_id=eos,
                                     pad_token_id=pad)
        finally:
            model.train(was_training)
        rows = []
        for i, ids in enumerate(encoded):
            answer = out[i, width:].tolist()
            stop = next((j for j, t in enumerate(answer) if t in eos), None)
            answer = answer[: stop + 1] if stop is not None else answer
            rows.append({"chosen_input_ids": ids + answer, "chosen_labels": [IGNORE_INDEX] * len(ids) + answer,
                         "rejected_input_ids": ids, "rejected_labels": [IGNORE_INDEX] * len(ids), "index": i})
        batch = PairCollator(pad)(rows)
        n = len(rows)
        return {k: v[:n].to(device) for k, v in batch.items() if k != "index"}

    def text_scores(self, texts: list[str], references: list[str]) -> dict[str, float]:
        """The SFT text metrics against the chosen answers, and ``prefers_chosen``: the share of answers closer
        (ROUGE-L) to the chosen answer than to the rejected one of their pair (ties count half)."""
        scores = dict(generation_metrics(texts, references))
        if len(self._rejected_answers) != len(texts):  # no rejected answer to compare with (kto without pairs)
            return scores
        won = 0.0
        for text, chosen, rejected in zip(texts, references, self._rejected_answers, strict=True):
            to_chosen = generation_metrics([text], [chosen])["rouge_l"]
            to_rejected = generation_metrics([text], [rejected])["rouge_l"]
            won += 1.0 if to_chosen > to_rejected else 0.5 if to_chosen == to_rejected else 0.0
        scores["prefers_chosen"] = won / max(len(texts), 1)
        return scores

    # ------------------------------------------------------------------------------ report and inspect
    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Preference metrics and generation before and after, and example answers side by side."""
        start = metrics.get("starting_point", {})
        split = "test" if "test" in metrics else "validation"
        tuned, base = metrics.get(split, {}), start.get(split, {})
        if not tuned:
            return
        report.heading(f"Preferences on the {split} split", 3)
        keys = ["accuracy", "reward_margin", "chosen_reward", "rejected_reward", "logp_accuracy",
                "chosen_logp_per_token", "rejected_logp_per_token", "logratio_per_token", "kl_per_token", "loss"]
        report.table(["metric", "starting model", "tuned model"],
                     [[k, base.get(k), tuned.get(k)] for k in keys if k in tuned])
        report.paragraph(f"{tuned.get('pairs')} held-out pairs. `accuracy`: pairs whose implicit reward ranks the "
                         "chosen answer above the rejected one (a tie counts half: the starting model's rewards are "
                         "all 0 under dpo); `logp_accuracy`: pairs where the model gives the chosen "
                         "answer the higher log-probability per token (meaningful for the starting model too); "
                         "`logratio_per_token`: mean log-ratio to the starting model on the chosen answers; `kl_per_token`: "
                         "KL(tuned || starting model) per token, estimated on answers the tuned model sampled for "
                         f"{tuned.get('kl_answers', 0)} held-out prompts.")
        if "rouge_l" in tuned:
            report.heading(f"Answers generated on the {split} split", 3)
            gen = ["prefers_chosen", "rouge_l", "token_f1", "chrf", "stopped_fraction", "mean_generated_words"]
            report.table(["metric", "starting model", "tuned model"],
                         [[k, base.get(k), tuned.get(k)] for k in gen if k in tuned])
            report.paragraph("Scored against the chosen answers. `prefers_chosen`: answers closer (ROUGE-L) to the "
                             "chosen answer than to the rejected one.")
            before = {e["prompt"]: e for e in base.get("examples", [])}
            rows = [[cell(last_user_message(e["prompt"])), cell(e["reference"]), cell(before.get(e["prompt"], {}).get(
                "generated", "–")), cell(e["generated"])] for e in tuned.get("examples", [])]
            if rows:
                report.table(["prompt", "chosen answer", "starting model", "tuned model"], rows)

    def inspect(self, source: str | None, *, examples: int = 3) -> dict[str, Any] | None:
        """The pairs as the model will see them (:mod:`lmtune.tasks.preference_inspect`)."""
        refuse_streaming(self.config)
        return inspect_pairs(self.config, self.load_tokenizer(self.model_path()), source, examples=examples)

    def render_inspection(self, report: dict[str, Any], console: Any) -> bool:
        """Print :meth:`inspect`'s report as tables."""
        render_pairs_report(report, console)
        return True


def base_model_only(model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
    """A context that runs a peft model with its adapters switched off when that changes nothing but the cost:
    every LoRA ``B`` matrix is still zero (the standard start), so the adapters add exactly 0 and the
    reference pass skips their matmuls. Otherwise (full tuning, or an adapter that starts non-zero) a context
    that does nothing."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        return contextlib.nullcontext()
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    if not lora_b or any(bool(p.detach().any()) for p in lora_b):
        return contextlib.nullcontext()
    return disable()


def wins(margins: torch.Tensor) -> torch.Tensor:
    """(B,) 1 where the chosen answer wins, 0 where it loses, 0.5 for a tie: before DPO's first step every
    implicit reward is exactly 0, and that is chance (0.5), not a model that is always wrong."""
    return (margins > 0).double() + 0.5 * (margins == 0).double()


def last_user_message(prompt: str) -> str:
    """The last user message of a rendered prompt (ChatML-like templates), for a report cell; the prompt's
    end when no user turn marker is found."""
    i = prompt.rfind("user\n")
    if i < 0:
        return prompt[-200:]
    text = prompt[i + len("user\n"):]
    for end in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        text = text.split(end)[0]
    return text.strip()
