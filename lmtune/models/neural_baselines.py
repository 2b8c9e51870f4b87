"""Classic neural text classifiers as ``transformers`` models, trained on lmtune's one loop.

``model: baseline:NAME`` (with ``task: classification``) builds a word-level tokenizer from the
training texts (:func:`lmtune.models.embeddings.build_word_tokenizer`) and one of these models:

* ``cnn_lstm``    Embedding -> Conv1D(64, 5, relu) -> MaxPooling1D(4) -> LSTM(70) -> Dense: the classic
                  Keras IMDB example (``pool_size: 1`` drops the pooling, ``conv_activation: linear``
                  the relu: the guides' Embedding -> Conv1D(64, 3, same) -> LSTM(64) -> Dense(1, sigmoid));
* ``rnn``         Embedding -> plain Elman RNN (tanh) -> last state -> Dense;
* ``bilstm``      Embedding -> bidirectional LSTM -> [last forward state; last backward state] -> Dense;
* ``gru``         Embedding -> GRU -> last state -> Dense;
* ``transformer`` Embedding * sqrt(d) + sinusoidal positions ("Attention Is All You Need") -> a small
                  pre-norm Transformer encoder built on lmtune's own multi-head attention
                  (:func:`scaled_dot_product_attention`) -> masked mean pool -> Dense.

Each is a :class:`~transformers.PreTrainedModel` with its own config (``model_type: lmtune_baseline``),
registered with ``AutoConfig`` / ``AutoModelForSequenceClassification`` when this module is imported
(``import lmtune.models.neural_baselines``; the classification task imports it), so the saved folder is
safetensors + ``config.json`` + ``tokenizer.json`` and ``AutoModelForSequenceClassification.from_pretrained``
loads it.

With ``binary_sigmoid_head`` a two-label classifier ends in one logit ``z`` (Dense(1, sigmoid)) and
returns the logits ``[0, z]``: softmax of those is ``[1 - sigmoid(z), sigmoid(z)]`` and their
cross-entropy is exactly binary cross-entropy on ``sigmoid(z)``, so the task's loss, metrics and
predictions work unchanged.

``bilstm`` also comes as a tagger for token classification (NER): :class:`NeuralBaselineForTokenClassification`,
Embedding -> bidirectional LSTM -> one linear layer per token over the tag set (no CRF), registered with
``AutoModelForTokenClassification`` under the same config, so the task decides the shape
(``lmtune.config.tasks.TAGGER_BASELINES``). Its tokenizer is the same word tokenizer: a training word is one
token, or a few when the word pipeline splits it (punctuation inside "U.S."); the token-classification task
labels a word's first token as it does a transformer's first sub-token.

Results never depend on how much padding a batch has: recurrent layers run on packed sequences,
the convolution sees zero vectors past the end exactly as unpadded "same" padding would, and
attention masks padded keys. So the save-time reload check and batched prediction agree exactly.
The embedding table can start from word2vec vectors trained on the training texts or from a
pretrained vectors file (word2vec / GloVe / an ``lmtune embeddings`` folder).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

from lmtune.config.tasks import NEURAL_BASELINES, TAGGER_BASELINES
from lmtune.data.features import IGNORE_INDEX
from lmtune.errors import ConfigError, DataError
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
        conv_activation: str = "relu",
        rnn_layers: int = 1,
        transformer_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.2,
        max_position_embeddings: int = 512,
        pad_token_id: int = 0,
        embedding_source: str | None = None,
        position_encoding: str = "learned",
        binary_sigmoid_head: bool = False,
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
        self.conv_activation = conv_activation
        self.rnn_layers = rnn_layers
        self.transformer_layers = transformer_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.max_position_embeddings = max_position_embeddings
        # Where the embedding table started from: None (random), "word2vec (trained ...)" or a file.
        self.embedding_source = embedding_source
        # "sinusoidal" (the paper's fixed positions) for every model built now; the default "learned" is
        # what a config.json saved before the key existed meant (an nn.Embedding of positions).
        self.position_encoding = position_encoding
        # One logit z for two labels (logits [0, z]): Dense(1, sigmoid) with binary cross-entropy.
        self.binary_sigmoid_head = binary_sigmoid_head
        super().__init__(pad_token_id=pad_token_id, **kwargs)  # type: ignore[call-arg]  # accepted via **kwargs


# ------------------------------------------------------------------------------------------ encoders
def _lengths(mask: torch.Tensor) -> torch.Tensor:
    """Real tokens per row, at least 1 (an empty text still gets a state), on the CPU for packing."""
    return mask.sum(-1).clamp(min=1).cpu()


class CnnLstmEncoder(nn.Module):
    """Conv1D(filters, kernel, relu or linear) -> MaxPool1D(pool) -> LSTM(hidden): (B, T, E) -> (B, H)."""

    def __init__(self, cfg: NeuralBaselineConfig) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cfg.embedding_dim, cfg.conv_filters, cfg.kernel_size, padding=cfg.kernel_size // 2)
        self.pool_size = cfg.pool_size
        self.relu = cfg.conv_activation == "relu"
        self.lstm = nn.LSTM(cfg.conv_filters, cfg.hidden_size, num_layers=cfg.rnn_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.rnn_layers > 1 else 0.0)
        self.out_features = cfg.hidden_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, E) with zero rows at padding, ``mask`` (B, T) 1 for real tokens."""
        steps = x.shape[1]
        h = self.conv(x.transpose(1, 2))[:, :, :steps]  # (B, C, T); "same" padding
        if self.relu:
            h = F.relu(h)
        if self.pool_size > 1:
            # A pooling window that reaches past a row's end takes the max over its real positions only;
            # windows wholly past the end (beyond the packed length) become 0, never -inf.
            h = h.masked_fill(~mask[:, None, :].bool(), float("-inf"))
            h = F.max_pool1d(h, self.pool_size, ceil_mode=True)  # (B, C, ceil(T / pool))
            h = h.masked_fill(torch.isneginf(h), 0.0)
        lengths = torch.div(_lengths(mask) + self.pool_size - 1, self.pool_size, rounding_mode="floor")
        packed = pack_padded_sequence(h.transpose(1, 2), lengths, batch_first=True, enforce_sorted=False)
        _, (state, _) = self.lstm(packed)  # state: (layers, B, H)
        return state[-1]


