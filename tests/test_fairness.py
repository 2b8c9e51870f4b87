"""Bias and fairness (issue 15, item 4): per-group metrics through fairlearn, counterfactual term swaps, and
their place in metrics.json, report.md and the model card; bad settings fail naming the key or file:line."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import FILLER, NEGATIVE, POSITIVE, write_csv

import lmtune
from lmtune.errors import ConfigError, DataError
from lmtune.evaluate.fairness import TermSwapper, load_term_pairs, run_counterfactuals, slice_metrics


def _config(model: Path, train_file: Path, out: Path, **evaluate: Any) -> dict[str, Any]:
    return {
        "task": "classification",
        "model": str(model),
        "data": {"train": str(train_file), "max_length": 32, "test_size": 0.25},
        "train": {"epochs": 8, "batch_size": 16, "learning_rate": 2e-3, "log_every": 5, "precision": "fp32"},
        "baselines": [],
        "evaluate": evaluate,
        "output_dir": str(out),
    }


def _rows(n: int, *, seed: int, noisy_group: str | None = None, pronoun_decides: bool = False) -> list[dict[str, Any]]:
    """Sentences with a pronoun (he/she) and a dialect group (a/b). The label follows the sentiment words,
    except: in ``noisy_group`` it is a coin flip (the model cannot do well there), and with
    ``pronoun_decides`` the pronoun alone decides it (he: pos, she: neg; no sentiment words)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        group = "ab"[i % 2]
        pronoun = rng.choice(["he", "she"])
        words = rng.sample(FILLER, rng.randint(3, 8))
        if pronoun_decides:
            label = "pos" if pronoun == "he" else "neg"
        else:
            positive = rng.random() < 0.5
            words += rng.sample(POSITIVE if positive else NEGATIVE, 2)
            label = "pos" if positive else "neg"
            if group == noisy_group:
                label = rng.choice(["pos", "neg"])
        words.append(pronoun)
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" #{i}", "label": label, "dialect": group})
    return rows


def test_slices_and_counterfactuals_end_to_end(tiny_bert_dir: Path, tmp_path: Path) -> None:
    # Group b's labels are coin flips: the tuned model is good on a and near chance on b. The pronoun carries
    # no signal, so swapping he/she rarely changes a prediction.
    data = write_csv(tmp_path / "train.csv", _rows(480, seed=1, noisy_group="b"))
    run = lmtune.train(_config(tiny_bert_dir, data, tmp_path / "run", slices=["dialect"],
                               counterfactuals=[["he", "she"]]), show_progress=False)
    m = run.metrics
    s = m["test"]["slices"]["dialect"]
    a, b = s["groups"]["a"], s["groups"]["b"]
    assert a["count"] + b["count"] == m["test"]["num_examples"]
    assert a["accuracy"] >= 0.85 and b["accuracy"] <= 0.75
    assert s["gap"]["accuracy"] == pytest.approx(a["accuracy"] - b["accuracy"])
    assert s["ratio"]["accuracy"] == pytest.approx(b["accuracy"] / a["accuracy"])
    assert s["worst_group"]["accuracy"] == "b"
    assert 0.0 <= s["demographic_parity_difference"]["max"] <= 1.0
    assert 0.0 <= s["equalized_odds_difference"]["max"] <= 1.0
    # the overall accuracy is the count-weighted mean of the groups'
    overall = (a["accuracy"] * a["count"] + b["accuracy"] * b["count"]) / (a["count"] + b["count"])
    assert m["test"]["accuracy"] == pytest.approx(overall)
    # the starting point is sliced too (the report puts both side by side), and validation as well
    assert set(m["starting_point"]["test"]["slices"]["dialect"]["groups"]) == {"a", "b"}
    assert set(m["validation"]["slices"]["dialect"]["groups"]) == {"a", "b"}

    c = m["counterfactuals"]
    assert c["split"] == "test" and c["changed"] == c["items"] == m["test"]["num_examples"]
    assert c["flip_rate"] <= 0.2
    assert c["by_pair"]["he/she"]["changed"] == c["changed"]

    report = (run.path / "report.md").read_text()
    assert "## Bias and fairness" in report and "By `dialect` (test)" in report
    assert "Counterfactual term swaps" in report
    for metric in ("accuracy", "macro_f1"):
        png = f"plots/slices_dialect_{metric}.png"
        assert png in report and (run.path / png).stat().st_size > 1000
    card = (run.model_dir / "README.md").read_text()
    assert "## Bias and fairness" in card and "`dialect` (test)" in card and "he/she" in card
    saved = json.loads((run.path / "metrics.json").read_text())
    assert saved["counterfactuals"]["flipped"] == c["flipped"]


def test_a_model_that_learned_the_pronoun_flips_when_it_is_swapped(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "train.csv", _rows(640, seed=2, pronoun_decides=True))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("# identity terms\nhe,she\n\nhis,her\n")
    cfg = _config(tiny_bert_dir, data, tmp_path / "run", counterfactuals=str(pairs), counterfactual_examples=3)
    run = lmtune.train(cfg, show_progress=False)
    c = run.metrics["counterfactuals"]
    assert run.metrics["test"]["accuracy"] >= 0.9
    assert c["pairs"] == ["he/she", "his/her"] and c["changed"] == c["items"]
    assert c["flip_rate"] >= 0.8 and c["mean_abs_probability_change"] > 0.3
    assert len(c["examples"]) == 3
    example = c["examples"][0]
    assert example["before"] != example["after"]
    assert (" he" in example["original"]) != (" he" in example["swapped"])
    # the card says the model was not sliced by group, but gives the flip rate
    card = (run.model_dir / "README.md").read_text()
    assert "## Bias and fairness" in card and "change their prediction" in card


