"""The config schema: typed, validated, documented settings for a run.

YAML holds data only; this module gives it meaning. Every field carries its
help text (``lmtune config --help`` style listings are generated from it), and
an impossible combination fails here, at load time, with a sentence that names
the keys, before any model or data is touched.

Overrides from the command line use dotted keys (``--train.epochs 1``) and are
applied to the raw mapping before validation, so they get the same checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmtune.config.mix import MixSource, check_oversampling, normalise_train, settle_train
from lmtune.config.tasks import (
    BASELINE_NAMES,
    NEURAL_BASELINES,
    TASK_INFOS,
    TaskInfo,
    default_task,
    task_names,
)
from lmtune.config.tune import TuneConfig, check_tune_space

# Words that make a metric one where smaller is better (losses, error rates, perplexity), matched against
# the parts of its name split at "_" (so "eval_loss" and "hamming_loss" are, "has_answer_f1" is not).
LOWER_IS_BETTER_WORDS = frozenset({"loss", "perplexity", "error", "hamming", "wer", "cer", "ece", "mse", "rmse",
                                   "mae"})


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better; every other metric is maximised."""
    return any(part in LOWER_IS_BETTER_WORDS for part in metric.lower().split("_"))


# Method-aware learning-rate defaults (train.learning_rate / train.head_learning_rate when unset): the
# values every shipped example had to set by hand. A LoRA run at the full-tuning rate trained 4-10x too
# slowly (issue 13: 18% vs 82% right on a held-out intent task).
FULL_LEARNING_RATE = 5e-5
LORA_LEARNING_RATE = 2e-4
SCRATCH_LEARNING_RATE = 1e-3
NEW_HEAD_LEARNING_RATE = 1e-3



# A numeric precision: train.precision, and `--precision` where a saved model generates (predict, chat, serve).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

class _Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_huge_integers(cls, value: Any) -> Any:
        # A 5000-digit number would validate as a count, then break whatever prints or uses it.
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise ValueError("number too large")
        return value


class ModelConfig(_Section):
    """Which pretrained model to start from."""

    name: str = Field(
        "minilm",
        description="A bundled model name (see `lmtune models`), a local model folder "
        "(config.json + safetensors weights + tokenizer), or a Hugging Face Hub id `org/name` (read from the "
        "Hugging Face cache; downloaded only with `download: true`). Told apart in that order: a bundled name, "
        "then an existing folder, then `org/name`.",
    )
    revision: str | None = Field(
        None,
        description="With a Hub id: the branch, tag or commit to use (default: the default branch). The commit it "
        "resolves to is recorded in the run folder.",
    )
    download: bool = Field(
        False,
        description="With a Hub id: download it (safetensors weights, JSON and tokenizer files only) into the "
        "Hugging Face cache when it is missing or behind. Off: the id resolves from the cache only. "
        "HF_HUB_OFFLINE=1 set by you wins over it.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model folder. Off unless you trust its source."
    )
    allow_pickle: bool = Field(
        False,
        description="Allow loading pickled `.bin` weights. Pickle can run arbitrary code: only for files you made.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30% slower."
    )
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained",
        description="`pretrained`: start from the weights of `name`. `scratch`: a new randomly initialised "
        "decoder of the size below (causal_lm only); `name` then only lends its tokenizer, unless "
        "`tokenizer` says otherwise.",
    )
    architecture: Literal["llama", "gpt2"] = Field("llama", description="With init: scratch, the model family.")
    layers: int = Field(4, ge=1, description="With init: scratch, transformer blocks.")
    hidden_size: int = Field(256, ge=8, description="With init: scratch, model width.")
    heads: int = Field(4, ge=1, description="With init: scratch, attention heads (hidden_size must divide by it).")
    intermediate_size: int | None = Field(
        None, ge=8, description="With init: scratch, MLP width (default: 4 x hidden_size for gpt2, 8/3 x for llama)."
    )
    context_length: int = Field(512, ge=8, description="With init: scratch, positions the model supports.")
    tokenizer: str | None = Field(
        None,
        description="With init: scratch, where the tokenizer comes from: a bundled model name or folder "
        "(default: `name`), or `train` to train a byte-level BPE tokenizer on the training text.",
    )
    vocab_size: int = Field(8000, ge=300, description="With tokenizer: train, the vocabulary size.")
    chat_template: str | None = Field(
        None,
        description="Chat tasks: the chat template to render conversations with, replacing the model's own (and "
        "saved with the tuned model): `chatml-tools` (ChatML with tool calling in the Hermes/Qwen2.5 style: "
        "<tools> in the system turn, <tool_call>{...}</tool_call> in answers; for ChatML models such as "
        "SmolLM2), a Jinja template, or the path of a file holding one. Default: the model's own.",
    )
    # ---- seq2seq
    seq2seq: Literal["auto", "encoder_decoder", "decoder"] = Field(
        "auto",
        description="seq2seq: the route. `encoder_decoder`: an encoder-decoder model (T5, BART, ...); an "
        "encoder-only model (BERT, e.g. `minilm`) is warm-started into one (EncoderDecoderModel, encoder and "
        "decoder both from `name`, new cross-attention). `decoder`: a decoder-only model answers an "
        "instruction prompt (data.prompt_template) in its chat template. `auto`: encoder_decoder for "
        "encoder-decoder and encoder-only models, decoder for causal LMs.",
    )

    @model_validator(mode="after")
    def _check_scratch(self) -> ModelConfig:
        if self.init == "scratch" and self.hidden_size % self.heads:
            raise ValueError(f"model.hidden_size {self.hidden_size} must be divisible by model.heads {self.heads}")
        return self


# The personal-data types `data.pii` looks for (presidio's names; lmtune/data/pii.py has a recognizer for each).
PII_ENTITIES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "URL",
                "STREET_ADDRESS", "CRYPTO", "US_SSN", "UK_NINO", "UK_NHS", "IT_FISCAL_CODE", "ES_NIF", "PL_PESEL",
                "FI_PERSONAL_IDENTITY_CODE", "IN_AADHAAR")