# Each takes (input_size, hidden_size, num_layers=, batch_first=, bidirectional=, dropout=).
RECURRENT_LAYERS: dict[str, type[nn.RNN | nn.LSTM | nn.GRU]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RnnEncoder(nn.Module):
    """A plain (Elman, tanh) RNN, a (bi)LSTM or a GRU over packed sequences; the last states:
    (B, T, E) -> (B, H or 2H)."""

    def __init__(self, cfg: NeuralBaselineConfig, kind: str, bidirectional: bool) -> None:
        super().__init__()
        self.rnn = RECURRENT_LAYERS[kind](cfg.embedding_dim, cfg.hidden_size, num_layers=cfg.rnn_layers,
                                          batch_first=True, bidirectional=bidirectional,
                                          dropout=cfg.dropout if cfg.rnn_layers > 1 else 0.0)
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


# ------------------------------------------------------------------------------------------ attention
def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 key_padding_mask: torch.Tensor | None = None, dropout: float = 0.0,
                                 training: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + M) V, written out ("Attention Is All You Need", eq. 1).

    ``q`` (B, H, T, d), ``k`` and ``v`` (B, H, S, d); ``key_padding_mask`` (B, S) True (or 1) for keys
    that may be attended to: M is 0 there and -inf elsewhere. Every row needs one such key.
    Returns (B, H, T, d).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    weights = F.dropout(torch.softmax(scores, dim=-1), dropout, training=training)
    return weights @ v


def sinusoidal_positions(steps: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The paper's fixed positions (T, D): PE(pos, 2i) = sin(pos / 10000^(2i/D)),
    PE(pos, 2i+1) = cos(pos / 10000^(2i/D)). Nothing is learned or saved; any length works."""
    pos = torch.arange(steps, dtype=torch.float32, device=device)[:, None]  # (T, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float32, device=device)  # (ceil(D/2),)
    angles = pos / torch.pow(10000.0, two_i / dim)  # (T, ceil(D/2))
    pe = torch.zeros(steps, dim, device=device)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return pe


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention on :func:`scaled_dot_product_attention`: (B, T, E) -> (B, T, E).

    The weights are named as ``torch.nn.MultiheadAttention`` names them (``in_proj_weight`` (3E, E)
    holding Q, K, V in that order, ``in_proj_bias``, ``out_proj``), so models saved when the baseline
    used torch's encoder layers load into this one unchanged.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_padding_mask`` (B, T): True for real tokens."""
        batch, steps, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3E)
        qkv = qkv.view(batch, steps, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
        out = scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], key_padding_mask, self.dropout, self.training)
        return self.out_proj(out.transpose(1, 2).reshape(batch, steps, dim))  # (B, T, E)


