"""`lmtune plan`: what a run will cost before it starts, and whether it fits here.

The model is built the way ``lmtune train`` builds it (the task's own ``build_model`` and
``models.methods.apply_method``), but on PyTorch's meta device (``accelerate.init_empty_weights``):
every parameter has its shape and dtype and no storage, so a 7B plan costs what a 100M one does and
the trainable count is the one training will log. Memory is then added up part by part.

The memory model, per process (bytes; ``p`` = bytes of an activation: 4 in fp32, 2 under bf16/fp16
autocast, whose master weights stay fp32 -- ``training/precision.py``):

- weights: every parameter and buffer at its dtype (fp32 here), QLoRA's 4-bit NF4 base at 0.516 B/param
  (4 bits + one fp8 absmax per 64 weights + one fp32 per 256 absmaxes, double quantisation);
- gradients: trainable x 4 (fp32 master gradients);
- optimizer: fused AdamW, exp_avg + exp_avg_sq = trainable x 8, plus a 4-byte ``step`` per trainable tensor;
- activations kept for the backward pass, per block and token (after Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", whose GPT figure at 16 bit is
  ``s*b*h*(34 + 5*a*s/h)``), generalised and measured against ``saved_tensors_hooks`` on CPU:
  ``norms*k*h*4`` (residual stream and norms stay fp32; k = 1 LayerNorm, 2 RMSNorm)
  ``+ 6*h*p`` (attention input, q, k, v -- k/v repeated to all heads --, attention output, MLP input)
  ``+ m*i*p`` (MLP: m = 2 for GELU, 4 for gated SwiGLU)
  ``+ a*s*p*(1 + 2*[attention dropout])`` when the attention scores are kept (eager attention; and
  sdpa on CPU with attention dropout, which falls back to the math kernel, in fp32), else ``a*4``
  (the fused kernel's logsumexp)
  ``+ 2*h*p`` dropout masks (CPU dropout keeps a mask in the input dtype) when hidden dropout > 0;
  with gradient checkpointing only each block's input (``h*4``) plus one block recomputed;
  frozen blocks below the first trained one keep nothing; LoRA dropout adds a copy and a mask of
  each adapted linear's input (``in*(p + 1)``) and frozen RMSNorm weights keep no normalised copy;
- logits of a language-model head: ``b*s*vocab*4*2`` (the fp32 logits and the log-softmax the loss keeps);
- under autocast, the low-precision copies of matmul weights that are kept for the backward pass;
- backward working set: one block's activations again (their gradients while that block runs backward);
- data parallel (DDP) gradient buckets: one more gradient-sized buffer with more than one process;
- sharding: FSDP FULL_SHARD / ZeRO-3 divide weights, gradients and optimizer by the process count,
  SHARD_GRAD_OP / ZeRO-2 gradients and optimizer, ZeRO-1 the optimizer; DeepSpeed with bf16/fp16
  keeps 2-byte weights and gradients and a 12-byte fp32 master + Adam state (the ZeRO paper's 2+2+12);
  offloading moves parts to host memory.

The sum is an upper bound of what is live at once (gradients and the last activations overlap only at
the end of the backward pass). A framework overhead is added: this process's own memory with torch and
transformers imported (CPU), or 0.5 GiB of CUDA context and allocator slack per GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import init_empty_weights
from rich.table import Table
from transformers import PreTrainedModel

from lmtune.config import Config, DistributedConfig, load_config
from lmtune.config.schema import describe_learning_rates
from lmtune.console import quiet_libraries
from lmtune.errors import ConfigError, LmtuneError
from lmtune.models.methods import apply_task_method, count_parameters, transformer_blocks
from lmtune.tasks import Task, TaskData, get_task
from lmtune.training.precision import resolve_precision

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency; /proc/meminfo is the fallback
    psutil = None

log = logging.getLogger(__name__)

GIB = 1024**3
# Below this headroom a plan says "tight": allocator fragmentation and evaluation batches need some room.
_HEADROOM = 0.10
_CUDA_OVERHEAD = int(0.5 * GIB)
# Read the data (exact label count, measured lengths) when its files together are at most this big.
_READ_DATA_LIMIT = 256 * 1024**2
# QLoRA NF4 with double quantisation (Dettmers et al. 2023): 4 + 8/64 + 32/(64*256) bits per weight.
_NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8

FORMULA = (
    "per process: weights + gradients (trainable x 4) + AdamW state (trainable x 8 + 4 per tensor) + "
    "activations + backward working set (one block's activations) + logits (+ autocast weight copies, DDP "
    "buckets, FSDP gathered unit, overhead). "
    "Activations per block and token: norms*k*h*4 + 6*h*p + m*i*p + scores + masks, where p = 4 (fp32) or 2 "
    "(bf16/fp16 autocast), k = 1 LayerNorm / 2 RMSNorm, m = 2 GELU / 4 gated MLP, scores = a*s*p*(1 + 2 if "
    "attention dropout) when kept (eager; sdpa on CPU with dropout, in fp32) else a*4, masks = 2*h*p with "
    "hidden dropout; gradient checkpointing keeps h*4 per block + one block (after Korthikanti et al. 2022, "
    "s*b*h*(34 + 5*a*s/h) at 16 bit). LM logits b*s*vocab*4*2."
)


# ------------------------------------------------------------------------------------------ data classes
@dataclass
class Stack:
    """One stack of transformer blocks and the shapes its activations depend on."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    gated: bool
    norms_per_block: int
    rms_norm: bool
    attention: str  # eager | sdpa | flash_attention_2 | ...
    attention_dropout: float
    hidden_dropout: float
    cross_attention: bool = False
    sequence: str = "source"  # which length drives it: source, or target (encoder-decoder decoder)


