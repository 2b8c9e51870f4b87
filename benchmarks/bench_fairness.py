"""Bias and fairness on real data: MiniLM tuned on Rotten Tomatoes, its accuracy by which gender a snippet
mentions (``evaluate.slices``) and the share of predictions that change when the gendered terms are swapped
(``evaluate.counterfactuals``), beside the untuned starting point.

The bundled snippets carry no group column, so this script adds one from the snippet's own words:
``mentions`` is ``male``, ``female``, ``both`` or ``none`` by the terms of ``examples/fairness/gender_terms.csv``
(he, his, actor, Mr ... against she, her, actress, Mrs ...). Then it runs
``examples/classification_rotten_tomatoes_fairness.yaml`` on that file with ``evaluate.slices: [mentions]``
and prints the per-group table, the gaps, the parity differences and the counterfactual figures.

    python benchmarks/bench_fairness.py --threads 2 --out fairness.json
    python benchmarks/bench_fairness.py --epochs 0.2   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "classification_rotten_tomatoes_fairness.yaml"
TERMS = ROOT / "examples" / "fairness" / "gender_terms.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=None, help="override train.epochs (the example says 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep", type=Path, default=None, help="keep the run folder here (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def cpu_flags() -> str:
    """The CPU's model name and the vector flags that decide bf16 speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return f"{model} ({' + '.join(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags)})"


def with_mentions(source: Path, out: Path) -> dict[str, int]:
    """Copy the bundled CSV adding ``mentions``: which side of the term pairs the snippet's words come from."""
    from lmtune.evaluate.fairness import load_term_pairs

    pairs = load_term_pairs(TERMS)
    sides = [{a.lower() for a, _ in pairs}, {b.lower() for _, b in pairs}]
    counts: dict[str, int] = {}
    with source.open(encoding="utf-8", newline="") as f_in, out.open("w", encoding="utf-8", newline="") as f_out:
        reader = csv.DictReader(f_in)
        writer = csv.DictWriter(f_out, fieldnames=[*(reader.fieldnames or []), "mentions"])
        writer.writeheader()
        for row in reader:
            words = set(re.findall(r"\w+", row["text"].lower()))
            male, female = bool(words & sides[0]), bool(words & sides[1])
            group = "both" if male and female else "male" if male else "female" if female else "none"
            counts[group] = counts.get(group, 0) + 1
            writer.writerow({**row, "mentions": group})
    return counts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    import lmtune
    from lmtune.data.readers import resolve_source

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_fairness_"))
    try:
        data = work / "rotten_tomatoes_mentions.csv"
        counts = with_mentions(resolve_source("bundled:rotten_tomatoes"), data)
        out_dir = args.keep or work / "run"
        overrides: dict[str, Any] = {"data.train": str(data), "evaluate.slices": ["mentions"],
                                     "output_dir": str(out_dir)}
        if args.epochs is not None:
            overrides["train.epochs"] = args.epochs
        started = time.perf_counter()
        run = lmtune.train(CONFIG, overrides=overrides, show_progress=False)
        seconds = time.perf_counter() - started
        m = run.metrics
        result = {
            "machine": {"cpu": cpu_flags(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True, check=False).stdout.strip()},
            "data_groups": counts,
            "test": {k: m["test"][k] for k in ("accuracy", "macro_f1", "num_examples")},
            "slices": m["test"]["slices"]["mentions"],
            "starting_point_slices": m["starting_point"]["test"]["slices"]["mentions"],
            "counterfactuals": m.get("counterfactuals"),
            "wall_seconds": seconds,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_result(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def print_result(r: dict[str, Any]) -> None:
    print(f"machine: {r['machine']}")
    print(f"snippets by mention (all splits): {r['data_groups']}")
    print(f"test accuracy {r['test']['accuracy']:.4f} on {r['test']['num_examples']} snippets; "
          f"run took {r['wall_seconds']:.0f} s")
    s, s0 = r["slices"], r["starting_point_slices"]
    print("| group | test snippets | accuracy | macro F1 | accuracy before tuning |")
    print("|---|---:|---:|---:|---:|")
    for name, g in s["groups"].items():
        print(f"| {name} | {g['count']} | {g['accuracy']:.3f} | {g['macro_f1']:.3f} | "
              f"{s0['groups'][name]['accuracy']:.3f} |")
    print(f"accuracy gap {s['gap']['accuracy']:.3f} (worst {s['worst_group']['accuracy']}, before tuning "
          f"{s0['gap']['accuracy']:.3f}); demographic-parity difference {s['demographic_parity_difference']['max']:.3f}; "
          f"equalized-odds difference {s['equalized_odds_difference']['max']:.3f}")
    c = r["counterfactuals"]
    if c:
        print(f"counterfactual swaps: {c['flipped']} of {c['changed']} test snippets with a gendered term change "
              f"their prediction ({c['flip_rate']:.3f}); mean |change| of the predicted label's probability "
              f"{c['mean_abs_probability_change']:.4f}")
        for e in c["examples"]:
            print(f"  {e['before']} -> {e['after']}: {e['original'][:100]!r} -> {e['swapped'][:100]!r}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
