"""Relation extraction: which relation (or none) holds between two marked entities of a text.

Data (:mod:`.records`): pairs with character spans, SemEval's inline ``<e1>``/``<e2>`` markers, or documents
with entities and relation triples (every ordered entity pair; a pair without a triple is "no relation").
Rows are split (seeded; pair rows stratified by relation) before documents are expanded, so no document
has pairs on both sides of the split.

Model (:mod:`.model`): typed markers (``[E1:PER] ... [/E1:PER]``) are added to the tokenizer as special
tokens (the embeddings grow, new rows at the mean; saved with the model), and a linear head reads the
concatenated hidden states of the two start markers. Scores (:mod:`.metrics`): micro and macro F1 over
the relation types, the no-relation class left out (``data.no_relation_label`` when set,
else the first of ``no_relation``, ``Other``, ``NA`` ... in the labels).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig

import lmtune.tasks.relation_extraction.records as rec
from lmtune.config import Config
from lmtune.config.tasks import NEURAL_BASELINES, TaskInfo
from lmtune.data.features import (
    FeatureDataset,
    PaddingCollator,
    cached_features,
    digest_records,
    features_cache_key,
)
from lmtune.data.pii import read_data_table
from lmtune.data.readers import Table
from lmtune.data.splits import stratified_split
from lmtune.errors import ConfigError, DataError, ModelError
from lmtune.evaluate.baselines import run_baselines
from lmtune.evaluate.comparison import LATENCY_EXAMPLES
from lmtune.evaluate.report import Report, per_type_section
from lmtune.models.registry import load_padded_tokenizer, model_path_of
from lmtune.tasks.base import Task, TaskData, encoder_inputs
from lmtune.tasks.relation_extraction.encoding import (
    add_marker_tokens,
    encode_pairs,
    marker_ids,
    marker_tokens,
)
from lmtune.tasks.relation_extraction.info import INFO
from lmtune.tasks.relation_extraction.metrics import relation_metrics, relation_metrics_from_confusion
from lmtune.tasks.relation_extraction.model import RelationConfig, RelationModel

log = logging.getLogger(__name__)


def span_dict(text: str, span: rec.Span) -> dict[str, Any]:
    """A span as the predictor's ``{text, start, end, type}``."""
    return {"text": text[span[0]:span[1]], "start": span[0], "end": span[1], "type": span[2]}


