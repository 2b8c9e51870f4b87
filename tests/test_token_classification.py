"""Token classification (NER): tag schemes, CoNLL reading, spans, sub-token alignment, bad input, a tiny
BERT that learns tags, and prediction with character offsets through the Run API."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

import lmtune
from lmtune.data import tagging
from lmtune.data.conll import parse_conll
from lmtune.data.peoples_daily import paragraph_words, sentence_records
from lmtune.errors import DataError
from lmtune.tasks.token_classification.task import TokenClassificationTask, entity_metrics

# ------------------------------------------------------------------------------------------ tag schemes
SCHEME_CASES = [  # (BIO tags, the same entities in BIOES)
    (["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "E-PER", "O", "S-LOC"]),
    (["B-PER", "B-PER", "I-PER", "I-PER"], ["S-PER", "B-PER", "I-PER", "E-PER"]),
    (["O", "O"], ["O", "O"]),
    (["B-ORG", "I-ORG", "I-ORG", "B-LOC", "I-LOC"], ["B-ORG", "I-ORG", "E-ORG", "B-LOC", "E-LOC"]),
]


@pytest.mark.parametrize(("bio", "bioes"), SCHEME_CASES)
def test_bio_and_bioes_convert_both_ways(bio: list[str], bioes: list[str]) -> None:
    assert tagging.convert_tags(bio, "bio", "bioes") == bioes
    assert tagging.convert_tags(bioes, "bioes", "bio") == bio
    assert tagging.detect_scheme(bioes) == ("bioes" if any(t[:2] in ("E-", "S-") for t in bioes) else "bio")


def test_iob1_entities_are_read_as_new_entities() -> None:
    spans, repaired = tagging.tags_to_spans(["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], "bio")
    assert spans == [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4)] and repaired == 2
    assert tagging.convert_tags(["O", "I-MISC"], "bio", "bio") == ["O", "B-MISC"]


BAD_TAGS = [  # (tags, scheme, message part, word at fault)
    (["O", "X-PER"], "bio", "'X-PER' is not a BIO tag", 1),
    (["B-PER", "I-"], "bio", "'I-' is not a BIO tag", 1),
    (["PER"], "bio", "'PER' is not a BIO tag", 0),
    (["O", "E-PER"], "bio", "'E-PER' is not a BIO tag", 1),
    (["O", "B-PER"], "bioes", "never ends", 1),
    (["B-PER", "O"], "bioes", "not closed", 1),
    (["O", "I-PER", "E-PER"], "bioes", "does not continue", 1),
    (["B-PER", "E-LOC"], "bioes", "does not continue", 1),
    (["B-PER", "S-LOC"], "bioes", "not closed", 1),
]


@pytest.mark.parametrize(("tags", "scheme", "message", "word"), BAD_TAGS)
def test_tags_outside_the_scheme_are_errors(tags: list[str], scheme: str, message: str, word: int) -> None:
    with pytest.raises(tagging.TagError, match=message) as err:
        tagging.tags_to_spans(tags, scheme)
    assert err.value.word == word


def test_label_set_and_continuation() -> None:
    assert tagging.label_set(["LOC", "PER"], "bio") == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert len(tagging.label_set(["PER"], "bioes")) == 5
    assert tagging.continuation_tag("B-PER") == "I-PER" and tagging.continuation_tag("O") == "O"
    assert tagging.continuation_tag("S-PER") == "I-PER"


# ------------------------------------------------------------------------------------------ words and spans
def test_word_splits_keep_offsets() -> None:
    text = "Dr. Smith  visited Paris, France."
    for how in ("whitespace", "punctuation", "chars"):
        for word, start, end in tagging.split_words(text, how):
            assert text[start:end] == word
    assert [w for w, _, _ in tagging.split_words(text, "punctuation")] == [
        "Dr", ".", "Smith", "visited", "Paris", ",", "France", "."]
    assert [w for w, _, _ in tagging.split_words("江泽民在北京", "punctuation")] == list("江泽民在北京")
    assert tagging.guess_word_split([list("江泽民在北京")]) == "chars"
    assert tagging.guess_word_split([["Paris", ",", "France"]]) == "punctuation"
    assert tagging.guess_word_split([["Paris,", "France"]]) == "whitespace"


def test_char_spans_become_word_tags() -> None:
    text = "Alice Smith flew to New York."
    words = tagging.split_words(text, "punctuation")
    spans = tagging.char_spans_to_word_spans(
        [{"start": 20, "end": 28, "label": "LOC"}, {"start": 0, "end": 11, "label": "PER"}], words, text)
    assert spans == [("PER", 0, 1), ("LOC", 4, 5)]
    assert tagging.spans_to_tags(spans, len(words), "bio") == ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]


BAD_SPANS = [
    ([{"start": 0, "end": 40, "label": "PER"}], "falls outside the text"),
    ([{"start": -1, "end": 3, "label": "PER"}], "falls outside the text"),
    ([{"start": 3, "end": 3, "label": "PER"}], "is empty"),
    ([{"start": 0, "end": 3, "label": "PER"}], "cuts through the word 'Alice'"),
    ([{"start": 0, "end": 11, "label": "PER"}, {"start": 6, "end": 16, "label": "PER"}], "overlap"),
    ([{"start": 0, "end": 5}], "expected an object with start, end and label"),
    ([{"start": 0, "end": 5, "label": ""}], "must be an entity type"),
    ([{"start": "0", "end": 5, "label": "PER"}], "must be integers"),
]


@pytest.mark.parametrize(("spans", "message"), BAD_SPANS)
def test_bad_spans_are_errors(spans: list[dict[str, Any]], message: str) -> None:
    text = "Alice Smith flew to New York."
    with pytest.raises(ValueError, match=message):
        tagging.char_spans_to_word_spans(spans, tagging.split_words(text, "punctuation"), text)


# ------------------------------------------------------------------------------------------ sub-token alignment
def test_alignment_first_subtoken_or_all(tiny_bert_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    words = ["Okonkwo", "visited", "Zanzibar"]
    enc = tok([words], is_split_into_words=True)
    ids = enc.word_ids(0)
    assert ids.count(0) > 1 and ids.count(2) > 1  # both names split into several sub-tokens
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    word_labels = [1, 0, 3]
    first, scored = tagging.align_labels(ids, word_labels, all_subtokens=False)
    assert first == scored
    assert [lab for lab in first if lab != -100] == word_labels  # one label per word, on its first sub-token
    assert first[0] == -100 and first[-1] == -100  # [CLS], [SEP]
    cont = [labels.index(tagging.continuation_tag(t)) for t in labels]
    every, scored_all = tagging.align_labels(ids, word_labels, all_subtokens=True, continuation=cont)
    assert scored_all == first  # evaluation still reads first sub-tokens only
    per_word = {w: [every[i] for i, x in enumerate(ids) if x == w] for w in range(3)}
    assert per_word[0] == [1] + [2] * (ids.count(0) - 1)  # B-PER, then I-PER
    assert per_word[2] == [3] + [4] * (ids.count(2) - 1)
    assert per_word[1] == [0] * ids.count(1)


# ------------------------------------------------------------------------------------------ CoNLL
CONLL = """-DOCSTART- -X- O

