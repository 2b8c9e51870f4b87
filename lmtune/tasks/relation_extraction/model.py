"""The relation model: a pretrained encoder read at its entity-start markers (Baldini Soares et al. 2019,
"matching the blanks"; Zhong & Chen 2021, "a frustratingly easy approach").

The input text carries typed markers around both entities (``[E1:PER] Ada [/E1:PER] ... [E2:ORG] ...``),
added to the tokenizer as special tokens. The model finds the first head-start and tail-start marker in
``input_ids`` itself, so the saved folder needs nothing beyond the ids: ``model(**tokenizer(marked_text))``
gives the relation logits. The classifier reads the concatenation of the two markers' hidden states.

Its config (``model_type: lmtune_relation``) keeps the encoder's own config as a dict, so any encoder
``AutoModel`` builds fits; importing this module registers the type with ``AutoConfig`` and
``AutoModelForSequenceClassification`` (as ``lmtune.models.neural_baselines`` does for its type).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "lmtune_relation"


class RelationConfig(PretrainedConfig):
    """An encoder's config (``encoder``: its ``to_dict()``) plus the marker ids the head reads."""

    model_type = MODEL_TYPE

    def __init__(self, encoder: dict[str, Any] | None = None, head_marker_ids: list[int] | None = None,
                 tail_marker_ids: list[int] | None = None, classifier_dropout: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = dict(encoder or {})
        self.head_marker_ids = [int(i) for i in head_marker_ids or []]
        self.tail_marker_ids = [int(i) for i in tail_marker_ids or []]
        self.classifier_dropout = float(classifier_dropout)
        # The encoder's shapes, read by lmtune plan (its memory model) and the export checks like any
        # transformers config's.
        for key in ("hidden_size", "max_position_embeddings", "vocab_size", "num_hidden_layers",
                    "num_attention_heads", "intermediate_size", "attention_probs_dropout_prob",
                    "hidden_dropout_prob"):
            if key in self.encoder:
                setattr(self, key, self.encoder[key])

    def encoder_config(self) -> PretrainedConfig:
        """The encoder's own config object."""
        values = dict(self.encoder)
        model_type = values.pop("model_type", "bert")
        return AutoConfig.for_model(model_type, **values)


def marker_positions(input_ids: torch.Tensor, marker_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first token that is one of ``marker_ids`` (0, the first token, if none).

    ``input_ids`` (B, T) -> (B,)."""
    hits = torch.isin(input_ids, marker_ids)  # (B, T)
    first = hits.int().argmax(dim=1)  # argmax returns the first maximum
    return torch.where(hits.any(dim=1), first, torch.zeros_like(first))


class RelationModel(PreTrainedModel):
    """Encoder + linear classifier over [head-start state; tail-start state]."""

    config_class = RelationConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True

    def __init__(self, config: RelationConfig, encoder: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.encoder = encoder if encoder is not None else AutoModel.from_config(config.encoder_config())
        hidden = int(self.encoder.config.hidden_size)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(2 * hidden, int(config.num_labels or 2))
        if encoder is None:
            self.post_init()
        else:
            self._init_weights(self.classifier)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation (normal weights of the encoder's ``initializer_range``, zero biases)."""
        std = float(self.config.encoder.get("initializer_range", 0.02))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    def resize_encoder_embeddings(self, size: int) -> None:
        """Grow the encoder's vocabulary to ``size`` (new rows start at the mean embedding) and keep the saved
        config in step."""
        self.encoder.resize_token_embeddings(size, mean_resizing=True)
        self.config.encoder = self.encoder.config.to_dict()
        self.config.vocab_size = size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        """Relation logits (B, L) read at the first head-start and tail-start marker of each row."""
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        states = self.encoder(**inputs).last_hidden_state  # (B, T, H)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        # Marker ids come from the config on every call: a buffer would not survive transformers building the
        # model on the meta device when it loads a folder.
        heads = torch.tensor(self.config.head_marker_ids or [-1], dtype=torch.long, device=input_ids.device)
        tails = torch.tensor(self.config.tail_marker_ids or [-1], dtype=torch.long, device=input_ids.device)
        head = states[rows, marker_positions(input_ids, heads)]  # (B, H)
        tail = states[rows, marker_positions(input_ids, tails)]  # (B, H)
        logits = self.classifier(self.dropout(torch.cat([head, tail], dim=-1)))  # (B, L)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @classmethod
    def from_encoder(cls, encoder_path: str | Path, config: RelationConfig, **kwargs: Any) -> RelationModel:
        """A new relation model on the pretrained encoder at ``encoder_path`` (its vocabulary grown to
        ``config.vocab_size`` when the markers were added), with a fresh classifier."""
        encoder = AutoModel.from_pretrained(encoder_path, **kwargs)
        size = int(config.encoder.get("vocab_size") or 0)
        if size > encoder.get_input_embeddings().weight.shape[0]:
            encoder.resize_token_embeddings(size, mean_resizing=True)
        config.encoder = encoder.config.to_dict()
        return cls(config, encoder=encoder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """A saved relation model; or, given a plain encoder folder and a relation ``config`` (how lmtune's
        export rebuilds a LoRA run's base before applying its adapter), that encoder under a new head."""
        config = kwargs.get("config")
        folder = Path(str(pretrained_model_name_or_path))
        if isinstance(config, RelationConfig) and (folder / "config.json").is_file():
            saved = PretrainedConfig.get_config_dict(str(folder))[0]
            if saved.get("model_type") != MODEL_TYPE:
                extra = {k: v for k, v in kwargs.items() if k in ("dtype", "torch_dtype", "use_safetensors")}
                return cls.from_encoder(folder, config, **extra)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


AutoConfig.register(MODEL_TYPE, RelationConfig, exist_ok=True)
AutoModelForSequenceClassification.register(RelationConfig, RelationModel, exist_ok=True)
