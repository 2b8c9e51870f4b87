"""Relations in raw text: a saved NER model finds the entities, a saved relation model labels every pair.

Tasks never import each other, so the two are composed here, each through its own run's predictor
(``Run.predictor()``: the registered predictor of the run's task, never named). The NER predictor answers
``{entities: [{entity, text, start, end, score}]}`` per text; the relation predictor takes a document
``{text, entities: [{start, end, type}]}`` and answers ``{relations: [{head, relation, tail, score}]}``
with character offsets into the text it was given.

Pairs are formed within a sentence (a cut after ``.``, ``!``, ``?`` and their CJK forms, then whitespace,
or at a line break) unless ``sentences=False``; the offsets are shifted back into the whole text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lmtune.data.readers import read_table
from lmtune.errors import DataError, RunError
from lmtune.workflows.predictions import check_output, rename_taken, write_predictions
from lmtune.workflows.run import Run

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text`` (whitespace between them left out)."""
    spans, at = [], 0
    for m in SENTENCE_END.finditer(text):
        if m.start() > at:
            spans.append((at, m.start()))
        at = m.end()
    if at < len(text):
        spans.append((at, len(text)))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def _entities_in(entities: list[dict[str, Any]], start: int, end: int) -> list[dict[str, Any]]:
    """The NER entities inside [start, end), as relation-model entities with offsets relative to ``start``."""
    return [{"start": e["start"] - start, "end": e["end"] - start, "type": e["entity"]}
            for e in entities if start <= e["start"] and e["end"] <= end]


def _shift(triple: dict[str, Any], offset: int, text: str) -> dict[str, Any]:
    out = dict(triple)
    for end in ("head", "tail"):
        span = dict(triple[end])
        span["start"] += offset
        span["end"] += offset
        span["text"] = text[span["start"]:span["end"]]
        out[end] = span
    return out


def extract_relations(relation_run: str | Path | Run, ner_run: str | Path | Run, texts: list[str], *,
                      sentences: bool = True, batch_size: int = 32) -> list[dict[str, Any]]:
    """Per text: the entities the NER run found and the relation triples between them (no-relation pairs left
    out), offsets into the text. Entity types the relation model does not know are left out of its pairs
    (counted in ``skipped_entities``)."""
    relation = relation_run if isinstance(relation_run, Run) else Run.load(relation_run)
    ner = ner_run if isinstance(ner_run, Run) else Run.load(ner_run)
    if ner.generative or relation.generative:
        raise RunError("the relation pipeline takes an entity-tagging run and a relation run, not a text generator")
    known = set(relation.meta.get("entity_types") or [])
    # A relation model records its no-relation class (an NER model records entity types too, not that).
    if not known or "no_relation_label" not in relation.meta:
        raise RunError(f"{relation.path} is not a relation model run (its lmtune.json names no entity types "
                       "and no no-relation class)", hint="give the relation run first and the NER run with --ner")
    tagged = ner.predictor().predict(list(texts), batch_size=batch_size)
    if any(not isinstance(found, dict) or "entities" not in found for found in tagged):
        raise RunError(f"{ner.path} does not tag entities (its predictions have no 'entities')",
                       hint="--ner takes a token-classification (NER) run")
    documents, where = [], []
    results: list[dict[str, Any]] = []
    for n, (text, found) in enumerate(zip(texts, tagged, strict=True)):
        entities = found.get("entities", [])
        usable = [e for e in entities if e["entity"] in known]
        results.append({"text": text, "entities": entities, "relations": [],
                        "skipped_entities": len(entities) - len(usable)})
        spans = split_sentences(text) if sentences else [(0, len(text))]
        for start, end in spans:
            inside = _entities_in(usable, start, end)
            if len(inside) >= 2:
                documents.append({"text": text[start:end], "entities": inside})
                where.append((n, start))
    answers = relation.predictor().predict(documents, batch_size=batch_size) if documents else []
    for (n, start), answer in zip(where, answers, strict=True):
        results[n]["relations"] += [_shift(t, start, texts[n]) for t in answer["relations"]]
    return results


def extract_relations_file(relation_run: str | Path, ner_run: str | Path, input: str | Path, output: str | Path, *,
                           text_column: str | None = None, batch_size: int = 32, sentences: bool = True) -> int:
    """:func:`extract_relations` for every row of a file's text column (``text_column``, else the NER run's
    training text column, else ``text``), written like ``lmtune predict`` writes (input columns kept);
    returns the rows written. An empty text is a DataError naming its line."""
    relation, ner = Run.load(relation_run), Run.load(ner_run)
    check_output(output)
    table = read_table(str(input))
    column = text_column or str(ner.meta.get("text_column") or "text")
    if column not in table.columns:
        raise DataError(f"needs a '{column}' column; the columns are: {', '.join(repr(c) for c in table.columns)}",
                        file=table.source, hint="name the column with --text-column")
    texts = []
    for value, line in zip(table.column(column), table.lines, strict=True):
        if not isinstance(value, str) or not value.strip():
            raise DataError("empty text", file=table.source, line=line, field=column)
        texts.append(value)
    results = extract_relations(relation, ner, texts, sentences=sentences, batch_size=batch_size)
    return write_predictions(output, table, rename_taken(table, [{k: v for k, v in r.items() if k != "text"}
                                                                 for r in results]),
                             cells=lambda r: {k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict))
                                              else v for k, v in r.items()})
