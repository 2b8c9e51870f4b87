"""Training methods: which weights learn. Full fine-tuning, freezing, LoRA (peft).

A method takes the task's model and returns the model to train, marking the
newly initialised head as trainable in every case (a frozen random head would
learn nothing).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lmtune.config import MethodConfig
from lmtune.config.tasks import task_info, task_names
from lmtune.errors import ConfigError

log = logging.getLogger(__name__)


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
    """Fail before anything loads when the method cannot run here (QLoRA without a CUDA GPU)."""
    if method.name != "qlora":
        return
    if not task_info(task).decoder:
        decoders = ", ".join(name for name in task_names() if task_info(name).decoder)
        raise ConfigError(f"method.name qlora is for decoder tasks ({decoders}), not '{task}'; use lora")
    if not torch.cuda.is_available():
        raise ConfigError("method.name qlora quantises the base model to 4 bits with bitsandbytes, which needs a "
                          "CUDA GPU; this machine has none", hint="use method.name: lora (same adapters, "
                          "base model kept in full precision)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("method.name qlora needs the bitsandbytes package", hint="pip install bitsandbytes")


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
        )
        try:
            return get_peft_model(model, lora)
        except ValueError as exc:
            raise ConfigError(f"method.target_modules: {exc}") from None
    raise ConfigError(f"unknown method.name '{method.name}'")


def save_final_model(model: torch.nn.Module, folder: Path, adapter_folder: Path | None, merge: bool,
                     *, base_path: Path | None = None, quantized: bool = False) -> str:
    """Write the trained model as safetensors; LoRA is saved as an adapter and (by default) merged.

    A QLoRA adapter is merged into the base model reloaded in float32 (merging into 4-bit
    weights would round the update away). Returns how it was saved: ``full``, ``merged`` or ``adapter``.
    """
    if isinstance(model, PeftModel):
        if adapter_folder is not None:
            model.save_pretrained(str(adapter_folder), safe_serialization=True)
        if merge and quantized:
            assert adapter_folder is not None and base_path is not None
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
            PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload().save_pretrained(
                folder, safe_serialization=True)
            return "merged"
        if merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(folder, safe_serialization=True)
            return "merged"
        model.save_pretrained(str(folder), safe_serialization=True)
        return "adapter"
    model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
    return "full"


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts for logs and the report."""
    trainable, total = count_parameters(model)
    return {"trainable_parameters": trainable, "total_parameters": total,
            "trainable_fraction": trainable / max(total, 1)}
