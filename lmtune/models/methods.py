"""Training methods: which weights learn. Full fine-tuning, freezing, LoRA (peft).

A method takes the task's model and returns the model to train, marking the
newly initialised head as trainable in every case (a frozen random head would
learn nothing).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lmtune.config import MethodConfig
from lmtune.config.tasks import task_info, task_names
from lmtune.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)


def is_peft_model(model: object) -> bool:
    """``isinstance(model, peft.PeftModel)`` without importing peft: full and freeze runs never load it (with the
    torchao it loads, ~110 MB of memory and ~2 s), and no model is a ``PeftModel`` before peft is loaded."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The longest ModuleList in the model: its stack of transformer blocks."""
    best: torch.nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    return best


def check_method_supported(method: MethodConfig, task: str) -> None:
    """Fail before anything loads when the method cannot run here (QLoRA or LoftQ without a CUDA GPU)."""
    if method.name in ("lora", "qlora") and method.init_lora_weights == "loftq":
        # peft's loftq_init quantises each weight with bitsandbytes on the CUDA device (peft/utils/loftq_utils.py).
        require_bitsandbytes_on_cuda("method.init_lora_weights loftq",
                                     "method.init_lora_weights loftq quantises the weights with bitsandbytes on a "
                                     "CUDA GPU; this machine has none",
                                     hint="use method.init_lora_weights pissa (or default)")
    if method.name != "qlora":
        return
    if not task_info(task).decoder:
        decoders = ", ".join(name for name in task_names() if task_info(name).decoder)
        raise ConfigError(f"method.name qlora is for decoder tasks ({decoders}), not '{task}'; use lora")
    require_bitsandbytes_on_cuda("method.name qlora",
                                 "method.name qlora quantises the base model to 4 bits with bitsandbytes, which needs "
                                 "a CUDA GPU; this machine has none",
                                 hint="use method.name: lora (same adapters, base model kept in full precision)")


def require_bitsandbytes_on_cuda(setting: str, no_gpu: str, *, hint: str) -> None:
    """Fail unless bitsandbytes can run here: a CUDA GPU (else ``no_gpu``, with ``hint``) and the package
    installed (else an error naming ``setting``)."""
    if not torch.cuda.is_available():
        raise ConfigError(no_gpu, hint=hint)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{setting} needs the bitsandbytes package", hint="pip install bitsandbytes")


def quantization_config(method: MethodConfig) -> Any:
    """The 4-bit NF4 loading config of QLoRA (double quantisation, bf16 compute), or None."""
    if method.name != "qlora":
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def build_task_model(task: Any, model_path: Path | None, data: Any, tokenizer: Any,
                     method: MethodConfig | None = None) -> tuple[torch.nn.Module, set[str]]:
    """The model a run trains: the task's body and head with ``method`` applied; and the head's names.

    The one recipe ``lmtune train`` (and the gathered copy of a sharded model), ``lmtune plan``
    and the benchmarks build from.
    """
    body = task.build_model(model_path, data, tokenizer)
    head = task.head_module_names(body)
    return apply_task_method(body, task, method or task.config.method, head), head


def apply_task_method(model: torch.nn.Module, task: Any, method: MethodConfig, head: set[str]) -> torch.nn.Module:
    """:func:`apply_method` with the task's peft task type and the tokens its chat template added.

    ``task`` is a ``lmtune.tasks.base.Task`` (not imported: models sit below tasks).
    """
    return apply_method(model, method, head, peft_task_type=task.peft_task_type,
                        new_token_ids=task.new_token_ids())


