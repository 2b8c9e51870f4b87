"""A new task needs its own folder and one registration line, nothing in ``lmtune/``.

``tests/plugins/text_regression/`` is a real task (a score per text: an encoder with a one-unit head,
mean squared error, RMSE/MAE/Pearson/Spearman) written against the task boundary only: ``TaskInfo``,
``register_task``, the ``Task`` and ``Predictor`` protocols and the public data and model helpers.
Importing the folder registers it; ``lmtune train`` and ``lmtune predict`` then run it as any built-in task.
"""

from __future__ import annotations

import csv
import importlib
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from helpers import FILLER, NEGATIVE, POSITIVE, run_cli, write_csv

import lmtune
from lmtune.config.tasks import TASK_INFOS, task_info, task_names
from lmtune.tasks.base import get_predictor, get_task

PLUGIN = "plugins.text_regression"
NAME = "text_regression"


@pytest.fixture(scope="module")
def plugin() -> Iterator[ModuleType]:
    """The plugin, registered for this module's tests, then forgotten (other tests see the built-in tasks)."""
    assert NAME not in task_names()
    module = importlib.import_module(PLUGIN)
    yield module
    TASK_INFOS.pop(NAME, None)  # get_task/get_predictor ask TASK_INFOS first: the task is unknown again
    for name in [m for m in sys.modules if m == PLUGIN or m.startswith(PLUGIN + ".")]:
        del sys.modules[name]


def scored_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    """Texts with two sentiment words among filler words; the score is (positive - negative) words, so it
    follows from the words: -2, 0 or 2, mean 0."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for i in range(n):
        polarity = [rng.random() < 0.5 for _ in range(2)]
        words = rng.sample(FILLER, rng.randint(3, 8)) + [rng.choice(POSITIVE if p else NEGATIVE) for p in polarity]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" #{i}", "score": 2 * sum(polarity) - 2})
    return rows


def test_importing_the_folder_registers_the_task(plugin: ModuleType) -> None:
    assert NAME in task_names() and task_info(NAME) is plugin.INFO
    assert get_task(NAME).__name__ == "TextRegressionTask" and get_task(NAME).info is plugin.INFO
    assert get_predictor(NAME).__name__ == "TextRegressionPredictor"
    # The proof that nothing else was edited: lmtune's own source never names the task.
    package = Path(lmtune.__file__).parent
    assert not [p for p in package.rglob("*.py") if NAME in p.read_text(encoding="utf-8")]


def test_train_and_predict_a_new_task_through_the_cli(plugin: ModuleType, tiny_bert_nodrop_dir: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_csv(tmp_path / "scores.csv", scored_rows(320))
    run_dir = tmp_path / "run"
    config = {
        "task": NAME, "model": str(tiny_bert_nodrop_dir),
        "data": {"train": str(data), "label_column": "score", "max_length": 32,
                 "validation_size": 0.1, "test_size": 0.15},
        "train": {"epochs": 3, "batch_size": 16, "learning_rate": 1e-2, "warmup_ratio": 0.0, "precision": "fp32"},
        "output_dir": str(run_dir),
    }
    (tmp_path / "regression.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    assert run_cli(["train", str(tmp_path / "regression.yaml"), "--no-progress"], monkeypatch) == 0

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["loss"] for r in rows if r.get("split") == "train" and "loss" in r]
    assert len(train_loss) >= 2 and train_loss[-1] < train_loss[0], train_loss
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tuned, start = metrics["test"], metrics["starting_point"]["test"]
    assert set(tuned) >= {"rmse", "mae", "pearson", "spearman", "loss"}
    # The scores centre on 0, so the untrained head (outputs near 0) is the "predict the mean" model: to beat
    # it by this much the tuned model has to read the sentiment words.
    assert tuned["rmse"] < 0.7 * start["rmse"] and tuned["pearson"] > 0.6, (tuned, start)
    saved = json.loads((run_dir / "model" / "lmtune.json").read_text())
    assert saved["task"] == NAME and saved["text_column"] == "text"

    inputs = write_csv(tmp_path / "new.csv", [{"text": "brilliant superb film"}, {"text": "dull awful film"},
                                              {"text": "the plot and the cast"}])
    out = tmp_path / "scored.csv"
    assert run_cli(["predict", str(run_dir), "-i", str(inputs), "-o", str(out), "--no-progress"], monkeypatch) == 0
    with out.open(encoding="utf-8") as f:
        scored = list(csv.DictReader(f))
    assert [r["text"] for r in scored] == ["brilliant superb film", "dull awful film", "the plot and the cast"]
    positive, negative, neutral = (float(r["score"]) for r in scored)
    assert positive > neutral > negative, scored

    # The Python API reads the same run through the task's registered predictor.
    run = lmtune.load_run(run_dir)
    again = run.predict(["brilliant superb film"])
    assert again[0]["score"] == pytest.approx(positive, abs=1e-4)
