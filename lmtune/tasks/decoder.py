"""What the decoder tasks (causal_lm, sft, seq2seq's decoder route) share: model, batches, loss, loss-based
metrics, the generation config, and :class:`GenerativePredictor` (how their model folders answer prompts).

Both train a causal LM on ``(input_ids, labels)`` sequences where ``labels`` is -100 on tokens
that carry no loss. Loss masks are decided when examples are built (from the chat template or
the document boundaries), never by comparing token ids with the pad id: SmolLM2 pads with its
EOS token, and a mask by id would hide every EOS from training, so the tuned model would never
stop. Padding is told apart by position (the attention mask, or the packed row's tail).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from lmtune.config import Config
from lmtune.data.features import IGNORE_INDEX, PaddingCollator
from lmtune.data.packing import PackedCollator
from lmtune.data.readers import Table
from lmtune.errors import ConfigError, DataError
from lmtune.models.generation import GenerationSettings, chat_prompt
from lmtune.models.loading import load_pretrained
from lmtune.models.methods import quantization_config
from lmtune.models.registry import model_path_of
from lmtune.models.target_logits import scored_logits
from lmtune.models.text_generator import TextGenerator, validate_prompt_messages
from lmtune.tasks.base import Task, TaskData, get_task

log = logging.getLogger(__name__)


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


def refuse_streaming(config: Config) -> None:
    """``lmtune data inspect`` reads the whole training data: a ConfigError for ``data.streaming``."""
    if config.data.streaming:
        raise ConfigError("data inspect reads the whole training data, which data.streaming never loads",
                          hint="inspect one shard: a copy of the config with data.streaming: false and "
                          "data.train: one shard file")


def inspect_generative(cfg: Config, source: str | None, *, examples: int = 3) -> dict[str, Any] | None:
    """The ``lmtune data inspect`` report of a decoder task's config (its task's :meth:`Task.inspect`)."""
    return get_task(cfg.task)(cfg).inspect(source, examples=examples)


class DecoderTask(Task):
    """Shared behaviour of the decoder tasks; subclasses add data preparation and reports (and ``info``)."""

    model_class: ClassVar[Any] = AutoModelForCausalLM
    peft_task_type: ClassVar[str | None] = "CAUSAL_LM"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_cfg = config.data
        self.tokenizer: Any = None  # set by load_tokenizer
        self.phase = "training"

    @property
    def packing(self) -> bool:
        """Whether training rows are packed (the config says, else the task's default)."""
        raise NotImplementedError

    def model_path(self) -> Path | None:
        """The configured model's folder."""
        return model_path_of(self.config.model)

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
            assert model_path is not None
            quant = quantization_config(self.config.method)
            model = load_pretrained(
                AutoModelForCausalLM, model_path, allow_pickle=m.allow_pickle,
                error="this model cannot be loaded as a causal language model",
                dtype=torch.bfloat16 if quant else torch.float32, trust_remote_code=m.trust_remote_code,
                **({"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}} if quant else {}),
            )
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
    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Packed rows (position ids restart per sequence, no mask) or right-padded batches."""
        return DecoderCollator(tokenizer.pad_token_id)

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens: labels that are not -100, after the one-token shift."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @staticmethod
    def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits of every position (compared before and after saving)."""
        return model(**self._inputs(batch), use_cache=False).logits.float()  # (B, T, vocab)

    def _loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._row_losses(model, batch).sum()

    def _row_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) summed next-token cross-entropy of each row's target tokens.

        The language-model head runs on the positions that predict a target token only
        (:func:`~lmtune.models.target_logits.scored_logits`): a chat example's prompt and padding never become
        logits. Where the model's output layer cannot be cut, the same rows are taken from the full logits.
        """
        # Position t predicts token t+1: shift the labels, not the logits (slicing the logits would copy
        # the biggest tensor of the step, and its gradient).
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
        keep = targets != IGNORE_INDEX
        logits = scored_logits(model, keep, lambda: model(**self._inputs(batch), use_cache=False).logits)  # (N, V)
        per_token = F.cross_entropy(logits.float(), targets[keep], reduction="none")  # (N,)
        rows = keep.nonzero(as_tuple=True)[0]  # (N,) the row of each kept position
        return torch.zeros(targets.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(
            0, rows, per_token)

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


# ------------------------------------------------------------------------------------------ predictor
class GenerativePredictor:
    """How a decoder task's saved model folder answers prompts (``Run.predict``, ``lmtune predict``, serve).

    Items are prompts (text): continued as they are, or for chat models (``TaskInfo.chat``) answered as a
    user message in the chat template; chat models also take a conversation so far (a list of
    ``{"role", "content"}`` messages ending with a user message). Built on
    :class:`lmtune.models.text_generator.TextGenerator`; generation settings default to those saved with
    the model (``generation_config.json``), and ``settings`` replaces them per call.
    """

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        self.generator = TextGenerator(model_dir, meta, device=device)
        self.model = self.generator.model
        self.tokenizer = self.generator.tokenizer
        self.settings = saved_settings(self.model.generation_config)

    def check_item(self, item: Any) -> str | None:
        """Why ``item`` is not a prompt this model takes (a sentence for a 400 answer), or None."""
        if isinstance(item, str):
            return None if item.strip() else "empty prompt"
        if isinstance(item, list):
            if not self.generator.chat:
                return f"a {self.generator.task} model continues plain text; chat messages need an sft run"
            try:
                validate_prompt_messages(item, source="request", line=None, field="messages")
            except DataError as exc:
                return exc.message
            return None
        return (f"expected a prompt (text){' or a conversation (a list of messages)' if self.generator.chat else ''}, "
                f"found {type(item).__name__}")

    def render(self, item: Any) -> str:
        """The text the model continues for one item (a DataError for an item :meth:`check_item` refuses)."""
        why = self.check_item(item)
        if why is not None:
            raise DataError(why, field="prompts")
        if isinstance(item, list):
            return chat_prompt(self.tokenizer, validate_prompt_messages(item, source="request", line=None,
                                                                        field="messages"))
        return self.generator.render(item)

    def predict(self, items: list[Any], *, batch_size: int = 32, progress: Any = None,
                settings: GenerationSettings | None = None) -> list[dict[str, Any]]:
        """``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`` per item, in input order (see
        :func:`lmtune.models.generation.generate`)."""
        settings = dataclasses.replace(settings or self.settings, batch_size=batch_size)
        rendered = [self.render(item) for item in items]
        self.generator.check_lengths(rendered, settings.max_new_tokens)
        return self.generator.generate(rendered, settings, progress=progress)

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None, settings: GenerationSettings | None = None) -> list[dict[str, Any]]:
        """The same for the rows of a table: the ``prompt`` column (``columns["text"]`` overrides; ``text``
        also serves) or, for chat models, ``messages``; each result is ``{"generated", "finish_reason",
        "prompt_tokens", "completion_tokens"}``. A bad cell raises DataError naming file, line and column."""
        settings = dataclasses.replace(settings or self.settings, batch_size=batch_size)
        rendered = self.generator.render_table(table, (columns or {}).get("text"), settings.max_new_tokens)
        results = self.generator.generate(rendered, settings, progress=progress)
        return [{"generated": r["text"], **{k: v for k, v in r.items() if k != "text"}} for r in results]


def saved_settings(generation_config: Any) -> GenerationSettings:
    """Generation settings from a model folder's ``generation_config.json`` (lmtune's defaults where it says
    nothing): what :meth:`DecoderTask.write_generation_config` saved."""
    base = GenerationSettings()
    sample = bool(getattr(generation_config, "do_sample", False))
    return dataclasses.replace(
        base,
        max_new_tokens=int(getattr(generation_config, "max_new_tokens", None) or base.max_new_tokens),
        do_sample=sample,
        temperature=float(getattr(generation_config, "temperature", None) or base.temperature) if sample
        else base.temperature,
        top_p=float(getattr(generation_config, "top_p", None) or base.top_p) if sample else base.top_p,
        repetition_penalty=float(getattr(generation_config, "repetition_penalty", None) or base.repetition_penalty),
    )

