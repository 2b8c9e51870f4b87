"""Sequence-to-sequence: summarization and translation (``task: seq2seq``).

Data: a source and a target column (``data.source_column`` / ``data.target_column``) from any reader
format; rows with an empty side are skipped (counted) or are an error (``data.empty_text``), with file,
line and field. One row per distinct source is kept (the first), before the seeded hold-out split, so a
source never lands on both sides of it. ``data.seq2seq_task`` (summarization | translation, with
``data.source_language`` / ``data.target_language``) picks the metrics: ROUGE-1/2/L/Lsum (0-1) or
sacreBLEU and chrF (0-100), all computed locally (``lmtune.evaluate.text_metrics`` tokenisation, CJK
aware).

Two routes, chosen by the model (``model.seq2seq: auto``) or by that setting:

1. **encoder-decoder** (:class:`EncoderDecoderSeq2SeqTask`): any ``AutoModelForSeq2SeqLM`` folder
   (T5, BART, a saved ``EncoderDecoderModel``), or an encoder-only model (BERT, the bundled ``minilm``)
   warm-started into ``EncoderDecoderModel.from_encoder_decoder_pretrained(m, m)``: the decoder is a
   copy of the encoder with causal self-attention and new cross-attention layers; it starts at
   ``[CLS]`` and ends at ``[SEP]``. Labels are the target ids (pad -> -100); the loss is summed over
   target tokens and the loop normalises by their count.
2. **decoder** (:class:`PromptSeq2SeqTask`): a causal LM answers an instruction prompt
   (``data.prompt_template``, e.g. "Translate from English to Italian:\\n{source}") in its chat
   template. This is ``sft``'s chat tuning (:mod:`lmtune.tasks.chat_tuning`) on conversations built from
   the pairs (loss on the answer, EOS learned, generation through the same template).

Checkpoints are chosen by validation loss (generation is slow on a CPU); the final evaluation and the
starting point also generate for ``generation.eval_examples`` held-out sources and score them, so the
report shows the starting model against the tuned one, with example outputs side by side. Summarization also
scores the lead-1 and lead-3 baselines (the sources' first sentences, :mod:`lmtune.tasks.seq2seq.baselines`)
on the same sources, beside them, and gives them as rows of the comparison table (``run_baselines``).

Long documents: the encoder-decoder route cuts sources at ``data.max_length`` tokens; the decoder route (for
summarization) cuts each source at the end so that prompt, source and a ``data.max_target_length``-token
answer fit ``data.max_length``. Both count what they cut (``data.json``, the log and the report).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSeq2SeqLM, EncoderDecoderModel, GenerationConfig

from lmtune.config import Config
from lmtune.config.tasks import RULE_BASELINES, TaskInfo
from lmtune.data.features import (
    IGNORE_INDEX,
    FeatureDataset,
    cached_features,
    clip_text,
    digest_records,
    features_cache_key,
)
from lmtune.data.pii import read_data_table
from lmtune.data.splits import first_occurrences, given_splits, hold_out
from lmtune.data.table import format_locations
from lmtune.errors import ConfigError, DataError, ModelError
from lmtune.evaluate.report import Report
from lmtune.models.generation import GenerationSettings, chat_prompt, generate, generate_across_processes
from lmtune.models.registry import load_padded_tokenizer, model_path_of
from lmtune.tasks.base import Task, TaskData
from lmtune.tasks.chat_tuning import EXAMPLES_KEPT, ChatTuningTask, cell
from lmtune.tasks.inspection import collect_warnings
from lmtune.tasks.seq2seq.baselines import LEAD_NS, lead_n, lead_scores
from lmtune.tasks.seq2seq.info import INFO
from lmtune.tasks.seq2seq.inspect import seq2seq_details, seq2seq_facts
from lmtune.tasks.seq2seq.metrics import METRICS, seq2seq_metrics
from lmtune.tasks.seq2seq.predict import is_blank
from lmtune.tasks.seq2seq.routes import DEFAULT_PROMPTS, ROUTE_DESCRIPTIONS, clip_source, model_route

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ shared
class Seq2SeqTask(Task):
    """Summarization / translation; ``Seq2SeqTask(config)`` builds the route the model calls for.

    Holds what both routes share: reading and checking pairs, the metrics of the job, lmtune.json
    fields and the report section. The routes are :class:`EncoderDecoderSeq2SeqTask` and
    :class:`PromptSeq2SeqTask`.
    """

    info: ClassVar[TaskInfo] = INFO
    config: Config
    route: str
    kind: str
    # The decoder route's conversations per split and their facts, as read for ``prepare``.
    splits_cache: tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]

    def __new__(cls, config: Config) -> Any:
        if cls is Seq2SeqTask:
            route = model_route(config, model_path_of(config.model))
            cls = PromptSeq2SeqTask if route == "decoder" else EncoderDecoderSeq2SeqTask
        return object.__new__(cls)

    def _setup_kind(self) -> None:
        self.kind = self.config.data.seq2seq_task

    def model_path(self) -> Path | None:
        """The configured model's folder."""
        return model_path_of(self.config.model)

    @property
    def headline_metrics(self) -> list[tuple[str, str]]:
        """The job's metrics: ROUGE (summarization) or BLEU and chrF (translation), then the loss."""
        return METRICS[self.kind]

    @property
    def comparison_metric(self) -> str:
        """ROUGE-L (summarization) or chrF (translation)."""
        return "rouge_l" if self.kind == "summarization" else "chrf"

    # ------------------------------------------------------------------------------ data
    def _read_pairs(self, source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Validated ``{source, target, line}`` records of one file (first row per distinct source if
        ``data.deduplicate``), and facts about it (rows read, skipped empty rows, duplicates)."""
        d = self.config.data
        table = read_data_table(source, d)
        sources, targets = table.column(d.source_column), table.column(d.target_column)
        records: list[dict[str, Any]] = []
        skipped: list[int] = []
        for src, tgt, line in zip(sources, targets, table.lines, strict=True):
            for column, value in ((d.source_column, src), (d.target_column, tgt)):
                if not is_blank(value) and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
                    raise DataError(f"expected text, found {type(value).__name__}", file=table.source, line=line,
                                    field=column)
            blank = d.source_column if is_blank(src) else d.target_column if is_blank(tgt) else None
            if blank is not None:
                if d.empty_text == "error":
                    raise DataError(f"empty {table.location_kind} value", file=table.source, line=line, field=blank,
                                    hint="set data.empty_text: skip to drop such rows (they are counted)")
                skipped.append(line)
                continue
            records.append({"source": str(src).strip(), "target": str(tgt).strip(), "line": line})
        if skipped:
            shown = format_locations(skipped)
            log.warning("%s: skipped %d %s(s) with an empty source or target (%ss %s)", table.source, len(skipped),
                        table.location_kind, table.location_kind, shown)
        if not records:
            raise DataError("no usable rows (all had an empty source or target)", file=source)
        info: dict[str, Any] = {"source": source, "rows_read": len(table), "skipped_empty": len(skipped),
                                "skipped_lines": skipped[:1000]}
        if d.deduplicate:
            unique = first_occurrences(records, lambda r: r["source"])
            info["duplicate_sources_removed"] = len(records) - len(unique)
            records = unique
        return records, info

    def _pair_splits(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """Records per split: given files, or a seeded hold-out of train; eval sources seen in train dropped."""
        d = self.config.data
        train, train_info = self._read_pairs(d.train)
        info: dict[str, Any] = {"train": train_info}
        train, splits, sources = hold_out(train, d, what="pair(s)")
        for s, source in sources.items():
            info[s] = {"source": source}
        for s, src in given_splits(d).items():
            splits[s], info[s] = self._read_pairs(src)
            if d.deduplicate:
                seen = {r["source"] for r in train}
                clean = [r for r in splits[s] if r["source"] not in seen]
                info[s]["duplicates_removed"] = len(splits[s]) - len(clean)
                splits[s] = clean
        splits["train"] = train
        if d.max_samples:
            rng = random.Random(d.split_seed)
            for s, rows in splits.items():
                if len(rows) > d.max_samples:
                    splits[s] = sorted(rng.sample(rows, d.max_samples), key=lambda r: r["line"])
        return splits, info

    def pair_records(self) -> dict[str, list[dict[str, Any]]]:
        """``{source, target, line}`` per split, as ``prepare`` split them (for ``lmtune data inspect``): the
        decoder route kept them; the encoder-decoder route reads and splits again, deterministically."""
        if self.route == "decoder":
            splits = self.splits_cache[0]
            return {s: [{"source": r["source"], "target": r["messages"][-1]["content"], "line": r["line"]}
                        for r in rows] for s, rows in splits.items()}
        with collect_warnings(skip=()):  # prepare already reported the skipped rows
            return self._pair_splits()[0]

    # ------------------------------------------------------------------------------ metrics and saving
    def text_scores(self, texts: list[str], references: list[str]) -> dict[str, float]:
        """The job's metrics (ROUGE or BLEU/chrF) of generated ``texts``."""
        return seq2seq_metrics(texts, references, self.kind)

    def lead_baselines(self, sources: list[str], references: list[str]) -> dict[str, dict[str, float]]:
        """Summarization: ROUGE of lead-1 and lead-3 on these held-out sources (``{"lead_1": ...}``); else {}."""
        return lead_scores(sources, references) if self.kind == "summarization" and sources else {}

    def held_out_sources(self, data: TaskData, split: str) -> list[str]:
        """The sources of ``split`` that the final evaluation generates for (the first
        ``generation.eval_examples``)."""
        return list(data.extra.get("sources", {}).get(split, []))

    def run_baselines(self, data: TaskData) -> dict[str, Any]:
        """Summarization's lead-N rows of the comparison table (``baselines: [lead_1, lead_3]``, the default):
        ROUGE of each held-out source's first N sentences on the sources the models generate for, with the
        time the rule takes per source. Nothing to train, no parameters. Translation: none."""
        names = [b for b in self.config.baselines if b in RULE_BASELINES]
        if self.kind != "summarization" or not names:
            return {}
        out: dict[str, Any] = {}
        for name in names:
            n = int(name.rsplit("_", 1)[1])
            scores: dict[str, Any] = {}
            seconds, count = 0.0, 0
            for split in ("validation", "test"):
                sources = self.held_out_sources(data, split)
                if not sources:
                    continue
                start = time.perf_counter()
                summaries = [lead_n(s, n) for s in sources]
                seconds, count = seconds + time.perf_counter() - start, count + len(sources)
                scores[split] = seq2seq_metrics(summaries, data.extra["references"][split], "summarization")
            if scores:
                out[name] = {"kind": "rule", "description": f"the source's first {n} sentence(s) as its summary",
                             "metrics": scores, "train_seconds": 0.0, "parameters": 0, "size_bytes": 0,
                             "predict_ms_per_example": 1000.0 * seconds / count}
        return out

    def seq2seq_meta(self) -> dict[str, Any]:
        """What the predictor needs, for ``lmtune.json``."""
        d, g = self.config.data, self.config.generation
        return {
            "route": self.route, "route_description": ROUTE_DESCRIPTIONS[self.route], "seq2seq_task": self.kind,
            "source_column": d.source_column, "target_column": d.target_column,
            "source_language": d.source_language, "target_language": d.target_language,
            "generation": {k: getattr(g, k) for k in ("max_new_tokens", "num_beams", "length_penalty",
                                                      "no_repeat_ngram_size", "repetition_penalty", "do_sample",
                                                      "temperature", "top_p", "batch_size", "seed")},
        }

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """The route, the job's scores of the starting and tuned model, and example outputs side by side."""
        d, g = self.config.data, self.config.generation
        job = "translation" + (f" from {d.source_language} to {d.target_language}" if d.source_language else "") \
            if self.kind == "translation" else "summarization"
        report.heading("Sequence to sequence", 3)
        report.paragraph(f"Job: **{job}**. Route: **{ROUTE_DESCRIPTIONS[self.route]}**"
                         + (f"; prompt `{cell(self.prompt_template)}`" if self.route == "decoder" else "") + ".")
        split = "test" if "test" in metrics else "validation"
        tuned, base = metrics.get(split, {}), metrics.get("starting_point", {}).get(split, {})
        keys = [k for k, _ in METRICS[self.kind] if k != "loss"]
        if keys[0] not in tuned:
            return
        extra = ["mean_generated_words", "mean_reference_words", "empty_predictions", "stopped_fraction", "loss",
                 "perplexity"]
        leads = [(f"lead-{n}", tuned.get("lead", {}).get(f"lead_{n}")) for n in LEAD_NS]
        leads = [(name, scores) for name, scores in leads if scores]
        report.table(["metric", *(name for name, _ in leads), "starting model", "tuned model"],
                     [[k, *(scores.get(k, "–") for _, scores in leads), base.get(k), tuned.get(k)]
                      for k in keys + extra if k in tuned])
        if leads:
            report.paragraph("lead-N: the source's first N sentences as its summary, scored with the same ROUGE "
                             "on the same sources; a model that does not beat lead-3 has learned less than "
                             "copying the opening.")
        cut = self.truncation_note(data)
        if cut:
            report.paragraph(cut)
        beams = f"beam search ({g.num_beams} beams)" if g.num_beams > 1 else \
            "sampled" if g.do_sample else "greedy"
        report.paragraph(f"{tuned.get('generated_examples')} held-out sources of the {split} split, "
                         f"{g.max_new_tokens} new tokens at most, {beams}. "
                         + ("ROUGE: F-measure, 0-1." if self.kind == "summarization" else "BLEU and chrF: 0-100."))
        before = {e["source"]: e for e in base.get("examples", [])}
        rows = [[e["source"], e["reference"], before.get(e["source"], {}).get("generated", "–"), e["generated"]]
                for e in tuned.get("examples", [])]
        if rows:
            report.heading("Example outputs", 3)
            report.table(["source", "reference", "starting model", "tuned model"],
                         [[cell(c) for c in r] for r in rows])

    def truncation_note(self, data: TaskData) -> str:
        """One sentence on the sources cut to fit (empty when none were): the long-document count."""
        d = self.config.data
        train = data.info.get("train", {})
        if self.route == "decoder":
            n, total = int(train.get("sources_truncated", 0)), int(train.get("rows_read", 0))
            budget = train.get("source_token_budget")
            return (f"{n} of {total} sources were longer than {budget} tokens (data.max_length {d.max_length} less "
                    f"the prompt and a data.max_target_length {d.max_target_length}-token answer) and were cut at "
                    "the end." if n else "")
        cut = {s: int(v.get("truncated", 0)) for s, v in data.info.items() if isinstance(v, dict) and "truncated" in v}
        if not any(cut.values()):
            return ""
        counts = ", ".join(f"{s} {n} of {data.info[s].get('examples')}" for s, n in cut.items())
        return f"Sources longer than data.max_length {d.max_length} tokens were cut at the end: {counts}."

    def inspect_facts(self, data: TaskData) -> dict[str, dict[str, Any]]:
        """Per split, for ``lmtune data inspect`` (:mod:`lmtune.tasks.seq2seq.inspect`): pairs, skipped and duplicate
        rows, source / target token lengths and what the length limits cut."""
        return seq2seq_facts(self, data)

    def inspect_details(self, data: TaskData, facts: dict[str, dict[str, Any]], *, examples: int = 3
                        ) -> dict[str, Any]:
        """The route and why, suggestions, and rendered train pairs (the decoder route's loss mask)."""
        return seq2seq_details(self, data, facts, examples)

    @property
    def prompt_template(self) -> str:
        """The decoder route's user message template."""
        return self.config.data.prompt_template or DEFAULT_PROMPTS[self.kind]


# ------------------------------------------------------------------------------------------ route 1
class Seq2SeqCollator:
    """Batches of (source ids, target ids): sources right-padded with an attention mask, labels padded
    with -100, ``decoder_input_ids`` the labels shifted right behind the decoder start token."""

    def __init__(self, pad_token_id: int, decoder_start_token_id: int) -> None:
        self.pad = pad_token_id
        self.start = decoder_start_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(features)
        src_width = max(len(f["input_ids"]) for f in features)
        tgt_width = max(len(f["labels"]) for f in features)
        input_ids = torch.full((n, src_width), self.pad, dtype=torch.long)  # (B, S)
        attention_mask = torch.zeros((n, src_width), dtype=torch.long)  # (B, S)
        labels = torch.full((n, tgt_width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        decoder_input_ids = torch.full((n, tgt_width), self.pad, dtype=torch.long)  # (B, T)
        real = torch.zeros(n, dtype=torch.long)
        for i, f in enumerate(features):
            src, tgt = list(f["input_ids"]), list(f["labels"])
            input_ids[i, : len(src)] = torch.tensor(src)
            attention_mask[i, : len(src)] = 1
            labels[i, : len(tgt)] = torch.tensor(tgt)
            # Teacher forcing: position t sees the start token and targets < t, and predicts target t.
            decoder_input_ids[i, : len(tgt)] = torch.tensor([self.start, *tgt[:-1]])
            real[i] = len(src) + len(tgt)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
                "labels": labels, "num_real_tokens": real}


class EncoderDecoderSeq2SeqTask(Seq2SeqTask):
    """Route 1: an encoder-decoder model (or one warm-started from an encoder) maps source to target."""

    model_class: ClassVar[Any] = AutoModelForSeq2SeqLM
    peft_task_type: ClassVar[str] = "SEQ_2_SEQ_LM"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_cfg = config.data
        self.phase = "training"
        self.tokenizer: Any = None
        self.route = ""  # set by _resolve (encoder_decoder or warm_start)
        self.decoder_start_token_id: int | None = None
        self.eos_token_id: int | None = None
        self._setup_kind()

    @property
    def target_length(self) -> int | None:
        """A warm-started encoder-decoder reads the target as its own sequence of ``data.max_target_length``."""
        return self.data_cfg.max_target_length if self.route == "warm_start" else None

    def evaluation_phase(self, phase: str) -> None:
        """``training`` (loss only) or ``final`` (also generation and scores)."""
        self.phase = phase

    # ------------------------------------------------------------------------------ tokenizer and model
    def _resolve(self, tokenizer: Any, model_path: Path | None = None) -> None:
        """Route, decoder start and end tokens, from the model's config and its tokenizer."""
        if self.decoder_start_token_id is not None:
            return
        path = model_path or model_path_of(self.config.model)
        self.route = model_route(self.config, path)
        if self.route == "encoder_decoder":
            mc = AutoConfig.from_pretrained(path, trust_remote_code=self.config.model.trust_remote_code)
            start = mc.decoder_start_token_id
            if start is None and getattr(mc, "decoder", None) is not None:
                start = getattr(mc.decoder, "decoder_start_token_id", None)
            eos = mc.eos_token_id if mc.eos_token_id is not None else tokenizer.eos_token_id
        else:
            # A BERT-style decoder starts at [CLS] and ends at [SEP], as its tokenizer frames a text.
            start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
            eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if start is None or eos is None:
            raise ModelError("cannot tell the decoder's start or end token (config decoder_start_token_id / "
                             "eos_token_id, or the tokenizer's cls/sep or bos/eos tokens)", file=path)
        self.decoder_start_token_id, self.eos_token_id = int(start), int(eos[0] if isinstance(eos, list) else eos)

    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The model's tokenizer, right-padded, with a pad token."""
        assert model_path is not None  # model_path() always gives one
        tok = load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)
        self.tokenizer = tok
        self._resolve(tok, model_path)
        return tok

    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The encoder-decoder in float32; warm-started from an encoder with new cross-attention (seeded)."""
        assert model_path is not None  # model_path() always gives one
        m = self.config.model
        self._resolve(tokenizer, model_path)
        if self.route == "warm_start":
            torch.manual_seed(self.config.train.seed)  # the new cross-attention and LM-head weights
            try:
                model: Any = EncoderDecoderModel.from_encoder_decoder_pretrained(
                    str(model_path), str(model_path), encoder_dtype=torch.float32, decoder_dtype=torch.float32)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot warm-start an encoder-decoder from this model: {exc}", file=model_path,
                                 hint="the encoder must also work as a decoder with cross-attention "
                                 "(BERT, RoBERTa, ...)") from None
            model.config.decoder_start_token_id = self.decoder_start_token_id
            model.config.eos_token_id = self.eos_token_id
            model.config.pad_token_id = tokenizer.pad_token_id
            model.config.vocab_size = model.config.decoder.vocab_size
            positions = {"source": (self.data_cfg.max_length, model.config.encoder.max_position_embeddings),
                         "target": (self.data_cfg.max_target_length, model.config.decoder.max_position_embeddings)}
        else:
            try:
                model = AutoModelForSeq2SeqLM.from_pretrained(
                    model_path, dtype=torch.float32, trust_remote_code=m.trust_remote_code,
                    use_safetensors=not m.allow_pickle or None)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load the model as an encoder-decoder: {exc}", file=model_path) from None
            limit = getattr(model.config, "max_position_embeddings", None)
            positions = {"source": (self.data_cfg.max_length, limit), "target": (self.data_cfg.max_target_length, limit)}
        for side, (want, have) in positions.items():
            key = "data.max_length" if side == "source" else "data.max_target_length"
            if have and want > have:
                raise ConfigError(f"{key} {want} is larger than the model's {have} {side} positions",
                                  hint=f"set --{key} {have} or less")
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        model.generation_config.decoder_start_token_id = self.decoder_start_token_id
        model.generation_config.eos_token_id = self.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if m.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
            if self.config.method.name == "lora":
                model.enable_input_require_grads()
        return model

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """Warm start: the new cross-attention layers and the decoder's LM-head transform; else none."""
        return {"crossattention", "transform"} if self.route == "warm_start" else set()

    # ------------------------------------------------------------------------------ data
    def target_ids(self, tokenizer: Any, text: str) -> list[int]:
        """The label ids of a target text: framed as the model frames it, without the decoder start token."""
        ids: list[int] = tokenizer(text_target=text)["input_ids"]
        # The tokenizer frames the text as the model does ([CLS] x [SEP], x </s>, <s> x </s>); the decoder
        # start token is fed, never predicted, so it leaves the labels.
        if ids and ids[0] == self.decoder_start_token_id:
            ids = ids[1:]
        return ids

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, check, split and tokenise the pairs (cached)."""
        self.tokenizer = tokenizer  # what a saved model's evaluation hands over, as load_tokenizer would
        self._resolve(tokenizer)
        d = self.data_cfg
        splits, info = self._pair_splits()
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        sources: dict[str, list[str]] = {}
        references: dict[str, list[str]] = {}
        for split, rows in splits.items():
            if not rows:
                raise DataError(f"the {split} split holds no pairs", file=info[split].get("source", d.train))
            ds, lens, stats = self._features(rows, tokenizer)
            features[split], lengths[split] = ds, lens
            info[split].update({"examples": len(rows), **stats})
            for what in ("truncated", "truncated_targets"):
                if stats[what]:
                    limit = d.max_length if what == "truncated" else d.max_target_length
                    key = "data.max_length" if what == "truncated" else "data.max_target_length"
                    log.warning("%s: %d of %d %s are longer than %s %d and were truncated", split, stats[what],
                                len(rows), "sources" if what == "truncated" else "targets", key, limit)
            if split != "train":
                limit = self.config.generation.eval_examples or len(rows)
                sources[split] = [r["source"] for r in rows[:limit]]
                references[split] = [r["target"] for r in rows[:limit]]
        info["route"] = self.route
        return TaskData(splits=features, lengths=lengths, info=info,
                        extra={"sources": sources, "references": references})

    def _features(self, rows: list[dict[str, Any]], tokenizer: Any) -> tuple[FeatureDataset, list[int], dict[str, int]]:
        d = self.data_cfg
        settings = {"max_length": d.max_length, "max_target_length": d.max_target_length,
                    "decoder_start": self.decoder_start_token_id}
        key = features_cache_key(self.info.name, digest_records([(r["source"], r["target"]) for r in rows]), tokenizer,
                                 settings)

        def build() -> dict[str, list[Any]]:
            out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "cut": []}
            side = tokenizer.truncation_side
            for r in rows:
                # Clipped before tokenising (same ids, same counts): a megabyte text costs what its first
                # max_length tokens cost. A target is cut on the right whatever the side.
                source = clip_text(r["source"], d.max_length, side=side)
                src = tokenizer(source)["input_ids"]
                cut = 0
                if len(src) > d.max_length:
                    src, cut = tokenizer(source, truncation=True, max_length=d.max_length)["input_ids"], 1
                tgt = self.target_ids(tokenizer, clip_text(r["target"], d.max_target_length))
                if len(tgt) > d.max_target_length:
                    # Cut, but keep the end token: the model must still learn to stop.
                    tgt, cut = [*tgt[: d.max_target_length - 1], int(self.eos_token_id or 0)], cut + 2
                out["input_ids"].append(src)
                out["labels"].append(tgt)
                out["length"].append(len(src) + len(tgt))
                out["cut"].append(cut)
            return out

        ds, hit = cached_features(key, build, use_cache=d.cache)
        if hit:
            log.info("tokenised features read from cache (%s)", key[:12])
        plain = ds.with_format(None)
        lens, cuts = plain["length"], plain["cut"]
        ds.set_format(columns=["input_ids", "labels"])
        stats = {"truncated": sum(c & 1 for c in cuts), "truncated_targets": sum(c >> 1 for c in cuts),
                 "tokens": int(sum(len(x) for x in plain["input_ids"])),
                 "target_tokens": int(sum(len(x) for x in plain["labels"]))}
        return FeatureDataset(ds, lens), lens, stats

    # ------------------------------------------------------------------------------ batches and loss
    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Sources, labels and shifted decoder inputs, each padded to its own longest."""
        assert self.decoder_start_token_id is not None
        return Seq2SeqCollator(tokenizer.pad_token_id, self.decoder_start_token_id)

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens (end token included)."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's logits at every target position (teacher forcing)."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=batch["decoder_input_ids"], use_cache=False)
        return out.logits.float()  # (B, T, vocab)

    def _loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.logits(model, batch)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy summed over the target tokens of the micro-batch."""
        return self._loss_sum(model, batch)

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: Any, loader: Any, accelerator: Any, split: str, data: TaskData) -> dict[str, Any]:
        """Target-token loss and perplexity; at the final evaluation also generation and the job's scores."""
        total = torch.zeros(2, dtype=torch.float64)  # (loss sum, target tokens)
        with torch.no_grad():
            for batch in loader:
                logits = self.logits(model, batch)  # (B, T, vocab)
                per_token = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="none").view(batch["labels"].shape)
                rows = torch.stack([per_token.sum(dim=1).double(),
                                    (batch["labels"] != IGNORE_INDEX).sum(dim=1).double()], dim=1)  # (B, 2)
                # Per row, so the rows Accelerate repeats to even out the last batches are dropped.
                total += accelerator.gather_for_metrics(rows).sum(dim=0).cpu()
        loss = float(total[0] / total[1].clamp(min=1))
        metrics: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": int(total[1])}
        if self.phase == "final" or self.config.generation.eval_during_training:
            srcs = data.extra["sources"].get(split, [])
            if srcs:
                metrics.update(self.generation_scores(accelerator.unwrap_model(model), accelerator, srcs,
                                                      data.extra["references"][split]))
        return metrics

    def generation_scores(self, model: Any, accelerator: Any, sources: list[str],
                          references: list[str]) -> dict[str, Any]:
        """Generate for ``sources`` (split across processes) and score against ``references``."""
        settings = GenerationSettings.from_config(self.config.generation)
        eos = None if self.eos_token_id is None else [self.eos_token_id]
        results = generate_across_processes(
            accelerator, sources,
            lambda mine: generate(model, self.tokenizer, mine, settings, max_length=self.data_cfg.max_length,
                                  eos_token_ids=eos))
        texts = [r["text"].strip() for r in results]
        scores: dict[str, Any] = dict(self.text_scores(texts, references))
        scores["stopped_fraction"] = sum(r["finish_reason"] == "stop" for r in results) / len(results)
        scores["generated_examples"] = len(results)
        lead = self.lead_baselines(sources, references)
        if lead:
            scores["lead"] = lead
        scores["examples"] = [{"source": s, "reference": ref, "generated": t}
                              for s, ref, t in list(zip(sources, references, texts, strict=True))[:EXAMPLES_KEPT]]
        return scores

    # ------------------------------------------------------------------------------ saving
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """``generation_config.json`` with the start/end tokens and lmtune's decoding settings."""
        g = self.config.generation
        gen = GenerationConfig(
            decoder_start_token_id=self.decoder_start_token_id, eos_token_id=self.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, max_new_tokens=g.max_new_tokens,
            **({"bos_token_id": self.decoder_start_token_id} if self.route == "warm_start" else {}),
            **({"num_beams": g.num_beams, "length_penalty": g.length_penalty} if g.num_beams > 1 else {}),
            **({"no_repeat_ngram_size": g.no_repeat_ngram_size} if g.no_repeat_ngram_size else {}),
        )
        gen.save_pretrained(folder)
        return {**self.seq2seq_meta(), "max_length": self.data_cfg.max_length,
                "max_target_length": self.data_cfg.max_target_length, "eos_token_ids": [self.eos_token_id],
                "decoder_start_token_id": self.decoder_start_token_id}


