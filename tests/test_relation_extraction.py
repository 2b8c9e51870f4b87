"""Relation extraction: marked pairs, the entity-start model, relation F1 without the no-relation class,
character offsets of predicted triples, the saved folder, the NER -> relation pipeline, and bad inputs."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import minilm_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

import lmtune
from lmtune.cli import app
from lmtune.errors import DataError, RunError
from lmtune.tasks.relation_extraction import records as rec
from lmtune.tasks.relation_extraction.encoding import add_marker_tokens, encode_pairs, marker_ids
from lmtune.tasks.relation_extraction.metrics import relation_metrics
from lmtune.tasks.relation_extraction.model import RelationModel
from lmtune.workflows.relation_pipeline import extract_relations, split_sentences
from lmtune.workflows.run import Run

PEOPLE = ["Alice", "Okonkwo", "Dmitri", "Eleanor", "Bob", "Priya"]
ORGS = ["Acme", "Globex", "Initech", "Umbrella"]
PLACES = ["Paris", "Kyoto", "Lima", "Zanzibar"]


def _document(rng: random.Random) -> dict[str, Any]:
    """Three entities, their relations decided by the words between them (learnable by a tiny model)."""
    p, o, loc = rng.choice(PEOPLE), rng.choice(ORGS), rng.choice(PLACES)
    kind = rng.randrange(3)
    if kind == 0:
        text, ents, rels = f"{p} works for {o} in {loc} .", [(p, "PER"), (o, "ORG"), (loc, "LOC")], \
            [(0, 1, "works_for"), (1, 2, "based_in")]
    elif kind == 1:
        text, ents, rels = f"{p} lives in {loc} and met {o} .", [(p, "PER"), (loc, "LOC"), (o, "ORG")], \
            [(0, 1, "lives_in")]
    else:
        text, ents, rels = f"{o} is based in {loc} , said {p} .", [(o, "ORG"), (loc, "LOC"), (p, "PER")], \
            [(0, 1, "based_in")]
    entities, at = [], 0
    for mention, kind_ in ents:
        start = text.index(mention, at)
        entities.append({"start": start, "end": start + len(mention), "type": kind_})
        at = start + len(mention)
    return {"text": text, "entities": entities,
            "relations": [{"head": h, "tail": t, "relation": r} for h, t, r in rels]}


def write_documents(path: Path, n: int = 80) -> Path:
    rng = random.Random(0)
    path.write_text("".join(json.dumps(_document(rng)) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def _config(tmp: Path, model: Path, train: Path, **data: Any) -> dict[str, Any]:
    return {"task": "relation_extraction", "model": str(model),
            "data": {"train": str(train), "max_length": 32, **data},
            "train": {"max_steps": 40, "batch_size": 16, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every": 5,
                      "precision": "fp32", "eval_every": 20},
            "output_dir": str(tmp / "run")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert_nodrop_dir: Path) -> Run:
    tmp = tmp_path_factory.mktemp("relation")
    path = tmp / "config.yaml"
    path.write_text(json.dumps(_config(tmp, tiny_bert_nodrop_dir, write_documents(tmp / "docs.jsonl"))))
    return lmtune.train(path, show_progress=False)


# ------------------------------------------------------------------------------------------ markers
def test_markers_are_single_tokens_and_survive_truncation() -> None:
    tok = AutoTokenizer.from_pretrained(minilm_path())
    added = add_marker_tokens(tok, ["PER", "ORG"])
    assert added == ["[E1:PER]", "[/E1:PER]", "[E2:PER]", "[/E2:PER]", "[E1:ORG]", "[/E1:ORG]", "[E2:ORG]",
                     "[/E2:ORG]"]
    assert add_marker_tokens(tok, ["PER", "ORG"]) == []  # idempotent: a saved tokenizer keeps them
    text = "filler " * 40 + "Ada works at Acme" + " filler" * 40
    start = text.index("Ada")
    head, tail = (start, start + 3, "PER"), (text.index("Acme"), text.index("Acme") + 4, "ORG")
    far = (len(text) - 6, len(text), "ORG")  # "filler" at the very end: 80 words from the head
    ids, windowed = encode_pairs(tok, [(text, head, tail), (text, head, far)], 24, ["PER", "ORG"])
    assert windowed == 1 and ids[1] is None  # the far pair cannot keep both markers: skipped, not cut
    kept = ids[0]
    assert kept is not None and len(kept) == 24 and kept[0] == tok.cls_token_id and kept[-1] == tok.sep_token_id
    tokens = tok.convert_ids_to_tokens(kept)
    for marker in ("[E1:PER]", "[/E1:PER]", "[E2:ORG]", "[/E2:ORG]"):
        assert tokens.count(marker) == 1, tokens
    heads, tails, _ = marker_ids(tok, ["PER", "ORG"])
    assert tok.convert_tokens_to_ids("[E1:PER]") in heads and tok.convert_tokens_to_ids("[E2:ORG]") in tails


def test_markers_cut_are_skipped_and_counted(tmp_path: Path, tiny_bert_nodrop_dir: Path) -> None:
    rows = [{"text": "Ada works at Acme .", "head": {"start": 0, "end": 3, "type": "PER"},
             "tail": {"start": 13, "end": 17, "type": "ORG"}, "relation": r} for r in ("works_for", "no_relation")] * 6
    long = "Ada " + "and more words " * 30 + "Acme"
    rows.append({"text": long, "head": {"start": 0, "end": 3, "type": "PER"},
                 "tail": {"start": len(long) - 4, "end": len(long), "type": "ORG"}, "relation": "works_for"})
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = lmtune.load_config(_config(tmp_path, tiny_bert_nodrop_dir, train, validation_size=0.2, test_size=0.2,
                                     deduplicate=False, split_seed=3))
    task = lmtune.tasks.get_task("relation_extraction")(cfg)
    data = task.prepare(task.load_tokenizer(task.model_path()))
    skipped = sum(data.info[s].get("skipped_markers_cut", 0) for s in ("train", "validation", "test"))
    assert skipped == 1
    assert sum(data.info[s]["examples"] for s in ("train", "validation", "test")) == len(rows) - 1


# ------------------------------------------------------------------------------------------ metrics
def test_micro_and_macro_f1_leave_no_relation_out() -> None:
    labels = ["no_relation", "works_for", "lives_in"]
    gold = ["works_for", "works_for", "lives_in", "no_relation", "no_relation", "lives_in"]
    pred = ["works_for", "no_relation", "lives_in", "works_for", "no_relation", "works_for"]
    m = relation_metrics(gold, pred, labels, "no_relation")
    # works_for: tp 1, predicted 3, gold 2 -> P 1/3, R 1/2, F1 0.4; lives_in: tp 1, predicted 1, gold 2 -> F1 2/3
    assert m["per_type"]["works_for"]["f1"] == pytest.approx(0.4)
    assert m["per_type"]["lives_in"]["f1"] == pytest.approx(2 / 3)
    assert "no_relation" not in m["per_type"]
    assert m["micro_precision"] == pytest.approx(2 / 4) and m["micro_recall"] == pytest.approx(2 / 4)
    assert m["micro_f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((0.4 + 2 / 3) / 2)
    # Counting the no-relation class would give 3/6 correct: accuracy is reported, not used as F1.
    assert m["accuracy"] == pytest.approx(3 / 6)
    everything_none = relation_metrics(gold, ["no_relation"] * 6, labels, "no_relation")
    assert everything_none["micro_f1"] == 0.0 and everything_none["accuracy"] == pytest.approx(2 / 6)


# ------------------------------------------------------------------------------------------ training
def test_training_lowers_loss_and_raises_f1(trained: Run) -> None:
    log = [json.loads(line) for line in (trained.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r.get("split") == "train" and "loss" in r]
    assert losses[-1] < losses[0] / 2, losses
    metrics = json.loads((trained.path / "metrics.json").read_text())
    start, end = metrics["starting_point"]["test"], metrics["test"]
    assert end["micro_f1"] > start["micro_f1"] + 0.5 and end["micro_f1"] >= 0.9, (start, end)
    assert set(end["per_type"]) == {"based_in", "lives_in", "works_for"}
    assert end["no_relation_label"] == "no_relation"
    baselines = json.loads((trained.path / "baselines.json").read_text())
    assert baselines["majority"]["metrics"]["test"]["micro_f1"] == 0.0  # always "no_relation"
    report = (trained.path / "report.md").read_text()
    assert "Per relation type" in report


def test_predictor_gives_triples_with_character_offsets(trained: Run) -> None:
    text = "Priya works for Globex in Kyoto ."
    ents = [{"start": 0, "end": 5, "type": "PER"}, {"start": 16, "end": 22, "type": "ORG"},
            {"start": 26, "end": 31, "type": "LOC"}]
    pair, document = trained.predict([{"text": text, "head": ents[0], "tail": ents[1]},
                                      {"text": text, "entities": ents}])
    assert pair["relation"] == "works_for" and 0 < pair["score"] <= 1
    assert pair["head"] == {"text": "Priya", "start": 0, "end": 5, "type": "PER"}
    assert pair["tail"] == {"text": "Globex", "start": 16, "end": 22, "type": "ORG"}
    found = {(t["head"]["text"], t["relation"], t["tail"]["text"]) for t in document["relations"]}
    assert ("Priya", "works_for", "Globex") in found and ("Globex", "based_in", "Kyoto") in found
    for t in document["relations"]:
        for end in ("head", "tail"):
            assert text[t[end]["start"]:t[end]["end"]] == t[end]["text"]


def test_saved_folder_reloads_with_equal_logits(trained: Run) -> None:
    tok = AutoTokenizer.from_pretrained(trained.model_dir)
    enc = tok(["[E1:PER] Alice [/E1:PER] works for [E2:ORG] Acme [/E2:ORG] .", "plain text without markers"],
              return_tensors="pt", padding=True)
    a = RelationModel.from_pretrained(trained.model_dir).eval()
    b = AutoModelForSequenceClassification.from_pretrained(trained.model_dir).eval()
    assert isinstance(b, RelationModel)
    with torch.no_grad():
        la, lb = a(**enc).logits, b(**enc).logits
    assert la.shape == (2, 4) and torch.equal(la, lb)
    assert (trained.model_dir / "model.safetensors").is_file()
    meta = json.loads((trained.model_dir / "lmtune.json").read_text())
    assert meta["no_relation_label"] == "no_relation" and meta["entity_types"] == ["LOC", "ORG", "PER"]


# ------------------------------------------------------------------------------------------ NER -> relations
MISC = ["Moon", "Olympics", "Euro"]  # a type the NER run tags and the relation model has no markers for
PLAIN = ["nothing", "to", "see", "here", "the", "meeting", "was", "short", "it", "rained", "all", "day"]


def _tagged(text: str, entities: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The text's whitespace words with BIO tags from the entities' character spans (one word each here)."""
    types, words, at = {e["start"]: e["type"] for e in entities}, [], 0
    for word in text.split():
        at = text.index(word, at)
        words.append((word, at))
        at += len(word)
    return {"tokens": [w for w, _ in words], "tags": [f"B-{types[s]}" if s in types else "O" for _, s in words]}


