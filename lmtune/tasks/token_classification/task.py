"""Token classification (named-entity recognition and other span tagging): one tag per word.

Data: CoNLL-style files (a token per line, tag column last by default; :mod:`lmtune.data.conll`), or
records with a ``tokens`` list and a ``tags`` list, or a ``text`` with character ``spans``
(``[{start, end, label}]``). Tags are BIO (IOB2) or BIOES; each file's scheme is detected, validated and
read into entity spans, which are written out in the scheme the model trains on (``data.tag_scheme``),
so files in different schemes mix consistently. The label set (``O`` + every scheme prefix per entity
type) is saved in ``config.json``'s ``id2label``.

Words are split into sub-tokens by a fast tokenizer (``is_split_into_words``); ``word_ids()`` puts each
word's label on its first sub-token, the rest get -100 (or the word's label, ``data.label_all_subtokens``).
Evaluation reads the first sub-token of every word and scores entities with seqeval (conlleval rules).

A neural baseline (``model: baseline:bilstm``, or ``bilstm`` listed in ``baselines``: a sub-run) is the guides'
BiLSTM tagger (:class:`lmtune.models.neural_baselines.NeuralBaselineForTokenClassification`) over a word-level
tokenizer whose vocabulary is the training split's words (``baseline.*`` settings); everything after the
tokenizer and the model (features, loss, evaluation, saving, the predictor) is this task's path unchanged.

Prediction on raw text cuts it into words the way the training data was cut (``word_split``, saved with
the model: whitespace, words and punctuation, or characters for Chinese) and returns entities with
character offsets into the text; long texts are tagged in windows that fit the model, not truncated.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities
from transformers import AutoConfig, AutoModelForTokenClassification

from lmtune.config import Config
from lmtune.config.tasks import TaskInfo
from lmtune.data import tagging
from lmtune.data.conll import COLUMNS as CONLL_COLUMNS
from lmtune.data.conll import pick_columns
from lmtune.data.features import (
    IGNORE_INDEX,
    FeatureDataset,
    PaddingCollator,
    cached_features,
    clip_words,
    digest_records,
    features_cache_key,
)
from lmtune.data.pii import read_data_table
from lmtune.data.readers import Table
from lmtune.data.splits import stratified_split
from lmtune.data.table import format_locations
from lmtune.errors import ConfigError, DataError, ModelError
from lmtune.evaluate.comparison import LATENCY_EXAMPLES
from lmtune.evaluate.report import Report, per_type_section
from lmtune.models import neural_baselines  # registers the lmtune_baseline tagger with transformers
from lmtune.models.registry import load_padded_tokenizer, model_path_of
from lmtune.models.vocabulary import extend_vocabulary, grow_embeddings, input_embedding_paths
from lmtune.tasks.base import Task, TaskData, encoder_inputs
from lmtune.tasks.explanations import EXPLAINED_EXAMPLES, Example, explanation_section, word_spans
from lmtune.tasks.token_classification.info import INFO
from lmtune.tasks.token_classification.inspect import tagging_details, tagging_facts
from lmtune.tasks.token_classification.report import plot_entity_f1

log = logging.getLogger(__name__)


def entity_metrics(gold: list[list[str]], pred: list[list[str]], entity_types: list[str]) -> dict[str, Any]:
    """Entity-level precision / recall / F1 (micro and macro over types, seqeval's conlleval rules), per
    entity type, and word-level tag accuracy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns for a type never predicted; zero_division covers it
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_type = {}
    for kind in sorted(set(entity_types) | {k for k in report if not k.endswith(" avg")}):
        s = report.get(kind, {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
        per_type[kind] = {"precision": float(s["precision"]), "recall": float(s["recall"]),
                          "f1": float(s["f1-score"]), "support": int(s["support"])}
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    words = sum(len(g) for g in gold)
    correct = sum(a == b for g, p in zip(gold, pred, strict=True) for a, b in zip(g, p, strict=True))
    with_support = [s["f1"] for s in per_type.values() if s["support"]]
    return {
        "f1": float(micro["f1-score"]), "precision": float(micro["precision"]), "recall": float(micro["recall"]),
        "macro_f1": float(np.mean(with_support)) if with_support else 0.0,
        "token_accuracy": correct / max(words, 1),
        "num_examples": len(gold), "num_words": words,
        "num_entities": sum(s["support"] for s in per_type.values()),
        "per_type": per_type,
    }


def entities_from_tags(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entity spans ``(type, first, last)`` (word indices, inclusive) read the way the metrics read them."""
    return [(kind, first, last) for kind, first, last in get_entities(tags)]


class TokenClassificationTask(Task):
    """One tag per word (NER): entity spans in BIO or BIOES, scored at the entity level."""

    info: ClassVar[TaskInfo] = INFO
    peft_task_type: ClassVar[str | None] = "TOKEN_CLS"
    # The BiLSTM tagger baseline registers its own model type with this auto class too.
    model_class: ClassVar[type] = AutoModelForTokenClassification

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_cfg = config.data
        # `model: baseline:NAME`: a word-level tagger built from the training data (no folder).
        self.baseline = neural_baselines.baseline_architecture(config.model.name)
        self.embedding_info: dict[str, Any] = {}
        # The records of every split, read once (load_tokenizer needs them for a baseline's vocabulary).
        self._records: tuple[dict[str, list[dict[str, Any]]], dict[str, Any]] | None = None
        # lmtune.json of a trained model (Run.evaluate sets it): its labels, scheme and word split win.
        self.saved_meta: dict[str, Any] | None = None
        self.word_split: str | None = None
        self.added_tokens: list[str] = []
        self.tokenizer: Any = None

    def model_path(self) -> Path | None:
        """The pretrained model's folder (``model.name``: a bundled name or a folder); None for a neural
        baseline, which has none."""
        if self.baseline:
            return None
        return model_path_of(self.config.model)

    def load_model_meta(self, meta: dict[str, Any]) -> None:
        """Evaluate a trained model on its own terms: its label set, tag scheme and word split win over the
        config's (``lmtune.json``)."""
        self.saved_meta = meta

    # ------------------------------------------------------------------------------ tokenizer
    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The model's fast tokenizer (``word_ids()`` needs one), right-padded, with a pad token. A neural
        baseline gets a word-level tokenizer whose vocabulary is the training split's words (read and split
        here, reused by ``prepare``)."""
        if self.baseline or model_path is None:
            splits, _ = self._split_records()
            sentences = [" ".join(r["words"]) for r in splits["train"]]
            tok = neural_baselines.build_tokenizer(sentences, self.config.baseline, self.data_cfg.max_length)
            self.tokenizer = tok
            return tok
        tok = load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)
        if not tok.is_fast:
            raise ModelError("token classification needs a fast (Rust) tokenizer to map sub-tokens to words; "
                             f"this model has {type(tok).__name__}", file=model_path,
                             hint="save the model with a tokenizer.json (AutoTokenizer(..., use_fast=True))")
        self.tokenizer = tok
        return tok

    def new_token_ids(self) -> list[int]:
        """Ids of the words added to the vocabulary (LoRA trains their embedding rows)."""
        if not self.added_tokens or self.tokenizer is None:
            return []
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(self.added_tokens)]

    # ------------------------------------------------------------------------------ reading
    def _sentences(self, table: Table) -> tuple[list[Any], list[Any], str]:
        """(tokens or texts, tags or spans, kind) of every row: kind is "tags" or "spans"."""
        d = self.data_cfg
        if table.columns == list(CONLL_COLUMNS):
            tokens, tags = pick_columns(table, d.conll_token_column, d.conll_tag_column)
            if any(t is None for t in tags):
                line = table.lines[[t is None for t in tags].index(True)]
                raise DataError("this CoNLL sentence has one column: no tags to learn from", file=table.source,
                                line=line, hint="put the tag in the last column (or set data.conll_tag_column)")
            return tokens, tags, "tags"
        if d.tokens_column in table.columns:
            return table.column(d.tokens_column), table.column(d.tags_column), "tags"
        if d.text_column in table.columns and d.spans_column in table.columns:
            return table.column(d.text_column), table.column(d.spans_column), "spans"
        raise DataError(
            f"needs a '{d.tokens_column}' and a '{d.tags_column}' column (or '{d.text_column}' and "
            f"'{d.spans_column}'); the columns are: {', '.join(repr(c) for c in table.columns)}",
            file=table.source, hint="name yours with data.tokens_column / data.tags_column (data.spans_column)")

    def _read_split(self, source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Validated records ``{words, spans, line}`` of one file, and facts about it."""
        d = self.data_cfg
        table = read_data_table(source, d)
        firsts, seconds, kind = self._sentences(table)
        info: dict[str, Any] = {"source": source, "rows_read": len(table)}
        if kind == "spans":
            records, skipped = self._span_records(table, firsts, seconds)
            info["input_format"] = "text + spans"
        else:
            records, skipped, scheme, repaired = self._tag_records(table, firsts, seconds)
            info["input_format"] = "tokens + tags"
            info["input_scheme"] = scheme
            if repaired:
                info["entities_starting_with_I"] = repaired
                log.info("%s: %d entities start with I- (IOB1 style); read as new entities (IOB2)", source, repaired)
        if skipped:
            shown = format_locations(skipped)
            log.warning("%s: skipped %d empty sentence(s) (lines %s)", source, len(skipped), shown)
        info["skipped_empty"] = len(skipped)
        if not records:
            raise DataError("no usable sentences (all were empty)", file=source)
        return records, info

    def _empty(self, table: Table, line: int, field: str, skipped: list[int]) -> None:
        if self.data_cfg.empty_text == "error":
            raise DataError("empty sentence (no words)", file=table.source, line=line, field=field,
                            hint="set data.empty_text: skip to drop such rows (they are counted)")
        skipped.append(line)

    def _tag_records(self, table: Table, tokens: list[Any], tags: list[Any]
                     ) -> tuple[list[dict[str, Any]], list[int], str, int]:
        d = self.data_cfg
        conll = table.columns == list(CONLL_COLUMNS)
        word_lists = [as_word_list(t, table.source, line, d.tokens_column) for t, line in zip(tokens, table.lines, strict=True)]
        tag_lists = [as_word_list(t, table.source, line, d.tags_column) for t, line in zip(tags, table.lines, strict=True)]
        scheme = tagging.detect_scheme([t for ts in tag_lists for t in ts])
        records: list[dict[str, Any]] = []
        skipped: list[int] = []
        repaired = 0
        for words, ts, line in zip(word_lists, tag_lists, table.lines, strict=True):
            if not words and not ts:
                self._empty(table, line, d.tokens_column, skipped)
                continue
            if len(words) != len(ts):
                raise DataError(f"{len(words)} token(s) but {len(ts)} tag(s)", file=table.source, line=line,
                                field=d.tags_column, hint="every token needs exactly one tag")
            try:
                spans, n = tagging.tags_to_spans(ts, scheme)
            except tagging.TagError as exc:
                raise DataError(str(exc), file=table.source, line=line + exc.word if conll else line,
                                field=d.tags_column) from None
            repaired += n
            records.append({"words": words, "spans": spans, "line": line})
        return records, skipped, scheme, repaired

    def _span_records(self, table: Table, texts: list[Any], spans: list[Any]) -> tuple[list[dict[str, Any]], list[int]]:
        d = self.data_cfg
        if self.word_split is None:
            self.word_split = self._configured_split() or tagging.guess_text_split(
                [t for t in texts if isinstance(t, str)])
        records: list[dict[str, Any]] = []
        skipped: list[int] = []
        for text, value, line in zip(texts, spans, table.lines, strict=True):
            if text is None or (isinstance(text, str) and not text.strip()):
                self._empty(table, line, d.text_column, skipped)
                continue
            if not isinstance(text, str):
                raise DataError(f"expected text, found {type(text).__name__}", file=table.source, line=line,
                                field=d.text_column)
            if isinstance(value, str):
                try:
                    value = json.loads(value) if value.strip() else []
                except json.JSONDecodeError as exc:
                    raise DataError(f"the spans are not valid JSON: {exc.msg}", file=table.source, line=line,
                                    field=d.spans_column) from None
            if value is None:
                value = []
            if not isinstance(value, list):
                raise DataError(f"expected a list of spans, found {type(value).__name__}", file=table.source,
                                line=line, field=d.spans_column)
            words = tagging.split_words(text, self.word_split)
            try:
                word_spans = tagging.char_spans_to_word_spans(value, words, text)
            except ValueError as exc:
                raise DataError(str(exc), file=table.source, line=line, field=d.spans_column) from None
            records.append({"words": [w for w, _, _ in words], "spans": word_spans, "line": line})
        return records, skipped

    def _configured_split(self) -> str | None:
        if self.saved_meta and self.saved_meta.get("word_split"):
            return str(self.saved_meta["word_split"])
        return None if self.data_cfg.word_split == "auto" else self.data_cfg.word_split

    # ------------------------------------------------------------------------------ splits
    def _split(self, records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Seeded random split of one record list into train/validation/test as configured (sentences kept in
        file order)."""
        return stratified_split(records, self.data_cfg, what="sentences")

    @staticmethod
    def _dedupe(splits: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> None:
        """One training sentence per distinct word sequence (the first); evaluation sentences that also occur
        in train (or earlier in their split) are dropped, so no sentence is scored that was trained on."""
        seen: set[tuple[str, ...]] = set()
        for split in ("train", "validation", "test"):
            rows = splits.get(split)
            if rows is None:
                continue
            inner: set[tuple[str, ...]] = set()
            clean = []
            for r in rows:
                key = tuple(r["words"])
                if key in seen or key in inner:
                    continue
                inner.add(key)
                clean.append(r)
            info[split]["duplicates_removed"] = len(rows) - len(clean)
            splits[split] = clean
            if split == "train":
                seen = inner

    def planned_labels(self) -> tuple[list[str], str]:
        """The tags ``lmtune plan`` sizes the head for without reading the data."""
        d = self.config.data
        prefixes = ("B", "I", "E", "S") if d.tag_scheme == "bioes" else ("B", "I")
        if d.entity_types:
            return ["O", *[f"{p}-{t}" for t in d.entity_types for p in prefixes]], "data.entity_types"
        return ["O", "B-ENT", "I-ENT"], "assumed 1 entity type (data not read; set data.entity_types)"

    def _split_records(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """The validated records of every split (read, split, de-duplicated, sampled) and facts per split; read
        once (a baseline's ``load_tokenizer`` reads them before ``prepare``). Sets the word split too."""
        if self._records is not None:
            return self._records
        d = self.data_cfg
        self.word_split = self._configured_split()
        train_records, train_info = self._read_split(d.train)
        info: dict[str, Any] = {"train": train_info}
        given: dict[str, list[dict[str, Any]]] = {}
        source_of: dict[str, str] = {}
        for split, source in (("validation", d.validation), ("test", d.test)):
            if source is not None:
                given[split], info[split] = self._read_split(source)
                source_of[split] = source
        splits = self._split(train_records) if len(given) < 2 else {"train": train_records}
        for split in ("validation", "test"):
            if split in given:
                splits[split] = given[split]
            else:
                size = d.validation_size if split == "validation" else d.test_size
                info[split] = {"source": f"{d.train} (split {size:g})"}
        if d.deduplicate:
            self._dedupe(splits, info)
            for split in ("validation", "test"):
                removed = info.get(split, {}).get("duplicates_removed", 0)
                if split in splits and removed and not splits[split]:
                    carved = split not in given  # split off a train file that repeats its sentences
                    raise DataError(f"every {split} sentence also occurs in the training data, so nothing is left "
                                    f"to score ({removed} removed as duplicates)",
                                    file=source_of.get(split, d.train),
                                    hint="de-duplicate the training file, or set data.deduplicate: false to score "
                                    "them anyway" if carved else "give held-out sentences that are not in train, or "
                                    "set data.deduplicate: false to score them anyway")
        if d.max_samples:
            rng = random.Random(d.split_seed)
            for split, rows in splits.items():
                if len(rows) > d.max_samples:
                    splits[split] = sorted(rng.sample(rows, d.max_samples), key=lambda r: r["line"])
        if self.word_split is None:
            self.word_split = tagging.guess_word_split([r["words"] for r in splits["train"]])
        self._records = splits, info
        return self._records

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, split, de-duplicate, convert tags to the training scheme and tokenise (cached)."""
        d = self.data_cfg
        # The tokenizer the features are made with (a saved model's own one, when a run is evaluated).
        self.tokenizer = tokenizer
        meta = self.saved_meta or {}
        limit = tokenizer.model_max_length
        if limit and limit < 10**6 and d.max_length > limit:
            raise ConfigError(f"data.max_length {d.max_length} is larger than the model allows ({limit} tokens)",
                              hint=f"set --data.max_length {limit} or less")
        splits, info = self._split_records()
        train_info = info["train"]
        types = self._entity_types(splits, info)
        if d.extend_vocabulary and not meta and not self.baseline:  # a baseline's vocabulary is the training words
            self.added_tokens = extend_vocabulary(
                tokenizer, Counter(w for r in splits["train"] for w in r["words"]), self.data_cfg.extend_vocabulary)
            info["added_tokens"] = len(self.added_tokens)
        scheme = meta.get("tag_scheme") or (d.tag_scheme if d.tag_scheme != "auto"
                                             else train_info.get("input_scheme", "bio"))
        labels = list(meta["labels"]) if meta.get("labels") else tagging.label_set(types, scheme)
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        for split, rows in splits.items():
            ds, stats = self._tokenize(rows, tokenizer, labels, scheme)
            features[split] = ds
            lengths[split] = ds.lengths
            info[split].update(stats)
            info[split]["examples"] = len(rows)
            info[split]["words"] = sum(len(r["words"]) for r in rows)
            info[split]["label_counts"] = dict(Counter(kind for r in rows for kind, _, _ in r["spans"]))
            info[split]["tokens"] = int(sum(lengths[split]))
            if stats["truncated"]:
                log.warning("%s: %d of %d sentences are longer than data.max_length %d tokens; their last %d "
                            "word(s) are cut off (not trained on, not scored)", split, stats["truncated"],
                            len(rows), d.max_length, stats["truncated_words"])
        info.update({"labels": labels, "entity_types": types, "tag_scheme": scheme, "word_split": self.word_split,
                     "label_all_subtokens": d.label_all_subtokens})
        log.info("entity types %s; tags in %s; words split by %s", ", ".join(types), scheme.upper(), self.word_split)
        # The records (words, entity spans, line) stay with the features for `lmtune data inspect`.
        return TaskData(splits=features, lengths=lengths, info=info, extra={"records": splits})

    def inspect_facts(self, data: TaskData) -> dict[str, dict[str, Any]]:
        """Per split, for ``lmtune data inspect`` (:mod:`lmtune.tasks.token_classification.inspect`): sentences,
        sub-tokens and the unknown-token share, entities per type, repairs, what data.max_length cuts."""
        base = None
        if self.added_tokens:
            # The tokenizer as the model shipped it: what data.extend_vocabulary repaired.
            m = self.config.model
            base = load_padded_tokenizer(model_path_of(m), trust_remote_code=m.trust_remote_code)
        return tagging_facts(data, self.tokenizer, self.data_cfg.max_length, base_tokenizer=base)

    def inspect_details(self, data: TaskData, facts: dict[str, dict[str, Any]], *, examples: int = 3
                        ) -> dict[str, Any]:
        """Scheme, label set and vocabulary extension, suggestions, and rendered train sentences."""
        return tagging_details(data, facts, self.tokenizer, self.data_cfg, self.added_tokens, examples)

    def _entity_types(self, splits: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> list[str]:
        d = self.data_cfg
        seen = sorted({kind for r in splits["train"] for kind, _, _ in r["spans"]})
        meta = self.saved_meta or {}
        if meta.get("entity_types"):
            types = list(meta["entity_types"])
        elif d.entity_types is not None:
            types = [str(t) for t in d.entity_types]
            extra = sorted(set(seen) - set(types))
            if extra:
                raise DataError(f"training data has entity types not listed in data.entity_types: {extra[:10]}",
                                file=d.train, field=d.tags_column)
        else:
            types = seen
        if not types:
            raise DataError("the training data holds no entities (every tag is O): nothing to learn",
                            file=d.train, field=d.tags_column)
        known = set(types)
        for split in ("train", "validation", "test"):
            for r in splits.get(split, []):
                unknown = [kind for kind, _, _ in r["spans"] if kind not in known]
                if unknown:
                    raise DataError(f"entity type '{unknown[0]}' is not one the model has ({', '.join(types)})",
                                    file=info[split].get("source", d.train), line=r["line"], field=d.tags_column,
                                    hint="add examples of it to the training data, or list it in data.entity_types")
        return types

    # ------------------------------------------------------------------------------ features
    def _tokenize(self, rows: list[dict[str, Any]], tokenizer: Any, labels: list[str], scheme: str
                  ) -> tuple[FeatureDataset, dict[str, int]]:
        d = self.data_cfg
        settings = {"max_length": d.max_length, "labels": labels, "scheme": scheme,
                    "all_subtokens": d.label_all_subtokens}
        key = features_cache_key(self.info.name, digest_records([(r["words"], r["spans"]) for r in rows]), tokenizer,
                                 settings)
        index = {name: i for i, name in enumerate(labels)}
        continuation = [index[tagging.continuation_tag(name)] for name in labels]

        def build() -> dict[str, list[Any]]:
            # Clipped before tokenising (same ids): a sentence of a megabyte costs what its first max_length
            # tokens cost. Words clipped away count as cut below.
            words = [clip_words(r["words"], d.max_length) for r in rows]
            full = tokenizer(words, is_split_into_words=True, truncation=False, verbose=False)
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=d.max_length)
            out: dict[str, list[Any]] = {"input_ids": enc["input_ids"], "labels": [], "word_labels": [],
                                         "length": [len(x) for x in enc["input_ids"]], "index": list(range(len(rows))),
                                         "full_length": [len(x) for x in full["input_ids"]],
                                         "words_cut": [], "words_untokenized": []}
            if "token_type_ids" in enc:
                out["token_type_ids"] = enc["token_type_ids"]
            for i, r in enumerate(rows):
                tags = tagging.spans_to_tags(r["spans"], len(r["words"]), scheme)
                ids = enc.word_ids(i)
                lab, first = tagging.align_labels(ids, [index[t] for t in tags], all_subtokens=d.label_all_subtokens,
                                                  continuation=continuation)
                out["labels"].append(lab)
                out["word_labels"].append(first)
                tokenized = {w for w in full.word_ids(i) if w is not None}
                clipped = len(r["words"]) - len(words[i])
                out["words_cut"].append(len(tokenized) - len({w for w in ids if w is not None}) + clipped)
                out["words_untokenized"].append(len(words[i]) - len(tokenized))
            return out

        ds, hit = cached_features(key, build, use_cache=d.cache)
        if hit:
            log.info("tokenised features read from cache (%s)", key[:12])
        plain = ds.with_format(None)
        stats = {"truncated": int(sum(n > d.max_length for n in plain["full_length"])),
                 "truncated_words": int(sum(plain["words_cut"])),
                 "words_without_tokens": int(sum(plain["words_untokenized"]))}
        lengths = plain["length"]
        ds = ds.remove_columns(["full_length", "words_cut", "words_untokenized"])
        ds.set_format(columns=[c for c in ds.column_names if c != "length"])
        return FeatureDataset(ds, lengths), stats

    # ------------------------------------------------------------------------------ model
    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The pretrained body with a new token-classification head (float32); for a neural baseline, the
        freshly initialised tagger over the word vocabulary."""
        labels = data.info["labels"]
        if self.baseline:
            sentences = [" ".join(r["words"]) for r in data.extra["records"]["train"]]
            model, self.embedding_info = neural_baselines.build_tagger(
                self.baseline, self.config.baseline, tokenizer, sentences, labels,
                max_length=self.data_cfg.max_length, seed=self.config.train.seed)
            self.new_modules = ["classifier"]
            return model
        assert model_path is not None  # model_path() gives one unless the model is a baseline
        trust = self.config.model.trust_remote_code
        try:
            cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the model config: {exc}", file=model_path) from None
        cfg.num_labels = len(labels)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {name: i for i, name in enumerate(labels)}
        cfg.pad_token_id = tokenizer.pad_token_id
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos and self.data_cfg.max_length > max_pos:
            raise ConfigError(f"data.max_length {self.data_cfg.max_length} is larger than the model's {max_pos} "
                              "positions", hint=f"set --data.max_length {max_pos} or less")
        try:
            model, loading = AutoModelForTokenClassification.from_pretrained(
                model_path, config=cfg, dtype=torch.float32, output_loading_info=True, trust_remote_code=trust,
                use_safetensors=not self.config.model.allow_pickle or None)
        except ValueError as exc:
            raise ModelError(f"this model cannot be loaded for token classification: {exc}", file=model_path) from None
        self.new_modules = sorted({k.rsplit(".", 2)[0] if k.count(".") >= 2 else k.split(".")[0]
                                   for k in loading["missing_keys"]})
        grow_embeddings(model, len(tokenizer))  # words added by data.extend_vocabulary: rows around the mean
        if self.config.model.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """Last-level names of the new modules (the head), e.g. {'classifier'} or {'score'}; with words added
        to the vocabulary (full or freeze fine-tuning) also the input embeddings, whose new rows start from
        the mean: they train with the head (and its ``train.head_learning_rate``). LoRA trains those rows
        through peft's trainable tokens instead (:meth:`new_token_ids`)."""
        names = {m.split(".")[-1] for m in getattr(self, "new_modules", [])}
        names = names or {n for n, _ in model.named_children() if n != model.base_model_prefix}
        if self.added_tokens and self.config.method.name in ("full", "freeze"):
            names |= {p.rsplit(".", 1)[-1] for p in input_embedding_paths(model)}
        return names

    # ------------------------------------------------------------------------------ batches and loss
    def collator(self, tokenizer: Any) -> PaddingCollator:
        """Dynamic padding; label positions added by padding are -100 (no loss, not scored)."""
        return PaddingCollator({"input_ids": tokenizer.pad_token_id, "token_type_ids": 0, "labels": IGNORE_INDEX,
                                "word_labels": IGNORE_INDEX}, padding_side="right",
                               pad_to_multiple_of=8 if torch.cuda.is_available() else None)

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Labelled tokens: the loss is a sum over them."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tag logits per token (B, T, L) in float32."""
        return model(**encoder_inputs(batch)).logits.float()  # (B, T, L)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy summed over the labelled tokens."""
        logits = self.logits(model, batch)  # (B, T, L)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: torch.nn.Module, loader: Any, accelerator: Any, split: str, data: TaskData
                 ) -> dict[str, Any]:
        """Entity precision / recall / F1 (micro, macro, per type), tag accuracy and the loss per labelled token."""
        labels = data.info["labels"]
        gold: list[list[str]] = []
        pred: list[list[str]] = []
        loss_sum = 0.0
        loss_items = 0.0
        for batch in loader:
            logits = self.logits(model, batch)  # (B, T, L)
            per_token = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE_INDEX,
                                        reduction="none")  # (B, T), 0 where ignored
            row_loss = per_token.sum(-1)  # (B,)
            row_items = (batch["labels"] != IGNORE_INDEX).sum(-1).float()  # (B,)
            # Processes hold batches of different widths: pad to one width before gathering.
            guess = accelerator.pad_across_processes(logits.argmax(-1), dim=1, pad_index=IGNORE_INDEX)
            truth = accelerator.pad_across_processes(batch["word_labels"], dim=1, pad_index=IGNORE_INDEX)
            guess, truth, row_loss, row_items = accelerator.gather_for_metrics((guess, truth, row_loss, row_items))
            loss_sum += float(row_loss.sum())
            loss_items += float(row_items.sum())
            for g, t in zip(guess.cpu().numpy(), truth.cpu().numpy(), strict=True):
                keep = t != IGNORE_INDEX  # first sub-token of each word
                gold.append([labels[i] for i in t[keep]])
                pred.append([labels[i] for i in g[keep]])
        metrics = entity_metrics(gold, pred, data.info["entity_types"])
        metrics["loss"] = loss_sum / max(loss_items, 1.0)
        return metrics

    # ------------------------------------------------------------------------------ saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Tag set, entity types, scheme, word split and input columns for ``lmtune.json``."""
        d = self.data_cfg
        return {
            "labels": data.info["labels"], "entity_types": data.info["entity_types"],
            "tag_scheme": data.info["tag_scheme"], "word_split": data.info["word_split"],
            "label_all_subtokens": d.label_all_subtokens, "max_length": d.max_length,
            "tokens_column": d.tokens_column, "tags_column": d.tags_column, "text_column": d.text_column,
            "spans_column": d.spans_column,
            **({"embeddings": self.embedding_info} if self.embedding_info else {}),
        }

    # ------------------------------------------------------------------------------ baselines
    def timing_items(self, data: TaskData) -> list[Any]:
        """The first ``LATENCY_EXAMPLES`` sentences of the test split (validation without one) as raw texts, their
        words joined as the predictor joins a word list (no spaces between characters for ``chars``): the tuned
        model and the tagger baseline are timed splitting, tokenising and tagging the same texts."""
        records = data.extra.get("records", {})
        rows = records.get("test") or records.get("validation") or []
        split = self.word_split or "whitespace"
        return [tagging.join_words(r["words"], split)[0] for r in rows[:LATENCY_EXAMPLES]]

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Per-entity-type scores of the tuned model beside its starting point, as a table and a bar chart."""
        section = per_type_section(report, metrics, "entity type", "entity type")
        if section is not None:
            split, per_type, start = section
            rel = f"plots/entity_f1_{split}.png"
            plot_entity_f1(per_type, start, run_dir / rel, title=f"Entity F1 per type ({split})")
            report.image(rel, f"entity F1 per type, {split}")
            info = data.info
            report.bullets([
                f"tags: {info['tag_scheme'].upper()} over {len(info['entity_types'])} entity type(s); words split by "
                f"`{info['word_split']}` for raw text; "
                + ("every sub-token labelled" if info.get("label_all_subtokens") else "first sub-token of each word "
                   "labelled"),
                "entity scores follow conlleval (seqeval): an entity counts when its type and both ends match; "
                "words cut off by data.max_length are not scored (counted in the data table's `truncated`)",
            ])
        self._explained_examples(report, run_dir, data)

    def _explained_examples(self, report: Report, run_dir: Path, data: TaskData) -> None:
        """The first held-out sentences holding entities, their words coloured by attribution towards the first
        entity the model finds in each."""
        records = data.extra.get("records", {})
        split = "test" if records.get("test") else "validation"
        rows = [r for r in records.get(split) or [] if r["spans"]][:EXPLAINED_EXAMPLES]
        texts = [tagging.join_words(r["words"], self.word_split or "whitespace")[0] for r in rows]

        def example(i: int, row: dict[str, Any]) -> Example | None:
            found = [e for e in row["entities"] if "explained" in e]
            if not found:
                return None
            e = found[0]
            more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
            return f"{e['entity']} '{e['text']}'{more}", texts[i], word_spans(e)

        explanation_section(report, run_dir, self.info.name, split, texts, example,
                            what="the first entity found in each sentence (its tags' log-odds)")


# ------------------------------------------------------------------------------------------ helpers
def as_word_list(value: Any, source: str, line: int, field: str) -> list[str]:
    """A cell holding words or tags: a list, JSON list text (a CSV cell) or whitespace-separated text."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"not a valid JSON list: {exc.msg}", file=source, line=line, field=field) from None
        else:
            return text.split()
    if not isinstance(value, (list, tuple)):
        raise DataError(f"expected a list, found {type(value).__name__}", file=source, line=line, field=field)
    out = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, str) or not item.strip():
            what = "an empty string" if isinstance(item, str) else type(item).__name__
            raise DataError(f"item {i} is {what}; every item must be non-empty text", file=source, line=line,
                            field=field)
        out.append(item.strip())
    return out
