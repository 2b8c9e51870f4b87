"""What a study leaves in its folder, and reading it back (``lmtune tune``, the studio).

``trials.json``/``trials.csv`` (one row per trial: number, state, value, params, run folder, duration),
``importance.png`` and ``parallel_coordinates.png`` (Optuna's plots, drawn with matplotlib), ``best.yaml``
(the best trial's whole config, ready for ``lmtune train``) and ``study.md`` (the summary). The table is
rewritten after every trial, so :func:`describe_study` and :func:`list_studies` show a study as it runs.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # plots are files: no display is needed, or wanted, on a training machine

# pyplot and Optuna's matplotlib plots must be imported after the backend is chosen.
import matplotlib.pyplot as plt
import optuna
import optuna.visualization.matplotlib as optuna_plots
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from lmtune.config import load_config, save_config
from lmtune.data.features import save_json_atomic
from lmtune.errors import StudyError

TRIALS_FILE = "trials.json"
PLOT_FILES = ("importance.png", "parallel_coordinates.png")

__all__ = ["PLOT_FILES", "TRIALS_FILE", "describe_study", "list_studies", "public_url", "study_summary",
           "trial_rows", "write_study_files", "write_trials_table"]


def public_url(url: str) -> str:
    """The storage URL without its password (it is written into files and printed)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except (ValueError, sqlalchemy.exc.ArgumentError):
        return url


def _row(trial: FrozenTrial) -> dict[str, Any]:
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    attrs = trial.user_attrs
    return {
        "number": trial.number, "state": trial.state.name.lower(), "value": trial.value, "params": trial.params,
        "run": attrs.get("run"), "duration_seconds": duration, "default": bool(attrs.get("default")),
        "pruned_at_step": attrs.get("pruned_at_step"), "tokens_seen": attrs.get("tokens_seen"),
        "test_value": attrs.get("test_value"), "note": attrs.get("refused") or attrs.get("error"),
    }


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain row per trial of ``study``, in trial order."""
    return [_row(t) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]


def study_summary(name: str, path: Path, direction: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The studio's StudySummary: counts by state and the best complete trial."""
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = None
    if done:
        pick = max if direction == "maximize" else min
        top = pick(done, key=lambda r: r["value"])
        best = {"value": top["value"], "params": top["params"], "run": top["run"], "number": top["number"]}
    return {"name": name, "path": str(path), "trials": len(rows), "complete": len(done),
            "pruned": sum(r["state"] == "pruned" for r in rows), "failed": sum(r["state"] == "fail" for r in rows),
            "best": best, "direction": direction}


