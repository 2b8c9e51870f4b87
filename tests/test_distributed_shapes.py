"""Odd shapes, on one process and on two: an odd number of batches, a short batch anywhere in the
epoch (length grouping shuffles it in among the full ones), gradient accumulation across an epoch's
end and ``train.max_steps`` past it (issue 13, item 9).

Two processes used to hang at the end of the first epoch whenever the short batch landed on the
second process's turn: Accelerate's ``BatchSamplerShard`` skipped that turn on both processes, so
each yielded one batch fewer than ``len()`` said, and the loop, waiting for the batch ``len()``
promised, re-created its data loader forever. The even shapes of tests/test_distributed.py never
have a short batch. Every run here is a subprocess with a timeout that catches a hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import psutil
import pytest
import torch
import yaml
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import load_file

import lmtune
from lmtune.config import load_config
from lmtune.data.features import LengthGroupedBatchSampler
from lmtune.training.loop import LoopState, TrainingError, TrainingLoop, VariableSizeBatches

# A run of this size takes ~15 s on two CPU processes (start-up, mostly); a hang is cut off here.
HANG_SECONDS = 240

# 37 training rows in batches of 4: 9 full batches and one of a single example, 10 in all (5 per
# process on two). Seed 3 puts that short batch on the second process's turn in epochs 0 and 1.
ROWS, BATCH, SEED = 37, 4, 3
# (processes, accumulation, steps per epoch, max_steps): on two processes 5 batches per process make
# steps of 2, 2 and 1 micro-batches; on one, 10 batches make steps of 3, 3, 3 and 1. Both runs stop
# two steps into their third epoch.
SHAPES = {1: (3, 4, 10), 2: (2, 3, 8)}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers import sentiment_rows, write_csv

    root = tmp_path_factory.mktemp("shapes")
    return {"root": root,
            "train": write_csv(root / "train.csv", sentiment_rows(ROWS)),
            "validation": write_csv(root / "val.csv", sentiment_rows(9, seed=5)),
            "test": write_csv(root / "test.csv", sentiment_rows(7, seed=6))}


def _config(data: dict[str, Path], model: Path, out: Path, processes: int, **train: Any) -> dict[str, Any]:
    accumulation, per_epoch, max_steps = SHAPES[processes]
    return {
        "task": "classification", "model": str(model),
        "data": {"train": str(data["train"]), "validation": str(data["validation"]), "test": str(data["test"]),
                 "max_length": 32},
        # eval_every unset: an evaluation at every epoch's end, so the log shows where each epoch ended
        "train": {"max_steps": max_steps, "batch_size": BATCH, "gradient_accumulation": accumulation, "seed": SEED,
                  "learning_rate": 2e-3, "precision": "fp32", "log_every": 1,
                  "save_every": per_epoch, "keep_checkpoints": 10, **train},
        "baselines": [], "output_dir": str(out),
    }


def _train(cfg: dict[str, Any], *args: str) -> str:
    """``lmtune train`` on ``cfg`` in a subprocess; fails the test if it has not exited after
    ``HANG_SECONDS`` (killing the launcher, torchrun and the workers: they are not one process group)."""
    path = Path(cfg["output_dir"] + ".yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(path), "--no-progress", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=HANG_SECONDS)
    except subprocess.TimeoutExpired:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        psutil.wait_procs(family, timeout=30)
        run = Path(cfg["output_dir"])
        done = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
        pytest.fail(f"lmtune train {' '.join(args)} hung: no exit within {HANG_SECONDS} s (checkpoints: {done})\n"
                    + out[-3000:])
    assert proc.returncode == 0, out[-5000:]
    return out


def _rows(run: Path, split: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _expected_epochs(processes: int) -> list[float]:
    """The epoch figure of every step's train row: epoch + batches done / batches per process."""
    accumulation, per_epoch, max_steps = SHAPES[processes]
    batches = -(-ROWS // BATCH) // processes + (-(-ROWS // BATCH) % processes > 0)
    out = []
    for step in range(1, max_steps + 1):
        epoch, within = divmod(step, per_epoch)
        if within == 0:  # the epoch's last step: its end, not the next epoch's start
            epoch, done = epoch - 1, batches
        else:
            done = within * accumulation
        out.append(round(epoch + done / batches, 4))
    return out


def _assert_epochs_end_where_planned(run: Path, processes: int) -> None:
    _, per_epoch, max_steps = SHAPES[processes]
    train = _rows(run, "train")
    assert [r["step"] for r in train] == list(range(1, max_steps + 1))
    assert [r["epoch"] for r in train] == _expected_epochs(processes)
    # an evaluation at each epoch's end (eval_every unset) and at the last step
    assert [r["step"] for r in _rows(run, "validation")] == [per_epoch, 2 * per_epoch, max_steps]
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    assert summary["steps"] == max_steps and summary["num_processes"] == processes


# ------------------------------------------------------------------ the shards Accelerate deals out
@pytest.mark.parametrize("processes", [2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 8])
def test_every_process_gets_len_batches_and_every_example(processes: int, batch_size: int) -> None:
    """The training batches as Accelerate shards them: on every process exactly ``len()`` batches, the
    same number everywhere, and every example in every epoch, wherever the short batch falls."""
    lost = 0
    for n in [*range(1, 40), 439]:
        lengths = [(i * 7919) % 37 + 3 for i in range(n)]
        for seed in (0, 1, 3):
            sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=seed, mega_batch_mult=3)
            for epoch in range(4):
                sampler.set_epoch(epoch)
                raw = [list(BatchSamplerShard(sampler, processes, p)) for p in range(processes)]
                lost += len({i for shard in raw for b in shard for i in b}) < n
                shards = [BatchSamplerShard(VariableSizeBatches(sampler), processes, p) for p in range(processes)]
                got = [list(shard) for shard in shards]
                where = f"{n} examples, batch {batch_size}, seed {seed}, epoch {epoch}"
                assert [len(g) for g in got] == [len(s) for s in shards] == [len(shards[0])] * processes, where
                assert {i for g in got for b in g for i in b} == set(range(n)), where
    # not vacuous: dealt out as plain fixed-size batches, a short batch mid-epoch loses examples
    assert lost > 0 or batch_size == 1


