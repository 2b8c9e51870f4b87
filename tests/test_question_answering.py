"""Extractive question answering: windows and labels, span choice across windows, the official SQuAD
metrics, the data reader's errors and repairs, and a tiny BERT that learns (then predicts through Run)."""

from __future__ import annotations

import collections
import json
import random
import re
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

import lmtune
from lmtune.config import load_config
from lmtune.data.chatterbot_qa import chatterbot_qa_document
from lmtune.data.squad import clean_items, iter_questions, read_qa_items
from lmtune.errors import ConfigError, DataError
from lmtune.evaluate.text_metrics import squad_scores
from lmtune.tasks.question_answering.spans import best_span, tokenize_windows

WORDS = ["apple", "river", "garden", "teacher", "window", "horse", "letter", "village", "music", "paper",
         "stone", "cloud", "bread", "chair", "light", "water"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from helpers import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def _context(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))  # each word is one WordPiece token


def _span_text(context: str, offsets: list[list[int]], start: int, end: int) -> str:
    return context[offsets[start][0]:offsets[end][1]]


# --- windows and labels -------------------------------------------------------------------------------


def test_answer_in_second_window_and_cls_elsewhere(tokenizer: Any) -> None:
    context = _context(40) + " the answer is zebra"
    start = context.index("zebra")
    win = tokenize_windows(tokenizer, ["what is it?"], [context], [(start, start + 5)], max_length=24, stride=6)
    assert len(win["input_ids"]) >= 3 and set(win["example"]) == {0}
    assert all(n <= 24 for n in win["length"])
    labelled = [w for w in range(len(win["input_ids"])) if win["start_positions"][w] != 0]
    assert labelled == [len(win["input_ids"]) - 1]  # only the last window holds "zebra"
    w = labelled[0]
    assert _span_text(context, win["offsets"][w], win["start_positions"][w], win["end_positions"][w]) == "zebra"
    for other in range(w):
        assert win["start_positions"][other] == win["end_positions"][other] == 0  # CLS
    # Question and special tokens are outside the context.
    assert win["offsets"][0][0] == [-1, -1] and win["offsets"][0][1] == [-1, -1]


def test_answer_cut_by_a_window_boundary_is_cls_there(tokenizer: Any) -> None:
    context = _context(30)
    plain = tokenize_windows(tokenizer, ["which?"], [context], [None], max_length=20, stride=6)
    first = plain["offsets"][0]
    last_ctx = max(k for k, o in enumerate(first) if o[0] >= 0)
    # The answer: the last two context tokens of window 1 and the first token after it.
    a_start, a_end = first[last_ctx - 1][0], first[last_ctx][1] + 1 + len(context[first[last_ctx][1] + 1:].split()[0])
    answer = context[a_start:a_end]
    assert len(answer.split()) == 3
    win = tokenize_windows(tokenizer, ["which?"], [context], [(a_start, a_end)], max_length=20, stride=6)
    assert win["start_positions"][0] == win["end_positions"][0] == 0  # cut in window 1: CLS
    w = 1  # the overlap (stride 6) puts the whole answer in window 2
    assert win["start_positions"][w] > 0
    assert _span_text(context, win["offsets"][w], win["start_positions"][w], win["end_positions"][w]) == answer


def test_span_labels_on_subword_and_punctuation_boundaries(tokenizer: Any) -> None:
    context = "In 1912, the unsinkable Titanic sank; survivors: 706."
    for answer in ("1912", "unsinkable Titanic", "706"):
        s = context.index(answer)
        win = tokenize_windows(tokenizer, ["q?"], [context], [(s, s + len(answer))], max_length=64, stride=8)
        got = _span_text(context, win["offsets"][0], win["start_positions"][0], win["end_positions"][0])
        assert got == answer


# --- choosing the span ---------------------------------------------------------------------------------


def _window(n: int, context_from: int, char0: int) -> list[list[int]]:
    # Tokens 0..context_from-1 are special/question tokens; each context token is 5 characters wide.
    return [[-1, -1]] * context_from + [[char0 + 5 * k, char0 + 5 * k + 4] for k in range(n - context_from)]