class DataConfig(_Section):
    """Where the data is, which columns mean what, and how it is split and tokenised."""

    train: str = Field(
        ...,
        description="Training data: a file (csv, tsv, json, jsonl, parquet, txt), a folder saved by "
        "`datasets.save_to_disk`, or a bundled data set such as `bundled:rotten_tomatoes`. Or a list of sources "
        "mixed by weight: `[{path: a.jsonl, weight: 3}, {path: b.csv, weight: 1, rename: {review: text}}]` "
        "(a plain string: weight 1; see data.mix_stopping); it is kept as `train_mix`, `train` becoming its name.",
    )
    train_mix: list[MixSource] | None = Field(
        None, min_length=1, description="The sources of a mixed data.train (set by giving data.train a list).",
    )
    mix_stopping: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted",
        description="Mixed data.train: how long an epoch is. `first_exhausted`: until the source with the least "
        "data for its weight is used up (each of its examples once; the others sampled without repetition); "
        "`all_exhausted`: until every source is used up (sources short for their weight repeated; needs "
        "data.deduplicate: false and, unless streaming, data.validation and data.test files, so no copy is "
        "both trained on and evaluated). Seeded by data.split_seed.",
    )
    validation: str | None = Field(
        None, description="Validation data; when absent, a stratified split of `train` of size `validation_size`."
    )
    test: str | None = Field(
        None, description="Test data; when absent, a stratified split of `train` of size `test_size`."
    )
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "text", "hf", "conll"] = Field(
        "auto", description="File format; `auto` decides from the file extension (.conll/.bio/.iob: `conll`, "
        "one token per line, blank lines between sentences)."
    )
    encoding: str = Field("utf-8", description="Text encoding of csv/tsv/json/jsonl/txt files.")
    text_column: str = Field("text", description="Column holding the input text.")
    text_pair_column: str | None = Field(
        None, description="Optional second text column (sentence pairs: NLI, paraphrase, QA relevance)."
    )
    label_column: str = Field("label", description="Column holding the label (string or integer).")
    multi_label: bool = Field(
        False, description="Each example may carry several labels (a list column, or see `label_delimiter`)."
    )
    label_delimiter: str | None = Field(
        None, description="Split a string label on this delimiter into several labels (implies multi_label)."
    )
    no_relation_label: str | None = Field(
        None, description="relation_extraction: the label meaning no relation (default: no_relation for documents, "
        "else the first of no_relation/Other/NA/None in the labels); left out of the F1 scores."
    )
    labels: list[str] | None = Field(
        None,
        description="The label set in a fixed order. Default: sorted labels seen in training.",
    )
    validation_size: float = Field(
        0.1, gt=0, description="Fraction of `train` held out for validation (with `streaming`: a count of examples)."
    )
    test_size: float = Field(
        0.1, gt=0, description="Fraction of `train` held out for test (with `streaming`: a count of examples)."
    )
    split_seed: int = Field(42, description="Seed of the stratified split.")
    max_length: int = Field(128, ge=8, description="Tokens per example; longer inputs are truncated (counted).")
    empty_text: Literal["skip", "error"] = Field(
        "skip",
        description="A row whose text is empty or missing: `skip` it (count and line numbers are logged) "
        "or stop with an `error`.",
    )
    deduplicate: bool = Field(
        True,
        description="Keep one row per distinct text (the first; rows whose label disagrees are counted), and drop "
        "validation/test rows whose text also occurs in train (leakage).",
    )
    max_samples: int | None = Field(
        None, ge=1, description="Use at most this many examples per split (quick experiments)."
    )
    cache: bool = Field(True, description="Cache tokenised data on disk, keyed by a hash of data and settings.")
    # ---- generative tasks (causal_lm, sft)
    chat_format: Literal["auto", "alpaca", "sharegpt", "openai"] = Field(
        "auto",
        description="sft: record layout. `alpaca`: instruction/input/output; `sharegpt`: conversations of "
        "{from, value}; `openai`: messages of {role, content}. `auto` detects it from the first records.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="sft: your names for the standard fields, e.g. {instruction: question, output: answer} or "
        "{messages: dialog}. Keys: messages, conversations, instruction, input, output, system. Preference "
        "tasks (dpo, orpo, simpo, reward, kto): prompt, chosen, rejected, completion, label, system; grpo: prompt.",
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="sft: which tokens carry loss: every assistant turn (default), only the final one, or all tokens.",
    )
    too_long: Literal["skip", "truncate_left"] = Field(
        "skip",
        description="sft: an example longer than max_length is skipped (counted), or its prompt is cut from the "
        "left so the response still fits (examples whose response alone does not fit are skipped).",
    )
    special_tokens_in_content: bool = Field(
        False,
        description="sft: message content that spells the chat template's control tokens (`<|im_end|>`, "
        "`<|im_start|>` ...) is tokenised as plain text, as at inference, so it cannot forge a turn; true trains "
        "on such text as the control tokens themselves.",
    )
    packing: bool | None = Field(
        None,
        description="Pack several examples into each row of max_length tokens, with no attention across "
        "examples (per-example position ids). Default: on for causal_lm and masked_lm (whose packed rows "
        "attend across documents, as BERT's did), off for sft.",
    )
    document_split: Literal["file", "paragraph", "line"] = Field(
        "paragraph",
        description="causal_lm with a plain-text file: one document per file, per blank-line-separated "
        "paragraph, or per line. Tabular files: one document per row of text_column.",
    )
    # ---- streaming (data larger than memory; causal_lm and sft)
    streaming: bool = Field(
        False,
        description="Read `train` as a stream (datasets streaming) instead of loading it: a file, a glob "
        "(`data/train-*.parquet`) or a folder of Parquet, JSON Lines (.gz too), CSV or text shards, tokenised and "
        "packed as training goes; memory stays flat however large the data. Needs `train.max_steps`; "
        "validation/test come from their own files or are the first `validation_size`/`test_size` examples "
        "of the stream (counts).",
    )
    shuffle_buffer: int = Field(
        10_000, ge=0, description="streaming: examples held in the shuffling buffer (with the shard order "
        "shuffled too, per epoch from train.seed); 0 reads in file order.",
    )
    open_rows: int = Field(
        32, ge=1, description="streaming sft with packing: rows kept open for first-fit placement of whole "
        "conversations (more: fuller rows).",
    )
    # ---- personal data (lmtune/data/pii.py)
    pii: Literal["off", "scan", "redact", "mask", "drop", "error"] = Field(
        "off", description="Personal data in every split's text, found before tokenisation (`lmtune data scan` "
        "lists it): `scan` records it (run folder pii.json, report); `redact` replaces each with `<TYPE>`; `mask` "
        "masks it character for character (offsets stay valid); `drop` leaves out its rows; `error` stops at the "
        "first, naming file:line. A model trained with redact or mask applies it to `predict` inputs too.",
    )
    pii_entities: list[str] | None = Field(
        None, description="The personal-data types data.pii looks for (default: all): " + ", ".join(PII_ENTITIES)
        + ".",
    )
    pii_score: float = Field(
        0.4, ge=0, le=1, description="data.pii: the least recognizer score that counts as a finding (checksummed "
        "numbers score 1.0, a phone number 0.4, a lone first name 0.6).",
    )
    pii_ner: str | None = Field(
        None, description="data.pii and `lmtune data scan`: also find person names with this token-classification "
        "model (an lmtune NER run folder, its model/ folder, or any such transformers folder on disk): names the "
        "built-in recognizer misses (outside its first-name lists, lower-cased) where the model knows them.",
    )
    pii_ner_labels: list[str] | None = Field(
        None, description="data.pii_ner: the model's entity labels (without B-/I-) that are person names "
        "(default: whichever of PER, PERSON, NAME the model has, in any case).",
    )

    @field_validator("pii_entities")
    @classmethod
    def _check_pii_entities(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            unknown = [e for e in value if e not in PII_ENTITIES]
            if unknown or not value:
                raise ValueError(f"unknown type(s) {', '.join(unknown) or '(none given)'}; "
                                 f"choose from {', '.join(PII_ENTITIES)}")
        return value

    def sources(self) -> list[str]:
        """Every source the config reads, once: data.train (each source of a mix), data.validation, data.test."""
        train = [s.path for s in self.train_mix] if self.train_mix is not None else [self.train]
        return list(dict.fromkeys(s for s in (*train, self.validation, self.test) if s))

    def source_format(self, source: str) -> str:
        """The format ``source`` is read as: its own in a mix (``format``), else data.format."""
        return next((s.format for s in self.train_mix or [] if s.path == source and s.format), self.format)

    @model_validator(mode="before")
    @classmethod
    def _train_list_to_mix(cls, value: Any) -> Any:
        return normalise_train(value)

    @model_validator(mode="after")
    def _check_mix(self) -> DataConfig:
        # Written past validation: assigning would re-run every validator (validate_assignment).
        self.__dict__["train"], self.__dict__["train_mix"] = settle_train(self.train, self.train_mix)
        if self.train_mix is not None and self.mix_stopping == "all_exhausted":
            check_oversampling(self)
        return self

    @model_validator(mode="after")
    def _check_pii_streaming(self) -> DataConfig:
        if self.pii != "off" and self.streaming:
            raise ValueError(f"data.pii: {self.pii} is not applied to streamed data (data.streaming: true); "
                             "scan the files with `lmtune data scan`, or read them without streaming")
        return self

    @model_validator(mode="after")
    def _check_streaming_sizes(self) -> DataConfig:
        check_hold_out_sizes(self)
        return self

    # ---- question_answering
    question_column: str = Field("question", description="question_answering: column holding the question.")
    context_column: str = Field("context", description="question_answering: column holding the context passage.")
    answers_column: str = Field(
        "answers", description="question_answering: column of answers: {text: [...], answer_start: [...]} (as in "
        "SQuAD on the HF hub), a list of {text, answer_start}, or JSON text of either. SQuAD-format JSON files "
        "({data: [{paragraphs: [{context, qas}]}]}) are recognised without column settings.",
    )
    answer_text_column: str = Field(
        "answer_text", description="question_answering: used when there is no answers column: the answer text "
        "(a string or a list).")
    answer_start_column: str = Field(
        "answer_start", description="question_answering: with answer_text_column, the answer's character offset "
        "in the context (missing: the first occurrence of the text is used).")
    id_column: str = Field("id", description="question_answering: optional question id column.")
    allow_unanswerable: bool = Field(
        False, description="question_answering: keep questions without an answer (SQuAD 2.0 `is_impossible`, or "
        "no answers): the model learns to point at [CLS] and predicts an empty answer.",
    )
    doc_stride: int | None = Field(
        None, ge=0, description="question_answering: tokens of overlap between the windows a long context is cut "
        "into (default: a quarter of max_length).",
    )
    max_answer_length: int = Field(30, ge=1, description="question_answering: longest answer predicted, in tokens.")
    n_best_size: int = Field(20, ge=1, description="question_answering: start/end candidates paired per window.")
    null_score_diff_threshold: float | Literal["auto"] = Field(
        0.0, description="question_answering with allow_unanswerable: answer empty when the [CLS] score exceeds "
        "the best span's by more than this; `auto`: the value that maximises F1 on validation (final evaluation).",
    )
    # ---- seq2seq
    source_column: str = Field("source", description="seq2seq: column holding the input text (document, sentence).")
    target_column: str = Field("target", description="seq2seq: column holding the output text (summary, translation).")
    seq2seq_task: Literal["summarization", "translation"] = Field(
        "summarization",
        description="seq2seq: the kind of job; it picks the metrics (ROUGE-1/2/L/Lsum for summarization, "
        "sacreBLEU and chrF for translation) and the default prompt of the decoder route.",
    )
    source_language: str | None = Field(None, description="seq2seq translation: the source language (e.g. English).")
    target_language: str | None = Field(None, description="seq2seq translation: the target language (e.g. Italian).")
    prompt_template: str | None = Field(
        None,
        description="seq2seq, decoder route: the user message, with `{source}` (and `{source_language}`, "
        "`{target_language}`). Default: `Summarize:\\n{source}` or "
        "`Translate from {source_language} to {target_language}:\\n{source}`.",
    )
    system_prompt: str | None = Field(None, description="seq2seq, decoder route: an optional system message.")
    max_target_length: int = Field(
        128, ge=4, description="seq2seq, encoder-decoder route: tokens per target; longer ones are truncated (counted)."
    )

    # ---- token_classification
    tokens_column: str = Field(
        "tokens", description="token_classification: column holding each sentence's words (a list, or text "
        "split on whitespace).")
    tags_column: str = Field(
        "tags", description="token_classification: column holding one tag per word (BIO/BIOES: B-PER, I-PER, O).")
    spans_column: str = Field(
        "spans", description="token_classification: with `text_column` instead of tokens and tags, the entities "
        "as character spans [{start, end, label}] (end exclusive).")
    conll_token_column: int = Field(0, description="token_classification, CoNLL files: the column of the words.")
    conll_tag_column: int = Field(-1, description="token_classification, CoNLL files: the column of the tags "
                                  "(-1: the last).")
    tag_scheme: Literal["auto", "bio", "bioes"] = Field(
        "auto", description="token_classification: the scheme the model is trained in. Each file's own scheme is "
        "detected (BIOES if it has E-/S- tags) and converted; `auto`: that of the training file.")
    entity_types: list[str] | None = Field(
        None, description="token_classification: the entity types in a fixed order (default: those of the "
        "training data, sorted).")
    word_split: Literal["auto", "whitespace", "punctuation", "chars"] = Field(
        "auto", description="token_classification: how raw text is cut into words (text + spans data, and "
        "prediction on raw text): on whitespace, words and punctuation apart, or every character (Chinese). "
        "`auto`: guessed from the training words; saved with the model.")
    label_all_subtokens: bool = Field(
        False, description="token_classification: give every sub-token of a word its label (B- becomes I- after "
        "the first) instead of the first sub-token only. Evaluation reads first sub-tokens either way.")
    extend_vocabulary: int = Field(
        0, ge=0, description="token_classification and masked_lm: add up to this many of the most frequent training "
        "words the tokenizer can only read as its unknown token to its vocabulary (new embeddings start at the mean "
        "one; saved with the model). MiniLM reads about 60% of Chinese characters as [UNK]; masked_lm learns to "
        "predict them, and a tagging run started from its model finds them known.")
    # ---- masked_lm
    mlm_probability: float = Field(
        0.15, gt=0, lt=1, description="masked_lm: share of each row's tokens the model learns to predict (BERT's "
        "0.15); of those, 80% are replaced by the mask token, 10% by a random token and 10% left as they are.")
    whole_word_mask: bool = Field(
        True, description="masked_lm: choose whole words, every sub-token of a word together (words from the fast "
        "tokenizer's word_ids; each CJK character is a word); false: sub-tokens are chosen one by one.")

    @model_validator(mode="after")
    def _check_sizes(self) -> DataConfig:
        if self.streaming:
            return self  # counts, not fractions: _check_streaming_sizes
        if self.validation is None and self.test is None and self.validation_size + self.test_size >= 0.9:
            raise ValueError(
                "data.validation_size + data.test_size must leave at least 10% of data.train for training"
            )
        if self.label_delimiter is not None and not self.multi_label:
            self.multi_label = True
        return self


class MethodConfig(_Section):
    """How the weights are trained: all of them, some of them, or low-rank adapters."""

    name: Literal["full", "freeze", "lora", "qlora"] = Field(
        "full",
        description="`full`: train every weight. `freeze`: train the task head (and the last "
        "`unfrozen_layers` blocks) only. `lora`: train low-rank adapters (peft) and the head. "
        "`qlora`: LoRA on a 4-bit quantised base model (bitsandbytes; needs a CUDA GPU).",
    )
    unfrozen_layers: int = Field(0, ge=0, description="With `freeze`: also train this many top transformer blocks.")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [query, value]) or `all-linear`."
    )
    merge: bool = Field(True, description="Merge LoRA weights into `model/` at the end (the adapter is kept too).")
    # ---- LoRA variants (peft LoraConfig; lmtune/models/methods.py)
    use_dora: bool = Field(False, description="DoRA: split each adapted weight into a magnitude vector (trained) "
                           "and a direction that LoRA updates (slower per step; merges like LoRA).")
    use_rslora: bool = Field(False, description="rsLoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r "
                             "(keeps the update's size stable at high ranks).")
    init_lora_weights: str = Field(
        "default", description="How adapters start: `default` (A random, B zero: the model starts unchanged), "
        "`gaussian`, `pissa` (A, B from the weight's top singular vectors, exact SVD), `pissa_niter_N` (randomised "
        "SVD with N iterations: fast on big models), `olora` (QR of the weight), `loftq` (LoftQ: adapters that "
        "absorb the 4-bit quantisation error; needs a CUDA GPU with bitsandbytes). PiSSA and OLoRA move the "
        "adapter's start out of the base weights; the saved adapter is converted back to a plain LoRA (of rank "
        "2r) on the original base model.",
    )
    loftq_bits: Literal[4, 8] = Field(4, description="With `init_lora_weights: loftq`: bits of the quantisation.")
    loftq_iter: int = Field(1, ge=1, le=100, description="With `init_lora_weights: loftq`: alternating iterations.")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Per-module ranks: {regex on the module name: rank}, e.g. {'layer\\.0\\..*': "
        "16}; unmatched modules keep `r`. A pattern that matches no adapted module is an error.")
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-module alphas, like `rank_pattern`; unmatched modules keep `alpha`.")
    loraplus_lr_ratio: float | None = Field(
        None, ge=1, le=1e4, description="LoRA+: the B matrices learn at train.learning_rate times this "
        "(the paper suggests 16); A and the head keep their rates. null: off.")

    @model_validator(mode="after")
    def _check_lora_variants(self) -> MethodConfig:
        init = self.init_lora_weights
        if init not in LORA_INITS and not PISSA_NITER.fullmatch(init):
            raise ValueError(f"method.init_lora_weights '{init}' is not one of {', '.join(LORA_INITS)} or "
                             "pissa_niter_N (N a whole number)")
        for key_name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ValueError(f"method.{key_name} '{key}' is not a regular expression ({exc})") from None
                if value <= 0:
                    raise ValueError(f"method.{key_name} '{key}': {value} must be positive")
        defaults = MethodConfig.model_fields
        set_keys = [k for k in LORA_VARIANT_KEYS
                    if getattr(self, k) != defaults[k].get_default(call_default_factory=True)]
        if self.name not in ("lora", "qlora") and set_keys:
            raise ValueError(f"method.{set_keys[0]} is a LoRA setting; method.name is {self.name}: "
                             "use method.name lora (or qlora)")
        moves_base = init.startswith("pissa") or init == "olora"
        if self.name == "qlora" and (moves_base or init == "loftq"):
            raise ValueError(f"method.init_lora_weights {init} computes the adapter from full-precision weights; "
                             "with method.name qlora they are already 4-bit: use method.name lora")
        if moves_base and self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            raise ValueError(f"method.init_lora_weights {init} with method.use_rslora and method.rank_pattern/"
                             "alpha_pattern: peft cannot convert such an adapter back to the original base model "
                             "(needed to save it); drop use_rslora or the patterns")
        if init == "loftq" and not self.merge:
            raise ValueError("method.init_lora_weights loftq replaces the base weights by their quantised round trip, "
                             "so its adapter alone does not fit the original base model: set method.merge true")
        return self


LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")
# Settings that only mean something for method lora/qlora (refused with full or freeze when changed).
LORA_VARIANT_KEYS = ("use_dora", "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern",
                     "loraplus_lr_ratio")


class GenerationConfig(_Section):
    """How text is generated: in evaluation of generative tasks, `lmtune predict` and `lmtune chat`."""

    max_new_tokens: int = Field(128, ge=1, description="Most tokens generated per answer.")
    do_sample: bool = Field(False, description="Sample (temperature, top_p) instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on repeated tokens (1.0: none).")
    stop: list[str] = Field(default_factory=list, description="Strings that end an answer (not included in it).")
    batch_size: int = Field(16, ge=1, description="Prompts generated together (left-padded, with KV cache).")
    eval_examples: int | None = Field(
        200, ge=1, description="Examples of each evaluation split scored by generation (null: all)."
    )
    eval_during_training: bool = Field(
        False, description="Also generate and score at every validation during training (slower); "
        "the final evaluation always does.",
    )
    seed: int = Field(0, description="Seed for sampling.")
    # ---- seq2seq (also used by sft/causal_lm generation)
    num_beams: int = Field(1, ge=1, description="Beam search width (1: greedy or sampling).")
    length_penalty: float = Field(
        1.0, description="With beam search: exponent on the length in a beam's score (> 1 favours longer outputs)."
    )
    no_repeat_ngram_size: int = Field(0, ge=0, description="Never repeat an n-gram of this size (0: off).")


