"""A finished run (or a bare lmtune model folder): its metrics, evaluation, prediction and generation.

:meth:`Run.predict` answers with the task's predictor (labels, entities, answer spans, generated
targets). Runs of decoder tasks (``TaskInfo.decoder``) write text through
:class:`lmtune.models.text_generator.TextGenerator`: :meth:`Run.generate` continues raw text or, for chat
models, answers each prompt as a user message rendered with the model's chat template; :meth:`Run.chat`
answers a conversation; :class:`ChatSession` keeps one going for ``lmtune chat``. Generation settings come
from the run's ``generation`` config section, overridden per call. Every prediction file is written by
:func:`lmtune.workflows.predictions.write_predictions`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast, runtime_checkable

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from pydantic import ValidationError
from torch.utils.data import DataLoader

from lmtune.config import PRECISIONS, Config, GenerationConfig, load_config
from lmtune.config.tasks import TASK_INFOS, TaskInfo, task_info
from lmtune.console import make_progress, quiet_libraries
from lmtune.data.features import SortedBatchSampler
from lmtune.data.pii import apply_saved_policy
from lmtune.data.readers import read_table
from lmtune.data.table import Table
from lmtune.errors import ConfigError, DataError, RunError
from lmtune.models import generation
from lmtune.models.explain import DEFAULT_STEPS as DEFAULT_EXPLAIN_STEPS
from lmtune.models.generation import GenerationSettings
from lmtune.models.text_generator import ChatSession, TextGenerator, validate_prompt_messages
from lmtune.tasks import Predictor, Task, TaskData, get_predictor, get_task
from lmtune.tasks.base import Explainer
from lmtune.training.precision import inference_dtype, pack_bf16_linears, route_bf16_gemv
from lmtune.workflows.predictions import check_output, rename_taken, write_predictions
from lmtune.workflows.run_folder import lock_holder, read_run_record, run_status

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("lmtune")

# Columns a generation file's rows gain (predict_file).
GENERATED_COLUMNS = ("generated", "finish_reason", "prompt_tokens", "completion_tokens")

__all__ = ["GENERATED_COLUMNS", "ChatSession", "EvaluationData", "GenerationOverrides", "Run", "TextGenerator",
           "validate_prompt_messages"]


@runtime_checkable
class LabelScorer(Protocol):
    """A predictor that scores a fixed label set (class probabilities, optionally for text pairs), with
    the training evaluation's metrics on labelled files. ``Run`` predicts and evaluates through these
    members, writing one probability column per label."""

    labels: list[str]
    multi_label: bool
    tokenizer: Any

    def probabilities(self, texts: list[str], pairs: list[str] | None = None, *, batch_size: int = 64,
                      progress: Any = None) -> np.ndarray: ...

    def decode(self, probs: np.ndarray) -> list[dict[str, Any]]: ...

    def table_inputs(self, table: Table, columns: dict[str, str | None] | None = None
                     ) -> tuple[list[str], list[str] | None]: ...

    def targets(self, labels: list[Any], source: str, lines: list[int]) -> np.ndarray: ...

    def metrics(self, y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]: ...


class GeneratingPredictor(Predictor, Protocol):
    """The predictor of a task that generates its answers (``TaskInfo.generates``): its generation
    settings, saved with the model, can be changed per call."""

    settings: GenerationSettings

    def predict_table(self, table: Table, *, columns: dict[str, str | None] | None = None, batch_size: int = 32,
                      progress: Any = None, settings: GenerationSettings | None = None) -> list[dict[str, Any]]: ...


class GenerationOverrides(TypedDict, total=False):
    """Per-call generation settings; ``None`` (or absent) keeps the run's ``generation`` config value."""

    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    do_sample: bool | None
    stop: list[str] | None
    seed: int | None