@dataclass
class ModelFacts:
    """What the meta model tells about parameters (counts exact, no storage touched)."""

    total: int
    trainable: int
    trainable_tensors: int
    weight_bytes: int
    buffer_bytes: int
    matmul_params: int  # Linear/Conv1D weights: cast to the autocast dtype and kept for backward
    quantizable_params: int  # QLoRA: Linear weights inside the blocks (4-bit)
    largest_block_params: int
    lora_dropout_inputs: int  # sum of in_features of LoRA-adapted linears (per block, when lora dropout > 0)
    trained_blocks: int  # blocks that keep activations (all but frozen ones below the first trained)
    vocab: int
    lm_head: bool
    stacks: list[Stack]
    head_modules: list[str]


@dataclass
class TokenFacts:
    """Batch shape and tokens per optimizer step."""

    batch_size: int
    gradient_accumulation: int
    sequence_length: int
    sequence_length_source: str
    mean_tokens_per_example: float
    target_length: int | None = None
    # Sequences each example puts through the model at once (Task.rows_per_example: 2 for a preference pair).
    rows_per_example: int = 1

    def per_step(self, processes: int) -> dict[str, Any]:
        """Padded and real tokens per micro-batch and per optimizer step, per process and in all."""
        micro = self.batch_size * self.rows_per_example * self.sequence_length
        real = self.batch_size * self.rows_per_example * self.mean_tokens_per_example * self.gradient_accumulation
        return {
            "batch_size": self.batch_size, "rows_per_example": self.rows_per_example,
            "gradient_accumulation": self.gradient_accumulation,
            "processes": processes, "sequence_length": self.sequence_length,
            "sequence_length_source": self.sequence_length_source,
            "target_length": self.target_length,
            "mean_tokens_per_example": round(self.mean_tokens_per_example, 1),
            "micro_batch_tokens": micro,
            "tokens_per_step_per_process": micro * self.gradient_accumulation,
            "tokens_per_step_global": micro * self.gradient_accumulation * processes,
            "real_tokens_per_step_global": round(real * processes),
        }


