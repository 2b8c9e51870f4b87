"""Kill -9 at random moments (also in the middle of a checkpoint write), then ``--resume``: the final
weights and the logged metrics equal those of an uninterrupted run, bit for bit; a partially written
checkpoint is never picked up.

The slow test kills real ``python -m lmtune train`` processes with SIGKILL; the fast ones build broken
checkpoint folders by hand and kill one forked training process during a checkpoint write.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import lmtune
from lmtune.errors import RunError
from lmtune.training import checkpoint as ckpt

# 384 training rows (sentiment_csv) / batch 32 = 12 steps per epoch: 60 steps are 5 epochs, so resumes
# land inside epochs and at their ends. A checkpoint every 3 steps and a train row every 2: rows logged
# after the last checkpoint exist at most kill moments (they must not be duplicated by the resume).
TRAIN = {"max_steps": 60, "batch_size": 32, "learning_rate": 2e-3, "log_every": 2, "save_every": 3,
         "eval_every": 15, "keep_checkpoints": 2, "num_threads": 1}
# Full fine-tuning in the default precision (auto: bf16 autocast on a CPU with AVX512-BF16, fp32
# elsewhere), LoRA in explicit fp32 (and the higher learning rate LoRA needs to learn in 60 steps):
# both kinds of run are covered on every machine.
MODES = {"full": {"precision": "auto"}, "lora": {"precision": "fp32", "learning_rate": 5e-3}}
# Timing fields differ between any two runs; everything else in a metrics row must be equal.
TIMING_KEYS = {"tokens_per_second", "eval_seconds"}
SEED = int(os.environ.get("LMTUNE_KILL_SEED", "6"))


def _config(model: Path, data: Path, out: Path, mode: str, **train: Any) -> dict[str, Any]:
    return {
        "task": "classification",
        "model": str(model),
        "method": {"name": mode},
        "data": {"train": str(data), "max_length": 32},
        "train": {**TRAIN, **MODES[mode], **train},
        "baselines": [],
        "output_dir": str(out),
    }


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows without their timing fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of tensors that are not bit-for-bit equal (and missing ones)."""
    if a.keys() != b.keys():
        return sorted(set(a) ^ set(b))
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def _assert_same_run(reference: Path, run: Path, what: str, steps: int = TRAIN["max_steps"]) -> None:
    """Final model, last checkpoint, logged rows and summary of ``run`` equal ``reference``'s exactly."""
    assert json.loads((run / "run.json").read_text())["status"] == "complete", what
    for rel in ("model/model.safetensors", f"checkpoints/{ckpt.checkpoint_name(steps)}/model.safetensors"):
        diff = _differences(_weights(reference / rel), _weights(run / rel))
        assert not diff, f"{what}: {rel} differs from the uninterrupted run in {len(diff)} tensors, e.g. {diff[:3]}"
    ref_rows, rows = _rows(reference), _rows(run)
    assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in ref_rows], \
        f"{what}: metrics.jsonl rows lost or duplicated"
    assert rows == ref_rows, f"{what}: metrics.jsonl values differ"
    ref_sum, summary = (json.loads((p / "metrics.json").read_text())["summary"] for p in (reference, run))
    for key in ("steps", "best_step", "tokens_seen"):
        assert summary[key] == ref_sum[key], f"{what}: summary {key} {summary[key]} != {ref_sum[key]}"


