"""Personal data (``data.pii``, ``lmtune data scan``): the real offline presidio analyzer, no mocks.

The scanner finds planted entities with their file:line; ``redact`` leaves none of them in a tiny
classification run's tokenised features; ``drop`` leaves out exactly their rows; ``error`` names file:line
and the type without the value; word lists stay aligned with their tags; a model trained with ``redact``
redacts its prediction inputs; bad settings fail naming the key.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import sentiment_rows, write_csv

import lmtune
from lmtune.config import load_config
from lmtune.data import pii
from lmtune.data.pii_engine import PiiScanner
from lmtune.errors import ConfigError, DataError
from lmtune.tasks import get_task
from lmtune.workflows.pii_scan import scan_data

# (value, type) planted into sentiment rows; values chosen to pass each recognizer's checksum or validator.
PLANTED = [
    ("anna.kowalski@example.org", "EMAIL_ADDRESS"),
    ("4111 1111 1111 1111", "CREDIT_CARD"),
    ("GB82 WEST 1234 5698 7654 32", "IBAN_CODE"),
    ("(212) 555-0143", "PHONE_NUMBER"),
    ("192.168.17.42", "IP_ADDRESS"),
    ("536-22-8147", "US_SSN"),
    ("221B Baker Street", "STREET_ADDRESS"),
    ("Elizabeth Bennet", "PERSON"),
]


@pytest.fixture(scope="module")
def scan() -> PiiScanner:
    """The analyzer is built once per process; this only fetches it."""
    return pii.scanner()


def _planted_rows(n: int = 48) -> tuple[list[dict[str, str]], dict[int, tuple[str, str]]]:
    """Sentiment rows with one planted value in every sixth row; returns rows and {row index: planted}."""
    rows = sentiment_rows(n)
    planted: dict[int, tuple[str, str]] = {}
    for k, i in enumerate(range(3, n, 6)):
        value, kind = PLANTED[k % len(PLANTED)]
        rows[i] = {**rows[i], "text": f"{rows[i]['text']} - contact {value} about it"}
        planted[i] = (value, kind)
    return rows, planted


def _cfg(train: Path, out: Path, model: Path, **data: Any) -> dict[str, Any]:
    return {"task": "classification", "model": str(model),
            "data": {"train": str(train), "max_length": 48, "deduplicate": False, **data},
            "train": {"epochs": 1, "batch_size": 16, "learning_rate": 2e-3, "precision": "fp32"},
            "baselines": [], "output_dir": str(out)}


@pytest.mark.parametrize(("value", "kind"), PLANTED)
def test_each_recognizer_finds_its_type_and_masks_examples(scan: PiiScanner, value: str, kind: str) -> None:
    text = f"Please note {value} for the file."
    found = scan.find(text)
    assert [(text[f.start:f.end], f.entity) for f in found] == [(value, kind)]
    masked = pii.mask_example(value)
    assert "***" in masked and masked != value and len(set(value.split()) & set(masked.split())) == 0


@pytest.mark.parametrize("text", [
    "the movie was great and the ending was warm",  # lower-case prose is not even analysed
    "Order 4111 1111 1111 1112 was refused",  # fails the Luhn check
    "IBAN GB82 WEST 1234 5698 7654 33",  # fails mod-97
    "Version 1.2.3 shipped in 2019 with 25 fixes",
])
def test_near_misses_are_not_findings(scan: PiiScanner, text: str) -> None:
    assert scan.find(text) == []


def test_scan_lists_counts_per_column_with_file_and_line(tmp_path: Path) -> None:
    rows, planted = _planted_rows()
    train = write_csv(tmp_path / "train.csv", rows)
    report = scan_data(_cfg(train, tmp_path / "run", tmp_path))
    (source,) = report["sources"]
    assert source["splits"] == ["train"] and source["rows"] == len(rows)
    assert source["rows_with_pii"] == len(planted)
    assert set(source["columns"]) == {"text"}  # the label column is never scanned
    counts = source["columns"]["text"]["counts"]
    expected: dict[str, int] = {}
    for _, kind in planted.values():
        expected[kind] = expected.get(kind, 0) + 1
    assert counts == expected
    # CSV line = row index + 2 (header on line 1); examples are masked
    first = source["columns"]["text"]["examples"][0]
    assert first["line"] == min(planted) + 2 and first["type"] == planted[min(planted)][1]
    assert planted[min(planted)][0] not in json.dumps(report)


def test_data_scan_command_prints_file_line_and_json(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lmtune import cli

    rows, planted = _planted_rows()
    train = write_csv(tmp_path / "train.csv", rows)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_cfg(train, tmp_path / "run", tmp_path)))
    result = CliRunner().invoke(cli.app, ["data", "scan", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{train}:{min(planted) + 2}" in result.output and "EMAIL_ADDRESS" in result.output
    as_json = CliRunner().invoke(cli.app, ["data", "scan", str(config), "--json", "--entities", "PERSON"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["found"] == {"PERSON": 1}


def test_redact_leaves_no_planted_value_in_the_tokenised_features(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rows, planted = _planted_rows()
    train = write_csv(tmp_path / "train.csv", rows)
    cfg = load_config(_cfg(train, tmp_path / "run", tiny_bert_dir, pii="redact"))
    task = get_task(cfg.task)(cfg)
    tokenizer = task.load_tokenizer(task.model_path())
    with pii.recording() as reports:
        data = task.prepare(tokenizer)
    decoded = [tokenizer.decode(ids, skip_special_tokens=True)
               for split in data.splits.values() for ids in split["input_ids"]]
    assert sum(len(split) for split in data.splits.values()) == len(rows)
    squashed = "\n".join(d.replace(" ", "") for d in decoded)
    for value, kind in planted.values():
        assert value.lower().replace(" ", "") not in squashed, value
        assert f"<{kind.lower()}>" in squashed  # the placeholder took its place
    # the texts the model reads hold nothing the scanner would flag
    scan = pii.scanner()
    assert not any(scan.find(text) for texts, _ in data.extra["inputs"].values() for text in texts)
    assert sum(r.rows_with_pii for r in reports) == len(planted)


def test_drop_leaves_out_exactly_the_rows_with_personal_data(tmp_path: Path) -> None:
    rows, planted = _planted_rows()
    train = write_csv(tmp_path / "train.csv", rows)
    d = load_config(_cfg(train, tmp_path / "run", tmp_path, pii="drop")).data
    with pii.recording() as reports:
        table = pii.read_data_table(str(train), d)
    assert table.lines == [i + 2 for i in range(len(rows)) if i not in planted]
    assert reports[0].dropped_lines == sorted(i + 2 for i in planted)


def test_error_names_file_line_column_and_type_but_not_the_value(tmp_path: Path) -> None:
    rows, planted = _planted_rows()
    train = write_csv(tmp_path / "train.csv", rows)
    d = load_config(_cfg(train, tmp_path / "run", tmp_path, pii="error")).data
    with pytest.raises(DataError) as err:
        pii.read_data_table(str(train), d)
    first = min(planted)
    value, kind = planted[first]
    assert err.value.file == str(train) and err.value.line == first + 2 and err.value.field == "text"
    assert kind in str(err.value) and value not in str(err.value)


@pytest.mark.parametrize("policy", ["redact", "mask"])
def test_word_lists_stay_aligned_with_their_tags(tmp_path: Path, policy: str) -> None:
    words = ["Write", "to", "anna.kowalski@example.org", "or", "ask", "Elizabeth", "Bennet", "today"]
    tags = ["O", "O", "O", "O", "O", "B-PER", "I-PER", "O"]
    path = tmp_path / "ner.jsonl"
    path.write_text(json.dumps({"tokens": words, "tags": tags}) + "\n"
                    + json.dumps({"tokens": ["nothing", "here"], "tags": ["O", "O"]}) + "\n")
    d = load_config({"task": "token_classification", "data": {"train": str(path), "pii": policy}}).data
    table = pii.read_data_table(str(path), d)
    out = table.rows[0]["tokens"]
    assert len(out) == len(words) and table.rows[0]["tags"] == tags
    changed = [i for i, (a, b) in enumerate(zip(words, out, strict=True)) if a != b]
    assert changed == [2, 5, 6]
    if policy == "redact":
        assert out[2] == "<EMAIL_ADDRESS>" and out[5:7] == ["<PERSON>", "<PERSON>"]
    else:
        assert [len(w) for w in out] == [len(w) for w in words] and set(out[2]) == {"*"}
    assert table.rows[1]["tokens"] == ["nothing", "here"]


def test_chat_message_contents_are_rewritten_and_roles_kept(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "My card is 4111 1111 1111 1111, can you help?"},
                {"role": "assistant", "content": "Sure."}]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    d = load_config({"task": "sft", "data": {"train": str(path), "pii": "redact"}}).data
    out = pii.read_data_table(str(path), d).rows[0]["messages"]
    assert out == [{"role": "user", "content": "My card is <CREDIT_CARD>, can you help?"},
                   {"role": "assistant", "content": "Sure."}]


def test_redact_refuses_data_with_character_offsets(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_text(json.dumps({"text": "Ask Elizabeth Bennet now", "spans": [{"start": 4, "end": 20,
                                                                             "label": "PER"}]}) + "\n")
    cfg = {"task": "token_classification", "data": {"train": str(path), "pii": "redact"}}
    with pytest.raises(ConfigError, match=r"data\.pii: redact") as err:
        pii.read_data_table(str(path), load_config(cfg).data)
    assert "mask" in str(err.value)
    cfg["data"]["pii"] = "mask"  # mask keeps every offset where it was
    row = pii.read_data_table(str(path), load_config(cfg).data).rows[0]
    assert row["text"] == "Ask **************** now" and row["spans"][0]["end"] == 20


@pytest.mark.parametrize(("key", "value", "message"), [
    ("pii", "hide", "data.pii"),
    ("pii_entities", ["EMAIL", "PERSON"], "data.pii_entities"),
    ("pii_score", 1.5, "data.pii_score"),
])
def test_bad_settings_fail_naming_the_key(tmp_path: Path, key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"task": "classification", "data": {"train": "x.csv", key: value}})


def test_a_model_trained_with_redact_redacts_its_prediction_inputs(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rows, planted = _planted_rows()
    train = write_csv(tmp_path / "train.csv", rows)
    run = lmtune.train(_cfg(train, tmp_path / "run", tiny_bert_dir, pii="redact"), show_progress=False)
    record = json.loads((run.path / "pii.json").read_text())
    assert record["policy"] == "redact" and record["rows_with_pii"] == len(planted)
    assert "## Personal data" in (run.path / "report.md").read_text()
    assert "data.pii: redact" in (run.model_dir / "README.md").read_text()
    meta = json.loads((run.model_dir / "lmtune.json").read_text())
    assert meta["pii"]["policy"] == "redact" and sum(meta["pii"]["found"].values()) == len(planted)

    inputs = write_csv(tmp_path / "in.csv", [{"text": "great film, mail anna.kowalski@example.org"},
                                             {"text": "dull plot"}])
    lmtune.load_run(run.path).predict_file(inputs, tmp_path / "out.csv", show_progress=False)
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        out = list(csv.DictReader(f))
    assert out[0]["text"] == "great film, mail <EMAIL_ADDRESS>" and out[1]["text"] == "dull plot"


# ------------------------------------------------------------------------------------------ names from an NER run
# Names the built-in recognizer misses (outside the census first-name lists); the NER run learns them from context.
_TRAIN_NAMES = ["Siobhan", "Zbigniew", "Ngozi", "Dmitri", "Aoife", "Kwame", "Tariq", "Saoirse", "Bogdan", "Chidi",
                "Yusuf", "Niamh", "Radek", "Amara", "Jiri", "Eilidh", "Folake", "Vaclav", "Ciaran", "Emeka"]
_HELD_OUT_NAMES = ["Oluwaseun", "Przemek", "Grainne", "Babajide", "Tadhg", "Wojtek"]
_TEMPLATES = ["please call {} tomorrow .", "the report was written by {} .", "{} said the order was late .",
              "send the invoice to {} today .", "we thanked {} for the help ."]
_PLAIN = ["the weather was fine on {} .", "the order was late again on {} .", "send the invoice by {} .",
          "the report was written on {} .", "please call the office on {} ."]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


@pytest.fixture(scope="module")
def ner_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny NER run (token_classification, B-PER/I-PER) trained on templated sentences with unusual names."""
    out = tmp_path_factory.mktemp("pii-ner")
    rows = []
    for name in _TRAIN_NAMES:
        for template in _TEMPLATES:
            words = template.format(name).split()
            rows.append({"tokens": words, "tags": ["B-PER" if w == name else "O" for w in words]})
    for template in _PLAIN:
        for day in _DAYS:
            words = template.format(day).split()
            rows.append({"tokens": words, "tags": ["O"] * len(words)})
    data = out / "names.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {"task": "token_classification", "model": str(tiny_bert_dir),
           "data": {"train": str(data), "max_length": 24, "validation_size": 0.1, "test_size": 0.1},
           "train": {"epochs": 8, "batch_size": 16, "learning_rate": 1e-2, "precision": "fp32", "warmup_ratio": 0.0},
           "baselines": [], "output_dir": str(out / "run")}
    return lmtune.train(cfg, show_progress=False)