def write_ner_sentences(path: Path) -> Path:
    """The relation documents' sentences tagged PER / ORG / LOC, sentences with a MISC word or no entity, and
    pairs of sentences in one row (the pipeline tags whole texts of several sentences)."""
    docs = [json.loads(line) for line in write_documents(path.with_name("ner_docs.jsonl"), 80).read_text().splitlines()]
    rows = [_tagged(d["text"], d["entities"]) for d in docs]
    rng = random.Random(1)
    for i in range(24):
        rows.append({"tokens": [rng.choice(PEOPLE), "saw", "the", MISC[i % 3], "in", rng.choice(PLACES), "."],
                     "tags": ["B-PER", "O", "O", "B-MISC", "O", "B-LOC", "O"]})
    for _ in range(16):  # sentences with no entity at all
        words = [*rng.sample(PLAIN, rng.randint(3, 6)), "."]
        rows.append({"tokens": words, "tags": ["O"] * len(words)})
    rows += [{"tokens": a["tokens"] + b["tokens"], "tags": a["tags"] + b["tags"]}
             for a, b in zip(rows[0:80:2], rows[1:80:2], strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ner(tmp_path_factory: pytest.TempPathFactory, tiny_bert_nodrop_dir: Path) -> Run:
    """A real token-classification run on the same sentences: it memorises their names' types."""
    tmp = tmp_path_factory.mktemp("relation-ner")
    return lmtune.train({
        "task": "token_classification", "model": str(tiny_bert_nodrop_dir),
        "data": {"train": str(write_ner_sentences(tmp / "ner.jsonl")), "max_length": 32, "deduplicate": False},
        "train": {"epochs": 8, "batch_size": 16, "learning_rate": 5e-3, "precision": "fp32", "log_every": 5},
        "output_dir": str(tmp / "run"),
    }, show_progress=False)


def _triples(result: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(t["head"]["text"], t["relation"], t["tail"]["text"]) for t in result["relations"]}


def test_pipeline_tags_then_relates_every_pair_of_a_sentence(trained: Run, ner: Run) -> None:
    text = "Alice works for Acme in Paris . Bob lives in Kyoto and met Moon ."
    sentences = split_sentences(text)
    assert [text[s:e] for s, e in sentences] == ["Alice works for Acme in Paris .", "Bob lives in Kyoto and met Moon ."]
    [tagged] = ner.predict([text])  # the NER run itself finds the entities, MISC among them
    assert [(e["entity"], e["text"]) for e in tagged["entities"]] == [
        ("PER", "Alice"), ("ORG", "Acme"), ("LOC", "Paris"), ("PER", "Bob"), ("LOC", "Kyoto"), ("MISC", "Moon")]
    (result,) = extract_relations(trained, ner, [text])
    assert result["entities"] == tagged["entities"]
    assert result["skipped_entities"] == 1  # MISC: a type the relation model has no markers for
    triples = _triples(result)
    assert {("Alice", "works_for", "Acme"), ("Bob", "lives_in", "Kyoto")} <= triples, triples
    assert not any("Moon" in (h, t) for h, _, t in triples)
    for t in result["relations"]:  # offsets index the whole text, the second sentence's shifted back
        for end in ("head", "tail"):
            assert text[t[end]["start"]:t[end]["end"]] == t[end]["text"]
        assert 0 < t["score"] <= 1 and t["relation"] != "no_relation"
        head_in, tail_in = ([s <= t[end]["start"] < e for s, e in sentences] for end in ("head", "tail"))
        assert head_in == tail_in, t  # both ends in one sentence
    bob = next(t for t in result["relations"] if t["head"]["text"] == "Bob")
    assert (bob["head"]["start"], bob["tail"]["start"]) == (text.index("Bob"), text.index("Kyoto"))
    # A pair split by a sentence end: related when read as one span, kept apart by the boundary.
    cut = "Alice works for . Acme is based in Paris ."
    (whole,), (split,) = (extract_relations(trained, ner, [cut], sentences=s) for s in (False, True))
    assert ("Alice", "works_for", "Acme") in _triples(whole), _triples(whole)
    assert _triples(split) == {("Acme", "based_in", "Paris")}, _triples(split)


def test_pipeline_through_the_cli(trained: Run, ner: Run, tmp_path: Path) -> None:
    texts = ["Priya works for Globex in Kyoto .", "nothing to see here .", "Okonkwo saw the Euro in Lima ."]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["predict", str(trained.path), "--ner", str(ner.path), "-i", str(source),
                                      "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "wrote 3 predictions" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["text"]) for r in rows] == list(enumerate(texts))  # input columns kept, in order
    first = rows[0]
    assert [(e["entity"], e["text"]) for e in first["entities"]] == [("PER", "Priya"), ("ORG", "Globex"),
                                                                     ("LOC", "Kyoto")]
    assert {("Priya", "works_for", "Globex"), ("Globex", "based_in", "Kyoto")} <= _triples(first), _triples(first)
    for t in first["relations"]:
        for end in ("head", "tail"):
            assert texts[0][t[end]["start"]:t[end]["end"]] == t[end]["text"]
    assert rows[1]["entities"] == [] and rows[1]["relations"] == [] and rows[1]["skipped_entities"] == 0
    # PER and LOC remain after MISC is skipped: one pair, one sentence.
    assert rows[2]["skipped_entities"] == 1 and [e["entity"] for e in rows[2]["entities"]] == ["PER", "MISC", "LOC"]
    assert all("Euro" not in (t["head"]["text"], t["tail"]["text"]) for t in rows[2]["relations"])
    # CSV: the lists as JSON cells
    result = CliRunner().invoke(app, ["predict", str(trained.path), "--ner", str(ner.path), "-i", str(source),
                                      "-o", str(tmp_path / "out.csv")])
    assert result.exit_code == 0, result.output
    cells = list(csv.DictReader((tmp_path / "out.csv").open(encoding="utf-8")))
    assert [(t["head"]["text"], t["relation"], t["tail"]["text"]) for t in json.loads(cells[0]["relations"])] == \
        [(t["head"]["text"], t["relation"], t["tail"]["text"]) for t in first["relations"]]
    # An empty text is a DataError naming its line; runs given the wrong way round are an lmtune error (a
    # message, not a traceback).
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "Alice works for Acme ."}) + "\n" + json.dumps({"text": " "}) + "\n")
    result = CliRunner().invoke(app, ["predict", str(trained.path), "--ner", str(ner.path), "-i", str(bad),
                                      "-o", str(tmp_path / "bad_out.jsonl")])
    assert isinstance(result.exception, DataError) and "empty text" in result.exception.message
    assert result.exception.line == 2 and str(bad) in str(result.exception.file)
    assert not (tmp_path / "bad_out.jsonl").exists()
    result = CliRunner().invoke(app, ["predict", str(ner.path), "--ner", str(trained.path), "-i", str(source),
                                      "-o", str(tmp_path / "swapped.jsonl")])
    assert isinstance(result.exception, RunError) and "not a relation model run" in result.exception.message
    assert not (tmp_path / "swapped.jsonl").exists()