@dataclass
class PlanResult:
    """Everything ``lmtune plan`` prints; ``to_json`` gives the stable machine form."""

    config: str
    task: str
    model: str
    model_path: str | None
    method: str
    precision: str
    num_processes: int
    distributed: dict[str, Any]
    parameters: dict[str, Any]
    labels: dict[str, Any] | None
    tokens: dict[str, Any]
    memory: dict[str, Any]
    device: dict[str, Any]
    fit: dict[str, Any]
    learning_rates: dict[str, Any] = field(default_factory=dict)
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain data with stable keys (see README 'Plan before you launch')."""
        return {"plan_version": 1, **asdict(self), "formula": FORMULA}


# ------------------------------------------------------------------------------------------ meta build
@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build models with meta parameters (shape and dtype, no storage); weights are never read.

    New embedding rows start at the mean of the old ones in training (``mean_resizing``), which needs
    real values: on the meta device they are plain new rows of the same shape.
    """
    original = PreTrainedModel.resize_token_embeddings

    def resize(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["mean_resizing"] = False
        return original(self, *args, **kwargs)

    PreTrainedModel.resize_token_embeddings = resize  # type: ignore[method-assign]
    try:
        with init_empty_weights():
            yield
    finally:
        PreTrainedModel.resize_token_embeddings = original  # type: ignore[method-assign]


def _cfg_get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def _stack(name: str, cfg: Any, block: torch.nn.Module | None, layers: int, *, sequence: str = "source",
           cross: bool = False) -> Stack:
    """A stack's shapes from its config, and MLP/norm kinds from one of its blocks."""
    hidden = int(_cfg_get(cfg, "hidden_size", "n_embd", "d_model"))
    inner = int(_cfg_get(cfg, "intermediate_size", "n_inner", "ffn_dim", "d_ff", default=4 * hidden))
    heads = int(_cfg_get(cfg, "num_attention_heads", "n_head", "encoder_attention_heads"))
    gated, norms, rms = False, 2, False
    if block is not None:
        widths = [m.out_features for m in block.modules() if isinstance(m, torch.nn.Linear)]
        gated = widths.count(inner) >= 2
        norm_modules = [m for m in block.modules() if "norm" in type(m).__name__.lower()]
        norms = len(norm_modules) or 2
        rms = any("rms" in type(m).__name__.lower() for m in norm_modules)
    return Stack(
        name=name, layers=layers, hidden=hidden, intermediate=inner, heads=heads, gated=gated,
        norms_per_block=norms, rms_norm=rms, attention=str(getattr(cfg, "_attn_implementation", None) or "sdpa"),
        attention_dropout=float(_cfg_get(cfg, "attention_probs_dropout_prob", "attention_dropout", "attn_pdrop",
                                         default=0.0)),
        hidden_dropout=float(_cfg_get(cfg, "hidden_dropout_prob", "resid_pdrop", "dropout", default=0.0)),
        cross_attention=cross, sequence=sequence,
    )


def _blocks(module: torch.nn.Module) -> torch.nn.ModuleList | None:
    return transformer_blocks(module)


def _stacks(model: torch.nn.Module) -> list[Stack]:
    """The block stacks of a (not yet adapted) model: one, or encoder + decoder."""
    cfg: Any = model.config
    if getattr(cfg, "is_encoder_decoder", False) and hasattr(cfg, "encoder") and hasattr(cfg, "decoder"):
        enc = _blocks(model.encoder)  # type: ignore[arg-type]
        dec = _blocks(model.decoder)  # type: ignore[arg-type]
        return [_stack("encoder", cfg.encoder, enc[0] if enc else None, len(enc) if enc else 0),
                _stack("decoder", cfg.decoder, dec[0] if dec else None, len(dec) if dec else 0,
                       sequence="target", cross=True)]
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    blocks = _blocks(model)
    layers = len(blocks) if blocks is not None else int(_cfg_get(text, "num_hidden_layers", "n_layer", default=0))
    return [_stack("blocks", text, blocks[0] if blocks else None, layers)]


def _facts(model: torch.nn.Module, stacks: list[Stack], head: set[str], method: Any, lm_head: bool) -> ModelFacts:
    """Count parameters, bytes and the pieces the memory model needs, on the adapted meta model."""
    trainable, total = count_parameters(model)
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    matmul = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            matmul += w.numel()
    blocks = _blocks(model)
    quantizable = 0
    largest = 0
    lora_inputs = 0
    trained_blocks = 0
    if blocks is not None:
        first_trained = next((i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())), None)
        trained_blocks = 0 if first_trained is None else len(blocks) - first_trained
        for block in blocks:
            largest = max(largest, sum(p.numel() for p in block.parameters()))
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) and "lora_" not in name:
                    quantizable += module.weight.numel()
        first = blocks[0]
        if method.name in ("lora", "qlora") and method.dropout > 0:
            lora_inputs = sum(m.in_features for n, m in first.named_modules()
                              if isinstance(m, torch.nn.Linear) and n.endswith("lora_A.default"))
    vocab = 0
    with contextlib.suppress(AttributeError, TypeError):
        vocab = int(cast(Any, model).get_output_embeddings().weight.shape[0]) if lm_head else 0
    return ModelFacts(
        total=total, trainable=trainable, trainable_tensors=sum(1 for p in params if p.requires_grad),
        weight_bytes=weight_bytes, buffer_bytes=buffer_bytes, matmul_params=matmul, quantizable_params=quantizable,
        largest_block_params=largest, lora_dropout_inputs=lora_inputs,
        trained_blocks=trained_blocks if method.name != "full" else sum(s.layers for s in stacks),
        vocab=vocab, lm_head=lm_head, stacks=stacks, head_modules=sorted(head),
    )


def build_meta_model(task: Task, model_path: Path | None, data: Any, tokenizer: Any, method: Any) -> ModelFacts:
    """The task's model with ``method`` applied, built on the meta device; its facts."""
    with meta_device():
        model = task.build_model(model_path, data, tokenizer)
    # Loading on meta skips tying the output embedding to the input one; training has them tied.
    with contextlib.suppress(AttributeError):
        cast(Any, model).tie_weights()
    stacks = _stacks(model)
    # A task that generates its predictions, or fills masked tokens, has a language-model head: logits over the
    # whole vocabulary at every position.
    lm_head = task.info.generates or task.info.auto_class == "AutoModelForMaskedLM"
    head = task.head_module_names(model)
    build_method = method.model_copy(update={"name": "lora"}) if method.name == "qlora" else method
    # How adapters start changes no shape; PiSSA/OLoRA/LoftQ would decompose weights that meta tensors lack.
    build_method = build_method.model_copy(update={"init_lora_weights": "default"})
    with meta_device():
        model = apply_task_method(model, task, build_method, head)
    return _facts(model, stacks, head, method, lm_head)