class Run:
    """A run folder: ``config.yaml``, ``metrics.json``, ``report.md`` and ``model/``."""

    def __init__(self, path: Path, model_dir: Path, meta: dict[str, Any], *, precision: str = "fp32") -> None:
        self.path = path
        self.model_dir = model_dir
        self.meta = meta
        # The precision a generative model's weights are loaded in (training.precision.inference_dtype).
        self.precision = precision
        self._predictor: Any = None
        self._generators: dict[torch.dtype, TextGenerator] = {}  # loaded once per precision

    @classmethod
    def load(cls, path: str | Path, *, precision: str = "fp32") -> Run:
        """Open a run folder, or a model folder written by lmtune (holding ``lmtune.json``).

        ``precision`` (``fp32|auto|bf16|fp16``): the weights' precision when a generative model generates and is
        evaluated. ``fp32`` (the default) gives the answers and figures of the run's report; ``auto`` takes bf16
        where this GPU or CPU runs it faster (measured), which decodes faster but rounds the weights, enough to
        change some greedy answers (BENCHMARKS.md). Checked here, used when the model loads. Label predictors
        (classification, NER, QA ...) run in float32.
        """
        path = Path(path)
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if not path.exists():
            raise RunError("run folder not found", file=path)
        for model_dir in (path / "model", path):
            meta_file = model_dir / "lmtune.json"
            if meta_file.is_file():
                return cls(path, model_dir, _read_model_meta(meta_file), precision=precision)
        record = read_run_record(path)  # a RunError naming run.json when it is malformed
        status = run_status(path, record)
        if status == "running":
            holder = lock_holder(path)
            who = holder.describe() if holder is not None else "its process is running"
            raise RunError(f"this run has no model yet: it is still training ({who})", file=path,
                           hint="wait for it to finish")
        if status is not None:
            raise RunError(f"this run has no model yet (status: {status})", file=path,
                           hint="finish it with `lmtune train CONFIG --resume`")
        raise RunError("not an lmtune run or model folder (no model/lmtune.json)", file=path)

    # ------------------------------------------------------------------------------------ results
    @property
    def metrics(self) -> dict[str, Any]:
        """Final metrics per split (``metrics.json``); empty for a bare model folder."""
        f = self.path / "metrics.json"
        if not f.is_file():
            return {}
        try:
            metrics = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot read the run's metrics: {getattr(exc, 'strerror', None) or str(exc)[:200]}",
                           file=f) from None
        if not isinstance(metrics, dict):
            raise RunError("the run's metrics are not a JSON object", file=f)
        return metrics

    @property
    def task(self) -> str:
        """The task the model was trained for."""
        return str(self.meta["task"])

    @property
    def info(self) -> TaskInfo:
        """The registered facts of the run's task."""
        try:
            return task_info(self.task)
        except KeyError:
            raise RunError(f"prediction for task '{self.task}' is not available in this version") from None

    @property
    def generative(self) -> bool:
        """Whether the model is a decoder that writes text (``TaskInfo.decoder``) rather than answering
        through a task predictor."""
        return self.info.decoder

    def predictor(self) -> Any:
        """The task's predictor for the saved model, loaded once (decoders: see :meth:`generator`)."""
        if self._predictor is None:
            if self.generative:
                raise RunError(f"a '{self.task}' model generates text; it has no label predictor",
                               hint="use run.generate(prompts), run.chat(messages) or run.generator()")
            try:
                cls = get_predictor(self.task)
            except KeyError:
                raise RunError(f"prediction for task '{self.task}' is not available in this version") from None
            self._predictor = cls(self.model_dir, self.meta)
        return self._predictor

    def explainer(self) -> Explainer:
        """The run's predictor as an :class:`~lmtune.tasks.base.Explainer` (token attributions), or a RunError
        saying that this run's task does not explain its predictions."""
        p = None if self.generative else self.predictor()
        if not isinstance(p, Explainer):
            raise RunError(f"a '{self.task}' run cannot explain its predictions: token attributions (--explain) are "
                           "given by runs that label texts or their words",
                           hint="predict without --explain")
        return p

    def explain(self, texts: Any, *, label: str | None = None, n_steps: int = DEFAULT_EXPLAIN_STEPS,
                batch_size: int = 32) -> list[dict[str, Any]]:
        """:meth:`predict` with token attributions (see :meth:`predict_file`'s ``explain``); a single input gives a
        one-element list."""
        items = [texts] if isinstance(texts, (str, dict)) else list(texts)
        return self.explainer().explain(items, label=label, n_steps=n_steps, batch_size=batch_size)

    def generator(self, precision: str | None = None) -> TextGenerator:
        """The text generator of a decoder run (model + tokenizer), loaded once per precision (default: the
        run's, ``Run.load(path, precision=...)``)."""
        if not self.generative:
            raise RunError(f"a '{self.task}' model does not generate text",
                           hint="use run.predict(texts) or `lmtune predict`")
        precision = precision or self.precision
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = inference_dtype(precision, device)
        if dtype not in self._generators:
            gemv, pack = route_bf16_gemv(dtype, device), pack_bf16_linears(dtype, device)
            generator = TextGenerator(self.model_dir, self.meta, device=device, dtype=dtype,
                                      gemv_small_forwards=gemv, pack_for_onednn=pack)
            self._generators[dtype] = generator
            log.info("generating with %s weights on %s (precision %s)%s%s", str(dtype).removeprefix("torch."),
                     device.type, precision, "; one-row decoding steps on ATen's bf16 gemv" if gemv else "",
                     f"; linears packed for oneDNN (+{generator.packed_bytes / 2**20:.0f} MB)"
                     if generator.packed_bytes else "")
        return self._generators[dtype]

    def generation_settings(self, *, batch_size: int | None = None,
                            **overrides: Unpack[GenerationOverrides]) -> GenerationSettings:
        """The run's ``generation`` config section (defaults for a bare model folder), overridden by
        the arguments that are not None."""
        base = GenerationSettings()
        config_file = self.path / "config.yaml"
        if config_file.is_file():
            try:
                saved = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            except (OSError, ValueError, yaml.YAMLError) as exc:
                raise ConfigError(f"the run's config cannot be read: {str(exc)[:200]}", file=config_file) from None
            section = (saved.get("generation") if isinstance(saved, dict) else None) or {}
            try:
                base = GenerationSettings.from_config(GenerationConfig.model_validate(section))
            except ValidationError as exc:
                raise ConfigError(f"the run's generation settings are invalid: {exc}", file=config_file) from None
        return _with_overrides(base, {**overrides, "batch_size": batch_size})

    # ------------------------------------------------------------------------------------ predict
    def predict(
        self, texts: Any, pairs: list[str] | None = None, *, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Predict for each input: labels and probabilities (classification: texts and optional second
        texts), or the task's own answer (NER: entities of each text; QA: the answer span for each
        ``{"question", "context"}``; seq2seq: the generated target of each source text).

        A single input (a string, or one mapping) gives a one-element list.
        """
        items = [texts] if isinstance(texts, (str, dict)) else list(texts)
        p = self.predictor()
        if pairs is None:
            return list(p.predict(items, batch_size=batch_size))
        if not isinstance(p, LabelScorer):
            raise RunError(f"second texts (pairs) are for classification runs; this run's task is '{self.task}'")
        return p.decode(p.probabilities([str(t) for t in items], pairs, batch_size=batch_size))

    def predict_file(
        self, source: str | Path, output: str | Path, *, text_column: str | None = None,
        pair_column: str | None = None, batch_size: int | None = None, show_progress: bool = True,
        explain: bool = False, explain_label: str | None = None, explain_steps: int | None = None,
        **generation: Unpack[GenerationOverrides],
    ) -> int:
        """Predict (or generate) for every row of ``source``; write CSV, TSV or JSONL (by ``output``'s
        extension). Returns the rows written.

        Each output row is the input row plus the prediction's fields; a field named like an input column
        (NER's ``tags`` beside gold ``tags``) is written as ``predicted_<name>``. Decoder runs read a
        ``prompt`` column (``text_column`` overrides; a ``text`` column, as in a .txt file, also serves),
        or for chat models a ``messages`` column holding the conversation so far (ending with a user
        message), and add ``generated``, ``finish_reason``, ``prompt_tokens`` and ``completion_tokens``.
        ``batch_size`` and the ``generation`` overrides (text-generating tasks only) default to the run's
        ``generation`` settings.

        ``explain``: each row also gets token attributions (``Explainer``: classification towards the predicted
        label or ``explain_label``, NER per entity; ``explain_steps`` integration steps, default 32); a run
        whose predictor cannot explain is a RunError.
        """
        quiet_libraries()
        if not explain and (explain_label is not None or explain_steps is not None):
            raise RunError("--explain-label and --explain-steps apply with --explain")
        if explain:
            self.explainer()  # a run that cannot explain fails before reading anything
        if self.generative:
            return self._generate_file(source, output, text_column=text_column, batch_size=batch_size,
                                       show_progress=show_progress, overrides=generation)
        given = sorted(k for k, v in generation.items() if v is not None)
        if given and not self.info.generates:
            generating = ", ".join(info.name for info in TASK_INFOS.values() if info.generates)
            raise RunError(f"generation settings ({', '.join(given)}) apply to text-generating runs "
                           f"({generating}); this run's task is '{self.task}'")
        out = check_output(output)
        p = self.predictor()
        scorer = isinstance(p, LabelScorer)
        table = apply_saved_policy(read_table(source), self.meta)  # a model trained with data.pii redact/mask
        named: dict[str, str | None] = {k: v for k, v in (("text", text_column), ("text_pair", pair_column)) if v}
        columns = named or None
        size = batch_size or (64 if scorer else 32)
        with make_progress(show_progress) as progress:
            if explain:
                results = self.explainer().explain_table(
                    table, columns=columns, label=explain_label, n_steps=explain_steps or DEFAULT_EXPLAIN_STEPS,
                    batch_size=size, progress=progress)
            elif self.info.generates:
                generating_predictor = cast(GeneratingPredictor, p)
                settings = _with_overrides(generating_predictor.settings, dict(generation))
                results = generating_predictor.predict_table(table, columns=columns, batch_size=size,
                                                             progress=progress, settings=settings)
            else:
                results = p.predict_table(table, columns=columns, batch_size=size, progress=progress)
        if scorer:
            # The predicted label(s) and score, then one probability column per label; a labelled input
            # keeps its own label column beside the predicted one.
            return write_predictions(out, table, results, cells=_score_cells, keep_input_columns=True)
        return write_predictions(out, table, rename_taken(table, results))

    # ------------------------------------------------------------------------------------ generate
    def generate(
        self, prompts: str | list[str], *, max_new_tokens: int | None = None, temperature: float | None = None,
        top_p: float | None = None, do_sample: bool | None = None, stop: list[str] | None = None,
        batch_size: int | None = None, seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Generate one answer per prompt: raw-text continuation, or (chat models) the answer to the
        prompt as a user message in the model's chat template.

        Settings default to the run's ``generation`` config section. Returns, per prompt and in input
        order, ``{"prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens"}`` (see
        :func:`lmtune.generation.generate`).
        """
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        g = self.generator()
        settings = self.generation_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            do_sample=do_sample, stop=stop, batch_size=batch_size, seed=seed)
        for i, p in enumerate(items):
            if not isinstance(p, str) or not p.strip():
                raise DataError(f"prompt {i + 1} is {'empty' if isinstance(p, str) else type(p).__name__}, "
                                "not text", field="prompts")
        rendered = [g.render(p) for p in items]
        g.check_lengths(rendered, settings.max_new_tokens)
        return [{"prompt": p, **r} for p, r in zip(items, g.generate(rendered, settings), strict=True)]

    def chat(self, messages: list[dict[str, Any]], **overrides: Unpack[GenerationOverrides]) -> dict[str, Any]:
        """The assistant's answer to a conversation (OpenAI-style ``{"role", "content"}`` messages: an
        optional system message, then user/assistant turns, ending with a user message).

        Returns :func:`lmtune.generation.generate`'s dict (``text`` ...) plus ``message``, the answer as
        ``{"role": "assistant", "content": text}`` ready to append to the conversation. Raises
        ModelError for a model without a chat template or trained on raw text.
        """
        g = self.generator()
        g.require_chat()
        try:
            conversation = validate_prompt_messages(messages, source="messages", line=None, field="messages")
        except DataError as exc:  # a Python argument has no file or line
            exc.file, exc.line = None, None
            raise
        settings = self.generation_settings(**overrides)
        rendered = [generation.chat_prompt(g.tokenizer, conversation)]
        g.check_lengths(rendered, settings.max_new_tokens)
        result = g.generate(rendered, settings)[0]
        return {**result, "message": {"role": "assistant", "content": result["text"]}}

    def chat_session(self, *, system: str | None = None, **overrides: Unpack[GenerationOverrides]) -> ChatSession:
        """A conversation with this chat model kept across turns (what ``lmtune chat`` drives)."""
        g = self.generator()
        g.require_chat()
        return ChatSession(g, self.generation_settings(**overrides), system=system)

    def _generate_file(self, source: str | Path, output: str | Path, *, text_column: str | None,
                       batch_size: int | None, show_progress: bool, overrides: GenerationOverrides) -> int:
        out = check_output(output)
        table = apply_saved_policy(read_table(source), self.meta)  # a model trained with data.pii redact/mask
        g = self.generator()
        settings = self.generation_settings(batch_size=batch_size, **overrides)
        rendered = g.render_table(table, text_column, settings.max_new_tokens)
        with make_progress(show_progress) as progress:
            results = g.generate(rendered, settings, progress=progress)
        generated = [{"generated": r["text"], **{k: r[k] for k in GENERATED_COLUMNS[1:]}} for r in results]
        # A generated column replaces an input column of the same name.
        return write_predictions(out, table, generated)

    # ------------------------------------------------------------------------------------ evaluate
    def evaluate(self, data: str | Path | None = None, *, batch_size: int | None = None,
                 precision: str | None = None) -> dict[str, Any]:
        """Metrics of the saved model on a file, or (no file) on the run's own validation and test splits.

        A generative model is evaluated with its weights in ``precision`` (default: the run's, see
        :meth:`load`): fp32 gives the figures of the run's report (its final evaluation ran on the float32
        weights); bf16 decodes faster and its scores differ from the report's by bf16's rounding.

        Label scorers (classification): accuracy, F1 ... on a labelled file or the test split. Every other
        task evaluates as at the end of training: decoders give loss and perplexity on the target tokens,
        plus (chat models) generation scores against the reference answers (exact match, token F1,
        ROUGE-L, chrF, BLEU, stopped_fraction); ``data`` is in the training format.
        """
        quiet_libraries()
        loaded: Any = self.generator(precision) if self.generative else self.predictor()
        if not isinstance(loaded, LabelScorer):
            return self._evaluate_with_task(loaded, data, batch_size)
        batch_size = batch_size or 64
        if data is not None:
            table = read_table(data)
            texts, pairs = loaded.table_inputs(table)
            labels = table.column(self.meta.get("label_column") or "label")
            y = loaded.targets(labels, table.source, table.lines)
            return {"data": str(data), **loaded.metrics(y, loaded.probabilities(texts, pairs, batch_size=batch_size))}
        config_file = self.path / "config.yaml"
        if not config_file.is_file():
            raise RunError("a bare model folder has no test split; pass --data FILE", file=self.path)
        cfg = load_config(config_file)
        task = get_task(cfg.task)(cfg)
        prepared = task.prepare(loaded.tokenizer)
        out = {}
        for split in ("validation", "test"):
            if split in prepared.extra["inputs"] and prepared.extra["inputs"][split][0]:
                texts, pairs = prepared.extra["inputs"][split]
                out[split] = loaded.metrics(prepared.extra["targets"][split],
                                            loaded.probabilities(texts, pairs, batch_size=batch_size))
        return out

    def _evaluate_with_task(self, loaded: Any, data: str | Path | None, batch_size: int | None) -> dict[str, Any]:
        """The task's own evaluation (as at the end of training) of the saved model (``loaded``: its
        predictor or generator), on the run's rebuilt splits or on ``data`` (a file in the training format)."""
        evaluation = self.evaluation_data(data, tokenizer=loaded.tokenizer, batch_size=batch_size)
        splits = ["test"] if data is not None else ["validation", "test"]
        out = {split: evaluation.evaluate(loaded.model, split) for split in splits if evaluation.has(split)}
        if data is not None:
            return {"data": str(data), **out["test"]}
        return out

    def evaluation_data(self, data: str | Path | None = None, *, tokenizer: Any = None,
                        batch_size: int | None = None) -> EvaluationData:
        """The run's task set up for its final evaluation, with its rebuilt splits (or ``data``, a file in the
        training format, as the test split), tokenised with ``tokenizer`` (default: the task's tokenizer for
        the model folder): what :meth:`evaluate` scores a model on, and a quantized export both its models."""
        config_file = self.path / "config.yaml"
        overrides: dict[str, Any] = {}
        if data is not None:
            # Every record of the file is evaluated: it is given as the held-out splits (train must be
            # set too, and is the same file), with no de-duplication against train and no sampling.
            overrides = {"data.train": str(data), "data.validation": str(data), "data.test": str(data),
                         "data.deduplicate": False, "data.max_samples": None}
        if config_file.is_file():
            cfg = load_config(config_file, overrides)
        elif data is not None:
            cfg = load_config({"task": self.task, "model": str(self.model_dir)}, overrides)
        else:
            raise RunError("a bare model folder has no validation or test split; pass --data FILE", file=self.path)
        task = get_task(cfg.task)(cfg)
        # The trained model's own settings (label set, tag scheme, QA's no-answer threshold ...) win over the
        # config's; prepare takes the saved tokenizer (chat template ...).
        task.load_model_meta(self.meta)
        if tokenizer is None:
            tokenizer = task.load_tokenizer(self.model_dir)
        prepared = task.prepare(tokenizer)
        task.evaluation_phase("final")  # generation scores too, not only the loss
        return EvaluationData(cfg, task, prepared, tokenizer,
                              batch_size or cfg.train.eval_batch_size or cfg.train.batch_size)


