"""Summarization end to end: the sentence splitter, lead-N baselines, the bundled ACLSum papers, long sources."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import lmtune
from lmtune.data.aclsum import detokenize
from lmtune.data.bundled import BUNDLED_DATA, resolve_bundled_data
from lmtune.data.readers import read_table
from lmtune.errors import ConfigError
from lmtune.tasks.seq2seq.baselines import lead_n, lead_scores, split_sentences
from lmtune.tasks.seq2seq.metrics import seq2seq_metrics

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["apples", "rivers", "stone", "cloud", "seven", "lamps", "green", "north", "quiet", "bread"]


# --- sentence splitting and lead-N -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "sentences"), [
    ("Mr. Smith paid $3.50 for it. He left.", ["Mr. Smith paid $3.50 for it.", "He left."]),
    ("Prices rose 2.5% in the U.S. last year. Rates fell.", ["Prices rose 2.5% in the U.S. last year.", "Rates fell."]),
    ("Did J. R. Tolkien write it? Yes! \"Surely.\" (It is so.) Fine",
     ["Did J. R. Tolkien write it?", "Yes!", "\"Surely.\"", "(It is so.)", "Fine"]),
    ("As in Smith et al. 2019 and Fig. 3 shows, e.g. Table 2 has it. Dr. Who agrees.",
     ["As in Smith et al. 2019 and Fig. 3 shows, e.g. Table 2 has it.", "Dr. Who agrees."]),
    ("A title without a stop\n\nThe body. More body", ["A title without a stop", "The body.", "More body"]),
    ("lower case after a stop. does not split", ["lower case after a stop. does not split"]),
    ("  \n\n ", []),
])  # fmt: skip
def test_split_sentences(text: str, sentences: list[str]) -> None:
    assert split_sentences(text) == sentences


def test_lead_n_takes_the_first_sentences() -> None:
    doc = "First one. Second one!\nThird one? Fourth."
    assert lead_n(doc, 1) == "First one."
    assert lead_n(doc, 3) == "First one. Second one! Third one?"
    assert lead_n(doc, 10) == "First one. Second one! Third one? Fourth."
    with pytest.raises(ValueError, match="at least 1"):
        lead_n(doc, 0)


def test_lead_scores_are_the_models_rouge() -> None:
    sources = ["The cat sat on the mat. It was happy. Then it slept.", "Rain fell all day. The river rose."]
    references = ["The cat sat on the mat.", "Rain fell all day. The river rose."]
    scores = lead_scores(sources, references)
    assert set(scores) == {"lead_1", "lead_3"}
    # lead-1 is the first reference word for word; the second reference is both sentences, lead-1 half of it.
    assert scores["lead_1"]["rouge1"] == pytest.approx((1.0 + 2 * 4 / (4 + 7)) / 2)
    assert scores["lead_1"] == seq2seq_metrics(["The cat sat on the mat.", "Rain fell all day."], references,
                                               "summarization")
    assert scores["lead_3"]["rouge1"] < scores["lead_1"]["rouge1"]  # the extra sentences cost precision
    assert scores["lead_3"]["mean_generated_words"] == pytest.approx((12 + 7) / 2)


# --- the bundled ACLSum papers -----------------------------------------------------------------------


def test_detokenize_undoes_the_corpus_spacing() -> None:
    assert detokenize("Question Answering ( QA ) , e.g. 20 % ; it is n't `` fast '' .") == \
        'Question Answering (QA), e.g. 20%; it isn\'t "fast".'


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_aclsum_papers_with_their_summaries(cache: Path) -> None:
    dataset = BUNDLED_DATA["aclsum"]
    if not dataset.is_installed():
        pytest.skip(f"aclsum is not installed: {dataset.install_command}")
    assert dataset.task == "seq2seq"
    path = resolve_bundled_data("aclsum")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 250 and len({r["id"] for r in rows}) == 250
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [100, 50, 100]
    first = rows[0]
    assert first["id"] == "P06-1112"
    assert first["title"] == "Exploring Correlation of Dependency Relation Paths for Answer Extraction"
    assert first["source"].startswith("In this paper, we explore correlation of dependency relation paths")
    assert "Question Answering (QA)." in first["source"] and first["source"].count("\n\n") == 2
    assert first["target"].startswith("A generally accessible NER system for QA systems")
    assert first["target"].endswith("works even better on harder questions where NER performs poorly.")
    words = [len(r["source"].split()) for r in rows]
    assert (min(words), sum(words), max(words)) == (302, 218_207, 2488)  # long: a run must cut them
    assert all(30 < len(r["target"].split()) < 150 for r in rows)
    # lmtune's reader reads it with the seq2seq task's columns
    table = read_table(str(path), format="auto", encoding="utf-8")
    assert table.column("source")[0] == first["source"] and table.column("target")[0] == first["target"]


# --- a summarization run: lead rows, long sources cut and counted --------------------------------------


def lead_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Long 'documents' of made-up sentences whose summary is their first sentence (lead-1 is perfect)."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(4)).capitalize() + "."

    rows = []
    for _ in range(n):
        sentences = [sentence() for _ in range(rng.randint(3, 30))]
        rows.append({"source": " ".join(sentences), "target": sentences[0]})
    return rows


def test_decoder_route_summarizes_with_lead_rows_and_cut_sources(tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lead_pairs(120)), encoding="utf-8")
    cfg = {
        "task": "seq2seq", "model": {"name": str(tiny_chat_llama_dir), "seq2seq": "decoder"},
        "data": {"train": str(data), "seq2seq_task": "summarization", "prompt_template": "Sum: {source}",
                 "max_length": 96, "max_target_length": 16},
        "train": {"epochs": 4, "batch_size": 8, "learning_rate": 2e-2, "warmup_ratio": 0.0, "precision": "fp32"},
        "generation": {"max_new_tokens": 12, "eval_examples": 8},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    test, start = run.metrics["test"], run.metrics["starting_point"]["test"]
    assert test["loss"] < start["loss"] / 2  # copying needs more steps than a test has: ROUGE is only present
    assert {"rouge1", "rouge2", "rouge_l"} <= set(test)
    # lead-1 copies the reference: exactly 1; lead-3 has the reference and two more sentences
    for scores in (test["lead"], start["lead"]):
        assert scores["lead_1"]["rouge1"] == pytest.approx(1.0) and scores["lead_1"]["rouge_l"] == pytest.approx(1.0)
        assert 0.3 < scores["lead_3"]["rouge1"] < 1.0
    # the long sources were cut at the end (never skipped) and counted
    info = json.loads((run.path / "data.json").read_text(encoding="utf-8"))["train"]
    assert info["rows_read"] == 120 and info.get("skipped_too_long", 0) == 0
    long_sources = sum(len(r["source"].split()) > 60 for r in lead_pairs(120))
    assert info["sources_truncated"] >= long_sources > 0 and 16 <= info["source_token_budget"] < 96
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "| metric | lead-1 | lead-3 | starting model | tuned model |" in report
    assert f"{info['sources_truncated']} of 120 sources were longer than" in report
    # lead-N are rows of the comparison table too, scored on the same held-out sources as the models
    rows = {r["name"]: r for r in json.loads((run.path / "comparison.json").read_text(encoding="utf-8"))["rows"]}
    for n in (1, 3):
        row = rows[f"baseline: lead_{n}"]
        assert row["kind"] == "rule" and row["parameters"] == 0
        assert row["metrics"]["rouge_l"] == pytest.approx(test["lead"][f"lead_{n}"]["rouge_l"])
    assert rows["baseline: lead_1"]["metrics"]["rouge_l"] == pytest.approx(1.0)
    assert "baseline: lead_1" in report
    # prediction cuts a long source at the same budget as training did (and says so); a short one is whole
    long_doc = " ".join(f"{WORDS[i % 10]} {WORDS[(3 * i) % 10]}." for i in range(200))
    budget = info["source_token_budget"]
    predictor = run.predictor()
    long_out, short_out = predictor.predict([long_doc, "stone bread."], batch_size=2)
    assert long_out["source_truncated"] and not short_out["source_truncated"]
    assert long_out["source_tokens"] <= 96 - 16 < len(predictor.tokenizer(long_doc)["input_ids"])
    assert long_out["source_tokens"] - short_out["source_tokens"] == budget - len(
        predictor.tokenizer("stone bread.", add_special_tokens=False)["input_ids"])


def test_encoder_decoder_route_reports_lead_rows_and_truncation(tmp_path: Path, tiny_t5_dir: Path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lead_pairs(60)), encoding="utf-8")
    cfg = {
        "task": "seq2seq", "model": str(tiny_t5_dir),
        "data": {"train": str(data), "seq2seq_task": "summarization", "max_length": 48, "max_target_length": 16},
        "train": {"epochs": 1, "batch_size": 16, "warmup_ratio": 0.0, "precision": "fp32"},
        "generation": {"max_new_tokens": 6, "eval_examples": 6},
        "output_dir": str(tmp_path / "run"),
    }
    run = lmtune.train(cfg, show_progress=False)
    assert run.metrics["test"]["lead"]["lead_1"]["rouge2"] == pytest.approx(1.0)
    info = json.loads((run.path / "data.json").read_text(encoding="utf-8"))
    assert info["train"]["truncated"] > 0
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "| metric | lead-1 | lead-3 | starting model | tuned model |" in report
    assert f"train {info['train']['truncated']} of {info['train']['examples']}" in report


def test_summarization_example_config_names_the_bundled_corpus() -> None:
    cfg = lmtune.load_config(ROOT / "examples" / "seq2seq_summarization_aclsum_smollm2.yaml")
    assert cfg.task == "seq2seq" and cfg.data.train == "bundled:aclsum"
    assert cfg.data.seq2seq_task == "summarization" and cfg.model.seq2seq == "decoder"
    assert cfg.data.max_length > cfg.data.max_target_length + 256  # room for a real part of each paper


def test_lead_baselines_are_refused_for_translation() -> None:
    cfg = {"task": "seq2seq", "model": "minilm", "data": {"train": "bundled:chatterbot_en_it",
           "seq2seq_task": "translation", "source_language": "English", "target_language": "Italian"}}
    assert lmtune.load_config(cfg).baselines == ["lead_1", "lead_3"]  # the default: the task gives no rows
    with pytest.raises(ConfigError, match=r"lead-N baselines .* translation"):
        lmtune.load_config({**cfg, "baselines": ["lead_3"]})
    summarization = {**cfg, "data": {"train": "bundled:aclsum", "seq2seq_task": "summarization"}}
    assert lmtune.load_config({**summarization, "baselines": ["lead_3"]}).baselines == ["lead_3"]
    with pytest.raises(ConfigError, match="do not apply to task 'seq2seq'"):
        lmtune.load_config({**summarization, "baselines": ["majority"]})
