"""Bias and fairness: metrics per group of a data column (fairness slices) and counterfactual term swaps.

``evaluate.slices`` names data columns holding a group (gender, dialect, source ...). A task that supports
slices (``TaskInfo.slices``) keeps each evaluated example's groups and calls :func:`slice_metrics` with its
labels and predictions: every metric per group through fairlearn's ``MetricFrame``, the largest gap and
ratio between groups, the worst group, and for classifiers the demographic-parity and equalized-odds
differences (one class against the rest; for two classes both classes give the same figure).

``evaluate.counterfactuals`` lists identity-term pairs (he/she, names ...). :func:`run_counterfactuals`
swaps them in the test inputs (whole words, either direction, capitalisation kept) and compares the
model's predictions before and after: the share that changes, the mean change of the original label's
probability, per pair, with examples. Both land in ``metrics.json``, ``report.md`` (:func:`report_section`,
one PNG per metric and column) and the model card (:func:`card_lines`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fairlearn.metrics import MetricFrame, demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import accuracy_score, f1_score

from lmtune.errors import DataError
from lmtune.evaluate.plots import figure, save_figure
from lmtune.evaluate.report import Report

# The group of an example whose slice column is empty.
MISSING_GROUP = "(missing)"
# A group with fewer examples than this gives figures the report marks as noisy.
SMALL_GROUP = 30
# Metrics compared between groups (each has a gap and a ratio), in report order.
GROUP_METRICS = ("accuracy", "macro_f1")


# ------------------------------------------------------------------------------------------ groups
def group_value(value: Any) -> str:
    """The group an example belongs to: its slice column's value as text; empty or missing is
    :data:`MISSING_GROUP` (its own group, so examples are never dropped from the figures)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING_GROUP
    text = str(value).strip()
    return text or MISSING_GROUP


def check_slice_groups(groups: dict[str, list[str]], split: str, source: str) -> None:
    """Each slice column must hold at least two groups in an evaluated split: one group has nothing to be
    compared with (a DataError naming the key, column, split and source)."""
    for column, values in groups.items():
        distinct = sorted(set(values))
        if len(distinct) < 2:
            only = repr(distinct[0]) if distinct else "no rows"
            raise DataError(
                f"evaluate.slices: column '{column}' holds a single group ({only}) in the {split} split; "
                "per-group metrics need two or more", file=source, field=column,
                hint="choose a column whose values differ between examples, or give an evaluation file with "
                "several groups")


# ------------------------------------------------------------------------------------------ per-group metrics
def _finite(x: Any) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None


def slice_metrics(y_true: np.ndarray, y_pred: np.ndarray, groups: dict[str, Sequence[str]],
                  label_names: list[str], *, multi_label: bool = False) -> dict[str, Any]:
    """Per-group metrics of a classifier for every slice column.

    ``y_true`` / ``y_pred``: class indices (N,) or, multi-label, 0/1 matrices (N, L); ``groups``: column ->
    the group of each of the N examples. Per column: ``groups`` (count, accuracy, macro F1 per group),
    ``gap`` and ``ratio`` (largest minus smallest, smallest over largest, per metric), ``worst_group``,
    ``demographic_parity_difference`` and ``equalized_odds_difference`` (``max`` over classes and
    ``per_class``: each class against the rest; multi-label: each label), ``small_groups`` (fewer than
    :data:`SMALL_GROUP` examples). Multi-label accuracy is exact-set accuracy, its F1 the macro F1 over labels.
    """
    classes = list(range(len(label_names)))
    metric_fns: dict[str, Callable[..., float]] = {
        "accuracy": accuracy_score,
        "macro_f1": partial(f1_score, average="macro", labels=classes, zero_division=0),
    }
    out: dict[str, Any] = {}
    for column, values in groups.items():
        g = np.asarray(list(values), dtype=object)
        if len(g) != len(y_true):
            raise ValueError(f"slice column {column}: {len(g)} groups for {len(y_true)} examples")
        frame = MetricFrame(metrics=metric_fns, y_true=y_true, y_pred=y_pred, sensitive_features=g)
        by_group = frame.by_group
        counts = {str(k): int(v) for k, v in zip(*np.unique(g.astype(str), return_counts=True), strict=True)}
        per_group = {str(name): {"count": counts[str(name)],
                                 **{m: _finite(by_group.loc[name, m]) for m in metric_fns}}
                     for name in by_group.index}
        differences = frame.difference(method="between_groups")
        ratios = frame.ratio(method="between_groups")
        worst = {m: str(by_group[m].astype(float).idxmin()) for m in metric_fns}
        dp: dict[str, float | None] = {}
        eo: dict[str, float | None] = {}
        for c in classes:
            t = y_true[:, c] if multi_label else (y_true == c).astype(np.int64)
            p = y_pred[:, c] if multi_label else (y_pred == c).astype(np.int64)
            dp[label_names[c]] = _finite(demographic_parity_difference(t, p, sensitive_features=g))
            eo[label_names[c]] = _finite(equalized_odds_difference(t, p, sensitive_features=g))

        def summary(per_class: dict[str, float | None]) -> dict[str, Any]:
            finite = [v for v in per_class.values() if v is not None]
            return {"max": max(finite) if finite else None, "per_class": per_class}

        out[column] = {
            "groups": per_group,
            "gap": {m: _finite(differences[m]) for m in metric_fns},
            "ratio": {m: _finite(ratios[m]) for m in metric_fns},
            "worst_group": worst,
            "demographic_parity_difference": summary(dp),
            "equalized_odds_difference": summary(eo),
            "small_groups": sorted(name for name, n in counts.items() if n < SMALL_GROUP),
        }
    return out