# ------------------------------------------------------------------------------------------ memory model
def activation_bytes(stack: Stack, *, batch: int, seq: int, act_bytes: int, device: str,
                     source_len: int | None = None) -> int:
    """Bytes one block of ``stack`` keeps for the backward pass for ``batch`` x ``seq`` tokens."""
    h, i, a, p = stack.hidden, stack.intermediate, stack.heads, act_bytes
    per_token = stack.norms_per_block * (2 if stack.rms_norm else 1) * h * 4  # fp32 residual stream / norms
    per_token += 6 * h * p + (4 if stack.gated else 2) * i * p
    keeps_scores = stack.attention == "eager" or (device == "cpu" and stack.attention == "sdpa"
                                                  and stack.attention_dropout > 0)
    score_bytes = p if stack.attention == "eager" else 4  # the CPU math kernel runs in fp32
    drop = stack.attention_dropout > 0

    def scores(keys: int) -> int:
        return a * keys * score_bytes * (3 if drop else 1) if keeps_scores else a * 4

    per_token += scores(seq)
    if stack.hidden_dropout > 0:
        per_token += 2 * h * p
    if stack.cross_attention:  # decoder block of an encoder-decoder: q, output (+ k, v over the source)
        per_token += 2 * h * p + h * 4 + scores(source_len or seq)
    total = batch * seq * per_token
    if stack.cross_attention:
        total += batch * (source_len or seq) * 2 * h * p  # cross-attention k, v of the source
    return int(total)


def estimate_memory(facts: ModelFacts, tokens: TokenFacts, *, method: str, lora_dropout: float,
                    precision: str, gradient_checkpointing: bool, processes: int, dist: DistributedConfig,
                    device: str, overhead: int) -> dict[str, Any]:
    """Per-device and host bytes, part by part, for one process of ``processes``."""
    p = 4 if precision == "fp32" else 2
    autocast = precision in ("bf16", "fp16")
    b, s = tokens.batch_size * tokens.rows_per_example, tokens.sequence_length
    notes: list[str] = []

    # ---- weights, gradients, optimizer at their dtypes, before sharding
    frozen = facts.total - facts.trainable
    if method == "qlora":
        other = facts.total - facts.quantizable_params
        weights = int(facts.quantizable_params * _NF4_BYTES) + other * 4 + facts.buffer_bytes
    else:
        weights = facts.weight_bytes + facts.buffer_bytes
    grads = facts.trainable * 4
    optimizer = facts.trainable * 8 + facts.trainable_tensors * 4
    deepspeed = dist.strategy == "deepspeed" and processes > 1
    if deepspeed and autocast:
        # DeepSpeed's own mixed precision: 2-byte weights and gradients, fp32 master + Adam moments (ZeRO).
        weights = facts.trainable * 2 + frozen * (2 if method != "qlora" else 0) + facts.buffer_bytes + (
            int(facts.quantizable_params * _NF4_BYTES) if method == "qlora" else 0)
        grads = facts.trainable * 2
        optimizer = facts.trainable * 12

    # ---- activations
    acts = 0
    working = 0  # the backward pass of a block holds its activations' gradients beside them
    for stack in facts.stacks:
        seq = tokens.target_length or s if stack.sequence == "target" else s
        one = activation_bytes(stack, batch=b, seq=seq, act_bytes=p, device=device, source_len=s)
        working = max(working, one)
        blocks = min(stack.layers, facts.trained_blocks) if len(facts.stacks) == 1 else stack.layers
        if method == "freeze" and len(facts.stacks) > 1:
            blocks = 0
        if gradient_checkpointing and blocks:
            acts += blocks * b * seq * stack.hidden * 4 + one
        else:
            acts += blocks * one
        if method in ("lora", "qlora") and blocks and not gradient_checkpointing:
            # Measured (saved_tensors_hooks): a frozen RMSNorm weight needs no normalised copy; LoRA dropout
            # keeps its output and a bool mask of every adapted linear's input.
            frozen_norms = stack.norms_per_block * stack.hidden * 4 if stack.rms_norm else 0
            lora = facts.lora_dropout_inputs * (p + 1) if lora_dropout > 0 else 0
            acts += blocks * b * seq * (lora - frozen_norms)
    hidden = facts.stacks[0].hidden if facts.stacks else 0
    acts += b * s * hidden * 4 * 2  # embeddings (sum, norm input) and the final norm
    logits = b * (tokens.target_length or s) * facts.vocab * 4 * 2 if facts.lm_head else 0
    autocast_copies = facts.matmul_params * 2 if autocast and method != "qlora" else 0

    # ---- sharding and offload
    shard = {"weights": 1, "gradients": 1, "optimizer": 1}
    offload: set[str] = set()
    extra: dict[str, int] = {}
    if processes > 1:
        if dist.strategy == "ddp":
            extra["ddp_gradient_buckets"] = grads
        elif dist.strategy == "fsdp":
            what = {"FULL_SHARD": ("weights", "gradients", "optimizer"), "HYBRID_SHARD": ("weights", "gradients",
                    "optimizer"), "SHARD_GRAD_OP": ("gradients", "optimizer"), "NO_SHARD": ()}[dist.sharding_strategy]
            for part in what:
                shard[part] = processes
            if "weights" in what:
                # A unit's full parameters are gathered for its forward/backward (and the next one prefetched).
                extra["fsdp_gathered_units"] = 2 * facts.largest_block_params * 4
            if dist.sharding_strategy == "HYBRID_SHARD":
                notes.append("HYBRID_SHARD shards inside a node only: the figures assume all processes on one node")
            if dist.cpu_offload:
                offload |= {"weights", "gradients", "optimizer"}
        elif dist.strategy == "deepspeed":
            stage_parts = [(), ("optimizer",), ("optimizer", "gradients"), ("optimizer", "gradients", "weights")]
            for part in stage_parts[dist.zero_stage]:
                shard[part] = processes
            if dist.offload_optimizer != "none":
                offload.add("optimizer")
            if dist.offload_params != "none":
                offload.add("weights")
            if dist.offload_optimizer == "nvme" or dist.offload_params == "nvme":
                notes.append("nvme offload: that part goes to disk, shown under host memory as an upper bound")
    parts = {"weights": weights // shard["weights"], "gradients": grads // shard["gradients"],
             "optimizer": optimizer // shard["optimizer"]}
    device_parts: dict[str, int] = {k: v for k, v in parts.items() if k not in offload}
    host_parts: dict[str, int] = {f"{k}_offloaded": v for k, v in parts.items() if k in offload}
    device_parts.update({"activations": acts, "backward_working_set": working if facts.trained_blocks else 0,
                         "logits": logits, "autocast_weight_copies": autocast_copies, **extra})
    if device == "cuda":
        device_parts["overhead"] = _CUDA_OVERHEAD
        host_parts["overhead"] = overhead
    else:
        device_parts["overhead"] = overhead
    return {
        "device_kind": device,
        "per_device": {**device_parts, "total": sum(device_parts.values())},
        "host_per_process": {**host_parts, "total": sum(host_parts.values())},
        "sharded_by": shard,
        "offloaded": sorted(offload),
        "activation_bytes": p,
        "gradient_checkpointing": gradient_checkpointing,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------ device
def available_ram() -> int:
    """Memory this machine can still give (psutil, else /proc/meminfo MemAvailable)."""
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    with open("/proc/meminfo", encoding="utf-8") as f:  # pragma: no cover
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover


def describe_device() -> dict[str, Any]:
    """Visible GPUs (free/total memory each) or this machine's RAM."""
    info: dict[str, Any] = {"ram_available_bytes": available_ram()}
    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "free_bytes": int(free),
                         "total_bytes": int(total)})
        info.update(kind="cuda", gpus=gpus)
    else:
        info.update(kind="cpu", gpus=[], cpu_count=os.cpu_count())
    return info


