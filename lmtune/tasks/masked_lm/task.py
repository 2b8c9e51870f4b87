"""Masked-language-model training on raw text: continued pre-training of an encoder (BERT, MiniLM, RoBERTa ...).

Data: plain-text files (one document per file, paragraph or line: ``data.document_split``) or a text column of
any table (one document per row), read as causal_lm reads them (:mod:`lmtune.data.documents`).
Documents are tokenised without special tokens and cut into rows of ``data.max_length`` tokens framed as the
tokenizer frames one text (``[CLS] ... [SEP]``), a row never ending inside a word unless the word alone is
longer than a row. With packing (the default) documents follow each other in a row, separated by the
tokenizer's separator (``[SEP]``), and attend to each other as in BERT's pre-training and transformers'
``run_mlm.py``; ``data.packing: false`` starts every document on a new row.

Each row is masked when it is fetched (:mod:`lmtune.tasks.masked_lm.masking`): ``data.mlm_probability`` of its
tokens, whole words (``data.whole_word_mask``), 80% [MASK] / 10% random / 10% kept, from a seed, the epoch and the
row index only, so a resumed run is the uninterrupted one. Held-out rows keep one seeded masking, so the report's
starting model and tuned model are scored on the same positions: masked-token loss, perplexity (its exp) and
top-1 accuracy.

The saved folder is an ``AutoModelForMaskedLM``; a classification or token_classification run whose ``model:`` is
that folder loads its encoder and starts a new head (transformers drops the masked-LM head).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForMaskedLM
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from lmtune.config import Config
from lmtune.config.tasks import TaskInfo
from lmtune.data.documents import SplitDocuments, split_documents
from lmtune.data.features import (
    IGNORE_INDEX,
    PaddingCollator,
    cached_features,
    digest_records,
    features_cache_key,
)
from lmtune.errors import ConfigError, ModelError
from lmtune.evaluate.report import Report
from lmtune.models.loading import load_pretrained
from lmtune.models.registry import load_padded_tokenizer, model_path_of
from lmtune.models.target_logits import scored_logits
from lmtune.models.vocabulary import (
    extend_vocabulary,
    grow_embeddings,
    input_embedding_paths,
    pretokenized_words,
)
from lmtune.tasks.base import Task, TaskData, encoder_inputs
from lmtune.tasks.masked_lm.info import INFO
from lmtune.tasks.masked_lm.inspect import masked_lm_details, masked_lm_facts
from lmtune.tasks.masked_lm.masking import EVAL_STREAMS, NO_WORD, TRAIN_STREAM, MaskedRows, Masker

log = logging.getLogger(__name__)

# Fillers per mask that a saved model's predictor returns unless told otherwise.
TOP_K = 5
# Documents tokenised per tokenizer call (bounds the encodings held at once).
TOKENIZE_BATCH = 1000
ENCODER_HINT = ("masked_lm continues the pre-training of an encoder with a mask token (BERT, MiniLM: model: minilm, "
                "RoBERTa, DistilBERT ...); a decoder (Llama, GPT-2, SmolLM2) learns from raw text with task: causal_lm")


class MaskedLMTask(Task):
    """Masked-token prediction on documents cut into rows, BERT's way."""

    info: ClassVar[TaskInfo] = INFO
    model_class: ClassVar[Any] = AutoModelForMaskedLM
    # peft has no masked-LM task type: a generic PeftModel passes every input through.
    peft_task_type: ClassVar[str | None] = None

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_cfg = config.data
        self.tokenizer: Any = None  # set by load_tokenizer / prepare
        self._docs: dict[str, SplitDocuments] = {}
        self.new_modules: list[str] = []
        # Words data.extend_vocabulary added to the tokenizer, and the tokenizer it added them to.
        self.added_tokens: list[str] = []
        self._extended: Any = None
        # lmtune.json of a trained model being evaluated (Run.evaluate): its tokenizer is extended already.
        self.saved_meta: dict[str, Any] | None = None

    @property
    def packing(self) -> bool:
        """On unless ``data.packing: false`` (documents share rows; attention spans the row)."""
        return self.info.packing_default if self.data_cfg.packing is None else self.data_cfg.packing

    # ------------------------------------------------------------------------------ model source
    def model_path(self) -> Path | None:
        """The configured encoder's folder."""
        return model_path_of(self.config.model)

    def load_tokenizer(self, model_path: Path | None) -> Any:
        """The encoder's tokenizer; a ModelError, before any data is read, for a model without a masked-LM head
        (a decoder, an encoder-decoder) or a tokenizer without a mask token."""
        assert model_path is not None
        check_encoder(model_path, trust_remote_code=self.config.model.trust_remote_code)
        tok = load_padded_tokenizer(model_path, trust_remote_code=self.config.model.trust_remote_code)
        if tok.mask_token_id is None:
            raise ModelError("the tokenizer has no mask token, so no token can be hidden from the model",
                             file=model_path, hint=ENCODER_HINT)
        self.tokenizer = tok
        return tok

    # ------------------------------------------------------------------------------ data
    def documents(self, split: str) -> list[str]:
        """The documents of ``split`` after reading, de-duplication and splitting (read once)."""
        if not self._docs:
            self._docs = split_documents(self.data_cfg)
        return self._docs[split][0] if split in self._docs else []

    def load_model_meta(self, meta: dict[str, Any]) -> None:
        """A saved model is evaluated: its tokenizer already holds the words data.extend_vocabulary added (and
        its embeddings no more rows), so nothing is added again."""
        self.saved_meta = meta

    def extend_vocabulary(self, tokenizer: Any) -> list[str]:
        """``data.extend_vocabulary``: add the most frequent words of the training documents (seen twice or more,
        words as the tokenizer's normaliser and pre-tokenizer cut them: each CJK character for BERT) that the
        tokenizer reads as nothing but its unknown token; returns them. Once per tokenizer, and never for a saved
        model being evaluated."""
        limit = self.data_cfg.extend_vocabulary
        if not limit or self.saved_meta is not None or self._extended is tokenizer:
            return self.added_tokens
        counts = Counter(pretokenized_words(tokenizer, self.documents("train")))
        self.added_tokens = extend_vocabulary(tokenizer, counts, limit)
        self._extended = tokenizer
        return self.added_tokens

    def new_token_ids(self) -> list[int]:
        """Ids of the words added to the vocabulary (LoRA trains their embedding rows, and so the tied output rows,
        as peft trainable tokens)."""
        if not self.added_tokens or self.tokenizer is None:
            return []
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(self.added_tokens)]

    def masker(self, tokenizer: Any) -> Masker:
        """The masking the config asks for, with this tokenizer's ids."""
        d = self.data_cfg
        return Masker(probability=d.mlm_probability, mask_id=int(tokenizer.mask_token_id), vocab_size=len(tokenizer),
                      special_ids=frozenset(int(i) for i in tokenizer.all_special_ids),
                      whole_words=d.whole_word_mask and bool(getattr(tokenizer, "is_fast", False)))

    def prepare(self, tokenizer: Any) -> TaskData:
        """Tokenise every split's documents into rows (cached); the rows are masked as they are fetched."""
        self.tokenizer = tokenizer  # what a saved model's evaluation hands over, as load_tokenizer would
        d = self.data_cfg
        if d.whole_word_mask and not getattr(tokenizer, "is_fast", False):
            log.warning("data.whole_word_mask: this tokenizer is not a fast one and gives no word boundaries; "
                        "sub-tokens are masked one by one")
        self.documents("train")
        # Before the masker, which draws random replacements from the whole vocabulary, new tokens included.
        added = self.extend_vocabulary(tokenizer)
        masker = self.masker(tokenizer)
        info: dict[str, Any] = {"masking": {"mlm_probability": d.mlm_probability, "whole_words": masker.whole_words,
                                            "mask_token": tokenizer.mask_token, "packing": self.packing}}
        if d.extend_vocabulary:
            info["added_tokens"] = len(added)
        splits: dict[str, Any] = {}
        lengths: dict[str, list[int]] = {}
        for split in ("train", "validation", "test"):
            if split not in self._docs or not self._docs[split][0]:
                continue
            docs, split_info = self._docs[split]
            rows, row_lengths, facts = self._features(docs, tokenizer)
            # Training rows: new masks every epoch from train.seed; held-out rows: one masking from data.split_seed.
            stream, seed = ((TRAIN_STREAM, self.config.train.seed) if split == "train"
                            else (EVAL_STREAMS[split], d.split_seed))
            splits[split] = MaskedRows(rows, row_lengths, masker, stream=stream, seed=seed, per_epoch=split == "train")
            lengths[split] = row_lengths
            info[split] = {**split_info, **facts}
        return TaskData(splits=splits, lengths=lengths, info=info,
                        extra={"documents": {s: v[0] for s, v in self._docs.items()}})

    def _features(self, docs: list[str], tokenizer: Any) -> tuple[Any, list[int], dict[str, Any]]:
        """Rows (``input_ids``, ``word_ids``) of ``docs``, their lengths and facts (cached by content and settings)."""
        d = self.data_cfg
        prefix, suffix = special_frame(tokenizer)
        capacity = d.max_length - len(prefix) - len(suffix)
        if capacity < 1:
            raise ConfigError(f"data.max_length {d.max_length} leaves no room for text between the "
                              f"{len(prefix) + len(suffix)} special tokens of a row", hint="raise data.max_length")
        separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        whole_words = d.whole_word_mask and bool(getattr(tokenizer, "is_fast", False))
        special = {int(i) for i in tokenizer.all_special_ids}
        settings = {"max_length": d.max_length, "packing": self.packing, "whole_words": whole_words,
                    "frame": [prefix, suffix], "separator": separator, "rows": "v1"}
        key = features_cache_key(self.info.name, digest_records(docs), tokenizer, settings)

        def build() -> dict[str, list[Any]]:
            rows = cut_rows(tokenised_words(tokenizer, docs, whole_words), capacity=capacity, prefix=prefix,
                            suffix=suffix, separator=separator if self.packing else None, special=special,
                            packing=self.packing)
            unk = tokenizer.unk_token_id
            return {
                "input_ids": [r["input_ids"] for r in rows],
                "word_ids": [r["word_ids"] for r in rows],
                "documents": [r["documents"] for r in rows],
                "unknown": [sum(t == unk for t in r["input_ids"]) if unk is not None else 0 for r in rows],
                "words": [len({w for w in r["word_ids"] if w != NO_WORD}) for r in rows],
                "length": [len(r["input_ids"]) for r in rows],
            }

        ds, hit = cached_features(key, build, use_cache=d.cache)
        if hit:
            log.info("tokenised features read from cache (%s)", key[:12])
        plain = ds.with_format(None)
        row_lengths = [int(n) for n in plain["length"]]
        pieces = int(sum(plain["documents"]))
        facts = {
            "examples": len(docs),
            "documents": len(docs),
            "rows": len(ds),
            "tokens": int(sum(row_lengths)),
            "words": int(sum(plain["words"])),
            "unknown_tokens": int(sum(plain["unknown"])),
            # A document cut across rows loses context at the cut.
            "documents_split_across_rows": pieces - len(docs),
        }
        return plain.select_columns(["input_ids", "word_ids"]), row_lengths, facts

    # ------------------------------------------------------------------------------ model
    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The pretrained encoder with its masked-LM head (the checkpoint's, or a new one: MiniLM ships none)."""
        assert model_path is not None
        m = self.config.model
        model, loading = load_pretrained(
            AutoModelForMaskedLM, model_path, allow_pickle=m.allow_pickle,
            error="this model cannot be loaded as a masked language model", dtype=torch.float32,
            output_loading_info=True, trust_remote_code=m.trust_remote_code,
        )
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and self.data_cfg.max_length > positions:
            raise ConfigError(f"data.max_length {self.data_cfg.max_length} is larger than the model's {positions} "
                              "positions", hint=f"set --data.max_length {positions} or less")
        # Words added by data.extend_vocabulary: new input rows (the tied output rows with them) around the mean
        # embedding, the output bias at its mean.
        grow_embeddings(model, len(tokenizer))
        self.new_modules = new_modules(model, set(loading["missing_keys"]))
        if self.new_modules:
            log.info("new masked-LM head modules (not in the checkpoint): %s", ", ".join(self.new_modules))
        if m.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """Last-level names of the head's modules the checkpoint did not hold (BERT: ``transform``), where such a
        name picks out that module alone; the output projection, tied to the input embeddings, is never one. With
        words added to the vocabulary and method full or freeze, the input embeddings too (BERT:
        ``word_embeddings``, and the output projection tied to them): their new rows start from the mean and train
        at the head's rate, as token_classification's do. LoRA trains those rows as peft trainable tokens instead
        (:meth:`new_token_ids`): a ``modules_to_save`` copy of the embeddings would untie the output projection."""
        names: set[str] = set()
        every = [n for n, _ in model.named_modules()]
        paths = list(self.new_modules)
        if self.added_tokens and self.config.method.name in ("full", "freeze"):
            paths += input_embedding_paths(model)
        for path in paths:
            last = path.rsplit(".", 1)[-1]
            if any(last in other.split(".") and not (other == path or other.startswith(path + "."))
                   for other in every):
                log.warning("new module %s cannot be named alone (another module is called %s too): it trains "
                            "with the body's learning rate, and not at all with method lora or freeze", path, last)
                continue
            names.add(last)
        return names

    # ------------------------------------------------------------------------------ batches and loss
    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Masked rows padded to the longest of the batch (labels with -100), with an attention mask."""
        return PaddingCollator({"input_ids": tokenizer.pad_token_id, "labels": IGNORE_INDEX}, padding_side="right",
                               pad_to_multiple_of=8 if torch.cuda.is_available() else None)

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Chosen (masked) tokens."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token logits at every position (compared before and after saving)."""
        return model(**encoder_inputs(batch)).logits.float()  # (B, T, vocab)

    def _token_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy and top-1 hits at the chosen positions ((M,) each, M = chosen tokens of the batch), and
        the row of each."""
        chosen = batch["labels"] != IGNORE_INDEX  # (B, T)
        # The vocabulary projection runs on the chosen positions only (about 15% of the tokens), where the model's
        # output layer can be cut (lmtune.models.target_logits); otherwise the full logits are picked from.
        picked = scored_logits(model, chosen, lambda: model(**encoder_inputs(batch)).logits).float()  # (M, vocab)
        targets = batch["labels"][chosen]  # (M,)
        losses = F.cross_entropy(picked, targets, reduction="none")  # (M,)
        return losses, picked.argmax(-1) == targets, chosen.nonzero()[:, 0]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the chosen tokens of the micro-batch."""
        return self._token_losses(model, batch)[0].sum()

    def evaluate(self, model: Any, loader: Any, accelerator: Any, split: str, data: TaskData) -> dict[str, Any]:
        """Masked-token loss, perplexity and top-1 accuracy over the split's fixed masking, gathered across
        processes (per row, so the rows Accelerate repeats to even out the last batches are dropped)."""
        total = torch.zeros(3, dtype=torch.float64)  # (loss sum, chosen tokens, hits)
        for batch in loader:
            losses, hits, rows = self._token_losses(model, batch)
            per_row = torch.zeros(batch["labels"].shape[0], 3, dtype=torch.float64, device=losses.device)  # (B, 3)
            per_row.index_add_(0, rows, torch.stack([losses.double(), torch.ones_like(losses, dtype=torch.float64),
                                                     hits.double()], dim=1))  # (M, 3) summed into their rows
            total += accelerator.gather_for_metrics(per_row).sum(dim=0).cpu()
        count = float(total[1])
        loss = float(total[0]) / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": float(total[2]) / max(count, 1.0),
                "masked_tokens": int(count)}

    # ------------------------------------------------------------------------------ saving and report
    def save_model_extras(self, folder: Path, data: TaskData) -> dict[str, Any]:
        """What the predictor needs (the mask token, how many fillers) and the data settings."""
        d = self.data_cfg
        return {"max_length": d.max_length, "packing": self.packing, "mlm_probability": d.mlm_probability,
                "whole_word_mask": d.whole_word_mask, "text_column": d.text_column,
                "mask_token": self.tokenizer.mask_token, "top_k": TOP_K,
                **({"added_tokens": len(self.added_tokens)} if self.added_tokens else {})}

    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Masked-token accuracy and perplexity before and after, per split (the same masked positions)."""
        start = metrics.get("starting_point", {})
        rows = []
        for split in ("validation", "test"):
            if split in metrics:
                before = start.get(split, {})
                after = metrics[split]
                rows.append([split, before.get("accuracy"), after.get("accuracy"), before.get("perplexity"),
                             after.get("perplexity"), after.get("masked_tokens")])
        if rows:
            report.heading("Masked-token prediction", 3)
            report.table(["split", "accuracy, starting model", "accuracy, trained", "perplexity, starting model",
                          "perplexity, trained", "masked tokens"], rows)
            masking = data.info.get("masking", {})
            report.paragraph(
                f"{100 * self.data_cfg.mlm_probability:g}% of each held-out row's tokens"
                + (", whole words," if masking.get("whole_words") else ",")
                + " masked once with data.split_seed (80% mask token, 10% random, 10% kept): the starting model "
                "(the split reported first) and the trained model are scored on the same positions.")

    # ------------------------------------------------------------------------------ data inspect
    def inspect_facts(self, data: TaskData) -> dict[str, dict[str, Any]] | None:
        """Per split: documents, rows, tokens, words, unknown tokens, masked tokens (see :mod:`.inspect`); with words
        added by data.extend_vocabulary, the unknown-token share of the text before and after."""
        base = None
        if self.added_tokens:
            # The tokenizer as the model shipped it: what data.extend_vocabulary repaired.
            m = self.config.model
            base = load_padded_tokenizer(model_path_of(m), trust_remote_code=m.trust_remote_code)
        return masked_lm_facts(data, tokenizer=self.tokenizer, base_tokenizer=base)

    def inspect_details(self, data: TaskData, facts: dict[str, dict[str, Any]], *, examples: int = 3
                        ) -> dict[str, Any]:
        """The masking settings and vocabulary extension, suggestions and masked train rows as training sees them."""
        return masked_lm_details(data, facts, self.tokenizer, self.config, examples=examples,
                                 added_tokens=self.added_tokens)


# ------------------------------------------------------------------------------------------ helpers
def check_encoder(model_path: Path, *, trust_remote_code: bool = False) -> None:
    """A ModelError unless the folder's architecture has a masked-LM head in transformers (or, with remote code,
    maps ``AutoModelForMaskedLM``) and is not an encoder-decoder."""
    try:
        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model config: {exc}", file=model_path) from None
    remote = "AutoModelForMaskedLM" in (getattr(cfg, "auto_map", None) or {})
    if getattr(cfg, "is_encoder_decoder", False) or not (type(cfg) in MODEL_FOR_MASKED_LM_MAPPING or remote):
        kind = "an encoder-decoder" if getattr(cfg, "is_encoder_decoder", False) else "not an encoder"
        raise ModelError(f"a '{cfg.model_type}' model is {kind} with a masked-language-model head",
                         file=model_path, hint=ENCODER_HINT)


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one text (BERT: ``[CLS]`` and ``[SEP]``)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    framed = tokenizer("hello")["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return list(framed[:start]), list(framed[start + len(plain):])
    return [], []


def tokenised_words(tokenizer: Any, docs: list[str], whole_words: bool) -> Iterator[list[list[int]]]:
    """Each document as its words, each word its token ids (a word per token when words are not known)."""
    for start in range(0, len(docs), TOKENIZE_BATCH):
        enc = tokenizer(docs[start:start + TOKENIZE_BATCH], add_special_tokens=False, verbose=False)
        for i, ids in enumerate(enc["input_ids"]):
            if not whole_words:
                yield [[t] for t in ids]
                continue
            words: list[list[int]] = []
            previous: int | None = None
            for t, w in zip(ids, enc.word_ids(i), strict=True):
                if w is None or w != previous or not words:
                    words.append([])
                words[-1].append(t)
                previous = w
            yield words


def cut_rows(docs: Iterator[list[list[int]]] | list[list[list[int]]], *, capacity: int, prefix: list[int],
             suffix: list[int], separator: int | None, special: set[int], packing: bool) -> list[dict[str, Any]]:
    """Rows ``{input_ids, word_ids, documents}`` of at most ``capacity`` text tokens between ``prefix`` and
    ``suffix``: documents (lists of words, each a list of token ids) one after the other, a new row where the next
    word would not fit (a word longer than a row is cut), each document on its own rows unless ``packing`` (then
    followed by ``separator``, when there is one and room for it). ``word_ids`` numbers the row's words from 0;
    special tokens (``special``: separator, [UNK] ...) belong to none (:data:`NO_WORD`). ``documents`` counts the
    pieces of documents a row holds."""
    rows: list[dict[str, Any]] = []
    ids: list[int] = []
    words: list[int] = []
    pieces = next_word = 0
    piece_open = False  # the current document already has tokens in the current row

    def flush() -> None:
        nonlocal pieces, next_word, piece_open
        while ids and ids[-1] == separator:  # the frame's end token closes the row
            ids.pop()
            words.pop()
        if ids:
            rows.append({"input_ids": prefix + ids + suffix,
                         "word_ids": [NO_WORD] * len(prefix) + words + [NO_WORD] * len(suffix), "documents": pieces})
        ids.clear()
        words.clear()
        pieces = next_word = 0
        piece_open = False

    for doc in docs:
        piece_open = False
        for word in doc:
            for start in range(0, len(word), capacity):
                piece = word[start:start + capacity]
                if len(ids) + len(piece) > capacity:
                    flush()
                if not piece_open:
                    pieces += 1
                    piece_open = True
                ids.extend(piece)
                words.extend(NO_WORD if t in special else next_word for t in piece)
                next_word += 1
        if not packing:
            flush()
        elif separator is not None:
            if len(ids) + 1 > capacity:
                flush()
            else:
                ids.append(separator)
                words.append(NO_WORD)
        piece_open = False
    flush()
    return rows


def new_modules(model: torch.nn.Module, missing: set[str]) -> list[str]:
    """The largest modules every parameter of which the checkpoint lacked (BERT from a bare encoder:
    ``cls.predictions.transform``). Parameters shared with the body (the output projection tied to the input
    embeddings) keep their module out."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if params and all(p in missing for p in params):
            found.append(name)
    return found
