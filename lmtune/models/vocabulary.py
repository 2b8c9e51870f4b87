"""Growing a pretrained model's vocabulary with words of the training text that its tokenizer cannot read.

A WordPiece tokenizer reads a word none of whose pieces it knows as one unknown token (``[UNK]``): MiniLM,
an English uncased BERT, reads about 60% of the characters of Chinese news text that way, so the model cannot
tell those words apart. ``data.extend_vocabulary`` adds the most frequent of them (seen at least twice in the
training text) as new tokens; the embedding matrix grows by as many rows, which start at the mean embedding
and train with the task's head (LoRA: as peft trainable tokens). Token classification counts the words of its
records; masked-LM pre-training the words of its documents as the tokenizer itself cuts text into words
(:func:`pretokenized_words`), so a model pre-trained that way hands the words on to a tagging run started from it,
which then finds them known.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

# A word seen fewer times than this in the training text is not added: one sighting teaches its row nothing.
MIN_WORD_COUNT = 2
# Words tokenised per tokenizer call while looking for unknown ones.
WORD_BATCH = 10_000


def pretokenized_words(tokenizer: Any, texts: Iterable[str]) -> Iterator[str]:
    """The words of ``texts`` as the tokenizer cuts text before its model sees it: its normaliser (BERT lower-cases,
    strips accents and puts spaces around every CJK character) and its pre-tokenizer (BERT: whitespace and
    punctuation). A tokenizer without a Rust backend, or without a pre-tokenizer, gives the normalised text's
    whitespace-separated words."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    for text in texts:
        normal = normalizer.normalize_str(text) if normalizer is not None else text
        if pre_tokenizer is None:
            yield from normal.split()
            continue
        for word, _ in pre_tokenizer.pre_tokenize_str(normal):
            if word.strip():
                yield word


def unknown_words(tokenizer: Any, counts: Counter[str], limit: int, *, min_count: int = MIN_WORD_COUNT) -> list[str]:
    """Up to ``limit`` of the words in ``counts`` (seen at least ``min_count`` times) that ``tokenizer`` reads as
    nothing but its unknown token, most frequent first (ties in the order first seen); none for a tokenizer
    without an unknown token."""
    unk = tokenizer.unk_token_id
    if unk is None or limit <= 0:
        return []
    candidates = [w for w, n in counts.most_common() if n >= min_count]
    chosen: list[str] = []
    for start in range(0, len(candidates), WORD_BATCH):
        batch = candidates[start:start + WORD_BATCH]
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        chosen += [w for w, i in zip(batch, ids, strict=True) if i and all(t == unk for t in i)]
        if len(chosen) >= limit:
            break
    return chosen[:limit]


def extend_vocabulary(tokenizer: Any, counts: Counter[str], limit: int) -> list[str]:
    """Add :func:`unknown_words` to ``tokenizer`` as new tokens (matched on the normalised text, as its own words
    are) and return them; the model's embeddings must then grow to ``len(tokenizer)`` (:func:`grow_embeddings`)."""
    chosen = unknown_words(tokenizer, counts, limit)
    if chosen:
        tokenizer.add_tokens(chosen)
        log.info("added %d training words the tokenizer read as %s to its vocabulary (%s ...)", len(chosen),
                 tokenizer.unk_token, " ".join(chosen[:10]))
    return chosen


def grow_embeddings(model: Any, size: int) -> bool:
    """Resize ``model``'s input embeddings (and the output projection tied to them) to ``size`` rows, new rows
    drawn around the mean embedding (transformers' ``mean_resizing``); an output bias (BERT's masked-LM head:
    ``cls.predictions.bias``, which transformers pads with zeros) gets the mean of its old entries in the new
    ones, so a new token starts out as likely as an average one. Returns whether anything grew."""
    old = model.get_input_embeddings().weight.shape[0]
    if size <= old:
        return False
    model.resize_token_embeddings(size, mean_resizing=True)
    output = model.get_output_embeddings()
    bias = getattr(output, "bias", None) if output is not None else None
    if isinstance(bias, torch.Tensor) and bias.shape[0] == size:
        with torch.no_grad():
            bias[old:] = bias[:old].mean()
    return True


def input_embedding_paths(model: Any) -> list[str]:
    """Paths of the module(s) that are the model's input embeddings (BERT: ``bert.embeddings.word_embeddings``),
    whose last part a task names in ``head_module_names`` to train grown rows with the head; an output projection
    tied to them (a masked-LM decoder) shares the weight and trains with it."""
    embeddings = model.get_input_embeddings()
    return [name for name, module in model.named_modules() if module is embeddings and name]