def _process_overhead() -> int:
    """This process's resident memory: torch, transformers and Python, as a training process has them too."""
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    return int(0.6 * GIB)  # pragma: no cover


def fit_verdict(memory: dict[str, Any], device: dict[str, Any], processes: int) -> dict[str, Any]:
    """Whether the estimate fits the memory this machine shows, with the numbers compared."""
    per_device = memory["per_device"]["total"]
    host = memory["host_per_process"]["total"]
    checks = []
    if device["kind"] == "cuda":
        gpus = device["gpus"][:processes]
        free = min(g["free_bytes"] for g in gpus)
        checks.append(("GPU", per_device, free,
                       f"{len(gpus)} GPU(s) used; the least free has {_gib(free)} free"))
        if processes > len(device["gpus"]):
            checks.append(("GPU", 1, 0, f"{processes} processes but only {len(device['gpus'])} GPU(s) visible"))
        local = min(processes, len(device["gpus"]))
        checks.append(("RAM", host * local, device["ram_available_bytes"], f"host memory of {local} process(es)"))
    else:
        checks.append(("RAM", per_device * processes, device["ram_available_bytes"],
                       f"{processes} CPU process(es) on this machine share its RAM"))
    verdict = "fits"
    lines: list[dict[str, Any]] = []
    for where, need, have, what in checks:
        if need > have:
            state = "does_not_fit"
        elif need > (1 - _HEADROOM) * have:
            state = "tight"
        else:
            state = "fits"
        if state == "does_not_fit" or (state == "tight" and verdict == "fits"):
            verdict = state
        lines.append({"memory": where, "need_bytes": int(need), "available_bytes": int(have), "verdict": state,
                      "what": what})
    words = {"fits": "fits", "tight": "fits, tightly (under 10% to spare)", "does_not_fit": "does NOT fit"}
    main = lines[0]
    message = (f"{words[verdict]}: needs about {_gib(main['need_bytes'])} of {main['memory']}, "
               f"{_gib(main['available_bytes'])} available ({main['what']})")
    return {"verdict": verdict, "checks": lines, "message": message}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


