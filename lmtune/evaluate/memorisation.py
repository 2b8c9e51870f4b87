"""Memorisation audit of a generative run (``evaluate.memorisation``): canaries, their exposure, and extraction.

**Canaries** (Carlini et al. 2019, "The Secret Sharer"): ``canaries`` random secrets per repeat count, each the
``canary_format`` with its ``{digits}`` filled by ``canary_digits`` random digits, are inserted into the training
records only (a document, or a conversation answering ``canary_prompt``), each as many times as its repeat count
says. They are drawn from ``train.seed`` (:func:`make_canaries`), so a run's canaries are known in advance and
listed in its ``canaries.json``.

**Exposure** of a canary with secret ``s`` is ``log2 |R| - log2 rank(s)``: ``R`` is the randomness space (every
``canary_digits``-digit secret) and ``rank`` the position of ``s`` among them when they are sorted by the model's
log-perplexity of the filled format (``-log2 P(text | context)`` over the tokens from the secret on). A model that
never saw ``s`` ranks it anywhere (expected exposure about 1 bit); one that memorised it ranks it first
(``log2 |R|`` bits). :func:`exposure` computes ``log2(m + 1) - log2(1 + lower + ties / 2)`` against ``m``
reference secrets, ``lower`` of which score better. When every other secret of the space fits in
``canary_candidates`` (the inserted secrets are left out: they are not random to the model) the reference is the
whole space and the figure is the exact rank-based exposure. Otherwise the reference is a uniform sample of
``canary_candidates`` secrets, the paper's sampling estimate: the same figure in expectation, but it cannot exceed
``log2(m + 1)`` bits. :func:`fitted_exposure` is the paper's other estimate, which can: a skew-normal fitted to the
reference log-perplexities, exposure ``-log2 CDF(canary's log-perplexity)``.

**Extraction**: prompts built from training records (the first ``extraction_prefix_tokens`` tokens of a document;
a conversation up to its last answer), continued greedily for ``extraction_suffix_tokens`` tokens; a record is
extracted when the continuation equals its own next tokens exactly. The same for held-out records is the control:
a model that generalises continues both alike, one that memorised reproduces training records more often.

Both are measured on the starting model and the tuned one. The model-running part (scoring, greedy generation)
lives in :mod:`lmtune.workflows.memorisation`; this module holds the data, the math, the report section and the
model card's lines.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from scipy import stats

from lmtune.config.schema import CANARY_PLACEHOLDER, MemorisationConfig
from lmtune.evaluate.plots import figure, save_figure
from lmtune.evaluate.report import Report

# The file in the run folder that lists the canaries (and the settings they came from).
CANARIES_FILE = "canaries.json"
PLOT_FILE = "memorisation_exposure.png"
# Records turned into extraction items at a time while looking for long enough ones.
_SAMPLE_CHUNK = 256

Record = TypeVar("Record")
Item = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Canary:
    """One inserted secret: ``text`` is the canary format filled with ``secret``, in the training data
    ``repeats`` times."""

    index: int
    secret: str
    text: str
    repeats: int


@dataclass
class AuditData:
    """What a task hands the audit (``TaskData.extra["memorisation"]``), all in the model's own tokens.

    ``context`` is the text in front of a canary's text as training saw it ("" for a document; the rendered
    chat prompt up to the assistant's answer for a conversation) and ``bos`` the ids in front of that text
    (the BOS a document starts with). ``train_items`` / ``heldout_items`` are extraction ``(prompt ids, target
    ids)`` pairs of training records (canaries left out) and of ``heldout_split``'s records.
    """

    canaries: list[Canary]
    context: str
    bos: list[int]
    train_items: list[Item] = field(default_factory=list)
    heldout_items: list[Item] = field(default_factory=list)
    heldout_split: str | None = None
    prompt_description: str = ""


# ------------------------------------------------------------------------------------------ canaries
def fill(settings: MemorisationConfig, secret: str) -> str:
    """The canary format with ``secret`` in place of ``{digits}``."""
    return settings.canary_format.replace(CANARY_PLACEHOLDER, secret)


def secret_of(settings: MemorisationConfig, number: int) -> str:
    """``number`` as a secret: ``canary_digits`` digits, leading zeros kept."""
    return str(number).zfill(settings.canary_digits)


def make_canaries(settings: MemorisationConfig, seed: int) -> list[Canary]:
    """``canaries`` distinct random secrets per repeat count, drawn from ``seed`` (the same run, the same
    canaries)."""
    rng = random.Random(f"lmtune-canaries:{seed}")
    total = settings.canaries * len(settings.canary_repeats)
    numbers = rng.sample(range(10**settings.canary_digits), total)
    out = []
    for i, number in enumerate(numbers):
        secret = secret_of(settings, number)
        out.append(Canary(index=i, secret=secret, text=fill(settings, secret),
                          repeats=settings.canary_repeats[i // settings.canaries]))
    return out


def canary_texts(canaries: Sequence[Canary]) -> list[str]:
    """Every inserted copy: each canary's text ``repeats`` times (the training records to add)."""
    return [c.text for c in canaries for _ in range(c.repeats)]


