"""Reading relation data into pair records, and writing the marked text the model reads.

Three layouts, told apart by their columns (names from ``data.columns``, defaults below):

- **pairs with spans**: ``text``, ``head`` and ``tail`` (``{start, end, type}``, end exclusive; a JSON
  string in a CSV cell), ``relation``;
- **inline markers** (SemEval 2010 Task 8): ``text`` holding ``<e1>...</e1>`` and ``<e2>...</e2>``
  (untyped: the type is ``ENTITY``), ``relation``;
- **documents**: ``text``, ``entities`` (``[{start, end, type}]``) and ``relations``
  (``[{head, tail, relation}]``, ``head``/``tail`` an entity's index or its ``id``), expanded into every
  ordered pair of distinct entities; a pair without a relation gets the no-relation label.

A pair record is ``{text, head: (start, end, type), tail: (...), relation, line}``. Every malformed cell
is a DataError naming the file, the line and the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lmtune.errors import DataError

# Column names a config may rename through ``data.columns`` (``{head: subject, tail: object}``).
DEFAULT_COLUMNS = {"head": "head", "tail": "tail", "relation": "relation", "entities": "entities",
                   "relations": "relations"}
# The type of an entity marked without one (SemEval's <e1>/<e2>).
UNTYPED = "ENTITY"
# Label names read as "no relation holds" when the config names none, in this order.
NO_RELATION_NAMES = ("no_relation", "Other", "NA", "None", "no relation")
DOCUMENT_NO_RELATION = "no_relation"

INLINE = re.compile(r"</?e[12]>")

Span = tuple[int, int, str]


def markers(entity_type: str) -> tuple[str, str, str, str]:
    """The four marker tokens of an entity type: head start/end, tail start/end."""
    return f"[E1:{entity_type}]", f"[/E1:{entity_type}]", f"[E2:{entity_type}]", f"[/E2:{entity_type}]"


def mark(text: str, head: Span, tail: Span) -> str:
    """``text`` with typed markers around the head and the tail (they never overlap)."""
    h_open, h_close, _, _ = markers(head[2])
    _, _, t_open, t_close = markers(tail[2])
    spans = sorted([(head, h_open, h_close), (tail, t_open, t_close)], key=lambda s: s[0][0])
    out, at = [], 0
    for (start, end, _), opening, closing in spans:
        out += [text[at:start], f" {opening} ", text[start:end], f" {closing} "]
        at = end
    out.append(text[at:])
    return "".join(out)


def _as_json(value: Any, source: str, line: int, field: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else None
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg}", file=source, line=line, field=field) from None
    return value


def read_span(value: Any, text: str, source: str, line: int, field: str) -> Span:
    """A ``{start, end, type}`` cell as a checked span: integer offsets inside ``text``, not empty."""
    value = _as_json(value, source, line, field)
    if not isinstance(value, dict):
        raise DataError(f"expected an entity {{start, end, type}}, found {type(value).__name__}", file=source,
                        line=line, field=field)
    start, end = value.get("start"), value.get("end")
    kind = value.get("type", value.get("label", UNTYPED))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        raise DataError("an entity needs integer character offsets 'start' and 'end'", file=source, line=line,
                        field=field)
    assert isinstance(start, int) and isinstance(end, int)
    if not 0 <= start < end <= len(text):
        what = "is empty" if start == end else f"is outside the text ({len(text)} characters)"
        raise DataError(f"the span [{start}, {end}) {what}", file=source, line=line, field=field)
    if not isinstance(kind, str) or not kind.strip() or any(c in kind for c in "[]: "):
        raise DataError(f"an entity type must be a word without spaces, ':' or brackets, found {kind!r}",
                        file=source, line=line, field=field)
    if not text[start:end].strip():
        raise DataError(f"the span [{start}, {end}) holds only whitespace", file=source, line=line, field=field)
    return start, end, kind


def check_pair(head: Span, tail: Span, source: str, line: int, field: str) -> None:
    """Head and tail must not overlap (the markers could not both be placed)."""
    if head[0] < tail[1] and tail[0] < head[1]:
        raise DataError(f"the head [{head[0]}, {head[1]}) and the tail [{tail[0]}, {tail[1]}) overlap",
                        file=source, line=line, field=field)


def parse_inline(marked: str, source: str, line: int, field: str) -> tuple[str, Span, Span]:
    """Text with ``<e1>..</e1>`` and ``<e2>..</e2>`` as (plain text, head span, tail span)."""
    found = INLINE.findall(marked)
    if sorted(found) != sorted(["<e1>", "</e1>", "<e2>", "</e2>"]):
        raise DataError("expected exactly one <e1>...</e1> and one <e2>...</e2>, found "
                        f"{' '.join(found) or 'no markers'}", file=source, line=line, field=field)
    plain: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    open_at: dict[str, int] = {}
    at = 0
    length = 0
    for m in INLINE.finditer(marked):
        piece = marked[at:m.start()]
        plain.append(piece)
        length += len(piece)
        tag = m.group(0)
        name = tag.strip("</>")
        if tag.startswith("</"):
            if name not in open_at:
                raise DataError(f"{tag} closes an entity that is not open", file=source, line=line, field=field)
            spans[name] = (open_at.pop(name), length)
        else:
            if open_at:
                raise DataError(f"{tag} opens inside another entity (markers overlap)", file=source, line=line,
                                field=field)
            open_at[name] = length
        at = m.end()
    plain.append(marked[at:])
    text = "".join(plain)
    for name in ("e1", "e2"):
        start, end = spans[name]
        if not text[start:end].strip():
            raise DataError(f"<{name}> marks an empty entity", file=source, line=line, field=field)
    return text, (*spans["e1"], UNTYPED), (*spans["e2"], UNTYPED)


def document_pairs(text: str, entities: Any, relations: Any, no_relation: str, source: str, line: int,
                   fields: tuple[str, str]) -> list[dict[str, Any]]:
    """Every ordered pair of a document's distinct entities, labelled from its relation triples."""
    ent_field, rel_field = fields
    entities = _as_json(entities, source, line, ent_field) or []
    relations = _as_json(relations, source, line, rel_field) or []
    if not isinstance(entities, list) or not isinstance(relations, list):
        raise DataError("entities and relations must be lists", file=source, line=line,
                        field=ent_field if not isinstance(entities, list) else rel_field)
    spans = [read_span(e, text, source, line, ent_field) for e in entities]
    ids = {e.get("id"): i for i, e in enumerate(entities) if isinstance(e, dict) and e.get("id") is not None}
    labelled: dict[tuple[int, int], str] = {}
    for r in relations:
        if not isinstance(r, dict):
            raise DataError(f"a relation must be {{head, tail, relation}}, found {type(r).__name__}",
                            file=source, line=line, field=rel_field)
        ends = []
        for key in ("head", "tail"):
            ref = r.get(key)
            index = ids.get(ref, ref) if not isinstance(ref, bool) else None
            if not isinstance(index, int) or not 0 <= index < len(spans):
                raise DataError(f"relation {key} {ref!r} is not an entity of this document (give an index 0.."
                                f"{len(spans) - 1} or an entity id)", file=source, line=line, field=rel_field)
            ends.append(index)
        label = r.get("relation", r.get("type", r.get("label")))
        if not isinstance(label, str) or not label.strip():
            raise DataError("a relation needs a non-empty 'relation' name", file=source, line=line, field=rel_field)
        pair = (ends[0], ends[1])
        if pair[0] == pair[1]:
            raise DataError("a relation joins an entity to itself", file=source, line=line, field=rel_field)
        if labelled.get(pair, label) != label:
            raise DataError(f"two relations for the same pair: {labelled[pair]!r} and {label!r}", file=source,
                            line=line, field=rel_field)
        labelled[pair] = label.strip()
    out = []
    for i, head in enumerate(spans):
        for j, tail in enumerate(spans):
            if i == j:
                continue
            if head[0] < tail[1] and tail[0] < head[1]:
                if (i, j) in labelled:
                    check_pair(head, tail, source, line, rel_field)
                continue  # nested or overlapping mentions: no pair to mark
            out.append({"text": text, "head": head, "tail": tail, "relation": labelled.get((i, j), no_relation),
                        "line": line})
    return out


def no_relation_label(configured: str | None, labels: set[str]) -> str | None:
    """The label meaning "no relation": the configured one, else the first of NO_RELATION_NAMES present."""
    if configured:
        return configured
    return next((name for name in NO_RELATION_NAMES if name in labels), None)
