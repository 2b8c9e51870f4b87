"""Export a run's model as one standalone folder that plain transformers loads, and prove it.

``export_merged_folder`` folds a LoRA/QLoRA adapter into the base weights (or re-saves a fully fine-tuned
model), writes safetensors + tokenizer (chat template included) + generation config + ``lmtune.json``
+ model card, then reloads the written folder with plain ``AutoModelFor...`` and compares its logits
with the model as trained (base + adapter, unmerged) on a fixed set of prompts. Only a folder that
passes the check appears at ``output``; a failed export leaves nothing there.

It takes plain inputs (the run and model folders, ``lmtune.json``'s contents, the auto class name);
``lmtune.workflows.export`` opens the run and decides the class from the task.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from lmtune.errors import LmtuneError, RunError
from lmtune.models.loading import load_saved_adapter, load_saved_model
from lmtune.models.registry import check_model_folder
from lmtune.models.vocabulary import grow_embeddings
from lmtune.version import __version__

log = logging.getLogger("lmtune")

# Short and varied: plain prose, a question, code, digits, non-ASCII, one word.
DEFAULT_PROMPTS = [
    "The capital of France is",
    "What is the boiling point of water at sea level?",
    "def add(a, b):\n    return",
    "In 1969, 3 astronauts flew 384,400 km to the Moon.",
    "Ça coûte 12 € — très cher !",
    "Hello",
]
CHAT_PROMPTS = 2  # how many of the prompts are also rendered through the chat template
MAX_PROMPT_TOKENS = 128

EXPORT_FILE = "export.json"
# Largest absolute logit difference (float32) allowed between the exported and the trained model.
# Merging W + BA in float32 rounds: 4e-7 on tiny models, 1.2e-4 on SmolLM2-135M (logits of magnitude
# ~30); a real merge error (a wrong scale, a missed module) is orders of magnitude larger.
DEFAULT_TOLERANCE = 1e-3


@dataclass
class ExportResult:
    """What an export wrote and how closely the written model matches the trained one."""

    folder: Path
    max_abs_logit_diff: float
    tolerance: float
    prompts: int
    source: str  # "adapter": base + adapter was the reference; "model": the run's model/ folder


def export_merged_folder(
    run_dir: Path,
    model_dir: Path,
    meta: dict[str, Any],
    output: Path,
    *,
    auto_class: str,
    tolerance: float = DEFAULT_TOLERANCE,
    prompts: list[str] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the model of the run at ``run_dir`` (its model folder ``model_dir``, whose ``lmtune.json``
    holds ``meta``) as a merged, standalone folder at ``output`` and check it; ``auto_class`` names the
    transformers auto class that loads the model (``AutoModelForSequenceClassification`` ...).

    The reference is the model as trained: the base model (``base_model_path``, float32) wrapped with
    the run's ``adapter/``, or the run's ``model/`` folder when there is no adapter. The written folder
    is reloaded with plain transformers; its logits on ``prompts`` (default: a handful of short texts,
    plus two rendered through the chat template when the tokenizer has one) must be within
    ``tolerance`` (max absolute difference, float32) of the reference's, else :class:`RunError` and
    nothing is left at ``output``. An existing non-empty ``output`` is replaced only with
    ``overwrite`` and only if it holds an earlier export.
    """
    run_dir, model_dir = Path(run_dir).resolve(), Path(model_dir).resolve()
    output = Path(output).expanduser().resolve()
    model_class = auto_model_class(auto_class)
    adapter_dir = _adapter_dir(run_dir, model_dir, meta)
    base_path = _base_path(meta) if adapter_dir is not None else None
    check_output_folder(output, run_dir, [p for p in (model_dir, adapter_dir, base_path) if p is not None],
                  overwrite=overwrite)
    if prompts is not None and not prompts:
        raise RunError("export needs at least one prompt to check the exported model against")

    tokenizer = load_tokenizer(model_dir)
    texts = _prompt_texts(tokenizer, prompts)  # [(text, add_special_tokens)]

    if adapter_dir is not None:
        assert base_path is not None
        log.info("loading %s with the adapter %s (float32)", base_path, adapter_dir)
        reference = _load_with_adapter(model_class, base_path, adapter_dir, model_dir, meta, tokenizer)
        source = "adapter"
    else:
        log.info("loading %s (float32)", model_dir)
        reference = load_model(model_class, model_dir)
        source = "model"
    inputs = [_encode(tokenizer, text, special, reference.config) for text, special in texts]
    reference_logits = _all_logits(reference, inputs)  # before merging: merge_and_unload changes the weights
    merged = reference.merge_and_unload() if source == "adapter" else reference
    del reference

    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    try:
        _write_folder(merged, tmp, model_dir, tokenizer)
        del merged
        diff = _check_parity(reference_logits, tmp, model_class, inputs, tolerance)
        result = ExportResult(folder=output, max_abs_logit_diff=diff, tolerance=tolerance,
                              prompts=len(inputs), source=source)
        facts = _export_facts(result, run_dir, adapter_dir, meta)
        finish_export(tmp, output, {**meta, "saved_as": "merged" if source == "adapter"
                                    else meta.get("saved_as", "full")}, facts, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (%s, max logit difference %.1e over %d prompts, tolerance %g)",
             run_dir, output, "adapter merged" if source == "adapter" else "model re-saved", diff,
             len(inputs), tolerance)
    return result