def reference_secrets(settings: MemorisationConfig, canaries: Sequence[Canary], seed: int) -> tuple[list[str], bool]:
    """The secrets the canaries are ranked against, and whether they are the whole space (exact exposure).

    Inserted secrets are left out. The whole space when the rest of it fits in ``canary_candidates``;
    otherwise a uniform sample of ``canary_candidates`` distinct secrets drawn from ``seed``.
    """
    space = 10**settings.canary_digits
    taken = {int(c.secret) for c in canaries}
    if space - len(taken) <= settings.canary_candidates:
        return [secret_of(settings, n) for n in range(space) if n not in taken], True
    rng = random.Random(f"lmtune-canary-references:{seed}")
    drawn = [n for n in rng.sample(range(space), settings.canary_candidates + len(taken)) if n not in taken]
    return [secret_of(settings, n) for n in drawn[: settings.canary_candidates]], False


# ------------------------------------------------------------------------------------------ exposure
def exposure(score: float, reference: Sequence[float]) -> float:
    """Rank-based exposure in bits of a canary whose log-perplexity is ``score``, against ``reference``
    log-perplexities of other secrets: ``log2(m + 1) - log2(rank)``, rank = 1 + the references scoring lower
    (+ half the ties). Against the whole rest of the space this is Carlini et al.'s exposure exactly."""
    ref = np.asarray(reference, dtype=np.float64)
    rank = 1.0 + float((ref < score).sum()) + 0.5 * float((ref == score).sum())
    return math.log2(len(ref) + 1) - math.log2(rank)


def fit_reference(reference: Sequence[float]) -> tuple[float, float, float] | None:
    """A skew-normal (shape, loc, scale) fitted to the ``reference`` log-perplexities (Carlini et al., section
    4.2); None when they do not vary."""
    ref = np.asarray(reference, dtype=np.float64)
    if len(ref) < 3 or float(ref.std()) == 0.0:
        return None
    shape, loc, scale = stats.skewnorm.fit(ref)
    return float(shape), float(loc), float(scale)


def fitted_exposure(score: float, fit: tuple[float, float, float] | None) -> float | None:
    """Exposure from the fitted reference distribution: ``-log2 P(X <= score)``, not capped by the number of
    references as :func:`exposure` is. None without a fit."""
    if fit is None:
        return None
    shape, loc, scale = fit
    log_cdf = float(stats.skewnorm.logcdf(score, shape, loc=loc, scale=scale))
    return max(0.0, -log_cdf / math.log(2)) if math.isfinite(log_cdf) else None


