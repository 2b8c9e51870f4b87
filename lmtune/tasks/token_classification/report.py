"""The token-classification report's plot: entity F1 per type, the tuned model beside its starting point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmtune.evaluate.plots import figure, note, save_figure


def plot_entity_f1(tuned: dict[str, dict[str, Any]], start: dict[str, dict[str, Any]], path: Path, *,
                   title: str) -> Path:
    """Grouped bars: F1 per entity type (with its support in the tick label), tuned vs before fine-tuning."""
    kinds = list(tuned)
    with figure(figsize=(max(5.0, 1.1 * len(kinds) + 2.5), 3.6)) as (fig, ax):
        if not kinds:
            note(ax, "no entity types")
        else:
            x = np.arange(len(kinds))
            width = 0.38
            after = [tuned[k]["f1"] for k in kinds]
            before = [start.get(k, {}).get("f1", 0.0) for k in kinds]
            ax.bar(x - width / 2, before, width, color="#bdbdbd", label="before fine-tuning")
            ax.bar(x + width / 2, after, width, color="C0", label="fine-tuned")
            for xi, v in zip(x, after, strict=True):
                ax.text(xi + width / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(x)
            ax.set_xticklabels([f"{k}\n(n={tuned[k]['support']:,})" for k in kinds])
            ax.set_ylim(0.0, 1.05)
            ax.set_ylabel("entity F1")
            ax.legend(loc="lower right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        ax.set_title(title)
        fig.tight_layout()
        return save_figure(fig, path)
