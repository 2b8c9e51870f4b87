"""The one way lmtune reads a model folder's weights: safetensors only, unless the user opted in.

Unpickling a ``pytorch_model.bin`` runs whatever code the file holds, so every verb that loads a
model goes through :func:`load_pretrained`: the folder is checked first
(:func:`~lmtune.models.registry.check_model_folder`: pickled weights are refused with an lmtune
error that names the files and says how to convert them), then transformers is told to read
safetensors only (``use_safetensors=True``), so it never falls back to ``torch.load``.

Training may opt in (``model.allow_pickle``, for a base model the user made). A model lmtune saved
(a run's ``model/``, what ``predict``, ``serve``, ``chat`` and ``eval`` load) has no opt-in
(:func:`load_saved_model`): lmtune always saves safetensors, so a pickle there was put there by
someone else, and the run folder's own ``config.yaml`` cannot vouch for it, since whoever handed
over the folder wrote that file too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer

from lmtune.console import quiet_libraries
from lmtune.errors import ModelError
from lmtune.models.registry import check_model_folder


def load_pretrained(model_class: Any, folder: str | os.PathLike[str], *, allow_pickle: bool = False,
                    error: str = "cannot load the model", pickle_hint: str | None = None, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(folder, **kwargs)`` after :func:`check_model_folder`.

    Pickled weights load only with ``allow_pickle`` (then transformers prefers safetensors when both
    are there). What transformers cannot load (a truncated file, a config it cannot read) is a
    ModelError: ``error``, then its message, naming the folder. ``pickle_hint`` replaces the hint of
    the refusal of pickled weights.
    """
    check_model_folder(folder, allow_pickle=allow_pickle, pickle_hint=pickle_hint)
    try:
        return model_class.from_pretrained(folder, use_safetensors=not allow_pickle or None, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelError(f"{error}: {exc}", file=Path(folder)) from None


def load_saved_model(model_class: Any, model_dir: str | os.PathLike[str], *, error: str = "cannot load the model",
                     **kwargs: Any) -> Any:
    """A model folder lmtune saved, loaded with ``model_class``: safetensors only, no opt-in.

    Pickled weights are refused with a hint that says how to convert them once, with the class that
    loads this model, where the file is trusted.
    """
    name = getattr(model_class, "__name__", "AutoModel")
    folder = repr(str(model_dir))
    hint = (f"lmtune saves models as safetensors, so these weights were not written by lmtune; where you trust "
            f"the file, convert it once in Python: {name}.from_pretrained({folder}, use_safetensors=False)"
            f".save_pretrained({folder}) writes model.safetensors beside it")
    return load_pretrained(model_class, model_dir, error=error, pickle_hint=hint, **kwargs)


def load_for_prediction(model_class: Any, model_dir: Path, *, what: str, device: str | None = None
                        ) -> tuple[Any, Any, torch.device]:
    """(tokenizer, model, device) of a saved model folder, the model in fp32 on ``device`` in eval mode.

    ``device`` defaults to CUDA where there is one. ``what`` names the model in errors ("the relation model"):
    a tokenizer or weights transformers cannot read are ModelErrors naming the folder.
    """
    quiet_libraries()
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {what}: {exc}", file=Path(model_dir)) from None
    model = load_saved_model(model_class, model_dir, error=f"cannot load {what}", dtype=torch.float32)
    return tokenizer, model.to(where).eval(), where


def load_saved_adapter(base: Any, adapter_dir: str | os.PathLike[str], *,
                       error: str = "cannot apply the adapter to the base model", **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained(base, adapter_dir, **kwargs)`` for an adapter lmtune saved: safetensors only.

    peft reads ``adapter_model.bin`` with ``torch.load`` when there is no ``adapter_model.safetensors``
    (and has no switch to refuse it), so the folder is checked first; load failures are ModelErrors.
    """
    folder = Path(adapter_dir)
    if not (folder / "adapter_model.safetensors").is_file():
        pickled = sorted(p.name for p in folder.glob("adapter_model*.bin"))
        if pickled:
            raise ModelError(f"refusing pickled weights ({', '.join(pickled)}): unpickling a file can execute "
                             "arbitrary code", file=folder,
                             hint="lmtune saves adapters as safetensors (adapter_model.safetensors), so these "
                             "weights were not written by lmtune")
        raise ModelError("no adapter weights: expected adapter_model.safetensors", file=folder)
    from peft import PeftModel  # noqa: PLC0415  (peft and the torchao it loads: ~110 MB and ~2 s, loaded only for LoRA)

    try:
        return PeftModel.from_pretrained(base, str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelError(f"{error}: {exc}", file=folder) from None