class PreferenceConfig(_Section):
    """Preference tuning (dpo, orpo, simpo, kto): the loss and its strengths. Unset values take the task's default."""

    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid",
        description="dpo: `sigmoid` (DPO; with label_smoothing the conservative cDPO), `ipo` (squared, "
        "per-token-normalised), `hinge` (SLiC), `robust` (rDPO: unbiased under label noise label_smoothing).",
    )
    beta: float | None = Field(
        None, gt=0, description="Strength of the preference term: the inverse temperature of the implicit reward "
        "(dpo, kto: 0.1; simpo: 2.0) or ORPO's weight of the odds-ratio term (0.1).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo (sigmoid, robust) and simpo: the assumed share of pairs whose "
        "preference is flipped.",
    )
    gamma_beta_ratio: float = Field(0.5, ge=0, description="simpo: the target reward margin over beta.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable examples' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable examples' losses.")


class GRPOConfig(_Section):
    """Online reinforcement learning (task grpo): answers sampled per prompt, scored, and reinforced by how much
    better than their group they scored. Sampling follows ``generation`` (temperature, top_p, max_new_tokens)."""

    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt (the group).")
    rewards: list[str] = Field(
        default_factory=list,
        description="Reward functions: `module:function` (called with prompts, completions and the data's other "
        "columns as keyword lists; returns one float or None per completion) or a built-in name (see `lmtune "
        "tasks --json`); several are summed with `reward_weights`.",
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward (default: all 1).")
    reward_model: str | None = Field(
        None, description="A reward run folder (task reward) that scores each (prompt, answer) as a reward too.")
    beta: float = Field(0.04, ge=0, description="Weight of the KL term to the starting model (0: none, no reference "
                        "forward).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clipping range of the probability ratio (lower side).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping range (default: epsilon).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide the advantages by the standard deviation of the group's rewards, of the "
        "batch's, or not at all.")


class DistributedConfig(_Section):
    """Several processes (GPUs, nodes, or CPU processes) through Accelerate's own engines.

    The processes themselves are started by ``lmtune train --num-processes N`` or by
    ``accelerate launch``; this section says how they share the model. Each knob goes
    to Accelerate's plugin of the same meaning (``DistributedDataParallelKwargs``,
    ``FullyShardedDataParallelPlugin``, ``DeepSpeedPlugin``).
    """

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="`ddp`: every process holds the whole model, gradients are averaged. `fsdp`: parameters, "
        "gradients and optimizer state are sharded across processes (PyTorch FSDP). `deepspeed`: DeepSpeed ZeRO "
        "(GPU only; needs the deepspeed package). With one process all three train the same way.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Process-group backend: `auto` is nccl on CUDA, gloo on CPU."
    )
    timeout_minutes: int = Field(
        60, ge=1, description="How long a process waits for the others at a barrier (the main process "
        "tokenises first while the others wait for its cache)."
    )
    # ddp
    find_unused_parameters: bool = Field(
        False, description="ddp: allow parameters that get no gradient in a step (slower; only if DDP complains)."
    )
    bucket_cap_mb: int = Field(25, ge=1, description="ddp: gradient all-reduce bucket size in MB.")
    # fsdp
    fsdp_version: Literal[1, 2] = Field(2, description="fsdp: FSDP1 (FullyShardedDataParallel) or FSDP2 (fully_shard).")
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = Field(
        "FULL_SHARD",
        description="fsdp: what is sharded. FULL_SHARD: parameters, gradients, optimizer state (ZeRO-3); "
        "SHARD_GRAD_OP: gradients and optimizer state (ZeRO-2); NO_SHARD: like DDP; HYBRID_SHARD: full "
        "shard inside a node, replicate across nodes (FSDP1 only).",
    )
    auto_wrap_policy: Literal["transformer", "size", "none"] = Field(
        "transformer",
        description="fsdp: how the model is split into shard units: `transformer` wraps each transformer block "
        "(the model's `_no_split_modules`, or `transformer_layer_classes`), `size` wraps modules over "
        "`min_num_params`, `none` one unit for the whole model.",
    )
    transformer_layer_classes: list[str] | None = Field(
        None, description="fsdp: class names of the blocks to wrap (default: the model's _no_split_modules)."
    )
    min_num_params: int = Field(100_000_000, ge=1, description="fsdp: with auto_wrap_policy size, the unit size.")
    cpu_offload: bool = Field(False, description="fsdp: keep sharded parameters in CPU memory between uses.")
    activation_checkpointing: bool = Field(
        False, description="fsdp: recompute each block's activations in the backward pass."
    )
    # deepspeed
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="deepspeed: ZeRO stage (1 optimizer state, 2 + gradients, 3 + parameters sharded)."
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="deepspeed: where the optimizer state lives."
    )
    offload_params: Literal["none", "cpu", "nvme"] = Field(
        "none", description="deepspeed: where the parameters live between uses (zero_stage 3)."
    )
    deepspeed_config: str | None = Field(
        None, description="deepspeed: a DeepSpeed JSON config file of your own; the knobs above are then ignored."
    )

    @model_validator(mode="after")
    def _check(self) -> DistributedConfig:
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError("train.distributed.offload_params needs train.distributed.zero_stage 3 "
                             "(only ZeRO-3 shards parameters)")
        if self.sharding_strategy == "HYBRID_SHARD" and self.fsdp_version == 2 and self.strategy == "fsdp":
            raise ValueError("train.distributed.sharding_strategy HYBRID_SHARD is FSDP1 only: set "
                             "train.distributed.fsdp_version 1")
        return self


