"""Token attributions (``lmtune predict --explain``, the server's ``explain``, the report), on tiny models trained
here for real: a classifier whose label one word decides and a tagger of names and places. Captum runs for real;
the assertions are about where the attributions point and that they add up (completeness)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FILLER, run_cli, write_csv
from serve_helpers import assert_openai_error, get, post, running
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

import lmtune
from lmtune.errors import DataError, ModelError, RunError
from lmtune.models import explain
from lmtune.serve.app import create_app
from lmtune.serve.options import ServeOptions
from lmtune.workflows.run import Run

NAMES = ["Alice", "Bob", "Okonkwo", "Dmitri", "Mei"]
PLACES = ["Paris", "Zanzibar", "Kyoto", "Lima"]
NER_FILLER = ["the", "went", "to", "met", "in", "and", "saw", "visited", "yesterday", "with", "a", "friend"]


def decided_texts(n: int, seed: int) -> list[tuple[str, str]]:
    """(text, label): filler words with 'good' (pos) or 'bad' (neg) somewhere among them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(FILLER, rng.randint(4, 8))
        positive = i % 2 == 0
        words.insert(rng.randint(0, len(words)), "good" if positive else "bad")
        out.append((" ".join(words), "pos" if positive else "neg"))
    return out


def tagged_conll(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        for _ in range(rng.randint(3, 8)):
            r = rng.random()
            if r < 0.2:
                lines.append(f"{rng.choice(NAMES)}\tB-PER")
            elif r < 0.35:
                lines.append(f"{rng.choice(PLACES)}\tB-LOC")
            else:
                lines.append(f"{rng.choice(NER_FILLER)}\tO")
        lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def word_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_nodrop_dir: Path) -> Run:
    """A tiny BERT classifier whose label one word decides ('good' -> pos, 'bad' -> neg)."""
    folder = tmp_path_factory.mktemp("explain-cls")
    data = write_csv(folder / "d.csv", [{"text": t, "label": y} for t, y in decided_texts(240, seed=0)])
    return lmtune.train({
        "task": "classification", "model": str(tiny_bert_nodrop_dir), "baselines": [],
        "data": {"train": str(data), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32"},
        "output_dir": str(folder / "run"),
    }, show_progress=False)


@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_nodrop_dir: Path) -> Run:
    """A tiny BERT tagger of names (PER) and places (LOC) among filler words."""
    folder = tmp_path_factory.mktemp("explain-ner")
    (folder / "train.conll").write_text(tagged_conll(300), encoding="utf-8")
    return lmtune.train({
        "task": "token_classification", "model": str(tiny_bert_nodrop_dir),
        "data": {"train": str(folder / "train.conll"), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32"},
        "output_dir": str(folder / "run"),
    }, show_progress=False)


def test_the_deciding_word_carries_the_label(word_run: Run) -> None:
    assert word_run.metrics["test"]["accuracy"] >= 0.95
    held_out = decided_texts(20, seed=1)
    rows = word_run.explain([t for t, _ in held_out])
    top_is_decider = 0
    for (text, label), row in zip(held_out, rows, strict=True):
        assert row["label"] == label and row["explained"]["label"] == label
        words = row["word_attributions"]
        assert [w["word"] for w in words] == text.split()
        for w in words:
            assert text[w["start"]:w["end"]] == w["word"] and -1.0 <= w["score"] <= 1.0
        decider = next(w for w in words if w["word"] in ("good", "bad"))
        assert decider["score"] > 0  # evidence for the predicted label
        top_is_decider += max(words, key=lambda w: w["score"])["word"] == decider["word"]
        assert row["explained"]["score_change"] > 0  # the text moves the label's log-odds up from the baseline
    assert top_is_decider >= 18, top_is_decider

    # Explained towards the other label, the same word is evidence against it.
    [against] = word_run.explain("the film was good", label="neg")
    assert against["label"] == "pos" and against["explained"]["label"] == "neg"
    good = next(w for w in against["word_attributions"] if w["word"] == "good")
    assert good["score"] == pytest.approx(-1.0) and against["explained"]["score_change"] < 0
    with pytest.raises(DataError, match="label 'meh' is not one the model knows"):
        word_run.explain("the film was good", label="meh")


def test_attributions_add_up_to_the_score_change(word_run: Run) -> None:
    """Completeness, checked against the model itself: the raw attributions sum to score(text) - score(baseline),
    both computed here by plain forward passes, within the convergence delta Captum reports."""
    p = word_run.predictor()
    model, tok = p.model, p.tokenizer
    k = p.labels.index("pos")
    for text in ("a very good plot", "the cast was bad and the script", "good"):
        enc = tok(text, return_tensors="pt", return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask")
        result = explain.integrated_gradients(model, dict(enc), lambda z: explain.log_odds(z, k), keep=special,
                                              reference_id=tok.pad_token_id, n_steps=32)
        baseline = enc["input_ids"].where(special.bool(), torch.full_like(enc["input_ids"], tok.pad_token_id))
        with torch.no_grad():
            f_x = float(explain.log_odds(model(**enc).logits, k)[0])
            f_b = float(explain.log_odds(model(**{**enc, "input_ids": baseline}).logits, k)[0])
        assert result.change == pytest.approx(f_x - f_b, abs=1e-4)
        assert float(result.scores.sum()) == pytest.approx(f_x - f_b, abs=1e-2 * abs(f_x - f_b) + 1e-4)
        assert abs(result.delta) <= 1e-2 * abs(f_x - f_b) + 1e-4
        assert np.all(result.scores[special[0].bool().numpy()] == 0)  # [CLS] and [SEP] equal their baseline


def test_each_entity_is_explained_by_its_own_words(tagger_run: Run) -> None:
    assert tagger_run.metrics["test"]["f1"] >= 0.9
    text = "yesterday  Okonkwo visited Zanzibar with Alice"
    [row] = tagger_run.explain([text])
    found = [(e["entity"], e["text"]) for e in row["entities"]]
    assert found == [("PER", "Okonkwo"), ("LOC", "Zanzibar"), ("PER", "Alice")]
    for e in row["entities"]:
        words = e["word_attributions"]
        assert [w["word"] for w in words] == text.split()
        top = max(words, key=lambda w: abs(w["score"]))
        assert (top["start"], top["end"]) == (e["start"], e["end"]) and top["score"] == pytest.approx(1.0)
        others = [abs(w["score"]) for w in words if w is not top]
        assert max(others) < 0.5, (e["text"], words)
        assert e["explained"]["tags"] == [f"B-{e['entity']}"] and e["explained"]["score_change"] > 0
        assert abs(e["explained"]["convergence_delta"]) <= 1e-2 * e["explained"]["score_change"] + 1e-4
        tokens = e["attributions"]
        assert all(text[t["start"]:t["end"]] == t["token"] for t in tokens)
    with pytest.raises(DataError, match="a label to explain does not apply"):
        tagger_run.explain([text], label="PER")


def test_predict_explain_writes_the_attributions(word_run: Run, tagger_run: Run, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_csv(tmp_path / "in.csv", [{"id": 1, "text": "the plot was bad"}, {"id": 2, "text": "good film"}])
    out = tmp_path / "out.jsonl"
    code = run_cli(["predict", str(word_run.path), "-i", str(source), "-o", str(out), "--explain",
                    "--explain-steps", "16", "--no-progress"], monkeypatch)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["neg", "pos"] and [r["id"] for r in rows] == ["1", "2"]
    for r, decider in zip(rows, ("bad", "good"), strict=True):
        assert max(r["word_attributions"], key=lambda w: w["score"])["word"] == decider
        assert {"token", "start", "end", "score"} <= set(r["attributions"][0])
    csv_out = tmp_path / "out.csv"
    assert run_cli(["predict", str(word_run.path), "-i", str(source), "-o", str(csv_out), "--explain",
                    "--explain-label", "pos", "--no-progress"], monkeypatch) == 0
    header = csv_out.read_text().splitlines()[0].split(",")
    assert header[-3:] == ["attributions", "word_attributions", "explained"]

    ner_out = tmp_path / "ner.jsonl"
    ner_in = write_csv(tmp_path / "ner.csv", [{"text": "Alice went to Paris"}])
    assert run_cli(["predict", str(tagger_run.path), "-i", str(ner_in), "-o", str(ner_out), "--explain",
                    "--no-progress"], monkeypatch) == 0
    [ner_row] = [json.loads(line) for line in ner_out.read_text().splitlines()]
    assert [e["text"] for e in ner_row["entities"]] == ["Alice", "Paris"]
    assert all("word_attributions" in e for e in ner_row["entities"])


def test_a_run_that_cannot_explain_says_so(tmp_path: Path, tiny_bert_nodrop_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                          word_run: Run) -> None:
    # A question-answering model folder: its predictor answers, but gives no attributions.
    folder = tmp_path / "qa"
    tok = AutoTokenizer.from_pretrained(tiny_bert_nodrop_dir)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertForQuestionAnswering(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "lmtune.json").write_text(json.dumps({"task": "question_answering", "max_length": 64}))
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"question": "who?", "context": "Ann wrote it."}) + "\n")
    code = run_cli(["predict", str(folder), "-i", str(source), "-o", str(tmp_path / "o.jsonl"), "--explain"],
                   monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "cannot explain its predictions" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(RunError, match="apply with --explain"):
        word_run.predict_file(source, tmp_path / "o.jsonl", explain_label="pos")


def test_the_server_explains_a_classified_text(word_run: Run) -> None:
    options = ServeOptions(max_explain_items=2, max_explain_steps=16, explain_steps=8)
    with running(create_app(word_run, options)) as base:
        status, body = get(base, "/v1/run")
        view = json.loads(body)
        assert status == 200 and view["explain"] is True and view["limits"]["explain_items"] == 2
        status, answer = post(base, "/v1/classify", {"input": ["a really bad script", "good"], "explain": True})
        assert status == 200, answer
        first, second = answer["data"]
        assert first["label"] == "neg" and first["explained"]["label"] == "neg"
        assert max(first["word_attributions"], key=lambda w: w["score"])["word"] == "bad"
        assert second["word_attributions"] == [{"word": "good", "start": 0, "end": 4, "score": 1.0}]
        status, plain = post(base, "/v1/classify", {"input": "a really bad script"})
        assert status == 200 and "attributions" not in plain["data"][0]
        for body, param in [({"input": ["a", "b", "c"], "explain": True}, "input"),
                            ({"input": "a", "explain": True, "explain_steps": 17}, "explain_steps"),
                            ({"input": "a", "explain": True, "explain_label": "meh"}, "explain_label"),
                            ({"input": "a", "explain_label": "pos"}, "explain_label")]:
            status, error = post(base, "/v1/classify", body)
            assert status == 400 and assert_openai_error(error)["param"] == param, error
        status, page = get(base, "/static/app.js")
        assert status == 200 and b"word_attributions" in page


def test_the_report_shows_explained_examples(word_run: Run, tagger_run: Run) -> None:
    for run in (word_run, tagger_run):
        report = (run.path / "report.md").read_text()
        assert "### Token attributions (test)" in report and "plots/attributions_test.png" in report
        assert "No token attributions" not in report
        assert (run.path / "plots" / "attributions_test.png").stat().st_size > 1000


def test_steps_are_checked() -> None:
    with pytest.raises(ModelError, match="from 1 to 1024"):
        explain.check_steps(0)
    assert explain.check_steps(explain.DEFAULT_STEPS) == 32