@dataclasses.dataclass
class EvaluationData:
    """A run's task ready to score models on the run's splits (:meth:`Run.evaluation_data`)."""

    config: Config
    task: Task
    prepared: TaskData
    tokenizer: Any
    batch_size: int

    def has(self, split: str) -> bool:
        """Whether ``split`` exists and holds examples."""
        return split in self.prepared.splits and len(self.prepared.splits[split]) > 0

    def evaluate(self, model: Any, split: str) -> dict[str, Any]:
        """The task's metrics of ``model`` (any module the task's ``evaluate`` can call; one without parameters
        runs on the CPU) on ``split``, batched by length."""
        # Accelerate keeps its settings in a process-wide singleton (see workflows.train).
        AcceleratorState._reset_state()
        GradientState._reset_state()
        parameter = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        accelerator = Accelerator(cpu=parameter is None or parameter.device.type != "cuda")
        loader = DataLoader(self.prepared.splits[split], collate_fn=self.task.collator(self.tokenizer),
                            batch_sampler=SortedBatchSampler(self.prepared.lengths[split], self.batch_size))
        with torch.no_grad():
            return self.task.evaluate(model, accelerator.prepare_data_loader(loader), accelerator, split,
                                      self.prepared)


_DAMAGED = "the model folder is damaged: train the run again, or restore model/ from a copy"


