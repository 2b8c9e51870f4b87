"""A disk that really fills up: the run folder on a small tmpfs, so writes fail with ENOSPC.

Saving a checkpoint or the model folder then fails with one clear lmtune error, the previous
checkpoint stays complete and loadable, nothing half-written is left, and once there is room
`--resume` finishes the run with the same weights as a run that never ran out of space.
Needs permission to mount a tmpfs (root in a container); skipped, saying so, otherwise.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import lmtune
from lmtune.errors import RunError
from lmtune.training import checkpoint as ckpt

MB = 2**20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Any]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()

    def resize(megabytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(mount_point)], check=True,
                       capture_output=True)

    first = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                           capture_output=True, text=True)
    if first.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({first.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield mount_point, resize
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _config(model: Path, data: Path, out: Path, **train: Any) -> dict[str, Any]:
    return {"task": "classification", "model": str(model), "data": {"train": str(data), "max_length": 32},
            "train": {"batch_size": 16, "learning_rate": 2e-3, "precision": "fp32", "keep_checkpoints": 1,
                      "eval_every": 100, **train},
            "baselines": [], "output_dir": str(out)}


def _checkpoint_bytes(run: Path) -> int:
    found = ckpt.latest_checkpoint(run / "checkpoints")
    assert found is not None
    return sum(p.stat().st_size for p in found.rglob("*") if p.is_file())


def _assert_loadable(path: Path) -> None:
    assert ckpt.is_complete(path)
    for f in path.glob("*.safetensors"):
        load_file(str(f))
    for f in path.glob("*.bin"):
        torch.load(f, weights_only=False)  # the checkpoint lmtune wrote itself (optimizer state)


def test_disk_full_while_checkpointing_then_resume(small_disk: Any, tiny_bert_dir: Path, sentiment_csv: Path,
                                                   tmp_path: Path) -> None:
    disk, resize = small_disk
    train = {"max_steps": 8, "save_every": 3}
    whole = lmtune.train(_config(tiny_bert_dir, sentiment_csv, tmp_path / "whole", **train), show_progress=False)
    size = _checkpoint_bytes(whole.path)  # ~12 MB: weights + AdamW state + RNG
    # Room for one checkpoint and the run's small files, not for writing the second beside it.
    resize(int(1.5 * size / MB) + 1)
    cfg = _config(tiny_bert_dir, sentiment_csv, disk / "run", **train)
    with pytest.raises(RunError) as info:
        lmtune.train(cfg, show_progress=False)
    message = str(info.value)
    assert "could not write checkpoint for step 6: the disk is full" in message and "--resume" in message
    kept = ckpt.list_checkpoints(disk / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step-00000003"]
    _assert_loadable(kept[0])
    assert not list((disk / "run" / "checkpoints").glob(".tmp-*"))
    resize(200)
    resumed = lmtune.train(cfg, resume=True, show_progress=False)
    a, b = load_file(str(whole.model_dir / "model.safetensors")), load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_while_saving_the_model_folder(small_disk: Any, tiny_bert_dir: Path, sentiment_csv: Path,
                                                 tmp_path: Path) -> None:
    disk, resize = small_disk
    train = {"max_steps": 4, "save_every": 4}
    whole = lmtune.train(_config(tiny_bert_dir, sentiment_csv, tmp_path / "whole", **train), show_progress=False)
    # Room for the one checkpoint, not for the model folder (~4 MB of weights + tokenizer) after it.
    resize(int((_checkpoint_bytes(whole.path) + 2 * MB) / MB) + 1)
    cfg = _config(tiny_bert_dir, sentiment_csv, disk / "run", **train)
    with pytest.raises(RunError, match="the disk is full: could not write the run folder"):
        lmtune.train(cfg, show_progress=False)
    run = disk / "run"
    assert not (run / "model").exists() and not (run / ".model.tmp").exists()
    _assert_loadable(run / "checkpoints" / "step-00000004")
    resize(200)
    resumed = lmtune.train(cfg, resume=True, show_progress=False)
    a, b = load_file(str(whole.model_dir / "model.safetensors")), load_file(str(resumed.model_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
