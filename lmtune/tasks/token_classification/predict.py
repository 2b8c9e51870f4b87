"""How a saved token_classification model folder answers new inputs (``lmtune predict``, ``Run.predict``, the server)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForTokenClassification

from lmtune.data import tagging
from lmtune.data.features import clip_text
from lmtune.data.readers import Table
from lmtune.errors import DataError
from lmtune.models import explain as attribution
from lmtune.models.loading import load_for_prediction
from lmtune.tasks.token_classification.task import as_word_list, entities_from_tags

log = logging.getLogger(__name__)

# Why an item is refused (the server answers 400 with it, after "item N: ").
NOT_TEXT = "a 'token_classification' model takes texts (strings)"


class TokenClassificationPredictor:
    """Entities in raw text (or in given word lists) with a saved token-classification model folder."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        self.meta = meta
        self.tokenizer, self.model, self.device = load_for_prediction(
            AutoModelForTokenClassification, model_dir, what="the token-classification model", device=device)
        self.labels: list[str] = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.word_split = str(meta.get("word_split") or "whitespace")
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = min(int(meta.get("max_length") or 512), int(positions))

    # -------------------------------------------------------------------------------- words -> tags
    def _windows(self, sentences: list[list[str]]) -> list[tuple[int, int, int]]:
        """(sentence, first word, end word) windows whose sub-tokens fit ``max_length`` with special tokens."""
        budget = max(1, self.max_length - self.tokenizer.num_special_tokens_to_add())
        flat = [w for words in sentences for w in words]
        counts = [len(ids) for ids in self.tokenizer(flat, add_special_tokens=False)["input_ids"]] if flat else []
        out = []
        k = 0
        for s, words in enumerate(sentences):
            start, used = 0, 0
            for i in range(len(words)):
                n = counts[k + i]
                if used + n > budget and i > start:
                    out.append((s, start, i))
                    start, used = i, 0
                used += n
            if words:
                out.append((s, start, len(words)))
            k += len(words)
        return out

    def tag_words(self, sentences: list[list[str]], *, batch_size: int = 32, progress: Any = None
                  ) -> list[tuple[list[str], list[float]]]:
        """Per sentence, a tag and its probability for every word (words without a sub-token: ``O``)."""
        # A word longer than max_length tokens is tagged alone and truncated, so clipping it by characters first
        # changes nothing but the cost (every word is still tagged: long texts are windowed, never clipped).
        sentences = [[clip_text(w, self.max_length) for w in words] for words in sentences]
        tags = [["O"] * len(words) for words in sentences]
        probs = [[1.0] * len(words) for words in sentences]
        windows = sorted(self._windows(sentences), key=lambda w: w[1] - w[2])  # longest first: least padding
        bar = progress.add_task("predict", total=len(windows)) if progress is not None else None
        with torch.inference_mode():
            for b in range(0, len(windows), batch_size):
                chunk = windows[b:b + batch_size]
                enc = self.tokenizer([sentences[s][i:j] for s, i, j in chunk], is_split_into_words=True,
                                     truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in enc.items()}
                p = torch.softmax(self.model(**inputs).logits.float(), -1)  # (B, T, L)
                top, which = p.max(-1)  # (B, T)
                best, arg = top.cpu().numpy(), which.cpu().numpy()
                for row, (s, i, _) in enumerate(chunk):
                    previous = None
                    for pos, wid in enumerate(enc.word_ids(row)):
                        if wid is not None and wid != previous:
                            tags[s][i + wid] = self.labels[int(arg[row, pos])]
                            probs[s][i + wid] = float(best[row, pos])
                        previous = wid
                if progress is not None:
                    progress.update(bar, advance=len(chunk))
        return list(zip(tags, probs, strict=True))

    # -------------------------------------------------------------------------------- public
    def _words(self, item: Any) -> tuple[str, list[tuple[str, int, int]]]:
        """(text, words with offsets) of a raw text, or of a word list (joined by spaces; none for chars)."""
        if isinstance(item, dict):
            item = item.get("tokens", item.get("text"))
        if isinstance(item, str):
            return item, tagging.split_words(item, self.word_split)
        if isinstance(item, (list, tuple)) and all(isinstance(w, str) for w in item):
            text, offsets = tagging.join_words(list(item), self.word_split)
            return text, [(w, s, e) for w, (s, e) in zip(item, offsets, strict=True)]
        raise DataError(f"expected a text or a list of words, found {type(item).__name__}", field="texts")

    def check_item(self, item: Any) -> str | None:
        """Why ``item`` is not a text, or None. (:meth:`predict` also takes word lists; the server takes texts.)"""
        return None if isinstance(item, str) else NOT_TEXT

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """Per input (a text, or a list of words): ``entities`` (``entity``, ``text``, ``start``/``end``
        character offsets into the text, ``score``: the mean tag probability), ``tokens`` and ``tags``."""
        parsed = [self._words(item) for item in items]
        tagged = self.tag_words([[w for w, _, _ in words] for _, words in parsed], batch_size=batch_size,
                                progress=progress)
        out = []
        for (text, words), (tags, probs) in zip(parsed, tagged, strict=True):
            entities = []
            for kind, first, last in entities_from_tags(tags):
                start, end = words[first][1], words[last][2]
                entities.append({"entity": kind, "text": text[start:end], "start": start, "end": end,
                                 "score": float(np.mean(probs[first:last + 1])), "token_start": first,
                                 "token_end": last + 1})
            out.append({"entities": entities, "tokens": [w for w, _, _ in words], "tags": tags})
        return out

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`predict` for every row of ``table``: a text column (``columns["text"]``, else the training
        text column or ``text``) or a column of word lists (``tokens``; CoNLL files give one)."""
        return self.predict(self.table_items(table, columns), batch_size=batch_size, progress=progress)

    def table_items(self, table: Table, columns: dict[str, str | None] | None = None) -> list[Any]:
        """The items (texts or word lists) of ``table``'s rows, read as :meth:`predict_table` reads them."""
        tokens_col = str(self.meta.get("tokens_column") or "tokens")
        text_col = str(self.meta.get("text_column") or "text")
        given = (columns or {}).get("text")
        if given:
            column = given
        elif tokens_col in table.columns:
            column = tokens_col
        elif text_col in table.columns:
            column = text_col
        else:
            raise DataError(f"needs a '{text_col}' column (raw text) or a '{tokens_col}' column (word lists); "
                            f"the columns are: {', '.join(repr(c) for c in table.columns)}", file=table.source,
                            hint="name the column with --text-column")
        items: list[Any] = []
        for value, line in zip(table.column(column), table.lines, strict=True):
            if isinstance(value, str) and column != tokens_col:
                if not value.strip():
                    raise DataError("empty text", file=table.source, line=line, field=column)
                items.append(value)
            elif value is None or (isinstance(value, float) and np.isnan(value)):
                raise DataError("empty text", file=table.source, line=line, field=column)
            else:
                words = as_word_list(value, table.source, line, column)
                if not words:
                    raise DataError("empty sentence (no words)", file=table.source, line=line, field=column)
                items.append(words)
        return items

    # -------------------------------------------------------------------------------- explanations
    def explain(self, items: list[Any], *, label: str | None = None, n_steps: int = attribution.DEFAULT_STEPS,
                batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`predict`'s rows, each entity with the token attributions (integrated gradients on the input
        embeddings, :mod:`lmtune.models.explain`) towards its predicted tags: the tags' log-odds summed over
        the entity's words (their first sub-tokens, where the tags are read).

        Each entity gains ``attributions`` (per token of the window the entity was tagged in: ``token``,
        ``start``/``end`` character offsets into the text, ``score`` in [-1, 1], positive for evidence for the
        entity), ``word_attributions`` (the same merged per word) and ``explained`` (``tags``,
        ``score_change``, ``convergence_delta``: see :meth:`ClassificationPredictor.explain`'s twin fields).
        ``label`` does not apply: every entity found is explained."""
        attribution.check_steps(n_steps)
        if label is not None:
            raise DataError("a token-classification model explains each entity it finds; a label to explain "
                            "does not apply", field="explain_label")
        parsed = [self._words(item) for item in items]
        rows = self.predict(items, batch_size=batch_size)
        sentences = [[clip_text(w, self.max_length) for w, _, _ in words] for _, words in parsed]
        windows = self._windows(sentences)
        reference = attribution.reference_token_id(self.tokenizer)
        bar = progress.add_task("explain", total=len(items)) if progress is not None else None
        for s, ((text, words), row) in enumerate(zip(parsed, rows, strict=True)):
            for entity in row["entities"]:
                first, last = entity["token_start"], entity["token_end"] - 1
                start, end = next((i, j) for w, i, j in windows if w == s and i <= first < j)
                entity.update(self._explain_entity(text, words, sentences[s][start:end], start,
                                                   row["tags"][first:min(last + 1, end)], first - start,
                                                   reference, n_steps))
            if progress is not None:
                progress.update(bar, advance=1)
        return rows

    def explain_table(self, table: Table, *, columns: dict[str, str | None] | None = None,
                      label: str | None = None, n_steps: int = attribution.DEFAULT_STEPS, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """:meth:`explain` for every row of ``table``, read as :meth:`predict_table` reads it."""
        return self.explain(self.table_items(table, columns), label=label, n_steps=n_steps, batch_size=batch_size,
                            progress=progress)

    def _explain_entity(self, text: str, words: list[tuple[str, int, int]], window: list[str], offset: int,
                        tags: list[str], first: int, reference: int, n_steps: int) -> dict[str, Any]:
        """The attribution fields of one entity: ``window`` holds the words ``offset``... of the text, the
        entity's words start at ``first`` within it and carry ``tags``."""
        enc = self.tokenizer(window, is_split_into_words=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")[0].tolist()
        word_ids = enc.word_ids(0)
        # The tags are read at each word's first sub-token: the score is theirs, summed over the entity's words.
        positions, previous = {}, None
        for pos, wid in enumerate(word_ids):
            if wid is not None and wid != previous:
                positions[wid] = pos
            previous = wid
        targets = [(positions[first + n], self.labels.index(tag)) for n, tag in enumerate(tags)
                   if first + n in positions]

        def score(logits: torch.Tensor) -> torch.Tensor:  # (B, T, L) -> (B,)
            return sum((attribution.log_odds(logits[:, pos], k) for pos, k in targets),
                       torch.zeros(logits.shape[0], device=logits.device))

        inputs = {key: value.to(self.device) for key, value in enc.items()}
        keep = torch.tensor([[wid is None for wid in word_ids]], device=self.device)  # special tokens stay
        result = attribution.integrated_gradients(self.model, inputs, score, keep=keep, reference_id=reference,
                                                  n_steps=n_steps)
        spans = [None if wid is None or a == b else (0, words[offset + wid][1] + a, words[offset + wid][1] + b, wid)
                 for wid, (a, b) in zip(word_ids, offsets, strict=True)]
        tokens, word_rows = attribution.describe(lambda _: text, spans, result.scores)
        return {"attributions": tokens, "word_attributions": word_rows,
                "explained": {"tags": tags, **attribution.summary(result)}}