def _read_model_meta(path: Path) -> dict[str, Any]:
    """A model folder's ``lmtune.json``: a JSON object naming the task; a RunError naming the file otherwise."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = getattr(exc, "strerror", None) or str(exc)[:200]
        raise RunError(f"cannot read the model's description: {detail}", file=path, hint=_DAMAGED) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("task"), str):
        raise RunError("not an lmtune model description (a JSON object with a 'task')", file=path, hint=_DAMAGED)
    return meta


def _with_overrides(base: GenerationSettings, overrides: dict[str, Any]) -> GenerationSettings:
    """``base`` with the overrides that are not None; a bad value is a ConfigError."""
    changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if "stop" in changes:
        changes["stop"] = list(changes["stop"])
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise ConfigError(f"generation settings: {exc}") from None


def _score_cells(result: dict[str, Any]) -> dict[str, Any]:
    """A label scorer's result as CSV/TSV cells: the label(s) (several joined by ``|``) and score, then
    ``prob_<label>`` per label, to six decimals."""
    cells: dict[str, Any] = ({"labels": "|".join(result["labels"])} if "labels" in result
                             else {"label": result["label"], "score": f"{result['score']:.6f}"})
    cells.update({f"prob_{name}": f"{p:.6f}" for name, p in result["probabilities"].items()})
    # Token attributions (--explain) follow as they are: the writer makes JSON text of lists and mappings.
    cells.update({k: v for k, v in result.items() if k in ("attributions", "word_attributions", "explained")})
    return cells