# ------------------------------------------------------------------------------------------ route 2
class PromptSeq2SeqTask(Seq2SeqTask, ChatTuningTask):
    """Route 2: a decoder answers ``data.prompt_template`` in its chat template: chat tuning on the pairs."""

    def __init__(self, config: Config) -> None:
        ChatTuningTask.__init__(self, config)
        self.route = "decoder"
        self._setup_kind()
        self._prompt_sources: dict[str, str] = {}  # rendered eval prompt -> its source text
        self.source_token_budget: int | None = None  # summarization: tokens a source may keep (None: uncut)
        self.splits_cache: tuple[dict[str, list[dict[str, Any]]], dict[str, Any]] = ({}, {})

    def messages(self, source: str, target: str | None = None) -> list[dict[str, str]]:
        """The conversation for one pair: optional system message, the filled-in prompt, the target."""
        d = self.data_cfg
        user = self.prompt_template.format(source=source, source_language=d.source_language or "",
                                           target_language=d.target_language or "")
        out = [{"role": "system", "content": d.system_prompt}] if d.system_prompt else []
        out.append({"role": "user", "content": user})
        if target is not None:
            out.append({"role": "assistant", "content": target})
        return out

    def read_conversations(self, source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The pairs of ``source`` as conversations (what SFT reads from a chat file)."""
        pairs, info = self._read_pairs(source)
        info.update(self._clip_sources(pairs))
        records = [{"messages": self.messages(r["source"], r["target"]), "line": r["line"], "source": r["source"]}
                   for r in pairs]
        return records, {**info, "chat_format": "seq2seq"}

    def _clip_sources(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        """Summarization: cut each source at the end so that the prompt, the source and a
        ``data.max_target_length``-token answer fit ``data.max_length`` (chat tuning would skip the whole
        pair, or cut the prompt's start: the lead of the document). Returns the counts for ``data.json``."""
        tokenizer = getattr(self, "tokenizer", None)
        if self.kind != "summarization" or tokenizer is None:
            return {}
        d = self.data_cfg
        overhead = len(tokenizer(chat_prompt(tokenizer, self.messages("")), add_special_tokens=False)["input_ids"])
        budget = d.max_length - d.max_target_length - overhead - 1  # -1: the answer's end-of-turn token
        if budget < 16:
            raise ConfigError(f"data.max_length {d.max_length} leaves {budget} tokens for the source after the "
                              f"prompt ({overhead} tokens) and data.max_target_length {d.max_target_length}",
                              hint="raise data.max_length or lower data.max_target_length")
        self.source_token_budget = budget
        cut = 0
        for r in pairs:
            r["source"], was_cut = clip_source(tokenizer, r["source"], budget)
            cut += was_cut
        if cut:
            log.warning("%d of %d sources are longer than %d tokens (data.max_length %d less the prompt and "
                        "data.max_target_length %d) and were cut at the end", cut, len(pairs), budget, d.max_length,
                        d.max_target_length)
        return {"sources_truncated": cut, "source_token_budget": budget}

    def prepare(self, tokenizer: Any) -> TaskData:
        """Chat tuning's preparation of the pair conversations; remembers which source each eval prompt holds."""
        data = ChatTuningTask.prepare(self, tokenizer)
        splits, _ = self.splits_cache
        for rows in splits.values():
            for r in rows:
                self._prompt_sources[chat_prompt(tokenizer, r["messages"][:-1])] = r["source"]
        data.info["route"] = self.route
        return data

    def conversation_splits(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """Chat tuning's splits of the pair conversations, kept for ``lmtune data inspect``."""
        self.splits_cache = ChatTuningTask.conversation_splits(self)
        return self.splits_cache

    def held_out_sources(self, data: TaskData, split: str) -> list[str]:
        """The sources behind the prompts of ``split`` that the final evaluation answers."""
        return [self._prompt_sources.get(p, p) for p in data.extra.get("prompts", {}).get(split, [])]

    def generation_scores(self, model: Any, accelerator: Any, prompts: list[str],
                          references: list[str]) -> dict[str, Any]:
        """Chat tuning's generation scores (the job's metrics, via ``text_scores``); examples name their source."""
        scores = ChatTuningTask.generation_scores(self, model, accelerator, prompts, references)
        lead = self.lead_baselines([self._prompt_sources.get(p, p) for p in prompts], references)
        if lead:
            scores["lead"] = lead
        scores["examples"] = [{**e, "source": self._prompt_sources.get(e["prompt"], e["prompt"])}
                              for e in scores["examples"]]
        return scores

    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Chat tuning's generation config and chat settings, plus the prompt and the pair columns."""
        return {**ChatTuningTask.save_model_extras(self, folder, data), **self.seq2seq_meta(),
                "prompt_template": self.prompt_template, "system_prompt": self.data_cfg.system_prompt,
                "source_token_budget": self.source_token_budget}

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """The seq2seq section."""
        Seq2SeqTask.report_sections(self, report, run_dir, metrics, data)
