"""How a saved reward model folder scores answers (``lmtune predict``, ``Run.predict``, ``POST /v1/score``, and
GRPO's reward function through :meth:`RewardPredictor.score`).

An item is scored as training rendered its pairs: the prompt and the answer with the chat template saved with
the model (:func:`lmtune.data.preference.render_completion`). Items:

- ``{"prompt": str | messages, "completion": str}``: a text prompt is one user message; messages are a
  conversation ending with a user message (an optional system message first);
- ``{"messages": [...]}``: a whole conversation ending with the assistant's answer, the one scored;
- a plain string: scored as raw text, tokenised as it is (the tokenizer's own special tokens, no chat
  template), for text rendered elsewhere; a reward model trained on chat pairs scores raw text less reliably.

A conversation longer than the model's ``max_length`` loses prompt tokens from the left (a leading BOS kept), as
``data.too_long: truncate_left`` does in training; an answer that alone is longer cannot be scored (an error).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lmtune.data.chat import to_messages
from lmtune.data.features import clip_text
from lmtune.data.preference import render_completion
from lmtune.data.readers import Table
from lmtune.errors import DataError, ModelError
from lmtune.models.loading import load_saved_model
from lmtune.models.text_generator import validate_prompt_messages

# Why an item is refused (the server answers 400 with it, after "item N: ").
ITEM_SHAPES = ('a reward model scores {"prompt": text or messages, "completion": text} items, {"messages": [...]} '
               "conversations ending with the assistant's answer, or raw text (a string)")
# The columns predict_table reads where lmtune.json names none.
DEFAULT_COLUMNS = {"prompt": "prompt", "completion": "completion", "chosen": "chosen", "rejected": "rejected",
                   "system": "system", "messages": "messages", "text": "text"}


def rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) float32 scores of N right-padded rows: the head's output at each row's last non-pad token."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()  # (N, 1) -> (N,)


class RewardPredictor:
    """Batched scoring with a saved reward model folder (plain transformers files)."""

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        self.meta = meta
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = load_saved_model(AutoModelForSequenceClassification, model_dir,
                                      error="cannot load the reward model", dtype=torch.float32)
        self.model.to(self.device).eval()
        # The id the head compares with to find each row's last token: rows are padded with exactly it.
        pad = self.model.config.get_text_config().pad_token_id
        if pad is None:
            raise ModelError("the reward model's config has no pad_token_id, so a padded batch cannot be scored",
                             file=model_dir)
        self.pad_token_id = int(pad)
        self.max_length = int(meta.get("max_length") or 512)
        self.special_tokens_in_content = bool(meta.get("special_tokens_in_content"))
        self.columns = {**DEFAULT_COLUMNS, **(meta.get("columns") or {})}

    # -------------------------------------------------------------------------------- the Predictor interface
    def check_item(self, item: Any) -> str | None:
        """Why ``item`` is not a scorable input (see the module docstring), or None.

        The item is rendered here, length included: the server batches items of several requests into one
        :meth:`predict`, which must then not fail for one request's item."""
        try:
            self.item_ids(item)
        except DataError as exc:
            return exc.message
        return None

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None) -> list[dict[str, Any]]:
        """``{"score": float}`` per item, in input order (higher: a better answer)."""
        ids = []
        for n, item in enumerate(items):
            try:
                ids.append(self.item_ids(item))
            except DataError as exc:
                raise DataError(f"item {n + 1}: {exc.message}", field="input", hint=exc.hint) from None
        return [{"score": s} for s in self.score_ids(ids, batch_size=batch_size, progress=progress)]

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None) -> list[dict[str, Any]]:
        """Scores for the rows of ``table``, read in the first of these layouts it has:

        - a ``completion`` column (``columns["completion"]``, or ``text_pair``) and a ``prompt`` column
          (``columns["prompt"]``, or ``text``; text or messages): ``{"score"}`` per row;
        - ``chosen`` and ``rejected`` columns (with a prompt column, or as whole conversations): both answers
          scored, ``{"chosen_score", "rejected_score", "margin", "preferred"}`` (``preferred``: the answer that
          scores higher, ``chosen`` or ``rejected``);
        - a ``messages`` column of whole conversations, or a ``text`` column of raw texts: ``{"score"}``.

        Column names default to those in ``lmtune.json`` (the training data's ``data.columns``); an optional
        ``system`` column becomes a system message first. A bad cell is a DataError naming its line and column.
        """
        given = {k: v for k, v in (columns or {}).items() if v}
        names = {**self.columns, **given}
        names["prompt"] = given.get("prompt") or given.get("text") or self.columns["prompt"]
        names["completion"] = given.get("completion") or given.get("text_pair") or self.columns["completion"]
        have = set(table.columns)
        rows = list(zip(table.rows, table.lines, strict=True))
        if names["completion"] in have:
            ids = [self._row_ids(row, line, table.source, names, names["completion"]) for row, line in rows]
            return [{"score": s} for s in self.score_ids(ids, batch_size=batch_size, progress=progress)]
        if names["chosen"] in have and names["rejected"] in have:
            ids = [self._row_ids(row, line, table.source, names, names[side])
                   for side in ("chosen", "rejected") for row, line in rows]
            scores = self.score_ids(ids, batch_size=batch_size, progress=progress)
            out = []
            for chosen, rejected in zip(scores[: len(rows)], scores[len(rows):], strict=True):
                out.append({"chosen_score": chosen, "rejected_score": rejected, "margin": chosen - rejected,
                            "preferred": "chosen" if chosen >= rejected else "rejected"})
            return out
        if names["messages"] in have:
            ids = [self._conversation_ids(row.get(names["messages"]), table.source, line, names["messages"])
                   for row, line in rows]
        elif given.get("text", names["text"]) in have:
            column = given.get("text", names["text"])
            ids = [self._text_cell_ids(row.get(column), table.source, line, column) for row, line in rows]
        else:
            listed = ", ".join(repr(c) for c in table.columns)
            raise DataError(f"no columns to score; the columns are: {listed}", file=table.source,
                            hint=f"a reward model reads '{names['prompt']}' and '{names['completion']}' columns, "
                            f"'{names['chosen']}' and '{names['rejected']}' columns, a '{names['messages']}' column "
                            "of whole conversations, or a 'text' column of raw texts")
        return [{"score": s} for s in self.score_ids(ids, batch_size=batch_size, progress=progress)]

    # -------------------------------------------------------------------------------- scoring
    def score(self, prompts: list[list[dict[str, str]]], completions: list[str], *, batch_size: int = 32,
              progress: Any = None) -> list[float]:
        """The reward of each completion to its prompt (messages ending with a user message), rendered as in
        training; GRPO's reward function. A completion longer than ``max_length`` on its own is scored on the
        last ``max_length`` tokens of the conversation (a policy's answer is scored whatever its length)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        ids = [self.rendered_ids(p, c, clip=True) for p, c in zip(prompts, completions, strict=True)]
        return self.score_ids(ids, batch_size=batch_size, progress=progress)

    def score_ids(self, sequences: list[list[int]], *, batch_size: int = 32, progress: Any = None) -> list[float]:
        """The reward of each token-id sequence, in input order; batches are length-sorted and right-padded."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out = [0.0] * len(sequences)
        bar = progress.add_task("score", total=len(sequences)) if progress is not None else None
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(sequences[i]) for i in idx)
                input_ids = torch.full((len(idx), width), self.pad_token_id, dtype=torch.long)  # (B, T)
                mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
                for row, i in enumerate(idx):
                    input_ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i], dtype=torch.long)
                    mask[row, : len(sequences[i])] = 1
                scores = rewards(self.model, input_ids.to(self.device), mask.to(self.device)).cpu()  # (B,)
                for row, i in enumerate(idx):
                    out[i] = float(scores[row])
                if progress is not None:
                    progress.update(bar, advance=len(idx))
        return out

    # -------------------------------------------------------------------------------- items -> token ids
    def conversation(self, item: Any, *, source: str = "request", line: int | None = None
                     ) -> tuple[list[dict[str, str]], str] | str:
        """``(prompt messages, completion)`` of an item, or the text of a raw-text item; a DataError says why
        an item is not one (see the module docstring)."""
        if isinstance(item, str):
            if not item.strip():
                raise DataError("the text is empty", file=source, line=line)
            return item
        if not isinstance(item, dict):
            raise DataError(f"{ITEM_SHAPES}; found {type(item).__name__}", file=source, line=line)
        keys = set(item)
        if keys == {"messages"}:
            # to_messages counts lines from 1; a request has none (its errors name no line).
            messages = to_messages(item, "openai", {}, source=source, line=cast(int, line))
            return messages[:-1], messages[-1]["content"]
        if keys == {"prompt", "completion"}:
            return (self._prompt(item["prompt"], source, line, "prompt"),
                    self._answer(item["completion"], source, line, "completion"))
        raise DataError(f"{ITEM_SHAPES}; found an object with the keys {', '.join(sorted(map(str, keys))) or 'none'}",
                        file=source, line=line)

    def item_ids(self, item: Any) -> list[int]:
        """The token ids an item is scored on."""
        conversation = self.conversation(item)
        if isinstance(conversation, str):
            return self.text_ids(conversation)
        return self.rendered_ids(*conversation)

    def rendered_ids(self, prompt: list[dict[str, str]], completion: str, *, clip: bool = False) -> list[int]:
        """``prompt`` and ``completion`` rendered as in training, the prompt cut from the left to fit
        ``max_length``; an answer that alone does not fit is a DataError (``clip``: its last tokens are kept)."""
        example = render_completion(self.tokenizer, prompt, completion, max_length=self.max_length,
                                    too_long="truncate_left", special_tokens_in_content=self.special_tokens_in_content)
        if example is not None:
            return example.input_ids
        if not clip:
            raise DataError(f"the completion alone is longer than the {self.max_length} tokens this reward model "
                            "reads (its data.max_length)", hint="shorten the completion")
        whole = render_completion(self.tokenizer, prompt, completion, max_length=10**9, too_long="skip",
                                  special_tokens_in_content=self.special_tokens_in_content)
        assert whole is not None
        return whole.input_ids[-self.max_length :]

    def text_ids(self, text: str) -> list[int]:
        """Raw text tokenised as it is, its last ``max_length`` tokens kept (the score is read at the end)."""
        # Clipped before tokenising: a megabyte text costs what its last max_length tokens cost.
        ids = self.tokenizer(clip_text(text, self.max_length, side="left"))["input_ids"]
        return list(ids[-self.max_length :])

    # -------------------------------------------------------------------------------- cells
    def _prompt(self, value: Any, source: str, line: int | None, field: str) -> list[dict[str, str]]:
        """A prompt (text, or messages ending with a user message; JSON text of them) as messages."""
        value = _messages_cell(value)
        if isinstance(value, str):
            if not value.strip():
                raise DataError("the prompt is empty", file=source, line=line, field=field)
            return [{"role": "user", "content": value}]
        if isinstance(value, list):
            return validate_prompt_messages(value, source=source, line=line, field=field)
        raise DataError(f"the prompt must be text or a list of messages, found {type(value).__name__}",
                        file=source, line=line, field=field)

    @staticmethod
    def _answer(value: Any, source: str, line: int | None, field: str) -> str:
        """An answer: text, or a list holding the one assistant message (JSON text of it too)."""
        value = _messages_cell(value)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
                and value[0].get("role") == "assistant":
            value = value[0].get("content")
        if not isinstance(value, str):
            raise DataError('the completion must be text (or [{"role": "assistant", "content": text}]), found '
                            f"{type(value).__name__}", file=source, line=line, field=field)
        if not value.strip():
            raise DataError("the completion is empty", file=source, line=line, field=field)
        return value

    def _with_system(self, prompt: list[dict[str, str]], row: dict[str, Any], names: dict[str, str], source: str,
                     line: int) -> list[dict[str, str]]:
        """``prompt`` behind the row's system column, when it has text (as training read it)."""
        system = row.get(names["system"])
        if system is None or (isinstance(system, str) and not system.strip()):
            return prompt
        if not isinstance(system, str):
            raise DataError(f"expected text, found {type(system).__name__}", file=source, line=line,
                            field=names["system"])
        if prompt[0]["role"] == "system":
            raise DataError("the row has a system column and its prompt also starts with a system message",
                            file=source, line=line, field=names["system"], hint="keep one of them")
        return [{"role": "system", "content": system}, *prompt]

    def _row_ids(self, row: dict[str, Any], line: int, source: str, names: dict[str, str], answer: str
                 ) -> list[int]:
        """Token ids of one row's ``answer`` column to its prompt column, or of a whole conversation there."""
        value = row.get(answer)
        if names["prompt"] not in row:  # chosen/rejected as whole conversations (the implicit-prompt shape)
            return self._conversation_ids(value, source, line, answer)
        prompt = self._prompt(row.get(names["prompt"]), source, line, names["prompt"])
        prompt = self._with_system(prompt, row, names, source, line)
        try:
            return self.rendered_ids(prompt, self._answer(value, source, line, answer))
        except DataError as exc:
            raise DataError(exc.message, file=source, line=line, field=answer, hint=exc.hint) from None

    def _conversation_ids(self, value: Any, source: str, line: int, field: str) -> list[int]:
        """Token ids of a whole conversation cell (ending with the answer scored)."""
        messages = to_messages({field: _messages_cell(value)}, "openai", {"messages": field}, source=source,
                               line=line)
        try:
            return self.rendered_ids(messages[:-1], messages[-1]["content"])
        except DataError as exc:
            raise DataError(exc.message, file=source, line=line, field=field, hint=exc.hint) from None

    def _text_cell_ids(self, value: Any, source: str, line: int, field: str) -> list[int]:
        if not isinstance(value, str) or not value.strip():
            raise DataError("empty text" if value is None or isinstance(value, str) else
                            f"expected text, found {type(value).__name__}", file=source, line=line, field=field)
        return self.text_ids(value)


def _messages_cell(value: Any) -> Any:
    """A cell holding a JSON list of message objects as text (a CSV cell) read as that list; else unchanged
    (text that merely starts with a bracket stays text)."""
    if not isinstance(value, str):
        return value
    stripped = value.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        return value
    try:
        parsed = json.loads(stripped)
    except json.JSONDecodeError:
        return value
    return parsed if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed) else value
