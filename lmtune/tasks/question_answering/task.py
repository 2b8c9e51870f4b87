"""Extractive question answering: the answer is a span of the context, found by start/end logits per token.

Data: SQuAD-format JSON or flat rows (question, context, answers), read and validated by
:mod:`lmtune.data.squad` (answers not at their offset are repaired or dropped, counted with locations).
Long contexts are cut into windows of ``data.max_length`` tokens overlapping by ``data.doc_stride``
(:mod:`lmtune.tasks.question_answering.spans`); each window is one training item, labelled with the answer's token span,
or the CLS index when the window does not hold the whole answer. Unanswerable questions (SQuAD 2.0) are
kept with ``data.allow_unanswerable``: they point at CLS, and an answer is empty when the CLS score beats
the best span by more than ``data.null_score_diff_threshold`` (``auto``: tuned on validation).

Model: ``AutoModelForQuestionAnswering`` (a linear ``qa_outputs`` head giving start and end logits).
Loss: per window the mean of the start and end cross-entropies, summed over windows. Metrics: exact
match and F1 as the official SQuAD v1.1/v2.0 script computes them, the best span chosen across all
windows of a question.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForQuestionAnswering

from lmtune.config import Config
from lmtune.config.tasks import TaskInfo
from lmtune.data.features import (
    FeatureDataset,
    PaddingCollator,
    cached_features,
    clip_text,
    digest_records,
    features_cache_key,
)
from lmtune.data.splits import split_by_context
from lmtune.data.squad import clean_items, read_qa_items
from lmtune.errors import ConfigError, DataError, ModelError
from lmtune.evaluate.report import Report
from lmtune.evaluate.text_metrics import squad_scores
from lmtune.models.registry import load_padded_tokenizer, model_path_of
from lmtune.tasks.base import Task, TaskData, encoder_inputs
from lmtune.tasks.question_answering.info import INFO
from lmtune.tasks.question_answering.spans import best_span, tokenize_windows

log = logging.getLogger(__name__)

# Example predictions kept per evaluation for the report (base and tuned on the same questions).
REPORT_EXAMPLES = 12
# Logit given to padding positions when windows of different widths are gathered into one tensor.
_PAD_LOGIT = -1e4


def resolved_stride(max_length: int, doc_stride: int | None) -> int:
    """``data.doc_stride``, or a quarter of ``max_length`` when it is not set."""
    return max_length // 4 if doc_stride is None else doc_stride


class QuestionAnsweringTask(Task):
    """Extractive QA: predict the start and end token of the answer span in each context window."""

    info: ClassVar[TaskInfo] = INFO
    # Not "QUESTION_ANS": peft 0.21's PeftModelForQuestionAnswering.forward drops token_type_ids, so a LoRA
    # BERT would train without segment embeddings and its merged model (which gets them) would answer
    # differently (the reload check caught it: logits off by 3). The generic PeftModel passes every input.
    peft_task_type: ClassVar[str | None] = None
    model_class: ClassVar[type] = AutoModelForQuestionAnswering

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_cfg = config.data
        self.stride = resolved_stride(config.data.max_length, config.data.doc_stride)
        t = config.data.null_score_diff_threshold
        self.tune_threshold = t == "auto" and config.data.allow_unanswerable
        self.threshold = 0.0 if t == "auto" else float(t)
        self.phase = "training"
        if self.stride >= config.data.max_length // 2:
            raise ConfigError(f"data.doc_stride {self.stride} must be less than half of data.max_length "
                              f"{config.data.max_length}", hint="windows overlap by doc_stride tokens; try "
                              f"--data.doc_stride {config.data.max_length // 4}")

    def evaluation_phase(self, phase: str) -> None:
        """``final`` evaluations keep example predictions and (``auto``) tune the no-answer threshold."""
        self.phase = phase

    def load_model_meta(self, meta: dict[str, Any]) -> None:
        """Use a saved model's threshold (``lmtune eval`` of a file: nothing to tune it on)."""
        if meta.get("null_score_diff_threshold") is not None:
            self.threshold = float(meta["null_score_diff_threshold"])
            self.tune_threshold = False

    # ------------------------------------------------------------------------------ tokenizer and data
    def model_path(self) -> Path:
        """The pretrained model's folder (``model.name``: a bundled name or a folder)."""
        return model_path_of(self.config.model)

    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The model's tokenizer, right-padded (the question comes first, the context is cut)."""
        assert model_path is not None  # model_path() always gives one
        tok = load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)
        if not getattr(tok, "is_fast", False):
            raise ModelError("question answering needs a fast tokenizer (character offsets of tokens)",
                             file=model_path)
        return tok

    def _read_split(self, source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        d = self.data_cfg
        items, display, layout = read_qa_items(source, d)
        records, info = clean_items(items, display, allow_unanswerable=d.allow_unanswerable, empty_text=d.empty_text)
        if not records:
            raise DataError("no usable questions (see the warnings above for what was skipped)", file=source,
                            hint=None if d.allow_unanswerable else "unanswerable questions need "
                            "data.allow_unanswerable: true")
        info.update(source=source, layout=layout, rows_read=len(items))
        return records, info

    @staticmethod
    def _key(r: dict[str, Any]) -> tuple[str, str]:
        return r["question"], r["context"]

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, split (by context), de-duplicate and cut into labelled windows (cached)."""
        d = self.data_cfg
        limit = tokenizer.model_max_length
        if limit and limit < 10**6 and d.max_length > limit:
            raise ConfigError(f"data.max_length {d.max_length} is larger than the model allows ({limit} tokens)",
                              hint=f"set --data.max_length {limit} or less")
        train, info_train = self._read_split(d.train)
        info: dict[str, Any] = {"train": info_train}
        if d.deduplicate:
            seen: set[tuple[str, str]] = set()
            unique = [r for r in train if not (self._key(r) in seen or seen.add(self._key(r)))]  # type: ignore[func-returns-value]
            info_train["duplicates_removed"] = len(train) - len(unique)
            train = unique
        fractions = {s: size for s, size, given in (("validation", d.validation_size, d.validation),
                                                    ("test", d.test_size, d.test)) if given is None}
        splits = split_by_context(train, fractions, d.split_seed)
        for split, source in (("validation", d.validation), ("test", d.test)):
            if source is not None:
                splits[split], info[split] = self._read_split(source)
            else:
                info[split] = {"source": f"{d.train} (split {fractions[split]:g}, by context)"}
        if d.deduplicate:
            train_keys = {self._key(r) for r in splits["train"]}
            for split in ("validation", "test"):
                kept = [r for r in splits[split] if self._key(r) not in train_keys]
                info[split]["duplicates_removed"] = len(splits[split]) - len(kept)
                splits[split] = kept
        if d.max_samples:
            rng = random.Random(d.split_seed)
            for split, rows in splits.items():
                if len(rows) > d.max_samples:
                    splits[split] = rng.sample(rows, d.max_samples)
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        windows: dict[str, dict[str, list[Any]]] = {}
        for split in list(splits):
            rows, skipped = self._drop_long_questions(splits[split], tokenizer)
            splits[split] = rows
            ds, win = self._tokenize(rows, tokenizer)
            features[split], lengths[split], windows[split] = ds, ds.lengths, win
            per_example = np.bincount(np.asarray(win["example"], dtype=np.int64), minlength=len(rows))
            info[split].update(
                examples=len(rows), windows=len(ds), tokens=int(sum(ds.lengths)), skipped_too_long=skipped,
                truncated=int((per_example > 1).sum()),  # contexts cut into several windows
                with_answer=sum(1 for r in rows if r["answers"]),
            )
        if not splits["train"]:
            raise DataError("no training questions left", file=d.train)
        info["allow_unanswerable"] = d.allow_unanswerable
        info["doc_stride"] = self.stride
        return TaskData(splits=features, lengths=lengths, info=info, extra={"examples": splits, "windows": windows})

    def _drop_long_questions(self, rows: list[dict[str, Any]], tokenizer: Any) -> tuple[list[dict[str, Any]], int]:
        """Questions too long to leave room for a window of context are skipped (counted, logged)."""
        if not rows:
            return rows, 0
        room = self.data_cfg.max_length - tokenizer.num_special_tokens_to_add(pair=True) - self.stride
        # Questions are clipped before they are counted (a megabyte question is skipped all the same, without
        # tokenising it whole); contexts are never clipped: every window of a context is used.
        questions = [clip_text(r["question"], max(room, 1)) for r in rows]
        q_len = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
        kept = [r for r, n in zip(rows, q_len, strict=True) if n < room]
        if len(kept) < len(rows):
            log.warning("%d questions are too long for data.max_length %d with doc_stride %d and were skipped",
                        len(rows) - len(kept), self.data_cfg.max_length, self.stride)
        return kept, len(rows) - len(kept)

    def _tokenize(self, rows: list[dict[str, Any]], tokenizer: Any) -> tuple[FeatureDataset, dict[str, list[Any]]]:
        d = self.data_cfg
        spans = [(r["answers"][0]["answer_start"], r["answers"][0]["answer_start"] + len(r["answers"][0]["text"]))
                 if r["answers"] else None for r in rows]
        key = features_cache_key(self.info.name, digest_records([(r["question"], r["context"], s) for r, s in
                                                            zip(rows, spans, strict=True)]),
                                 tokenizer, {"max_length": d.max_length, "stride": self.stride})

        def build() -> dict[str, list[Any]]:
            out = tokenize_windows(tokenizer, [r["question"] for r in rows], [r["context"] for r in rows], spans,
                                   max_length=d.max_length, stride=self.stride) if rows else \
                {"input_ids": [], "start_positions": [], "end_positions": [], "example": [], "offsets": [],
                 "length": []}
            out["index"] = list(range(len(out["input_ids"])))
            return out

        ds, hit = cached_features(key, build, use_cache=d.cache)
        if hit:
            log.info("tokenised QA windows read from cache (%s)", key[:12])
        plain = ds.with_format(None)
        windows = {"example": plain["example"] if len(ds) else [], "offsets": plain["offsets"] if len(ds) else []}
        lengths = plain["length"] if len(ds) else []
        ds.set_format(columns=[c for c in ds.column_names if c not in ("length", "example", "offsets")])
        return FeatureDataset(ds, lengths), windows

    # ------------------------------------------------------------------------------ model
    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The pretrained body with a new span head (``qa_outputs``: start and end logit per token)."""
        assert model_path is not None  # model_path() always gives one
        trust = self.config.model.trust_remote_code
        try:
            cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the model config: {exc}", file=model_path) from None
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos and self.data_cfg.max_length > max_pos:
            raise ConfigError(f"data.max_length {self.data_cfg.max_length} is larger than the model's "
                              f"{max_pos} positions", hint=f"set --data.max_length {max_pos} or less")
        try:
            model, loading = AutoModelForQuestionAnswering.from_pretrained(
                model_path, config=cfg, dtype=torch.float32, output_loading_info=True, trust_remote_code=trust,
                use_safetensors=not self.config.model.allow_pickle or None)
        except ValueError as exc:
            raise ModelError(f"this model cannot be loaded for question answering: {exc}", file=model_path) from None
        self.new_modules = sorted({k.rsplit(".", 1)[0] for k in loading["missing_keys"]})
        if self.config.model.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """Last-level names of the new modules: ``{'qa_outputs'}`` for BERT-style models."""
        names = {m.split(".")[-1] for m in getattr(self, "new_modules", [])}
        return names or {"qa_outputs"}

    # ------------------------------------------------------------------------------ batches and loss
    def collator(self, tokenizer: Any) -> PaddingCollator:
        """Dynamic padding to the longest window of each batch."""
        return PaddingCollator({"input_ids": tokenizer.pad_token_id, "token_type_ids": 0}, padding_side="right",
                               pad_to_multiple_of=8 if torch.cuda.is_available() else None)

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """One item per window."""
        return int(batch["input_ids"].shape[0])

    def _start_end(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**encoder_inputs(batch))
        mask = batch["attention_mask"] == 0
        # Padding can never be a start or an end: (B, T) each.
        return (out.start_logits.float().masked_fill(mask, _PAD_LOGIT),
                out.end_logits.float().masked_fill(mask, _PAD_LOGIT))

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Start and end logits side by side (B, 2T), padding masked: what the reload check compares."""
        start, end = self._start_end(model, batch)
        return torch.cat([start, end], dim=-1)  # (B, 2T): what the reload check compares

    def _window_losses(self, start: torch.Tensor, end: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (F.cross_entropy(start, batch["start_positions"], reduction="none")
                + F.cross_entropy(end, batch["end_positions"], reduction="none")) / 2  # (B,)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over windows of (start cross-entropy + end cross-entropy) / 2."""
        start, end = self._start_end(model, batch)
        return self._window_losses(start, end, batch).sum()

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: torch.nn.Module, loader: Any, accelerator: Any, split: str,
                 data: TaskData) -> dict[str, Any]:
        """Exact match and F1 (official SQuAD definitions), the v2 answerable/unanswerable split and loss."""
        width = self.data_cfg.max_length
        starts, ends, index, losses = [], [], [], []
        for batch in loader:
            start, end = self._start_end(model, batch)
            loss = self._window_losses(start, end, batch)
            pad = width - start.shape[1]  # same width on every process, so the tensors can be gathered
            start, end = F.pad(start, (0, pad), value=_PAD_LOGIT), F.pad(end, (0, pad), value=_PAD_LOGIT)
            start, end, idx, loss = accelerator.gather_for_metrics((start, end, batch["index"], loss))
            starts.append(start.cpu().numpy())
            ends.append(end.cpu().numpy())
            index.append(idx.cpu().numpy())
            losses.append(loss.cpu().numpy())
        if not index:
            return {"loss": float("nan"), "exact_match": 0.0, "f1": 0.0, "num_examples": 0}
        order = np.concatenate(index)
        s_all, e_all = np.concatenate(starts), np.concatenate(ends)
        examples = data.extra["examples"][split]
        windows = data.extra["windows"][split]
        by_example: dict[int, list[int]] = defaultdict(list)
        for row, w in enumerate(order.tolist()):
            by_example[windows["example"][w]].append(row)
        results = []
        for i, ex in enumerate(examples):
            rows = sorted(by_example.get(i, []), key=lambda r: int(order[r]))
            results.append(self._answer([(s_all[r], e_all[r], windows["offsets"][int(order[r])]) for r in rows],
                                        ex["context"]))
        golds = [[a["text"] for a in ex["answers"]] for ex in examples]
        diffs = [r["null_score_diff"] for r in results]
        best = [r["best_text"] for r in results]
        if self.data_cfg.allow_unanswerable and self.tune_threshold and self.phase == "final" and split == "validation":
            tuned = squad_scores(best, golds, null_score_diffs=diffs, best_non_null=best)
            self.threshold = float(tuned["best_f1_threshold"])
            log.info("no-answer threshold tuned on validation: %.3f (F1 %.4f)", self.threshold, tuned["best_f1"])
        predictions = [("" if d is not None and d > self.threshold else b) for d, b in zip(diffs, best, strict=True)]
        metrics: dict[str, Any] = squad_scores(
            predictions, golds, **({"null_score_diffs": diffs, "best_non_null": best}
                                   if self.data_cfg.allow_unanswerable else {}))
        metrics["loss"] = float(np.concatenate(losses).mean())
        metrics["windows"] = len(order)
        if self.data_cfg.allow_unanswerable:
            metrics["null_score_diff_threshold"] = self.threshold
        if self.phase == "final":
            metrics["examples"] = [{"id": ex["id"], "question": ex["question"], "gold": g[0] if g else "",
                                    "predicted": p} for ex, g, p in
                                   list(zip(examples, golds, predictions, strict=True))[:REPORT_EXAMPLES]]
        return metrics

    def _answer(self, windows: list[tuple[np.ndarray, np.ndarray, Any]], context: str) -> dict[str, Any]:
        d = self.data_cfg
        return best_span(windows, context, n_best=d.n_best_size, max_answer_length=d.max_answer_length,
                         allow_unanswerable=d.allow_unanswerable, null_score_diff_threshold=self.threshold)

    def inspect_facts(self, data: TaskData) -> dict[str, dict[str, Any]]:
        """Per split, for ``lmtune data inspect``: questions, windows, what the reader repaired or skipped."""
        keys = ("examples", "with_answer", "windows", "tokens", "truncated", "skipped_too_long", "answers_repaired",
                "answers_located", "answers_dropped", "questions_dropped", "skipped_empty", "skipped_unanswerable",
                "duplicates_removed")
        names = {"truncated": "contexts_over_several_windows"}
        return {s: {names.get(k, k): data.info[s][k] for k in keys if k in data.info.get(s, {})} for s in data.splits}

    # ------------------------------------------------------------------------------ saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Input columns and the span-decoding settings the predictor needs."""
        d = self.data_cfg
        return {"question_column": d.question_column, "context_column": d.context_column,
                "max_length": d.max_length, "doc_stride": self.stride, "max_answer_length": d.max_answer_length,
                "n_best_size": d.n_best_size, "allow_unanswerable": d.allow_unanswerable,
                "null_score_diff_threshold": self.threshold if d.allow_unanswerable else None}

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Scores before and after, what the data reader repaired, and example answers side by side."""
        split = "test" if "test" in metrics else "validation"
        tuned, base = metrics.get(split, {}), metrics.get("starting_point", {}).get(split, {})
        keys = ["exact_match", "f1", "has_answer_exact_match", "has_answer_f1", "no_answer_exact_match",
                "no_answer_f1", "best_f1", "loss"]
        report.heading(f"Question answering on the {split} split", 3)
        report.table(["metric", "starting model", "tuned model"], [[k, base.get(k), tuned.get(k)] for k in keys
                                                                    if k in tuned])
        info = data.info.get("train", {})
        report.paragraph(
            f"Exact match and F1 as the official SQuAD script computes them (0-1 scale; best span over all "
            f"windows of a question; windows of {self.data_cfg.max_length} tokens overlapping by {self.stride}). "
            f"Training data: {info.get('answers_repaired', 0)} answers repaired (not at their answer_start), "
            f"{info.get('answers_dropped', 0)} dropped (not in their context), "
            f"{info.get('skipped_unanswerable', 0)} unanswerable questions skipped."
            + (f" No-answer threshold: {tuned['null_score_diff_threshold']:.3f}."
               if "null_score_diff_threshold" in tuned else ""))
        before = {e["id"]: e for e in base.get("examples", [])}
        rows = [[_cell(e["question"]), _cell(e["gold"] or "(no answer)"),
                 _cell(before.get(e["id"], {}).get("predicted", "–") or "(no answer)"),
                 _cell(e["predicted"] or "(no answer)")] for e in tuned.get("examples", [])]
        if rows:
            report.heading("Example predictions", 3)
            report.table(["question", "gold", "starting model", "tuned model"], rows)


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
