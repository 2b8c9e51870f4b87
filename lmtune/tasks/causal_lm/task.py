"""Language-model training on raw text: continued pre-training of a decoder, or a small one from scratch.

Data: plain-text files (one document per file, paragraph or line: ``data.document_split``) or a
text column of any table (one document per row). Each document is tokenised, ended with EOS (and
begun with BOS when the tokenizer uses one), and the documents are packed into rows of
``data.max_length`` tokens with no attention across document boundaries (see
:mod:`lmtune.data.packing`). Evaluation reports the mean next-token loss and perplexity on
held-out documents.

``model.init: scratch`` builds a fresh Llama- or GPT-2-shaped decoder of the configured size; its
tokenizer comes from a bundled model or folder, or is trained on the training text (byte-level
BPE with ``tokenizers``, cached by a hash of the text and the vocabulary size).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmtune.config import Config
from lmtune.config.tasks import TaskInfo
from lmtune.data.chat import adds_bos
from lmtune.data.documents import read_documents, split_documents
from lmtune.data.features import FeatureDataset, cached_features, digest_records, features_cache_key
from lmtune.data.packing import pack_stream
from lmtune.data.streaming import open_document_stream
from lmtune.errors import ConfigError
from lmtune.evaluate.memorisation import (
    AuditData,
    canary_texts,
    make_canaries,
    sample_extraction_items,
    window_item,
)
from lmtune.evaluate.report import Report
from lmtune.models.registry import load_padded_tokenizer, model_path_of
from lmtune.paths import cache_dir
from lmtune.tasks.base import TaskData
from lmtune.tasks.causal_lm.info import INFO
from lmtune.tasks.causal_lm.inspect import inspect_causal_lm, render_causal
from lmtune.tasks.decoder import DecoderTask, refuse_streaming

log = logging.getLogger(__name__)

# The special token of a tokenizer trained on the corpus: ends (and pads) every document.
END_OF_TEXT = "<|endoftext|>"


class CausalLMTask(DecoderTask):
    """Next-token prediction on documents, packed into fixed-length rows."""

    info: ClassVar[TaskInfo] = INFO

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if config.model.init == "scratch" and config.method.name != "full":
            raise ConfigError(f"method.name '{config.method.name}': a model trained from scratch has no pretrained "
                              "weights to keep; use method.name: full")
        self._docs: dict[str, tuple[list[str], dict[str, Any]]] = {}
        # evaluate.memorisation: the canaries, appended to the training documents (the last ``_canary_docs``).
        self.canaries = make_canaries(config.evaluate.memorisation, config.train.seed) \
            if config.evaluate.memorisation is not None else []
        self._canary_docs = 0

    @property
    def packing(self) -> bool:
        """On unless ``data.packing: false``."""
        return self.info.packing_default if self.data_cfg.packing is None else self.data_cfg.packing

    # ------------------------------------------------------------------------------ model source
    def model_path(self) -> Path | None:
        """The folder whose weights (pretrained) or tokenizer (scratch) are used; None for a trained tokenizer."""
        m = self.config.model
        source = m.name if m.init == "pretrained" else (m.tokenizer or m.name)
        if source == "train":
            return None
        return model_path_of(m, name=source)

    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The model's tokenizer, or one trained on the training documents (init: scratch, tokenizer: train)."""
        if model_path is None:
            self.tokenizer = self._trained_tokenizer()
        else:
            self.tokenizer = load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)
        return self.tokenizer

    def _trained_tokenizer(self) -> Any:
        """A byte-level BPE tokenizer trained on the training documents, cached by their hash."""
        docs = self.documents("train")
        # Not on the canaries (evaluate.memorisation): a vocabulary that learned their secrets as tokens would
        # score them against other secrets unfairly, before any training.
        docs = docs[: len(docs) - self._canary_docs]
        vocab = self.config.model.vocab_size
        digest = hashlib.sha256(f"bpe-v1:{vocab}\n{digest_records(docs)}".encode()).hexdigest()[:24]
        folder = cache_dir("tokenizers") / digest
        if (folder / "tokenizer.json").is_file():
            log.info("tokenizer trained on this text read from cache (%s)", digest[:12])
            return load_padded_tokenizer(folder)
        log.info("training a byte-level BPE tokenizer (vocabulary %d) on %d documents", vocab, len(docs))
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[END_OF_TEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(docs, trainer=trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                      bos_token=END_OF_TEXT, model_max_length=self.config.model.context_length)
        tmp = folder.with_name(f".{digest}.tmp-{os.getpid()}")
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process trained the same tokenizer first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
        return load_padded_tokenizer(folder)

    # ------------------------------------------------------------------------------ data
    def _read_documents(self, source: str) -> tuple[list[str], dict[str, Any]]:
        """Documents of one source, and facts about reading it (:func:`lmtune.data.documents.read_documents`)."""
        return read_documents(source, self.data_cfg)

    def documents(self, split: str) -> list[str]:
        """The documents of ``split`` after reading, de-duplication and splitting (computed once)."""
        if not self._docs:
            self._docs = self._split_documents()
        return self._docs[split][0] if split in self._docs else []

    def _split_documents(self) -> dict[str, tuple[list[str], dict[str, Any]]]:
        docs = split_documents(self.data_cfg)
        if self.canaries:
            # After de-duplication and sampling, so each canary occurs exactly as often as it should; the
            # held-out splits never see one.
            inserted = canary_texts(self.canaries)
            train, info = docs["train"]
            docs["train"] = (train + inserted, {**info, "canary_documents": len(inserted)})
            self._canary_docs = len(inserted)
        return docs

    def prepare(self, tokenizer: Any) -> TaskData:
        """Tokenise every split's documents and pack them into rows (cached)."""
        self.tokenizer = tokenizer  # what a saved model's evaluation hands over, as load_tokenizer would
        stream = None
        if self.data_cfg.streaming:  # data larger than memory: training rows are made as training reads them
            self._docs, stream, stream_info = open_document_stream(
                self.data_cfg, tokenizer, seed=self.config.train.seed, packing=self.packing,
                read_documents=self._read_documents)
        self.documents("train")
        info: dict[str, Any] = {}
        splits: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        for split in ("train", "validation", "test"):
            if split not in self._docs or not self._docs[split][0]:
                continue
            docs, split_info = self._docs[split]
            ds, facts = self._features(docs, tokenizer)
            splits[split] = ds
            lengths[split] = ds.lengths
            info[split] = {**split_info, **facts}
        if stream is not None:
            splits["train"], lengths["train"], info["train"] = stream, [], stream_info
        extra: dict[str, Any] = {"documents": {s: v[0] for s, v in self._docs.items()}}
        if self.config.evaluate.memorisation is not None:
            extra["memorisation"] = self._audit_data(tokenizer)
        return TaskData(splits=splits, lengths=lengths, info=info, extra=extra)

    def _audit_data(self, tokenizer: Any) -> AuditData:
        """The memorisation audit's inputs: the canaries (documents of their own, begun with BOS as training
        begins them) and extraction prompts from the documents' first tokens, training (canaries left out)
        and held-out."""
        m = self.config.evaluate.memorisation
        assert m is not None
        bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        eos = [tokenizer.eos_token_id]

        def items(docs: list[str]) -> list[tuple[list[int], list[int]] | None]:
            ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
            return [window_item(bos + x + eos, m.extraction_prefix_tokens, m.extraction_suffix_tokens) for x in ids]

        train = self.documents("train")
        train = train[: len(train) - self._canary_docs]
        held = next((s for s in ("validation", "test") if self.documents(s)), None)
        count, seed = m.extraction_prompts, self.config.train.seed
        return AuditData(
            canaries=self.canaries, context="", bos=bos,
            train_items=sample_extraction_items(train, count, seed, items) if count else [],
            heldout_items=sample_extraction_items(self.documents(held), count, seed, items) if count and held else [],
            heldout_split=held,
            prompt_description=f"a document's first {m.extraction_prefix_tokens} tokens",
        )

    def _features(self, docs: list[str], tokenizer: Any) -> tuple[FeatureDataset, dict[str, Any]]:
        d = self.data_cfg
        bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        eos = [tokenizer.eos_token_id]
        settings = {"max_length": d.max_length, "packing": self.packing, "bos": bos, "eos": eos}
        key = features_cache_key(self.info.name, digest_records(docs), tokenizer, settings)
        facts: dict[str, Any] = {}

        def build() -> dict[str, list[Any]]:
            rows: list[dict[str, Any]]
            ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
            seqs = [bos + x + eos for x in ids]
            if self.packing:
                rows = pack_stream(((s, s) for s in seqs), d.max_length)
            else:  # one document per row, long documents cut into several rows
                rows = []
                for s in seqs:
                    for i in range(0, len(s), d.max_length):
                        piece = s[i : i + d.max_length]
                        rows.append({"input_ids": piece, "labels": piece, "segments": 1})
            return {
                "input_ids": [r["input_ids"] for r in rows],
                "labels": [r["labels"] for r in rows],
                **({"position_ids": [r["position_ids"] for r in rows]} if self.packing else {}),
                "segments": [r["segments"] for r in rows],
                "length": [len(r["input_ids"]) for r in rows],
            }

        ds, hit = cached_features(key, build, use_cache=d.cache)
        if hit:
            log.info("tokenised features read from cache (%s)", key[:12])
        plain = ds.with_format(None)
        row_lengths = plain["length"]
        segments = plain["segments"]
        facts.update({
            "examples": len(docs),
            "documents": len(docs),
            "rows": len(ds),
            "tokens": int(sum(row_lengths)),
            "pieces": int(sum(segments)),
            # A document cut across rows (or into several rows) loses context at the cut.
            "documents_split_across_rows": int(sum(segments) - len(docs)),
        })
        ds.set_format(columns=[c for c in ds.column_names if c not in ("length", "segments")])
        return FeatureDataset(ds, row_lengths), facts

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: Any, loader: Any, accelerator: Any, split: str, data: TaskData) -> dict[str, Any]:
        """Mean next-token loss and perplexity on held-out documents."""
        return self.loss_metrics(model, loader, accelerator)

    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """Generation config and the data settings."""
        stop = [] if self.tokenizer.eos_token_id is None else [int(self.tokenizer.eos_token_id)]
        self.write_generation_config(folder, self.tokenizer, stop)
        return {"max_length": self.data_cfg.max_length, "packing": self.packing,
                "init": self.config.model.init, "eos_token_ids": stop}

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Perplexity before and after, per split."""
        start = metrics.get("starting_point", {})
        rows = []
        for split in ("validation", "test"):
            if split in metrics:
                before = start.get(split, {}).get("perplexity")
                rows.append([split, before, metrics[split]["perplexity"], metrics[split]["target_tokens"]])
        if rows:
            report.heading("Perplexity", 3)
            report.table(["split", "starting model", "trained model", "target tokens"], rows)

    # ------------------------------------------------------------------------------ inspect
    def inspect(self, source: str | None, *, examples: int = 3) -> dict[str, Any] | None:
        """The documents and the rows training reads (see :func:`lmtune.tasks.causal_lm.inspect.inspect_causal_lm`)."""
        refuse_streaming(self.config)
        return inspect_causal_lm(self, source, examples=examples)

    def render_inspection(self, report: dict[str, Any], console: Any) -> bool:
        """Print :meth:`inspect`'s report as tables."""
        render_causal(report, console)
        return True
