"""An Ollama ``Modelfile`` for an exported GGUF: FROM the file, a TEMPLATE that renders the model's chat
template in Ollama's Go-template syntax, and a stop PARAMETER per turn-ending token.

Ollama does not run Jinja: the TEMPLATE must be written in Go's text/template. The chat templates lmtune's
decoders use come in two families, each with a Go template written here by hand:

- ChatML (SmolLM2): ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, a default system message when the
  conversation does not start with one (its text read from the run's own template), ``<|im_start|>assistant\\n``
  to answer.
- Gemma: ``<start_of_turn>user|model\\n...<end_of_turn>\\n``, a system message folded into the first user
  turn, ``<start_of_turn>model\\n`` to answer; no ``<bos>`` (llama.cpp adds it, as ``add_bos_token`` says).

A family is chosen only if the run's Jinja template renders probe conversations exactly as that family's
Python twin of the Go template does; the Go templates themselves were checked with Go's text/template on the
same probes (tests/test_export_gguf.py runs that check where a ``go`` toolchain is installed); otherwise the Modelfile has no TEMPLATE (Ollama then reads
``tokenizer.chat_template`` from the GGUF itself) and says so in a comment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CHATML_GO = """{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}%(system)s{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
GEMMA_GO = """{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $system }}{{ $system }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""
# Conversations both renderings must agree on: a single user turn, a system message, several turns.
PROBES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"},
     {"role": "user", "content": "d"}],
]


def _chatml(system: str) -> Callable[[list[dict[str, str]]], str]:
    def render(messages: list[dict[str, str]]) -> str:
        out = system if not messages or messages[0]["role"] != "system" else ""
        out += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + "<|im_start|>assistant\n"
    return render


def _gemma(messages: list[dict[str, str]]) -> str:
    system = next((m["content"] for m in reversed(messages) if m["role"] == "system"), "")
    out, first = "", True
    for m in messages:
        if m["role"] == "user":
            prefix = f"{system}\n\n" if first and system else ""
            out += f"<start_of_turn>user\n{prefix}{m['content']}<end_of_turn>\n"
            first = False
        elif m["role"] == "assistant":
            out += f"<start_of_turn>model\n{m['content']}<end_of_turn>\n"
    return out + "<start_of_turn>model\n"


def _render_jinja(tokenizer: Any, messages: list[dict[str, str]]) -> str | None:
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception:  # a template that refuses a probe (roles it does not know) matches no family
        return None


def go_template(tokenizer: Any) -> tuple[str, list[str]] | None:
    """The Go TEMPLATE matching the tokenizer's chat template and its turn-ending stop strings, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = [_render_jinja(tokenizer, probe) for probe in PROBES]
    if any(r is None for r in rendered):
        return None
    bos = tokenizer.bos_token or ""
    # ChatML: the default system block is whatever precedes the first user turn of a conversation without one.
    head = str(rendered[0]).split("<|im_start|>user\n", 1)[0]
    candidates: list[tuple[str, Callable[[list[dict[str, str]]], str], list[str], str]] = [
        (CHATML_GO % {"system": head}, _chatml(head), ["<|im_end|>"], ""),
        (GEMMA_GO, _gemma, ["<end_of_turn>"], bos),
    ]
    for go, twin, stops, prefix in candidates:
        if all(r == prefix + twin(p) for r, p in zip(rendered, PROBES, strict=True)):
            return go, stops
    return None


def modelfile(tokenizer: Any, gguf_file: str) -> tuple[str, bool]:
    """The Modelfile text for ``gguf_file`` (beside it) and whether it carries a TEMPLATE."""
    lines = [f"FROM ./{gguf_file}", ""]
    found = go_template(tokenizer)
    stops: list[str] = []
    if found is not None:
        template, stops = found
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ["# No TEMPLATE: the model's chat template is not one lmtune writes in Go-template syntax;",
                  "# Ollama reads tokenizer.chat_template from the GGUF instead.", ""]
    eos = getattr(tokenizer, "eos_token", None)
    for stop in [*stops, *([eos] if eos else [])]:
        line = f'PARAMETER stop "{stop}"'
        if line not in lines:
            lines.append(line)
    return "\n".join(lines) + "\n", found is not None