# ------------------------------------------------------------------ the loop's epochs, whatever len() says
class _Loader:
    """A training loader whose ``len()`` may promise more batches than it yields."""

    def __init__(self, yields: int, says: int) -> None:
        self.yields, self.says, self.epoch, self.iterations = yields, says, 0, 0

    def __len__(self) -> int:
        return self.says

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.iterations += 1
        assert self.iterations < 100, "the loop re-created its loader 100 times without a batch"
        return iter([{"epoch": self.epoch, "i": i} for i in range(self.yields)])


class _Skip:
    def __init__(self, loader: _Loader, skip: int) -> None:
        self.loader, self.skip = loader, skip

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self.loader)[self.skip:])


def _loop(loader: _Loader, state: LoopState | None = None) -> TrainingLoop:
    cfg = load_config({"data": {"train": "x.csv"}})
    # Just what the epoch logic reads: a task's default metric, an accelerator's process count and skip.
    task: Any = SimpleNamespace(info=SimpleNamespace(default_metric="loss"))
    accelerator = SimpleNamespace(num_processes=1, skip_first_batches=_Skip)
    stub: Any = None
    loop = TrainingLoop(task=task, model=torch.nn.Linear(1, 1), tokenizer=None, data=stub, config=cfg,
                        run_dir=Path("unused"), accelerator=accelerator, metrics_log=stub)
    loop.train_loader = cast(Any, loader)
    loop.train_sampler = cast(Any, loader)
    loop.state = state or LoopState()
    return loop


def _take(loop: TrainingLoop, n: int) -> list[tuple[int, int, bool]]:
    stream = loop._micro_batches()
    return [(int(b["epoch"]), int(b["i"]), last) for b, last in (next(stream) for _ in range(n))]


