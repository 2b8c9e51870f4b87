"""Text classification (and sentiment): single-label or multi-label, single texts or pairs.

Data: a text column (optionally a second text column for pairs) and a label
column holding strings or integers; multi-label as a list column or a delimited
string. The label set and its order are saved with the model (``id2label`` in
``config.json``), so ``AutoModelForSequenceClassification`` loads it as is.

Works for encoders (BERT-style, ``[CLS]`` pooling) and decoders (Llama-style
sequence-classification head on the last real token; the pad token is set so the
model can find it).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification

from lmtune.config import Config
from lmtune.config.tasks import NEURAL_BASELINES, TaskInfo
from lmtune.data.features import (
    FeatureDataset,
    PaddingCollator,
    cached_features,
    clip_pairs,
    clip_text,
    digest_records,
    features_cache_key,
)
from lmtune.data.pii import read_data_table
from lmtune.data.readers import Table
from lmtune.data.splits import stratified_split
from lmtune.data.table import format_locations
from lmtune.errors import ConfigError, DataError, ModelError
from lmtune.evaluate.baselines import run_baselines
from lmtune.evaluate.comparison import LATENCY_EXAMPLES
from lmtune.evaluate.fairness import check_slice_groups, group_value, slice_metrics
from lmtune.evaluate.metrics import classification_metrics
from lmtune.evaluate.plots import plot_confusion_matrix
from lmtune.evaluate.report import Report
from lmtune.models import (
    first_token,
    neural_baselines,  # registers the lmtune_baseline model type with transformers
)
from lmtune.models.registry import load_padded_tokenizer, model_path_of
from lmtune.tasks.base import Task, TaskData, encoder_inputs
from lmtune.tasks.classification.info import INFO
from lmtune.tasks.classification.labels import MULTI_LABEL_THRESHOLD, is_blank, label_keys, sort_labels
from lmtune.tasks.explanations import EXPLAINED_EXAMPLES, Example, explanation_section, word_spans

log = logging.getLogger(__name__)

# Lines listed in a log message about skipped rows (the count is always exact).


class ClassificationTask(Task):
    """Sequence classification: one label (softmax) or several (sigmoid) per text or text pair."""

    info: ClassVar[TaskInfo] = INFO
    # A neural baseline (`model: baseline:NAME`) registers its own model type with this auto class too,
    # so one class reloads every saved classifier.
    model_class: ClassVar[type] = AutoModelForSequenceClassification
    peft_task_type: ClassVar[str | None] = "SEQ_CLS"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_cfg = config.data
        # `model: baseline:NAME`: a word-level network built from the training data (no folder).
        self.baseline = neural_baselines.baseline_architecture(config.model.name)
        self._splits: tuple[dict[str, list[dict[str, Any]]], dict[str, Any]] | None = None
        self.embedding_info: dict[str, Any] = {}

    def model_path(self) -> Path | None:
        """The pretrained model's folder; None for a neural baseline, which has none."""
        if self.baseline:
            return None
        return model_path_of(self.config.model)

    # ------------------------------------------------------------------------------ tokenizer
    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The model's tokenizer, right-padded, with a pad token (decoders often lack one).

        Padding with EOS is safe here: classification adds no EOS, and the head reads the last
        non-pad token, which is the last text token. A neural baseline gets a word-level tokenizer
        whose vocabulary comes from the training split (read and split here, reused by ``prepare``).
        """
        if self.baseline or model_path is None:
            splits, _ = self._split_records()
            texts = [t for r in splits["train"] for t in (r["text"], r["pair"]) if t is not None]
            return neural_baselines.build_tokenizer(texts, self.config.baseline, self.data_cfg.max_length)

        return load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)

    # ------------------------------------------------------------------------------ data
    def _records(self, table: Table, split: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Validated records ``{text, pair, labels, line}`` of one table, and what was skipped."""
        d = self.data_cfg
        texts = table.column(d.text_column)
        pairs = table.column(d.text_pair_column) if d.text_pair_column else [None] * len(table)
        labels = table.column(d.label_column)
        # evaluate.slices: each row's group per slice column (a missing column is a DataError listing the real ones).
        slices = {c: table.column(c) for c in self.config.evaluate.slices}
        kind = table.location_kind
        out: list[dict[str, Any]] = []
        skipped: list[int] = []
        for row, (text, pair, label, line) in enumerate(zip(texts, pairs, labels, table.lines, strict=True)):
            for field, value in ((d.text_column, text), (d.text_pair_column, pair)):
                if field is not None and value is not None and not isinstance(value, str):
                    if isinstance(value, (int, float)) and not is_blank(value):
                        continue
                    raise DataError(f"expected text, found {type(value).__name__}", file=table.source,
                                    line=line, field=field)
            blank_text = is_blank(text) or (d.text_pair_column is not None and is_blank(pair))
            # Multi-label: an empty label set is a real answer ("none of these"), not a missing value.
            blank_label = not d.multi_label and (is_blank(label) or (isinstance(label, list) and not label))
            if blank_text or blank_label:
                what = d.label_column if blank_label and not blank_text else d.text_column
                if d.empty_text == "error":
                    raise DataError(f"empty {kind} value", file=table.source, line=line, field=what,
                                    hint="set data.empty_text: skip to drop such rows (they are counted)")
                skipped.append(line)
                continue
            out.append({
                "text": str(text),
                "pair": None if pair is None else str(pair),
                "labels": self._parse_labels(label, table.source, line),
                "line": line,
                **({"groups": {c: group_value(v[row]) for c, v in slices.items()}} if slices else {}),
            })
        if skipped:
            shown = format_locations(skipped)
            log.warning("%s: skipped %d %s(s) with empty text or label (%s %s)", table.source, len(skipped),
                        kind, kind + "s", shown)
        return out, {"skipped_empty": len(skipped), "skipped_lines": skipped[:1000]}

    def _parse_labels(self, value: Any, source: str, line: int) -> list[str]:
        d = self.data_cfg
        if not d.multi_label and isinstance(value, (list, dict)):
            raise DataError(f"a single label was expected, found a {type(value).__name__}", file=source,
                            line=line, field=d.label_column,
                            hint="for several labels per example set data.multi_label: true")
        keys = label_keys(value, multi_label=d.multi_label, delimiter=d.label_delimiter)
        return sorted(set(keys)) if d.multi_label else keys

    def _read_split(self, source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        table = read_data_table(source, self.data_cfg)
        records, info = self._records(table, source)
        if not records:
            raise DataError("no usable rows (all had empty text or label)", file=source)
        info["rows_read"] = len(table)
        info["source"] = source
        return records, info

    def _split(self, records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Seeded, stratified split of one record list into train/validation/test as configured (multi-label
        records are not stratified: they have no one label)."""
        multi_label = self.data_cfg.multi_label
        return stratified_split(records, self.data_cfg, label=lambda r: None if multi_label else r["labels"][0])

    @staticmethod
    def _dedupe_train(records: list[dict[str, Any]], info: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per distinct (text, pair): the first row's label is kept, disagreeing rows counted.

        Done before splitting, so one text never lands on both sides of the split.
        """
        first_labels: dict[tuple[Any, Any], list[str]] = {}
        unique = []
        conflicts = 0
        for r in records:
            k = (r["text"], r["pair"])
            if k in first_labels:
                conflicts += first_labels[k] != r["labels"]
                continue
            first_labels[k] = r["labels"]
            unique.append(r)
        info["duplicates_removed"] = len(records) - len(unique)
        info["conflicting_duplicates"] = conflicts
        if conflicts:
            log.warning("%s: %d repeated texts carry a different label than their first occurrence; "
                        "the first label is kept", info.get("source"), conflicts)
        return unique

    @staticmethod
    def _drop_leakage(splits: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> None:
        """Drop evaluation rows whose text occurs in train, or earlier in the same split."""
        train_keys = {(r["text"], r["pair"]) for r in splits["train"]}
        for split in ("validation", "test"):
            rows = splits.get(split, [])
            inner: set[tuple[Any, Any]] = set()
            clean = []
            for r in rows:
                k = (r["text"], r["pair"])
                if k in train_keys or k in inner:
                    continue
                inner.add(k)
                clean.append(r)
            info[split]["duplicates_removed"] = len(rows) - len(clean)
            splits[split] = clean

    def _split_records(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """Read, validate, deduplicate and split the configured data (once per task object)."""
        if self._splits is not None:
            return self._splits
        d = self.data_cfg
        train_records, train_info = self._read_split(d.train)
        info: dict[str, Any] = {"train": train_info}
        given: dict[str, list[dict[str, Any]]] = {}
        for split, source in (("validation", d.validation), ("test", d.test)):
            if source is not None:
                given[split], info[split] = self._read_split(source)
        if d.deduplicate:
            train_records = self._dedupe_train(train_records, info["train"])
        splits = self._split(train_records)
        for split in ("validation", "test"):
            if split in given:
                splits[split] = given[split]
            else:
                info[split] = {"source": f"{d.train} (split {d.validation_size if split == 'validation' else d.test_size:g})"}
        if d.deduplicate:
            self._drop_leakage(splits, info)
        if d.max_samples:
            rng = random.Random(d.split_seed)
            for split, rows in splits.items():
                if len(rows) > d.max_samples:
                    splits[split] = rng.sample(rows, d.max_samples)
        self._splits = (splits, info)
        return self._splits

    def planned_labels(self) -> tuple[list[str], str]:
        """The labels ``lmtune plan`` sizes the head for without reading the data."""
        if self.config.data.labels:
            return list(self.config.data.labels), "data.labels"
        return ["0", "1"], "assumed 2 (data not read; set data.labels for the exact head size)"

    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, deduplicate, split, check labels and tokenise (cached)."""
        d = self.data_cfg
        self._check_max_length(tokenizer)
        splits, info = self._split_records()
        label_names = self._label_names(splits, info)
        index = {name: i for i, name in enumerate(label_names)}
        for split, rows in splits.items():
            if split == "train":
                continue
            for r in rows:
                unknown = [lab for lab in r["labels"] if lab not in index]
                if unknown:
                    source = info[split].get("source", d.train)
                    raise DataError(
                        f"label '{unknown[0]}' never occurs in training data; known labels: {', '.join(label_names)}",
                        file=source, line=r["line"], field=d.label_column,
                        hint="add examples of it to training data, or list it in data.labels",
                    )
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        texts: dict[str, list[str]] = {}
        inputs: dict[str, tuple[list[str], list[str] | None]] = {}
        targets: dict[str, np.ndarray] = {}
        groups: dict[str, dict[str, list[str]]] = {}
        for split, rows in splits.items():
            if self.config.evaluate.slices and split != "train":
                groups[split] = {c: [r["groups"][c] for r in rows] for c in self.config.evaluate.slices}
                check_slice_groups(groups[split], split, str(info[split].get("source", d.train)))
            targets[split] = self._targets(rows, index)
            ds, truncated = self._tokenize(rows, tokenizer, targets[split], label_names)
            features[split] = ds
            lengths[split] = ds.lengths
            texts[split] = [r["text"] if r["pair"] is None else f"{r['text']} [SEP] {r['pair']}" for r in rows]
            inputs[split] = ([r["text"] for r in rows], [r["pair"] for r in rows] if d.text_pair_column else None)
            info[split]["examples"] = len(rows)
            info[split]["truncated"] = truncated
            info[split]["label_counts"] = dict(Counter(lab for r in rows for lab in r["labels"]))
            info[split]["tokens"] = int(sum(lengths[split]))
            if truncated:
                log.warning("%s: %d of %d examples are longer than data.max_length %d and were truncated",
                            split, truncated, len(rows), d.max_length)
        info["labels"] = label_names
        info["multi_label"] = d.multi_label
        # Where each training example came from, so the loop can name the rows of a step gone wrong.
        train_source = str(info.get("train", {}).get("source", d.train))
        source_lines = {"train": [(train_source, r["line"]) for r in splits.get("train", [])]}
        return TaskData(splits=features, lengths=lengths, info=info,
                        extra={"texts": texts, "inputs": inputs, "targets": targets, "source_lines": source_lines,
                               "groups": groups})

    def _label_names(self, splits: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> list[str]:
        d = self.data_cfg
        seen = {lab for r in splits["train"] for lab in r["labels"]}
        if d.labels is not None:
            names = [str(x) for x in d.labels]
            extra = seen - set(names)
            if extra:
                raise DataError(f"training data has labels not listed in data.labels: {sorted(extra)[:10]}",
                                file=d.train, field=d.label_column)
        else:
            names = sort_labels(seen)
        if len(seen) < 2 and not d.multi_label:
            raise DataError(
                f"training data holds a single class ({next(iter(seen))!r}); a classifier needs at least two",
                file=d.train, field=d.label_column,
                hint=f"check data.label_column (now '{d.label_column}') and the split",
            )
        return names

    def _targets(self, rows: list[dict[str, Any]], index: dict[str, int]) -> np.ndarray:
        if self.data_cfg.multi_label:
            y = np.zeros((len(rows), len(index)), dtype=np.int64)  # (N, L) 0/1
            for i, r in enumerate(rows):
                for lab in r["labels"]:
                    y[i, index[lab]] = 1
            return y
        return np.array([index[r["labels"][0]] for r in rows], dtype=np.int64)  # (N,)

    def _check_max_length(self, tokenizer: Any) -> None:
        limit = tokenizer.model_max_length
        if limit and limit < 10**6 and self.data_cfg.max_length > limit:
            raise ConfigError(
                f"data.max_length {self.data_cfg.max_length} is larger than the model allows ({limit} tokens)",
                hint=f"set --data.max_length {limit} or less",
            )

    def _tokenize(
        self, rows: list[dict[str, Any]], tokenizer: Any, targets: np.ndarray, label_names: list[str]
    ) -> tuple[Any, int]:
        d = self.data_cfg
        settings = {"max_length": d.max_length, "multi_label": d.multi_label, "labels": label_names}
        records = [(r["text"], r["pair"], r["labels"]) for r in rows]
        key = features_cache_key(self.info.name, digest_records(records), tokenizer, settings)
        stats = {"truncated": 0}

        def build() -> dict[str, list[Any]]:
            # Clipped before tokenising: a megabyte text costs what its first max_length tokens cost (and a long
            # pair no longer costs the product of its lengths); the truncated ids and counts are unchanged.
            if d.text_pair_column:
                texts, pairs = clip_pairs(tokenizer, [r["text"] for r in rows], [r["pair"] for r in rows],
                                          d.max_length)
            else:
                side = getattr(tokenizer, "truncation_side", "right")
                texts, pairs = [clip_text(r["text"], d.max_length, side=side) for r in rows], None
            full = tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]
            enc = tokenizer(texts, pairs, truncation=True, max_length=d.max_length)
            stats["truncated"] = sum(len(f) > d.max_length for f in full)
            out: dict[str, list[Any]] = {
                "input_ids": enc["input_ids"],
                "length": [len(x) for x in enc["input_ids"]],
                "index": list(range(len(rows))),
                "full_length": [len(f) for f in full],
            }
            if "token_type_ids" in enc:
                out["token_type_ids"] = enc["token_type_ids"]
            out["labels"] = targets.astype(np.float32).tolist() if d.multi_label else targets.tolist()
            return out

        ds, hit = cached_features(key, build, use_cache=d.cache)
        if hit:
            stats["truncated"] = int(sum(fl > d.max_length for fl in ds["full_length"]))
            log.info("tokenised features read from cache (%s)", key[:12])
        ds = ds.remove_columns(["full_length"])
        ds.set_format(columns=[c for c in ds.column_names if c != "length"])
        # `length` stays readable through ds["length"] below; format only hides it from batches.
        lengths = ds.with_format(None)["length"]
        ds = FeatureDataset(ds, lengths)
        return ds, stats["truncated"]

    # ------------------------------------------------------------------------------ model
    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The pretrained model with a freshly initialised classification head (float32)."""
        labels = data.info["labels"]
        if self.baseline:
            model, self.embedding_info = neural_baselines.build_model(
                self.baseline, self.config.baseline, tokenizer, data.extra["texts"]["train"], labels,
                multi_label=self.data_cfg.multi_label, max_length=self.data_cfg.max_length, seed=self.config.train.seed)
            self.new_modules = ["classifier"]
            return model
        assert model_path is not None
        try:
            cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=self.config.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the model config: {exc}", file=model_path) from None
        cfg.num_labels = len(labels)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {name: i for i, name in enumerate(labels)}
        cfg.problem_type = "multi_label_classification" if self.data_cfg.multi_label else "single_label_classification"
        cfg.pad_token_id = tokenizer.pad_token_id
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos and self.data_cfg.max_length > max_pos:
            raise ConfigError(f"data.max_length {self.data_cfg.max_length} is larger than the model's "
                              f"{max_pos} positions", hint=f"set --data.max_length {max_pos} or less")
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                model_path, config=cfg, dtype=torch.float32, output_loading_info=True,
                trust_remote_code=self.config.model.trust_remote_code,
                use_safetensors=not self.config.model.allow_pickle or None,
            )
        except ValueError as exc:
            raise ModelError(f"this model cannot be loaded for sequence classification: {exc}",
                             file=model_path) from None
        # Modules the checkpoint did not provide are new: the method must train them (LoRA's
        # modules_to_save), and they may get their own learning rate.
        self.new_modules = sorted({k.rsplit(".", 2)[0] if k.count(".") >= 2 else k.split(".")[0]
                                   for k in loading["missing_keys"]})
        if self.config.model.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if first_token.first_token_last_layer(model):
            log.info("the head reads position 0 only: the last encoder layer runs on that position")
        return model

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """Last-level names of modules that are new (the head), e.g. {'classifier'} or {'score'}."""
        names = {m.split(".")[-1] for m in getattr(self, "new_modules", [])}
        return names or {n for n, _ in model.named_children() if n != model.base_model_prefix}

    # ------------------------------------------------------------------------------ batches and loss
    def collator(self, tokenizer: Any) -> PaddingCollator:
        """Dynamic padding to the longest example of each batch."""
        return PaddingCollator(
            {"input_ids": tokenizer.pad_token_id, "token_type_ids": 0},
            padding_side="right",
            pad_to_multiple_of=8 if torch.cuda.is_available() else None,
            float_fields=["labels"] if self.data_cfg.multi_label else (),
        )

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """One item per example."""
        return int(batch["labels"].shape[0])

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits (B, L) in float32."""
        return model(**encoder_inputs(batch)).logits.float()  # (B, L)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy (single-label) or summed per-example mean BCE (multi-label)."""
        logits = self.logits(model, batch)
        if self.data_cfg.multi_label:
            return F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="none").mean(-1).sum()
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(
        self, model: torch.nn.Module, loader: Any, accelerator: Any, split: str, data: TaskData
    ) -> dict[str, Any]:
        """Accuracy, F1 (macro/weighted/micro), per-class scores, confusion matrix and loss; with
        ``evaluate.slices``, every metric per group of each slice column (``slices``)."""
        all_logits, all_labels, all_index = [], [], []
        for batch in loader:
            logits = self.logits(model, batch)
            logits, labels, index = accelerator.gather_for_metrics((logits, batch["labels"], batch["index"]))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
            all_index.append(index.cpu())
        logits = torch.cat(all_logits)
        labels = torch.cat(all_labels)
        index = torch.cat(all_index).numpy()
        names = data.info["labels"]
        if self.data_cfg.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, labels.float()).item()
            probs = torch.sigmoid(logits).numpy()
            pred = (probs >= MULTI_LABEL_THRESHOLD).astype(np.int64)
            metrics = classification_metrics(labels.numpy().astype(np.int64), pred, names, probs=probs,
                                             multi_label=True)
        else:
            loss = F.cross_entropy(logits, labels).item()
            probs = torch.softmax(logits, -1).numpy()
            pred = probs.argmax(-1)
            metrics = classification_metrics(labels.numpy(), pred, names, probs=probs)
        metrics["loss"] = loss
        groups = data.extra.get("groups", {}).get(split)
        if groups:
            # Batches come length-sorted: each example's group is found by its index in the split.
            metrics["slices"] = slice_metrics(labels.numpy().astype(np.int64), pred,
                                              {c: [values[i] for i in index] for c, values in groups.items()},
                                              names, multi_label=self.data_cfg.multi_label)
        return metrics

    # ------------------------------------------------------------------------------ baselines
    def run_baselines(self, data: TaskData) -> dict[str, Any]:
        """The configured classic baselines, fitted on the same train split, scored on the others and timed on
        the texts :meth:`timing_items` gives the models. Neural baselines are not fitted here: the train
        workflow trains them as sub-runs once the model is saved."""
        texts, targets = data.extra["texts"], data.extra["targets"]
        eval_sets = {s: (texts[s], targets[s]) for s in ("validation", "test") if s in texts and len(texts[s])}
        names = [n for n in self.config.baselines if n not in NEURAL_BASELINES]
        split = _timing_split(data)
        return run_baselines(names, texts["train"], targets["train"], eval_sets, data.info["labels"],
                             multi_label=self.data_cfg.multi_label, seed=self.config.train.seed,
                             latency_texts=list(texts.get(split, [])[:LATENCY_EXAMPLES]))

    def predictor_items(self, data: TaskData, split: str) -> list[Any]:
        """Every input of ``split`` as a predictor item: a text, or ``{"text", "text_pair"}`` for text pairs."""
        texts, pairs = data.extra.get("inputs", {}).get(split, ([], None))
        if pairs:
            return [{"text": t, "text_pair": p} for t, p in zip(texts, pairs, strict=True)]
        return list(texts)

    def timing_items(self, data: TaskData) -> list[Any]:
        """The first ``LATENCY_EXAMPLES`` inputs of the test split (validation without one), as predictor
        items: texts, or ``{"text", "text_pair"}`` for text pairs. The classic baselines are timed on the
        same rows (their pair joined into one text)."""
        return self.predictor_items(data, _timing_split(data))[:LATENCY_EXAMPLES]

    # ------------------------------------------------------------------------------ saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Label map and input columns for ``lmtune.json`` (config.json already carries id2label)."""
        d = self.data_cfg
        return {
            "labels": data.info["labels"],
            "multi_label": d.multi_label,
            "threshold": MULTI_LABEL_THRESHOLD if d.multi_label else None,
            "text_column": d.text_column,
            "text_pair_column": d.text_pair_column,
            "label_column": d.label_column,
            "label_delimiter": d.label_delimiter,
            "max_length": d.max_length,
            **({"embeddings": self.embedding_info} if self.embedding_info else {}),
        }

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Per-class table and confusion matrices."""
        names = data.info["labels"]
        for split in ("test", "validation"):
            m = metrics.get(split)
            if not m:
                continue
            report.heading(f"Per-class scores ({split})", 3)
            rows = [[name, s["precision"], s["recall"], s["f1"], s["support"]] for name, s in m["per_class"].items()]
            report.table(["label", "precision", "recall", "F1", "support"], rows)
            if "confusion_matrix" in m:
                rel = f"plots/confusion_{split}.png"
                plot_confusion_matrix(m["confusion_matrix"], names, run_dir / rel, title=f"Confusion matrix ({split})")
                report.image(rel, f"confusion matrix, {split}")
            break
        self._explained_examples(report, run_dir, data)

    def _explained_examples(self, report: Report, run_dir: Path, data: TaskData) -> None:
        """The first held-out texts with their words coloured by attribution towards the predicted label."""
        split = _timing_split(data)
        texts, pairs = data.extra.get("inputs", {}).get(split, ([], None))
        items: list[Any] = ([{"text": t, "text_pair": p} for t, p in zip(texts, pairs, strict=True)] if pairs
                            else list(texts))
        names = data.info["labels"]
        targets = data.extra.get("targets", {}).get(split)

        def example(i: int, row: dict[str, Any]) -> Example:
            label = row["explained"]["label"]
            truth = "" if targets is None or self.data_cfg.multi_label else f"true {names[int(targets[i])]}, "
            predicted = (f"predicted {', '.join(row['labels']) or 'no label'}" if "labels" in row
                         else f"predicted {row['label']} ({row['score']:.2f})")
            return f"{truth}{predicted}; explained: {label}", texts[i], word_spans(row)

        explanation_section(report, run_dir, self.info.name, split, items[:EXPLAINED_EXAMPLES], example,
                            what="the predicted label's log-odds")


def _timing_split(data: TaskData) -> str:
    """The split whose first texts are timed: test when it has rows, else validation."""
    inputs = data.extra.get("inputs", {})
    return "test" if inputs.get("test") and inputs["test"][0] else "validation"
