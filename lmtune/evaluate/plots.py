"""PNG plots for the run report: training curves, confusion matrix, metric comparison.

Every function writes one file, creates its folder, closes its figure (a long run or a server
must not accumulate open figures) and returns the path. The Agg backend is forced because runs
happen on headless machines and in worker threads, where an interactive backend fails.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

# pyplot must be imported after the backend is chosen.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure

from lmtune.config.schema import lower_is_better

# Fonts with CJK glyphs, used as fallbacks after DejaVu Sans when one is installed.
_CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Microsoft YaHei",
    "PingFang SC",
    "Hiragino Sans GB",
    "SimHei",
)
# Above this many labels a confusion matrix cell is too small to hold a number.
_MAX_ANNOTATED_LABELS = 20
_DPI = 120


@contextlib.contextmanager
def figure(**subplots: Any) -> Iterator[tuple[Figure, Any]]:
    """A new figure and its axes, closed on the way out whatever happens.

    Inside, fonts can show CJK labels when the system has a CJK font (tried after DejaVu Sans),
    and missing-glyph warnings are silenced: without such a font CJK labels render as boxes,
    which is acceptable; a warning per character is not.
    """
    installed = {f.name for f in font_manager.fontManager.ttflist}
    fallbacks = [name for name in _CJK_FONTS if name in installed]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph .* missing from.*")
        with matplotlib.rc_context({"font.family": ["DejaVu Sans", *fallbacks]}):
            fig, axes = plt.subplots(**subplots)
            try:
                yield fig, axes
            finally:
                plt.close(fig)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def note(ax: Any, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def ema(values: list[float], smoothing: float = 0.9) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it): early points are not pulled to 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = smoothing * average + (1 - smoothing) * value
        out.append(average / (1 - smoothing**i))
    return out


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over ``rows``, skipping rows without it or with a non-finite value."""
    steps, values = [], []
    for row in rows:
        step, value = row.get("step"), row.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def plot_training_curves(records: list[dict[str, Any]], path: Path, *, metric: str | None = None) -> Path:
    """Loss, validation metric and learning rate against the optimizer step, from metrics.jsonl rows.

    Left: training loss (raw, faint; smoothed with an EMA) and the loss of every evaluation split.
    Middle: ``metric`` on every evaluation split, the best point of the first split marked (the
    minimum for loss-like names). Right: the learning rate. Rows with ``split == "train"`` are
    training rows; any other split is an evaluation. A log with no (or one) evaluation row still
    gives a readable figure.
    """
    train = [r for r in records if r.get("split") == "train"]
    eval_splits = list(
        dict.fromkeys(str(r["split"]) for r in records if r.get("split") not in (None, "train"))
    )
    eval_rows = {s: [r for r in records if r.get("split") == s] for s in eval_splits}
    with figure(ncols=3, figsize=(15, 4.2)) as (fig, (ax_loss, ax_metric, ax_lr)):
        _loss_panel(ax_loss, train, eval_rows)
        _metric_panel(ax_metric, eval_rows, metric)
        _lr_panel(ax_lr, train)
        fig.tight_layout()
        return save_figure(fig, path)


def _loss_panel(ax: Any, train: list[dict[str, Any]], eval_rows: dict[str, list[dict[str, Any]]]) -> None:
    steps, losses = _series(train, "loss")
    drawn = False
    if steps:
        ax.plot(steps, losses, color="C0", alpha=0.25, linewidth=1)
        ax.plot(steps, ema(losses), color="C0", linewidth=1.8, label="train (EMA)")
        drawn = True
    for i, (split, rows) in enumerate(eval_rows.items()):
        eval_steps, eval_losses = _series(rows, "loss")
        if eval_steps:
            ax.plot(eval_steps, eval_losses, color=f"C{i + 1}", marker="o", markersize=4, label=split)
            drawn = True
    if not drawn:
        note(ax, "no loss recorded")
    else:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax.set_title("loss")
    ax.set_xlabel("step")