class EncoderLayer(nn.Module):
    """A pre-norm Transformer encoder layer: x + Attn(LN(x)), then x + FFN(LN(x)) with a GELU FFN of 2E.

    Names follow ``torch.nn.TransformerEncoderLayer`` (self_attn, linear1, linear2, norm1, norm2): with
    the same weights it computes what that layer with ``norm_first=True, activation="gelu"`` computes.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadSelfAttention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, 2 * dim)
        self.linear2 = nn.Linear(2 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, E), ``keep`` (B, T) True for real tokens."""
        x = x + self.dropout(self.self_attn(self.norm1(x), keep))
        return x + self.dropout(self.linear2(self.dropout(F.gelu(self.linear1(self.norm2(x))))))


class EncoderStack(nn.Module):
    """The encoder layers in order (``layers.N``, as ``torch.nn.TransformerEncoder`` names them)."""

    def __init__(self, dim: int, heads: int, dropout: float, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, T, E) -> (B, T, E)."""
        for layer in self.layers:
            x = layer(x, keep)
        return x


class TransformerEncoder(nn.Module):
    """Positions + pre-norm Transformer encoder layers + masked mean pooling: (B, T, E) -> (B, E).

    Positions are the paper's: the embeddings scaled by sqrt(E) plus :func:`sinusoidal_positions`.
    ``position_encoding: learned`` (models saved before sinusoidal positions) adds an ``nn.Embedding``
    of positions to the unscaled embeddings instead.
    """

    def __init__(self, cfg: NeuralBaselineConfig) -> None:
        super().__init__()
        self.learned = cfg.position_encoding == "learned"
        if self.learned:
            self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.embedding_dim)
        self.scale = 1.0 if self.learned else math.sqrt(cfg.embedding_dim)
        self.layers = EncoderStack(cfg.embedding_dim, cfg.num_heads, cfg.dropout, cfg.transformer_layers)
        self.norm = nn.LayerNorm(cfg.embedding_dim)
        self.out_features = cfg.embedding_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the encoded real tokens."""
        steps, dim = x.shape[1], x.shape[2]
        if self.learned:
            pos = self.positions(torch.arange(steps, device=x.device))  # (T, E)
        else:
            pos = sinusoidal_positions(steps, dim, x.device).to(x.dtype)  # (T, E)
        keep = mask.bool().clone()
        keep[:, 0] = True  # an all-padding row would give NaN attention
        h = self.layers(x * self.scale + pos, keep)  # (B, T, E)
        h = self.norm(h)
        weights = keep.to(h.dtype)[:, :, None]  # (B, T, 1)
        return (h * weights).sum(1) / weights.sum(1)


# ------------------------------------------------------------------------------------------ model
class NeuralBaselineModel(PreTrainedModel):
    """What the baselines' sentence classifier and tagger share: their config, a word embedding table
    (``self.embeddings``) and Keras-like weight starts."""

    config_class = NeuralBaselineConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    embeddings: nn.Embedding

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Keras-like starts (:func:`init_baseline_weights`)."""
        init_baseline_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        """The word embedding table (V, E)."""
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the word embedding table."""
        self.embeddings = value  # type: ignore[assignment]


class NeuralBaselineForSequenceClassification(NeuralBaselineModel):
    """Embedding -> encoder (``config.architecture``) -> dropout -> linear classifier."""

    def __init__(self, config: NeuralBaselineConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        arch = config.architecture
        self.encoder: nn.Module
        if arch == "cnn_lstm":
            self.encoder = CnnLstmEncoder(config)
        elif arch == "rnn":
            self.encoder = RnnEncoder(config, "rnn", bidirectional=False)
        elif arch == "bilstm":
            self.encoder = RnnEncoder(config, "lstm", bidirectional=True)
        elif arch == "gru":
            self.encoder = RnnEncoder(config, "gru", bidirectional=False)
        else:
            self.encoder = TransformerEncoder(config)
        self.dropout = nn.Dropout(config.dropout)
        # Dense(1, sigmoid) for two labels with binary_sigmoid_head (see the module docstring), else one
        # logit per label.
        outputs = 1 if config.binary_sigmoid_head else int(config.num_labels or 2)
        self.classifier = nn.Linear(int(self.encoder.out_features), outputs)
        self.post_init()

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
        logits = self.classifier(self.dropout(features))  # (B, L), or (B, 1) with binary_sigmoid_head
        if logits.shape[-1] == 1 and self.config.num_labels == 2:
            # [0, z]: softmax gives [1 - sigmoid(z), sigmoid(z)], cross-entropy is BCE on sigmoid(z).
            logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)  # (B, 2)
        loss = None
        if labels is not None:
            if self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits, labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