class PrivacyConfig(_Section):
    """Differentially private training (DP-SGD through Opacus): each example's gradient is clipped, Gaussian noise
    is added to every step, and the noise is calibrated so that the planned steps spend `epsilon` at `delta`
    (lmtune/training/privacy.py). Trains in fp32, in one process, one Poisson-sampled batch per step."""

    # Above 100 a guarantee means nothing in practice (and the PRV accountant's search grows slow).
    epsilon: float = Field(..., gt=0, le=100, description="The privacy budget the whole run may spend: smaller is "
                           "more private and costs more accuracy (1-8 is the usual range).")
    delta: float | None = Field(
        None, gt=0, lt=1, description="The probability with which the epsilon guarantee may fail (default: 1 / (10 N) "
        "for N training examples; keep it well below 1 / N).",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Each example's gradient is clipped to this L2 norm (the "
                                 "noise is scaled to it too); replaces train.max_grad_norm.")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="How the spent epsilon is computed: `rdp` (Renyi DP: fast, slightly loose) or `prv` "
        "(privacy random variables: tighter, slower; can certify epsilon below ~0.2 where rdp cannot).",
    )
    poisson_sampling: bool = Field(
        True, description="Draw each batch by letting every example in with probability batch_size / N (what the "
        "accounting assumes; batch sizes vary). false: shuffled batches of batch_size, accounted as if Poisson.",
    )


class TrainConfig(_Section):
    """The training loop's settings."""

    # Upper bounds keep absurd values (a 5000-digit number from the command line) a config error.
    epochs: float = Field(3.0, gt=0, le=1e6, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, le=10**12, description="Stop after this many optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Examples per micro-batch per process.")
    eval_batch_size: int | None = Field(None, ge=1, description="Examples per evaluation batch (default: batch_size).")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(
        FULL_LEARNING_RATE, gt=0,
        description="Peak learning rate (AdamW). Default by method: 5e-5 for `full` and `freeze`, 2e-4 for "
        "`lora` and `qlora` (adapters start at zero and need a larger step), 1e-3 for `model.init: scratch` "
        "and for `model: baseline:NAME` (`baseline.learning_rate`).",
    )
    head_learning_rate: float | None = Field(
        None, gt=0,
        description="Learning rate of the newly initialised task head (and of embeddings added for new tokens). "
        "Default: 1e-3 (or learning_rate if higher) with `full` and `freeze` on a pretrained model (a head "
        "that starts from random weights learns far slower at the body's rate), else learning_rate.",
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (not on biases/norms).")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="`adamw`: torch AdamW (fused where available). `adamw_8bit`: AdamW with 8-bit states "
        "(bitsandbytes; ~4x less optimizer memory). `paged_adamw_8bit`: the same, paged to CPU memory under "
        "GPU-memory pressure. The 8-bit ones need a CUDA GPU and bitsandbytes.",
    )
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps for linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio.")
    schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (null: no clipping).")
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout.")
    precision: Precision = Field(
        "auto",
        description="`auto`: bf16 autocast where it is faster and supported (measured once on CPU), "
        "fp16 on GPUs without bf16, else fp32.",
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding, several times faster)."
    )
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate every N optimizer steps (default: at the end of each epoch)."
    )
    save_every: int | None = Field(
        None, ge=1, description="Write a resumable checkpoint every N steps (default: at every evaluation)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept (oldest deleted first).")
    metric: str | None = Field(
        None, description="Validation metric that picks the best checkpoint (default: the task's, e.g. accuracy)."
    )
    greater_is_better: bool | None = Field(None, description="Direction of `metric` (default: inferred from its name).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement of `metric`."
    )
    log_every: int = Field(10, ge=1, description="Log training loss every N optimizer steps.")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Also log metrics to these Accelerate trackers."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (default: torch's choice, one per core). Set 1 when "
        "other jobs share the cores: oversubscribed threads run several times slower.",
    )
    fast_dropout: bool = Field(
        True, description="On a CPU, dropout layers draw their random masks in bulk with numpy's PCG64 (seeded from "
        "torch's generator) instead of torch's element-by-element Bernoulli draws: the same distribution, 4-6x "
        "cheaper (LoRA puts a dropout before every adapted layer). `false`: torch's own draws, bit for bit as before.",
    )
    # ---- non-finite loss
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="When a step's loss or gradient norm is NaN/inf: `stop` with an error naming the step and the "
        "training examples of the batch; `skip` the update (no weight change, the schedule moves on) and go on.",
    )
    max_skipped_steps: int = Field(
        10, ge=1, description="With nonfinite: skip, stop anyway after this many skipped steps in the run."
    )
    # ---- distributed
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="How several processes share the work (data parallel, FSDP, DeepSpeed); see `lmtune train "
        "--num-processes` and README 'Scaling out'.",
    )
    # ---- differential privacy
    privacy: PrivacyConfig | None = Field(
        None, description="Train with differential privacy: {epsilon, delta, max_grad_norm, accountant, "
        "poisson_sampling} (DP-SGD; see `lmtune tasks` for the tasks that support it).",
    )

    def resolved_metric(self, task_default: str) -> tuple[str, bool]:
        """The metric that selects checkpoints and its direction."""
        metric = self.metric or task_default
        greater = self.greater_is_better
        if greater is None:
            greater = not lower_is_better(metric)
        return metric, greater


