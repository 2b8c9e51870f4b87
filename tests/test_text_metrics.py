"""Text-generation metrics: SQuAD EM/F1 by hand, ROUGE-L / chrF / BLEU, non-English text."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from lmtune.evaluate.text_metrics import (
    UnicodeRougeTokenizer,
    exact_match,
    generation_metrics,
    normalize_answer,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel  Tower!", "eiffel tower"),
        ("  an apple, a pear & the plum. ", "apple pear plum"),
        ("theatre", "theatre"),  # articles only as whole words
        ("¿Qué hora es?", "qué hora es"),  # Unicode punctuation
        ("北京。", "北京"),
        ("cafe\u0301", "café"),  # decomposed accent -> NFC
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    ("pred", "ref", "em", "f1"),
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),
        ("Denver Broncos", "Broncos", 0.0, 2 / 3),  # P = 1/2, R = 1
        ("the big red dog", "a red dog", 0.0, 0.8),  # "big red dog" vs "red dog": P = 2/3, R = 1
        ("x x y", "x y y", 0.0, 2 / 3),  # overlap counts min(count): x 1 + y 1 = 2 of 3
        ("y x", "x y", 0.0, 1.0),  # a bag of tokens
        ("cat", "dog", 0.0, 0.0),
        ("the", "a", 1.0, 1.0),  # both empty after normalisation
        ("", "Paris", 0.0, 0.0),
        ("北京是中国的首都", "北京是首都", 0.0, 10 / 13),  # per character: P = 5/8, R = 1
        ("北京大学", "北京大学。", 1.0, 1.0),
    ],
)
def test_exact_match_and_token_f1(pred: str, ref: str, em: float, f1: float) -> None:
    assert exact_match(pred, ref) == em
    assert token_f1(pred, ref) == pytest.approx(f1)


def test_rouge_l_known_pairs() -> None:
    # "the cat sat on the mat" vs "the cat was sitting on a mat": LCS = the cat on mat = 4 tokens,
    # P = 4/7, R = 4/6, F = 8/13. Stemming: "running dogs" vs "dogs run" -> run dog / dog run, LCS 1, F = 1/2.
    metrics = generation_metrics(
        ["the cat was sitting on a mat", "dogs run"], ["the cat sat on the mat", "running dogs"]
    )
    assert metrics["rouge_l"] == pytest.approx((8 / 13 + 1 / 2) / 2)


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("the cat was sitting on a mat", "the cat sat on the mat"),
        ("Running quickly, the dogs jumped over 3 fences!", "Dogs jump fences quickly."),
        ("It's a well-known fact; isn't it?", "it is well known"),
    ],
)
def test_unicode_rouge_tokenizer_equals_default_on_ascii(pred: str, ref: str) -> None:
    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert UnicodeRougeTokenizer().tokenize(pred) == default._tokenizer.tokenize(pred)
    assert generation_metrics([pred], [ref])["rouge_l"] == pytest.approx(
        default.score(ref, pred)["rougeL"].fmeasure
    )


def test_perfect_match_scores_are_maximal() -> None:
    refs = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "42"]
    metrics = generation_metrics(list(refs), refs)
    assert metrics["exact_match"] == metrics["token_f1"] == metrics["rouge_l"] == 1.0
    assert metrics["chrf"] == pytest.approx(100.0)  # sacrebleu's 0-100 scale
    assert metrics["bleu"] == pytest.approx(100.0)
    assert metrics["empty_predictions"] == 0


def test_non_english_text() -> None:
    # rouge_score's default tokenizer keeps only [a-z0-9]: Chinese gives no tokens (ROUGE 0 for a perfect
    # answer) and "café"/"cafè" both become "caf". sacrebleu's default BLEU tokenizer sees one unsegmented
    # Chinese sentence as a single word (BLEU 0 for a perfect answer).
    zh = "北京是中国的首都"
    perfect = generation_metrics([zh, "Café crème"], [zh, "café crème"])
    assert perfect["rouge_l"] == 1.0 and perfect["exact_match"] == 1.0
    assert generation_metrics([zh], [zh])["bleu"] == pytest.approx(100.0)
    assert generation_metrics([zh], [zh])["chrf"] == pytest.approx(100.0)
    partial = generation_metrics([zh], ["北京是首都"])
    assert partial["rouge_l"] == pytest.approx(10 / 13)  # LCS 北京是首都 = 5 of 8 and 5
    assert partial["token_f1"] == pytest.approx(10 / 13)
    assert 0 < partial["bleu"] < 100
    assert generation_metrics(["cafè"], ["café"])["rouge_l"] == 0.0
    assert generation_metrics(["Ça va très bien"], ["ça va bien"])["rouge_l"] == pytest.approx(
        6 / 7
    )  # P 3/4, R 1
    assert generation_metrics([zh + " ok"], ["x"])["mean_generated_words"] == 9  # 8 characters + "ok"


def test_empty_predictions_and_word_counts() -> None:
    metrics = generation_metrics(["", "   ", "Paris, France"], ["Paris", "Rome", "Paris"])
    assert metrics["empty_predictions"] == 2
    assert metrics["mean_generated_words"] == pytest.approx(2 / 3)
    assert metrics["exact_match"] == 0.0
    assert metrics["token_f1"] == pytest.approx((0 + 0 + 2 / 3) / 3)  # P = 1/2, R = 1
    assert set(metrics) == {
        "exact_match",
        "token_f1",
        "rouge_l",
        "chrf",
        "bleu",
        "mean_generated_words",
        "empty_predictions",
    }
    nothing = generation_metrics([""], ["Paris"])
    assert nothing["bleu"] == nothing["chrf"] == nothing["rouge_l"] == 0.0


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="no predictions"):
        generation_metrics([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        generation_metrics(["a", "b"], ["a"])
