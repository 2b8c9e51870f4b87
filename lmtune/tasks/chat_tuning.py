"""What the chat-tuned decoder tasks share (``sft``, and ``seq2seq``'s decoder route): conversations in, loss
on the assistant's turns, answers generated through the same chat template.

Data: alpaca (instruction/input/output), sharegpt (conversations of from/value) or OpenAI
messages (role/content, system prompts, several turns), detected from the records or set with
``data.chat_format``; ``data.columns`` maps other column names. Every conversation is validated
(roles alternate, no empty answer, known roles) with errors that name file, line and field.

Conversations are rendered by the model's own chat template (a ChatML default when it has none; the user's
``model.chat_template``, e.g. ``chatml-tools``, where given), exactly as inference renders them; the
template is saved with the model. OpenAI records may carry ``tools`` and tool calls (``data/chat_tools.py``):
they go to the template, which must support them (else a DataError at the first such record's file:line);
the assistant's calls carry loss like its answers, tool results never. Loss falls on assistant
tokens only by default, always including the end-of-turn token the model must learn to stop at
(also when pad and EOS are the same token). Optional packing of whole conversations into rows.

Evaluation: loss and perplexity on the assistant tokens of held-out conversations, and at the
end (or every validation, if asked) batched generation from the held-out prompts scored against
the reference answers, for the starting model and the tuned one.

A shared module, not a task folder: the task folders import it, never each other.
"""

from __future__ import annotations

import json
import logging
import random
from itertools import groupby
from pathlib import Path
from typing import Any

from lmtune.config import Config
from lmtune.data.chat import (
    RenderedExample,
    check_rendered,
    detect_format,
    end_of_turn_ids,
    ensure_chat_template,
    format_conversation_for_display,
    render_conversation,
    to_messages,
)
from lmtune.data.chat_tools import (
    CHAT_TEMPLATES,
    check_tool_support,
    record_tools,
    resolve_chat_template,
    target_text,
)
from lmtune.data.features import (
    IGNORE_INDEX,
    FeatureDataset,
    cached_features,
    digest_records,
    features_cache_key,
)
from lmtune.data.packing import pack_whole
from lmtune.data.pii import read_data_table
from lmtune.data.splits import first_occurrences, given_splits, hold_out
from lmtune.data.streaming import open_conversation_stream
from lmtune.data.table import format_locations
from lmtune.errors import DataError
from lmtune.evaluate.memorisation import AuditData, canary_texts, make_canaries, sample_extraction_items
from lmtune.evaluate.text_metrics import generation_metrics
from lmtune.models.generation import GenerationSettings, chat_prompt, generate, generate_across_processes
from lmtune.models.registry import load_padded_tokenizer, untrained_chat_tokens
from lmtune.tasks.base import TaskData
from lmtune.tasks.decoder import DecoderTask

log = logging.getLogger(__name__)

# Example generations kept per split for the report.
EXAMPLES_KEPT = 6


