"""ACLSum from PyPI ``aclsum``: the bundled ``aclsum`` summarization data set.

ACLSum (Takeshita et al., NAACL 2024, "ACLSum: A New Dataset for Aspect-based Summarization of Scientific
Publications") is 250 ACL Anthology papers (the package's train / val / test: 100 / 50 / 100), each with
three expert-written one-sentence summaries: the paper's *challenge*, *approach* and *outcome*. The
package (licence MIT, per its metadata) ships them as JSON Lines under ``aclsum/dataset``, with every
paper's abstract, introduction and conclusion as lists of tokenised sentences.

One record per paper (JSON Lines: source, target, id, title, split):

- ``source``: the abstract, introduction and conclusion, one paragraph each (separated by a blank line),
  the sentences joined with spaces and the tokeniser's spacing undone ("rates , e.g." -> "rates, e.g.").
  About 870 words a paper (302 to 2,488): longer than a small model's context, so a run truncates
  sources and counts it.
- ``target``: the three aspect summaries in that order, joined with spaces (43 to 75 words, 66 on average).
- ``split``: the package's own split, kept for reference; lmtune splits with its seeded hold-out.

The package is installed ``--no-deps`` and never imported (it needs ``sienna``): its files are read here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmtune.data.files import write_jsonl
from lmtune.errors import DataError

ACLSUM_INSTALL = "pip install --no-deps aclsum==0.1.2"
ACLSUM_SPLITS = ("train", "val", "test")
ACLSUM_SECTIONS = ("abstract", "introduction", "conclusion")
ACLSUM_ASPECTS = ("challenge", "approach", "outcome")

# The corpus's tokeniser put spaces around punctuation and split clitics: undone in this order.
_DETOKENIZE = (
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", re.IGNORECASE), r"\1"),
    (re.compile(r"`` ?| ?''"), '"'),
    (re.compile(r" {2,}"), " "),
)


def detokenize(text: str) -> str:
    """``text`` with the corpus tokeniser's spacing undone: "( QA ) ." -> "(QA).", "is n't" -> "isn't"."""
    for pattern, repl in _DETOKENIZE:
        text = pattern.sub(repl, text)
    return text.strip()


def aclsum_records(folder: Path) -> Iterator[dict[str, Any]]:
    """One ``{source, target, id, title, split}`` record per paper of the package's ``dataset`` folder."""
    for split in ACLSUM_SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"aclsum split file {path.name} is missing", file=path,
                            hint=f"reinstall the package: {ACLSUM_INSTALL}")
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    paper = json.loads(line)
                    sections = [paper["sentences"][s] for s in ACLSUM_SECTIONS]
                    summaries = [paper["summary"][a] for a in ACLSUM_ASPECTS]
                    paper_id, title = paper["id"], paper["title"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(f"not an ACLSum paper record ({exc})", file=path, line=line_no) from None
                paragraphs = [detokenize(" ".join(sentences)) for sentences in sections if sentences]
                yield {
                    "source": "\n\n".join(p for p in paragraphs if p),
                    "target": " ".join(" ".join(s.split()) for s in summaries),
                    "id": paper_id,
                    "title": " ".join(str(title).split()),
                    "split": split,
                }


def write_aclsum(source: Path, out: Path) -> None:
    """Write the papers of ``source`` (the package's ``dataset`` folder) to ``out`` as JSON Lines."""
    write_jsonl(out, aclsum_records(source))
