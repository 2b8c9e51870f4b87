"""Classic neural text classifiers as ``transformers`` models, trained on lmtune's one loop.

``model: baseline:NAME`` (with ``task: classification``) builds a word-level tokenizer from the
training texts (:func:`lmtune.models.embeddings.build_word_tokenizer`) and one of these models:

* ``cnn_lstm``    Embedding -> Conv1D(64, 5, relu) -> MaxPooling1D(4) -> LSTM(70) -> Dense: the classic
                  Keras IMDB example;
* ``bilstm``      Embedding -> bidirectional LSTM -> [last forward state; last backward state] -> Dense;
* ``gru``         Embedding -> GRU -> last state -> Dense;
* ``transformer`` Embedding + learned positions -> a small pre-norm Transformer encoder -> masked mean
                  pool -> Dense.

Each is a :class:`~transformers.PreTrainedModel` with its own config (``model_type: lmtune_baseline``),
registered with ``AutoConfig`` / ``AutoModelForSequenceClassification`` when this module is imported
(``import lmtune.models.neural_baselines``; the classification task imports it), so the saved folder is
safetensors + ``config.json`` + ``tokenizer.json`` and ``AutoModelForSequenceClassification.from_pretrained``
loads it.

Results never depend on how much padding a batch has: recurrent layers run on packed sequences,
the convolution sees zero vectors past the end exactly as unpadded "same" padding would, and
attention masks padded keys. So the save-time reload check and batched prediction agree exactly.
The embedding table can start from word2vec vectors trained on the training texts or from a
pretrained vectors file (word2vec / GloVe / an ``lmtune embeddings`` folder).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput

from lmtune.config.tasks import NEURAL_BASELINES
from lmtune.errors import DataError
from lmtune.models.embeddings import (
    build_word_tokenizer,
    embedding_matrix,
    load_vectors,
    train_word2vec,
    word_tokenize,
)

if TYPE_CHECKING:
    from lmtune.config import BaselineConfig

log = logging.getLogger(__name__)

# The architectures are the neural baselines a config may list (one list, in lmtune.config.tasks).
ARCHITECTURES = NEURAL_BASELINES
PREFIX = "baseline:"


def baseline_architecture(model_name: str) -> str | None:
    """``cnn_lstm`` for ``model: baseline:cnn_lstm``; None for any other model name."""
    return model_name[len(PREFIX):] if model_name.startswith(PREFIX) else None


# ------------------------------------------------------------------------------------------ config
class NeuralBaselineConfig(PretrainedConfig):
    """Sizes of a neural baseline; ``architecture`` picks the encoder (see the module docstring)."""

    model_type = "lmtune_baseline"

    def __init__(
        self,
        architecture: str = "cnn_lstm",
        vocab_size: int = 3,
        embedding_dim: int = 100,
        hidden_size: int = 70,
        conv_filters: int = 64,
        kernel_size: int = 5,
        pool_size: int = 4,
        rnn_layers: int = 1,
        transformer_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.2,
        max_position_embeddings: int = 512,
        pad_token_id: int = 0,
        embedding_source: str | None = None,
        **kwargs: Any,
    ) -> None:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.architecture = architecture
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size
        self.conv_filters = conv_filters
        self.kernel_size = kernel_size
        self.pool_size = pool_size
        self.rnn_layers = rnn_layers
        self.transformer_layers = transformer_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.max_position_embeddings = max_position_embeddings
        # Where the embedding table started from: None (random), "word2vec (trained ...)" or a file.
        self.embedding_source = embedding_source
        super().__init__(pad_token_id=pad_token_id, **kwargs)  # type: ignore[call-arg]  # accepted via **kwargs


# ------------------------------------------------------------------------------------------ encoders
def _lengths(mask: torch.Tensor) -> torch.Tensor:
    """Real tokens per row, at least 1 (an empty text still gets a state), on the CPU for packing."""
    return mask.sum(-1).clamp(min=1).cpu()


class CnnLstmEncoder(nn.Module):
    """Conv1D(filters, kernel, relu) -> MaxPool1D(pool) -> LSTM(hidden): (B, T, E) -> (B, H)."""

    def __init__(self, cfg: NeuralBaselineConfig) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cfg.embedding_dim, cfg.conv_filters, cfg.kernel_size, padding=cfg.kernel_size // 2)
        self.pool_size = cfg.pool_size
        self.lstm = nn.LSTM(cfg.conv_filters, cfg.hidden_size, num_layers=cfg.rnn_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.rnn_layers > 1 else 0.0)
        self.out_features = cfg.hidden_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, E) with zero rows at padding, ``mask`` (B, T) 1 for real tokens."""
        steps = x.shape[1]
        h = F.relu(self.conv(x.transpose(1, 2)))[:, :, :steps]  # (B, C, T); "same" padding
        # Zero past each row's end: after relu every value is >= 0, so a pooling window that
        # reaches into padding takes the max over its real positions only.
        h = h * mask[:, None, :].to(h.dtype)
        h = F.max_pool1d(h, self.pool_size, ceil_mode=True)  # (B, C, ceil(T / pool))
        lengths = torch.div(_lengths(mask) + self.pool_size - 1, self.pool_size, rounding_mode="floor")
        packed = pack_padded_sequence(h.transpose(1, 2), lengths, batch_first=True, enforce_sorted=False)
        _, (state, _) = self.lstm(packed)  # state: (layers, B, H)
        return state[-1]