# ------------------------------------------------------------------------------------------ counterfactuals
def load_term_pairs(spec: list[list[str]] | str | Path) -> list[tuple[str, str]]:
    """Identity-term pairs from the config: a list of ``[a, b]`` or a file of them, one pair per line
    (``a,b`` in csv/txt, ``a<TAB>b`` in tsv, ``["a", "b"]`` in jsonl; blank lines and ``#`` comments are
    skipped). A line that is not a pair of two different, non-empty terms is a DataError naming file:line."""
    if not isinstance(spec, (str, Path)):
        return [(a.strip(), b.strip()) for a, b in spec]
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the term pairs: {exc}", file=str(path), field="evaluate.counterfactuals") from None
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    pairs: list[tuple[str, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if jsonl:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not JSON: {exc.msg}", file=str(path), line=n, field="evaluate.counterfactuals",
                                hint='one pair per line, e.g. ["he", "she"]') from None
            terms = value if isinstance(value, list) else None
        else:
            terms = [t.strip() for t in line.split(delimiter)]
        if (terms is None or len(terms) != 2 or not all(isinstance(t, str) and t.strip() for t in terms)
                or terms[0].strip().lower() == terms[1].strip().lower()):
            example = '["he", "she"]' if jsonl else f"he{delimiter}she".replace("\t", "<TAB>")
            raise DataError(f"expected a pair of two different terms, found {line[:80]!r}", file=str(path), line=n,
                            field="evaluate.counterfactuals", hint=f"one pair per line, e.g. {example}")
        pairs.append((terms[0].strip(), terms[1].strip()))
    if not pairs:
        raise DataError("no term pairs in the file", file=str(path), field="evaluate.counterfactuals")
    return pairs


def _cased_like(word: str, template: str) -> str:
    """``word`` in ``template``'s capitalisation: HE -> SHE, He -> She, he -> she."""
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


class TermSwapper:
    """Swaps every term of the pairs for its partner in one pass (he -> she and she -> he together), matching
    whole words case-insensitively and keeping each match's capitalisation. A term in several pairs takes the
    partner of its first pair."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.partner: dict[str, str] = {}
        self.pair_of: dict[str, str] = {}
        for a, b in pairs:
            name = f"{a}/{b}"
            for x, y in ((a, b), (b, a)):
                if x.lower() not in self.partner:
                    self.partner[x.lower()] = y
                    self.pair_of[x.lower()] = name
        terms = sorted(self.partner, key=len, reverse=True)
        self.pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(t) for t in terms) + r")(?!\w)", re.IGNORECASE)

    def swap(self, text: str) -> tuple[str, list[str]]:
        """The text with its terms swapped, and the pairs that matched (in order of first match)."""
        hits: list[str] = []

        def replace(m: re.Match[str]) -> str:
            key = m.group(0).lower()
            if self.pair_of[key] not in hits:
                hits.append(self.pair_of[key])
            return _cased_like(self.partner[key], m.group(0))

        return self.pattern.sub(replace, text), hits

    def swap_item(self, item: Any) -> tuple[Any, list[str]]:
        """:meth:`swap` on a predictor item: a text, or each text value of a mapping (a text pair)."""
        if isinstance(item, str):
            return self.swap(item)
        if isinstance(item, dict):
            out, hits = {}, []
            for key, value in item.items():
                if isinstance(value, str):
                    value, found = self.swap(value)
                    hits += [h for h in found if h not in hits]
                out[key] = value
            return out, hits
        return item, []


def _answer(prediction: dict[str, Any]) -> Any:
    """What a prediction says: its label, or its label set (multi-label)."""
    if "label" in prediction:
        return prediction["label"]
    return sorted(prediction.get("labels", []))


def run_counterfactuals(items: Sequence[Any], pairs: Sequence[tuple[str, str]],
                        predict: Callable[[list[Any]], list[dict[str, Any]]], *, examples: int = 5) -> dict[str, Any]:
    """Predict every item the term swap changes, before and after the swap, and compare.

    ``predict`` answers a list of items with one prediction each (a ``label`` or ``labels``, and optionally
    ``probabilities``). Returns the counts (``items``, ``changed``: items holding a term, ``flipped``), the
    ``flip_rate`` over changed items, ``mean_abs_probability_change`` of the original answer's label (when
    predictions carry probabilities), ``by_pair`` (changed, flipped, flip_rate) and up to ``examples``
    flipped items (original, swapped, both answers)."""
    swapper = TermSwapper(pairs)
    changed: list[tuple[Any, Any, list[str]]] = []
    for item in items:
        swapped, hits = swapper.swap_item(item)
        if hits:
            changed.append((item, swapped, hits))
    result: dict[str, Any] = {"pairs": [f"{a}/{b}" for a, b in pairs], "items": len(items), "changed": len(changed),
                              "flipped": 0, "flip_rate": None, "mean_abs_probability_change": None,
                              "by_pair": {}, "examples": []}
    if not changed:
        return result
    before = predict([c[0] for c in changed])
    after = predict([c[1] for c in changed])
    deltas: list[float] = []
    by_pair: dict[str, dict[str, Any]] = {}
    for (item, swapped, hits), b, a in zip(changed, before, after, strict=True):
        flipped = _answer(b) != _answer(a)
        label = b.get("label")
        if label is not None and "probabilities" in b and "probabilities" in a:
            deltas.append(abs(float(a["probabilities"][label]) - float(b["probabilities"][label])))
        for pair in hits:
            entry = by_pair.setdefault(pair, {"changed": 0, "flipped": 0})
            entry["changed"] += 1
            entry["flipped"] += int(flipped)
        if flipped:
            result["flipped"] += 1
            if len(result["examples"]) < examples:
                result["examples"].append({"original": item, "swapped": swapped, "before": _answer(b),
                                           "after": _answer(a)})
    for entry in by_pair.values():
        entry["flip_rate"] = entry["flipped"] / entry["changed"]
    result["by_pair"] = by_pair
    result["flip_rate"] = result["flipped"] / len(changed)
    result["mean_abs_probability_change"] = float(np.mean(deltas)) if deltas else None
    return result


# ------------------------------------------------------------------------------------------ report and card
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "column"


def plot_group_metric(groups: dict[str, dict[str, Any]], start: dict[str, dict[str, Any]], metric: str,
                      path: Path, *, title: str) -> Path:
    """Bars of ``metric`` per group: the tuned model, and beside it the starting point where measured."""
    names = list(groups)
    tuned = [groups[n].get(metric) or 0.0 for n in names]
    before = [start.get(n, {}).get(metric) for n in names]
    x = np.arange(len(names))
    width = 0.4 if any(v is not None for v in before) else 0.8
    with figure(figsize=(max(5.0, 0.9 * len(names) + 2.0), 3.6)) as (fig, ax):
        ax.bar(x - (width / 2 if width < 0.8 else 0), tuned, width, label="fine-tuned", color="C0")
        if width < 0.8:
            ax.bar(x + width / 2, [v or 0.0 for v in before], width, label="starting point", color="#9ecae1")
            ax.legend(loc="lower right", fontsize=8)
        for xi, v, n in zip(x, tuned, names, strict=True):
            ax.text(xi - (width / 2 if width < 0.8 else 0), v, f"{v:.3f}\nn={groups[n]['count']}", ha="center",
                    va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
        ax.set_ylim(0, 1.15)
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        return save_figure(fig, path)


def report_section(report: Report, run_dir: Path, metrics: dict[str, Any]) -> None:
    """The "Bias and fairness" section of ``report.md``: per-group tables and plots of the first evaluated
    split with slices (test, else validation) beside the starting point, and the counterfactual check."""
    split = next((s for s in ("test", "validation") if metrics.get(s, {}).get("slices")), None)
    counterfactuals = metrics.get("counterfactuals")
    if split is None and not counterfactuals:
        return
    report.heading("Bias and fairness")
    if split is not None:
        start_slices = metrics.get("starting_point", {}).get(split, {}).get("slices", {})
        for column, s in metrics[split]["slices"].items():
            start_groups = start_slices.get(column, {}).get("groups", {})
            report.heading(f"By `{column}` ({split})", 3)
            rows = [[name, g["count"], g["accuracy"], g["macro_f1"], start_groups.get(name, {}).get("accuracy")]
                    for name, g in s["groups"].items()]
            report.table(["group", "examples", "accuracy", "macro F1", "accuracy before fine-tuning"], rows)
            dp, eo = s["demographic_parity_difference"], s["equalized_odds_difference"]
            start_gap = start_slices.get(column, {}).get("gap", {}).get("accuracy")
            notes = [
                f"largest gap between groups: accuracy {_fmt(s['gap']['accuracy'])} (worst group "
                f"`{s['worst_group']['accuracy']}`; ratio {_fmt(s['ratio']['accuracy'])}"
                + (f"; before fine-tuning {_fmt(start_gap)}" if start_gap is not None else "") + "), macro F1 "
                f"{_fmt(s['gap']['macro_f1'])} (ratio {_fmt(s['ratio']['macro_f1'])})",
                f"demographic-parity difference (largest gap in how often a class is predicted, over classes): "
                f"{_fmt(dp['max'])}; equalized-odds difference (largest gap in true- or false-positive rate): "
                f"{_fmt(eo['max'])}. 0 is parity.",
            ]
            if s["small_groups"]:
                notes.append(f"groups under {SMALL_GROUP} examples give noisy figures: "
                             + ", ".join(f"`{g}`" for g in s["small_groups"][:20]))
            report.bullets(notes)
            for metric in GROUP_METRICS:
                rel = f"plots/slices_{_safe_name(column)}_{metric}.png"
                plot_group_metric(s["groups"], start_groups, metric, run_dir / rel, title=f"{metric} by {column}")
                report.image(rel, f"{metric} by {column}")
    if counterfactuals:
        report.heading("Counterfactual term swaps", 3)
        c = counterfactuals
        report.paragraph(
            f"Test inputs holding one of the terms ({', '.join(f'`{p}`' for p in c['pairs'][:20])}) were predicted "
            f"again with the terms swapped: {c['changed']:,} of {c['items']:,} inputs hold a term, and "
            f"**{c['flipped']:,}** of them ({_fmt(c['flip_rate'])}) change their prediction"
            + (f"; the original label's probability moves by {_fmt(c['mean_abs_probability_change'])} on average"
               if c.get("mean_abs_probability_change") is not None else "") + ".")
        if c["by_pair"]:
            report.table(["pair", "inputs", "changed prediction", "share"],
                         [[p, e["changed"], e["flipped"], e["flip_rate"]] for p, e in c["by_pair"].items()])
        if c["examples"]:
            report.table(["input", "swapped", "prediction", "after the swap"],
                         [[_short(e["original"]), _short(e["swapped"]), str(e["before"]), str(e["after"])]
                          for e in c["examples"]])


def card_lines(metrics: dict[str, Any]) -> list[str]:
    """The model card's "Bias and fairness" section: per-group gaps and the counterfactual flip rate, or a
    plain statement that neither was measured."""
    split = next((s for s in ("test", "validation") if metrics.get(s, {}).get("slices")), None)
    c = metrics.get("counterfactuals")
    lines = ["## Bias and fairness", ""]
    if split is None and not c:
        lines += ["Not measured: no group column was given (`evaluate.slices`) and no counterfactual terms "
                  "(`evaluate.counterfactuals`). The training data's biases carry over to the model.", ""]
        return lines
    for column, s in (metrics[split]["slices"] if split else {}).items():
        groups = ", ".join(f"`{name}` {_fmt(g['accuracy'])} (n={g['count']})" for name, g in s["groups"].items())
        lines.append(f"- `{column}` ({split}): accuracy by group {groups}; largest gap "
                     f"{_fmt(s['gap']['accuracy'])}; demographic-parity difference "
                     f"{_fmt(s['demographic_parity_difference']['max'])}, equalized-odds difference "
                     f"{_fmt(s['equalized_odds_difference']['max'])}")
    if c:
        lines.append(f"- counterfactual term swaps ({', '.join(c['pairs'][:10])}): {c['flipped']} of {c['changed']} "
                     f"test inputs holding a term change their prediction ({_fmt(c['flip_rate'])})")
    return [*lines, ""]


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _short(item: Any, limit: int = 160) -> str:
    text = item if isinstance(item, str) else " / ".join(str(v) for v in item.values()) if isinstance(item, dict) \
        else str(item)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
