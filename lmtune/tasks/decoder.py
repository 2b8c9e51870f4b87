"""What the decoder tasks (causal_lm, sft) share: tokenizer, model, batches, loss, loss-based metrics.

Both train a causal LM on ``(input_ids, labels)`` sequences where ``labels`` is -100 on tokens
that carry no loss. Loss masks are decided when examples are built (from the chat template or
the document boundaries), never by comparing token ids with the pad id: SmolLM2 pads with its
EOS token, and a mask by id would hide every EOS from training, so the tuned model would never
stop. Padding is told apart by position (the attention mask, or the packed row's tail).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from lmtune.config import Config, DataConfig
from lmtune.data.features import PaddingCollator
from lmtune.data.packing import IGNORE_INDEX, PackedCollator
from lmtune.errors import ConfigError, DataError, ModelError
from lmtune.tasks.base import TaskData

log = logging.getLogger(__name__)

T = TypeVar("T")


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of plain text by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def holdout_indices(n: int, fractions: dict[str, float], seed: int) -> dict[str, list[int]] | None:
    """A seeded random hold-out of ``n`` items: sorted indices per split in ``fractions`` (at least one
    each) and under ``"train"`` the rest; None when ``n`` is too small to leave any for training."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    counts = {s: max(1, round(f * n)) for s, f in fractions.items()}
    if sum(counts.values()) >= n:
        return None
    out: dict[str, list[int]] = {}
    start = 0
    for split, count in counts.items():
        out[split] = sorted(order[start : start + count])
        start += count
    out["train"] = sorted(order[start:])
    return out


def given_splits(data: DataConfig) -> dict[str, str]:
    """The evaluation splits that come from their own files: ``{split: source}``."""
    return {s: src for s, src in (("validation", data.validation), ("test", data.test)) if src}


def hold_out(items: list[T], data: DataConfig, *, what: str, kind: str = "data",
             hint: str = "give data.validation and data.test files, or more data"
             ) -> tuple[list[T], dict[str, list[T]], dict[str, str]]:
    """Split the evaluation sets that have no file of their own off the training ``items``: a seeded random
    hold-out of ``data.validation_size`` / ``data.test_size`` (``data.split_seed``).

    Returns the training items left, the held-out items per split and each held-out split's source
    description. Too few items to leave any for training is a DataError ("N {what} are too few to hold
    out validation and test {kind}").
    """
    given = given_splits(data)
    sizes = {s: size for s, size in (("validation", data.validation_size), ("test", data.test_size))
             if s not in given}
    if not sizes:
        return items, {}, {}
    held = holdout_indices(len(items), sizes, data.split_seed)
    if held is None:
        raise DataError(f"{len(items)} {what} are too few to hold out {' and '.join(sizes)} {kind}",
                        file=data.train, hint=hint)
    splits = {s: [items[i] for i in held[s]] for s in sizes}
    sources = {s: f"{data.train} (split {sizes[s]:g})" for s in sizes}
    return [items[i] for i in held["train"]], splits, sources


def first_occurrences(items: list[T], key: Callable[[T], Hashable]) -> list[T]:
    """``items`` without repeats (same ``key``), first occurrence kept, order kept."""
    seen: set[Hashable] = set()
    out = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


def scratch_config(config: Config, tokenizer: Any) -> Any:
    """A fresh decoder config of the size ``config.model`` asks for (init: scratch)."""
    m = config.model
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    if m.architecture == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=m.hidden_size, n_layer=m.layers, n_head=m.heads, n_positions=m.context_length,
            n_inner=m.intermediate_size or 4 * m.hidden_size, **common,
        )
    inner = m.intermediate_size or 32 * math.ceil(8 * m.hidden_size / 3 / 32)
    return AutoConfig.for_model(
        "llama", hidden_size=m.hidden_size, num_hidden_layers=m.layers, num_attention_heads=m.heads,
        num_key_value_heads=m.heads, intermediate_size=inner, max_position_embeddings=m.context_length,
        **common,
    )


class DecoderCollator:
    """Batches of packed rows (features carry ``position_ids``) or of single sequences (right-padded,
    labels padded with -100, attention mask); a split may be packed while another is not."""

    def __init__(self, pad_token_id: int) -> None:
        self.packed = PackedCollator(pad_token_id)
        self.padded = PaddingCollator({"input_ids": pad_token_id, "labels": IGNORE_INDEX}, padding_side="right")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.packed(features) if "position_ids" in features[0] else self.padded(features)


