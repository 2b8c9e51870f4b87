"""`lmtune tune`: the search space is checked at load, a study on a tiny classifier writes its table,
plots and best config, pruning stops a useless trial, a bad storage is a clear error, workers that open
a fresh SQLite study at once all succeed, and two workers on one SQLite study run exactly the trial
budget between them."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import run_cli

from lmtune.config import load_config
from lmtune.errors import ConfigError, StudyError
from lmtune.workflows.run import Run
from lmtune.workflows.tune import default_storage, describe_study, list_studies, open_study, tune


def _config(model: Path, train_file: Path, out: Path, **tune_cfg: Any) -> dict[str, Any]:
    return {
        "task": "classification",
        "model": str(model),
        "data": {"train": str(train_file), "max_length": 32},
        "train": {"max_steps": 40, "eval_every": 10, "batch_size": 16, "learning_rate": 2e-3, "log_every": 10,
                  "precision": "fp32", "num_threads": 1},
        "baselines": [],
        "output_dir": str(out / "runs" / "tiny"),
        "tune": {"output_dir": str(out / "study"), **tune_cfg},
    }


@pytest.mark.parametrize(("space", "expected"), [
    ({"train.learnig_rate": {"log_uniform": [1e-5, 1e-3]}}, "unknown config key 'train.learnig_rate'; did you mean "
                                                            "train.learning_rate"),
    ({"train.learning_rate": {"uniform": [1e-3, 1e-5]}}, "impossible range [0.001, 1e-05]: lo must be below hi"),
    ({"train.learning_rate": {"log_uniform": [0, 1e-3]}}, "a log_uniform range must be above 0"),
    ({"train.batch_size": ["small", "large"]}, "train.batch_size: the value 'small' is not accepted"),
    ({"train.warmup_ratio": {"uniform": [0.0, 1.5]}}, "train.warmup_ratio: the value 1.5 is not accepted"),
    ({"train.batch_size": {"int": [8, 32], "step": 0.5}}, "`step` is a whole number"),
    ({"train.learning_rate": {"normal": [1, 2]}}, "name exactly one of log_uniform, uniform, int"),
    ({"output_dir": ["a", "b"]}, "output_dir cannot be searched"),
])
def test_a_bad_search_space_is_a_config_error_naming_the_key(space: dict[str, Any], expected: str,
                                                             tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path / "model", tmp_path / "train.csv", tmp_path, space=space))
    assert expected in str(err.value)


def test_a_valid_space_loads(tmp_path: Path) -> None:
    space = {"train.learning_rate": {"log_uniform": [1e-5, 1e-3]}, "train.batch_size": {"int": [8, 32], "step": 8},
             "method.r": [8, 16, 32]}
    cfg = load_config(_config(tmp_path / "model", tmp_path / "train.csv", tmp_path, space=space))
    assert cfg.tune is not None and cfg.tune.space == space


def test_tune_refuses_a_config_without_a_space_and_a_bad_budget(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "model", tmp_path / "train.csv", tmp_path)
    with pytest.raises(ConfigError, match=r"no search space: add tune\.space"):
        tune(cfg)
    cfg["tune"]["space"] = {"train.seed": [1, 2]}
    with pytest.raises(ConfigError, match=r"field 'tune\.trials': Input should be greater than or equal to 1"):
        tune(cfg, trials=0)
    assert not (tmp_path / "study").exists()


def test_a_study_writes_its_table_plots_and_best_config(tiny_bert_dir: Path, sentiment_csv: Path,
                                                        tmp_path: Path) -> None:
    cfg = _config(tiny_bert_dir, sentiment_csv, tmp_path, trials=3, pruner="none",
                  space={"train.learning_rate": {"log_uniform": [1e-3, 1e-2]}})
    result = tune(cfg)
    rows = result.trials
    assert [r["number"] for r in rows] == [0, 1, 2] and all(r["state"] == "complete" for r in rows)
    # trial 0 is the config's own value (tune.include_default), so the best is never worse than it
    assert rows[0]["default"] and rows[0]["params"] == {"train.learning_rate": 2e-3}
    assert len({r["params"]["train.learning_rate"] for r in rows}) == 3
    best = max(rows, key=lambda r: r["value"])
    assert result.summary["best"]["value"] == best["value"] == max(r["value"] for r in rows)
    for r in rows:  # every trial is a whole run folder whose validation metric is the trial's value
        run = Run.load(r["run"])
        assert json.loads((Path(r["run"]) / "run.json").read_text())["status"] == "complete"
        assert run.metrics["validation"]["accuracy"] == pytest.approx(r["value"])
        assert Path(r["run"]).parent == result.study_dir / "trials"
    study = result.study_dir
    for name in ("trials.csv", "trials.json", "study.md", "importance.png", "parallel_coordinates.png", "best.yaml"):
        assert (study / name).is_file() and (study / name).stat().st_size > 0, name
    best_cfg = yaml.safe_load((study / "best.yaml").read_text())
    assert best_cfg["train"]["learning_rate"] == pytest.approx(best["params"]["train.learning_rate"])
    assert best_cfg["output_dir"] == cfg["output_dir"] and best_cfg["tune"] is None
    assert len((study / "trials.csv").read_text().splitlines()) == 4
    # the studio's view of the folder
    described = describe_study(study)
    assert described["study"]["trials"] == 3 and described["study"]["best"]["run"] == best["run"]
    assert "importance.png" in described["plots"]
    assert [s["name"] for s in list_studies(tmp_path)] == ["tiny"]


def test_pruning_stops_a_useless_trial(tiny_bert_dir: Path, sentiment_csv: Path,
                                                               tmp_path: Path) -> None:
    space = {"train.learning_rate": [5e-3, 1e-9], "train.head_learning_rate": [5e-3, 1e-9]}
    # Evaluations at steps 10, 20, 30, 40; none is pruned before step 25 (the learning trial's validation loss
    # falls from ~0.70 to ~0.33 by step 30, the useless one's stays at ~0.69).
    cfg = _config(tiny_bert_dir, sentiment_csv, tmp_path, trials=2, pruner="median", prune_startup_trials=1,
                  prune_warmup_steps=25, include_default=False, space=space)
    cfg["train"]["metric"] = "loss"
    # The order is fixed: a trial that learns, then one whose learning rates cannot move the weights.
    (tmp_path / "study").mkdir()
    study = open_study(default_storage(tmp_path / "study"), "tiny", "minimize")
    study.enqueue_trial({"train.learning_rate": 5e-3, "train.head_learning_rate": 5e-3})
    study.enqueue_trial({"train.learning_rate": 1e-9, "train.head_learning_rate": 1e-9})
    rows = tune(cfg).trials
    assert [r["state"] for r in rows] == ["complete", "pruned"]
    assert rows[1]["pruned_at_step"] == 30 and rows[0]["value"] < 0.5
    record = json.loads((Path(rows[1]["run"]) / "run.json").read_text())
    assert record["status"] == "complete" and record["pruned_at_step"] == 30
    assert Run.load(rows[1]["run"]).metrics["summary"]["steps"] == 30  # it stopped: 30 of 40 steps
    assert Run.load(rows[0]["run"]).metrics["summary"]["steps"] == 40


@pytest.mark.parametrize(("tune_cfg", "refusal"), [
    # lmtune plan says the trial does not fit this machine's memory: refused, never trained
    ({"space": {"train.batch_size": [100_000_000]}, "trials": 1}, "refused by lmtune plan: does NOT fit"),
    # the token budget: 40 steps of real tokens would pass tune.max_tokens
    ({"space": {"train.learning_rate": [2e-3, 5e-3]}, "trials": 2, "max_tokens": 100}, "refused: it would train "
                                                                                       "on about"),
])
def test_trials_that_do_not_fit_the_machine_or_the_budget_are_refused(
        tune_cfg: dict[str, Any], refusal: str, tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_bert_dir, sentiment_csv, tmp_path, include_default=False, **tune_cfg)
    rows = tune(cfg).trials
    assert len(rows) == tune_cfg["trials"]
    for row in rows:
        assert row["state"] == "pruned" and row["value"] is None and refusal in row["note"]
        assert not Path(row["run"]).exists()  # nothing was trained


@pytest.mark.parametrize("storage", ["sqlite:////no/such/folder/study.db", "postgresql://me:secret@127.0.0.1:1/db",
                                     "not a url"])
def test_a_storage_that_cannot_be_opened_is_a_clear_error(storage: str, tmp_path: Path) -> None:
    with pytest.raises(StudyError) as err:
        open_study(storage, "s", "maximize")
    assert "cannot open the study storage" in str(err.value) and "secret" not in str(err.value)


def test_the_cli_reports_a_bad_storage_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "model", tmp_path / "train.csv", tmp_path,
                                           space={"train.learning_rate": [1e-3, 2e-3]})))
    code = run_cli(["tune", str(path), "--storage", "sqlite:////no/such/folder/study.db"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "cannot open the study storage 'sqlite:////no/such/folder/study.db'" in err.replace("\n", "")
    assert not (tmp_path / "study" / "trials").exists()  # nothing ran


def _open_after(barrier: Any, storage: str, results: Any) -> None:
    barrier.wait()
    try:
        open_study(storage, "s", "maximize")
        results.put("ok")
    except StudyError as exc:
        results.put(str(exc))


def test_workers_opening_a_fresh_sqlite_study_at_once_all_succeed(tmp_path: Path) -> None:
    # Optuna's RDBStorage creates the schema unguarded: workers started together lost the race with
    # "UNIQUE constraint failed: alembic_version.version_num" (a CI run caught it in the test below).
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        storage = f"sqlite:///{tmp_path / f'fresh{round_}.db'}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_after, args=(barrier, storage, results)) for _ in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
        assert [results.get(timeout=5) for _ in procs] == ["ok"] * 4


def test_two_workers_share_one_sqlite_study_without_losing_or_repeating_a_trial(
        tiny_bert_dir: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_bert_dir, sentiment_csv, tmp_path, trials=4, pruner="none", sampler="random",
                  space={"train.learning_rate": {"log_uniform": [1e-4, 1e-2]}})
    cfg["train"]["max_steps"] = 10
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "lmtune", "tune", str(path), "--storage", storage],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = open_study(storage, "tiny", "maximize")
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    runs = [t.user_attrs["run"] for t in trials]
    assert len(set(runs)) == 4 and all((Path(r) / "metrics.json").is_file() for r in runs)
    assert sorted(p.name for p in (tmp_path / "study" / "trials").iterdir()) == [
        "trial-0000", "trial-0001", "trial-0002", "trial-0003"]
    assert all(t.user_attrs["worker"] for t in trials)
    assert all("study tiny" in out for out, _ in outputs)  # each worker printed the study's table