# ------------------------------------------------------------------------------------------ the plan
def _data_is_cheap(cfg: Config) -> bool:
    total = 0
    for source in cfg.data.sources():
        if source.startswith("bundled:"):
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        elif path.is_file():
            total += path.stat().st_size
    return total <= _READ_DATA_LIMIT and not getattr(cfg.data, "streaming", False)


def _stub_data(labels: list[str]) -> Any:
    return TaskData(splits={}, lengths={}, info={"labels": labels}, extra={})


def _token_facts(cfg: Config, task: Task, data: Any | None) -> TokenFacts:
    d, t = cfg.data, cfg.train
    batch = t.batch_size
    rows = task.rows_per_example
    packed = task.packing
    target = task.target_length
    if packed:
        return TokenFacts(batch, t.gradient_accumulation, d.max_length,
                          "packed rows of data.max_length", float(d.max_length), target, rows)
    # Answers sampled during training (grpo) lengthen every row by up to this many tokens.
    sampled = task.sampled_tokens
    plus = f" + {sampled:,} sampled tokens (generation.max_new_tokens)" if sampled else ""
    lengths = list(data.lengths.get("train", [])) if data is not None and data.lengths else []
    if lengths:
        longest = min(max(lengths), d.max_length)
        return TokenFacts(batch, t.gradient_accumulation, longest + sampled,
                          f"measured: longest of {len(lengths):,} training examples (memory peaks at the longest "
                          f"batch; data.max_length {d.max_length}){plus}", float(statistics.fmean(lengths)) + sampled,
                          target, rows)
    return TokenFacts(batch, t.gradient_accumulation, d.max_length + sampled,
                      f"data.max_length (data not read){plus}", float(d.max_length + sampled), target, rows)