# ---- neural baselines
class BaselineConfig(_Section):
    """The neural baselines: `model: baseline:NAME` (cnn_lstm, rnn, bilstm, gru, transformer; for token
    classification bilstm is a tagger), or NAME listed in
    `baselines` to train it beside the fine-tuned model (a sub-run under RUN/baselines/NAME)."""

    embedding_dim: int = Field(100, ge=4, description="Word embedding size (pretrained vectors bring their own).")
    hidden_size: int = Field(70, ge=1, description="RNN/LSTM/GRU units (cnn_lstm: the LSTM after the convolution).")
    conv_filters: int = Field(64, ge=1, description="cnn_lstm: Conv1D filters.")
    kernel_size: int = Field(5, ge=1, description="cnn_lstm: Conv1D kernel width, padding `same` (odd keeps it "
                             "centred).")
    pool_size: int = Field(4, ge=1, description="cnn_lstm: MaxPooling1D size (1: no pooling).")
    conv_activation: Literal["relu", "linear"] = Field(
        "relu", description="cnn_lstm: the Conv1D activation (`linear` is Keras's Conv1D default: none).")
    rnn_layers: int = Field(1, ge=1, description="Stacked RNN/LSTM/GRU layers.")
    transformer_layers: int = Field(2, ge=1, description="transformer: encoder layers.")
    heads: int = Field(4, ge=1, description="transformer: attention heads.")
    positions: Literal["sinusoidal", "learned"] = Field(
        "sinusoidal", description="transformer: `sinusoidal` (the fixed positions of \"Attention Is All You "
        "Need\", embeddings scaled by sqrt(embedding_dim)) or `learned` (a trained position table).")
    binary_sigmoid_head: bool = Field(
        False, description="Two labels: end in one logit with a sigmoid and binary cross-entropy (Keras's "
        "Dense(1, sigmoid)) instead of two logits with softmax cross-entropy.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on embeddings and before the classifier.")
    vocab_min_count: int = Field(2, ge=1, description="Words seen fewer times in the training split map to [UNK].")
    max_vocab: int = Field(30000, ge=10, description="Most frequent training words kept in the vocabulary.")
    lowercase: bool = Field(True, description="Lower-case words (tokenizer and word2vec).")
    embeddings: str = Field(
        "random", description="Embedding start: `random`, `word2vec` (trained on the training texts first), or a "
        "path: pretrained vectors (word2vec text/binary, GloVe text, optionally .gz) or a folder from "
        "`lmtune embeddings train`.",
    )
    freeze_embeddings: bool = Field(False, description="Keep the (pretrained) embedding table fixed.")
    word2vec_method: Literal["cbow", "skipgram"] = Field("cbow", description="With embeddings: word2vec.")
    word2vec_window: int = Field(5, ge=1, description="With embeddings: word2vec, the context window.")
    word2vec_epochs: int = Field(5, ge=1, description="With embeddings: word2vec, passes over the texts.")
    epochs: float = Field(3.0, gt=0, description="Training passes of a baseline sub-run; also train.epochs' "
                          "default when model is baseline:NAME.")
    batch_size: int = Field(64, ge=1, description="Batch size of a baseline sub-run (and train.batch_size's "
                            "default with model: baseline:NAME).")
    learning_rate: float = Field(1e-3, gt=0, description="Learning rate of a baseline sub-run (and "
                                 "train.learning_rate's default with model: baseline:NAME).")

    @field_validator("embeddings")
    @classmethod
    def _embeddings_exist(cls, value: str) -> str:
        if value not in ("random", "word2vec") and not Path(value).expanduser().exists():
            raise ValueError(f"'{value}' is neither random, word2vec nor an existing vectors file or folder")
        return value


# The placeholder of `evaluate.memorisation.canary_format` that each canary's random secret fills.
CANARY_PLACEHOLDER = "{digits}"