def _metric_panel(ax: Any, eval_rows: dict[str, list[dict[str, Any]]], metric: str | None) -> None:
    ax.set_title(metric or "validation metric")
    if not metric:
        note(ax, "no metric chosen")
        return
    drawn = False
    for i, (split, rows) in enumerate(eval_rows.items()):
        steps, values = _series(rows, metric)
        if not steps:
            continue
        ax.plot(steps, values, color=f"C{i + 1}", marker="o", markersize=4, label=split)
        if not drawn:
            # The best point of the first evaluation split (usually validation) picks the checkpoint.
            best = int(np.argmin(values) if lower_is_better(metric) else np.argmax(values))
            ax.scatter(
                [steps[best]], [values[best]], s=140, marker="*", color="gold", edgecolor="black", zorder=5
            )
            ax.annotate(
                f"best {values[best]:.4g} @ {steps[best]:g}",
                (steps[best], values[best]),
                textcoords="offset points",
                xytext=(6, -14),
                fontsize=8,
            )
        drawn = True
    if not drawn:
        note(ax, f"no evaluation rows with '{metric}'")
        return
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_xlabel("step")


def _lr_panel(ax: Any, train: list[dict[str, Any]]) -> None:
    ax.set_title("learning rate")
    steps, rates = _series(train, "learning_rate")
    if not steps:
        note(ax, "no learning rate recorded")
        return
    ax.plot(steps, rates, color="C7")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.set_xlabel("step")


def plot_confusion_matrix(
    matrix: list[list[int]], label_names: list[str], path: Path, *, normalize: bool = True, title: str = ""
) -> Path:
    """A confusion matrix heat map (rows = true, columns = predicted) with counts in the cells.

    With ``normalize`` the colours show each row's share (recall per class), so a rare class is as
    visible as a common one; the annotations are always the raw counts. Fonts shrink and tick
    labels rotate as labels grow; above 20 labels the cells carry no numbers.
    """
    counts = np.asarray(matrix, dtype=np.float64)  # (L, L)
    num_labels = len(label_names)
    if counts.shape != (num_labels, num_labels):
        raise ValueError(
            f"plot_confusion_matrix: matrix shape {counts.shape} != ({num_labels}, {num_labels})"
        )
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        colours = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        vmax = 1.0
    else:
        colours = counts
        vmax = max(float(counts.max()), 1.0)
    side = min(max(4.0, 0.42 * num_labels + 2.5), 16.0)
    tick_size = 10 if num_labels <= 10 else max(5, int(10 - (num_labels - 10) / 4))
    rotate = num_labels > 4
    with figure(figsize=(side + 1.0, side)) as (fig, ax):
        image = ax.imshow(colours, cmap="Blues", vmin=0.0, vmax=vmax)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="row share" if normalize else "count")
        ticks = np.arange(num_labels)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels(
            label_names, fontsize=tick_size, rotation=45 if rotate else 0, ha="right" if rotate else "center"
        )
        ax.set_yticklabels(label_names, fontsize=tick_size)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if title:
            ax.set_title(title)
        if num_labels <= _MAX_ANNOTATED_LABELS:
            cell_size = 11 if num_labels <= 6 else max(6, int(11 - (num_labels - 6) / 2))
            for i in range(num_labels):
                for j in range(num_labels):
                    # White text on dark cells, black on light ones.
                    colour = "white" if colours[i, j] > 0.6 * vmax else "black"
                    ax.text(
                        j,
                        i,
                        f"{int(counts[i, j]):,}",
                        ha="center",
                        va="center",
                        fontsize=cell_size,
                        color=colour,
                    )
        fig.tight_layout()
        return save_figure(fig, path)