class RelationExtractionTask(Task):
    """One relation label per marked entity pair, read at the entity-start markers."""

    info: ClassVar[TaskInfo] = INFO
    model_class: ClassVar[type] = RelationModel
    peft_task_type: ClassVar[str | None] = None  # a generic PeftModel: the head is not a transformers head

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_cfg = config.data
        self.saved_meta: dict[str, Any] | None = None
        self.tokenizer: Any = None
        self.added_tokens: list[str] = []
        self.columns = {**rec.DEFAULT_COLUMNS, **{k: v for k, v in config.data.columns.items()
                                                   if k in rec.DEFAULT_COLUMNS}}

    def model_path(self) -> Path:
        """The pretrained encoder's folder (``model.name``: a bundled name or a folder)."""
        return model_path_of(self.config.model)

    def load_model_meta(self, meta: dict[str, Any]) -> None:
        """Evaluate a trained model on its own terms: its labels, entity types and no-relation label win."""
        self.saved_meta = meta

    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The encoder's tokenizer, right-padded (the markers are added by :meth:`prepare`)."""
        assert model_path is not None
        self.tokenizer = load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)
        return self.tokenizer

    def new_token_ids(self) -> list[int]:
        """Ids of the marker tokens added to the vocabulary (LoRA trains their embedding rows)."""
        if not self.added_tokens or self.tokenizer is None:
            return []
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(self.added_tokens)]

    # ------------------------------------------------------------------------------ reading
    def _configured_no_relation(self) -> str | None:
        meta = self.saved_meta or {}
        if "no_relation_label" in meta:
            return cast(str | None, meta["no_relation_label"])
        return self.data_cfg.no_relation_label

    def _relation_column(self, table: Table) -> str:
        named = self.data_cfg.columns.get("relation")
        if named or "relation" in table.columns:
            return named or "relation"
        return self.data_cfg.label_column

    def _read_split(self, source: str) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
        """One file as units (a row's pairs: one for pair rows, every entity pair for a document) and facts."""
        d, cols = self.data_cfg, self.columns
        table = read_data_table(source, d)
        if d.text_column not in table.columns:
            raise DataError(f"needs a '{d.text_column}' column; the columns are: "
                            f"{', '.join(repr(c) for c in table.columns)}", file=source,
                            hint="name yours with data.text_column (and data.columns for head, tail, relation)")
        texts = table.column(d.text_column)
        units: list[list[dict[str, Any]]] = []
        skipped = 0
        if cols["entities"] in table.columns:
            layout = "documents"
            if cols["relations"] not in table.columns:
                raise DataError(f"documents need a '{cols['relations']}' column beside '{cols['entities']}'",
                                file=source, hint="name it with data.columns: {relations: your_column}")
            no_rel = self._configured_no_relation() or rec.DOCUMENT_NO_RELATION
            for text, ents, rels, line in zip(texts, table.column(cols["entities"]), table.column(cols["relations"]),
                                              table.lines, strict=True):
                if self._blank(text, source, line):
                    skipped += 1
                    continue
                units.append(rec.document_pairs(text, ents, rels, no_rel, source, line,
                                                 (cols["entities"], cols["relations"])))
        else:
            rel_col = self._relation_column(table)
            if rel_col not in table.columns:
                raise DataError(f"needs a '{rel_col}' column with the relation; the columns are: "
                                f"{', '.join(repr(c) for c in table.columns)}", file=source,
                                hint="name it with data.columns: {relation: your_column}")
            spans = cols["head"] in table.columns and cols["tail"] in table.columns
            if not spans and (cols["head"] in table.columns or cols["tail"] in table.columns):
                missing = cols["tail"] if cols["head"] in table.columns else cols["head"]
                raise DataError(f"a '{missing}' column is missing beside the other entity's", file=source)
            layout = "pairs" if spans else "inline markers"
            heads = table.column(cols["head"]) if spans else [None] * len(table)
            tails = table.column(cols["tail"]) if spans else [None] * len(table)
            for text, head, tail, label, line in zip(texts, heads, tails, table.column(rel_col), table.lines,
                                                     strict=True):
                if self._blank(text, source, line):
                    skipped += 1
                    continue
                if label is None or (isinstance(label, float) and np.isnan(label)) or not str(label).strip():
                    raise DataError("empty relation", file=source, line=line, field=rel_col)
                if spans:
                    h = rec.read_span(head, text, source, line, cols["head"])
                    t = rec.read_span(tail, text, source, line, cols["tail"])
                    rec.check_pair(h, t, source, line, cols["tail"])
                else:
                    text, h, t = rec.parse_inline(text, source, line, d.text_column)
                units.append([{"text": text, "head": h, "tail": t, "relation": str(label).strip(), "line": line}])
        if not any(units):
            raise DataError("no entity pairs to learn from", file=source)
        return units, {"source": source, "rows_read": len(table), "input_format": layout, "skipped_empty": skipped}

    def _blank(self, text: Any, source: str, line: int) -> bool:
        if isinstance(text, str) and text.strip():
            return False
        if text is not None and not isinstance(text, (str, float)):
            raise DataError(f"expected text, found {type(text).__name__}", file=source, line=line,
                            field=self.data_cfg.text_column)
        if self.data_cfg.empty_text == "error":
            raise DataError("empty text", file=source, line=line, field=self.data_cfg.text_column,
                            hint="set data.empty_text: skip to drop such rows (they are counted)")
        return True

    def _split_units(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        d = self.data_cfg
        train_units, train_info = self._read_split(d.train)
        info: dict[str, Any] = {"train": train_info}
        given: dict[str, list[list[dict[str, Any]]]] = {}
        for split, source in (("validation", d.validation), ("test", d.test)):
            if source is not None:
                given[split], info[split] = self._read_split(source)
        single = all(len(u) == 1 for u in train_units)
        split_units = stratified_split(train_units, d, label=(lambda u: u[0]["relation"]) if single else None,
                                       what="rows") if len(given) < 2 else {"train": train_units}
        for split in ("validation", "test"):
            if split in given:
                split_units[split] = given[split]
            else:
                size = d.validation_size if split == "validation" else d.test_size
                info[split] = {"source": f"{d.train} (split {size:g})"}
        splits = {s: [p for u in units for p in u] for s, units in split_units.items()}
        if d.max_samples:
            rng = random.Random(d.split_seed)
            for split, rows in splits.items():
                if len(rows) > d.max_samples:
                    splits[split] = rng.sample(rows, d.max_samples)
        return splits, info

    # ------------------------------------------------------------------------------ labels and types
    def _vocabulary(self, splits: dict[str, list[dict[str, Any]]], info: dict[str, Any]
                    ) -> tuple[list[str], list[str], str | None]:
        d, meta = self.data_cfg, self.saved_meta or {}
        train = splits["train"]
        seen_types = sorted({p[end][2] for p in train for end in ("head", "tail")})
        seen_labels = {p["relation"] for p in train}
        if meta.get("entity_types"):
            types = list(meta["entity_types"])
        elif d.entity_types is not None:
            types = [str(t) for t in d.entity_types]
        else:
            types = seen_types
        if meta.get("labels"):
            labels = list(meta["labels"])
        elif d.labels is not None:
            labels = [str(x) for x in d.labels]
        else:
            labels = sorted(seen_labels)
        no_rel = rec.no_relation_label(self._configured_no_relation(), set(labels))
        if no_rel is not None and no_rel not in labels:
            labels.append(no_rel)
        if len(labels) < 2:
            raise DataError(f"the training data holds a single relation ({labels[0]!r}); a classifier needs at "
                            "least two", file=d.train, field="relation")
        known_types, known_labels = set(types), set(labels)
        for split in ("train", "validation", "test"):
            source = info.get(split, {}).get("source", d.train)
            for p in splits.get(split, []):
                for end in ("head", "tail"):
                    if p[end][2] not in known_types:
                        raise DataError(f"entity type '{p[end][2]}' is not one the model has ({', '.join(types)})",
                                        file=source, line=p["line"], field=self.columns[end],
                                        hint="add examples of it to the training data, or list it in "
                                        "data.entity_types")
                if p["relation"] not in known_labels:
                    raise DataError(f"relation '{p['relation']}' never occurs in training data; known: "
                                    f"{', '.join(labels)}", file=source, line=p["line"], field="relation",
                                    hint="add examples of it to the training data, or list it in data.labels")
        return types, labels, no_rel

    def planned_labels(self) -> tuple[list[str], str]:
        """The relations ``lmtune plan`` sizes the head for without reading the data."""
        if self.data_cfg.labels:
            return list(self.data_cfg.labels), "data.labels"
        return ["no_relation", "relation"], "assumed 2 (data not read; set data.labels for the exact head size)"

    # ------------------------------------------------------------------------------ features
    def prepare(self, tokenizer: Any) -> TaskData:
        """Read, validate, split, expand documents into pairs, add the markers and tokenise (cached)."""
        d = self.data_cfg
        self.tokenizer = tokenizer
        limit = tokenizer.model_max_length
        if limit and limit < 10**6 and d.max_length > limit:
            raise ConfigError(f"data.max_length {d.max_length} is larger than the model allows ({limit} tokens)",
                              hint=f"set --data.max_length {limit} or less")
        splits, info = self._split_units()
        types, labels, no_rel = self._vocabulary(splits, info)
        self.added_tokens = add_marker_tokens(tokenizer, types)
        index = {name: i for i, name in enumerate(labels)}
        features: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        texts: dict[str, list[str]] = {}
        inputs: dict[str, tuple[list[str], None]] = {}
        targets: dict[str, np.ndarray] = {}
        items: dict[str, list[dict[str, Any]]] = {}
        for split, rows in splits.items():
            ds, kept, stats = self._tokenize(rows, tokenizer, types, labels)
            rows = [rows[i] for i in kept]
            features[split] = ds
            lengths[split] = ds.lengths
            texts[split] = [rec.mark(r["text"], r["head"], r["tail"]) for r in rows]
            inputs[split] = (texts[split], None)
            targets[split] = np.array([index[r["relation"]] for r in rows], dtype=np.int64)
            items[split] = [{"text": r["text"], "head": span_dict(r["text"], r["head"]),
                             "tail": span_dict(r["text"], r["tail"])} for r in rows[:LATENCY_EXAMPLES]]
            info[split].update(stats)
            info[split]["examples"] = len(rows)
            info[split]["label_counts"] = dict(Counter(r["relation"] for r in rows))
            info[split]["tokens"] = int(sum(lengths[split]))
            if stats["skipped_markers_cut"]:
                log.warning("%s: %d entity pair(s) lie further apart than data.max_length %d tokens allows: "
                            "skipped (counted)", split, stats["skipped_markers_cut"], d.max_length)
            if not rows and split == "train":
                raise DataError("no entity pair fits data.max_length", file=d.train,
                                hint=f"raise data.max_length (now {d.max_length})")
        info.update({"labels": labels, "multi_label": False, "entity_types": types, "no_relation_label": no_rel,
                     "markers": marker_tokens(types)})
        train_source = str(info["train"].get("source", d.train))
        source_lines = {"train": [(train_source, r["line"]) for r in splits["train"]]}
        return TaskData(splits=features, lengths=lengths, info=info,
                        extra={"texts": texts, "inputs": inputs, "targets": targets, "items": items,
                               "source_lines": source_lines})

    def _tokenize(self, rows: list[dict[str, Any]], tokenizer: Any, types: list[str], labels: list[str]
                  ) -> tuple[FeatureDataset, list[int], dict[str, int]]:
        """Features of the pairs that fit, the indices of those pairs, and what was windowed or skipped."""
        d = self.data_cfg
        index = {name: i for i, name in enumerate(labels)}
        settings = {"max_length": d.max_length, "labels": labels, "types": types}
        key = features_cache_key(self.info.name, digest_records([(r["text"], r["head"], r["tail"], r["relation"])
                                                                 for r in rows]), tokenizer, settings)

        def build() -> dict[str, list[Any]]:
            ids, windowed = encode_pairs(tokenizer, [(r["text"], r["head"], r["tail"]) for r in rows],
                                         d.max_length, types)
            kept = [i for i, x in enumerate(ids) if x is not None]
            return {"input_ids": [ids[i] for i in kept], "labels": [index[rows[i]["relation"]] for i in kept],
                    "length": [len(ids[i] or []) for i in kept], "index": list(range(len(kept))), "source_row": kept,
                    "windowed": [windowed] * len(kept)}

        ds, hit = cached_features(key, build, use_cache=d.cache)
        if hit:
            log.info("tokenised features read from cache (%s)", key[:12])
        plain = ds.with_format(None)
        kept = list(plain["source_row"])
        stats = {"skipped_markers_cut": len(rows) - len(kept),
                 "windowed": int(plain["windowed"][0]) if len(kept) else 0}
        lengths = list(plain["length"])
        ds = ds.remove_columns(["source_row", "windowed"])
        ds.set_format(columns=[c for c in ds.column_names if c != "length"])
        return FeatureDataset(ds, lengths), kept, stats

    # ------------------------------------------------------------------------------ model
    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The pretrained encoder (vocabulary grown by the markers) with a new relation head (float32)."""
        assert model_path is not None
        labels, types = data.info["labels"], data.info["entity_types"]
        trust = self.config.model.trust_remote_code
        try:
            encoder_cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the model config: {exc}", file=model_path) from None
        max_pos = getattr(encoder_cfg, "max_position_embeddings", None)
        if max_pos and self.data_cfg.max_length > max_pos:
            raise ConfigError(f"data.max_length {self.data_cfg.max_length} is larger than the model's {max_pos} "
                              "positions", hint=f"set --data.max_length {max_pos} or less")
        encoder = encoder_cfg.to_dict()
        encoder["vocab_size"] = max(len(tokenizer), int(encoder.get("vocab_size") or 0))
        heads, tails, _ = marker_ids(tokenizer, types)
        cfg = RelationConfig(encoder=encoder, head_marker_ids=heads, tail_marker_ids=tails,
                             num_labels=len(labels), id2label=dict(enumerate(labels)),
                             label2id={n: i for i, n in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id)
        try:
            model = RelationModel.from_encoder(model_path, cfg, dtype=torch.float32, trust_remote_code=trust,
                                               use_safetensors=not self.config.model.allow_pickle or None)
        except (OSError, ValueError) as exc:
            raise ModelError(f"this model cannot be loaded as an encoder: {exc}", file=model_path) from None
        if self.config.model.gradient_checkpointing:
            model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """The classifier; with full or freeze fine-tuning also the input embeddings, whose marker rows are new
        (LoRA trains those rows as peft trainable tokens instead: :meth:`new_token_ids`)."""
        names = {"classifier"}
        if self.added_tokens and self.config.method.name in ("full", "freeze"):
            embeddings = cast(Any, model).get_input_embeddings()
            names |= {n.split(".")[-1] for n, m in model.named_modules() if m is embeddings}
        return names

    # ------------------------------------------------------------------------------ batches and loss
    def collator(self, tokenizer: Any) -> PaddingCollator:
        """Dynamic padding to the longest pair of each batch."""
        return PaddingCollator({"input_ids": tokenizer.pad_token_id, "token_type_ids": 0}, padding_side="right",
                               pad_to_multiple_of=8 if torch.cuda.is_available() else None)

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """One item per entity pair."""
        return int(batch["labels"].shape[0])

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Relation logits (B, L) in float32."""
        return model(**encoder_inputs(batch)).logits.float()  # (B, L)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy summed over the pairs."""
        return F.cross_entropy(self.logits(model, batch), batch["labels"], reduction="sum")

    def evaluate(self, model: torch.nn.Module, loader: Any, accelerator: Any, split: str, data: TaskData
                 ) -> dict[str, Any]:
        """Micro / macro F1, precision, recall over the relation types (no-relation left out), per type, loss."""
        all_logits, all_labels = [], []
        for batch in loader:
            logits, labels = accelerator.gather_for_metrics((self.logits(model, batch), batch["labels"]))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
        labels_t = torch.cat(all_labels) if all_labels else torch.zeros(0, dtype=torch.long)
        names = data.info["labels"]
        if not all_logits:
            return {**relation_metrics([], [], names, data.info["no_relation_label"]), "loss": 0.0}
        logits_t = torch.cat(all_logits)
        metrics = relation_metrics([names[i] for i in labels_t.tolist()],
                                   [names[i] for i in logits_t.argmax(-1).tolist()], names,
                                   data.info["no_relation_label"])
        metrics["loss"] = float(F.cross_entropy(logits_t, labels_t))
        return metrics

    # ------------------------------------------------------------------------------ baselines
    def run_baselines(self, data: TaskData) -> dict[str, Any]:
        """The configured classic baselines on the marked texts (the markers are words to them), scored with
        the relation metrics from their confusion matrices."""
        texts, targets = data.extra["texts"], data.extra["targets"]
        names = [n for n in self.config.baselines if n not in NEURAL_BASELINES]
        if not names:
            return {}
        eval_sets = {s: (texts[s], targets[s]) for s in ("validation", "test") if s in texts and len(texts[s])}
        split = "test" if texts.get("test") else "validation"
        results = run_baselines(names, texts["train"], targets["train"], eval_sets, data.info["labels"],
                                seed=self.config.train.seed,
                                latency_texts=list(texts.get(split, [])[:LATENCY_EXAMPLES]))
        for entry in results.values():
            for s, m in entry.get("metrics", {}).items():
                if "confusion_matrix" in m:
                    entry["metrics"][s] = {**m, **relation_metrics_from_confusion(
                        m["confusion_matrix"], data.info["labels"], data.info["no_relation_label"])}
        return results

    def timing_items(self, data: TaskData) -> list[Any]:
        """The first pairs of the test split (validation without one), as predictor items."""
        items = data.extra.get("items", {})
        return list(items.get("test") or items.get("validation") or [])

    # ------------------------------------------------------------------------------ saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Labels, entity types, the no-relation label, max_length and the input columns for ``lmtune.json``."""
        info = data.info
        return {"labels": info["labels"], "entity_types": info["entity_types"],
                "no_relation_label": info["no_relation_label"], "max_length": self.data_cfg.max_length,
                "text_column": self.data_cfg.text_column, "columns": self.columns}

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Per relation type: precision, recall, F1 and support, beside the starting point's F1."""
        section = per_type_section(report, metrics, "relation type", "relation")
        if section is not None:
            split = section[0]
            info = data.info
            report.bullets([
                f"scores leave the no-relation class ({info['no_relation_label'] or 'none in the labels'}) out: "
                "micro F1 pools every relation type's counts, macro F1 averages their F1",
                f"entity markers over {len(info['entity_types'])} entity type(s): "
                + ", ".join(info["entity_types"]),
                f"pairs skipped because their entities lie further apart than data.max_length allows: "
                f"{info[split].get('skipped_markers_cut', 0)}",
            ])