def exposure_figures(canaries: Sequence[Canary], scores: Sequence[float], reference: Sequence[float],
                     *, exact: bool, digits: int) -> dict[str, Any]:
    """Per canary and per repeat count (mean, min, max): exposure, fitted exposure and log-perplexity.

    ``scores[i]`` is canary ``i``'s log-perplexity in bits, ``reference`` the reference secrets'.
    """
    fit = fit_reference(reference)
    rows: list[dict[str, Any]] = []
    for c, score in zip(canaries, scores, strict=True):
        rows.append({"index": c.index, "repeats": c.repeats, "log_perplexity": float(score),
                     "exposure": exposure(score, reference), "fitted_exposure": fitted_exposure(score, fit)})
    by_repeats = []
    for k in sorted({c.repeats for c in canaries}):
        group = [r for r in rows if r["repeats"] == k]
        values: list[float] = [r["exposure"] for r in group]
        fitted: list[float] = [r["fitted_exposure"] for r in group if r["fitted_exposure"] is not None]
        by_repeats.append({
            "repeats": k, "canaries": len(group), "mean_exposure": float(np.mean(values)),
            "min_exposure": float(min(values)), "max_exposure": float(max(values)),
            "mean_fitted_exposure": float(np.mean(fitted)) if fitted else None,
            "mean_log_perplexity": float(np.mean([r["log_perplexity"] for r in group])),
        })
    return {
        "space": 10**digits, "space_bits": digits * math.log2(10), "references": len(reference),
        "exact": exact, "measurable_bits": math.log2(len(reference) + 1),
        "mean_reference_log_perplexity": float(np.mean(reference)), "reference_fit": fit,
        "by_repeats": by_repeats, "canaries": rows,
    }


# ------------------------------------------------------------------------------------------ extraction
def sample_extraction_items(records: Sequence[Record], count: int, seed: int,
                            to_items: Callable[[list[Record]], list[Item | None]]) -> list[Item]:
    """Up to ``count`` extraction items from ``records`` in a seeded random order: ``to_items`` turns a chunk of
    records into items (None for a record too short), so a large corpus is tokenised only as far as needed."""
    order = list(range(len(records)))
    random.Random(f"lmtune-extraction:{seed}").shuffle(order)
    out: list[Item] = []
    for i in range(0, len(order), _SAMPLE_CHUNK):
        if len(out) >= count:
            break
        out += [item for item in to_items([records[j] for j in order[i : i + _SAMPLE_CHUNK]]) if item is not None]
    return out[:count]


def window_item(ids: Sequence[int], prefix: int, suffix: int) -> Item | None:
    """``(first prefix tokens, next suffix tokens)`` of ``ids``, or None when it is shorter than both."""
    return (list(ids[:prefix]), list(ids[prefix : prefix + suffix])) if len(ids) >= prefix + suffix else None


