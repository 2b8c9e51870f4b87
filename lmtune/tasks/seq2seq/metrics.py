"""The scores of a seq2seq job: ROUGE for summarization, sacreBLEU and chrF for translation (computed locally)."""

from __future__ import annotations

import sacrebleu
from rouge_score import rouge_scorer

from lmtune.evaluate.text_metrics import UnicodeRougeTokenizer, bleu_tokenizer

# (metric, header) per job, headline first: what the report and ``lmtune train`` show.
METRICS = {
    "summarization": [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rouge_l", "ROUGE-L"),
                      ("rouge_lsum", "ROUGE-Lsum"), ("loss", "loss")],
    "translation": [("bleu", "BLEU"), ("chrf", "chrF"), ("loss", "loss")],
}


def seq2seq_metrics(predictions: list[str], references: list[str], kind: str) -> dict[str, float]:
    """Scores of generated texts against one reference each.

    Summarization: mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (0-1; Porter-stemmed,
    Unicode-aware tokens, CJK characters one token each; Lsum splits summaries at newlines).
    Translation: corpus sacreBLEU (its "zh" tokenizer when the texts hold CJK characters, else "13a")
    and chrF (0-100). Both: ``mean_generated_words``, ``mean_reference_words``, ``empty_predictions``.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"seq2seq_metrics: {len(predictions)} predictions, {len(references)} references")
    n = len(predictions)
    out: dict[str, float] = {}
    if kind == "summarization":
        keys = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rouge_l", "rougeLsum": "rouge_lsum"}
        scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True, tokenizer=UnicodeRougeTokenizer())
        sums = dict.fromkeys(keys, 0.0)
        for pred, ref in zip(predictions, references, strict=True):
            scores = scorer.score(ref, pred)
            for k in keys:
                sums[k] += scores[k].fmeasure
        out.update({name: sums[k] / n for k, name in keys.items()})
    else:
        tokenize = bleu_tokenizer(predictions + references)
        out["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score)
        out["chrf"] = float(sacrebleu.corpus_chrf(predictions, [references]).score)
    words = UnicodeRougeTokenizer(use_stemmer=False)
    out["mean_generated_words"] = sum(len(words.tokenize(p)) for p in predictions) / n
    out["mean_reference_words"] = sum(len(words.tokenize(r)) for r in references) / n
    out["empty_predictions"] = float(sum(1 for p in predictions if not p.strip()))
    return out