EU\tNNP\tB-ORG
rejects\tVBZ\tO
German\tJJ\tB-MISC

Peter NNP B-PER
Blackburn NNP I-PER


-DOCSTART- -X- O
BRUSSELS NNP B-LOC
"""


def test_conll_reader_sentences_and_lines() -> None:
    table = parse_conll(CONLL, "x.conll")
    assert [r["tokens"] for r in table.rows] == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert [r["tags"] for r in table.rows][1] == ["B-PER", "I-PER"]
    assert table.lines == [3, 7, 12]
    assert table.rows[0]["conll_columns"][1] == ["NNP", "VBZ", "JJ"]


def test_conll_reader_errors_name_the_line() -> None:
    with pytest.raises(DataError) as err:
        parse_conll("a\tO\nb\tNN\tO\n", "x.conll")
    assert err.value.line == 2 and "this line has 3 column(s)" in str(err.value)
    with pytest.raises(DataError, match="no sentences"):
        parse_conll("-DOCSTART- -X- O\n\n", "x.conll")


def _prepare(tmp_path: Path, tokenizer_dir: Path, train: str, name: str = "train.conll", **data: Any) -> Any:
    path = tmp_path / name
    path.write_text(train, encoding="utf-8")
    cfg = lmtune.load_config({"task": "token_classification", "model": str(tokenizer_dir),
                              "data": {"train": str(path), "validation": str(path), "test": str(path),
                                       "deduplicate": False, **data}})
    task = TokenClassificationTask(cfg)
    return task, task.prepare(task.load_tokenizer(tokenizer_dir))


BAD_FILES = [  # (file name, content, error part, line, extra data settings)
    ("t.conll", "a B-PER\nb X-PER\n", "'X-PER' is not a BIO tag", 2, {}),
    ("t.conll", "a O\n\nb O\nc I-\n", "'I-' is not a BIO tag", 4, {}),
    ("t.conll", "a B-PER\nb\n", "1 column(s)", 2, {}),
    ("t.conll", "a\nb\n", "one column", 1, {}),
    ("t.bio", "x S-PER\n\na B-PER\nb O\nc O\n", "not closed", 4, {"tag_scheme": "bioes", "entity_types": ["PER"]}),
    ("t.jsonl", '{"tokens": ["a"], "tags": ["B-PER"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n',
     "2 token(s) but 1 tag(s)", 2, {}),
    ("t.jsonl", '{"tokens": ["a"], "tags": ["B-PER"]}\n{"tokens": [], "tags": []}\n', "empty sentence", 2,
     {"empty_text": "error"}),
    ("t.jsonl", '{"tokens": ["a"], "tags": ["B-PER"]}\n{"tokens": ["a", 3], "tags": ["O", "O"]}\n', "item 2", 2, {}),
    ("t.jsonl", '{"text": "Ann met Bob", "spans": [{"start": 0, "end": 3, "label": "PER"}, '
     '{"start": 2, "end": 7, "label": "PER"}]}\n', "cuts through the word", 1, {}),
    ("t.jsonl", '{"text": "Ann met Bob", "spans": [{"start": 8, "end": 30, "label": "PER"}]}\n', "outside the text",
     1, {}),
    ("t.jsonl", '{"words": ["a"], "labels": ["O"]}\n', "needs a 'tokens' and a 'tags' column", None, {}),
    ("t.jsonl", '{"tokens": ["a", "b"], "tags": ["O", "O"]}\n', "no entities", None, {}),
    ("t.jsonl", '{"tokens": ["a"], "tags": ["B-PER"]}\n', "not listed in data.entity_types", None,
     {"entity_types": ["LOC"]}),
    # a held-out file that only repeats train: nothing left to score once duplicates go (was a TypeError)
    ("t.jsonl", '{"tokens": ["Ann"], "tags": ["B-PER"]}\n', "also occurs in the training data", None,
     {"deduplicate": True}),
]


@pytest.mark.parametrize(("name", "content", "message", "line", "data"), BAD_FILES,
                         ids=[f"{i}-{c[2][:20]}" for i, c in enumerate(BAD_FILES)])
def test_bad_input_is_a_data_error_with_its_line(tmp_path: Path, tiny_bert_dir: Path, name: str, content: str,
                                                 message: str, line: int | None, data: dict[str, Any]) -> None:
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, tiny_bert_dir, content, name, **data)
    assert message in str(err.value)
    assert err.value.line == line
    assert err.value.file is not None and str(err.value.file).endswith(name)


def test_held_out_split_emptied_by_deduplication_is_a_data_error(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """A train file repeating its few sentences: the split-off validation and test sentences all occur in train, so
    de-duplication leaves nothing to score (this used to crash the tokenizer on an empty split)."""
    rows = [{"tokens": ["Ann", "came"], "tags": ["B-PER", "O"]}, {"tokens": ["it", "rained"], "tags": ["O", "O"]}] * 20
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = TokenClassificationTask(lmtune.load_config({"task": "token_classification", "model": str(tiny_bert_dir),
                                                       "data": {"train": str(path)}}))
    with pytest.raises(DataError, match="sentence also occurs in the training data") as err:
        task.prepare(task.load_tokenizer(tiny_bert_dir))
    assert "de-duplicate the training file" in (err.value.hint or "") and str(err.value.file).endswith("t.jsonl")


def test_empty_sentences_are_skipped_and_counted(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rows = [{"tokens": ["Ann"], "tags": ["B-PER"]}, {"tokens": [], "tags": []}, {"tokens": ["x"], "tags": ["O"]}]
    _, data = _prepare(tmp_path, tiny_bert_dir, "".join(json.dumps(r) + "\n" for r in rows), "t.jsonl")
    assert data.info["train"]["skipped_empty"] == 1 and data.info["train"]["examples"] == 2


def test_bioes_file_trains_as_bio_when_asked_and_truncation_is_counted(tmp_path: Path, tiny_bert_dir: Path) -> None:
    long = ["w"] * 40
    content = "".join(json.dumps(r) + "\n" for r in [
        {"tokens": ["Ann", "Lee", "met", "Bob"], "tags": ["B-PER", "E-PER", "O", "S-PER"]},
        {"tokens": [*long, "Oslo"], "tags": ["O"] * 40 + ["S-LOC"]},
    ])
    _task, data = _prepare(tmp_path, tiny_bert_dir, content, "t.jsonl", tag_scheme="bio", max_length=16)
    assert data.info["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert data.info["train"]["input_scheme"] == "bioes" and data.info["tag_scheme"] == "bio"
    assert data.info["train"]["truncated"] == 1 and data.info["train"]["truncated_words"] == 41 - 14
    first = data.splits["train"][0]
    labels = data.info["labels"]
    assert [labels[i] for i in first["word_labels"] if i != -100] == ["B-PER", "I-PER", "O", "B-PER"]
    assert len(data.splits["train"][1]["input_ids"]) == 16


# ------------------------------------------------------------------------------------------ metrics
def test_entity_metrics_match_conlleval_rules() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O"]]
    m = entity_metrics(gold, pred, ["LOC", "ORG", "PER"])
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(0.8)
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["token_accuracy"] == pytest.approx(5 / 6) and m["num_entities"] == 3


def test_peoples_daily_conversion() -> None:
    words = paragraph_words("[中央/n 电视台/n]nt 记者/n 江/nr 泽民/nr 在/p 北京/ns 。/w 好/a")
    assert words[0] == ("中央电视台", "nt")
    records = list(sentence_records(words))
    assert len(records) == 2 and records[1] == {"tokens": ["好"], "tags": ["O"]}
    tags = dict(zip(records[0]["tokens"], records[0]["tags"], strict=False))
    assert records[0]["tags"][:5] == ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "I-ORG"]
    assert [tags["江"], tags["泽"], tags["民"]] == ["B-PER", "I-PER", "I-PER"]  # surname + given name: one person
    assert [tags["北"], tags["京"]] == ["B-LOC", "I-LOC"]


# ------------------------------------------------------------------------------------------ training + predict
NAMES = ["Alice", "Okonkwo", "Dmitri", "Eleanor", "Fitzgerald", "Bob"]
SURNAMES = ["Smith", "Jones", "Nakamura"]
PLACES = ["Paris", "Zanzibar", "Kyoto", "Lima", "Reykjavik"]
FILLER = ["the", "went", "to", "met", "in", "and", "saw", "visited", "yesterday", "with", "a", "friend", "from"]


def synthetic_conll(n: int, seed: int = 0) -> str:
    """CoNLL sentences where names and places are tagged PER / LOC among filler words."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- O", ""]
    for _ in range(n):
        for _ in range(rng.randint(3, 9)):
            r = rng.random()
            if r < 0.15:
                lines.append(f"{rng.choice(NAMES)}\tNNP\tB-PER")
                if rng.random() < 0.5:
                    lines.append(f"{rng.choice(SURNAMES)}\tNNP\tI-PER")
            elif r < 0.3:
                lines.append(f"{rng.choice(PLACES)}\tNNP\tB-LOC")
            else:
                lines.append(f"{rng.choice(FILLER)}\tXX\tO")
        lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_nodrop_dir: Path) -> lmtune.Run:
    folder = tmp_path_factory.mktemp("ner")
    (folder / "train.conll").write_text(synthetic_conll(300), encoding="utf-8")
    return lmtune.train({
        "task": "token_classification", "model": str(tiny_bert_nodrop_dir),
        "data": {"train": str(folder / "train.conll"), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32", "log_every": 5},
        "output_dir": str(folder / "run"),
    }, show_progress=False)


def test_tiny_bert_learns_entity_tags(ner_run: lmtune.Run, tiny_bert_nodrop_dir: Path) -> None:
    m = ner_run.metrics
    assert m["test"]["f1"] >= 0.9 and m["starting_point"]["test"]["f1"] < 0.5
    assert set(m["test"]["per_type"]) == {"LOC", "PER"}
    rows = [json.loads(x) for x in (ner_run.path / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["loss"] for r in rows if r["split"] == "train"]
    assert train_loss[-1] < 0.5 * train_loss[0]
    tuned = AutoModelForTokenClassification.from_pretrained(ner_run.model_dir)
    assert tuned.config.id2label == {0: "O", 1: "B-LOC", 2: "I-LOC", 3: "B-PER", 4: "I-PER"}
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_bert_nodrop_dir)
    assert not torch.equal(base.embeddings.word_embeddings.weight, tuned.bert.embeddings.word_embeddings.weight)
    meta = json.loads((ner_run.model_dir / "lmtune.json").read_text())
    assert meta["word_split"] == "whitespace" and meta["tag_scheme"] == "bio"
    report = (ner_run.path / "report.md").read_text()
    assert "Per entity type (test)" in report and (ner_run.path / "plots" / "entity_f1_test.png").is_file()
    assert "token-classification" in (ner_run.model_dir / "README.md").read_text()


def test_predict_gives_character_offsets(ner_run: lmtune.Run) -> None:
    text = "yesterday  Okonkwo Nakamura visited Zanzibar with Alice"
    [out] = ner_run.predict([text])
    assert out["tokens"] == text.split()
    found = [(e["entity"], e["text"]) for e in out["entities"]]
    assert found == [("PER", "Okonkwo Nakamura"), ("LOC", "Zanzibar"), ("PER", "Alice")]
    for e in out["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    # A text longer than the model's window is tagged in pieces, not cut off.
    words = ("the friend went to Kyoto and " * 12).split()
    [long] = ner_run.predict([" ".join(words)])
    assert len(long["tags"]) == len(words) and sum(e["text"] == "Kyoto" for e in long["entities"]) == 12
    [given] = ner_run.predict([["met", "Dmitri", "in", "Lima"]])
    assert [(e["entity"], e["start"], e["end"]) for e in given["entities"]] == [("PER", 4, 10), ("LOC", 14, 18)]


def test_predict_file_and_evaluate_through_the_run(ner_run: lmtune.Run, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    with source.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text"], ["1", "Alice went to Paris"], ["2", "the friend saw Bob"]])
    run = lmtune.load_run(ner_run.path)
    assert run.predict_file(source, tmp_path / "out.jsonl", show_progress=False) == 2
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == "1" and [e["text"] for e in rows[0]["entities"]] == ["Alice", "Paris"]
    assert run.predict_file(source, tmp_path / "out.csv", show_progress=False) == 2
    cells = list(csv.DictReader((tmp_path / "out.csv").open(encoding="utf-8")))
    assert json.loads(cells[1]["entities"])[0]["entity"] == "PER"
    conll = tmp_path / "held_out.conll"
    conll.write_text(synthetic_conll(30, seed=7), encoding="utf-8")
    assert run.predict_file(conll, tmp_path / "tagged.jsonl", show_progress=False) == 30  # tokens column
    scores = run.evaluate(conll)
    assert scores["f1"] >= 0.9 and scores["num_examples"] == 30
    own = run.evaluate()
    assert own["test"]["f1"] == pytest.approx(ner_run.metrics["test"]["f1"])
    with pytest.raises(DataError, match="needs a 'text' column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("id,sentence\n1,Alice\n", encoding="utf-8")
        run.predict_file(bad, tmp_path / "x.jsonl", show_progress=False)


def test_extend_vocabulary_adds_unknown_characters(tmp_path: Path, tiny_bert_dir: Path) -> None:
    rows = [{"tokens": list("江泽民在北京"), "tags": ["B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC"]}] * 2
    rows.append({"tokens": list("华社"), "tags": ["B-ORG", "I-ORG"]})
    content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    task, data = _prepare(tmp_path, tiny_bert_dir, content, "t.jsonl", extend_vocabulary=10)
    tok = task.tokenizer
    # Unknown to MiniLM's vocabulary and seen twice (华 only once; 江, 民, 北, 京 it knows).
    assert sorted(task.added_tokens) == sorted(["泽", "在"])
    assert tok.unk_token_id not in data.splits["train"][0]["input_ids"]
    assert task.new_token_ids() == tok.convert_tokens_to_ids(task.added_tokens) and data.info["added_tokens"] == 2
    model = task.build_model(tiny_bert_dir, data, tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert task.head_module_names(model) == {"classifier", "word_embeddings"}  # new rows learn at the head's rate


def test_a_decoder_learns_tags_too(tmp_path: Path) -> None:
    """A tiny Llama (causal attention: each word sees its left context) as a token classifier, head `score`."""
    from helpers import tiny_llama

    model = tiny_llama(tmp_path / "llama")
    (tmp_path / "train.conll").write_text(synthetic_conll(200, seed=3), encoding="utf-8")
    run = lmtune.train({
        "task": "token_classification", "model": str(model),
        "data": {"train": str(tmp_path / "train.conll"), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32"},
        "output_dir": str(tmp_path / "run"),
    }, show_progress=False)
    assert run.metrics["test"]["f1"] >= 0.8 > run.metrics["starting_point"]["test"]["f1"]
    assert type(AutoModelForTokenClassification.from_pretrained(run.model_dir)).__name__ == "LlamaForTokenClassification"

