"""Lead-N, the summarization baseline every model must beat: the document's first N sentences as its summary.

News and paper abstracts put the point first, so lead-3 is a strong baseline (on CNN/DailyMail it beats
many trained systems). The seq2seq task scores lead-1 and lead-3 on the same held-out sources, with the same
ROUGE (:func:`lmtune.tasks.seq2seq.metrics.seq2seq_metrics`), as the starting and the tuned model, so the
report shows whether tuning learned more than "copy the opening".

Sentences are split by :func:`split_sentences`, a rule-based splitter (NLTK's punkt models are a separate
download, and a pickle): a sentence ends at ``.``, ``!`` or ``?`` (closing quotes and brackets kept with
it) followed by white space and a capital letter, a digit or an opening quote or bracket, unless the word
before the full stop is a known abbreviation ("Mr.", "e.g.", "et al.", "Fig.") or a single capital letter
(an initial: "J. Smith"). Decimals ("3.5") and "U.S." inside a sentence never end one, having no space
after the dot. A blank line (a paragraph break) always ends a sentence.
"""

from __future__ import annotations

import re

from lmtune.tasks.seq2seq.metrics import seq2seq_metrics

# Lower-cased, without the final dot. Titles, Latin and scholarly abbreviations, months, company forms.
_ABBREVIATION_WORDS = (
    "mr mrs ms dr prof sr jr st mt rev gen col lt sgt capt gov sen rep hon pres "
    "vs etc e.g i.e cf al fig figs eq eqs sec ch vol no nos pp p approx ca resp "
    "jan feb mar apr jun jul aug sep sept oct nov dec "
    "inc ltd co corp dept univ assn bros u.s u.k u.n"
)
ABBREVIATIONS = frozenset(_ABBREVIATION_WORDS.split())
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9])")
_PARAGRAPH = re.compile(r"\n\s*\n")
_WORD_BEFORE = re.compile(r"(\S+)$")
LEAD_NS = (1, 3)  # the lead-N baselines the report shows


def _ends_sentence(text: str, end: int) -> bool:
    """Whether the punctuation run ending at ``end`` closes a sentence (not an abbreviation or initial)."""
    run = text[:end].rstrip("\"'”’)]")
    if not run.endswith("."):
        return True  # "!" or "?"
    word = _WORD_BEFORE.search(run[:-1])
    if word is None:
        return True
    token = word.group(1).lstrip("\"'“‘([").lower()
    if token in ABBREVIATIONS:
        return False
    return not (len(token) == 1 and token.isalpha())  # an initial: "J. Smith"


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, in order, each stripped and on one line (see the module docstring)."""
    sentences: list[str] = []
    for paragraph in _PARAGRAPH.split(text):
        start = 0
        for match in _BOUNDARY.finditer(paragraph):
            if _ends_sentence(paragraph, match.end()):
                sentences.append(paragraph[start : match.end()])
                start = match.end()
        sentences.append(paragraph[start:])
    return [s for s in (" ".join(s.split()) for s in sentences) if s]


def lead_n(document: str, n: int) -> str:
    """The first ``n`` sentences of ``document`` joined with spaces (all of it when it has fewer)."""
    if n < 1:
        raise ValueError(f"lead_n: n must be at least 1, got {n}")
    return " ".join(split_sentences(document)[:n])


def lead_scores(sources: list[str], references: list[str], ns: tuple[int, ...] = LEAD_NS) -> dict[str, dict[str, float]]:
    """``{"lead_N": ROUGE scores}`` of the lead-N summaries of ``sources`` against ``references``, per N.

    The same ROUGE-1/2/L/Lsum (and word counts) as the models get, on the same sources.
    """
    return {f"lead_{n}": seq2seq_metrics([lead_n(s, n) for s in sources], references, "summarization") for n in ns}
