"""Where lmtune keeps things that outlive a run (converted models, tokenised data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$LMTUNE_CACHE`` (default ``~/.cache/lmtune``) joined with ``parts``, created."""
    root = Path(os.environ.get("LMTUNE_CACHE") or Path.home() / ".cache" / "lmtune")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