def test_an_ner_run_finds_names_the_builtin_recognizer_misses(ner_run: Any, tmp_path: Path) -> None:
    texts = [t.format(n) for n, t in zip(_HELD_OUT_NAMES, _TEMPLATES * 2, strict=False)]
    plain = PiiScanner(["PERSON"])
    assert not any(plain.find(t) for t in texts)  # outside the census lists: missed
    with_ner = pii.config_scanner(load_config({"data": {"train": "x.csv", "pii_ner": str(ner_run.path)}}).data,
                                  ["PERSON"])
    assert with_ner.ner is not None and with_ner.ner.labels == ("PER",)
    assert with_ner.ner.folder == str((ner_run.path / "model").resolve())  # the run folder's model
    found = [[t[f.start:f.end] for f in with_ner.find(t) if f.entity == "PERSON"] for t in texts]
    hits = sum(found_names == [name] for found_names, name in zip(found, _HELD_OUT_NAMES, strict=True))
    assert hits >= len(texts) - 1, found
    assert not any(with_ner.find(t.format("friday")) for t in _PLAIN)  # no false alarm without names
    lower = with_ner.find("please call oluwaseun tomorrow .")  # an uncased model: lower-cased names too
    assert [f.entity for f in lower] == ["PERSON"]


def test_data_pii_ner_redacts_training_text_and_is_recorded(ner_run: Any, tmp_path: Path, tiny_bert_dir: Path) -> None:
    rows = [{"text": t.format(n), "label": "a" if i % 2 else "b"}
            for i, (n, t) in enumerate(zip(_HELD_OUT_NAMES * 4, _TEMPLATES * 5, strict=False))]
    train = write_csv(tmp_path / "train.csv", rows)
    cfg = _cfg(train, tmp_path / "scan", tiny_bert_dir, pii_ner=str(ner_run.path), pii_entities=["PERSON"])
    report = scan_data(cfg)
    assert report["ner"] == str((ner_run.path / "model").resolve()) and report["ner_labels"] == ["PER"]
    found = report["found"].get("PERSON", 0)
    assert found >= len(rows) // 2, report["found"]  # none without the model (test above)
    d = load_config({**cfg, "data": {**cfg["data"], "pii": "redact"}}).data
    texts = [r["text"] for r in pii.read_data_table(str(train), d).rows]
    redacted = [t for t in texts if "<PERSON>" in t]
    assert len(redacted) == found and not any(n in t for t in redacted for n in _HELD_OUT_NAMES)
    saved = pii.model_policy(d)["pii"]
    assert saved["ner"] == report["ner"] and saved["ner_labels"] == ["PER"]  # predict inputs use the same model


