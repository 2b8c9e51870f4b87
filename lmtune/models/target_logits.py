"""Logits of the positions that carry a loss only: the language-model head run on the rows that need it.

A causal LM's forward turns every position's last hidden state into logits over the whole vocabulary: for
SmolLM2 that is a (tokens x 576) by (576 x 49,152) matmul, the biggest tensor of the step, its float copy for
the cross-entropy, and the same again in the backward pass. Chat tuning scores the assistant's tokens only
(about a third of a chat example), so two thirds of that work is thrown away by ``ignore_index``.

:func:`selected_rows` hooks the model's output layer (``get_output_embeddings()``, the module every
transformers causal LM calls on the hidden states) for one forward: its input ``(B, T, H)`` is cut to the
``(N, H)`` rows where ``keep`` is True before the matmul, so the returned logits are ``(N, vocab)``. The loss of
those rows is the loss of the full logits with the other positions ignored; the gradients are the same (the
dropped rows had zero gradient). Where the hook cannot apply (no output layer found, or the model called it with
hidden states of another shape), nothing is cut and the caller gets the full ``(B, T, vocab)`` logits:
:attr:`Selection.applied` says which happened. :func:`scored_logits` gives the kept rows' logits either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Selection:
    """What :func:`selected_rows` did in its forward: ``applied`` when the logits are the kept rows only."""

    applied: bool = False
    calls: int = 0


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns hidden states into logits, inside the wrappers (DDP, peft), or None.

    None as well while Opacus's per-example gradient hooks are attached (``train.privacy``): they take the first
    dimension of each layer's input as the batch, which the cut rows are not.
    """
    inner = model
    while isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        inner = inner.module
    if getattr(inner, "autograd_grad_sample_hooks", None):  # Opacus's hooks are attached (GradSampleHooks)
        return None
    get = getattr(inner, "get_output_embeddings", None)
    try:
        layer = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return layer if isinstance(layer, torch.nn.Module) else None


def scored_logits(model: torch.nn.Module, keep: torch.Tensor, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``(N, vocab)`` logits of the positions where ``keep`` (B, T) is True, in ``keep.nonzero()`` order.

    ``forward()`` runs the model and returns its logits; under :func:`selected_rows` the output layer computes
    the kept rows only. Where it could not be cut, the kept rows are taken from the full ``(B, T, vocab)`` logits.
    """
    with selected_rows(model, keep) as selection:
        logits = forward()
    if logits.shape[:-1] == keep.shape:  # not cut
        return logits[keep]
    if not selection.applied or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"the model returned logits of shape {tuple(logits.shape)} for a batch of "
                           f"{tuple(keep.shape)} tokens")
    return logits


@contextlib.contextmanager
def selected_rows(model: torch.nn.Module, keep: torch.Tensor) -> Iterator[Selection]:
    """Within the block, one forward of ``model`` computes logits only where ``keep`` (B, T, bool) is True.

    The logits then come back as ``(N, vocab)``, N = ``keep.sum()``, in row-major order of ``keep``'s True
    positions (``keep.nonzero()``). ``Selection.applied`` is False when the output layer was not found or saw
    hidden states that do not match ``keep``'s shape (the logits are then the model's usual ones).
    """
    selection = Selection()
    layer = output_layer(model)
    if layer is None:
        yield selection
        return

    def cut(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        selection.calls += 1
        hidden = args[0] if args else None
        if selection.calls > 1 or not isinstance(hidden, torch.Tensor) or hidden.shape[:-1] != keep.shape:
            selection.applied = False  # a second call, or hidden states this mask does not describe: leave them
            return None
        selection.applied = True
        return (hidden[keep], *args[1:])

    handle = layer.register_forward_pre_hook(cut)
    try:
        yield selection
    finally:
        handle.remove()