class ChatTuningTask(DecoderTask):
    """Tuning a decoder on conversations, loss on the assistant's turns (the tasks set ``info``)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.chat_template_source = "model"
        self.vocab_grew = False
        # evaluate.memorisation: the canaries, added to the training conversations (marked ``canary``).
        self.canaries = make_canaries(config.evaluate.memorisation, config.train.seed) \
            if config.evaluate.memorisation is not None else []

    @property
    def packing(self) -> bool:
        """Off unless ``data.packing: true``."""
        return bool(self.data_cfg.packing)

    # ------------------------------------------------------------------------------ tokenizer
    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The model's tokenizer with a chat template: ``model.chat_template`` where set, else the model's own
        (ChatML added when the model has none)."""
        assert model_path is not None
        tok = load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)
        had_template = bool(tok.chat_template)
        chosen = self.config.model.chat_template
        self.vocab_grew = ensure_chat_template(tok, resolve_chat_template(chosen) if chosen else None)
        if chosen:
            # A built-in's name, else "config" (the user's Jinja string or file).
            self.chat_template_source = chosen if chosen in CHAT_TEMPLATES else "config"
        elif not had_template:
            self.chat_template_source = "default"
            log.warning("the model has no chat template; using lmtune's ChatML default%s (saved with the model)",
                        " and adding its <|im_start|>/<|im_end|> tokens" if self.vocab_grew else "")
        self.tokenizer = tok
        return tok

    def new_token_ids(self) -> list[int]:
        """Ids of the template's markers whose embeddings must be trained: tokens added to the vocabulary, and
        the markers a bundled base model never learned (``untrained_chat_tokens``: LoRA trains their rows)."""
        names = ["<|im_start|>", "<|im_end|>"] if self.vocab_grew else []
        names += [t for t in untrained_chat_tokens(self.config.model.name) if t not in names]
        return [int(self.tokenizer.convert_tokens_to_ids(t)) for t in names]

    # ------------------------------------------------------------------------------ data
    def read_conversations(self, source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Validated conversations ``{messages, line}`` of one source (``tools`` too where an openai record has
        tool definitions), and facts about it. Tools or tool calls with a chat template that cannot write them
        are a DataError at the first such record."""
        d = self.data_cfg
        table = read_data_table(source, d)
        fmt = d.chat_format if d.chat_format != "auto" else detect_format(table.rows, d.columns, source)
        records = []
        for row, line in zip(table.rows, table.lines, strict=True):
            record: dict[str, Any] = {"messages": to_messages(row, fmt, d.columns, source=source, line=line),
                                      "line": line}
            tools = record_tools(row, fmt, d.columns, source=source, line=line)
            if tools:
                record["tools"] = tools
            if self.tokenizer is not None:
                check_tool_support(self.tokenizer, record["messages"], tools, source=source, line=line)
            records.append(record)
        if not records:
            raise DataError("no conversations", file=source)
        with_tools = sum(1 for r in records if "tools" in r or any(m.get("tool_calls") for m in r["messages"]))
        facts = {"source": source, "rows_read": len(table), "chat_format": fmt}
        return records, {**facts, "tool_conversations": with_tools} if with_tools else facts

    def conversation_splits(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """Validated conversations per split (given files, or a seeded hold-out of train; de-duplicated and
        sampled as configured), and facts about each split."""
        d = self.data_cfg
        train, train_info = self.read_conversations(d.train)
        info: dict[str, Any] = {"train": train_info}

        def key(r: dict[str, Any]) -> str:
            return json.dumps([r["messages"], r.get("tools")], ensure_ascii=False, sort_keys=True)

        if d.deduplicate:
            unique = first_occurrences(train, key)
            train_info["duplicates_removed"] = len(train) - len(unique)
            train = unique
        train, splits, sources = hold_out(train, d, what="conversation(s)")
        for s, source in sources.items():
            info[s] = {"source": source}
        for s, src in given_splits(d).items():
            splits[s], info[s] = self.read_conversations(src)
        if d.deduplicate:
            seen = {key(r) for r in train}
            for s in ("validation", "test"):
                if s in splits:
                    rows = splits[s]
                    clean = [r for r in first_occurrences(rows, key) if key(r) not in seen]
                    info[s]["duplicates_removed"] = len(rows) - len(clean)
                    splits[s] = clean
        splits["train"] = train
        if d.max_samples:
            rng = random.Random(d.split_seed)
            for s, rows in splits.items():
                if len(rows) > d.max_samples:
                    splits[s] = sorted(rng.sample(rows, d.max_samples), key=lambda r: r["line"])
        if self.canaries:
            # After de-duplication and sampling, so each canary occurs exactly as often as it should; the
            # held-out splits never see one. Line 0: no line of the data file.
            m = self.config.evaluate.memorisation
            assert m is not None
            inserted = [{"messages": [{"role": "user", "content": m.canary_prompt},
                                      {"role": "assistant", "content": text}], "line": 0, "canary": True}
                        for text in canary_texts(self.canaries)]
            splits["train"] = splits["train"] + inserted
            info["train"]["canary_conversations"] = len(inserted)
        return splits, info

    def render(self, records: list[dict[str, Any]], tokenizer: Any) -> tuple[list[Any], list[int]]:
        """Rendered examples (None where too long and skipped) and the lines of the skipped ones."""
        d = self.data_cfg
        out = []
        skipped = []
        for r in records:
            ex = render_conversation(tokenizer, r["messages"], train_on=d.train_on, max_length=d.max_length,
                                     too_long=d.too_long, special_tokens_in_content=d.special_tokens_in_content,
                                     tools=r.get("tools"))
            out.append(ex)
            if ex is None:
                skipped.append(r["line"])
        return out, skipped

    @staticmethod
    def preflight_problems(examples: list[Any], tokenizer: Any) -> dict[str, int]:
        """How many rendered examples show each pre-flight problem (no EOS at a target's end, ...)."""
        eos = end_of_turn_ids(tokenizer)
        problems: dict[str, int] = {}
        for ex in examples:
            for p in check_rendered(tokenizer, ex, eos):
                problems[p] = problems.get(p, 0) + 1
        return problems

    @staticmethod
    def is_definite(problem: str, count: int, total: int) -> bool:
        """A problem that stops training: any double BOS, or any other problem in every example."""
        return "BOS" in problem or count == total

    def preflight(self, examples: list[Any], tokenizer: Any, source: str) -> dict[str, int]:
        """Checks on rendered examples; raises on a definite error, returns counts of each problem."""
        problems = self.preflight_problems(examples, tokenizer)
        for problem, count in problems.items():
            msg = f"{count} of {len(examples)} training examples: {problem}"
            if self.is_definite(problem, count, len(examples)):
                eos = end_of_turn_ids(tokenizer)
                raise DataError(
                    f"pre-flight check failed: {msg}", file=source,
                    hint="`lmtune data inspect CONFIG` shows every check and the examples as the model sees them"
                    + ("; the chat template must end each assistant turn with an EOS token "
                       f"({', '.join(tokenizer.convert_ids_to_tokens(sorted(eos)))}) or the model never learns to stop"
                       if "end" in problem else ""),
                )
            log.warning("pre-flight: %s", msg)
        return problems

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, split, render with the chat template, check, and tokenise (cached)."""
        self.tokenizer = tokenizer  # what a saved model's evaluation hands over, as load_tokenizer would
        if self.data_cfg.streaming:  # data larger than memory: training rows are made as training reads them
            splits, info, stream, preview = open_conversation_stream(
                self.data_cfg, tokenizer, seed=self.config.train.seed, packing=self.packing,
                read_conversations=self.read_conversations)
            data = self._prepare_splits(splits, info, tokenizer)
            data.info["preflight"] = self.preflight(preview, tokenizer, self.data_cfg.train)
            data.splits["train"], data.lengths["train"] = stream, []
            return data
        return self._prepare_splits(*self.conversation_splits(), tokenizer)

    def _prepare_splits(self, splits: dict[str, list[dict[str, Any]]], info: dict[str, Any],
                        tokenizer: Any) -> TaskData:
        d = self.data_cfg
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        prompts: dict[str, list[str]] = {}
        references: dict[str, list[str]] = {}
        kept_by_split: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        for split, records in splits.items():
            rendered, skipped = self.render(records, tokenizer)
            kept = [(r, ex) for r, ex in zip(records, rendered, strict=True) if ex is not None]
            kept_by_split[split] = kept
            if skipped:
                shown = format_locations(skipped)
                log.warning("%s: %d of %d conversations are longer than data.max_length %d and were skipped "
                            "(lines %s)%s", split, len(skipped), len(records), d.max_length, shown,
                            "" if d.too_long == "truncate_left" else "; data.too_long: truncate_left keeps them")
            if not kept:
                raise DataError(f"no {split} conversation fits data.max_length {d.max_length}",
                                file=info[split].get("source", d.train), hint="raise data.max_length")
            examples = [ex for _, ex in kept]
            if split == "train":
                info["preflight"] = self.preflight(examples, tokenizer, d.train)
            ds, lens = self._features(examples, tokenizer, packed=self.packing and split == "train")
            features[split] = ds
            lengths[split] = lens
            info[split].update({
                "examples": len(kept),
                "skipped_too_long": len(skipped),
                "skipped_lines": skipped[:1000],
                "truncated": sum(ex.truncated_tokens > 0 for ex in examples),
                "tokens": sum(len(ex.input_ids) for ex in examples),
                "target_tokens": sum(sum(t != IGNORE_INDEX for t in ex.labels) for ex in examples),
                "turns": sum(len(r["messages"]) for r, _ in kept),
            })
            if split != "train":
                limit = self.config.generation.eval_examples or len(kept)
                prompts[split] = [chat_prompt(tokenizer, r["messages"][:-1], tools=r.get("tools"))
                                  for r, _ in kept[:limit]]
                references[split] = [target_text(tokenizer, r["messages"], r.get("tools")) for r, _ in kept[:limit]]
        info["chat_template"] = self.chat_template_source
        extra: dict[str, Any] = {"prompts": prompts, "references": references}
        if self.config.evaluate.memorisation is not None:
            extra["memorisation"] = self._audit_data(kept_by_split, tokenizer)
        return TaskData(splits=features, lengths=lengths, info=info, extra=extra)

    def _audit_data(self, kept: dict[str, list[tuple[dict[str, Any], Any]]], tokenizer: Any) -> AuditData:
        """The memorisation audit's inputs: the canaries (answers to ``canary_prompt`` in the chat template) and
        extraction prompts: rendered conversations up to their last answer, whose first tokens are the target,
        training (canaries left out) and held-out."""
        m = self.config.evaluate.memorisation
        assert m is not None
        inserted = sum(c.repeats for c in self.canaries)
        trained = sum(1 for r, _ in kept.get("train", []) if r.get("canary"))
        if trained < inserted:
            raise DataError(f"evaluate.memorisation: {inserted - trained} of {inserted} canary conversations are "
                            f"longer than data.max_length {self.data_cfg.max_length}",
                            hint="shorten evaluate.memorisation.canary_format / canary_prompt or raise data.max_length")

        def items(pairs: list[tuple[dict[str, Any], Any]]) -> list[tuple[list[int], list[int]] | None]:
            out: list[tuple[list[int], list[int]] | None] = []
            for record, ex in pairs:
                prompt = tokenizer(chat_prompt(tokenizer, record["messages"][:-1]), add_special_tokens=False)["input_ids"]
                ids = list(ex.input_ids)
                # A conversation cut from the left (data.too_long: truncate_left) does not start with its prompt.
                fits = ids[: len(prompt)] == list(prompt) and len(ids) > len(prompt)
                out.append((ids[: len(prompt)], ids[len(prompt) : len(prompt) + m.extraction_suffix_tokens])
                           if fits else None)
            return out

        train = [(r, ex) for r, ex in kept.get("train", []) if not r.get("canary")]
        held = next((s for s in ("validation", "test") if kept.get(s)), None)
        count, seed = m.extraction_prompts, self.config.train.seed
        return AuditData(
            canaries=self.canaries, context=chat_prompt(tokenizer, [{"role": "user", "content": m.canary_prompt}]),
            bos=[], train_items=sample_extraction_items(train, count, seed, items) if count else [],
            heldout_items=sample_extraction_items(kept[held], count, seed, items) if count and held else [],
            heldout_split=held, prompt_description="a conversation up to its last answer, as training rendered it",
        )

    def _features(self, examples: list[Any], tokenizer: Any, *, packed: bool) -> tuple[FeatureDataset, list[int]]:
        seqs = [(ex.input_ids, ex.labels) for ex in examples]
        key = features_cache_key(self.info.name, digest_records(seqs), tokenizer,
                                 {"packed": packed, "max_length": self.data_cfg.max_length})

        def build() -> dict[str, list[Any]]:
            if packed:
                rows, _ = pack_whole(seqs, self.data_cfg.max_length)
                return {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows],
                        "position_ids": [r["position_ids"] for r in rows],
                        "length": [len(r["input_ids"]) for r in rows]}
            return {"input_ids": [s[0] for s in seqs], "labels": [s[1] for s in seqs],
                    "length": [len(s[0]) for s in seqs]}

        ds, hit = cached_features(key, build, use_cache=self.data_cfg.cache)
        if hit:
            log.info("tokenised features read from cache (%s)", key[:12])
        lens = ds.with_format(None)["length"]
        ds.set_format(columns=[c for c in ds.column_names if c != "length"])
        if packed:
            log.info("packed %d conversations into %d rows of up to %d tokens (%.0f%% filled)", len(seqs), len(ds),
                     self.data_cfg.max_length, 100 * sum(lens) / max(len(ds) * self.data_cfg.max_length, 1))
        return FeatureDataset(ds, lens), lens

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: Any, loader: Any, accelerator: Any, split: str, data: TaskData) -> dict[str, Any]:
        """Loss/perplexity on assistant tokens; generation scores at the final evaluation (or always, if set)."""
        metrics = self.loss_metrics(model, loader, accelerator)
        if self.phase == "final" or self.config.generation.eval_during_training:
            prompts = data.extra["prompts"].get(split, [])
            if prompts:
                metrics.update(self.generation_scores(accelerator.unwrap_model(model), accelerator, prompts,
                                                      data.extra["references"][split]))
        return metrics

    def generation_scores(self, model: Any, accelerator: Any, prompts: list[str],
                          references: list[str]) -> dict[str, Any]:
        """Generate answers to ``prompts`` (split across processes) and score them against ``references``."""
        settings = GenerationSettings.from_config(self.config.generation)
        stop_ids = sorted(end_of_turn_ids(self.tokenizer, getattr(model.generation_config, "eos_token_id", None)))
        results = generate_across_processes(
            accelerator, prompts, lambda mine: generate(model, self.tokenizer, mine, settings, eos_token_ids=stop_ids))
        texts = [r["text"].strip() for r in results]
        scores: dict[str, Any] = dict(self.text_scores(texts, references))
        scores["stopped_fraction"] = sum(r["finish_reason"] == "stop" for r in results) / len(results)
        scores["generated_examples"] = len(results)
        scores["examples"] = [
            {"prompt": p, "reference": ref, "generated": t, "finish_reason": r["finish_reason"]}
            for p, ref, t, r in list(zip(prompts, references, texts, results, strict=True))[:EXAMPLES_KEPT]
        ]
        return scores

    def text_scores(self, texts: list[str], references: list[str]) -> dict[str, float]:
        """Scores of generated ``texts`` against ``references`` (a subclass may score differently)."""
        return generation_metrics(texts, references)

    # ------------------------------------------------------------------------------ saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Generation config stopping at the end-of-turn token; chat settings for ``lmtune.json``."""
        stop = sorted(end_of_turn_ids(self.tokenizer))  # the tokenizer's EOS and the template's end-of-turn
        self.write_generation_config(folder, self.tokenizer, stop)
        return {"eos_token_ids": stop, "chat_template": self.chat_template_source, "train_on": self.data_cfg.train_on,
                "max_length": self.data_cfg.max_length, "packing": self.packing,
                "chat_format": data.info["train"].get("chat_format")}


def cell(text: str, limit: int = 160) -> str:
    """``text`` as one Markdown table cell: on one line, pipes escaped, cut to ``limit`` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def chat_example(tokenizer: Any, record: dict[str, Any], ex: RenderedExample) -> dict[str, Any]:
    """One kept example as the model sees it, with its loss-carrying text runs (``lmtune data inspect``)."""
    targets = []
    position = 0
    for loss, run in groupby(ex.labels, key=lambda label: label != IGNORE_INDEX):
        length = len(list(run))
        if loss:
            ids = ex.input_ids[position : position + length]
            targets.append(str(tokenizer.decode(ids, clean_up_tokenization_spaces=False)))
        position += length
    return {
        "line": record["line"],
        "tokens": len(ex.input_ids),
        "target_tokens": sum(label != IGNORE_INDEX for label in ex.labels),
        "truncated_tokens": ex.truncated_tokens,
        "text": ex.text,
        "targets": targets,
        "markup": format_conversation_for_display(tokenizer, ex).markup,
    }