def apply_method(
    model: torch.nn.Module, method: MethodConfig, head_names: set[str], *, peft_task_type: str | None,
    new_token_ids: list[int] | None = None,
) -> torch.nn.Module:
    """Prepare ``model`` for ``method``; ``head_names`` are the new modules that always train.

    ``new_token_ids`` are tokens added to the vocabulary (a chat template's markers): their
    embedding rows start untrained, so LoRA trains exactly those rows too (peft's trainable tokens).
    """
    if method.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.name == "freeze":
        for name, p in model.named_parameters():
            p.requires_grad_(any(part in head_names for part in name.split(".")))
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embeddings = get_embeddings() if callable(get_embeddings) else None
        if new_token_ids and not (embeddings is not None and embeddings.weight.requires_grad):
            # A task that grows the vocabulary names the embeddings among its head modules; one that does not
            # leaves the new rows where they started.
            log.warning("method freeze: the %d tokens added to the vocabulary keep their initial embeddings; "
                        "use method lora or full to train them", len(new_token_ids))
        if method.unfrozen_layers:
            blocks = transformer_blocks(model)
            if blocks is None:
                raise ConfigError("method.unfrozen_layers: this model has no stack of blocks to unfreeze")
            if method.unfrozen_layers > len(blocks):
                raise ConfigError(f"method.unfrozen_layers {method.unfrozen_layers} exceeds the model's "
                                  f"{len(blocks)} blocks")
            for block in list(blocks)[-method.unfrozen_layers :]:
                for p in block.parameters():
                    p.requires_grad_(True)
        return model
    if method.name in ("lora", "qlora"):
        from peft import LoftQConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: PLC0415  (peft and the torchao it loads: ~110 MB and ~2 s, loaded only for LoRA)

        if method.name == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

        lora = LoraConfig(
            task_type=peft_task_type,
            r=method.r,
            lora_alpha=method.alpha,  # type: ignore[arg-type]  # peft scales by alpha/r; a float is fine
            lora_dropout=method.dropout,
            target_modules=method.target_modules,
            # The head is trained fully and saved with the adapter, never adapted itself.
            modules_to_save=sorted(head_names),
            exclude_modules=sorted(head_names),
            trainable_token_indices=list(new_token_ids) if new_token_ids else None,
            use_dora=method.use_dora,
            use_rslora=method.use_rslora,
            # The schema checked the name (pissa_niter_N is a family peft's Literal cannot spell).
            init_lora_weights=_peft_init(method.init_lora_weights),  # type: ignore[arg-type]
            loftq_config=(LoftQConfig(loftq_bits=method.loftq_bits, loftq_iter=method.loftq_iter)
                          if method.init_lora_weights == "loftq" else {}),
            rank_pattern=dict(method.rank_pattern),
            alpha_pattern=dict(method.alpha_pattern),
        )
        try:
            peft_model = get_peft_model(model, lora)
        except ValueError as exc:
            raise ConfigError(f"method.target_modules: {exc}") from None
        _check_patterns(peft_model, method)
        return peft_model
    raise ConfigError(f"unknown method.name '{method.name}'")


def _peft_init(init: str) -> bool | str:
    """peft's ``init_lora_weights``: True for its default (A Kaiming-uniform, B zero), else the name."""
    return True if init == "default" else init