def test_best_span_is_chosen_across_windows() -> None:
    context = " ".join(f"w{i:03d}" for i in range(12))  # tokens of 4 chars + space
    off1, off2 = _window(8, 2, 0), _window(8, 2, 25)  # window 2 starts at context token 5
    s1, e1 = np.full(8, -100.0), np.full(8, -100.0)
    s2, e2 = np.full(8, -100.0), np.full(8, -100.0)
    s1[3], e1[4] = 2.0, 2.0  # window 1: tokens 1-2 of the context, score 4
    s2[4], e2[5] = 3.0, 3.0  # window 2: context tokens 7-8, score 6: the winner
    s2[1], e2[1] = 9.0, 9.0  # a question token: never an answer
    r = best_span([(s1, e1, off1), (s2, e2, off2)], context, n_best=5)
    assert (r["start"], r["end"]) == (35, 44) and r["answer"] == "w007 w008" == context[35:44]
    assert 0 < r["score"] <= 1 and r["null_score_diff"] is None
    # An end before its start, or a span longer than max_answer_length, is not a candidate.
    s2[6], e2[2] = 50.0, 50.0  # end before start
    s1[2], e1[7] = 40.0, 40.0  # 6 tokens long
    r = best_span([(s1, e1, off1), (s2, e2, off2)], context, n_best=8, max_answer_length=2)
    assert r["answer"] == "w007 w008"


def test_no_answer_threshold() -> None:
    context = "aaaa bbbb"
    off = [[-1, -1], [0, 4], [5, 9]]
    s, e = np.array([5.0, 1.0, 0.0]), np.array([5.0, 0.0, 1.0])  # null 10 vs best span 2
    r = best_span([(s, e, off)], context, allow_unanswerable=True)
    assert r["answer"] == "" and (r["start"], r["end"]) == (0, 0) and r["null_score_diff"] == pytest.approx(8.0)
    assert r["best_text"] == "aaaa bbbb"
    r = best_span([(s, e, off)], context, allow_unanswerable=True, null_score_diff_threshold=9.0)
    assert r["answer"] == "aaaa bbbb"
    # The null score is the smallest over the question's windows.
    s2, e2 = np.array([0.0, 4.0, 0.0]), np.array([0.0, 0.0, 4.0])
    r = best_span([(s, e, off), (s2, e2, off)], context, allow_unanswerable=True)
    assert r["null_score_diff"] == pytest.approx(0.0 - 8.0) and r["answer"] == "aaaa bbbb"


# --- the official metrics ------------------------------------------------------------------------------


def _official_normalize(s: str) -> str:
    # evaluate-v2.0.py (SQuAD), verbatim in substance.
    def remove_articles(text: str) -> str:
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def remove_punc(text: str) -> str:
        return "".join(ch for ch in text if ch not in set(string.punctuation))

    return " ".join(remove_articles(remove_punc(s.lower())).split())


def _official_f1(gold: str, pred: str) -> float:
    g, p = _official_normalize(gold).split(), _official_normalize(pred).split()
    common = collections.Counter(g) & collections.Counter(p)
    same = sum(common.values())
    if len(g) == 0 or len(p) == 0:
        return float(g == p)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


CASES = [("The Cat!", "cat"), ("an apple a day", "Apple day"), ("  New\tYork  City. ", "new york"),
         ("theatre", "the atre"), ("Denver Broncos", "The Denver Broncos."), ("1,000", "1000"),
         ("", "something"), ("", ""), ("a the an", ""), ("U.S.", "US"), ("it's", "its"), ("$5", "5")]


@pytest.mark.parametrize(("pred", "gold"), CASES)
def test_normalisation_and_f1_match_the_official_script(pred: str, gold: str) -> None:
    scores = squad_scores([pred], [[gold]] if gold else [[]])
    expected_em = float(_official_normalize(pred) == _official_normalize(gold))
    assert scores["exact_match"] == expected_em
    assert scores["f1"] == pytest.approx(_official_f1(gold, pred))


