"""A saved causal LM answering prompts: :class:`TextGenerator` (load once, render, check lengths, generate,
stream) and :class:`ChatSession` (a conversation kept across turns, what ``lmtune chat`` drives).

Generic causal-LM inference for every decoder task: what differs between them comes from the task's
``TaskInfo`` (``chat``: prompts are user messages in the chat template, answers also end at the
vocabulary's end-of-turn tokens). ``Run`` (generate, chat, predict files), the server and the decoder
tasks' predictor build on it.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from lmtune.config.tasks import TASK_INFOS
from lmtune.console import quiet_libraries
from lmtune.data.chat import end_of_turn_ids, to_messages
from lmtune.data.table import Table
from lmtune.errors import DataError, ModelError
from lmtune.models import generation
from lmtune.models.decode_matmuls import SmallForwardRoute, pack_linears, route_small_forwards
from lmtune.models.generation import GenerationSettings
from lmtune.models.loading import load_saved_adapter, load_saved_model
from lmtune.models.registry import load_padded_tokenizer


def load_causal_lm(model_dir: Path, meta: dict[str, Any], dtype: torch.dtype = torch.float32) -> Any:
    """The model folder as a causal LM with ``dtype`` weights; an adapter-only folder is applied to its base
    and merged (in float32, then cast). A quantized folder (``quantization_config``: lmtune's torchao exports)
    keeps the dtypes it was saved with."""
    error = "cannot load the model for generation"
    if not (model_dir / "config.json").is_file() and (model_dir / "adapter_config.json").is_file():
        base_path = meta.get("base_model_path")
        if not base_path:
            raise ModelError("the model folder holds only an adapter and lmtune.json names no base model",
                             file=model_dir, field="base_model_path")
        base = load_saved_model(AutoModelForCausalLM, base_path, error=error, dtype=torch.float32)
        return load_saved_adapter(base, model_dir).merge_and_unload().to(dtype)
    if _quantized(model_dir):
        dtype = torch.float32
    return load_saved_model(AutoModelForCausalLM, model_dir, error=error, dtype=dtype)


def _quantized(model_dir: Path) -> bool:
    """Whether the folder's config.json records a quantization (its weights' dtypes are the export's)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # transformers' own loading says what is wrong with it
    return isinstance(config, dict) and bool(config.get("quantization_config"))


class TextGenerator:
    """A saved causal LM loaded once for generation: eval mode, on CUDA when there is one, its weights in
    ``dtype`` (float32 unless the caller resolved another precision: ``Run.load(path, precision=...)``).
    ``gemv_small_forwards``: decoding steps of one or two rows run their matmuls on ATen's gemv;
    ``pack_for_onednn``: the others multiply bf16 weights packed in oneDNN's layout
    (:mod:`lmtune.models.decode_matmuls`).

    Answers end at the model's end-of-turn/EOS tokens: ``lmtune.json``'s ``eos_token_ids`` and, for chat
    models (the task's ``TaskInfo.chat``), every end-of-turn token the vocabulary holds (as the training
    evaluation does).
    """

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, gemv_small_forwards: bool = False,
                 pack_for_onednn: bool = False) -> None:
        quiet_libraries()
        self.task = str(meta.get("task"))
        info = TASK_INFOS.get(self.task)
        # A chat model: prompts are user messages rendered with the chat template.
        self.chat = bool(info and info.chat)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_padded_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, meta, dtype).to(self.device).eval()
        self.dtype: torch.dtype = next(self.model.parameters()).dtype
        # Batches of answers and prompts: bf16 linears multiply with weights packed for oneDNN
        # (lmtune.training.precision.pack_bf16_linears decides); bytes of the packed copies, 0 when none.
        self.packed_bytes = pack_linears(self.model) if pack_for_onednn else 0
        # One- and two-row decoding steps on ATen's gemv (bf16 on a CPU where it measured faster; the caller
        # decides: lmtune.training.precision.route_bf16_gemv). None: every matmul as torch picks.
        self.small_forward_route: SmallForwardRoute | None = (
            route_small_forwards(self.model) if gemv_small_forwards else None)
        eos = {int(i) for i in meta.get("eos_token_ids") or []}
        if self.chat:
            eos |= end_of_turn_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None))
        # None: lmtune.generation.generate falls back to the model's generation config.
        self.eos_token_ids: list[int] | None = sorted(eos) or None
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.positions: int | None = int(positions) if positions else None
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None)
        if not tokenizer_max or tokenizer_max > 1_000_000:  # transformers' "no limit" is a huge number
            tokenizer_max = None
        # The longest sequence the model was trained on (lmtune.json), else what the tokenizer says.
        self.max_length = int(meta.get("max_length") or tokenizer_max or self.positions or 2048)

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer can render chat messages."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def require_chat(self) -> None:
        """Raise ModelError unless this model can hold a conversation (a chat model with a chat template)."""
        if not self.chat:
            raise ModelError(f"chat needs an instruction-tuned (sft) model; this one was trained on raw text "
                             f"(task {self.task}) and continues text rather than answering",
                             hint="continue prompts with `lmtune predict RUN -i prompts.jsonl -o out.jsonl` "
                             "or run.generate(prompts)")
        if not self.has_chat_template:
            raise ModelError("the model has no chat template, so a conversation cannot be turned into a prompt",
                             hint="chat needs an instruction-tuned (sft) model; use `lmtune predict` for "
                             "plain-text prompts")

    def render(self, prompt: str) -> str:
        """The text the model sees for a prompt: a user message in the chat template (chat models), else
        the prompt itself."""
        if self.chat:
            return generation.chat_prompt(self.tokenizer, [{"role": "user", "content": prompt}])
        return prompt

    def count_tokens(self, rendered: str) -> int:
        """Tokens of a rendered prompt, counted as :func:`lmtune.generation.generate` encodes it (a sanitised
        chat prompt's own ids: control-token text in content counts as the several tokens it becomes)."""
        return len(generation.encode_prompt(self.tokenizer, rendered))

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Most prompt tokens: the trained length, and room for the answer within the model's positions."""
        budget = self.max_length
        if self.positions is not None and self.positions > max_new_tokens:
            budget = min(budget, self.positions - max_new_tokens)
        return budget

    def too_long_message(self, tokens: int, max_new_tokens: int) -> str:
        """Why a prompt of ``tokens`` tokens cannot be answered."""
        return (f"the prompt is {tokens} tokens; with max_new_tokens {max_new_tokens} it does not fit the "
                f"model's {self.positions} positions")

    def check_lengths(self, rendered: list[str], max_new_tokens: int, *,
                      raise_error: bool = True) -> list[tuple[int, int]]:
        """(index, tokens) of the prompts whose answer would run past the model's positions; raises a
        DataError naming the first unless ``raise_error`` is False."""
        if self.positions is None:
            return []
        too_long = [(i, n) for i, n in enumerate(map(self.count_tokens, rendered)) if n + max_new_tokens > self.positions]
        if too_long and raise_error:
            i, n = too_long[0]
            raise DataError(f"prompt {i + 1}: {self.too_long_message(n, max_new_tokens)}", field="prompts",
                            hint="shorten the prompt or lower max_new_tokens")
        return too_long

    def render_table(self, table: Table, text_column: str | None, max_new_tokens: int) -> list[str]:
        """The rendered prompt of every row of ``table``: the ``prompt`` column (``text_column`` overrides;
        a ``text`` column, as in a .txt file, also serves), or for chat models a ``messages`` column holding
        the conversation so far (ending with a user message). A bad cell, or a prompt whose answer would not
        fit the model's positions, is a DataError naming file, line and column."""
        column, is_messages = self.prompt_column(table, text_column)
        rendered = []
        for value, line in zip(table.column(column), table.lines, strict=True):
            if is_messages:
                conversation = validate_prompt_messages(value, source=table.source, line=line, field=column)
                rendered.append(generation.chat_prompt(self.tokenizer, conversation))
            else:
                rendered.append(self.render(self._prompt_text(value, table.source, line, column)))
        too_long = self.check_lengths(rendered, max_new_tokens, raise_error=False)
        if too_long:
            i, tokens = too_long[0]
            raise DataError(self.too_long_message(tokens, max_new_tokens), file=table.source,
                            line=table.lines[i], field=column,
                            hint=f"{len(too_long)} row(s) are too long; shorten them or lower --max-new-tokens")
        return rendered

    def prompt_column(self, table: Table, text_column: str | None) -> tuple[str, bool]:
        """The column holding the prompts and whether it holds chat messages (chat models only)."""
        chat = self.chat
        if text_column is not None:
            values = table.column(text_column)  # a clear error when there is no such column
            return text_column, chat and (text_column == "messages" or any(isinstance(v, list) for v in values))
        for name in ("prompt", *(("messages",) if chat else ()), "text"):
            if name in table.columns:
                return name, name == "messages"
        wanted = "a 'prompt' column (or 'messages', a conversation ending with a user message)" if chat \
            else "a 'prompt' column"
        raise DataError(f"needs {wanted}; the columns are: {', '.join(repr(c) for c in table.columns)}",
                        file=table.source, hint="name the column holding the prompts with --text-column")

    def _prompt_text(self, value: Any, source: str, line: int, column: str) -> str:
        """One prompt cell as text, or a DataError naming where it is."""
        if isinstance(value, str) and value.strip():
            return value
        if value is None or isinstance(value, str) or (isinstance(value, float) and np.isnan(value)):
            raise DataError("empty prompt", file=source, line=line, field=column)
        hint = None
        if isinstance(value, list) and not self.chat:
            hint = f"a {self.task} model continues plain text; chat messages need an sft run"
        raise DataError(f"expected text, found {type(value).__name__}", file=source, line=line, field=column,
                        hint=hint)

    def generate(self, rendered: list[str], settings: GenerationSettings, *, progress: Any = None) -> list[dict[str, Any]]:
        """:func:`lmtune.generation.generate` on rendered prompts, stopping at this model's EOS ids."""
        return generation.generate(self.model, self.tokenizer, rendered, settings, progress=progress,
                        eos_token_ids=self.eos_token_ids)

    def stream(self, messages: list[dict[str, str]], settings: GenerationSettings) -> Generator[str, None, None]:
        """:func:`lmtune.generation.stream_chat`: the answer to ``messages`` in pieces, as generated."""
        stream = generation.stream_chat(self.model, self.tokenizer, messages, settings, eos_token_ids=self.eos_token_ids)
        return cast("Generator[str, None, None]", stream)  # a generator function; closing it stops generation