# ------------------------------------------------------------------------------------------ bad inputs
PAIR = {"text": "Ada works at Acme .", "head": {"start": 0, "end": 3, "type": "PER"},
        "tail": {"start": 13, "end": 17, "type": "ORG"}, "relation": "works_for"}
BAD_ROWS = [
    ("span_out_of_range", {**PAIR, "tail": {"start": 13, "end": 40, "type": "ORG"}}, "outside the text", "tail"),
    ("empty_span", {**PAIR, "head": {"start": 3, "end": 3, "type": "PER"}}, "is empty", "head"),
    ("overlap", {**PAIR, "tail": {"start": 1, "end": 8, "type": "ORG"}}, "overlap", "tail"),
    ("no_offsets", {**PAIR, "head": {"type": "PER"}}, "integer character offsets", "head"),
    ("bad_type", {**PAIR, "head": {"start": 0, "end": 3, "type": "A B"}}, "entity type must be", "head"),
    ("empty_relation", {**PAIR, "relation": ""}, "empty relation", "relation"),
    ("inline_empty", {"text": "<e1></e1> works at <e2>Acme</e2>", "relation": "x"}, "empty entity", "text"),
    ("inline_overlap", {"text": "<e1>Ada <e2>works</e1> at</e2>", "relation": "x"}, "overlap", "text"),
    ("inline_missing", {"text": "<e1>Ada</e1> works at Acme", "relation": "x"}, "exactly one", "text"),
    ("doc_bad_ref", {"text": "Ada at Acme", "entities": [{"start": 0, "end": 3, "type": "PER"}],
                     "relations": [{"head": 0, "tail": 5, "relation": "x"}]}, "not an entity", "relations"),
]


