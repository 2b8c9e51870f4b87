"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step-00000120`` holding Accelerate's
state (model weights as safetensors, optimizer, scheduler, RNG states of every
process) plus ``loop_state.json`` (step, epoch, position in the epoch, best
metric, early-stopping counter). It is written into a hidden temporary folder
and renamed into place only once complete, and ``loop_state.json`` is written
last: a crash at any moment leaves either the previous checkpoints or a
temporary folder that resume never looks at. A checkpoint is only ever deleted
by first renaming it out of the ``step-N`` namespace (``.trash-step-N``), so a
crash halfway through a delete cannot leave a ``step-N`` folder that still holds
``loop_state.json`` but has lost its weights. Tested by killing real training
processes with SIGKILL (tests/test_resume_kill.py).

A LoRA or freeze run's checkpoints leave out the frozen weights (:class:`FrozenWeights`), as
PEFT's own checkpoints do: they never change, and resume rebuilds them from the base model.
``frozen_weights.json`` records a SHA-256 of each one left out, and loading checks the rebuilt
weights against it, so a base model that changed since is an error, never a silently different
run. For SmolLM2-135M under LoRA a checkpoint shrinks from 568 MB to 30 MB (BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lmtune.errors import RunError, is_disk_full

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "loop_state.json"
FROZEN_FILE = "frozen_weights.json"
MODEL_FILE = "model.safetensors"  # Accelerate's name for the first (our only) model's weights
# Hidden leftovers of an interrupted write (.tmp-step-N) or delete (.trash-step-N); never read.
LEFTOVER_GLOBS = (".tmp-step-*", ".trash-step-*")


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps."""
    return f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    """A checkpoint counts only when its name is final and its state file is there."""
    return CHECKPOINT_RE.match(path.name) is not None and (path / STATE_FILE).is_file()


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    """The loop state stored in a checkpoint."""
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def save_checkpoint(accelerator: Any, folder: Path, step: int, state: dict[str, Any]) -> Path:
    """Write a checkpoint for ``step`` atomically; returns its final path.

    Every process takes part (Accelerate saves per-process RNG states and, with
    FSDP/DeepSpeed, sharded weights); only the main process renames.
    """
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except Exception as exc:  # safetensors and torch.save do not raise OSError for a full disk
        full = is_disk_full(exc, folder)  # before the partial folder is removed, freeing space
        if not isinstance(exc, OSError) and not full:
            raise
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        detail = getattr(exc, "strerror", None) or str(exc)[:200]
        reason = f"the disk is full ({detail})" if full else detail
        raise RunError(
            f"could not write checkpoint for step {step}: {reason}",
            file=tmp,
            hint="free disk space and run again with --resume; earlier checkpoints are intact",
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_tmp = tmp / f".{STATE_FILE}.tmp"
        state_tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        _fsync_tree(tmp)
        os.replace(state_tmp, tmp / STATE_FILE)
        # A stale checkpoint of the same step (a run resumed from an earlier checkpoint) is moved
        # aside, not deleted in place: a crash mid-rmtree would leave `step-N` with its state file
        # but without all its weights. Between the two renames neither copy has the final name, so
        # resume falls back to the previous checkpoint; it never sees half of one.
        trash = _move_aside(final) if final.exists() else None
        os.replace(tmp, final)
        _fsync_dir(folder)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (about 1.8 GB/s on one core)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{data.dtype}{tuple(tensor.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


class FrozenWeights:
    """Leaves a model's frozen parameters out of its checkpoints, and checks them back in on load.

    Registered as an Accelerate save-state hook: the state dict it is handed loses every parameter
    with ``requires_grad`` False, with what belongs to it (a 4-bit weight's quantisation state);
    buffers and trainable weights stay. ``frozen_weights.json`` lists the weights left out with their
    SHA-256. Nothing changes for a full fine-tune (no frozen parameter) or under FSDP/DeepSpeed (they
    write their own shards). Frozen weights never change during training, so their digests are taken
    once per process.
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module) -> None:
        self.accelerator = accelerator
        self.model = model
        self._digests: dict[str, str] | None = None
        accelerator.register_save_state_pre_hook(self._before_save)

    def frozen_names(self) -> list[str]:
        # Every name of a tied parameter is a key of the state dict; tied to a trainable one, it stays.
        trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
        return [name for name, p in self.model.named_parameters(remove_duplicate=False)
                if not p.requires_grad and id(p) not in trainable]

    def digests(self) -> dict[str, str]:
        if self._digests is None:
            params = dict(self.model.named_parameters(remove_duplicate=False))
            self._digests = {name: tensor_sha256(params[name]) for name in self.frozen_names()}
        return self._digests

    def _before_save(self, models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        if len(weights) != 1 or models[0] is not self.model:
            return  # FSDP/DeepSpeed save the model themselves; weights is then empty
        digests = self.digests()
        if not digests:
            return
        state = weights[0]
        for key in [k for k in state if _left_out(k, digests)]:
            del state[key]
        if self.accelerator.is_main_process:
            Path(output_dir, FROZEN_FILE).write_text(json.dumps({"left_out": digests}, indent=1), encoding="utf-8")

    def load(self, path: Path) -> None:
        """``accelerator.load_state(path)``, checking the frozen weights the checkpoint left out."""
        manifest = path / FROZEN_FILE
        if not manifest.is_file():  # a full fine-tune's checkpoint (or one of lmtune 0.x): all weights
            self.accelerator.load_state(str(path))
            return
        left_out: dict[str, str] = json.loads(manifest.read_text(encoding="utf-8"))["left_out"]
        self.accelerator.load_state(str(path), strict=False)
        with safe_open(str(path / MODEL_FILE), framework="pt") as f:
            saved = set(f.keys())
        # A tied weight is saved under one of its names (Accelerate drops the other aliases).
        state = self.model.state_dict()
        saved_storage = {_storage(state[k]) for k in saved if k in state}
        missing = [k for k, t in state.items()
                   if k not in saved and not _left_out(k, left_out) and _storage(t) not in saved_storage]
        if missing:
            raise RunError(f"checkpoint {path.name} lacks {len(missing)} weights of the model, "
                           f"{missing[0]!r} first", file=path,
                           hint="it was written for another model or method; start again with --overwrite")
        digests = self.digests()
        changed = [name for name, digest in left_out.items() if digests.get(name) != digest]
        if changed:
            raise RunError(
                f"checkpoint {path.name} left out {len(left_out)} frozen weights for the run to rebuild from "
                f"its base model, and {len(changed)} of them now differ ({changed[0]!r} first)", file=path,
                hint="the base model (or how the run builds it) changed since the checkpoint was written: "
                     "restore it, or start again with --overwrite")


def _left_out(key: str, frozen: dict[str, str]) -> bool:
    """Whether ``key`` is a frozen weight or belongs to one: a 4-bit weight's quantisation state is saved under
    ``<weight>.absmax``, ``<weight>.quant_map``, ... and is rebuilt with the weight."""
    while True:
        if key in frozen:
            return True
        if "." not in key:
            return False
        key = key.rsplit(".", 1)[0]


def _storage(tensor: Any) -> int | None:
    return tensor.untyped_storage().data_ptr() if isinstance(tensor, torch.Tensor) else None


def prune_checkpoints(folder: Path, keep: int, protect: set[str]) -> None:
    """Keep the newest ``keep`` checkpoints and those named in ``protect``; delete the rest."""
    found = list_checkpoints(folder)
    keep_names = {p.name for p in found[-keep:]} | protect  # the newest `keep`, plus the best
    for path in found:
        if path.name not in keep_names:
            shutil.rmtree(_move_aside(path), ignore_errors=True)
    remove_leftovers(folder)


def remove_leftovers(folder: Path) -> None:
    """Delete what a crash mid-write or mid-delete left behind (hidden folders resume never reads)."""
    if not folder.is_dir():
        return
    for pattern in LEFTOVER_GLOBS:
        for stale in folder.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def truncate_metrics_log(path: Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` logged after ``step``; returns how many were dropped.

    On resume from the checkpoint of ``step``, the rows an interrupted run logged after that
    checkpoint would otherwise appear twice (the resumed run logs those steps again). Every row
    of a step is written before that step's checkpoint, so rows with ``step <= step`` are exactly
    the ones the checkpoint has seen. A torn last line (a kill mid-write) is dropped too. The
    file is replaced atomically; call it from the main process only.
    """
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _move_aside(path: Path) -> Path:
    """Rename a checkpoint out of the ``step-N`` namespace (atomic) so it can be deleted at leisure."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    return trash


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