class ChatSession:
    """A conversation with a chat model kept across turns: what ``lmtune chat`` drives.

    :meth:`ask` adds the user's message, dropping the oldest user/assistant exchanges (never the system
    message) until the rendered prompt fits :meth:`TextGenerator.prompt_budget`; :meth:`answer` streams
    the reply and keeps the exchange in the history.
    """

    def __init__(self, generator: TextGenerator, settings: GenerationSettings, *, system: str | None = None) -> None:
        self.generator = generator
        self.settings = settings
        self.system: str | None = None
        self.set_system(system)
        self.history: list[dict[str, str]] = []  # user/assistant messages, alternating
        self.budget = generator.prompt_budget(settings.max_new_tokens)
        self._pending: dict[str, str] | None = None

    def set_system(self, text: str | None) -> None:
        """Set the system prompt (None or blank: none)."""
        self.system = text.strip() if text and text.strip() else None

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()
        self._pending = None

    def messages(self, extra: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The conversation as the model sees it: system message, history, then ``extra``."""
        return self._with_system(self.history + (extra or []))

    def _with_system(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt_tokens(self, turns: list[dict[str, str]]) -> int:
        """Tokens of the rendered prompt for ``turns`` after the system message."""
        return self.generator.count_tokens(generation.chat_prompt(self.generator.tokenizer, self._with_system(turns)))

    def ask(self, text: str) -> int:
        """Queue the user's message for :meth:`answer`; returns how many old exchanges were dropped to fit.

        A message that does not fit even alone (with the system prompt) is a DataError; the history is
        then left as it was.
        """
        if not text.strip():
            raise DataError("the message is empty")
        user = {"role": "user", "content": text}
        history = list(self.history)
        dropped = 0
        while history and self.prompt_tokens([*history, user]) > self.budget:
            del history[:2]  # the oldest exchange: a user message and its answer
            dropped += 1
        tokens = self.prompt_tokens([*history, user])
        if tokens > self.budget:
            raise DataError(f"the message is too long: the prompt would be {tokens} tokens, the model takes "
                            f"{self.budget}", hint="send a shorter message" + (" or a shorter /system prompt"
                                                                           if self.system else ""))
        self.history = history
        self._pending = user
        return dropped

    def answer(self) -> Generator[str, None, None]:
        """Stream the answer to the message given to :meth:`ask`; the exchange joins the history when the
        stream ends, also when it is closed early (the answer so far is kept), not when generation fails."""
        if self._pending is None:
            raise RuntimeError("ChatSession.answer() needs a message from ask() first")
        user, self._pending = self._pending, None
        pieces: list[str] = []
        failed = False
        stream = self.generator.stream(self.messages([user]), self.settings)
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        except Exception:
            failed = True
            raise
        finally:
            stream.close()  # stops the generation thread when the reader stopped early
            if not failed:
                self.history += [user, {"role": "assistant", "content": "".join(pieces).strip()}]

    def send(self, text: str) -> str:
        """:meth:`ask` and the whole of :meth:`answer`, as one string."""
        self.ask(text)
        return "".join(self.answer())


def validate_prompt_messages(value: Any, *, source: str, line: int | None, field: str) -> list[dict[str, str]]:
    """A conversation awaiting the assistant's answer, validated: an optional system message, then
    user/assistant turns alternating, ending with a user message (or with the tool messages answering the
    assistant's last tool calls). OpenAI layout (``role``/``content``);
    JSON text (a CSV cell) is parsed. Problems are DataErrors naming ``source``, ``line`` and ``field``."""

    def fail(message: str) -> DataError:
        return DataError(message, file=source, line=line, field=field)

    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise fail(f"the messages are not valid JSON: {exc.msg} (character {exc.pos})") from None
    if isinstance(value, list):
        if not value:
            raise fail("the conversation has no messages")
        last = value[-1]
        role = last.get("role") if isinstance(last, dict) else None
        if isinstance(role, str) and role.strip().lower() in ("assistant", "system"):
            raise fail(f"the conversation must end with a user message (the answer is generated); the last, "
                       f"message {len(value)} (index {len(value) - 1}), is {role.strip().lower()!r}")
        # to_messages checks a training record, which ends with an answer: give it a stand-in one.
        value = [*value, {"role": "assistant", "content": "-"}]
    messages = to_messages({field: value}, "openai", {"messages": field}, source=source, line=cast(int, line))
    return messages[:-1]
