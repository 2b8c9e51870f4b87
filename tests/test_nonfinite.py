"""A non-finite loss: stop with the step and the examples named, or skip the update and go on.

The NaN is real, not injected into the loop: the tiny model's embedding row of one word is NaN, so
every training example holding that word has a NaN loss (it spreads through attention) while the
others train normally. Validation and test never contain the word.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmtune
from lmtune.training.loop import TrainingError

POISON = "zebra"


@pytest.fixture(scope="module")
def poisoned_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from helpers import tiny_bert
    from transformers import AutoTokenizer

    folder = tiny_bert(tmp_path_factory.mktemp("nan-bert"), dropout=0.0)
    token_id = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(POISON)
    weights = load_file(str(folder / "model.safetensors"))
    weights["embeddings.word_embeddings.weight"][token_id] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, token_id


def _data(tmp_path: Path) -> dict[str, str]:
    from helpers import sentiment_rows, write_csv

    rows = sentiment_rows(160, seed=3)
    for i in (7, 70):  # two poisoned training examples
        rows[i]["text"] = f"{POISON} " + rows[i]["text"]
    held = sentiment_rows(40, seed=4)
    return {"train": str(write_csv(tmp_path / "train.csv", rows)),
            "validation": str(write_csv(tmp_path / "val.csv", held[:20])),
            "test": str(write_csv(tmp_path / "test.csv", held[20:]))}


def _config(model: Path, tmp_path: Path, **train: Any) -> dict[str, Any]:
    return {"task": "classification", "model": str(model),
            "data": {**_data(tmp_path), "max_length": 32},
            "train": {"epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "log_every": 2, "precision": "fp32",
                      "group_by_length": False, **train},
            "baselines": [], "output_dir": str(tmp_path / "run")}


def _poisoned_indices(cfg: dict[str, Any], token_id: int) -> set[int]:
    """Indices in the prepared training split of the examples holding the poisoned word."""
    from lmtune.config import load_config
    from lmtune.tasks import get_task

    task = get_task("classification")(load_config(cfg))
    data = task.prepare(task.load_tokenizer(Path(cfg["model"])))
    return {i for i, ids in enumerate(data.splits["train"]["input_ids"]) if token_id in ids}


def test_nonfinite_loss_stops_naming_step_and_examples(poisoned_bert: tuple[Path, int], tmp_path: Path) -> None:
    model, token_id = poisoned_bert
    cfg = _config(model, tmp_path)
    poisoned = _poisoned_indices(cfg, token_id)
    assert len(poisoned) == 2
    with pytest.raises(TrainingError) as info:
        lmtune.train(cfg, show_progress=False)
    message = str(info.value)
    assert "loss is nan at step" in message
    found = re.search(r"train split[^:]*: ([\d, ]+)", message)
    assert found, message
    named = {int(x) for x in found.group(1).split(", ")}
    assert len(named) == 16  # the whole batch of that step
    assert named & poisoned, (named, poisoned)
    # and the file with the lines of those rows (line 1 is the header: row i is on line i + 2)
    lines = re.search(r"from (\S+) lines ([\d, ]+)", message)
    assert lines and lines.group(1) == cfg["data"]["train"], message
    named_lines = {int(x) for x in lines.group(2).split(", ")}
    assert len(named_lines) == 16 and {7 + 2, 70 + 2} & named_lines
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_nonfinite_skip_goes_on_and_trains(poisoned_bert: tuple[Path, int], tmp_path: Path) -> None:
    model, token_id = poisoned_bert
    cfg = _config(model, tmp_path, nonfinite="skip", epochs=5)
    poisoned = _poisoned_indices(cfg, token_id)
    run = lmtune.train(cfg, show_progress=False)
    summary = run.metrics["summary"]
    # 10 steps per epoch, 5 epochs; each poisoned example is seen once per epoch (maybe both in one batch)
    assert 5 <= summary["skipped_steps"] <= 10
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["split"] == "skipped"]
    assert len(skipped) == summary["skipped_steps"]
    assert all(set(r["example_ids"]) & poisoned and r["what"] == "loss" for r in skipped)
    train = [r for r in rows if r["split"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert run.metrics["test"]["accuracy"] > run.metrics["starting_point"]["test"]["accuracy"]
    # only the poisoned row is non-finite: the skipped updates never reached the other weights
    weights = load_file(str(run.model_dir / "model.safetensors"))
    bad = {k for k, v in weights.items() if not torch.isfinite(v).all()}
    assert bad == {"bert.embeddings.word_embeddings.weight"}
    assert int((~torch.isfinite(weights["bert.embeddings.word_embeddings.weight"])).any(dim=1).sum()) == 1


def test_skip_gives_up_after_max_skipped_steps(poisoned_bert: tuple[Path, int], tmp_path: Path) -> None:
    model, _ = poisoned_bert
    cfg = _config(model, tmp_path, nonfinite="skip", max_skipped_steps=1, epochs=2)
    with pytest.raises(TrainingError, match="steps skipped for a non-finite loss"):
        lmtune.train(cfg, show_progress=False)