@pytest.mark.parametrize(("row", "message", "field"), [b[1:] for b in BAD_ROWS], ids=[b[0] for b in BAD_ROWS])
def test_bad_rows_are_data_errors_with_file_and_line(row: dict[str, Any], message: str, field: str, tmp_path: Path,
                                                     tiny_bert_nodrop_dir: Path) -> None:
    good = {k: v for k, v in PAIR.items()} if "entities" not in row else None
    lines = [good] * 3 if good and ("head" in row or "tail" in row) else []
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*lines, row]))
    cfg = lmtune.load_config(_config(tmp_path, tiny_bert_nodrop_dir, path))
    task = lmtune.tasks.get_task("relation_extraction")(cfg)
    with pytest.raises(DataError) as err:
        task.prepare(task.load_tokenizer(task.model_path()))
    assert message in err.value.message and err.value.line == len(lines) + 1 and err.value.field == field
    assert str(path) in str(err.value.file)


def test_missing_column_and_unknown_types_are_data_errors(tmp_path: Path, tiny_bert_nodrop_dir: Path) -> None:
    path = tmp_path / "nolabel.jsonl"
    path.write_text(json.dumps({"text": "<e1>a</e1> <e2>b</e2>"}) + "\n")
    task = lmtune.tasks.get_task("relation_extraction")(lmtune.load_config(_config(tmp_path, tiny_bert_nodrop_dir,
                                                                                    path)))
    with pytest.raises(DataError, match="needs a 'label' column"):
        task.prepare(task.load_tokenizer(task.model_path()))
    train = write_documents(tmp_path / "docs.jsonl", 30)
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": "Ada at Acme", "entities": [{"start": 0, "end": 3, "type": "ALIEN"},
                                                                   {"start": 7, "end": 11, "type": "ORG"}],
                                "relations": []}) + "\n")
    cfg = lmtune.load_config(_config(tmp_path, tiny_bert_nodrop_dir, train, test=str(test)))
    task = lmtune.tasks.get_task("relation_extraction")(cfg)
    with pytest.raises(DataError, match="entity type 'ALIEN'") as err:
        task.prepare(task.load_tokenizer(task.model_path()))
    assert err.value.line == 1 and str(test) in str(err.value.file)