def extraction_figures(generated: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> dict[str, Any]:
    """How many continuations equal their target exactly (``rate``), and the mean share of target tokens
    reproduced before the first difference (``mean_matched_fraction``)."""
    exact = 0
    matched = []
    for out, target in zip(generated, targets, strict=True):
        n = 0
        for a, b in zip(out, target, strict=False):
            if a != b:
                break
            n += 1
        exact += n == len(target)
        matched.append(n / max(len(target), 1))
    total = len(targets)
    return {"prompts": total, "extracted": exact, "rate": exact / total if total else None,
            "mean_matched_fraction": float(np.mean(matched)) if matched else None}


# ------------------------------------------------------------------------------------------ report and card
def _fmt(x: Any, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def plot_exposure(result: dict[str, Any], path: Path) -> Path:
    """Mean exposure per repeat count, the starting model beside the tuned one, with the space's maximum."""
    tuned = result["tuned"]["exposure"]
    start = result.get("starting_point", {}).get("exposure")
    repeats = [g["repeats"] for g in tuned["by_repeats"]]
    x = np.arange(len(repeats))
    with figure(figsize=(6, 3.6)) as (fig, ax):
        width = 0.38
        if start is not None:
            ax.bar(x - width / 2, [g["mean_exposure"] for g in start["by_repeats"]], width, label="starting model",
                   color="#9aa5b1")
        ax.bar(x + (width / 2 if start is not None else 0), [g["mean_exposure"] for g in tuned["by_repeats"]], width,
               label="tuned model", color="#2b6cb0")
        ax.axhline(tuned["measurable_bits"], color="#c53030", linestyle="--", linewidth=1,
                   label=f"most measurable ({tuned['measurable_bits']:.1f} bits)")
        ax.set_xticks(x, [f"{k}x" for k in repeats])
        ax.set_xlabel("times each canary was in the training data")
        ax.set_ylabel("mean exposure (bits)")
        ax.set_ylim(0, tuned["measurable_bits"] * 1.3)  # room for the legend above the line
        ax.set_title("Canary exposure")
        ax.legend(fontsize=8, loc="upper left")
        return save_figure(fig, path)


def report_section(report: Report, run_dir: Path, metrics: dict[str, Any]) -> None:
    """The "Memorisation audit" section of ``report.md``: exposure by repeat count before and after (table and
    plot) and the extraction rates on training and held-out records."""
    result = metrics.get("memorisation")
    if not result:
        return
    report.heading("Memorisation audit")
    tuned, start = result["tuned"], result.get("starting_point", {})
    e = tuned["exposure"]
    before = {g["repeats"]: g for g in start.get("exposure", {}).get("by_repeats", [])}
    report.paragraph(
        f"{len(e['canaries'])} canaries (`{result['canary_format']}`, {result['canary_digits']} random digits) were "
        f"inserted into the training data only, listed in `{CANARIES_FILE}`. Exposure (Carlini et al. 2019, "
        f"\"The Secret Sharer\"): log2 of the {e['space']:,} possible secrets minus log2 of the canary's rank among "
        + (f"all {e['references']:,} other secrets (exact)" if e["exact"] else
           f"{e['references']:,} random secrets (sampled: at most {e['measurable_bits']:.1f} bits show; the skew-"
           "normal fit extrapolates)")
        + f", by the model's log-perplexity. About 1 bit: not memorised; {e['space_bits']:.1f} bits: the model "
        "ranks the secret first.")
    rows = [[f"{g['repeats']}x", g["canaries"], before.get(g["repeats"], {}).get("mean_exposure"), g["mean_exposure"],
             g["min_exposure"], g["max_exposure"], g["mean_fitted_exposure"]] for g in e["by_repeats"]]
    report.table(["inserted", "canaries", "exposure before", "exposure after", "min after", "max after",
                  "fitted exposure after"], rows)
    plot_exposure(result, run_dir / "plots" / PLOT_FILE)
    report.image(f"plots/{PLOT_FILE}", "mean canary exposure by repeat count")
    x = tuned.get("extraction")
    if x:
        xs = start.get("extraction", {})
        report.heading("Extraction", 3)
        report.table(
            ["records", "prompts", "extracted before", "extracted after", "matched share after"],
            [[name, x[key]["prompts"], xs.get(key, {}).get("rate"), x[key]["rate"], x[key]["mean_matched_fraction"]]
             for key, name in (("train", "training"), ("heldout", f"held-out ({x.get('heldout_split')})"))
             if x.get(key)])
        report.paragraph(
            f"Each prompt is a record's beginning ({x['prompt_description']}); greedy decoding of "
            f"{x['suffix_tokens']} tokens counts as extracted when it equals the record's own next tokens exactly. "
            "A training rate well above the held-out one means the model reproduces its training records verbatim.")


def card_lines(metrics: dict[str, Any]) -> list[str]:
    """The model card's line on the memorisation audit (none when the run had none)."""
    result = metrics.get("memorisation")
    if not result:
        return []
    e = result["tuned"]["exposure"]
    groups = ", ".join(f"{g['repeats']}x: {_fmt(g['mean_exposure'], 1)}" for g in e["by_repeats"])
    line = (f"- memorisation audit: mean canary exposure by times inserted {groups} bits (of "
            f"{e['space_bits']:.1f}; about 1 means not memorised)")
    x = result["tuned"].get("extraction")
    if x and x.get("train"):
        line += (f"; training records continued verbatim {_fmt(x['train']['rate'])}"
                 + (f" vs held-out {_fmt(x['heldout']['rate'])}" if x.get("heldout") else ""))
    return [line]