def test_squad_scores_max_over_golds_and_v2_split() -> None:
    preds = ["Denver", "", "Paris", "x"]
    golds = [["Denver Broncos", "denver"], [], ["London"], ["..."]]  # "..." normalises to nothing: no answer
    s = squad_scores(preds, golds)
    assert s["exact_match"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert s["has_answer_examples"] == 2 and s["no_answer_examples"] == 2
    assert s["has_answer_exact_match"] == 0.5 and s["no_answer_exact_match"] == 0.5
    # Best threshold: answer empty when the null-score difference exceeds it.
    best = ["Denver", "Rome", "Paris", "x"]
    diffs = [-3.0, 2.0, 1.0, 0.5]
    t = squad_scores(best, golds, null_score_diffs=diffs, best_non_null=best)
    # threshold -3: only q1 answered -> q1 right, q2 and q4 empty (right), q3 empty (wrong) = 3/4
    assert t["best_exact_match"] == 0.75 and t["best_exact_match_threshold"] == -3.0


# --- reading data ---------------------------------------------------------------------------------------


def _squad(paragraphs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}


def _cfg(path: Path, **data: Any) -> Any:
    return load_config({"task": "question_answering", "data": {"train": str(path), **data}}).data


def _write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return path


def test_squad_reader_repairs_drops_and_counts(tmp_path: Path) -> None:
    ctx = "Paris is the capital of France. Berlin is the capital of Germany."
    doc = _squad([{"context": ctx, "qas": [
        {"id": "ok", "question": "capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "off", "question": "capital of Germany?", "answers": [{"text": "Berlin", "answer_start": 30}]},
        {"id": "gone", "question": "capital of Spain?", "answers": [{"text": "Madrid", "answer_start": 3}]},
        {"id": "none", "question": "capital of Mars?", "answers": [], "is_impossible": True},
    ]}])
    path = _write(tmp_path / "train.json", doc)
    items, source, layout = read_qa_items(str(path), _cfg(path))
    assert layout == "squad" and [i["where"] for i in items][1] == "data[0].paragraphs[0].qas[1]"
    text = path.read_text()
    assert items[1]["line"] == text[:text.index('"off"')].count("\n") + 1  # the line of its "id"
    records, info = clean_items(items, source, allow_unanswerable=False, empty_text="skip")
    assert [r["id"] for r in records] == ["ok", "off"]
    assert records[1]["answers"] == [{"text": "Berlin", "answer_start": ctx.index("Berlin")}]
    assert info["answers_repaired"] == 1 and info["answers_dropped"] == 1 and info["questions_dropped"] == 1
    assert info["skipped_unanswerable"] == 1
    records, info = clean_items(items, source, allow_unanswerable=True, empty_text="skip")
    assert [r["id"] for r in records] == ["ok", "off", "none"] and records[2]["answers"] == []


@pytest.mark.parametrize(
    ("qa", "expected"),
    [
        ({"id": "a", "answers": [{"text": "x", "answer_start": 0}]}, "field 'data[0].paragraphs[0].qas[0].question'"),
        ({"id": "a", "question": "q?", "answers": [{"answer_start": 0}]}, "qas[0].answers[0]': an answer needs"),
        ({"id": "a", "question": "q?", "answers": [{"text": "x", "answer_start": "one"}]}, "answer_start must be"),
        ({"id": "a", "question": "   ", "answers": [{"text": "x", "answer_start": 0}]}, "empty question"),
    ],
)
def test_squad_reader_errors_name_the_record(qa: dict[str, Any], expected: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.json", _squad([{"context": "x marks the spot", "qas": [qa]}]))
    items, source, _ = read_qa_items(str(path), _cfg(path))
    with pytest.raises(DataError) as info:
        clean_items(items, source, allow_unanswerable=False, empty_text="error")
    message = str(info.value)
    assert expected in message and f"{path}:" in message  # file and line of the question's id


def test_flat_rows_answers_dict_or_columns(tmp_path: Path) -> None:
    rows = [{"q": "who?", "ctx": "Ada wrote it.", "answers": {"text": ["Ada"], "answer_start": [0]}},
            {"q": "what?", "ctx": "Ada wrote it.", "answers": {"text": ["it"], "answer_start": []}}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"qa.jsonl:2: field 'answers': answers hold 1 texts but 0"):
        read_qa_items(str(path), _cfg(path, question_column="q", context_column="ctx"))
    csv = tmp_path / "qa.csv"
    csv.write_text("question,context,answer_text,answer_start\nwho?,Ada wrote it.,Ada,0\n"
                   "what?,Ada wrote it.,wrote,\nwhere?,,x,0\nwhen?,Ada wrote it.,1843,0\n")
    items, source, layout = read_qa_items(str(csv), _cfg(csv))
    records, info = clean_items(items, source, allow_unanswerable=False, empty_text="skip")
    assert layout == "table" and [r["answers"][0]["answer_start"] for r in records] == [0, 4]
    assert info["answers_located"] == 1 and info["skipped_empty"] == 1 and info["answers_dropped"] == 1
    with pytest.raises(DataError, match=r"qa.csv:4: field 'context': empty context"):
        clean_items(items, source, allow_unanswerable=False, empty_text="error")
    (tmp_path / "noans.csv").write_text("question,context\nwho?,Ada.\n")
    with pytest.raises(DataError, match="no answers: the table needs an 'answers' column"):
        read_qa_items(str(tmp_path / "noans.csv"), _cfg(tmp_path / "noans.csv"))


def test_doc_stride_must_leave_room() -> None:
    from lmtune.tasks.question_answering.task import QuestionAnsweringTask

    cfg = load_config({"task": "question_answering", "data": {"train": "x.json", "max_length": 64, "doc_stride": 40}})
    with pytest.raises(ConfigError, match="doc_stride 40 must be less than half"):
        QuestionAnsweringTask(cfg)


def test_bundled_chatterbot_qa_is_consistent() -> None:
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    assert spec is not None and spec.submodule_search_locations
    doc = chatterbot_qa_document(Path(next(iter(spec.submodule_search_locations))) / "data" / "english")
    questions = list(iter_questions(doc))
    answerable = [q for q in questions if not q["is_impossible"]]
    assert len(answerable) > 800 and len(questions) - len(answerable) > 100
    for q in answerable:
        a = q["answers"][0]
        assert q["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]
    for q in questions:
        if q["is_impossible"]:
            assert q["answers"] == []
    assert chatterbot_qa_document.__doc__ and "unanswerable" in chatterbot_qa_document.__doc__
    # Seeded: the same set on every machine (these are the figures the README gives).
    assert (len(questions), len(questions) - len(answerable)) == (1030, 168)


# --- training and prediction -----------------------------------------------------------------------------


def _synthetic_qa(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """ "the code is X" hidden among filler words; every fifth context holds no code (unanswerable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 30))]
        if i % 5 == 4:
            rows.append({"id": f"q{i}", "question": "what is the code?", "context": " ".join(words),
                         "answers": {"text": [], "answer_start": []}})
            continue
        code = rng.choice(["zebra", "tiger", "eagle", "shark", "camel", "otter"])
        k = rng.randint(0, len(words))
        pre = " ".join(words[:k]) + (" " if k else "")
        context = f"{pre}the code is {code} " + " ".join(words[k:])
        rows.append({"id": f"q{i}", "question": "what is the code?", "context": context.strip(),
                     "answers": {"text": [code], "answer_start": [len(pre) + len("the code is ")]}})
    return rows


def test_tiny_bert_learns_and_predicts_char_offsets(tiny_bert_nodrop_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _synthetic_qa(300)), encoding="utf-8")
    cfg = {"task": "question_answering", "model": str(tiny_bert_nodrop_dir), "output_dir": str(tmp_path / "run"),
           "data": {"train": str(data), "max_length": 24, "doc_stride": 6, "allow_unanswerable": True,
                    "null_score_diff_threshold": "auto", "max_answer_length": 5},
           "train": {"epochs": 4, "batch_size": 16, "learning_rate": 3e-3, "log_every": 5, "precision": "fp32"}}
    from lmtune.models.registry import resolve_model  # noqa: F401  (the model folder is a local path)

    before = {k: v.clone() for k, v in __import__("transformers").AutoModel.from_pretrained(
        tiny_bert_nodrop_dir).state_dict().items()}
    run = lmtune.train(cfg, show_progress=False)
    m = run.metrics
    info = json.loads((run.path / "data.json").read_text())
    assert info["train"]["truncated"] > 0  # long contexts really were cut into several windows
    start, test = m["starting_point"]["test"], m["test"]
    assert test["windows"] > test["num_examples"]
    assert test["f1"] > start["f1"] + 0.4 and test["f1"] > 0.8
    assert test["has_answer_exact_match"] > 0.7 and test["no_answer_examples"] > 0
    steps = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s.get("split") == "train" and "loss" in s]
    assert losses[-1] < losses[0] * 0.6
    after = __import__("transformers").AutoModelForQuestionAnswering.from_pretrained(run.model_dir).state_dict()
    assert not np.allclose(after["bert.embeddings.word_embeddings.weight"].numpy(),
                           before["embeddings.word_embeddings.weight"].numpy())
    meta = json.loads((run.model_dir / "lmtune.json").read_text())
    assert meta["task"] == "question_answering" and meta["null_score_diff_threshold"] == test["null_score_diff_threshold"]
    report = (run.path / "report.md").read_text()
    assert "Example predictions" in report and "exact match" in report

    # The saved model through Run: char offsets into the context, across windows.
    loaded = lmtune.load_run(run.path)
    context = " ".join(WORDS[:14]) + " the code is otter " + " ".join(WORDS[:5])
    out = loaded.predict([{"question": "what is the code?", "context": context},
                          {"question": "what is the code?", "context": " ".join(WORDS * 2)}])
    assert out[0]["answer"] == "otter" and context[out[0]["start"]:out[0]["end"]] == "otter"
    assert out[1]["answer"] == "" and (out[1]["start"], out[1]["end"]) == (0, 0)
    assert 0 < out[0]["score"] <= 1
    with pytest.raises(DataError, match="field 'context': context is empty"):
        loaded.predict({"question": "what?", "context": " "})

    inputs = tmp_path / "ask.csv"
    inputs.write_text(f"question,context\nwhat is the code?,{context}\nwhat is the code?,\n")
    with pytest.raises(DataError, match=r"ask.csv:3: field 'context'"):
        loaded.predict_file(inputs, tmp_path / "answers.jsonl", show_progress=False)
    inputs.write_text(f"question,context\nwhat is the code?,{context}\n")
    assert loaded.predict_file(inputs, tmp_path / "answers.jsonl", show_progress=False) == 1
    row = json.loads((tmp_path / "answers.jsonl").read_text())
    assert row["answer"] == "otter" and row["context"][row["start"]:row["end"]] == "otter"

    # `lmtune eval` on a file in the training format uses the saved threshold.
    scores = loaded.evaluate(data)
    assert scores["f1"] > 0.8 and scores["null_score_diff_threshold"] == meta["null_score_diff_threshold"]


def test_lora_keeps_segment_embeddings_so_the_merged_model_matches(tiny_bert_nodrop_dir: Path, tmp_path: Path) -> None:
    """peft's PeftModelForQuestionAnswering drops token_type_ids; lmtune's LoRA must not (reload check)."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _synthetic_qa(60)), encoding="utf-8")
    cfg = {"task": "question_answering", "model": str(tiny_bert_nodrop_dir), "output_dir": str(tmp_path / "run"),
           "data": {"train": str(data), "max_length": 24, "doc_stride": 6},
           "method": {"name": "lora", "r": 4},
           "train": {"max_steps": 3, "batch_size": 16, "learning_rate": 1e-2, "precision": "fp32"}}
    run = lmtune.train(cfg, show_progress=False)  # raises if the merged model's logits differ
    meta = json.loads((run.model_dir / "lmtune.json").read_text())
    assert meta["saved_as"] == "merged" and (run.path / "adapter" / "adapter_config.json").is_file()
    assert "reload check: max logit difference" in (run.path / "report.md").read_text()


def test_data_inspect_shows_windows_and_repairs(tiny_bert_nodrop_dir: Path, tmp_path: Path) -> None:
    from lmtune.workflows.inspect import inspect_data

    rows = _synthetic_qa(40)
    rows[0]["answers"]["answer_start"] = [0]  # wrong offset: repaired
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = inspect_data({"task": "question_answering", "model": str(tiny_bert_nodrop_dir),
                           "data": {"train": str(data), "max_length": 24, "doc_stride": 6}})
    train = report["facts"]["train"]
    assert train["answers_repaired"] == 1 and train["skipped_unanswerable"] == 8
    assert train["windows"] > train["examples"] and train["contexts_over_several_windows"] > 0
