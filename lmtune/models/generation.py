"""Batched text generation, the one loop for decoders and encoder-decoders: evaluation of generative tasks,
``lmtune predict``, ``lmtune chat``, the server.

Prompts are already-rendered texts (for chat models, rendered by :func:`chat_prompt`); for an
encoder-decoder they are the source texts. :func:`generate` sorts them by token length (longest first)
and runs ``model.generate`` batch by batch with an attention mask and the KV cache (a decoder's batch through
:func:`lmtune.models.row_dropping.decode`, the same loop dropping each row as its answer ends, where it applies). A decoder's batch is
left-padded (transformers derives position ids from the mask, ``cumsum(mask) - 1``, so a prompt's
greedy answer does not depend on the batch it lands in); an encoder-decoder's sources are right-padded
for the encoder and its decoder starts from the decoder start token. An answer ends at an EOS token, at
the first of ``settings.stop`` (cut from the text; for a decoder a stopping criterion halts that row as
soon as its text holds one) or after ``max_new_tokens`` tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from lmtune.data.chat_encoding import holds_control_text
from lmtune.data.features import clip_text
from lmtune.errors import ModelError
from lmtune.models import row_dropping

if TYPE_CHECKING:
    from rich.progress import Progress

    from lmtune.config import GenerationConfig


@dataclass
class GenerationSettings:
    """How answers are generated (mirrors :class:`lmtune.config.GenerationConfig`)."""

    max_new_tokens: int = 128
    """Most tokens generated per answer."""
    do_sample: bool = False
    """Sample (temperature, top_p) instead of greedy decoding."""
    temperature: float = 0.7
    """Sampling temperature (with do_sample)."""
    top_p: float = 0.9
    """Nucleus sampling mass (with do_sample); no top-k cut is applied."""
    repetition_penalty: float = 1.0
    """Penalty on repeated tokens (1.0: none)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end an answer (not included in it)."""
    batch_size: int = 16
    """Prompts generated together."""
    seed: int = 0
    """Seed for sampling."""
    num_beams: int = 1
    """Beam search width (1: greedy or sampling)."""
    length_penalty: float = 1.0
    """With beam search: exponent on the length in a beam's score."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size (0: off)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(
                f"need temperature > 0, 0 < top_p <= 1, repetition_penalty > 0; got {self.temperature}, "
                f"{self.top_p}, {self.repetition_penalty}"
            )
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.num_beams < 1 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"need num_beams >= 1 and no_repeat_ngram_size >= 0; got {self.num_beams}, "
                             f"{self.no_repeat_ngram_size}")

    @classmethod
    def from_config(cls, cfg: GenerationConfig) -> GenerationSettings:
        """The settings of a validated ``generation`` config section."""
        return cls(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            repetition_penalty=cfg.repetition_penalty,
            stop=list(cfg.stop),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            num_beams=cfg.num_beams,
            length_penalty=cfg.length_penalty,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        )