class MemorisationConfig(_Section):
    """A memorisation audit of a generative run (`evaluate.memorisation`): random secrets ("canaries") inserted
    into the training text, their exposure after training (Carlini et al. 2019, "The Secret Sharer"), and an
    extraction test on training-record prefixes against held-out ones."""

    canaries: int = Field(
        4, ge=1, le=1000, description="Canaries per repeat count: each is the canary_format filled with its own random "
        "secret (seeded by train.seed; the run folder's canaries.json lists them). Only the training split gets them."
    )
    canary_repeats: list[int] = Field(
        default_factory=lambda: [1, 4, 16],
        description="How many times each group of canaries occurs in the training data: with [1, 4, 16] and "
        "canaries: 4, four canaries once, four 4 times, four 16 times (84 extra training records). The report "
        "shows the mean exposure per repeat count.",
    )
    canary_format: str = Field(
        "my secret code is {digits}",
        description="The canary sentence; `{digits}` (exactly once) is replaced by the secret. A causal_lm run "
        "adds it as a document; a chat run as a conversation answering canary_prompt.",
    )
    canary_prompt: str = Field(
        "What is my secret code?", description="Chat tasks: the user turn the canary sentence answers."
    )
    canary_digits: int = Field(
        6, ge=2, le=18, description="Digits of each secret: the randomness space holds 10^digits secrets, and "
        "exposure is measured in bits out of log2(10^digits) (about 3.32 bits per digit).",
    )
    canary_candidates: int = Field(
        2000, ge=100, le=1_000_000, description="Random secrets each canary is ranked against (the same ones for "
        "every canary). When every other secret of the space fits in this many (10^digits minus the canaries), all "
        "are scored and exposure is exact; otherwise it is estimated from this sample, which can show at most "
        "log2(candidates + 1) bits (the skew-normal fit, `fitted_exposure`, extrapolates beyond).",
    )
    extraction_prompts: int = Field(
        100, ge=0, le=100_000, description="Training records (and as many held-out ones, the control) whose "
        "prefixes prompt the extraction test; 0 turns it off.",
    )
    extraction_prefix_tokens: int = Field(
        32, ge=1, description="causal_lm: the prompt is a document's first this many tokens (chat tasks: the "
        "conversation up to its last answer)."
    )
    extraction_suffix_tokens: int = Field(
        32, ge=1, le=1024, description="Tokens generated greedily after each prompt; a record counts as extracted "
        "when they equal the record's own next tokens (chat: its answer's first tokens) exactly.",
    )

    @field_validator("canary_repeats")
    @classmethod
    def _repeat_counts(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one repeat count, e.g. [1, 4, 16]")
        bad = [k for k in value if k < 1 or k > 10_000]
        if bad:
            raise ValueError(f"repeat counts must be from 1 to 10000, found {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"repeat counts {value} list one twice; raise canaries for more canaries per count")
        return sorted(value)

    @field_validator("canary_format")
    @classmethod
    def _one_placeholder(cls, value: str) -> str:
        if value.count(CANARY_PLACEHOLDER) != 1:
            raise ValueError(f"must hold {CANARY_PLACEHOLDER} exactly once (found it {value.count(CANARY_PLACEHOLDER)} "
                             "times), e.g. 'my secret code is {digits}'")
        if not value.replace(CANARY_PLACEHOLDER, "").strip():
            raise ValueError("needs words around {digits}: a bare secret has no context to be recalled from")
        return value

    @field_validator("canary_prompt")
    @classmethod
    def _prompt_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _secrets_enough(self) -> MemorisationConfig:
        inserted = self.canaries * len(self.canary_repeats)
        if inserted * 10 > 10**self.canary_digits:
            raise ValueError(f"{inserted} canaries (canaries x canary_repeats) need more than canary_digits "
                             f"{self.canary_digits} (10^{self.canary_digits} secrets leave too few to rank them "
                             "against): raise canary_digits or lower canaries")
        return self


class EvaluateConfig(_Section):
    """What the final evaluation measures beyond the task's metrics: per-group scores (fairness slices) and a
    counterfactual check (the task must support them: `lmtune tasks`)."""

    slices: list[str] = Field(
        default_factory=list,
        description="Data columns naming a group (e.g. gender, dialect, source): every metric per group on the "
        "validation and test splits, the largest gap and ratio between groups, and for classifiers the "
        "demographic-parity and equalized-odds differences (fairlearn), in metrics.json, report.md and the model "
        "card. The evaluated splits need at least two groups per column.",
    )
    counterfactuals: list[list[str]] | str | None = Field(
        None,
        description="Identity-term pairs swapped in the test texts, e.g. [[he, she], [his, her]], or a file of "
        "them (one pair per line: `he,she` in csv/txt, tab-separated in tsv, [\"he\", \"she\"] in jsonl): the "
        "share of predictions that change when only the term changes, with examples. Whole words, either "
        "direction, capitalisation kept.",
    )
    counterfactual_examples: int = Field(5, ge=0, description="Changed predictions shown in report.md as examples.")
    memorisation: MemorisationConfig | None = Field(
        None, description="A memorisation audit of a generative run (causal_lm, sft): canaries inserted into the "
        "training text and their exposure, and an extraction test; `{}` takes the defaults below. Off when unset.",
    )

    @field_validator("slices")
    @classmethod
    def _slices_named(cls, value: list[str]) -> list[str]:
        blank = [c for c in value if not c.strip()]
        if blank:
            raise ValueError("a slice column must be named (found an empty name)")
        repeated = sorted({c for c in value if value.count(c) > 1})
        if repeated:
            raise ValueError(f"column(s) {repeated} listed twice")
        return value

    @field_validator("counterfactuals")
    @classmethod
    def _counterfactual_pairs(cls, value: list[list[str]] | str | None) -> list[list[str]] | str | None:
        if isinstance(value, str):
            if not Path(value).expanduser().is_file():
                raise ValueError(f"'{value}' is not a file of term pairs")
            return value
        for n, pair in enumerate(value or [], 1):
            if len(pair) != 2 or any(not t.strip() for t in pair) or pair[0].strip().lower() == pair[1].strip().lower():
                raise ValueError(f"pair {n} {pair!r}: give two different, non-empty terms, e.g. [he, she]")
        if value is not None and not value:
            raise ValueError("an empty list: give term pairs, e.g. [[he, she]], or leave it unset")
        return value


class Config(_Section):
    """A whole run: task, model, data, method, training settings and where results go."""

    task: str = Field(default_factory=default_task, description="Task name (see `lmtune tasks`); default: the "
                      "task registered as the default.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    baselines: list[str] = Field(
        default_factory=lambda: ["majority", "tfidf_logreg"],
        description="Cheap baselines trained and scored on the same split, shown beside the fine-tuned model: "
        "majority, tfidf_logreg, and the neural cnn_lstm, rnn, bilstm, gru, transformer (each a sub-run on the same "
        "training loop, with the `baseline` settings); for token_classification bilstm, the BiLSTM tagger; "
        "summarization's lead_1, lead_3 (the first sentences). Each task lists those that apply (`lmtune tasks`) "
        "and runs its own by default.",
    )
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    output_dir: str = Field("runs/run", description="The run folder.")
    tune: TuneConfig | None = Field(
        None, description="Hyper-parameter search for `lmtune tune`: {space, trials, timeout, max_tokens, pruner, "
        "storage, ...} (ignored by `lmtune train`).",
    )

    # ---- hyper-parameter search (lmtune tune)
    @model_validator(mode="after")
    def _check_tune_space(self) -> Config:
        if self.tune is not None and self.tune.space:
            check_tune_space(self, self.tune.space)
        return self

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_named(cls, value: Any) -> Any:
        # An empty value is the current folder: an unset variable or a typo would write the run there
        # (`--output_dir ""` on the command line arrives as null).
        if value is None or (isinstance(value, str) and (not value.strip() or "\x00" in value)):
            raise ValueError("must name a folder (empty, it would be the current folder)")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_string(cls, value: Any) -> Any:
        # `model: minilm` is shorthand for `model: {name: minilm}`.
        if isinstance(value, str):
            return {"name": value}
        return value

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASK_INFOS:
            raise ValueError(f"unknown task '{value}'; known tasks: {', '.join(task_names())}")
        return value

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, value: list[str]) -> list[str]:
        unknown = [b for b in value if b not in BASELINE_NAMES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; known: {', '.join(BASELINE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _check_task_settings(self) -> Config:
        info = TASK_INFOS[self.task]
        if "baselines" not in self.model_fields_set and self.baselines != list(info.default_baselines):
            # The field's default names the text classifiers' baselines; every other task runs its own
            # defaults (most compare against the starting model only).
            self.baselines = list(info.default_baselines)
        wrong = [b for b in self.baselines if b not in info.baselines]
        if wrong:
            raise ValueError(f"baselines {wrong} do not apply to task '{self.task}' "
                             "(its report compares the tuned model with the starting model)")
        if info.decoder and self.method.name == "freeze" and not self.method.unfrozen_layers:
            raise ValueError("method.name freeze on a language model trains nothing unless some blocks are "
                             "unfrozen: set method.unfrozen_layers (e.g. 2)")
        if info.check is not None:
            info.check(self)
        fairness = [k for k in ("slices", "counterfactuals") if getattr(self.evaluate, k)]
        if fairness and not info.slices:
            raise ValueError(f"evaluate.{fairness[0]} is for task {_tasks_where(lambda i: i.slices)}, not "
                             f"'{self.task}' (its evaluation has no per-example labels to compare by group)")
        if self.evaluate.memorisation is not None:
            check_memorisation_config(self)
        if self.model.init == "scratch" and not info.scratch:
            raise ValueError(f"model.init: scratch is for task {_tasks_where(lambda i: i.scratch)} (language-model "
                             f"pre-training), not '{self.task}'")
        if self.model.chat_template is not None and not info.chat_template:
            raise ValueError(f"model.chat_template is for task {_tasks_where(lambda i: i.chat_template)}, not "
                             f"'{self.task}' (it does not render its data with a replaceable chat template)")
        return self

    # ---- streaming
    @model_validator(mode="after")
    def _check_streaming(self) -> Config:
        if self.data.streaming:
            check_streaming_config(self)
        return self

    # ---- differential privacy
    @model_validator(mode="after")
    def _check_privacy(self) -> Config:
        if self.train.privacy is not None:
            check_privacy_config(self)
        return self

    # ---- neural baselines
    @model_validator(mode="after")
    def _check_baseline_model(self) -> Config:
        name = self.model.name
        if not name.startswith("baseline:"):
            return self
        arch = name.removeprefix("baseline:")
        if arch not in NEURAL_BASELINES:
            raise ValueError(f"model.name '{name}': unknown neural baseline; choose baseline:{', baseline:'.join(NEURAL_BASELINES)}")
        if arch not in TASK_INFOS[self.task].baselines:
            tasks = _tasks_where(lambda i: arch in i.baselines)
            raise ValueError(f"model.name '{name}' is a text classifier: use it with task {tasks}, not '{self.task}'")
        if self.method.name in ("lora", "qlora"):
            raise ValueError(f"method.name {self.method.name} adapts a pretrained transformer; model.name '{name}' is a "
                             "small network trained from scratch: use method.name full")
        if self.model.init != "pretrained":
            raise ValueError(f"model.init scratch does not apply to model.name '{name}' (it always starts untrained)")
        # Unset training settings take the baseline's own (an LSTM from scratch wants lr ~1e-3, not 5e-5).
        for key in ("learning_rate", "batch_size", "epochs"):
            if key not in self.train.model_fields_set:
                setattr(self.train, key, getattr(self.baseline, key))
        return self

    # ---- method-aware learning rates (after the baseline model's defaults above)
    @model_validator(mode="after")
    def _default_learning_rates(self) -> Config:
        # Written past validation (constant, valid values) so the fields stay unset: a saved config.yaml
        # holds them explicitly, and ``learning_rates`` can tell a default from the user's choice.
        for key, (rate, _) in self._learning_rate_defaults().items():
            self.train.__dict__[key] = rate
        return self

    def _learning_rate_defaults(self) -> dict[str, tuple[float, str]]:
        """The method-aware defaults that apply to this config's unset learning rates, with why."""
        t, m = self.train, self.method
        out: dict[str, tuple[float, str]] = {}
        if "learning_rate" not in t.model_fields_set:
            if self.model.init == "scratch":
                out["learning_rate"] = (SCRATCH_LEARNING_RATE, "model.init scratch")
            elif m.name in ("lora", "qlora"):
                out["learning_rate"] = (LORA_LEARNING_RATE, f"method {m.name}")
            else:
                out["learning_rate"] = (FULL_LEARNING_RATE, f"method {m.name}")
        if ("head_learning_rate" not in t.model_fields_set and m.name in ("full", "freeze")
                and self.model.init == "pretrained" and not self.model.name.startswith("baseline:")):
            # Never below the body's own rate (tiny test models train everything at 1e-2).
            out["head_learning_rate"] = (max(NEW_HEAD_LEARNING_RATE, t.learning_rate if "learning_rate"
                                             in t.model_fields_set else FULL_LEARNING_RATE),
                                         f"a new head with method {m.name}")
        return out

    def learning_rates(self) -> dict[str, Any]:
        """The learning rates the run trains with and which of them are method-aware defaults
        (``defaults``: ``{"learning_rate": "default for method lora"}``, empty when the user set them):
        ``data inspect`` and ``plan`` show them, so a user sees what ``method: lora`` alone does."""
        return {"learning_rate": self.train.learning_rate, "head_learning_rate": self.train.head_learning_rate,
                "defaults": {key: f"default for {why}" for key, (_, why) in self._learning_rate_defaults().items()}}

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as YAML would hold it."""
        return self.model_dump(mode="json")


def describe_learning_rates(rates: dict[str, Any]) -> str:
    """:meth:`Config.learning_rates` as a line for a person: ``0.0002 (default for method lora)``, ``5e-05
    (default for method full), new head 0.001 (default for a new head with method full)``."""
    parts = []
    for key, label in (("learning_rate", ""), ("head_learning_rate", "new head ")):
        if rates[key] is not None:
            why = rates["defaults"].get(key)
            parts.append(f"{label}{rates[key]:g}" + (f" ({why})" if why else ""))
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------ shared checks
def _tasks_where(has: Callable[[TaskInfo], bool]) -> str:
    """The registered tasks whose info ``has`` a property, for a message: ``a``, ``a or b``, ``a, b or c``."""
    names = [n for n in task_names() if has(TASK_INFOS[n])]
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_hold_out_sizes(data: DataConfig) -> None:
    """Fractions without streaming, counts with it (a stream's length is unknown); ValueError naming the keys."""
    if not data.streaming:
        for key in ("validation_size", "test_size"):
            if getattr(data, key) >= 1:
                raise ValueError(f"data.{key} must be a fraction below 1 (a count of examples only with "
                                 "data.streaming: true)")
        return
    for split in ("validation", "test"):
        size = getattr(data, f"{split}_size")
        if getattr(data, split) is None and (size < 1 or not float(size).is_integer()):
            raise ValueError(
                f"with data.streaming the stream has no length, so data.{split}_size must be a count of examples "
                f"(e.g. 200: the first 200 of the stream are held out), not the fraction {size:g}; or give a "
                f"data.{split} file")


def check_memorisation_config(config: Config) -> None:
    """What ``evaluate.memorisation`` needs from the task and the data; ValueError naming the keys."""
    m = config.evaluate.memorisation
    assert m is not None
    if not TASK_INFOS[config.task].memorisation:
        raise ValueError(f"evaluate.memorisation is for task {_tasks_where(lambda i: i.memorisation)}, not "
                         f"'{config.task}' (its training text has no place for canaries)")
    if config.data.streaming:
        raise ValueError("evaluate.memorisation inserts canaries among the training records, which "
                         "data.streaming never holds: read the data without streaming")
    window = m.extraction_prefix_tokens + m.extraction_suffix_tokens
    if m.extraction_prompts and window > config.data.max_length:
        raise ValueError(f"evaluate.memorisation.extraction_prefix_tokens + extraction_suffix_tokens ({window}) "
                         f"must fit in data.max_length ({config.data.max_length}): training never saw a longer "
                         "stretch of a record in one row")


def check_streaming_config(config: Config) -> None:
    """What ``data.streaming`` needs from the rest of the config; ValueError naming the keys."""
    d, t = config.data, config.train
    if not TASK_INFOS[config.task].streaming:
        raise ValueError(f"data.streaming is for task {_tasks_where(lambda i: i.streaming)}, not '{config.task}' "
                         "(its data is loaded, memory-mapped through Arrow)")
    if t.max_steps is None:
        raise ValueError("data.streaming: a stream has no length, so set train.max_steps (train.epochs cannot "
                         "say when to stop)")
    if t.eval_every is None:
        raise ValueError("data.streaming: a stream's epoch end is not known in advance, so evaluation (and, "
                         "unless train.save_every says otherwise, checkpoints) cannot wait for it: set "
                         "train.eval_every")
    if d.max_samples is not None:
        raise ValueError("data.max_samples does not apply to data.streaming (the stream has no length): limit "
                         "the run with train.max_steps")
    if d.format in ("hf", "conll"):
        raise ValueError(f"data.format {d.format} cannot be streamed; data.streaming reads Parquet, JSON Lines, "
                         "JSON, CSV/TSV or text files")
    if config.model.init == "scratch" and config.model.tokenizer == "train":
        raise ValueError("model.tokenizer: train reads the whole training text, which data.streaming never "
                         "loads: name a tokenizer (model.tokenizer: a bundled model or a folder)")
    if t.group_by_length and "group_by_length" in t.model_fields_set:
        raise ValueError("train.group_by_length sorts the whole training split by length; a stream is never "
                         "whole: leave it unset with data.streaming")


def check_privacy_config(config: Config) -> None:
    """What ``train.privacy`` needs from the rest of the config; ValueError naming the keys."""
    t = config.train
    info = TASK_INFOS[config.task]
    if not info.privacy:
        raise ValueError(f"train.privacy is for task {_tasks_where(lambda i: i.privacy)}, not '{config.task}' (its "
                         "loss is not a sum of per-example losses over whole training records)")
    if config.data.packing or (config.data.packing is None and info.packing_default):
        default = f" (task {config.task} packs unless told not to)" if config.data.packing is None else ""
        raise ValueError(f"train.privacy protects each training record, but data.packing puts several records in one "
                         f"row{default}, whose gradient would be clipped as one: set data.packing: false")
    if t.precision in ("bf16", "fp16"):
        raise ValueError(f"train.privacy trains in fp32 (per-example gradients and their clipping in full precision):"
                         f" set train.precision fp32 or auto, not {t.precision}")
    if t.gradient_accumulation > 1:
        raise ValueError("train.privacy: a step's batch is one Poisson draw, so train.gradient_accumulation must be 1 "
                         "(raise train.batch_size instead)")
    if config.data.streaming:
        raise ValueError("train.privacy needs the whole training split (its size sets the sampling rate and the "
                         "noise): it does not apply to data.streaming")
    if t.group_by_length and "group_by_length" in t.model_fields_set:
        raise ValueError("train.group_by_length sorts batches by length; under train.privacy every batch is a random "
                         "draw (Poisson sampling): leave train.group_by_length unset")
    if t.max_grad_norm is not None and "max_grad_norm" in t.model_fields_set:
        raise ValueError("train.max_grad_norm clips the batch's gradient; under train.privacy each example's gradient "
                         "is clipped to train.privacy.max_grad_norm instead: leave train.max_grad_norm unset")
    if config.model.name.startswith("baseline:"):
        raise ValueError(f"train.privacy applies to transformer models, not model.name '{config.model.name}'")
    if config.method.use_dora:
        raise ValueError("method.use_dora: DoRA's magnitude vectors scale the whole adapted weight, whose per-example "
                         "gradients Opacus cannot compute under train.privacy: use plain LoRA")
    if config.model.gradient_checkpointing:
        raise ValueError("model.gradient_checkpointing recomputes activations in the backward pass, which the "
                         "per-example gradient hooks of train.privacy would record twice: turn it off")
    neural = [b for b in config.baselines if b in NEURAL_BASELINES]
    if neural:
        raise ValueError(f"baselines {neural} would train networks on the same data without differential privacy "
                         "(saved in the run folder): leave them out with train.privacy")