def plot_metric_comparison(rows: list[tuple[str, float]], path: Path, *, metric: str) -> Path:
    """Horizontal bars of ``metric`` for each (model name, value), top to bottom in the given order.

    Values are written beside their bars; the best bar (lowest for loss-like metrics) is darker.
    A value of None or NaN is shown as "n/a" with no bar.
    """
    names = [name for name, _ in rows]
    values = [float(v) if v is not None and math.isfinite(float(v)) else math.nan for _, v in rows]
    with figure(figsize=(7.5, max(2.0, 0.5 * len(rows) + 1.2))) as (fig, ax):
        if not rows:
            note(ax, "nothing to compare")
        else:
            finite = [v for v in values if not math.isnan(v)]
            best = (min(finite) if lower_is_better(metric) else max(finite)) if finite else None
            positions = np.arange(len(rows))
            ax.barh(
                positions,
                [0.0 if math.isnan(v) else v for v in values],
                color=["C0" if v == best else "#9ecae1" for v in values],
            )
            ax.set_yticks(positions)
            ax.set_yticklabels(names)
            ax.invert_yaxis()  # the first row on top, as in the report's table
            if finite and min(finite) >= 0:
                # Room on the right for the value labels.
                ax.set_xlim(0.0, max(max(finite), 1e-12) * 1.2)
            for y, v in zip(positions, values, strict=True):
                label = "n/a" if math.isnan(v) else f"{v:.4f}"
                ax.text(0.0 if math.isnan(v) else max(v, 0.0), y, f" {label}", va="center", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(metric)
        ax.set_title(metric)
        fig.tight_layout()
        return save_figure(fig, path)


# Token attributions: green for evidence for the explained answer, red against it (ColorBrewer RdYlGn ends).
_FOR_RGB = (0.102, 0.588, 0.255)
_AGAINST_RGB = (0.843, 0.188, 0.153)
_MAX_SHOWN_WORDS = 80


def attribution_colour(score: float) -> tuple[float, float, float]:
    """The background of a word with attribution ``score`` in [-1, 1]: white at 0, green (for) or red (against)
    with strength ``|score|``."""
    strength = min(1.0, abs(float(score))) * 0.75
    rgb = _FOR_RGB if score >= 0 else _AGAINST_RGB
    return (1 - strength * (1 - rgb[0]), 1 - strength * (1 - rgb[1]), 1 - strength * (1 - rgb[2]))


def _attribution_pieces(text: str, spans: list[tuple[int, int, float]]) -> list[tuple[str, float | None, bool]]:
    """``text`` as (piece, score or None, space before) in reading order: the attributed words and any other
    visible text between them; at most :data:`_MAX_SHOWN_WORDS` words, then an ellipsis."""
    pieces: list[tuple[str, float | None, bool]] = []
    at = 0
    for n, (start, end, score) in enumerate(sorted(spans)):
        if n == _MAX_SHOWN_WORDS:
            pieces.append(("…", None, True))
            return pieces
        gap = text[at:start] if start > at else ""
        if gap.strip():
            pieces.append((gap.strip(), None, gap[:1].isspace()))
        pieces.append((text[start:end], score, bool(gap) and gap[-1:].isspace()))
        at = max(at, end)
    if text[at:].strip():
        pieces.append((text[at:].strip(), None, text[at:at + 1].isspace()))
    return pieces


def plot_token_attributions(examples: list[tuple[str, str, list[tuple[int, int, float]]]], path: Path, *,
                            title: str, width: float = 9.0) -> Path:
    """Texts with each word on a background coloured by its attribution (``explain``'s word scores in [-1, 1]):
    green for evidence for the explained answer, red against it, white for none. ``examples`` are
    ``(caption, text, [(start, end, score)])``; lines wrap at ``width`` inches."""
    fontsize, line = 10.0, 0.26  # points; inches per line
    with figure(figsize=(width, 1.0)) as (fig, ax):
        ax.set_axis_off()
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]

        def inches(s: str, **kw: Any) -> float:
            probe = fig.text(0, 0, s, fontsize=fontsize, **kw)
            size = float(probe.get_window_extent(renderer).width) / fig.dpi
            probe.remove()
            return size

        space = inches("a b") - inches("ab")
        # Lay every example out first (x, line, piece), so the figure's height is known before drawing.
        placed: list[tuple[float, int, str, float | None, bool]] = []
        row = 0
        for caption, text, spans in examples:
            placed.append((0.0, row, caption, None, True))
            row += 1
            x = 0.0
            for piece, score, spaced in _attribution_pieces(text, spans):
                w = inches(piece)
                if x > 0 and x + (space if spaced else 0) + w > width - 0.3:
                    row, x = row + 1, 0.0
                elif x > 0 and spaced:
                    x += space
                placed.append((x, row, piece, score, False))
                x += w
            row += 2  # a blank line between examples
        height = max(1.0, (row + 1) * line)
        fig.set_size_inches(width, height)
        for x, r, piece, score, bold in placed:
            y = height - (r + 1.5) * line
            kw: dict[str, Any] = {"fontweight": "bold"} if bold else {}
            if score is not None:
                kw["bbox"] = {"boxstyle": "square,pad=0.12", "fc": attribution_colour(score), "ec": "none"}
            fig.text(x / width + 0.01, y / height, piece, fontsize=fontsize, va="baseline",
                     transform=fig.transFigure, **kw)
        if not examples:
            note(ax, "no examples")
        fig.suptitle(title, x=0.01, ha="left", fontsize=11)
        return save_figure(fig, path)