class RnnEncoder(nn.Module):
    """A (bi)LSTM or GRU over packed sequences; the last states: (B, T, E) -> (B, H or 2H)."""

    def __init__(self, cfg: NeuralBaselineConfig, kind: str, bidirectional: bool) -> None:
        super().__init__()
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(cfg.embedding_dim, cfg.hidden_size, num_layers=cfg.rnn_layers, batch_first=True,
                       bidirectional=bidirectional, dropout=cfg.dropout if cfg.rnn_layers > 1 else 0.0)
        self.bidirectional = bidirectional
        self.out_features = cfg.hidden_size * (2 if bidirectional else 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state of the top layer (both directions concatenated when bidirectional)."""
        packed = pack_padded_sequence(x, _lengths(mask), batch_first=True, enforce_sorted=False)
        _, state = self.rnn(packed)
        h = state[0] if isinstance(state, tuple) else state  # (layers * dirs, B, H)
        if self.bidirectional:
            return torch.cat([h[-2], h[-1]], dim=-1)  # (B, 2H): forward end, backward end
        return h[-1]


class TransformerEncoder(nn.Module):
    """Learned positions + pre-norm Transformer encoder layers + masked mean pooling: (B, T, E) -> (B, E)."""

    def __init__(self, cfg: NeuralBaselineConfig) -> None:
        super().__init__()
        self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.embedding_dim)
        layer = nn.TransformerEncoderLayer(cfg.embedding_dim, cfg.num_heads, dim_feedforward=2 * cfg.embedding_dim,
                                           dropout=cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        # No nested-tensor fast path: it changes results with the amount of padding.
        self.layers = nn.TransformerEncoder(layer, cfg.transformer_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.embedding_dim)
        self.out_features = cfg.embedding_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the encoded real tokens."""
        steps = x.shape[1]
        pos = self.positions(torch.arange(steps, device=x.device))  # (T, E)
        keep = mask.bool().clone()
        keep[:, 0] = True  # an all-padding row would give NaN attention
        h = self.layers(x + pos, src_key_padding_mask=~keep)  # (B, T, E)
        h = self.norm(h)
        weights = keep.to(h.dtype)[:, :, None]  # (B, T, 1)
        return (h * weights).sum(1) / weights.sum(1)


# ------------------------------------------------------------------------------------------ model
class NeuralBaselineForSequenceClassification(PreTrainedModel):
    """Embedding -> encoder (``config.architecture``) -> dropout -> linear classifier."""

    config_class = NeuralBaselineConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"

    def __init__(self, config: NeuralBaselineConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        arch = config.architecture
        self.encoder: nn.Module
        if arch == "cnn_lstm":
            self.encoder = CnnLstmEncoder(config)
        elif arch == "bilstm":
            self.encoder = RnnEncoder(config, "lstm", bidirectional=True)
        elif arch == "gru":
            self.encoder = RnnEncoder(config, "gru", bidirectional=False)
        else:
            self.encoder = TransformerEncoder(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(int(self.encoder.out_features), int(config.num_labels or 2))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Keras-like starts: small uniform embeddings, Xavier weights, zero biases, LSTM forget bias 1.

        ``transformers.initialization`` skips tensors already loaded from a checkpoint.
        """
        if isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -0.05, 0.05)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, (nn.Linear, nn.Conv1d)):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LSTM, nn.GRU)):
            for name, param in module.named_parameters():
                if "weight" in name:
                    init.xavier_uniform_(param)
                else:
                    init.zeros_(param)
                    loaded = getattr(param, "_is_hf_initialized", False)
                    if isinstance(module, nn.LSTM) and name.startswith("bias_ih") and not loaded:
                        # Gate order i, f, g, o: start with the forget gate open.
                        hidden = param.shape[0] // 4
                        init.ones_(param[hidden : 2 * hidden])
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        """The word embedding table (V, E)."""
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the word embedding table."""
        self.embeddings = value  # type: ignore[assignment]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        """Logits (B, L); with ``labels``, also the mean loss (cross-entropy, or BCE for multi-label)."""
        mask = attention_mask if attention_mask is not None else (input_ids != self.config.pad_token_id).long()
        x = self.embeddings(input_ids) * mask[:, :, None].to(self.embeddings.weight.dtype)  # (B, T, E)
        features = self.encoder(self.dropout(x), mask)  # (B, F)
        logits = self.classifier(self.dropout(features))  # (B, L)
        loss = None
        if labels is not None:
            if self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits, labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(NeuralBaselineConfig.model_type, NeuralBaselineConfig, exist_ok=True)
AutoModelForSequenceClassification.register(NeuralBaselineConfig, NeuralBaselineForSequenceClassification,
                                            exist_ok=True)


# ------------------------------------------------------------------------------------------ building
def build_tokenizer(train_texts: list[str], settings: BaselineConfig, max_length: int) -> Any:
    """The word-level tokenizer of a baseline: vocabulary from the training texts only."""
    return build_word_tokenizer(train_texts, min_count=settings.vocab_min_count, max_vocab=settings.max_vocab,
                                lowercase=settings.lowercase, max_length=max_length)


def build_model(
    architecture: str, settings: BaselineConfig, tokenizer: Any, train_texts: list[str], labels: list[str], *,
    multi_label: bool, max_length: int, seed: int,
) -> tuple[NeuralBaselineForSequenceClassification, dict[str, Any]]:
    """A freshly initialised baseline model and facts about its embeddings (source, coverage, seconds).

    With ``settings.embeddings`` ``word2vec`` the table starts from CBOW/skip-gram vectors trained on
    ``train_texts``; with a path, from those pretrained vectors (their size replaces
    ``embedding_dim``). Pretrained vectors that cover none of the vocabulary are a :class:`DataError`.
    """
    vocab = _vocabulary(tokenizer)
    matrix, info = _initial_embeddings(settings, vocab, train_texts, seed)
    dim = matrix.shape[1] if matrix is not None else settings.embedding_dim
    heads = settings.heads
    if architecture == "transformer" and dim % heads:
        # Pretrained vectors fix the width; use the most heads that divide it.
        heads = max(h for h in range(1, heads + 1) if dim % h == 0)
        log.info("transformer baseline: %d heads (embedding size %d is not divisible by %d)", heads, dim,
                 settings.heads)
    config = NeuralBaselineConfig(
        architecture=architecture, vocab_size=len(vocab), embedding_dim=dim, hidden_size=settings.hidden_size,
        conv_filters=settings.conv_filters, kernel_size=settings.kernel_size, pool_size=settings.pool_size,
        rnn_layers=settings.rnn_layers, transformer_layers=settings.transformer_layers, num_heads=heads,
        dropout=settings.dropout, max_position_embeddings=max_length, pad_token_id=tokenizer.pad_token_id,
        embedding_source=info.get("source"), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    torch.manual_seed(seed)
    model = NeuralBaselineForSequenceClassification(config)
    if matrix is not None:
        with torch.no_grad():
            model.embeddings.weight.copy_(torch.from_numpy(matrix))
            model.embeddings.weight[tokenizer.pad_token_id].zero_()
    if settings.freeze_embeddings:
        model.embeddings.weight.requires_grad_(False)
    return model, info


def _vocabulary(tokenizer: Any) -> list[str]:
    """Tokens in id order."""
    by_id = {i: w for w, i in tokenizer.get_vocab().items()}
    return [by_id.get(i, "") for i in range(len(by_id))]


def _initial_embeddings(settings: BaselineConfig, vocab: list[str], train_texts: list[str],
                        seed: int) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(V, D) starting rows for the embedding table (None: random) and what they came from."""
    source = settings.embeddings
    if source == "random":
        return None, {}
    words = vocab[3:]  # [PAD], [UNK], [SEP] keep their own rows
    if source == "word2vec":
        start = time.perf_counter()
        sentences = [word_tokenize(t, lowercase=settings.lowercase) for t in train_texts]
        vectors = train_word2vec(sentences, method=settings.word2vec_method, dim=settings.embedding_dim,
                                 window=settings.word2vec_window, min_count=1, epochs=settings.word2vec_epochs,
                                 seed=seed)
        seconds = time.perf_counter() - start
        label = f"word2vec {settings.word2vec_method} trained on the training texts"
    else:
        start = time.perf_counter()
        vectors = _load_covering(Path(source), set(words))
        seconds = time.perf_counter() - start
        label = str(source)
    matrix, found = embedding_matrix(vectors, vocab, seed=seed)
    covered = int(found[3:].sum())
    coverage = covered / max(len(words), 1)
    counts = _word_counts(train_texts, settings.lowercase)
    token_total = sum(counts.get(w, 0) for w in words)
    token_coverage = sum(counts.get(w, 0) for w, f in zip(words, found[3:], strict=True) if f) / max(token_total, 1)
    if covered == 0:
        raise DataError(
            f"the word vectors cover none of the {len(words):,} training vocabulary words "
            f"(coverage 0.0%; {len(vectors):,} vectors read)", file=source, field="baseline.embeddings",
            hint="check that the vectors are for this language and tokenisation (lmtune lower-cases words "
            "unless baseline.lowercase is false), or use baseline.embeddings: word2vec",
        )
    log.info("embeddings from %s: %s of %s vocabulary words (%.1f%%; %.1f%% of training tokens)", label,
             f"{covered:,}", f"{len(words):,}", 100 * coverage, 100 * token_coverage)
    if coverage < 0.1 and source != "word2vec":
        log.warning("the word vectors cover only %.1f%% of the vocabulary; most rows start random", 100 * coverage)
    return matrix, {"source": label, "dim": int(matrix.shape[1]), "vocabulary_coverage": coverage,
                    "token_coverage": token_coverage, "train_seconds": seconds}


def _load_covering(path: Path, words: set[str]) -> Any:
    """Pretrained vectors restricted to ``words``; none of them found is the no-overlap error."""
    try:
        return load_vectors(path, keep=words)
    except DataError as exc:
        if "none of the wanted words" not in exc.message:
            raise
        raise DataError(
            f"the word vectors cover none of the {len(words):,} training vocabulary words (coverage 0.0%)",
            file=path, field="baseline.embeddings",
            hint="check that the vectors are for this language and tokenisation (lmtune lower-cases words "
            "unless baseline.lowercase is false), or use baseline.embeddings: word2vec",
        ) from None


def _word_counts(texts: list[str], lowercase: bool) -> dict[str, int]:
    return Counter(w for t in texts for w in word_tokenize(t, lowercase=lowercase))


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (what the safetensors file holds, give or take its header)."""
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def describe_architecture(name: str, settings: BaselineConfig) -> str:
    """One line for the report."""
    s = settings
    init_text = {"random": "random embeddings", "word2vec": f"embeddings from word2vec {s.word2vec_method} on the "
                 "training texts"}.get(s.embeddings, f"embeddings from {Path(s.embeddings).name}")
    body = {
        "cnn_lstm": f"Conv1D({s.conv_filters}, {s.kernel_size}, relu) -> MaxPool1D({s.pool_size}) -> LSTM({s.hidden_size})",
        "bilstm": f"BiLSTM({s.hidden_size}) -> last states",
        "gru": f"GRU({s.hidden_size}) -> last state",
        "transformer": f"{s.transformer_layers}-layer Transformer encoder ({s.heads} heads) -> mean pool",
    }[name]
    return (f"word Embedding({s.embedding_dim}) -> {body} -> Dense; {init_text}; "
            f"{s.epochs:g} epochs, batch {s.batch_size}, lr {s.learning_rate:g}.")