@pytest.mark.parametrize(("target", "labels", "message"), [
    ("nowhere", None, "holds no model"),
    ("classifier", None, "not a token-classification"),
    ("ner", ["PERSONA"], "tags PER, not PERSONA"),
])
def test_bad_pii_ner_fails_naming_the_key(ner_run: Any, tiny_bert_dir: Path, tmp_path: Path, target: str,
                                          labels: list[str] | None, message: str) -> None:
    from transformers import AutoModelForSequenceClassification

    folder = {"nowhere": tmp_path / "none", "ner": ner_run.path, "classifier": tmp_path / "clf"}[target]
    if target == "classifier":
        AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).save_pretrained(folder)
    d = load_config({"data": {"train": "x.csv", "pii_ner": str(folder), "pii_ner_labels": labels}}).data
    with pytest.raises(ConfigError, match=r"data\.pii_ner") as err:
        pii.config_scanner(d)
    assert message in str(err.value)


def test_served_answers_mask_the_ner_runs_names(ner_run: Any) -> None:
    """``lmtune serve --redact-pii --pii-ner RUN``: the server's masker finds names with the NER run too."""
    from lmtune.serve.guard import PiiMasker, SafeguardStats
    from lmtune.serve.options import ServeOptions

    # The name in a context the run learned names in, the address in one it learned as no name ("went", a word
    # the run never saw, was tagged a name under some dropout draws: that is the tiny run's luck, not the masker's).
    answer = "please call Oluwaseun tomorrow . send the invoice by ann.lee@example.org ."
    plain, counts = PiiMasker(SafeguardStats()).mask(answer)
    assert "Oluwaseun" in plain and counts == {"EMAIL_ADDRESS": 1}
    stats = SafeguardStats()
    masked, counts = PiiMasker(stats, str(ner_run.path)).mask(answer)
    assert "Oluwaseun" not in masked and "<PERSON>" in masked and counts == {"PERSON": 1, "EMAIL_ADDRESS": 1}
    with pytest.raises(ConfigError, match="--redact-pii is off"):
        ServeOptions(pii_ner=str(ner_run.path))
    with pytest.raises(ConfigError, match=r"data\.pii_ner: .* holds no model"):
        PiiMasker(stats, str(ner_run.path / "nothing"))
