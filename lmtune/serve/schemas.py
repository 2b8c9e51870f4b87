"""Request bodies of the server's endpoints: the OpenAI shapes (chat completions, completions) and lmtune's
task endpoints. Fields OpenAI clients send that lmtune cannot honour (logprobs, penalties ...)
are accepted when left at their defaults and refused with a clear 400 otherwise, never silently ignored.
``tools`` and ``tool_choice`` are read by ``lmtune.serve.tools``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """The inside of an OpenAI error answer: ``{"error": {...}}``."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's API does (clients send ``user``, ``metadata`` ...).
    model_config = ConfigDict(extra="ignore")


class StreamOptions(BaseModel):
    """``stream_options``: with ``include_usage`` the last chunk before ``[DONE]`` carries token counts."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(_Request):
    model: str | None = Field(None, description="Ignored: the server serves one model (GET /v1/models names it).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens generated per answer.")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; > 0: sampling. Default: the run's.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, description="Answers per prompt.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end an answer.")
    # torch seeds take 64 bits (negative ones are mapped onto the unsigned range): wider is a 400 here,
    # before a stream could start, not an overflow inside the model call.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Seed for sampling (64 bits).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only at their defaults (see UNSUPPORTED).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None


class ContentPart(BaseModel):
    """One part of a message's content; only text parts exist for a text model."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """An OpenAI chat message (``developer`` is read as ``system``); an assistant's ``tool_calls`` and a ``tool``
    message's ``tool_call_id`` are checked with the conversation (``lmtune.data.chat``)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: raw-text continuation (no chat template), one or more prompts."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ClassifyRequest(_Request):
    """``POST /v1/classify``: one text or a list; ``text_pair`` (same length) for text-pair models."""

    input: str | list[str]
    text_pair: str | list[str] | None = None
    model: str | None = None
    explain: bool = Field(False, description="Add token attributions (integrated gradients) to each answer.")
    explain_label: str | None = Field(None, description="The label to explain (default: the predicted one).")
    explain_steps: int | None = Field(None, ge=1, description="Integration steps (default: the server's).")


class PredictRequest(_Request):
    """``POST /v1/predict`` (and the task's own path): items in the task's input shape (texts for NER,
    ``{"question", "context"}`` for QA, source texts for seq2seq)."""

    input: str | dict[str, Any] | list[str | dict[str, Any]]
    model: str | None = None


# field -> the value that means "not used"; anything else is refused (400, param = field).
UNSUPPORTED: dict[str, Any] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "echo": (False,),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