@pytest.mark.parametrize("says", [2, 3, 5])
def test_an_epoch_ends_when_the_loader_runs_out_whatever_len_says(says: int) -> None:
    """Each batch comes with whether it ends its epoch; the epoch ends when the loader is exhausted."""
    loop = _loop(_Loader(yields=3, says=says))
    assert _take(loop, 7) == [(0, 0, False), (0, 1, False), (0, 2, True), (1, 0, False), (1, 1, False),
                              (1, 2, True), (2, 0, False)]
    assert (loop.state.epoch, loop.state.batch_in_epoch) == (2, 1)
    # resumed from a checkpoint taken right at an epoch's end: on into the next epoch
    assert _take(_loop(_Loader(3, says), LoopState(epoch=0, batch_in_epoch=3)), 2) == [(1, 0, False), (1, 1, False)]
    # ... and from the middle of one
    assert _take(_loop(_Loader(3, says), LoopState(epoch=1, batch_in_epoch=1)), 3) == [(1, 1, False), (1, 2, True),
                                                                                     (2, 0, False)]


def test_a_loader_that_yields_nothing_is_an_error_not_a_spin() -> None:
    loader = _Loader(yields=0, says=4)
    loop = _loop(loader)
    with pytest.raises(TrainingError, match="no batch in a whole epoch"):
        _take(loop, 1)
    assert loader.iterations == 1


# ------------------------------------------------------------------ real runs
def test_two_processes_finish_odd_shapes(data: dict[str, Path], tiny_bert_nodrop_dir: Path) -> None:
    """Two processes, a short batch on the second one's turn, accumulation 2 over 5 batches per process
    and max_steps two steps into the third epoch: the run ends, each epoch where ``len()`` planned it."""
    run = data["root"] / "two"
    _train(_config(data, tiny_bert_nodrop_dir, run, 2), "--num-processes", "2")
    _assert_epochs_end_where_planned(run, 2)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_one_process_odd_shapes(data: dict[str, Path], tiny_bert_nodrop_dir: Path) -> None:
    """The same shapes on one process (accumulation 3 over 10 batches: steps of 3, 3, 3 and 1), in process,
    and a resume from the checkpoint at the first epoch's end equals the uninterrupted run."""
    cfg = _config(data, tiny_bert_nodrop_dir, data["root"] / "one", 1)
    whole = lmtune.train(cfg, show_progress=False)
    _assert_epochs_end_where_planned(whole.path, 1)
    _, per_epoch, max_steps = SHAPES[1]
    weights = load_file(str(whole.path / "model" / "model.safetensors"))
    rows = _rows(whole.path, "train")
    resumed = lmtune.train(cfg, resume=whole.path / "checkpoints" / f"step-{per_epoch:08d}", show_progress=False)
    again = load_file(str(resumed.path / "model" / "model.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert [r["loss"] for r in _rows(resumed.path, "train")] == [r["loss"] for r in rows]
    assert resumed.metrics["summary"]["steps"] == max_steps


@pytest.mark.slow
def test_two_processes_resume_exactly_across_odd_epoch_ends(data: dict[str, Path], tiny_bert_nodrop_dir: Path) -> None:
    """Two processes, the odd shapes: resumed from the checkpoint at the first epoch's end (step 3) and from
    one inside the second epoch (step 4), the final weights and logged losses equal the uninterrupted run's."""
    run = data["root"] / "two-resumed"
    cfg = _config(data, tiny_bert_nodrop_dir, run, 2, save_every=1)
    _train(cfg, "--num-processes", "2")
    weights = load_file(str(run / "model" / "model.safetensors"))
    losses = [r["loss"] for r in _rows(run, "train")]
    keep = data["root"] / "two-checkpoints"
    shutil.copytree(run / "checkpoints", keep)
    for step in (3, 4):
        _train(cfg, "--num-processes", "2", "--resume", str(keep / f"step-{step:08d}"))
        again = load_file(str(run / "model" / "model.safetensors"))
        differ = [k for k in weights if not torch.equal(weights[k], again[k])]
        assert not differ, f"resumed at step {step}: {len(differ)} tensors differ, e.g. {differ[:3]}"
        assert [r["loss"] for r in _rows(run, "train")] == losses, f"resumed at step {step}"
        _assert_epochs_end_where_planned(run, 2)
