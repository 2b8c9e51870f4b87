"""Extractive question-answering data: SQuAD-format JSON and flat tables, validated, with answers repaired.

Two layouts are read:

- **SQuAD JSON** (v1.1 and v2.0): ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
  "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``. Each question keeps its
  path in the document (``data[3].paragraphs[1].qas[0]``) and, where it can be found, the line of its
  ``"id"`` in the file, so errors point at the record.
- **Flat rows** (JSONL, CSV, Parquet, ... through :func:`lmtune.data.readers.read_table`): a question, a
  context and either an ``answers`` column (``{"text": [...], "answer_start": [...]}`` as in Hugging Face's
  ``squad``, a list of ``{"text", "answer_start"}``, or JSON text of either) or ``answer_text`` +
  ``answer_start`` columns (scalars or lists). Column names come from ``data.*_column``.

An answer whose text is not at its ``answer_start`` is searched for in the context (the occurrence closest
to the given start wins, as many SQuAD loaders do); found, it is *repaired*, else *dropped*. Both are
counted and the first locations logged. A question left without an answer is dropped, unless it is
marked unanswerable (``is_impossible``, or no answers given) and ``data.allow_unanswerable`` is on.

Splitting questions so that a context's questions stay together is :func:`lmtune.data.splits.split_by_context`;
the bundled ``chatterbot_qa`` set is built by ``lmtune/data/chatterbot_qa.py``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.data.files import decode, read_bytes
from lmtune.data.pii import read_data_table
from lmtune.data.readers import resolve_source
from lmtune.data.table import Table
from lmtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Locations listed in a log message about repaired or dropped answers (counts are always exact).
_SHOW = 10


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def _is_json_file(path: Path) -> bool:
    name = path.name.lower()
    for compression in (".gz", ".bz2", ".xz"):
        name = name.removesuffix(compression)
    return path.is_file() and name.endswith(".json")


def is_squad_document(document: Any) -> bool:
    """Whether a parsed JSON document has the SQuAD layout (``data`` of articles holding ``paragraphs``)."""
    if not isinstance(document, dict) or not isinstance(document.get("data"), list) or not document["data"]:
        return False
    first = document["data"][0]
    return isinstance(first, dict) and "paragraphs" in first


def _id_lines(text: str, ids: list[str]) -> list[int | None]:
    """The line of each question's ``"id": ...`` in the JSON text, searched in document order."""
    out: list[int | None] = []
    pos, line, counted = 0, 1, 0
    for qid in ids:
        found = None
        for literal in {json.dumps(qid, ensure_ascii=False), json.dumps(qid)}:
            m = re.compile(r'"id"\s*:\s*' + re.escape(literal)).search(text, pos)
            if m is not None and (found is None or m.start() < found.start()):
                found = m
        if found is None:
            out.append(None)
            continue
        line += text.count("\n", counted, found.start())
        counted = found.start()
        pos = found.end()
        out.append(line)
    return out


def read_squad_json(document: dict[str, Any], text: str, source: str) -> list[dict[str, Any]]:
    """The questions of a SQuAD document as raw items ``{id, question, context, answers, is_impossible,
    line, where}`` (``where``: the question's path in the document, for error messages)."""
    items: list[dict[str, Any]] = []
    for a, article in enumerate(document["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError("an article must be an object with a 'paragraphs' list", file=source,
                            field=f"data[{a}].paragraphs")
        for p, paragraph in enumerate(article["paragraphs"]):
            where_p = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict):
                raise DataError("a paragraph must be an object with 'context' and 'qas'", file=source, field=where_p)
            if not isinstance(paragraph.get("qas"), list):
                raise DataError("missing 'qas' (a list of questions)", file=source, field=f"{where_p}.qas")
            context = paragraph.get("context")
            for q, qa in enumerate(paragraph["qas"]):
                where = f"{where_p}.qas[{q}]"
                if not isinstance(qa, dict):
                    raise DataError("a question must be an object", file=source, field=where)
                items.append({
                    "id": None if qa.get("id") is None else str(qa.get("id")),
                    "question": qa.get("question"), "context": context, "answers": qa.get("answers", []),
                    "is_impossible": qa.get("is_impossible"), "line": None, "where": where,
                    "context_field": f"{where_p}.context",
                })
    for item, line in zip(items, _id_lines(text, [str(i["id"]) for i in items]), strict=True):
        item["line"] = line if item["id"] is not None else None
    return items