def _assert_checkpoints_load(folder: Path) -> None:
    """Every checkpoint resume could pick is whole: each file Accelerate wrote reads back."""
    for path in ckpt.list_checkpoints(folder):
        assert ckpt.CHECKPOINT_RE.match(path.name)
        state = ckpt.read_state(path)
        assert state["loop"]["step"] == int(path.name.split("-")[1])
        files = sorted(p.name for p in path.iterdir())
        assert "model.safetensors" in files and "optimizer.bin" in files, f"{path}: {files}"
        for f in path.iterdir():
            if f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix in (".bin", ".pkl"):  # optimizer, scheduler, RNG states: our own files
                torch.load(f, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------ one process
@dataclass
class Kill:
    """When to kill one training process: ``write`` (the ``nth`` checkpoint write it starts, ``delay``
    seconds after its temporary folder appears), ``time`` (``fraction`` of the expected rest of the run,
    counted from its first checkpoint write) or ``startup`` (``delay`` seconds after launch: imports,
    tokenisation, model building, sometimes the first steps)."""

    kind: str
    delay: float = 0.0
    nth: int = 1
    fraction: float = 0.0


@dataclass
class Launch:
    """What happened to one process of a trial."""

    resumed_from: int | None  # checkpoint step it resumed from (None: started afresh)
    kill: Kill | None
    outcome: str = ""  # "killed", "finished" (before the kill fired)
    at_seconds: float = 0.0  # seconds after launch when it was killed or exited
    first_write_at: float | None = None  # seconds after launch when its first checkpoint write began
    last_write_at: float | None = None  # ... and its last (uninterrupted runs only)
    mid_write: bool = False  # a .tmp-step-* folder was left behind: the kill landed inside a write
    log: Path | None = None


@dataclass
class Trial:
    """A run killed one or more times and resumed until complete."""

    mode: str
    number: int
    launches: list[Launch] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        for launch in self.launches:
            start = "fresh" if launch.resumed_from is None else f"resume@{launch.resumed_from}"
            if launch.kill is None:
                parts.append(f"{start} -> complete")
            else:
                where = "mid-write" if launch.mid_write else launch.kill.kind
                parts.append(f"{start} -> {launch.outcome} at {launch.at_seconds:.2f}s ({where})")
        kills = sum(launch.outcome == "killed" for launch in self.launches)
        return f"{self.mode} trial {self.number}: {kills} kill(s): " + "; ".join(parts)


def _launch(cfg_path: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(cfg_path), "--no-progress", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


class _Watch:
    """Polls a checkpoints/ folder for ``.tmp-step-*`` folders: each that appears is a checkpoint write
    beginning. Leftovers of earlier kills present at launch do not count until they are gone (resume
    clears them) and written again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.old = self._names()  # leftovers, present at launch
        self.last = set(self.old)
        self.writes = 0

    def _names(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.folder) if n.startswith(".tmp-step-")}
        except FileNotFoundError:
            return set()

    def poll(self) -> set[str]:
        now = self._names()
        self.writes += len(now - self.last)
        self.old &= now  # a leftover that vanished is gone for good
        self.last = now
        return now

    def mid_write(self) -> bool:
        """A temporary folder of this process is still there (call after the kill): it died inside a write."""
        return bool(self.poll() - self.old)

    def wait_for_write(self, alive: Callable[[], bool], nth: int, timeout: float = 300.0) -> bool:
        """Poll until the ``nth`` write of this process begins; False if it exits first."""
        deadline = time.perf_counter() + timeout
        while alive():
            self.poll()
            if self.writes >= nth:
                return True
            assert time.perf_counter() < deadline, f"no checkpoint write {nth} within {timeout:.0f} s: hung?"
            time.sleep(0.0005)
        return False


def _run_once(cfg_path: Path, run_dir: Path, kill: Kill | None, log: Path, args: list[str],
              train_seconds: float) -> Launch:
    """Launch one training process and kill it as ``kill`` says (or let it finish).

    ``train_seconds``: how long an uninterrupted run takes from its first checkpoint write to its
    last; a ``time`` kill lands within the share of it that this process still has to do, or up to
    20% beyond (while it evaluates, saves the model and writes the report).
    """
    folder = run_dir / "checkpoints"
    launch = Launch(resumed_from=_resume_step(run_dir) if "--resume" in args else None, kill=kill, log=log)
    steps = TRAIN["max_steps"]
    remaining_seconds = train_seconds * (steps - (launch.resumed_from or 0)) / steps
    watch = _Watch(folder)
    start = time.perf_counter()
    proc = _launch(cfg_path, log, *args)

    def alive() -> bool:
        return proc.poll() is None

    if kill is None:
        if watch.wait_for_write(alive, 1):
            launch.first_write_at = launch.last_write_at = time.perf_counter() - start
        while alive():
            writes = watch.writes
            if watch.poll() and watch.writes > writes:
                launch.last_write_at = time.perf_counter() - start
            time.sleep(0.0005)
    else:
        fire = True
        if kill.kind == "startup":
            deadline = start + kill.delay
            while alive() and time.perf_counter() < deadline:
                watch.poll()
                time.sleep(0.001)
        elif kill.kind == "write":
            fire = watch.wait_for_write(alive, kill.nth)
            time.sleep(kill.delay)
        else:  # "time": from the first checkpoint write of this process, a share of what is left
            fire = watch.wait_for_write(alive, 1)
            deadline = time.perf_counter() + kill.fraction * remaining_seconds
            while alive() and time.perf_counter() < deadline:
                watch.poll()
                time.sleep(0.001)
        if fire and alive():
            os.kill(proc.pid, signal.SIGKILL)
    rc = proc.wait(timeout=600)
    launch.at_seconds = time.perf_counter() - start
    launch.mid_write = watch.mid_write()
    if rc == -signal.SIGKILL:
        launch.outcome = "killed"
    else:
        assert rc == 0, f"training process failed (rc {rc}):\n{log.read_text()[-3000:]}"
        launch.outcome = "finished"
    return launch


def _resume_step(run_dir: Path) -> int | None:
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return None if latest is None else int(ckpt.read_state(latest)["loop"]["step"])


# The kinds of kill of each trial, in order (a fixed mix, so every kind is covered; the moments are random).
PLANS = [["write"], ["time"], ["write", "time"], ["startup", "write"], ["time", "write"]]


def _draw(kind: str, rng: random.Random, resumed_from: int | None) -> Kill:
    """A random moment of ``kind`` for a process that starts at checkpoint ``resumed_from``."""
    done = resumed_from or 0
    if kind == "write" and done >= TRAIN["max_steps"]:
        kind = "time"  # nothing left to write: kill while it evaluates and saves the model instead
    if kind == "write":  # one of the writes it still has ahead, killed 0-10 ms after the write began
        left = (TRAIN["max_steps"] - done) // TRAIN["save_every"]
        return Kill("write", delay=rng.uniform(0.0, 0.01), nth=rng.randint(1, max(1, left)))
    if kind == "startup":  # while it imports, tokenises or builds the model (maybe after its first write)
        return Kill("startup", delay=rng.uniform(2.0, 8.0))
    return Kill("time", fraction=rng.uniform(0.0, 1.2))


def _trial(cfg_path: Path, run_dir: Path, kinds: list[str], trial: Trial, logs: Path, rng: random.Random,
           train_seconds: float) -> None:
    """Kill as planned, resuming after each kill, then resume once more until the run completes."""
    args: list[str] = []
    for kind in [*kinds, None]:
        if trial.launches:
            if trial.launches[-1].outcome == "finished":
                return
            # after every kill: resume can only pick whole checkpoints
            _assert_checkpoints_load(run_dir / "checkpoints")
            args = ["--resume"] if ckpt.latest_checkpoint(run_dir / "checkpoints") is not None else ["--overwrite"]
        kill = None if kind is None else _draw(kind, rng, _resume_step(run_dir) if args == ["--resume"] else None)
        log = logs / f"{trial.mode}-{trial.number}-{len(trial.launches)}.log"
        trial.launches.append(_run_once(cfg_path, run_dir, kill, log, args, train_seconds))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_kill_9_then_resume_equals_uninterrupted(mode: str, tiny_bert_dir: Path, sentiment_csv: Path,
                                                 tmp_path: Path) -> None:
    """5 trials per mode: SIGKILL at random moments (mid-write, any time, during start-up), resume until done."""
    logs = tmp_path / "logs"
    logs.mkdir()

    def write_config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_config(tiny_bert_dir, sentiment_csv, tmp_path / name, mode)))
        return path

    # the uninterrupted run; its time from the first checkpoint to the end scales the random kills
    reference = _run_once(write_config("reference"), tmp_path / "reference", None, logs / "reference.log", [], 0.0)
    assert reference.outcome == "finished" and reference.first_write_at and reference.last_write_at
    losses = [r["loss"] for r in _rows(tmp_path / "reference") if r["split"] == "validation"]
    assert losses[-1] < 0.9 * losses[0], f"the reference run did not learn: {losses}"
    train_seconds = reference.last_write_at - reference.first_write_at
    rng = random.Random(f"{mode}-{SEED}")
    trials = []
    for number in range(5):
        trial = Trial(mode, number)
        trials.append(trial)
        run_dir = tmp_path / f"trial-{number}"
        _trial(write_config(f"trial-{number}"), run_dir, PLANS[number % len(PLANS)], trial, logs, rng,
               train_seconds)
        print(trial.summary())
        _assert_same_run(tmp_path / "reference", run_dir, f"seed {SEED}, {trial.summary()}")
        # leftovers of interrupted writes are cleaned up once the run goes on
        assert not list((run_dir / "checkpoints").glob(".*")), trial.summary()
    kills = [launch for t in trials for launch in t.launches if launch.outcome == "killed"]
    precision = json.loads((tmp_path / "reference" / "metrics.json").read_text())["summary"]["precision"]
    print(f"{mode} ({precision}): {len(trials)} trials, {len(kills)} kills ({sum(k.mid_write for k in kills)} "
          f"inside a checkpoint write), all bit-for-bit equal to the uninterrupted run")
    # the kills that did not fire (the process was done first) are few, and writes were hit
    assert len(kills) >= 5 and sum(k.mid_write for k in kills) >= 2, "\n".join(t.summary() for t in trials)


# ------------------------------------------------------------------------------------------ fast tests
class _Accelerator:
    """Just enough of Accelerate for save_checkpoint: one process writing a real safetensors file."""

    is_main_process = True

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str, safe_serialization: bool = True) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4, 4), self.value)}, str(Path(path) / "model.safetensors"))


def test_partial_checkpoints_are_never_picked(tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    """Whatever a crash can leave in checkpoints/, resume picks the newest whole checkpoint; prune clears the rest."""
    from lmtune.config import load_config
    from lmtune.workflows.run_folder import RunLock
    from lmtune.workflows.train import RUN_FILE, prepare_run_dir

    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    for step in (10, 20):
        ckpt.save_checkpoint(_Accelerator(step), folder, step, {"loop": {"step": step}})
    (run_dir / RUN_FILE).write_text(json.dumps({"status": "running"}))
    whole = (folder / "step-00000020" / "model.safetensors").read_bytes()
    # killed after loop_state.json was written but before the rename: complete contents, hidden name
    (folder / ".tmp-step-00000030").mkdir()
    (folder / ".tmp-step-00000030" / "model.safetensors").write_bytes(whole)
    (folder / ".tmp-step-00000030" / ckpt.STATE_FILE).write_text('{"loop": {"step": 30}}')
    # killed inside Accelerate's write: a truncated safetensors file, no state file
    (folder / ".tmp-step-00000040").mkdir()
    (folder / ".tmp-step-00000040" / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    # a final name without the state file (not written by lmtune), a malformed name, a plain file
    (folder / "step-00000050").mkdir()
    (folder / "step-00000050" / "model.safetensors").write_bytes(whole)
    (folder / "step-60").mkdir()
    (folder / "step-60" / ckpt.STATE_FILE).write_text('{"loop": {"step": 60}}')
    (folder / "step-00000070").write_text("not a folder")
    # killed while deleting a pruned checkpoint: moved aside first, so its state file does not count
    (folder / ".trash-step-00000080").mkdir()
    (folder / ".trash-step-00000080" / ckpt.STATE_FILE).write_text('{"loop": {"step": 80}}')

    assert ckpt.latest_checkpoint(folder) == folder / "step-00000020"
    for path in ckpt.list_checkpoints(folder):
        load_file(str(path / "model.safetensors"))
    cfg = load_config({"task": "classification", "model": str(tiny_bert_dir), "data": {"train": str(sentiment_csv)},
                       "output_dir": str(run_dir)})
    for resume in (True, run_dir):
        with RunLock() as lock:
            assert prepare_run_dir(cfg, resume=resume, overwrite=False, lock=lock) == (run_dir, folder / "step-00000020")
    with RunLock() as lock, pytest.raises(RunError, match="no complete checkpoint"):  # naming a hidden folder too
        prepare_run_dir(cfg, resume=folder / ".tmp-step-00000030", overwrite=False, lock=lock)

    ckpt.prune_checkpoints(folder, keep=1, protect=set())
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000020", "step-00000050", "step-00000070", "step-60"]
    # a run killed before its first checkpoint: --resume says how to start over
    shutil.rmtree(folder / "step-00000020")
    with RunLock() as lock, pytest.raises(RunError, match="no complete checkpoint") as err:
        prepare_run_dir(cfg, resume=True, overwrite=False, lock=lock)
    assert "--overwrite" in (err.value.hint or "")


def test_replacing_a_same_step_checkpoint_never_loses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run resumed from an older checkpoint writes a step again: a crash while the stale copy is
    deleted leaves the new one in place, never a half-deleted ``step-N``."""
    folder = tmp_path / "checkpoints"
    ckpt.save_checkpoint(_Accelerator(1.0), folder, 10, {"loop": {"step": 10}})
    ckpt.save_checkpoint(_Accelerator(1.0), folder, 20, {"loop": {"step": 20, "attempt": 1}})
    real_rmtree = ckpt.shutil.rmtree

    def crash_on_trash(path: Any, ignore_errors: bool = False) -> None:
        if Path(path).name.startswith(".trash-") and Path(path).is_dir():
            (Path(path) / "model.safetensors").unlink()  # half deleted ...
            raise KeyboardInterrupt  # ... when the process dies
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash_on_trash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(_Accelerator(2.0), folder, 20, {"loop": {"step": 20, "attempt": 2}})
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    latest = ckpt.latest_checkpoint(folder)
    assert latest == folder / "step-00000020" and ckpt.read_state(latest)["loop"]["attempt"] == 2
    assert torch.equal(load_file(str(latest / "model.safetensors"))["w"], torch.full((4, 4), 2.0))
    assert (folder / ".trash-step-00000020").is_dir()  # the leftover is hidden ...
    ckpt.remove_leftovers(folder)  # ... and removed on the next resume or save
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000010", "step-00000020"]


def test_truncate_metrics_log_drops_rows_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(2, 12, 2)]
    rows.insert(3, {"step": 6, "split": "validation", "loss": 0.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 12, "spl')  # torn by a kill
    assert ckpt.truncate_metrics_log(path, 6) == 3  # steps 8 and 10, and the torn line
    assert [json.loads(line) for line in path.read_text().splitlines()] == [r for r in rows if r["step"] <= 6]
    assert ckpt.truncate_metrics_log(path, 6) == 0 and ckpt.truncate_metrics_log(tmp_path / "none.jsonl", 1) == 0


@pytest.fixture
def _restore_threads() -> Any:
    threads = torch.get_num_threads()  # the runs below set one thread (train.num_threads) for the forked child
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.usefixtures("_restore_threads")
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sigkill_during_a_checkpoint_write_then_resume(mode: str, tiny_bert_dir: Path, sentiment_csv: Path,
                                                       tmp_path: Path) -> None:
    """A forked training process is SIGKILLed while it writes a checkpoint; resume is bit-for-bit exact."""
    short = {"max_steps": 16, "eval_every": 8}

    def cfg(name: str) -> dict[str, Any]:
        return _config(tiny_bert_dir, sentiment_csv, tmp_path / name, mode, **short)

    reference = lmtune.train(cfg("reference"), show_progress=False)
    folder = tmp_path / "broken" / "checkpoints"
    kills: list[tuple[int, bool]] = []
    for attempt in range(3):  # until one kill lands inside a write (the first almost always does)
        watch = _Watch(folder)
        pid = os.fork()
        if pid == 0:  # the child trains until it is killed; it never returns into pytest
            code = 1
            try:
                lmtune.train(cfg("broken"), resume=attempt > 0, show_progress=False)
                code = 0
            finally:
                os._exit(code)
        status: list[int] = []

        def alive(pid: int = pid, status: list[int] = status) -> bool:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status.append(code)
            return not done

        if watch.wait_for_write(alive, 2):  # the second checkpoint write of this process
            os.kill(pid, signal.SIGKILL)
            status.append(os.waitpid(pid, 0)[1])
        assert os.WIFSIGNALED(status[0]), "the training process finished before it was killed"
        kills.append((attempt, watch.mid_write()))
        _assert_checkpoints_load(folder)
        if kills[-1][1]:
            break
    assert kills[-1][1], f"no kill landed inside a checkpoint write: {kills}"
    latest = ckpt.latest_checkpoint(folder)
    assert latest is not None and ckpt.read_state(latest)["loop"]["step"] < short["max_steps"]
    resumed = lmtune.train(cfg("broken"), resume=True, show_progress=False)
    _assert_same_run(reference.path, resumed.path, f"{mode}: kills {kills}", steps=short["max_steps"])
    assert not list(folder.glob(".*"))  # the leftover of the kill is gone


def test_resume_after_early_stopping_does_not_train_on(tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after early stopping but before the model was saved: resume finishes, it does not train further."""
    from lmtune.training.loop import TrainingLoop

    # "higher validation loss is better" while training lowers it: the 3rd evaluation stops the run
    cfg = _config(tiny_bert_dir, sentiment_csv, tmp_path / "es", "full", max_steps=60, eval_every=4,
                  save_every=None, metric="loss", greater_is_better=True, early_stopping_patience=2)

    def crash(self: TrainingLoop) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainingLoop, "restore_best", crash)
    with pytest.raises(KeyboardInterrupt):
        lmtune.train(cfg, show_progress=False)
    monkeypatch.undo()
    stopped = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "es" / "checkpoints"))["loop"]
    assert stopped["stopped_early"] and stopped["step"] < 60
    run = lmtune.train(cfg, resume=True, show_progress=False)
    assert run.metrics["summary"]["steps"] == stopped["step"] and run.metrics["summary"]["stopped_early"]
    assert max(r["step"] for r in _rows(run.path)) == stopped["step"]
