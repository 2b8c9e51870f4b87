"""Metrics for generated text against reference texts, computed locally.

Exact match and token F1 follow the SQuAD v1.1 evaluation script; ROUGE-L comes from ``rouge_score``
and chrF / BLEU from ``sacrebleu`` (no ``evaluate`` package: it downloads metric scripts at run time).

Everything works on non-English text: punctuation is any Unicode punctuation, words are runs of
Unicode letters/digits, and CJK ideographs (which are written without spaces) count one character
per word, as the MLQA evaluation does for Chinese. On plain ASCII text every score equals the
reference implementation's.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

import sacrebleu
from nltk.stem import porter
from rouge_score import rouge_scorer

# CJK ideographs (unified + extension A + compatibility), Hiragana, Katakana and Hangul syllables:
# scripts written without spaces between words, so each character is one token.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_CHAR_RE = re.compile(f"[{_CJK}]")
_CJK_SPLIT_RE = re.compile(f"[{_CJK}]|[^{_CJK}]+")
# A word: one CJK character, or a run of other letters/digits (\w without "_" and without CJK).
_WORD_RE = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _is_punctuation(ch: str) -> bool:
    # SQuAD removes string.punctuation (ASCII, which includes symbols like $ + < = >); add every
    # Unicode punctuation mark ("，", "。", "¿", "«") so non-English answers normalise too.
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower-case, drop punctuation, the articles a/an/the, extra whitespace.

    Punctuation is every Unicode punctuation character plus ASCII ``string.punctuation``; the text is
    NFC-normalised first so composed and decomposed accents compare equal.
    """
    text = unicodedata.normalize("NFC", s).lower()
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _answer_tokens(s: str) -> list[str]:
    """Tokens for token F1: whitespace tokens of the normalised answer, CJK characters split apart."""
    tokens: list[str] = []
    for word in normalize_answer(s).split():
        # "北京大学" -> 北 京 大 学; "iphone手机" -> iphone 手 机
        tokens.extend(_CJK_SPLIT_RE.findall(word))
    return tokens


def exact_match(pred: str, ref: str) -> float:
    """1.0 if the prediction equals the reference after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token-overlap F1 between the normalised prediction and reference (0-1).

    Both empty after normalisation -> 1.0; exactly one empty -> 0.0. CJK characters are single tokens.
    Token order does not matter: it is a bag-of-tokens F1.
    """
    pred_tokens = _answer_tokens(pred)
    ref_tokens = _answer_tokens(ref)
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


