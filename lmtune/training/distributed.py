"""Several processes through Accelerate's own engines: DDP, FSDP, DeepSpeed.

lmtune starts nothing itself: ``lmtune train --num-processes N`` hands the command to
``accelerate launch`` (see :func:`launch_command`), and inside each process
:func:`accelerator_plugins` turns ``train.distributed`` into Accelerate's plugin objects.
A user's own ``accelerate config`` (environment variables set by ``accelerate launch``)
wins where ``train.distributed`` is left at its default, ``ddp``.

The helpers here are also what keeps a multi-process run from hanging or writing twice:
the run folder is prepared by the main process alone (:func:`on_main_then_shared`), and
sharded weights are gathered by every process before the main one saves
(:func:`materialise_for_saving`).
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast_object_list,
)

from lmtune.config import Config
from lmtune.errors import ConfigError, LmtuneError

log = logging.getLogger(__name__)

T = TypeVar("T")


def check_distributed_supported(cfg: Config, num_processes: int = 1) -> None:
    """Refuse, before anything loads, a strategy this machine cannot run.

    One process trains the same way under every strategy, so a config written for a GPU
    cluster still runs on a laptop; several CPU processes can only do DDP (Accelerate's
    MULTI_CPU mode has no FSDP or DeepSpeed, and would silently fall back to DDP).
    """
    d = cfg.train.distributed
    if num_processes > 1 and not torch.cuda.is_available() and d.strategy != "ddp":
        raise ConfigError(f"train.distributed.strategy {d.strategy} on {num_processes} CPU processes: Accelerate "
                          "runs FSDP and DeepSpeed on GPUs (and other accelerators) only; CPU processes train "
                          "data parallel", hint="set train.distributed.strategy ddp on this machine")
    if d.strategy == "deepspeed" and torch.cuda.is_available():
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("train.distributed.strategy deepspeed needs the deepspeed package",
                              hint="pip install deepspeed, or use strategy fsdp")
        if d.deepspeed_config is not None and not Path(d.deepspeed_config).is_file():
            raise ConfigError("train.distributed.deepspeed_config: file not found", file=d.deepspeed_config)
    if cfg.method.name == "qlora" and d.strategy == "fsdp" and d.fsdp_version == 1:
        raise ConfigError("method.name qlora with FSDP needs train.distributed.fsdp_version 2 "
                          "(4-bit weights shard with fully_shard only)")


def process_group_kwargs(cfg: Config) -> dict[str, Any]:
    """``PartialState`` arguments: the backend (unless auto) and the barrier timeout."""
    d = cfg.train.distributed
    kwargs: dict[str, Any] = {"cpu": not torch.cuda.is_available(), "timeout": dt.timedelta(minutes=d.timeout_minutes)}
    if d.backend != "auto":
        kwargs["backend"] = d.backend
    return kwargs


def accelerator_plugins(cfg: Config, num_processes: int) -> dict[str, Any]:
    """``Accelerator(...)`` keyword arguments for ``train.distributed``.

    With one process nothing is needed (``{}``). ``ddp`` passes DDP's knobs as
    ``DistributedDataParallelKwargs`` and otherwise leaves Accelerate to read its own
    launch configuration, so ``accelerate launch --config_file fsdp.yaml`` keeps working.
    """
    d = cfg.train.distributed
    # DeepSpeed on one GPU still offloads (ZeRO-Offload); anything else on one process is plain training.
    if num_processes <= 1 and not (d.strategy == "deepspeed" and torch.cuda.is_available()):
        if d.strategy != "ddp":
            log.info("train.distributed.strategy %s with one process: plain training", d.strategy)
        return {}
    if d.strategy == "ddp":
        return {"kwargs_handlers": [DistributedDataParallelKwargs(
            find_unused_parameters=d.find_unused_parameters, bucket_cap_mb=d.bucket_cap_mb)]}
    if d.strategy == "fsdp":
        return {"fsdp_plugin": fsdp_plugin(cfg)}
    return {"deepspeed_plugin": deepspeed_plugin(cfg)}


def fsdp_plugin(cfg: Config) -> Any:
    """Accelerate's ``FullyShardedDataParallelPlugin`` for ``train.distributed``."""
    d = cfg.train.distributed
    policy = {"transformer": "transformer_based_wrap", "size": "size_based_wrap", "none": "no_wrap"}
    kwargs: dict[str, Any] = {
        "fsdp_version": d.fsdp_version,
        "auto_wrap_policy": policy[d.auto_wrap_policy],
        "cpu_offload": d.cpu_offload,
        "activation_checkpointing": d.activation_checkpointing,
        # Checkpoints hold the whole model, so a run resumes on any number of processes and the
        # final model can be saved as one plain folder.
        "state_dict_type": "FULL_STATE_DICT",
    }
    if d.fsdp_version == 1:
        kwargs["sharding_strategy"] = d.sharding_strategy
        kwargs["use_orig_params"] = True  # LoRA and frozen parameters in one unit; optimizer groups kept
    else:
        # FSDP2 says the same with reshard_after_forward: FULL_SHARD re-shards parameters after each
        # forward (ZeRO-3), SHARD_GRAD_OP keeps them gathered until the backward (ZeRO-2).
        kwargs["reshard_after_forward"] = d.sharding_strategy == "FULL_SHARD"
        if d.sharding_strategy == "NO_SHARD":
            raise ConfigError("train.distributed.sharding_strategy NO_SHARD with fsdp_version 2: use strategy ddp "
                              "(the same thing, faster)")
    if d.auto_wrap_policy == "transformer" and d.transformer_layer_classes:
        kwargs["transformer_cls_names_to_wrap"] = list(d.transformer_layer_classes)
    if d.auto_wrap_policy == "size":
        kwargs["min_num_params"] = d.min_num_params
    return FullyShardedDataParallelPlugin(**kwargs)