def test_slice_metrics_match_a_hand_computation() -> None:
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    p = np.array([0, 1, 0, 0, 1, 1, 1, 1])
    g = ["x", "x", "x", "x", "y", "y", "y", "y"]
    s = slice_metrics(y, p, {"g": g}, ["neg", "pos"])["g"]
    assert s["groups"]["x"] == {"count": 4, "accuracy": 0.75, "macro_f1": pytest.approx(0.7333333)}
    assert s["groups"]["y"]["accuracy"] == 0.75
    # selection rate of pos: x 1/4, y 4/4 -> demographic parity difference 0.75 (the same for both classes)
    assert s["demographic_parity_difference"]["per_class"] == {"neg": 0.75, "pos": 0.75}
    # x: TPR 1/2, FPR 0; y: TPR 1, FPR 1 -> equalized odds difference max(0.5, 1) = 1
    assert s["equalized_odds_difference"]["max"] == 1.0
    assert s["small_groups"] == ["x", "y"]
    # multi-label: exact-set accuracy per group
    ym = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    pm = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    sm = slice_metrics(ym, pm, {"g": ["a", "a", "b", "b"]}, ["l1", "l2"], multi_label=True)["g"]
    assert sm["groups"]["a"]["accuracy"] == 0.5 and sm["groups"]["b"]["accuracy"] == 0.5


def test_term_swaps_keep_case_whole_words_and_both_directions() -> None:
    swap = TermSwapper([("he", "she"), ("his", "her"), ("John", "Mary")])
    text, hits = swap.swap("He said she saw HIS dog; the theme is John's. Mary laughed, shed no tear.")
    assert text == "She said he saw HER dog; the theme is Mary's. John laughed, shed no tear."
    assert hits == ["he/she", "his/her", "John/Mary"]
    assert swap.swap_item({"text": "he ran", "text_pair": "her cat"}) == (
        {"text": "she ran", "text_pair": "his cat"}, ["he/she", "his/her"])
    assert swap.swap("nothing here") == ("nothing here", [])

    def predict(items: list[Any]) -> list[dict[str, Any]]:
        return [{"label": "pos" if "she" in t else "neg", "probabilities": {"pos": 0.9 if "she" in t else 0.2,
                                                                             "neg": 0.1 if "she" in t else 0.8}}
                for t in items]

    r = run_counterfactuals(["he is here", "she is here", "nobody"], [("he", "she")], predict)
    assert (r["items"], r["changed"], r["flipped"], r["flip_rate"]) == (3, 2, 2, 1.0)
    assert r["mean_abs_probability_change"] == pytest.approx(0.7)


def test_bad_fairness_settings_fail_naming_the_key_or_line(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "train.csv", _rows(80, seed=3))
    with pytest.raises(ConfigError, match=r"evaluate\.counterfactuals"):
        lmtune.train(_config(tiny_bert_dir, data, tmp_path / "r1", counterfactuals=[["he", "He"]]))
    with pytest.raises(ConfigError, match=r"evaluate\.slices"):
        lmtune.train(_config(tiny_bert_dir, data, tmp_path / "r2", slices=["dialect", "dialect"]))
    with pytest.raises(ConfigError, match=r"evaluate\.counterfactuals"):
        lmtune.train(_config(tiny_bert_dir, data, tmp_path / "r3", counterfactuals=str(tmp_path / "none.txt")))
    # a task whose evaluation has no per-example labels refuses slices, naming the key
    with pytest.raises(ConfigError, match=r"evaluate\.slices is for task classification"):
        lmtune.train({**_config(tiny_bert_dir, data, tmp_path / "r4", slices=["dialect"]), "task": "causal_lm"})
    # an unknown column names the column and the file
    with pytest.raises(DataError, match="no column named 'gender'") as err:
        lmtune.train(_config(tiny_bert_dir, data, tmp_path / "r5", slices=["gender"]), show_progress=False)
    assert "train.csv" in str(err.value)
    # a column with one group in the test split
    one = write_csv(tmp_path / "one.csv", [{**r, "dialect": "a"} for r in _rows(80, seed=3)])
    with pytest.raises(DataError, match="single group \\('a'\\) in the validation split"):
        lmtune.train(_config(tiny_bert_dir, one, tmp_path / "r6", slices=["dialect"]), show_progress=False)
    # a term file line that is not a pair, with its line number
    bad = tmp_path / "pairs.tsv"
    bad.write_text("he\tshe\nhis\n")
    with pytest.raises(DataError, match="expected a pair") as err:
        load_term_pairs(bad)
    assert "pairs.tsv:2" in str(err.value)
    (tmp_path / "pairs.jsonl").write_text('["he", "she"]\n{"a": 1\n')
    with pytest.raises(DataError, match="not JSON") as err:
        load_term_pairs(tmp_path / "pairs.jsonl")
    assert "pairs.jsonl:2" in str(err.value)
    with pytest.raises(DataError, match="expected a pair"):
        lmtune.train(_config(tiny_bert_dir, data, tmp_path / "r7", counterfactuals=str(bad)), show_progress=False)