def test_predictor_refuses_bad_items(trained: Run) -> None:
    predictor = trained.predictor()
    assert predictor.check_item({"text": "Ada", "head": {"start": 0, "end": 9, "type": "PER"},
                                 "tail": {"start": 0, "end": 1, "type": "ORG"}}) is not None
    assert "not one the model knows" in (predictor.check_item("<e1>Ada</e1> met <e2>Bo</e2>") or "")
    assert predictor.check_item(42) is not None
    with pytest.raises(DataError, match="item 1"):
        trained.predict([{"text": "Ada and Bo", "entities": [{"start": 0, "end": 3, "type": "GHOST"},
                                                              {"start": 8, "end": 10, "type": "PER"}]}])


def test_inline_markers_read_as_spans() -> None:
    text, head, tail = rec.parse_inline("The <e1>child</e1> was put in the <e2>cradle</e2> .", "f", 1, "text")
    assert text == "The child was put in the cradle ." and text[head[0]:head[1]] == "child"
    assert text[tail[0]:tail[1]] == "cradle" and head[2] == tail[2] == rec.UNTYPED
    assert rec.mark(text, head, tail) == ("The  [E1:ENTITY] child [/E1:ENTITY]  was put in the  [E2:ENTITY] "
                                          "cradle [/E2:ENTITY]  .")