def _parse_answers_cell(value: Any, source: str, line: int, field: str) -> list[dict[str, Any]]:
    """An ``answers`` cell as a list of ``{text, answer_start}`` (HF dict-of-lists, list of dicts, JSON text)."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5000-digit number, [[[[...
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply or a number too long"
            raise DataError(f"answers are not valid JSON: {reason}", file=source, line=line, field=field,
                            hint='e.g. {"text": ["1912"], "answer_start": [40]}') from None
    if value is None:
        return []
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        if texts is None:
            raise DataError("answers need a 'text' list", file=source, line=line, field=field)
        texts = list(texts) if isinstance(texts, (list, tuple, np.ndarray)) else [texts]
        starts = (list(starts) if isinstance(starts, (list, tuple, np.ndarray)) else [starts]) \
            if starts is not None else [None] * len(texts)
        if len(starts) != len(texts):
            raise DataError(f"answers hold {len(texts)} texts but {len(starts)} answer_start values",
                            file=source, line=line, field=field)
        return [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]
    if isinstance(value, (list, tuple, np.ndarray)):
        out = []
        for j, a in enumerate(value):
            if not isinstance(a, dict):
                raise DataError(f"answer {j} is {type(a).__name__}, not an object with text and answer_start",
                                file=source, line=line, field=field)
            out.append(a)
        return out
    raise DataError(f"answers must be a list or an object, found {type(value).__name__}", file=source, line=line,
                    field=field)


def read_flat(table: Table, cfg: Any) -> list[dict[str, Any]]:
    """Raw items from the rows of a :class:`~lmtune.data.table.Table` (column names from ``cfg``, a
    DataConfig)."""
    questions = table.column(cfg.question_column)
    contexts = table.column(cfg.context_column)
    if cfg.answers_column in table.columns:
        answers_cells: list[Any] = table.column(cfg.answers_column)
        mode = "answers"
    elif cfg.answer_text_column in table.columns:
        texts = table.column(cfg.answer_text_column)
        starts = table.column(cfg.answer_start_column) if cfg.answer_start_column in table.columns \
            else [None] * len(table)
        answers_cells = [{"text": t if isinstance(t, (list, tuple, np.ndarray)) else ([] if _blank(t) else [t]),
                          "answer_start": s if isinstance(s, (list, tuple, np.ndarray)) else
                          (None if _blank(s) else [s])} for t, s in zip(texts, starts, strict=True)]
        mode = "columns"
    else:
        raise DataError(f"no answers: the table needs an '{cfg.answers_column}' column, or "
                        f"'{cfg.answer_text_column}' (+ '{cfg.answer_start_column}')", file=table.source,
                        hint="name yours with data.answers_column or data.answer_text_column / "
                        f"data.answer_start_column; the columns are: {', '.join(table.columns)}")
    ids = table.column(cfg.id_column) if cfg.id_column in table.columns else [None] * len(table)
    impossible = table.column("is_impossible") if "is_impossible" in table.columns else [None] * len(table)
    items = []
    for q, c, cell, qid, imp, line in zip(questions, contexts, answers_cells, ids, impossible, table.lines,
                                          strict=True):
        field = cfg.answers_column if mode == "answers" else cfg.answer_text_column
        if mode == "answers":
            answers = _parse_answers_cell(cell, table.source, line, field)
        else:
            if cell["answer_start"] is None:
                cell = {"text": cell["text"], "answer_start": None}
            answers = _parse_answers_cell(cell, table.source, line, field)
        items.append({"id": None if _blank(qid) else str(qid), "question": q, "context": c, "answers": answers,
                      "is_impossible": imp, "line": line, "where": None, "context_field": cfg.context_column,
                      "answers_field": field})
    return items


def read_qa_items(source: str, cfg: Any) -> tuple[list[dict[str, Any]], str, str]:
    """Raw question items of one data source, its display name and its layout (``squad`` or ``table``)."""
    path = resolve_source(source)
    if _is_json_file(path):
        text = decode(read_bytes(path, source), cfg.encoding, source)
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, a 5000-digit number, [[[[... 100k deep
            document = None  # let the table reader report it (with its line) or read it as JSON Lines
        if is_squad_document(document):
            if getattr(cfg, "pii", "off") != "off":
                raise ConfigError("data.pii is not applied to SQuAD-format JSON documents", file=source,
                                  hint="convert the file to flat rows (JSON Lines of question, context, answers), "
                                  "or set data.pii: off")
            return read_squad_json(document, text, source), source, "squad"
    table = read_data_table(source, cfg)
    return read_flat(table, cfg), table.source, "table"


def _start(value: Any) -> int | None:
    """An answer_start value as an int (CSV strings, parquet floats), None when absent or not a number."""
    if _blank(value) or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int with 400 digits
        return None
    return int(f) if f.is_integer() and f >= 0 else None


def _locate(context: str, text: str, start: int | None) -> int | None:
    """Where ``text`` occurs in ``context``: at ``start`` if it is there, else the occurrence nearest it."""
    if start is not None and context[start:start + len(text)] == text:
        return start
    hits = [m.start() for m in re.finditer(re.escape(text), context)]
    if not hits:
        return None
    return min(hits, key=lambda h: abs(h - (start or 0)))


def clean_items(items: list[dict[str, Any]], source: str, *, allow_unanswerable: bool,
                empty_text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validated examples ``{id, question, context, answers, line, where}`` (answers: located
    ``{text, answer_start}``; empty for an unanswerable question) and counts of what was repaired/dropped."""
    out: list[dict[str, Any]] = []
    counts = {"answers_repaired": 0, "answers_located": 0, "answers_dropped": 0, "questions_dropped": 0,
              "skipped_empty": 0, "skipped_unanswerable": 0}
    shown: dict[str, list[str]] = {"repaired": [], "dropped": [], "empty": []}
    seen_ids: set[str] = set()
    for n, item in enumerate(items):
        line, where = item["line"], item["where"]
        loc = f"{source}:{line}" if line is not None else source
        if where:
            loc += f" ({where})"
        q_field = f"{where}.question" if where else None
        for key, field in (("question", q_field or "question"), ("context", item["context_field"])):
            value = item[key]
            if value is not None and not isinstance(value, str) and not _blank(value):
                raise DataError(f"expected text, found {type(value).__name__}", file=source, line=line, field=field)
        if item["question"] is None and where:
            raise DataError("missing 'question'", file=source, line=line, field=q_field)
        if _blank(item["question"]) or _blank(item["context"]):
            what = "question" if _blank(item["question"]) else "context"
            if empty_text == "error":
                raise DataError(f"empty {what}", file=source, line=line,
                                field=q_field if what == "question" and where else
                                (item["context_field"] if what == "context" else "question"),
                                hint="set data.empty_text: skip to drop such questions (they are counted)")
            counts["skipped_empty"] += 1
            shown["empty"].append(loc)
            continue
        question = str(item["question"]).lstrip()  # some SQuAD questions start with many spaces
        context = str(item["context"])
        answers_field = f"{where}.answers" if where else item.get("answers_field", "answers")
        if not isinstance(item["answers"], list):
            raise DataError("answers must be a list", file=source, line=line, field=answers_field)
        located = []
        for j, answer in enumerate(item["answers"]):
            field = f"{answers_field}[{j}]"
            if not isinstance(answer, dict) or "text" not in answer:
                raise DataError("an answer needs 'text' (and 'answer_start')", file=source, line=line, field=field)
            text = answer["text"]
            if not isinstance(text, str) or not text.strip():
                raise DataError("an answer's text must be non-empty text", file=source, line=line,
                                field=f"{field}.text")
            given = _start(answer.get("answer_start"))
            if given is None and not _blank(answer.get("answer_start")):
                raise DataError(f"answer_start must be a character offset, found {answer.get('answer_start')!r}",
                                file=source, line=line, field=f"{field}.answer_start")
            start = _locate(context, text, given)
            if start is None:
                counts["answers_dropped"] += 1
                shown["dropped"].append(f"{loc} {field}")
                continue
            if given is None:
                counts["answers_located"] += 1
            elif start != given:
                counts["answers_repaired"] += 1
                shown["repaired"].append(f"{loc} {field} ({given} -> {start})")
            located.append({"text": text, "answer_start": start})
        impossible = bool(item["is_impossible"]) and not _blank(item["is_impossible"])
        if impossible or not item["answers"]:
            if not allow_unanswerable:
                counts["skipped_unanswerable"] += 1
                continue
            located = []
        elif not located:
            counts["questions_dropped"] += 1
            continue
        qid = item["id"] if item["id"] is not None else f"{Path(source).name}:{line if line is not None else n + 1}"
        if qid in seen_ids:
            qid = f"{qid}#{n}"
        seen_ids.add(qid)
        out.append({"id": qid, "question": question, "context": context, "answers": located,
                    "line": line, "where": where})
    for kind, key in (("repaired", "answers_repaired"), ("dropped", "answers_dropped"), ("empty", "skipped_empty")):
        if counts[key]:
            what = {"repaired": "answers not at their answer_start were found nearby and repaired",
                    "dropped": "answers do not occur in their context and were dropped",
                    "empty": "questions with an empty question or context were skipped"}[kind]
            more = " ..." if len(shown[kind]) > _SHOW else ""
            log.warning("%s: %d %s: %s%s", source, counts[key], what, "; ".join(shown[kind][:_SHOW]), more)
    if counts["questions_dropped"]:
        log.warning("%s: %d questions lost every answer and were dropped", source, counts["questions_dropped"])
    if counts["skipped_unanswerable"]:
        log.warning("%s: %d unanswerable questions skipped (set data.allow_unanswerable: true to train on them)",
                    source, counts["skipped_unanswerable"])
    counts["examples_with_answer"] = sum(1 for r in out if r["answers"])
    counts["examples_without_answer"] = len(out) - counts["examples_with_answer"]
    return out, counts


def iter_questions(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every question of a SQuAD document with its context (for statistics and tests)."""
    for article in document["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                yield {**qa, "context": paragraph["context"]}
