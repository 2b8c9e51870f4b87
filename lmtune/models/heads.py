"""Task heads transformers lacks for a bundled model, registered with its auto classes on import.

transformers 5.23 gives ``gemma3_text`` (Gemma 3 270M, bundled as ``gemma3``) a sequence-classification class
but no token-classification one: ``AutoModelForTokenClassification`` refuses its config. transformers builds its
decoder heads from generic pieces, so Gemma 3's is its own ``GenericForTokenClassification`` (the base model
under ``base_model_prefix``, dropout and a ``score`` layer per position), exactly as the library writes it for
Llama or Qwen. A decoder tags each token from its left context only. Imported by ``lmtune.models.registry``,
which every path that loads a model goes through, so training, prediction, export and the server all see it.
"""

from __future__ import annotations

from transformers import AutoModelForTokenClassification, Gemma3TextConfig
from transformers.modeling_layers import GenericForTokenClassification
from transformers.models.gemma3.modeling_gemma3 import Gemma3PreTrainedModel


class Gemma3TextForTokenClassification(GenericForTokenClassification, Gemma3PreTrainedModel):
    """Gemma 3 (text) with a linear tag layer on every position's last hidden state."""

    config_class = Gemma3TextConfig


AutoModelForTokenClassification.register(Gemma3TextConfig, Gemma3TextForTokenClassification, exist_ok=True)
