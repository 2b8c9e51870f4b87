"""Preference data built from the English ChatterBot corpus: the bundled ``chatterbot_pairs`` and ``chatterbot_kto``.

What the pairs teach: to answer the question that was asked rather than give a fluent answer to something else.
Each single-question conversation of the corpus (one user turn, one assistant turn; 1,957 of them) gives a pair:

- ``prompt``: the question, as one user message;
- ``chosen``: the corpus's own answer to it;
- ``rejected``: the answer to ANOTHER question, from a different topic file (ai, food, sports, ...), picked at
  random with a fixed seed, so the file is the same on every machine. An answer that the corpus also gives to
  the same question (the same question text, anywhere) is never picked, nor one with the same text as the
  chosen answer: the rejected answer is always one the corpus does not give to this question.

Both answers are well-formed sentences of the same corpus and style, so what separates them is only whether
they answer the question: a model that learns the preference learns to attend to the question. It is a small,
honest demo (the corpus is a toy chit-chat set; its answers are short and sometimes whimsical), not a
benchmark of helpfulness.

``chatterbot_pairs`` (JSON Lines, TRL's conversational shape): ``prompt`` (messages), ``chosen`` and
``rejected`` (each ``[{"role": "assistant", "content": ...}]``) and ``topic`` (the question's).
``chatterbot_kto`` (JSON Lines, unpaired): the same pairs taken apart, each giving a desirable row (``label``
true, the chosen answer) and an undesirable one (``label`` false, the rejected answer), in ``prompt``,
``completion`` and ``label`` (and ``topic``), shuffled with a fixed seed so that a pair's two rows are not
neighbours.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from lmtune.data.chatterbot import CHATTERBOT_INSTALL, chatterbot_records
from lmtune.data.files import write_jsonl
from lmtune.errors import DataError

# Seeds of the rejected-answer draw and of the KTO row order: fixed, so the bundled files never change.
PAIRS_SEED = 14
KTO_SEED = 15
# Random draws for a rejected answer before the candidates are listed in full.
_DRAWS = 100


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def chatterbot_pair_records(folder: Path, seed: int = PAIRS_SEED) -> list[dict[str, Any]]:
    """The preference pairs of one chatterbot-corpus language folder (see the module docstring), in corpus order.

    A DataError when the folder holds no single-question conversation, or one of them has no answer from
    another topic to pair with.
    """
    questions = [record for record in chatterbot_records(folder) if len(record["messages"]) == 2]
    if not questions:
        raise DataError("no single-question conversations found", file=folder,
                        hint=f"reinstall it: {CHATTERBOT_INSTALL}")
    # Every answer the corpus gives to each question (same text, any topic): never a rejected answer to it.
    answers_to: dict[str, set[str]] = defaultdict(set)
    for record in questions:
        question, answer = record["messages"]
        answers_to[_normalised(question["content"])].add(_normalised(answer["content"]))
    rng = random.Random(seed)
    pairs = []
    for record in questions:
        question, answer = record["messages"]
        given = answers_to[_normalised(question["content"])]

        def fits(other: dict[str, Any], given: set[str] = given, topic: str = record["topic"]) -> bool:
            return other["topic"] != topic and _normalised(other["messages"][1]["content"]) not in given

        # Draw until an answer fits (nearly always at once: 21 topics); the full list only if draws keep missing.
        drawn = (questions[rng.randrange(len(questions))] for _ in range(_DRAWS))
        other = next((candidate for candidate in drawn if fits(candidate)), None)
        if other is None:
            candidates = [candidate for candidate in questions if fits(candidate)]
            if not candidates:
                raise DataError(f"no answer from another topic to pair with {question['content']!r}", file=folder)
            other = rng.choice(candidates)
        rejected = other["messages"][1]["content"]
        pairs.append({
            "prompt": [{"role": "user", "content": question["content"]}],
            "chosen": [{"role": "assistant", "content": answer["content"]}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "topic": record["topic"],
        })
    return pairs


def chatterbot_kto_records(folder: Path, seed: int = KTO_SEED) -> list[dict[str, Any]]:
    """The pairs of :func:`chatterbot_pair_records` as unpaired rows: chosen desirable, rejected undesirable,
    shuffled with ``seed``."""
    rows = []
    for pair in chatterbot_pair_records(folder):
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": pair["prompt"], "completion": pair[side], "label": label, "topic": pair["topic"]})
    random.Random(seed).shuffle(rows)
    return rows


def write_chatterbot_pairs(source: Path, out: Path) -> None:
    """A ``BundledDataset.write`` function: the preference pairs of one language folder as JSON Lines."""
    write_jsonl(out, chatterbot_pair_records(source))


def write_chatterbot_kto(source: Path, out: Path) -> None:
    """A ``BundledDataset.write`` function: the unpaired (KTO) rows of one language folder as JSON Lines."""
    write_jsonl(out, chatterbot_kto_records(source))