class UnicodeRougeTokenizer:
    """A ``rouge_score`` tokenizer that keeps non-ASCII words.

    ``rouge_score``'s default tokenizer replaces everything outside ``[a-z0-9]`` with spaces, so
    "café" becomes "caf" and Chinese text becomes no tokens at all (ROUGE 0 for a perfect answer).
    This one lower-cases, NFC-normalises and takes runs of Unicode letters/digits as words, each CJK
    character as its own word, and Porter-stems ASCII words longer than 3 characters (as the default
    tokenizer does with ``use_stemmer=True``): on ASCII text the tokens are identical to the default's.
    """

    def __init__(self, use_stemmer: bool = True) -> None:
        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into lower-cased (and for ASCII, stemmed) word tokens."""
        words = _WORD_RE.findall(unicodedata.normalize("NFC", text).lower())
        if self._stemmer is None:
            return words
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


def bleu_tokenizer(texts: list[str]) -> str:
    """The sacrebleu tokenizer for ``texts``: "zh" when any holds a CJK character, "13a" otherwise."""
    # sacrebleu's default "13a" tokenizer splits on spaces and punctuation only, so an unsegmented
    # Chinese sentence is one "word"; its "zh" tokenizer splits CJK characters and is 13a otherwise.
    return "zh" if any(_CJK_CHAR_RE.search(t) for t in texts) else "13a"


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Score generated texts against one reference each.

    Returns means over the examples of ``exact_match``, ``token_f1`` and ``rouge_l`` (ROUGE-L
    F-measure, Porter-stemmed, via :class:`UnicodeRougeTokenizer`), all on a **0-1** scale; corpus-level
    ``chrf`` and ``bleu`` from sacrebleu on its **0-100** scale (BLEU uses sacrebleu's "zh" tokenizer
    when the texts hold CJK characters, its default "13a" otherwise); ``mean_generated_words`` (words as
    :class:`UnicodeRougeTokenizer` counts them, unstemmed) and ``empty_predictions`` (how many
    predictions are empty or whitespace only).

    Raises ``ValueError`` when the lists are empty or of different lengths (a caller bug).
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"generation_metrics: {len(predictions)} predictions but {len(references)} references"
        )
    if not predictions:
        raise ValueError("generation_metrics: no predictions to score")
    n = len(predictions)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True, tokenizer=UnicodeRougeTokenizer())
    rouge_l = sum(
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    )
    word_counter = UnicodeRougeTokenizer(use_stemmer=False)
    tokenize = bleu_tokenizer(predictions + references)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "rouge_l": rouge_l / n,
        "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score),
        "mean_generated_words": sum(len(word_counter.tokenize(p)) for p in predictions) / n,
        "empty_predictions": sum(1 for p in predictions if not p.strip()),
    }


def squad_scores(
    predictions: list[str], golds: list[list[str]], *, null_score_diffs: list[float | None] | None = None,
    best_non_null: list[str] | None = None,
) -> dict[str, float]:
    """Exact match and F1 over questions as the official SQuAD v2.0 script computes them (v1.1 when every
    question has an answer), on a **0-1** scale (the script prints them x100).

    ``golds[i]`` are the reference answers of question ``i`` (empty: unanswerable); references that
    normalise to nothing are ignored and a question left without one counts as unanswerable, whose only
    correct prediction is the empty string. A question scores the max over its references. Returns
    ``exact_match``, ``f1``, ``num_examples`` and, when some questions are unanswerable, the
    ``has_answer_*`` / ``no_answer_*`` split. Given ``null_score_diffs`` (null score minus best span score)
    and ``best_non_null`` (the best non-empty span) per question, also the official ``best_exact_match`` /
    ``best_f1`` with the thresholds that reach them (answer empty when the diff exceeds the threshold).
    """
    if len(predictions) != len(golds):
        raise ValueError(f"squad_scores: {len(predictions)} predictions but {len(golds)} questions")
    refs = [[g for g in gold if normalize_answer(g)] or [""] for gold in golds]
    has_answer = [ref != [""] for ref in refs]
    em = [max(exact_match(p, r) for r in ref) for p, ref in zip(predictions, refs, strict=True)]
    f1 = [max(token_f1(p, r) for r in ref) for p, ref in zip(predictions, refs, strict=True)]
    n = len(predictions)
    out: dict[str, float] = {"exact_match": sum(em) / max(n, 1), "f1": sum(f1) / max(n, 1), "num_examples": n}
    if not all(has_answer):
        for name, keep in (("has_answer", True), ("no_answer", False)):
            idx = [i for i in range(n) if has_answer[i] == keep]
            out[f"{name}_examples"] = len(idx)
            out[f"{name}_exact_match"] = sum(em[i] for i in idx) / max(len(idx), 1)
            out[f"{name}_f1"] = sum(f1[i] for i in idx) / max(len(idx), 1)
    if null_score_diffs is not None and best_non_null is not None and n:
        # find_best_thresh: start from "every answer empty" and switch questions to their best span in
        # order of rising null-score difference; keep the best running total.
        for key, score in (("exact_match", exact_match), ("f1", token_f1)):
            span_scores = [max(score(b, r) for r in ref) for b, ref in zip(best_non_null, refs, strict=True)]
            current = best = float(sum(not h for h in has_answer))
            threshold = 0.0
            order = sorted((i for i in range(n) if null_score_diffs[i] is not None),
                           key=lambda i: float(null_score_diffs[i]))  # type: ignore[arg-type]
            for i in order:
                current += span_scores[i] if has_answer[i] else (-1.0 if best_non_null[i] else 0.0)
                if current > best:
                    best, threshold = current, float(null_score_diffs[i])  # type: ignore[arg-type]
            out[f"best_{key}"] = best / n
            out[f"best_{key}_threshold"] = threshold
    return out
