"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step-00000120`` holding Accelerate's
state (model weights as safetensors, optimizer, scheduler, RNG states of every
process) plus ``loop_state.json`` (step, epoch, position in the epoch, best
metric, early-stopping counter). It is written into a hidden temporary folder
and renamed into place only once complete, and ``loop_state.json`` is written
last: a crash at any moment leaves either the previous checkpoints or a
temporary folder that resume never looks at.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "loop_state.json"


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
    except OSError as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        from lmtune.errors import RunError

        raise RunError(
            f"could not write checkpoint for step {step}: {exc.strerror or exc}",
            file=tmp,
            hint="free disk space and run again with --resume; earlier checkpoints are intact",
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_tmp = tmp / f".{STATE_FILE}.tmp"
        state_tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        _fsync_tree(tmp)
        os.replace(state_tmp, tmp / STATE_FILE)
        if final.exists():  # a stale checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(folder: Path, keep: int, protect: set[str]) -> None:
    """Keep the newest ``keep`` checkpoints and those named in ``protect``; delete the rest."""
    found = list_checkpoints(folder)
    keep_names = {p.name for p in found[-keep:]} | protect  # the newest `keep`, plus the best
    for path in found:
        if path.name not in keep_names:
            shutil.rmtree(path, ignore_errors=True)
    for stale in folder.glob(".tmp-step-*"):  # leftovers of a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


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
