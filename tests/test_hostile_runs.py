"""Run folders under careless and hostile use (issue 13, items 6, 7, 8 and part of 14).

- ``--overwrite`` deletes only a folder lmtune marked as its own, and only lmtune's files in it.
- One writer per run folder: a second ``train`` (fresh, ``--overwrite`` or ``--resume``) on a folder that
  a live process is writing is refused, naming that process; a run killed with ``kill -9`` shows as
  interrupted (its lock is gone) and ``--resume`` continues it. Real processes throughout.
- An ``output_dir`` that is a file, a device, a dangling or looping link, or empty, and a run whose
  ``model/lmtune.json`` or ``run.json`` is malformed, give one lmtune error naming the path, not a traceback.
- A run that failed before training started is replaced by the next ``train`` without ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import sentiment_rows, write_csv

import lmtune
from lmtune.cli import main
from lmtune.errors import ConfigError, RunError
from lmtune.training import checkpoint as ckpt
from lmtune.workflows import run_folder
from lmtune.workflows.run import Run

FIXTURES = Path(__file__).parent / "fixtures" / "v0_runs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# A generous bound that only catches a hang (a lock wait that never ends, a process that never exits).
HANG = 300


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    import torch

    threads = torch.get_num_threads()  # runs in this process set train.num_threads 1
    yield
    torch.set_num_threads(threads)


def _config(model: Path, data: Path, out: Path, **train: Any) -> dict[str, Any]:
    return {"task": "classification", "model": str(model), "data": {"train": str(data), "max_length": 32},
            "train": {"max_steps": 4, "batch_size": 16, "precision": "fp32", "num_threads": 1, **train},
            "baselines": [], "output_dir": str(out)}


def _config_file(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``lmtune ARGS`` in this process (a process of its own beside the trainers it is tested against)."""
    monkeypatch.setattr(sys, "argv", ["lmtune", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())  # rich wraps long messages
    return int(info.value.code or 0), text


def _launch(cfg_path: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(cfg_path), "--no-progress", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=ENV)


def _wait_for(condition: Any, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {HANG} s"
        time.sleep(0.05)


def _marked_run(folder: Path, **record: Any) -> Path:
    """A run folder as lmtune writes it (by hand, for the tests that need no training)."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({**run_folder.run_marker(), "status": "complete", "task": "classification",
                                                 "lmtune_version": lmtune.__version__, **record}))
    (folder / "config.yaml").write_text("task: classification\n")
    (folder / "metrics.json").write_text("{}")
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(b"weights")
    return folder


# ------------------------------------------------------------------------------------------ item 6
def test_overwrite_never_deletes_a_folder_another_tool_wrote(tmp_path: Path, tiny_bert_dir: Path,
                                                            sentiment_csv: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Other experiment tools write a run.json with a status too: that does not make a folder lmtune's."""
    out = tmp_path / "experiment"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "complete", "run_id": "a1b2", "framework": "other"}))
    (out / "metrics.json").write_text('{"loss": 0.1}')
    (out / "weights.pt").write_bytes(b"precious")
    cfg = _config_file(tmp_path / "c.yaml", _config(tiny_bert_dir, sentiment_csv, out))
    code, text = _cli(["train", str(cfg), "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in text
    assert "lmtune" in text and "refusing" in text
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "run.json", "weights.pt"]
    # the same with only lmtune's file names in it: still not lmtune's (no mark, no lmtune_version)
    (out / "weights.pt").unlink()
    code, text = _cli(["train", str(cfg), "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "refusing" in text and (out / "metrics.json").read_text() == '{"loss": 0.1}'


def test_overwrite_deletes_only_what_lmtune_wrote(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    cfg_dict = _config(tiny_bert_dir, sentiment_csv, out, save_every=2, trackers=["tensorboard"])
    pytest.importorskip("tensorboard")
    run = lmtune.train(cfg_dict, show_progress=False)
    record = json.loads((run.path / "run.json").read_text())
    assert record["format"] == "lmtune-run" and record["format_version"] == run_folder.RUN_FORMAT_VERSION
    # every name a real run writes is one --overwrite knows (the list cannot go stale unnoticed)
    assert run_folder.foreign_entries(run.path) == []
    assert {"model", "checkpoints", "plots", "lmtune", "run.json", "train.log"} <= set(os.listdir(run.path))

    # a file of the user's inside the run folder: --overwrite refuses and deletes nothing
    (out / "my_notes.txt").write_text("keep me")
    (out / "model_link").symlink_to(tmp_path)
    before = sorted(os.listdir(out))
    cfg = _config_file(tmp_path / "c.yaml", cfg_dict)
    code, text = _cli(["train", str(cfg), "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "my_notes.txt" in text and "model_link" in text and "Traceback" not in text
    assert sorted(os.listdir(out)) == before and (out / "model" / "model.safetensors").is_file()
    # once they are gone, --overwrite replaces the run
    (out / "my_notes.txt").unlink()
    (out / "model_link").unlink()
    old_start = record["started_at"]
    code, text = _cli(["train", str(cfg), "--overwrite", "--no-progress", "--train.trackers", "[]"],
                      monkeypatch, capsys)
    assert code == 0, text
    assert not (out / "lmtune").exists()  # the old run's TensorBoard logs went with it
    new = json.loads((out / "run.json").read_text())
    assert new["status"] == "complete" and new["format"] == "lmtune-run" and "resumed_at" not in new
    assert old_start <= new["started_at"]


def test_overwrite_replaces_a_run_of_lmtune_0x(tmp_path: Path) -> None:
    """Runs written before the mark existed (tests/fixtures/v0_runs) are recognised by their run.json."""
    old = Path(shutil.copytree(FIXTURES / "classification", tmp_path / "old"))
    record = run_folder.read_run_record(old)
    assert not run_folder.is_marked_run(record) and run_folder.is_legacy_run(record)
    assert run_folder.foreign_entries(old) == []
    cfg = lmtune.load_config({"data": {"train": "x.csv"}, "output_dir": str(old)})
    from lmtune.workflows.train import prepare_run_dir

    with run_folder.RunLock() as lock:
        assert prepare_run_dir(cfg, resume=False, overwrite=True, lock=lock) == (old, None)
        assert run_folder.entries(old) == ["run.json"]  # the new run's record, marked
        assert run_folder.is_marked_run(run_folder.read_run_record(old))


# ------------------------------------------------------------------------------------------ item 7
LOCK_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lmtune.workflows.run_folder import RunLock
    lock = RunLock()
    lock.acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
""")


def _hold_lock(folder: Path) -> subprocess.Popen[str]:
    """Another process holding ``folder``'s lock, as a trainer would."""
    proc = subprocess.Popen([sys.executable, "-c", LOCK_SCRIPT, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_and_a_killed_run_shows_interrupted(
        tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A real `lmtune train` writes the folder; `train`, `train --overwrite` and `train --resume` from another
    process are refused naming its PID, and touch nothing. kill -9: the run is interrupted; --resume goes on."""
    out = tmp_path / "run"
    cfg = _config_file(tmp_path / "c.yaml", _config(tiny_bert_dir, sentiment_csv, out, max_steps=100_000,
                                                    save_every=20, eval_every=100_000, log_every=50))
    log = tmp_path / "first.log"
    first = _launch(cfg, log)
    try:
        _wait_for(lambda: ckpt.latest_checkpoint(out / "checkpoints") is not None, first, log, "first checkpoint")
        for args in ([], ["--overwrite"], ["--resume"]):
            code, text = _cli(["train", str(cfg), *args], monkeypatch, capsys)
            assert code == 2 and "Traceback" not in text, (args, text)
            assert "another lmtune process is writing this run folder" in text, (args, text)
            assert f"PID {first.pid}" in text and "started 20" in text, (args, text)
            assert first.poll() is None and (out / "checkpoints").is_dir(), args
        with pytest.raises(RunError, match="still training") as err:
            Run.load(out)
        assert f"PID {first.pid}" in str(err.value)
        assert run_folder.run_status(out, run_folder.read_run_record(out)) == "running"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=HANG)
    # killed: run.json still says running, the lock tells the truth
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert run_folder.run_status(out, run_folder.read_run_record(out)) == "interrupted"
    with pytest.raises(RunError, match=r"status: interrupted") as err:
        Run.load(out)
    assert "--resume" in (err.value.hint or "")
    code, text = _cli(["train", str(cfg)], monkeypatch, capsys)
    assert code == 2 and "status: interrupted" in text and "--resume" in text
    step = ckpt.read_state(ckpt.latest_checkpoint(out / "checkpoints"))["loop"]["step"]  # type: ignore[arg-type]
    code, text = _cli(["train", str(cfg), "--resume", "--no-progress", "--train.max_steps", str(step + 2)],
                      monkeypatch, capsys)
    assert code == 0, text
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and "resumed_at" in record
    assert run_folder.lock_holder(out) is None  # released at the end


def test_two_fresh_runs_racing_into_one_folder(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path) -> None:
    """Started together on one new folder: one trains, the other gets one clear error; no row is written twice."""
    out = tmp_path / "run"
    cfg = _config_file(tmp_path / "c.yaml", _config(tiny_bert_dir, sentiment_csv, out, max_steps=200,
                                                    log_every=1, eval_every=100))
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    procs = [_launch(cfg, log) for log in logs]
    codes = [p.wait(timeout=HANG) for p in procs]
    texts = [" ".join(log.read_text().split()) for log in logs]
    assert sorted(codes) == [0, 2], texts
    loser = texts[codes.index(2)]
    assert "Traceback" not in loser and (
        "another lmtune process is writing this run folder" in loser or "already holds a finished run" in loser)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)) and max(r["step"] for r in rows) == 200
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_a_second_multi_process_run_is_refused_without_hanging(tmp_path: Path, tiny_bert_dir: Path,
                                                               sentiment_csv: Path) -> None:
    """`--num-processes 2` on a folder another process writes: the main process meets the lock and every
    process ends with its message (none waits at a barrier for ever)."""
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        cfg = _config_file(tmp_path / "c.yaml", _config(tiny_bert_dir, sentiment_csv, out))
        done = subprocess.run([sys.executable, "-m", "lmtune", "train", str(cfg), "--num-processes", "2",
                               "--no-progress"], env=ENV, capture_output=True, text=True, timeout=HANG)
    finally:
        holder.kill()
        holder.wait()
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and f"another lmtune process is writing this run folder (PID {holder.pid}" in text
    # torchrun prints its own ChildFailedError traceback for a worker that exits non-zero; none from lmtune
    assert str(Path(lmtune.__file__).parent) not in text, text
    assert run_folder.entries(out) == []  # nothing written


def test_the_lock_ends_with_the_process_not_with_forked_children(tmp_path: Path) -> None:
    """A forked child (a DataLoader worker) does not keep a killed trainer's lock alive."""
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from lmtune.workflows.run_folder import RunLock
        lock = RunLock()
        lock.acquire(Path(sys.argv[1]))
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        assert run_folder.lock_holder(tmp_path) is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG)
        assert run_folder.lock_holder(tmp_path) is None  # the child still runs, the lock is gone
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------ item 8
@pytest.mark.parametrize("kind", ["file", "devnull", "under a file", "dangling link", "link loop"])
def test_unusable_output_dir_is_one_clear_error(kind: str, tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("a file")
    elif kind == "devnull":
        target = Path(os.devnull)
    elif kind == "under a file":
        (tmp_path / "plain").write_text("x")
        target = tmp_path / "plain" / "run"
    elif kind == "dangling link":
        target.symlink_to(tmp_path / "nowhere")
    else:
        target.symlink_to(target)
    cfg = _config_file(tmp_path / "c.yaml", _config(tiny_bert_dir, sentiment_csv, target))
    for args in ([], ["--overwrite"]):
        code, text = _cli(["train", str(cfg), *args], monkeypatch, capsys)
        assert code == 2 and "Traceback" not in text and str(target) in text, (args, text)
    if kind == "file":
        assert target.read_text() == "a file"
    if kind == "dangling link":
        assert not (tmp_path / "nowhere").exists()  # nothing created through the link


def test_overwrite_through_a_symlinked_output_dir(tmp_path: Path) -> None:
    """A link to an lmtune run: --overwrite replaces the run inside the folder it points to and keeps the
    link; a link to anything else is refused like the folder itself."""
    from lmtune.workflows.train import prepare_run_dir

    real = _marked_run(tmp_path / "real")
    link = tmp_path / "latest"
    link.symlink_to(real)
    cfg = lmtune.load_config({"data": {"train": "x.csv"}, "output_dir": str(link)})
    with run_folder.RunLock() as lock:
        assert prepare_run_dir(cfg, resume=False, overwrite=True, lock=lock) == (link, None)
    assert link.is_symlink() and real.is_dir() and run_folder.entries(real) == ["run.json"]
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    link.unlink()
    link.symlink_to(foreign)
    with run_folder.RunLock() as lock, pytest.raises(RunError, match=r"not an lmtune run|refusing"):
        prepare_run_dir(cfg, resume=False, overwrite=True, lock=lock)
    assert (foreign / "thesis.tex").read_text() == "x"


@pytest.mark.parametrize("value", ["", "   ", "runs/\x00x"])
def test_empty_output_dir_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="output_dir"):
        lmtune.load_config({"data": {"train": "x.csv"}, "output_dir": value})


def test_empty_output_dir_from_the_command_line_says_why() -> None:
    # `--output_dir ""` arrives as null from the override parser: the message must still give the reason.
    with pytest.raises(ConfigError, match="must name a folder"):
        lmtune.load_config({"data": {"train": "x.csv"}}, {"output_dir": None})


@pytest.mark.parametrize(("file", "content"), [
    ("model/lmtune.json", "{not json"), ("model/lmtune.json", "[1, 2]"), ("model/lmtune.json", '{"no": "task"}'),
    ("model/lmtune.json", b"\xff\xfe\x00"), ("run.json", "{truncated"), ("run.json", '"a string"'),
])
def test_malformed_run_files_name_the_file(file: str, content: str | bytes, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(FIXTURES / "classification", tmp_path / "run"))
    if file == "run.json":  # run.json matters when there is no model yet
        shutil.rmtree(run / "model")
    path = run / file
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(RunError) as err:
        Run.load(run)
    assert str(path) in str(err.value)
    inputs = write_csv(tmp_path / "in.csv", [{"text": "a fine film"}])
    for args in (["predict", str(run), "-i", str(inputs), "-o", str(tmp_path / "o.csv"), "--no-progress"],
                 ["serve", str(run), "--port", "0"]):
        code, text = _cli(args, monkeypatch, capsys)
        assert code == 2 and "Traceback" not in text and str(path) in text, (args, text)


def test_a_malformed_run_json_beside_a_model_still_serves(tmp_path: Path) -> None:
    run = Path(shutil.copytree(FIXTURES / "classification", tmp_path / "run"))
    (run / "run.json").write_text("{broken")
    assert Run.load(run).predict(["great film"])[0]["label"] in ("neg", "pos")


# ------------------------------------------------------------------------------------------ item 14
def test_a_run_that_failed_on_bad_data_is_replaced_without_overwrite(
        tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,sentiment\n" + "".join(f"film {i},pos\n" for i in range(20)))  # no label column
    out = tmp_path / "run"
    cfg = _config_file(tmp_path / "c.yaml", _config(tiny_bert_dir, data, out))
    code, text = _cli(["train", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 2 and "label" in text
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    write_csv(data, sentiment_rows(80))  # the data fixed: the same command again, no --overwrite
    code, text = _cli(["train", str(cfg), "--no-progress"], monkeypatch, capsys)
    assert code == 0, text
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("state", ["trained", "checkpoint", "unmarked"])
def test_a_run_that_trained_still_needs_overwrite(state: str, tmp_path: Path) -> None:
    """Only a marked run that never reached its training loop is replaced silently."""
    from lmtune.workflows.train import prepare_run_dir

    record: dict[str, Any] = {"status": "failed"}
    if state == "trained":
        record["training_started_at"] = "2026-01-01T00:00:00+00:00"
    out = _marked_run(tmp_path / "run", **record)
    shutil.rmtree(out / "model")
    if state == "checkpoint":
        (out / "checkpoints" / "step-00000010").mkdir(parents=True)
        (out / "checkpoints" / "step-00000010" / ckpt.STATE_FILE).write_text('{"loop": {"step": 10}}')
    if state == "unmarked":
        (out / "run.json").write_text(json.dumps({"status": "failed", "task": "classification",
                                                  "lmtune_version": "0.1.0"}))
    cfg = lmtune.load_config({"data": {"train": "x.csv"}, "output_dir": str(out)})
    with run_folder.RunLock() as lock, pytest.raises(RunError, match="unfinished run") as err:
        prepare_run_dir(cfg, resume=False, overwrite=False, lock=lock)
    assert "--overwrite" in (err.value.hint or "") and (out / "metrics.json").exists()