@torch.no_grad()
def init_baseline_weights(module: nn.Module) -> None:
    """Keras-like starts for a baseline's modules: small uniform embeddings, Xavier weights, orthogonal
    recurrent weights, zero biases, LSTM forget bias 1.

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
    elif isinstance(module, (nn.RNN, nn.LSTM, nn.GRU)):
        for name, param in module.named_parameters():
            if name.startswith("weight_hh"):
                # Keras's recurrent_initializer: orthogonal over all gates at once, (gates * H, H).
                init.orthogonal_(param)
            elif "weight" in name:
                init.xavier_uniform_(param)
            else:
                init.zeros_(param)
                loaded = getattr(param, "_is_hf_initialized", False)
                if isinstance(module, nn.LSTM) and name.startswith("bias_ih") and not loaded:
                    # Gate order i, f, g, o: start with the forget gate open.
                    hidden = param.shape[0] // 4
                    init.ones_(param[hidden : 2 * hidden])
    elif isinstance(module, MultiHeadSelfAttention):
        init.xavier_uniform_(module.in_proj_weight)
        init.zeros_(module.in_proj_bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)


class NeuralBaselineForTokenClassification(NeuralBaselineModel):
    """The guides' BiLSTM tagger: Embedding -> dropout -> bidirectional LSTM -> dropout -> a linear layer per token.

    (B, T) token ids -> (B, T, L) tag logits. The LSTM runs on packed sequences, so a row's outputs do not depend
    on the padding after it; positions past a row's end get the bias alone (their labels are ignored). The loss
    with ``labels`` is the mean cross-entropy over tokens whose label is not -100 (``IGNORE_INDEX``). No CRF:
    each token's tag is its own argmax.
    """

    def __init__(self, config: NeuralBaselineConfig) -> None:
        super().__init__(config)
        if config.architecture not in TAGGER_BASELINES:
            raise ValueError(f"a tagger baseline is one of {TAGGER_BASELINES}, got {config.architecture!r}")
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.encoder = nn.LSTM(config.embedding_dim, config.hidden_size, num_layers=config.rnn_layers,
                               batch_first=True, bidirectional=True,
                               dropout=config.dropout if config.rnn_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(2 * config.hidden_size, int(config.num_labels or 2))
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> TokenClassifierOutput:
        """Tag logits (B, T, L); with ``labels`` (B, T), also the mean cross-entropy over labelled tokens.

        ``attention_mask`` marks real tokens, which come first in each row (right padding).
        """
        mask = attention_mask if attention_mask is not None else (input_ids != self.config.pad_token_id).long()
        steps = input_ids.shape[1]
        x = self.dropout(self.embeddings(input_ids))  # (B, T, E)
        packed = pack_padded_sequence(x, _lengths(mask), batch_first=True, enforce_sorted=False)
        out = self.encoder(packed)[0]
        # (B, T, 2H): forward and backward states of each token, zeros past each row's end.
        h = pad_packed_sequence(out, batch_first=True, total_length=steps)[0]
        logits = self.classifier(self.dropout(h))  # (B, T, L)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        return TokenClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(NeuralBaselineConfig.model_type, NeuralBaselineConfig, exist_ok=True)
AutoModelForSequenceClassification.register(NeuralBaselineConfig, NeuralBaselineForSequenceClassification,
                                            exist_ok=True)
AutoModelForTokenClassification.register(NeuralBaselineConfig, NeuralBaselineForTokenClassification, exist_ok=True)


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
    if settings.binary_sigmoid_head and (multi_label or len(labels) != 2):
        raise ConfigError(
            f"baseline.binary_sigmoid_head needs exactly two labels, one per text; this data has {len(labels)} "
            f"label(s){' and several per text' if multi_label else ''}: {', '.join(map(str, labels[:5]))}",
            field="baseline.binary_sigmoid_head",
            hint="set baseline.binary_sigmoid_head: false (one logit per label, softmax cross-entropy)",
        )
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
        conv_activation=settings.conv_activation, position_encoding=settings.positions,
        binary_sigmoid_head=settings.binary_sigmoid_head, rnn_layers=settings.rnn_layers, transformer_layers=settings.transformer_layers, num_heads=heads,
        dropout=settings.dropout, max_position_embeddings=max_length, pad_token_id=tokenizer.pad_token_id,
        embedding_source=info.get("source"), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    torch.manual_seed(seed)
    model = NeuralBaselineForSequenceClassification(config)
    _start_embeddings(model.embeddings, matrix, tokenizer.pad_token_id, settings.freeze_embeddings)
    return model, info


def build_tagger(
    architecture: str, settings: BaselineConfig, tokenizer: Any, train_texts: list[str], labels: list[str], *,
    max_length: int, seed: int,
) -> tuple[NeuralBaselineForTokenClassification, dict[str, Any]]:
    """A freshly initialised tagger (one of ``TAGGER_BASELINES``) over the tag set ``labels``, and facts about its
    embeddings, which start as :func:`build_model`'s do (``train_texts``: the training sentences, words joined
    by spaces, for word2vec and the coverage figures)."""
    if architecture not in TAGGER_BASELINES:
        raise ConfigError(f"baseline '{architecture}' has no tagger form", field="baselines",
                          hint=f"token classification trains {', '.join(TAGGER_BASELINES)}")
    vocab = _vocabulary(tokenizer)
    matrix, info = _initial_embeddings(settings, vocab, train_texts, seed)
    config = NeuralBaselineConfig(
        architecture=architecture, vocab_size=len(vocab),
        embedding_dim=matrix.shape[1] if matrix is not None else settings.embedding_dim,
        hidden_size=settings.hidden_size, rnn_layers=settings.rnn_layers, dropout=settings.dropout,
        max_position_embeddings=max_length, pad_token_id=tokenizer.pad_token_id,
        embedding_source=info.get("source"), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = NeuralBaselineForTokenClassification(config)
    _start_embeddings(model.embeddings, matrix, tokenizer.pad_token_id, settings.freeze_embeddings)
    return model, info


def _start_embeddings(table: nn.Embedding, matrix: np.ndarray | None, pad_id: int, freeze: bool) -> None:
    """Copy the starting rows (V, D) into the embedding table (the padding row zero); optionally freeze it."""
    if matrix is not None:
        with torch.no_grad():
            table.weight.copy_(torch.from_numpy(matrix))
            table.weight[pad_id].zero_()
    if freeze:
        table.weight.requires_grad_(False)


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


def describe_architecture(name: str, settings: BaselineConfig,
                          auto_class: str = "AutoModelForSequenceClassification") -> str:
    """One line for the report. ``auto_class`` is the task's (``TaskInfo.auto_class``): under
    ``AutoModelForTokenClassification`` the baseline is its tagger form."""
    s = settings
    init_text = {"random": "random embeddings", "word2vec": f"embeddings from word2vec {s.word2vec_method} on the "
                 "training texts"}.get(s.embeddings, f"embeddings from {Path(s.embeddings).name}")
    if auto_class == AutoModelForTokenClassification.__name__:
        layers = f"{s.rnn_layers}-layer " if s.rnn_layers > 1 else ""
        return (f"word Embedding({s.embedding_dim}) -> {layers}BiLSTM({s.hidden_size}) per token -> Dense over the "
                f"tags (no CRF), {'cased' if not s.lowercase else 'lower-cased'} words; {init_text}; "
                f"{s.epochs:g} epochs, batch {s.batch_size}, lr {s.learning_rate:g}.")
    pool = f" -> MaxPool1D({s.pool_size})" if s.pool_size > 1 else ""
    positions = "sinusoidal positions" if s.positions == "sinusoidal" else "learned positions"
    body = {
        "cnn_lstm": f"Conv1D({s.conv_filters}, {s.kernel_size}, {s.conv_activation}){pool} -> LSTM({s.hidden_size})",
        "rnn": f"RNN({s.hidden_size}, tanh) -> last state",
        "bilstm": f"BiLSTM({s.hidden_size}) -> last states",
        "gru": f"GRU({s.hidden_size}) -> last state",
        "transformer": f"{positions} -> {s.transformer_layers}-layer Transformer encoder ({s.heads} heads) -> mean pool",
    }[name]
    head = "Dense(1, sigmoid)" if s.binary_sigmoid_head else "Dense"
    return (f"word Embedding({s.embedding_dim}) -> {body} -> {head}; {init_text}; "
            f"{s.epochs:g} epochs, batch {s.batch_size}, lr {s.learning_rate:g}.")