def plan(
    config: Config | str | Path | dict[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
    num_processes: int | None = None,
    read_data: bool | None = None,
    suggest: bool = True,
) -> PlanResult:
    """Estimate parameters, memory per device and tokens per step of a training run; say whether it fits.

    ``read_data``: read and tokenise the data as training would (cached, so training reuses it) for the
    exact label count and measured lengths; None reads it when its files are at most 256 MiB.
    """
    started = time.perf_counter()
    quiet_libraries()
    overhead = _process_overhead()
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if isinstance(config, Config) and overrides:
        cfg = load_config(config.to_dict(), overrides)
    device_info = describe_device()
    device = device_info["kind"]
    processes = num_processes if num_processes is not None else max(1, len(device_info["gpus"]))
    if processes < 1:
        raise ConfigError("--num-processes must be at least 1")
    notes: list[str] = []
    if cfg.model.name.startswith("baseline:"):
        raise ConfigError(f"lmtune plan estimates pretrained transformers; model.name '{cfg.model.name}' is a small "
                          "network trained from scratch (a few MB: it fits anywhere)")
    if cfg.method.name == "qlora" and device != "cuda":
        notes.append("method qlora needs a CUDA GPU (bitsandbytes); this machine has none: the figures are for one")

    precision = resolve_precision(cfg.train.precision, torch.device(device))
    precision = "fp32" if precision == "no" else precision
    task = get_task(cfg.task)(cfg)
    model_path = task.model_path()
    tokenizer = task.load_tokenizer(model_path)
    read = _data_is_cheap(cfg) if read_data is None else read_data
    labels_info: dict[str, Any] | None = None
    data = None
    if read:
        data = task.prepare(tokenizer)
        if "labels" in data.info:  # the label set of a task with a label head
            labels_info = {"count": len(data.info["labels"]), "source": "read from the training data"}
        build_data = data
    else:
        labels, source = task.planned_labels()
        if labels:
            labels_info = {"count": len(labels), "source": source}
        build_data = _stub_data(labels)
        notes.append("data not read (--no-read-data or files over 256 MiB): lengths from data.max_length")
    facts = build_meta_model(task, model_path, build_data, tokenizer, cfg.method)
    tokens = _token_facts(cfg, task, data)
    checkpointing = cfg.model.gradient_checkpointing or (
        cfg.train.distributed.strategy == "fsdp" and cfg.train.distributed.activation_checkpointing)

    def memory_for(f: ModelFacts, tok: TokenFacts, *, method: str = cfg.method.name, ckpt: bool = checkpointing,
                   n: int = processes, dist: DistributedConfig = cfg.train.distributed,
                   prec: str = precision) -> dict[str, Any]:
        return estimate_memory(f, tok, method=method, lora_dropout=cfg.method.dropout, precision=prec,
                               gradient_checkpointing=ckpt, processes=n, dist=dist, device=device, overhead=overhead)

    memory = memory_for(facts, tokens)
    notes += memory.pop("notes")
    notes += task.plan_notes()
    memory["formula"] = FORMULA
    fit = fit_verdict(memory, device_info, processes)
    result = PlanResult(
        config=str(config) if not isinstance(config, (Config, dict)) else "(mapping)",
        task=cfg.task, model=cfg.model.name, model_path=str(model_path) if model_path else None,
        method=cfg.method.name, precision=precision, num_processes=processes,
        distributed=_distributed_summary(cfg.train.distributed, processes),
        parameters={"total": facts.total, "trainable": facts.trainable,
                    "trainable_fraction": facts.trainable / max(facts.total, 1),
                    "trainable_tensors": facts.trainable_tensors, "head_modules": facts.head_modules,
                    "blocks": sum(s.layers for s in facts.stacks), "attention": facts.stacks[0].attention
                    if facts.stacks else None},
        labels=labels_info, tokens=tokens.per_step(processes), memory=memory, device=device_info, fit=fit,
        learning_rates=cfg.learning_rates(), notes=notes,
    )
    if suggest and fit["verdict"] != "fits":
        result.suggestions = _suggestions(cfg, task, model_path, build_data, tokenizer, facts, tokens, memory_for,
                                          device_info, processes, precision)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _distributed_summary(dist: DistributedConfig, processes: int) -> dict[str, Any]:
    out: dict[str, Any] = {"strategy": dist.strategy if processes > 1 else f"{dist.strategy} (one process: none)"}
    if dist.strategy == "fsdp":
        out.update(sharding_strategy=dist.sharding_strategy, cpu_offload=dist.cpu_offload,
                   activation_checkpointing=dist.activation_checkpointing)
    elif dist.strategy == "deepspeed":
        out.update(zero_stage=dist.zero_stage, offload_optimizer=dist.offload_optimizer,
                   offload_params=dist.offload_params)
    return out


def _suggestions(cfg: Config, task: Any, model_path: Path | None, data: Any, tokenizer: Any, facts: ModelFacts,
                 tokens: TokenFacts, memory_for: Any, device: dict[str, Any], processes: int,
                 precision: str) -> list[dict[str, Any]]:
    """What to change, each with the estimate it gives (same model, one setting changed)."""
    out: list[dict[str, Any]] = []

    def add(change: str, override: str, memory: dict[str, Any], n: int = processes) -> None:
        verdict = fit_verdict(memory, device, n)["verdict"]
        out.append({"change": change, "override": override, "per_device_bytes": memory["per_device"]["total"],
                    "verdict": verdict})

    if cfg.method.name in ("full", "freeze"):
        try:
            lora_method = cfg.method.model_copy(update={"name": "lora"})
            lora_facts = build_meta_model(task, model_path, data, tokenizer, lora_method)
            add(f"LoRA adapters (r={cfg.method.r}): {lora_facts.trainable:,} trainable parameters",
                "--method.name lora", memory_for(lora_facts, tokens, method="lora"))
        except LmtuneError:
            pass
    if not cfg.model.gradient_checkpointing:
        add("gradient checkpointing (recompute activations, ~30% slower)", "--model.gradient_checkpointing true",
            memory_for(facts, tokens, ckpt=True))
    if tokens.batch_size > 1:
        half = max(1, tokens.batch_size // 2)
        smaller = TokenFacts(half, tokens.gradient_accumulation * 2, tokens.sequence_length,
                             tokens.sequence_length_source, tokens.mean_tokens_per_example, tokens.target_length)
        add(f"batch {half} x accumulation {tokens.gradient_accumulation * 2} (same global batch)",
            f"--train.batch_size {half} --train.gradient_accumulation {tokens.gradient_accumulation * 2}",
            memory_for(facts, smaller))
    if precision == "fp32":
        add("bf16 autocast (half-size activations; on a CPU without fast bf16 it is slower)", "--train.precision bf16", memory_for(facts, tokens, prec="bf16"))
    if device["kind"] == "cuda":
        n = max(processes, len(device["gpus"]), 2)
        fsdp = DistributedConfig(strategy="fsdp", sharding_strategy="FULL_SHARD")
        add(f"FSDP FULL_SHARD over {n} GPUs (parameters, gradients, optimizer sharded)",
            f"--num-processes {n} --train.distributed.strategy fsdp", memory_for(facts, tokens, n=n, dist=fsdp), n)
        zero = DistributedConfig(strategy="deepspeed", zero_stage=3, offload_optimizer="cpu")
        add(f"DeepSpeed ZeRO-3 over {n} GPUs, optimizer offloaded to CPU",
            f"--num-processes {n} --train.distributed.strategy deepspeed --train.distributed.zero_stage 3 "
            "--train.distributed.offload_optimizer cpu", memory_for(facts, tokens, n=n, dist=zero), n)
    elif processes > 1:
        out.append({"change": "fewer CPU processes: processes on one machine share its RAM, so more of them "
                    "need more memory, not less", "override": "--num-processes 1",
                    "per_device_bytes": memory_for(facts, tokens, n=1)["per_device"]["total"],
                    "verdict": fit_verdict(memory_for(facts, tokens, n=1), device, 1)["verdict"]})
    order = {"fits": 0, "tight": 1, "does_not_fit": 2}
    out.sort(key=lambda s: (order[s["verdict"]], s["per_device_bytes"]))
    return out


# ------------------------------------------------------------------------------------------ printing
_PART_NAMES = {
    "weights": "weights", "gradients": "gradients", "optimizer": "optimizer (AdamW)", "activations": "activations",
    "logits": "logits + loss", "backward_working_set": "backward working set",
    "autocast_weight_copies": "autocast weight copies",
    "ddp_gradient_buckets": "DDP gradient buckets", "fsdp_gathered_units": "FSDP gathered units",
    "overhead": "framework overhead", "weights_offloaded": "weights (offloaded)",
    "gradients_offloaded": "gradients (offloaded)", "optimizer_offloaded": "optimizer (offloaded)",
}


def print_plan(result: PlanResult, console: Any) -> None:
    """The plan as rich tables: model and tokens, memory per part, the verdict and what to change."""
    p, t, m = result.parameters, result.tokens, result.memory
    head = Table(title=f"lmtune plan: {result.task}, {result.model}, method {result.method}", show_header=False)
    head.add_column("what", style="bold")
    head.add_column("value")
    head.add_row("parameters", f"{p['total']:,} ({p['blocks']} blocks, attention {p['attention']})")
    head.add_row("trainable", f"{p['trainable']:,} ({100 * p['trainable_fraction']:.2f}%)"
                 + (f"; new head: {', '.join(p['head_modules'])}" if p["head_modules"] else ""))
    if result.labels:
        head.add_row("labels", f"{result.labels['count']} ({result.labels['source']})")
    head.add_row("learning rate", describe_learning_rates(result.learning_rates))
    head.add_row("precision", f"{result.precision} (activations {m['activation_bytes']} bytes"
                 + (", gradient checkpointing" if m["gradient_checkpointing"] else "") + ")")
    head.add_row("processes", f"{result.num_processes}, {result.distributed['strategy']}"
                 + "".join(f", {k} {v}" for k, v in result.distributed.items() if k != "strategy"))
    head.add_row("sequence length", f"{t['sequence_length']} ({t['sequence_length_source']})"
                 + (f"; target {t['target_length']}" if t["target_length"] else ""))
    head.add_row("tokens per step", f"{t['tokens_per_step_per_process']:,} per process, {t['tokens_per_step_global']:,} "
                 f"in all (batch {t['batch_size']}" + (f" x {t['rows_per_example']} sequences" if t["rows_per_example"] > 1
                                                 else "") + f" x length {t['sequence_length']} x accumulation "
                 f"{t['gradient_accumulation']} x {t['processes']} process(es)); real tokens about "
                 f"{t['real_tokens_per_step_global']:,} (mean {t['mean_tokens_per_example']} per example)")
    console.print(head)
    where = "per GPU" if m["device_kind"] == "cuda" else "per process (RAM)"
    mem = Table(title=f"estimated memory {where}")
    mem.add_column("part")
    mem.add_column(where, justify="right")
    for key, value in m["per_device"].items():
        if key != "total" and value:
            mem.add_row(_PART_NAMES.get(key, key), _gib(value))
    mem.add_row("[bold]total[/bold]", f"[bold]{_gib(m['per_device']['total'])}[/bold]")
    if m["host_per_process"]["total"] and m["device_kind"] == "cuda":
        for key, value in m["host_per_process"].items():
            if key != "total" and value:
                mem.add_row(f"host: {_PART_NAMES.get(key, key)}", _gib(value))
    console.print(mem)
    style = {"fits": "green", "tight": "yellow", "does_not_fit": "bold red"}[result.fit["verdict"]]
    console.print(f"[{style}]{result.fit['message']}[/{style}]", highlight=False)
    for check in result.fit["checks"][1:]:
        if check["verdict"] != "fits":
            console.print(f"  {check['memory']}: {check['what']}: needs {_gib(check['need_bytes'])}, "
                          f"{_gib(check['available_bytes'])} available", highlight=False)
    if result.suggestions:
        console.print("what to change:", style="bold")
        for s in result.suggestions:
            console.print(f"  {s['change']}: {_gib(s['per_device_bytes'])} {where} ({s['verdict'].replace('_', ' ')})"
                          f"\n      {s['override']}", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", style="dim", highlight=False)
    console.print(f"formula: {FORMULA}", style="dim", highlight=False)
    console.print(f"planned in {result.seconds:.1f} s; no weights were loaded", style="dim")


def gib(n: float) -> float:
    """Bytes as GiB (for tests and benchmarks)."""
    return n / GIB


__all__ = ["FORMULA", "PlanResult", "activation_bytes", "build_meta_model", "estimate_memory", "fit_verdict",
           "meta_device", "plan", "print_plan"]