def write_trials_table(study: optuna.Study, study_dir: Path, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write ``trials.json`` (study facts and rows) and ``trials.csv``, each atomically; returns the rows."""
    rows = trial_rows(study)
    direction = study.direction.name.lower()
    previous = _read_trials(study_dir) if (study_dir / TRIALS_FILE).is_file() else {}
    info = {**previous.get("info", {}), **(extra or {}), "direction": direction,
            "metric": study.metric_names[0] if study.metric_names else None}
    save_json_atomic(study_dir / TRIALS_FILE, {"study": study_summary(study.study_name, study_dir, direction, rows),
                                               "info": info, "trials": rows})
    keys = sorted({k for r in rows for k in r["params"]})
    tmp = study_dir / f".trials.csv.tmp-{os.getpid()}"  # several workers may write the table at once
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", *keys, "run", "duration_seconds", "pruned_at_step", "note"])
        for r in rows:
            writer.writerow([r["number"], r["state"], r["value"], *(r["params"].get(k) for k in keys), r["run"],
                             r["duration_seconds"], r["pruned_at_step"], r["note"]])
    os.replace(tmp, study_dir / "trials.csv")
    return rows


def _save_figure(path: Path) -> None:
    """Save pyplot's current figure through a temporary file: workers finishing together each write whole files."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    plt.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _plots(study: optuna.Study, study_dir: Path) -> list[str]:
    """Draw the importance and parallel-coordinates plots; returns why each one that was not drawn was not."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    varied = [k for k in {k for t in complete for k in t.params} if len({repr(t.params.get(k)) for t in complete}) > 1]
    why: list[str] = []
    for name in PLOT_FILES:
        (study_dir / name).unlink(missing_ok=True)  # a stale plot from fewer trials would mislead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if len(complete) >= 2 and varied and len({t.value for t in complete}) == 1:
            why.append("importance.png not drawn: every complete trial scored the same, so no parameter "
                       "explains a difference")
        elif len(complete) >= 2 and varied:
            try:
                optuna_plots.plot_param_importances(study)
                _save_figure(study_dir / "importance.png")
            except (RuntimeError, ValueError) as exc:
                why.append(f"importance.png not drawn: {exc}")
            finally:
                plt.close("all")
        else:
            why.append(f"importance.png not drawn: it needs 2 complete trials with a parameter that varies "
                       f"({len(complete)} complete, {len(varied)} varying)")
        if complete:
            optuna_plots.plot_parallel_coordinate(study)
            _save_figure(study_dir / "parallel_coordinates.png")
            plt.close("all")
        else:
            why.append("parallel_coordinates.png not drawn: no trial is complete")
    return why


def write_study_files(study: optuna.Study, study_dir: Path, base: dict[str, Any], metric: str, storage: str,
                      notes: list[str]) -> Path | None:
    """Write the table, the plots, ``best.yaml`` and ``study.md``; returns best.yaml (None without a complete
    trial). ``notes`` gains why a plot was not drawn."""
    rows = write_trials_table(study, study_dir, {"storage": public_url(storage)})
    notes.extend(_plots(study, study_dir))
    summary = study_summary(study.study_name, study_dir, study.direction.name.lower(), rows)
    best_path: Path | None = None
    if summary["best"] is not None:
        best_path = study_dir / "best.yaml"
        best_cfg = load_config(base, {**summary["best"]["params"], "output_dir": base["output_dir"]})
        save_config(best_cfg, best_path)
    tmp = study_dir / f".study.md.tmp-{os.getpid()}"
    tmp.write_text(_markdown(summary, rows, metric, storage, notes), encoding="utf-8")
    os.replace(tmp, study_dir / "study.md")
    return best_path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The trials as a Markdown table (study.md, the docs)."""
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", "state", f"validation {metric}", *keys, "seconds", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        note = "default config" if r["default"] else ""
        if r["pruned_at_step"] is not None:
            note = f"pruned at step {r['pruned_at_step']}"
        elif r["note"]:
            note = str(r["note"])[:120]
        cells = [str(r["number"]), r["state"], _fmt(r["value"]), *(_fmt(r["params"].get(k)) for k in keys),
                 _fmt(round(r["duration_seconds"], 1) if r["duration_seconds"] is not None else None), note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _markdown(summary: dict[str, Any], rows: list[dict[str, Any]], metric: str, storage: str,
              notes: list[str]) -> str:
    best = summary["best"]
    lines = [f"# Study {summary['name']}", "",
             f"{summary['trials']} trials ({summary['complete']} complete, {summary['pruned']} pruned, "
             f"{summary['failed']} failed); objective: {summary['direction']} validation {metric}.",
             f"Storage: `{public_url(storage)}`.", ""]
    if best is not None:
        lines += [f"Best: trial {best['number']}, validation {metric} {best['value']:.4f}, "
                  f"{', '.join(f'{k}={_fmt(v)}' for k, v in best['params'].items())}; run folder `{best['run']}`; "
                  "its whole config is `best.yaml` (`lmtune train best.yaml`).", ""]
    lines += [markdown_table(rows, metric), ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _read_trials(study_dir: Path) -> dict[str, Any]:
    path = study_dir / TRIALS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudyError(f"cannot read the study table: {exc}", file=path,
                         hint="run `lmtune tune` on the study's config again to rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
        raise StudyError("the study table is not an lmtune trials.json", file=path)
    return data


def describe_study(study_dir: Path) -> dict[str, Any]:
    """A study folder as the studio shows it: ``{"study": StudySummary, "trials": [rows], "plots": [files]}``
    (the table as the last finished trial left it)."""
    study_dir = Path(study_dir)
    data = _read_trials(study_dir)
    info = data.get("study") or {}
    summary = study_summary(str(info.get("name") or study_dir.name), study_dir,
                            str(info.get("direction") or "maximize"), data["trials"])
    plots = [name for name in (*PLOT_FILES, "study.md", "best.yaml", "trials.csv") if (study_dir / name).is_file()]
    return {"study": summary, "trials": data["trials"], "plots": plots, "info": data.get("info", {})}


def list_studies(root: Path) -> list[dict[str, Any]]:
    """The StudySummary of every study folder directly under ``root`` (default layout: ``studies/NAME``),
    by name; a folder whose table cannot be read is left out."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if (p / TRIALS_FILE).is_file()):
        try:
            out.append(describe_study(folder)["study"])
        except StudyError:
            continue
    return out