def generate_across_processes(accelerator: Any, items: list[Any],
                              generate_fn: Callable[[list[Any]], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``generate_fn`` on this process's share of ``items``; every process gets all results in input order.

    Evaluation generates on every process at once (each takes a contiguous share); the results are
    gathered with their indices, so the order never depends on the number of processes.
    """
    indexed = list(enumerate(items))
    # Every process gets the same number of items (the last one repeated where the split is uneven):
    # with sharded weights (FSDP, ZeRO-3) each forward pass is collective, so a process that ran out of
    # prompts early would leave the others waiting forever. Repeats are dropped by index below.
    pad = accelerator.num_processes > 1 and len(indexed) > 0
    with accelerator.split_between_processes(indexed, apply_padding=pad) as mine:
        outs = generate_fn([item for _, item in mine])
        local = [(i, o) for (i, _), o in zip(mine, outs, strict=True)]
    if accelerator.num_processes == 1:
        return [o for _, o in local]
    unique = dict(sorted(gather_object(local), key=lambda x: x[0]))
    return [unique[i] for i in range(len(items))]


class ChatPrompt(str):
    """A rendered chat prompt whose messages spell control tokens (``<|im_end|>\n<|im_start|>system ...``): the
    text as the template renders it, carrying ``token_ids``, its ids with that content tokenised as plain text
    (transformers' ``sanitize_control_tokens``), which :func:`encode_prompt` uses. Tokenising the text instead
    would turn the content's control-token text into real control tokens: a message could forge a turn.

    A ``str`` (as ``markupsafe.Markup`` is) so that every caller that handles prompts as text keeps working;
    text made from it (sliced, joined) is a plain ``str`` again and is tokenised as such.
    """

    token_ids: list[int]

    def __new__(cls, text: str, token_ids: list[int]) -> ChatPrompt:
        prompt = super().__new__(cls, text)
        prompt.token_ids = list(token_ids)
        return prompt

    def __reduce__(self) -> tuple[Any, ...]:
        return ChatPrompt, (str(self), self.token_ids)


def chat_prompt(tokenizer: Any, messages: list[dict[str, Any]], *, tools: Sequence[Any] | None = None) -> str:
    """Render chat ``messages`` ({"role", "content"} dicts) with the tokenizer's template, ready for the answer;
    ``tools`` (OpenAI function definitions) go to the template as ``apply_chat_template(..., tools=...)`` does.

    Content that spells a control token of the template comes back as a :class:`ChatPrompt` whose ids keep that
    text plain text, as does any conversation with tools or tool calls (their JSON is kept as text too); any
    other conversation as the rendered text (tokenised as it always was)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the tokenizer has no chat template, so chat messages cannot be turned into a prompt",
            hint="use a chat/instruct model (e.g. 'smollm2'), set tokenizer.chat_template, "
            "or pass plain text prompts instead of messages",
        )
    tool_list = list(tools) if tools else None
    prompt = tokenizer.apply_chat_template(messages, tools=tool_list, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):  # only a misbehaving custom tokenizer gets here
        raise ModelError(f"the chat template rendered {type(prompt).__name__}, not text")
    if tool_list or any(m.get("tool_calls") for m in messages) or holds_control_text(tokenizer, messages):
        ids = tokenizer.apply_chat_template(messages, tools=tool_list, tokenize=True, add_generation_prompt=True,
                                            sanitize_control_tokens=True, return_dict=False)
        return ChatPrompt(prompt, list(ids))
    return prompt


def _eos_ids(model: Any, tokenizer: Any, eos_token_ids: list[int] | None) -> list[int]:
    """EOS ids: the caller's, else the model's generation config (int or list), else the tokenizer's."""
    if eos_token_ids:
        return list(eos_token_ids)
    gen_config = getattr(model, "generation_config", None)
    configured = getattr(gen_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [int(configured)] if isinstance(configured, int) else [int(i) for i in configured]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """A rendered prompt's token ids, as :func:`generate` feeds a decoder (a :class:`ChatPrompt`'s own ids)."""
    # A chat template may write the BOS itself; letting the tokenizer add another would give two.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    if isinstance(prompt, ChatPrompt):
        before, after = _special_frame(tokenizer) if add_special else ([], [])
        return before + prompt.token_ids + after
    ids: list[int] = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    return ids


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer adds before and after a text (a BOS, an EOS, ...)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(framed) - len(plain) + 1):
        if framed[k : k + len(plain)] == plain:
            return framed[:k], framed[k + len(plain) :]
    return [], []


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA device whose RNG ``torch.random.fork_rng`` must save for ``device`` (none on a CPU)."""
    return (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )


class _ReportEachStep(StoppingCriteria):
    """Reports every decoding step to ``progress`` as ``advance(task, 0)`` and never ends a row: a progress
    object that raises there (the server's, once every client of the call has left) stops ``model.generate``
    within a step instead of after the whole batch; a rich ``Progress`` just refreshes."""

    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.progress.advance(self.task, 0)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _StopOnStrings(StoppingCriteria):
    """Ends a row once its generated text holds a stop string; records after how many new tokens.

    Also ends every row when :meth:`cancel` is called (a chat client that stopped reading). Rows that
    already emitted an EOS are left alone (generate pads them from then on).
    """

    def __init__(
        self, tokenizer: Any, stop: Sequence[str], prompt_length: int, eos_ids: Sequence[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_length = prompt_length
        self.eos_ids = set(eos_ids)
        # A stop string ends in the newest token (earlier steps were checked), so decoding a tail long
        # enough to hold the longest stop string suffices; 4 tokens per character covers byte-level
        # tokens of 4-byte UTF-8 characters.
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 8
        self.stopped_at: dict[int, int] = {}  # row -> new tokens generated when its stop string appeared
        self._finished: set[int] = set()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Make the next call end every row."""
        self._cancelled.set()

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        batch_size = input_ids.shape[0]
        if self._cancelled.is_set():
            return torch.ones(batch_size, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
        new_tokens = input_ids[:, self.prompt_length :].tolist()  # (B, generated so far)
        done = [False] * batch_size
        for row, tokens in enumerate(new_tokens):
            if row in self._finished:
                done[row] = True
                continue
            if tokens[-1] in self.eos_ids:
                self._finished.add(row)
                continue
            if self.stop:
                tail = self.tokenizer.decode(tokens[-self.window :], skip_special_tokens=True)
                if find_stop(tail, self.stop) is not None:
                    self.stopped_at[row] = len(tokens)
                    self._finished.add(row)
                    done[row] = True
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _AnswerStreamer(TextIteratorStreamer):
    """A ``TextIteratorStreamer`` that leaves EOS tokens out of the text, as :func:`generate` does.

    ``skip_special_tokens`` alone is not enough: an EOS id passed by the caller may be an ordinary token.
    """

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.eos_ids = set(eos_ids)
        self.generated = 0  # new tokens received, up to and including the first EOS
        self.saw_eos = False

    def put(self, value: torch.Tensor) -> None:
        """Receive the prompt (first call) or new tokens, shape (1, n) or (n,)."""
        if self.next_tokens_are_prompt:
            super().put(value)
            return
        tokens = value.reshape(-1).tolist()
        for t in tokens:
            if not self.saw_eos:
                self.generated += 1
                self.saw_eos = t in self.eos_ids
        kept = [t for t in tokens if t not in self.eos_ids]
        if kept:
            super().put(torch.tensor(kept))


def generate_kwargs(settings: GenerationSettings, eos_ids: list[int], pad_id: int) -> dict[str, Any]:
    """``model.generate`` keyword arguments for ``settings``, ending at ``eos_ids`` and padding with ``pad_id``."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "repetition_penalty": settings.repetition_penalty,
        "eos_token_id": eos_ids or None,
        "pad_token_id": pad_id,
        "use_cache": True,
    }
    if settings.num_beams > 1:
        kwargs.update(num_beams=settings.num_beams, length_penalty=settings.length_penalty)
    if settings.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
    if settings.do_sample:
        # top_k=0 switches off transformers' default top-k 50: the settings name temperature and top_p only.
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    return kwargs


def _pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids:
        return eos_ids[0]
    raise ModelError(
        "the tokenizer has neither a pad token nor an EOS token, so prompts cannot be batched",
        hint="set tokenizer.pad_token (the EOS token is the usual choice)",
    )


def _finish(
    tokenizer: Any, tokens: list[int], stopped_at: int | None, eos_ids: set[int], stop: Sequence[str], *,
    strip: bool = False,
) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of one row's generated tokens (which may end in padding).

    ``strip``: the text is stripped before stop strings are looked for (an encoder-decoder's output,
    which its tokenizer may frame with spaces), and stripped again where one cuts it.
    """
    reason = "length"
    if stopped_at is not None:
        tokens, reason = tokens[:stopped_at], "stop"
        completion = stopped_at
    else:
        eos_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        if eos_at is not None:
            tokens, reason = tokens[:eos_at], "stop"
            completion = eos_at + 1  # the EOS was generated too
        else:
            completion = len(tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if strip:
        text = text.strip()
    cut = find_stop(text, stop)
    if cut is not None:
        text, reason = (text[:cut].rstrip() if strip else text[:cut]), "stop"
    return text, reason, completion


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    settings: GenerationSettings,
    *,
    progress: Progress | None = None,
    eos_token_ids: list[int] | None = None,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Generate one answer per prompt (decoder) or output per source text (encoder-decoder), in batches;
    results come back in input order.

    Each result is ``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}``: ``text`` is the
    decoded new tokens without special tokens, cut before the first stop string (an encoder-decoder's
    text is also stripped); ``finish_reason`` is ``"stop"`` (EOS or stop string) or ``"length"``
    (``max_new_tokens`` reached); ``prompt_tokens`` counts the prompt (source) tokens fed to the model;
    ``completion_tokens`` counts the tokens generated for the answer, the EOS or (decoder) the token that
    completed a stop string included. EOS ids are ``eos_token_ids``, else the model's generation config's,
    else the tokenizer's. An encoder-decoder's sources are cut to ``max_length`` tokens (a decoder's
    prompts are never cut: callers check that they fit).

    The model is put in eval mode (and back in train mode afterwards if it was). Sampling is seeded with
    ``settings.seed`` on a forked RNG, so the caller's random state is untouched; greedy decoding is
    deterministic, and with float32 weights gives the same answers whatever the batch size (in bf16 a row's
    rounding can depend on the batch's shape, enough to flip a near-tied choice). With ``progress`` (a rich
    ``Progress``) a task "generate" advances per prompt, and is told of every decoding step
    (``advance(task, 0)``: an exception raised there stops generation within a step).
    """
    if not prompts:
        return []
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    eos_ids = _eos_ids(model, tokenizer, eos_token_ids)
    pad_id = _pad_id(tokenizer, eos_ids)
    if encoder_decoder:
        # The source as the tokenizer frames it (special tokens included), as in training; clipped before
        # tokenising (same ids), so a megabyte source costs what its first max_length tokens cost.
        side = getattr(tokenizer, "truncation_side", "right")
        encoded: list[list[int]] = [
            tokenizer(p if max_length is None else clip_text(p, max_length, side=side), truncation=True,
                      max_length=max_length)["input_ids"]
            for p in prompts
        ]
    else:
        encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"generate: prompt {i} is empty (no tokens)")
    # Longest first: the first batch shows at once whether the longest prompts fit in memory, and
    # length-sorted batches carry little padding. sorted() is stable, so ties keep input order.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    kwargs = generate_kwargs(settings, eos_ids, pad_id)
    start_id = getattr(model.generation_config, "decoder_start_token_id", None) if encoder_decoder else None
    if start_id is not None:
        kwargs["decoder_start_token_id"] = start_id
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    task = progress.add_task("generate", total=len(prompts)) if progress is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices(device)):
            torch.manual_seed(settings.seed)
            for begin in range(0, len(order), settings.batch_size):
                rows = order[begin : begin + settings.batch_size]
                width = len(encoded[rows[0]])
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T), 0 on padding
                for b, i in enumerate(rows):
                    n = len(encoded[i])
                    # A decoder continues its prompt, so the padding goes left; an encoder reads it whole.
                    span = slice(0, n) if encoder_decoder else slice(width - n, width)
                    input_ids[b, span] = torch.tensor(encoded[i])
                    attention_mask[b, span] = 1
                # A decoder's rows stop as soon as their text holds a stop string; an encoder-decoder's
                # text is cut after decoding (its decoder sequence does not continue the prompt).
                criterion = _StopOnStrings(tokenizer, settings.stop, width, eos_ids)
                use_criterion = bool(settings.stop) and not encoder_decoder
                criteria: list[StoppingCriteria] = [criterion] if use_criterion else []
                if progress is not None:
                    criteria.append(_ReportEachStep(progress, task))
                # A decoder's batch drops each row as it ends (row_dropping); generate where that cannot apply.
                out = None if encoder_decoder else row_dropping.decode(
                    model, input_ids.to(device), attention_mask.to(device), stopping_criteria=criteria, **kwargs)
                if out is None:
                    out = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        stopping_criteria=StoppingCriteriaList(criteria) if criteria else None,
                        **kwargs,
                    )  # decoder: (B, T + new); encoder-decoder: (B, 1 + new), the start token first
                for b, i in enumerate(rows):
                    if encoder_decoder:
                        tokens = out[b].tolist()
                        if start_id is not None and tokens and tokens[0] == start_id:
                            tokens = tokens[1:]
                    else:
                        tokens = out[b, width:].tolist()
                    text, reason, completion = _finish(
                        tokenizer, tokens, criterion.stopped_at.get(b) if use_criterion else None, set(eos_ids),
                        settings.stop, strip=encoder_decoder,
                    )
                    results[i] = {
                        "text": text,
                        "finish_reason": reason,
                        "prompt_tokens": len(encoded[i]),
                        "completion_tokens": completion,
                    }
                if progress is not None and task is not None:
                    progress.advance(task, len(rows))
    finally:
        if was_training:
            model.train()
    return [r for r in results if r is not None]


def stream_chat(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    settings: GenerationSettings,
    *,
    eos_token_ids: list[int] | None = None,
    info: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Stream the answer to chat ``messages`` as text pieces, as they are generated.

    The pieces join to what :func:`generate` returns for the same prompt: decoding stops at EOS, and
    text that might begin a stop string is held back until it is clear it does not; the answer ends
    before the first stop string. Generation runs in a thread (``TextIteratorStreamer``); closing the
    iterator early stops it. ``settings.batch_size`` is not used. ``info``: see :func:`stream_text`.
    """
    return stream_text(model, tokenizer, chat_prompt(tokenizer, messages), settings,
                       eos_token_ids=eos_token_ids, info=info)


def stream_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    settings: GenerationSettings,
    *,
    eos_token_ids: list[int] | None = None,
    info: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Stream the continuation of an already-rendered ``prompt`` as text pieces (see :func:`stream_chat`).

    When the stream ends (also when it is closed early), ``info`` (if given) receives what
    :func:`generate` reports besides the text: ``finish_reason`` ("stop" or "length"),
    ``prompt_tokens`` and ``completion_tokens`` (counted the same way).
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    eos_ids = _eos_ids(model, tokenizer, eos_token_ids)
    pad_id = _pad_id(tokenizer, eos_ids)
    device = next(model.parameters()).device
    streamer = _AnswerStreamer(tokenizer, eos_ids)
    criterion = _StopOnStrings(tokenizer, settings.stop, len(prompt_ids), eos_ids)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            # inference_mode is per thread, so it is entered here, not by the caller.
            with torch.inference_mode(), torch.random.fork_rng(devices=rng_devices(device)):
                torch.manual_seed(settings.seed)
                model.generate(
                    input_ids=torch.tensor([prompt_ids], device=device),
                    attention_mask=torch.ones((1, len(prompt_ids)), dtype=torch.long, device=device),
                    stopping_criteria=StoppingCriteriaList([criterion]),
                    streamer=streamer,
                    **generate_kwargs(settings, eos_ids, pad_id),
                )
        except BaseException as exc:  # handed to the reading thread, which re-raises it
            errors.append(exc)
            streamer.end()  # unblock the reader

    was_training = model.training
    model.eval()
    thread = threading.Thread(target=run, name="lmtune-stream", daemon=True)
    thread.start()
    longest_stop = max((len(s) for s in settings.stop), default=0)
    text = ""  # everything decoded so far
    sent = 0  # how much of it has been yielded
    try:
        for piece in streamer:
            text += piece
            cut = find_stop(text, settings.stop)
            if cut is not None:
                if cut > sent:
                    yield text[sent:cut]
                return
            # Hold back a tail that could still grow into a stop string.
            safe = len(text)
            for k in range(min(longest_stop - 1, len(text)), 0, -1):
                if any(s.startswith(text[-k:]) for s in settings.stop):
                    safe = len(text) - k
                    break
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        if errors:
            raise errors[0]
        if len(text) > sent:
            yield text[sent:]
    finally:
        criterion.cancel()
        thread.join()
        if was_training:
            model.train()
        if info is not None:
            # Counted as generate's _finish counts: up to the token completing a stop string, else up
            # to and including the EOS, else every token generated (max_new_tokens: "length").
            stopped = criterion.stopped_at.get(0)
            if stopped is not None:
                reason, completion = "stop", stopped
            elif streamer.saw_eos:
                reason, completion = "stop", streamer.generated
            else:
                cut_by_stop = find_stop(text, settings.stop) is not None
                reason, completion = ("stop" if cut_by_stop else "length"), streamer.generated
            info.update(finish_reason=reason, prompt_tokens=len(prompt_ids), completion_tokens=completion)