class DecoderTask:
    """Shared behaviour of the decoder tasks; subclasses add data preparation and reports."""

    name: ClassVar[str] = "decoder"
    default_metric: ClassVar[str] = "loss"
    model_class: ClassVar[Any] = AutoModelForCausalLM
    peft_task_type: ClassVar[str] = "CAUSAL_LM"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_cfg = config.data
        self.tokenizer: Any = None  # set by load_tokenizer
        self.phase = "training"

    @property
    def packing(self) -> bool:
        """Whether training rows are packed (the config says, else the task's default)."""
        raise NotImplementedError

    def evaluation_phase(self, phase: str) -> None:
        """``training`` (cheap: loss only) or ``final`` (also what is slow, e.g. generation)."""
        self.phase = phase

    # ------------------------------------------------------------------------------ model
    def build_model(self, model_path: Path | None, data: TaskData, tokenizer: Any) -> torch.nn.Module:
        """The pretrained decoder (or a fresh one for init: scratch) in float32."""
        m = self.config.model
        if m.init == "scratch":
            cfg = scratch_config(self.config, tokenizer)
            torch.manual_seed(self.config.train.seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            log.info("new %s model from scratch: %d layers, hidden %d, %d heads, vocabulary %d",
                     m.architecture, m.layers, m.hidden_size, m.heads, len(tokenizer))
        else:
            from lmtune.models.methods import quantization_config

            assert model_path is not None
            quant = quantization_config(self.config.method)
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    model_path, dtype=torch.bfloat16 if quant else torch.float32,
                    trust_remote_code=m.trust_remote_code, use_safetensors=not m.allow_pickle or None,
                    **({"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}
                       if quant else {}),
                )
            except ValueError as exc:
                raise ModelError(f"this model cannot be loaded as a causal language model: {exc}",
                                 file=model_path) from None
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if positions and self.data_cfg.max_length > positions:
            raise ConfigError(f"data.max_length {self.data_cfg.max_length} is larger than the model's {positions} "
                              "positions", hint=f"set --data.max_length {positions} or less")
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            # New tokens (a chat template's markers): their embedding rows start as the mean of the others.
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        if m.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
            if self.config.method.name in ("lora", "qlora"):
                # Frozen embeddings give checkpointed blocks inputs without grad: make them carry one.
                model.enable_input_require_grads()
        return model

    def head_module_names(self, model: torch.nn.Module) -> set[str]:
        """A language model has no new head."""
        return set()

    # ------------------------------------------------------------------------------ batches and loss
    def collator(self, tokenizer: Any) -> DecoderCollator:
        """Packed rows (position ids restart per sequence, no mask) or right-padded batches."""
        return DecoderCollator(tokenizer.pad_token_id)

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens: labels that are not -100, after the one-token shift."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @staticmethod
    def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

    def _logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**self._inputs(batch), use_cache=False).logits.float()  # (B, T, vocab)

    def _loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._row_losses(model, batch).sum()

    def _row_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) summed next-token cross-entropy of each row's target tokens."""
        logits = model(**self._inputs(batch), use_cache=False).logits  # (B, T, vocab)
        # Position t predicts token t+1: shift the labels, not the logits (slicing the logits would copy
        # the biggest tensor of the step, and its gradient).
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="none")  # (B*T,), 0 where ignored
        return per_token.view(targets.shape).sum(dim=1)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token cross-entropy over the target tokens of the micro-batch."""
        return self._loss_sum(model, batch)

    def loss_metrics(self, model: torch.nn.Module, loader: Any, accelerator: Any) -> dict[str, Any]:
        """Mean target-token loss and perplexity over one split, gathered across processes."""
        total = torch.zeros(2, dtype=torch.float64)  # (loss sum, tokens)
        for batch in loader:
            rows = torch.stack([self._row_losses(model, batch).double(),
                                (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).double()], dim=1)  # (B, 2)
            # Per row, so the rows Accelerate repeats to even out the last batches are dropped.
            total += accelerator.gather_for_metrics(rows).sum(dim=0).cpu()
        loss = float(total[0] / total[1].clamp(min=1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": int(total[1])}

    # ------------------------------------------------------------------------------ saving
    def write_generation_config(self, folder: Path, tokenizer: Any, stop: list[int]) -> None:
        """``generation_config.json`` that stops at the ``stop`` token ids, with lmtune's defaults."""
        g = self.config.generation
        gen = GenerationConfig(
            eos_token_id=stop if len(stop) > 1 else (stop[0] if stop else None),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            max_new_tokens=g.max_new_tokens,
            do_sample=g.do_sample,
            **({"temperature": g.temperature, "top_p": g.top_p} if g.do_sample else {}),
            repetition_penalty=g.repetition_penalty,
        )
        gen.save_pretrained(folder)
