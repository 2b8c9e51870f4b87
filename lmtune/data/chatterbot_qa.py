"""The bundled ``chatterbot_qa`` set: extractive question answering (SQuAD 2.0 layout) built from the
English conversations of PyPI ``chatterbot-corpus`` (:func:`chatterbot_qa_document` says how).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lmtune.data.chatterbot import chatterbot_records
from lmtune.errors import DataError

# Answers joined into one context, and the seed of the shuffles.
QA_CONTEXT_ANSWERS = 5
QA_SEED = 0


def chatterbot_qa_document(folder: Path) -> dict[str, Any]:
    """A SQuAD v2.0 document built from chatterbot-corpus (English): how ``bundled:chatterbot_qa`` is made.

    1. Every (user turn, assistant reply) pair of every conversation (:func:`~lmtune.data.chatterbot.
       chatterbot_records`) is a question and its answer, grouped by the conversation's topic (its file).
       A question asked twice in a topic keeps its first answer; replies shorter than 2 characters go.
    2. Per topic, the distinct answers are shuffled (``random.Random(0)``) and joined, 5 at a time, into
       one context: with a space, or ". " after a reply that does not end in punctuation (a last group of
       fewer than 3 joins the one before).
    3. Every question whose answer is in that context becomes an answerable question of it, the answer
       being the whole reply at its exact character offset.
    4. Each context also gets one unanswerable question (``is_impossible: true``, no answers): a question
       of another context of the same topic whose answer does not occur in this one (case-insensitive).
       With ``data.allow_unanswerable: false`` these are skipped (counted).

    Ids are ``TOPIC-N`` (``TOPIC-N-na`` for the unanswerable ones). The spans are whole sentences, so a
    model learns to pick the reply that fits the question among replies on the same topic.
    """
    rng = random.Random(QA_SEED)
    topics: dict[str, dict[str, list[str]]] = {}  # topic -> answer -> questions
    asked: dict[str, set[str]] = {}
    for record in chatterbot_records(folder):
        messages = record["messages"]
        for user, reply in zip(messages[::2], messages[1::2], strict=True):
            q, a = user["content"].strip(), reply["content"].strip()
            if len(a) < 2 or q.lower() in asked.setdefault(record["topic"], set()):
                continue
            asked[record["topic"]].add(q.lower())
            topics.setdefault(record["topic"], {}).setdefault(a, []).append(q)
    data = []
    for topic in sorted(topics):
        answers = list(topics[topic])
        rng.shuffle(answers)
        groups = [answers[i:i + QA_CONTEXT_ANSWERS] for i in range(0, len(answers), QA_CONTEXT_ANSWERS)]
        if len(groups) > 1 and len(groups[-1]) < 3:
            groups[-2].extend(groups.pop())
        paragraphs = []
        n = 0
        for g, group in enumerate(groups):
            context, qas = "", []
            for answer in group:
                # A reply without final punctuation gets a full stop after it, so spans stay separable.
                sep = "" if not context else (" " if context[-1] in ".!?\"')" else ". ")
                start = len(context) + len(sep)
                context = f"{context}{sep}{answer}"
                for q in topics[topic][answer]:
                    n += 1
                    qas.append({"id": f"{topic}-{n}", "question": q,
                                "answers": [{"text": answer, "answer_start": start}], "is_impossible": False})
            others = [(q, a) for h, other in enumerate(groups) if h != g for a in other for q in topics[topic][a]
                      if a.lower() not in context.lower()]
            if others:
                n += 1
                q, _ = others[rng.randrange(len(others))]
                qas.append({"id": f"{topic}-{n}-na", "question": q, "answers": [], "is_impossible": True})
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": topic, "paragraphs": paragraphs})
    return {"version": "chatterbot-qa-1 (SQuAD 2.0 layout)", "data": data}


def write_chatterbot_qa(source: Path, out: Path) -> None:
    """Write :func:`chatterbot_qa_document` of chatterbot-corpus' English folder ``source`` to ``out``."""
    document = chatterbot_qa_document(source)
    if not document["data"]:
        raise DataError("no conversations found to build questions from", file=source)
    out.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
