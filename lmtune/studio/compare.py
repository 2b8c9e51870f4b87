"""Runs side by side (config diff, metrics, curves on shared axes, baseline tables), a run's report as
safe HTML, and tuning studies as the studio lists them (read by ``lmtune tune``'s own functions)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import yaml

from lmtune.studio.progress import read_records
from lmtune.studio.workspace import SKIPPED_METRIC_KEYS, NotFound, Workspace, clean_json, flatten, read_json
from lmtune.workflows.tune_report import describe_study, list_studies

# Keys every run has different values for without being a setting that differs (where the run was written).
NOT_SETTINGS = {"output_dir"}
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
BOLD = re.compile(r"\*\*([^*]+)\*\*")
CODE = re.compile(r"`([^`]+)`")
BULLET = re.compile(r"^\s*[-*]\s+")


def compare(ws: Workspace, names: list[str], summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The contract's compare answer for the runs ``names`` (their summaries given)."""
    configs, metrics = [], []
    for name in names:
        run_dir = ws.run_dir(name)
        if not (run_dir / "run.json").is_file():
            raise NotFound(f"no run {name!r} in runs/")
        try:
            config = yaml.safe_load(ws.config_yaml(name) or "{}")
        except yaml.YAMLError:
            config = {}
        configs.append(flatten(config if isinstance(config, dict) else {}))
        values = read_json(run_dir / "metrics.json")
        metrics.append(flatten(values if isinstance(values, dict) else {}, skip=SKIPPED_METRIC_KEYS))
    config_diff = []
    for key in sorted(set().union(*configs)):
        values = [c.get(key) for c in configs]
        if key not in NOT_SETTINGS and any(v != values[0] for v in values):
            config_diff.append({"key": key, "values": values})
    metric_rows = []
    for key in sorted(set().union(*metrics)):
        values = [m.get(key) for m in metrics]
        if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
            metric_rows.append({"key": key, "values": values})
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        records, _ = read_records(ws.run_dir(name))
        series: dict[str, list[list[float]]] = {}
        for rec in records:
            split, step = rec.get("split"), rec.get("step")
            if split not in ("train", "validation") or not isinstance(step, int):
                continue
            for key, value in rec.items():
                if key in ("step", "epoch", "split", "eval_seconds", "num_examples", "learning_rate", "grad_norm",
                           "tokens_per_second") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                series.setdefault(f"{split}.{key}", []).append([step, value])
        for key, points in series.items():
            curves.setdefault(key, []).append({"run": name, "points": points})
    baselines = []
    for name in names:
        table = read_json(ws.run_dir(name) / "comparison.json")
        rows = []
        if isinstance(table, dict) and isinstance(table.get("rows"), list):
            for row in table["rows"]:
                if isinstance(row, dict):
                    scores = row.get("metrics")
                    rows.append({"name": row.get("name"), "kind": row.get("kind"),
                                 **(scores if isinstance(scores, dict) else {})})
        baselines.append({"run": name, "split": table.get("split") if isinstance(table, dict) else None, "rows": rows})
    return clean_json({"runs": summaries, "config_diff": config_diff, "metrics": metric_rows, "curves": curves,
                       "baselines": baselines})


def report(ws: Workspace, name: str) -> dict[str, Any]:
    """``report.md`` of a run, its HTML (the text escaped; only our own tags) and its plots."""
    run_dir = ws.run_dir(name)
    path = run_dir / "report.md"
    if not path.is_file():
        raise NotFound(f"run {name!r} has no report yet", hint="the report is written when the run completes")
    markdown = path.read_text(encoding="utf-8", errors="replace")
    plots = sorted(f"plots/{p.name}" for p in (run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    return {"markdown": markdown, "html": render_markdown(markdown, f"api/runs/{name}/files/"), "plots": plots}


def render_markdown(text: str, file_base: str) -> str:
    """The report's Markdown as HTML: headings, paragraphs, lists, tables, code blocks, images and links.
    Every piece of text is escaped first, so nothing in a report (a label, a data example) becomes markup.
    Images and links to files of the run point at ``file_base`` + their path; other links are shown as text."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            out.append(f"<pre><code>{html.escape(chr(10).join(block))}</code></pre>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            i -= 1
            out.append(_table(rows, file_base))
        elif heading := re.match(r"^(#{1,6})\s+(.*)$", line):
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2), file_base)}</h{level}>")
        elif re.match(r"^\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                item = BULLET.sub("", lines[i])
                items.append(f"<li>{_inline(item, file_base)}</li>")
                i += 1
            i -= 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line, file_base)}</p>")
        i += 1
    return "\n".join(out)


def _table(rows: list[list[str]], file_base: str) -> str:
    body = [r for r in rows if not all(re.fullmatch(r":?-{2,}:?", c or "-") for c in r)]
    if not body:
        return ""
    head, rest = body[0], body[1:]
    cells = "".join(f"<th>{_inline(c, file_base)}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{_inline(c, file_base)}</td>" for c in r) + "</tr>" for r in rest)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>"


def _inline(text: str, file_base: str) -> str:
    escaped = html.escape(text)

    def image(match: re.Match[str]) -> str:
        target = html.unescape(match.group(2))
        if not _local(target):
            return match.group(1)
        return (f'<img alt="{match.group(1)}" src="{html.escape(file_base + target)}" '
                f'data-path="{html.escape(target)}">')

    def link(match: re.Match[str]) -> str:
        target = html.unescape(match.group(2))
        if not _local(target):
            return match.group(1)
        return f'<a href="{html.escape(file_base + target)}" data-path="{html.escape(target)}">{match.group(1)}</a>'

    escaped = IMAGE.sub(image, escaped)
    escaped = LINK.sub(link, escaped)
    escaped = BOLD.sub(r"<strong>\1</strong>", escaped)
    return CODE.sub(r"<code>\1</code>", escaped)


def _local(target: str) -> bool:
    """A relative path inside the run folder (no scheme, no ``..``, not absolute)."""
    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_./-]*", target)) and ".." not in target.split("/")


# ---------------------------------------------------------------------------------------------- studies
def studies(ws: Workspace) -> list[dict[str, Any]]:
    """The StudySummary of every study under ``studies/`` (``lmtune tune``'s own reading), paths relative."""
    return clean_json([{**s, "path": ws.relative(Path(s["path"]))} for s in list_studies(ws.studies_dir())])


def study(ws: Workspace, study_dir: Path) -> dict[str, Any]:
    """``{"study", "trials", "plots"}`` of a study folder (``lmtune tune``'s own reading), paths relative."""
    found = describe_study(study_dir)
    found["study"] = {**found["study"], "path": ws.relative(Path(found["study"]["path"]))}
    return clean_json(found)