# ------------------------------------------------------------------------------------------ run folder
def auto_model_class(name: str) -> Any:
    """The transformers class called ``name`` (an auto class such as ``AutoModelForCausalLM``)."""
    model_class = getattr(transformers, name, None)
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise RunError(f"transformers has no model class '{name}' to load the model with", field="model_class")
    return model_class


def _adapter_dir(run_dir: Path, model_dir: Path, meta: dict[str, Any]) -> Path | None:
    """The peft adapter the run trained: ``adapter/``, or ``model/`` when the run saved only the adapter."""
    for folder in (run_dir / "adapter", model_dir):
        if (folder / "adapter_config.json").is_file():
            if not (folder / "adapter_model.safetensors").is_file():
                raise RunError("the adapter has no adapter_model.safetensors (pickled adapters are not loaded)",
                               file=folder)
            return folder
    if meta.get("method") in ("lora", "qlora"):
        log.warning("this %s run has no adapter folder; checking the export against model/ instead",
                    meta.get("method"))
    return None


def _base_path(meta: dict[str, Any]) -> Path:
    raw = meta.get("base_model_path")
    if not raw:
        raise RunError("lmtune.json has no base_model_path, so the adapter cannot be applied",
                       field="base_model_path")
    try:
        check_model_folder(raw)
    except LmtuneError as exc:
        raise RunError(f"the run's base model cannot be loaded: {exc.message}", field="base_model_path",
                       hint="the adapter needs the exact base model it was trained on; restore that folder "
                       "(bundled models are rebuilt by `lmtune models`)") from None
    return Path(raw).expanduser().resolve()


def check_output_folder(output: Path, run_dir: Path, inputs: list[Path], *, overwrite: bool) -> None:
    """Refuse outputs that would clobber the run or its inputs, or a folder that is not an export."""
    for src in [run_dir, *inputs]:
        # Replacing ``output`` deletes it, so it must not be (or hold) anything the export reads;
        # writing inside model/, adapter/ or the base model would change them. Inside the run is fine.
        if src.is_relative_to(output) or (src != run_dir and output.is_relative_to(src)):
            raise RunError(f"the export cannot be written over or inside {src}, which it reads", file=output,
                           hint="choose a new folder for --output")
    if not output.exists():
        return
    if not output.is_dir():
        raise RunError("the export output exists and is not a folder", file=output)
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise RunError("the export output folder exists and is not empty", file=output,
                       hint="pass --overwrite to replace an earlier export, or choose another folder")
    if not (output / EXPORT_FILE).is_file():
        raise RunError(f"refusing to overwrite a folder that is not an lmtune export (no {EXPORT_FILE})",
                       file=output, hint="delete it yourself if it is no longer needed, or choose another folder")


# ------------------------------------------------------------------------------------------ loading
def load_tokenizer(model_dir: Path) -> Any:
    """The model folder's tokenizer (no remote code); RunError when it cannot be loaded."""
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot load the run's tokenizer: {exc}", file=model_dir) from None