def deepspeed_plugin(cfg: Config) -> Any:
    """Accelerate's ``DeepSpeedPlugin``: the user's JSON, or ZeRO stage and offload from the config."""
    d = cfg.train.distributed
    t = cfg.train
    if d.deepspeed_config is not None:
        return DeepSpeedPlugin(hf_ds_config=d.deepspeed_config)
    return DeepSpeedPlugin(
        zero_stage=d.zero_stage,
        gradient_accumulation_steps=1,  # lmtune's loop accumulates and normalises itself
        gradient_clipping=t.max_grad_norm or 0.0,
        offload_optimizer_device=d.offload_optimizer,
        offload_param_device=d.offload_params,
        zero3_init_flag=False,
        # ZeRO-3 holds no whole copy of the weights: Accelerate's get_state_dict can gather one only as
        # 16-bit tensors (the saved model is then the bf16/fp16 rounding of the fp32 master weights).
        zero3_save_16bit_model=d.zero_stage == 3,
    )


def on_main_then_shared(state: Any, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and give its result (or its lmtune error) to every process.

    For side effects that must happen once (creating or replacing the run folder): the other
    processes wait, then all go on with the same answer, or all fail with the same message.
    """
    if state.num_processes <= 1:
        return fn()
    box: list[Any] = [None]
    if state.is_main_process:
        try:
            box[0] = ("ok", fn())
        except LmtuneError as exc:
            box[0] = ("error", exc)
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def is_sharded(accelerator: Any) -> bool:
    """Whether the trained weights live in pieces across processes (FSDP, DeepSpeed)."""
    return accelerator.num_processes > 1 and accelerator.distributed_type in (
        DistributedType.FSDP, DistributedType.DEEPSPEED)


def materialise_for_saving(accelerator: Any, model: torch.nn.Module,
                           build: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """A plain, whole copy of a sharded ``model`` on the main process (None elsewhere, or when not sharded).

    Every process must call this: gathering the full state dict is collective. ``build``
    makes the same (untrained) model the run started from; the gathered weights go into it
    on CPU, so saving, merging LoRA and the reload check work as for one process.
    """
    if not is_sharded(accelerator):
        return None
    state = accelerator.get_state_dict(model)  # full state dict on the main process, CPU tensors
    if not accelerator.is_main_process:
        return None
    copy = build()
    missing, unexpected = copy.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embeddings) may be saved once; anything else missing is a bug.
    tied = set(getattr(copy, "_tied_weights_keys", None) or [])
    problems = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if problems or unexpected:
        raise LmtuneError(f"gathering the sharded model lost weights: missing {problems[:5]}, "
                          f"unexpected {list(unexpected)[:5]}")
    copy.eval()
    log.info("gathered the sharded model on the main process for saving")
    return copy


def end_processes() -> None:
    """Leave the process group together, once the run's models are freed (end of a launched process).

    Destroying the group while a DDP model still holds it leaves its last reference to the model's
    reducer: freed later, in one process after the other has exited, gloo's destructor waited for
    its peer forever. So: free what is garbage, meet at a barrier, then destroy the group everywhere.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def launch_command(argv: list[str], num_processes: int, *, num_machines: int = 1, machine_rank: int = 0,
                   main_process_ip: str | None = None, main_process_port: int | None = None,
                   config_file: str | None = None) -> list[str]:
    """The ``accelerate launch`` command that runs ``lmtune train ...`` (``argv``) on N processes in all.

    On a machine without CUDA the processes are CPU processes on the gloo backend, one
    torch thread each unless ``OMP_NUM_THREADS`` says otherwise (two processes with a thread
    per core each oversubscribe the cores several times over).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", config_file]
    else:  # lmtune sets precision itself (train.precision); said here so Accelerate does not warn
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    # Accelerate counts processes over all machines together.
    cmd += ["--num_processes", str(num_processes), "--num_machines", str(num_machines)]
    if num_machines > 1:
        cmd += ["--machine_rank", str(machine_rank)]
        if main_process_ip:
            cmd += ["--main_process_ip", main_process_ip]
    if main_process_port:
        cmd += ["--main_process_port", str(main_process_port)]
    if num_processes > 1 and not config_file:
        # torchrun underneath, also on CPU: `accelerate launch --cpu` starts a single process unless
        # mpirun is set up; each process then finds no CUDA and joins a gloo group (MULTI_CPU).
        cmd += ["--multi_gpu"]
    cmd += ["-m", "lmtune", "train", *argv]
    return cmd


def launch(argv: list[str], num_processes: int, **kwargs: Any) -> int:
    """Run :func:`launch_command`; returns its exit status (the worst of the processes')."""
    cmd = launch_command(argv, num_processes, **kwargs)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    log.info("launching: %s", shlex.join(cmd))
    return subprocess.call(cmd, env=env)