def _check_patterns(model: PeftModel, method: MethodConfig) -> None:
    """Every ``rank_pattern``/``alpha_pattern`` key must match an adapted module, as peft matches them
    (``peft.utils.other.get_pattern_key``); peft itself ignores one that matches nothing, silently."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415  (peft and the torchao it loads: ~110 MB and ~2 s, loaded only for LoRA)

    base = cast(torch.nn.Module, model.base_model.model)
    adapted = [name for name, module in base.named_modules() if isinstance(module, LoraLayer)]
    for key_name, pattern in (("rank_pattern", method.rank_pattern), ("alpha_pattern", method.alpha_pattern)):
        for key in pattern:
            if not any(re.match(rf"(.*\.)?({key})$", name) for name in adapted):
                shown = ", ".join(adapted[:6]) + (f" ... ({len(adapted)} in all)" if len(adapted) > 6 else "")
                raise ConfigError(f"method.{key_name} '{key}' matches none of the adapted modules: {shown}",
                                  hint="a key is a regular expression matched against the end of a module name")


def moves_base_weights(model: torch.nn.Module) -> bool:
    """True when the adapter's initialisation changed the base weights (PiSSA, OLoRA, LoftQ): the adapter
    then only fits the changed base, and is saved converted (:func:`initial_adapter`) or not at all."""
    init = _adapter_init(model)
    return init is not None and (init.startswith("pissa") or init in ("olora", "loftq"))


def _adapter_init(model: torch.nn.Module) -> str | None:
    """peft's ``init_lora_weights`` of ``model``'s adapter as a string (``True`` for the default), or None."""
    if not is_peft_model(model):
        return None
    return str(getattr(cast("PeftModel", model).peft_config["default"], "init_lora_weights", True))


def initial_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A copy of the adapter's starting weights when PiSSA or OLoRA moved them out of the base weights, else None.

    Taken before training; :func:`save_final_model` subtracts it (peft's
    ``path_initial_model_for_weight_conversion``) so the saved adapter is a plain LoRA on the original base.
    """
    if not moves_base_weights(model) or _adapter_init(model) == "loftq":
        return None
    from peft import get_peft_model_state_dict  # noqa: PLC0415  (peft and the torchao it loads: ~110 MB and ~2 s, loaded only for LoRA)

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def save_final_model(model: torch.nn.Module, folder: Path, adapter_folder: Path | None, merge: bool,
                     *, base_path: Path | None = None, quantized: bool = False,
                     initial: dict[str, torch.Tensor] | None = None) -> str:
    """Write the trained model as safetensors; LoRA is saved as an adapter and (by default) merged.

    A QLoRA adapter is merged into the base model reloaded in float32 (merging into 4-bit
    weights would round the update away). ``initial`` is :func:`initial_adapter` of a PiSSA/OLoRA
    model: its adapter is saved converted to a plain LoRA on the original base. A LoftQ adapter fits
    only the quantised base it started from, so only the merged model is saved. Returns how it was
    saved: ``full``, ``merged`` or ``adapter``.
    """
    if is_peft_model(model):
        model = cast("PeftModel", model)
        if moves_base_weights(model) and initial is None:
            adapter_folder = None
            log.info("the adapter is relative to base weights its initialisation changed: only the merged model "
                     "is saved")
        if adapter_folder is not None:
            save_adapter(model, adapter_folder, initial)
        if merge and quantized:
            assert adapter_folder is not None and base_path is not None
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
            from peft import PeftModel  # noqa: PLC0415  (peft and the torchao it loads: ~110 MB and ~2 s, loaded only for LoRA)

            PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload().save_pretrained(
                folder, safe_serialization=True)
            return "merged"
        if merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(folder, safe_serialization=True)
            return "merged"
        if moves_base_weights(model) and initial is None:
            raise ConfigError("method.merge false: this adapter's initialisation changed the base weights, so the "
                              "adapter alone would not fit the base model", hint="set method.merge true")
        save_adapter(model, folder, initial)
        return "adapter"
    model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
    return "full"


def save_adapter(model: PeftModel, folder: Path, initial: dict[str, torch.Tensor] | None = None) -> None:
    """Save ``model``'s adapter; with ``initial`` (PiSSA/OLoRA), as a plain LoRA on the original base model.

    peft writes the difference to the initial adapter, ``B A - B0 A0``, as a LoRA of twice the rank
    (``[A; A0]``, ``[B, -B0]``), but keeps only the ``lora_A``/``lora_B`` tensors: the trained head
    (``modules_to_save``), DoRA magnitudes and trainable tokens are put back here, unchanged (the base
    weights plus the converted adapter equal the residual weights plus the trained one, so they still fit).
    """
    if initial is None:
        model.save_pretrained(str(folder), safe_serialization=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "initial"
        start.mkdir()
        save_file(initial, str(start / SAFETENSORS_ADAPTER))
        model.save_pretrained(str(folder), safe_serialization=True, path_initial_model_for_weight_conversion=str(start))
    converted = load_file(str(folder / SAFETENSORS_ADAPTER))
    from peft import get_peft_model_state_dict  # noqa: PLC0415  (peft and the torchao it loads: ~110 MB and ~2 s, loaded only for LoRA)

    rest = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()
            if k not in converted}
    save_file({**converted, **rest}, str(folder / SAFETENSORS_ADAPTER), metadata={"format": "pt"})


SAFETENSORS_ADAPTER = "adapter_model.safetensors"


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts for logs and the report."""
    trainable, total = count_parameters(model)
    return {"trainable_parameters": trainable, "total_parameters": total,
            "trainable_fraction": trainable / max(total, 1)}