def load_model(model_class: Any, folder: Path, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(folder)`` in float32 from safetensors, in eval mode; RunError otherwise."""
    model = load_saved_model(model_class, folder, error=f"cannot load the model with {model_class.__name__}",
                             dtype=torch.float32, trust_remote_code=False, **kwargs)
    return model.eval()


def _load_with_adapter(model_class: Any, base_path: Path, adapter_dir: Path, model_dir: Path,
                       meta: dict[str, Any], tokenizer: Any) -> Any:
    """Base model (float32) + the run's adapter, unmerged: the model exactly as it was trained.

    The base is built with the run's own config (``model/config.json``) so a new head has the trained
    shape (labels); its weights then come from the adapter's ``modules_to_save``.
    """
    config_dir = model_dir if (model_dir / "config.json").is_file() else base_path
    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
    if config_dir == base_path and meta.get("labels"):  # adapter-only run: the labels live in lmtune.json
        labels = list(meta["labels"])
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        config.pad_token_id = tokenizer.pad_token_id
    if meta.get("method") == "qlora":
        log.info("QLoRA: the reference is the float32 base + adapter (training saw a 4-bit base)")
    grown = getattr(config, "vocab_size", None)
    own = getattr(AutoConfig.from_pretrained(base_path, trust_remote_code=False), "vocab_size", None)
    if grown and own and grown > own:  # data.extend_vocabulary grew it: load at the base's size, grow as training did
        config.vocab_size = own
        base = load_model(model_class, base_path, config=config)
        grow_embeddings(base, grown)
    else:
        base = load_model(model_class, base_path, config=config)
    model = load_saved_adapter(base, adapter_dir, is_trainable=False)
    return model.eval()


# ------------------------------------------------------------------------------------------ prompts
def _prompt_texts(tokenizer: Any, prompts: list[str] | None) -> list[tuple[str, bool]]:
    """The check's inputs as (text, add_special_tokens): the prompts as plain text, and the first two
    rendered as a user turn through the chat template (which writes its own special tokens)."""
    texts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    out = [(text, True) for text in texts]
    if getattr(tokenizer, "chat_template", None):
        for text in texts[:CHAT_PROMPTS]:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            out.append((str(rendered), False))
    return out


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, config: Any) -> dict[str, torch.Tensor]:
    """One prompt as a batch of one (no padding to get wrong); ids are (1, T)."""
    limit = min(MAX_PROMPT_TOKENS, getattr(config, "max_position_embeddings", None) or MAX_PROMPT_TOKENS)
    enc = dict(tokenizer(text, return_tensors="pt", truncation=True, max_length=limit,
                         add_special_tokens=add_special_tokens))
    if getattr(config, "is_encoder_decoder", False):
        # Teacher-forced decoder input: the prompt shifted right behind the decoder start token.
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        ids = enc["input_ids"]
        enc["decoder_input_ids"] = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
    return enc


def _all_logits(model: Any, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Every logits tensor of the model's output per prompt (``logits`` or ``start/end_logits``), float32."""
    out = []
    with torch.no_grad():
        for enc in inputs:
            result = model(**enc)
            parts = [v.float().flatten() for k, v in result.items() if k.endswith("logits") and v is not None]
            if not parts:
                raise RunError(f"{type(model).__name__} returned no logits to compare")
            out.append(torch.cat(parts))  # causal LM: (T * vocab,)
    return out


# ------------------------------------------------------------------------------------------ writing
def _write_folder(model: Any, folder: Path, model_dir: Path, tokenizer: Any) -> None:
    """Weights (safetensors), tokenizer, generation config and model card; lmtune.json comes after the check."""
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)  # keeps the chat template
    for name in ("generation_config.json", "README.md"):
        if (model_dir / name).is_file():  # the run's generation settings win over the base model's
            shutil.copyfile(model_dir / name, folder / name)


def _check_parity(reference_logits: list[torch.Tensor], folder: Path, model_class: Any,
                  inputs: list[dict[str, torch.Tensor]], tolerance: float) -> float:
    """Reload ``folder`` with plain transformers; its logits must be within ``tolerance`` of the reference's.

    Returns the max absolute difference over all prompts and positions; raises RunError beyond it.
    """
    reloaded = load_model(model_class, folder)
    after = _all_logits(reloaded, inputs)
    diff = max(float((a - b).abs().max()) for a, b in zip(after, reference_logits, strict=True))
    if not diff <= tolerance:  # NaN fails too
        raise RunError(f"the exported model's logits and the trained model's differ by {diff:.3e}, more than "
                       f"the tolerance {tolerance:g}; nothing was exported",
                       hint="this points to a bug in the merge or the save; the run folder is untouched")
    log.info("exported model reloads with plain %s; max logit difference %.1e over %d prompts",
             model_class.__name__, diff, len(inputs))
    return diff


def _export_facts(result: ExportResult, run_dir: Path, adapter_dir: Path | None,
                  meta: dict[str, Any]) -> dict[str, Any]:
    facts = {**asdict(result), "format": "merged", "run": str(run_dir),
             "adapter": str(adapter_dir) if adapter_dir else None,
             "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "dtype": "float32", "lmtune_version": __version__, "torch_version": torch.__version__,
             "transformers_version": transformers.__version__, "peft_version": importlib.metadata.version("peft")}
    del facts["folder"]
    if meta.get("method") == "qlora":
        facts["note"] = "checked against the float32 base + adapter; training used a 4-bit base"
    return facts


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON text (UTF-8, a final newline)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def finish_export(tmp: Path, output: Path, meta: dict[str, Any], facts: dict[str, Any], *, overwrite: bool) -> None:
    """Record ``facts`` in the checked folder ``tmp`` (``lmtune.json``'s ``exported`` and ``export.json``), then
    move it to ``output``."""
    write_json(tmp / "lmtune.json", {**meta, "exported": facts})
    write_json(tmp / EXPORT_FILE, facts)
    move_into_place(tmp, output, overwrite=overwrite)


def move_into_place(tmp: Path, output: Path, *, overwrite: bool) -> None:
    """Rename the checked folder to ``output``; an earlier export is swapped out, then deleted."""
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if output.exists():
        if not overwrite:  # appeared while we worked
            raise RunError("the export output folder exists and is not empty", file=output)
        old = output.parent / f".{output.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, output)
