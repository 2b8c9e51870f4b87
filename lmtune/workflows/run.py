"""A finished run (or a bare lmtune model folder): its metrics, evaluation, prediction and generation.

Classification runs predict labels (:meth:`Run.predict`, ``ClassificationPredictor``). Generative runs
(``sft``, ``causal_lm``) write text: :meth:`Run.generate` continues raw text (causal_lm) or answers each
prompt as a user message rendered with the model's chat template (sft); :meth:`Run.chat` answers a
conversation; :class:`ChatSession` keeps one going for ``lmtune chat``. Generation settings come from
the run's ``generation`` config section, overridden per call.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import numpy as np
import torch

from lmtune.errors import ConfigError, DataError, ModelError, RunError
from lmtune.tasks import get_predictor

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from lmtune.data.readers import Table
    from lmtune.models.generation import GenerationSettings

log = logging.getLogger("lmtune")

GENERATIVE_TASKS = ("sft", "causal_lm")
# Task predictors that generate text: predict_file passes generation overrides to their predict_table.
GENERATING_PREDICTORS = ("seq2seq",)
# Columns a generation file's rows gain (predict_file).
GENERATED_COLUMNS = ("generated", "finish_reason", "prompt_tokens", "completion_tokens")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_DELIMITED_SUFFIXES = (".csv", ".tsv")


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

    def __init__(self, path: Path, model_dir: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.model_dir = model_dir
        self.meta = meta
        self._predictor: Any = None
        self._generator: TextGenerator | None = None

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Open a run folder, or a model folder written by lmtune (holding ``lmtune.json``)."""
        path = Path(path)
        if not path.exists():
            raise RunError("run folder not found", file=path)
        for model_dir in (path / "model", path):
            meta_file = model_dir / "lmtune.json"
            if meta_file.is_file():
                return cls(path, model_dir, json.loads(meta_file.read_text(encoding="utf-8")))
        status = None
        if (path / "run.json").is_file():
            status = json.loads((path / "run.json").read_text(encoding="utf-8")).get("status")
        if status is not None:
            raise RunError(f"this run has no model yet (status: {status})", file=path,
                           hint="finish it with `lmtune train CONFIG --resume`")
        raise RunError("not an lmtune run or model folder (no model/lmtune.json)", file=path)

    # ------------------------------------------------------------------------------------ results
    @property
    def metrics(self) -> dict[str, Any]:
        """Final metrics per split (``metrics.json``); empty for a bare model folder."""
        f = self.path / "metrics.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    @property
    def task(self) -> str:
        """The task the model was trained for."""
        return str(self.meta["task"])

    @property
    def generative(self) -> bool:
        """Whether the model writes text (sft, causal_lm) rather than predicting labels."""
        return self.task in GENERATIVE_TASKS

    def predictor(self) -> Any:
        """The classification predictor, loaded once."""
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

    def generator(self) -> TextGenerator:
        """The text generator of an sft or causal_lm run (model + tokenizer), loaded once."""
        if self._generator is None:
            if not self.generative:
                raise RunError(f"a '{self.task}' model does not generate text",
                               hint="use run.predict(texts) or `lmtune predict`")
            self._generator = TextGenerator(self.model_dir, self.meta)
        return self._generator

    def generation_settings(self, *, batch_size: int | None = None,
                            **overrides: Unpack[GenerationOverrides]) -> GenerationSettings:
        """The run's ``generation`` config section (defaults for a bare model folder), overridden by
        the arguments that are not None."""
        from pydantic import ValidationError

        from lmtune.config import GenerationConfig
        from lmtune.models.generation import GenerationSettings

        base = GenerationSettings()
        config_file = self.path / "config.yaml"
        if config_file.is_file():
            import yaml

            section = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("generation") or {}
            try:
                base = GenerationSettings.from_config(GenerationConfig.model_validate(section))
            except ValidationError as exc:
                raise ConfigError(f"the run's generation settings are invalid: {exc}", file=config_file) from None
        changes: dict[str, Any] = {k: v for k, v in {**overrides, "batch_size": batch_size}.items() if v is not None}
        if "stop" in changes:
            changes["stop"] = list(changes["stop"])
        try:
            return dataclasses.replace(base, **changes)
        except ValueError as exc:
            raise ConfigError(f"generation settings: {exc}") from None

    # ------------------------------------------------------------------------------------ predict
    def predict(
        self, texts: Any, pairs: list[str] | None = None, *, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Predict for each input: labels and probabilities (classification: texts and optional second
        texts), or the task's own answer (NER: entities of each text; QA: the answer span for each
        ``{"question", "context"}``; seq2seq: the generated target of each source text).

        A single input (a string, or one mapping) gives a one-element list.
        """
        single = isinstance(texts, (str, dict))
        items = [texts] if single else list(texts)
        p = self.predictor()
        if self.task != "classification":
            if pairs is not None:
                raise RunError(f"second texts (pairs) are for classification runs; this run's task is '{self.task}'")
            return list(p.predict(items, batch_size=batch_size))
        out = p.decode(p.probabilities(items, pairs, batch_size=batch_size))
        return out[:1] if single else out

    def _read_inputs(self, source: str | Path, text_column: str | None,
                     pair_column: str | None) -> tuple[Any, list[str], list[str] | None]:
        from lmtune.data.readers import read_table

        table = read_table(source)
        text_column = text_column or self.meta.get("text_column") or "text"
        pair_column = pair_column or self.meta.get("text_pair_column")
        texts = table.column(text_column)
        pairs = table.column(pair_column) if pair_column else None
        for values, col in ((texts, text_column), (pairs, pair_column)):
            if values is None:
                continue
            for v, line in zip(values, table.lines, strict=True):
                if v is None or (isinstance(v, float) and np.isnan(v)):
                    raise DataError("empty text", file=table.source, line=line, field=col)
        return table, [str(t) for t in texts], [str(t) for t in pairs] if pairs else None

    def predict_file(
        self, source: str | Path, output: str | Path, *, text_column: str | None = None,
        pair_column: str | None = None, batch_size: int | None = None, show_progress: bool = True,
        **generation: Unpack[GenerationOverrides],
    ) -> int:
        """Predict (classification) or generate (sft, causal_lm) for every row of ``source``; write CSV,
        TSV or JSONL (by ``output``'s extension). Returns the rows written.

        Generative runs read a ``prompt`` column (``text_column`` overrides; a ``text`` column, as in a
        .txt file, also serves), or for sft runs a ``messages`` column holding the conversation so far
        (ending with a user message). Each output row is the input row plus ``generated``,
        ``finish_reason``, ``prompt_tokens`` and ``completion_tokens``. ``batch_size`` and the
        ``generation`` overrides default to the run's ``generation`` config section.
        """
        if self.generative:
            return self._generate_file(source, output, text_column=text_column, batch_size=batch_size,
                                       show_progress=show_progress, overrides=generation)
        given = sorted(k for k, v in generation.items() if v is not None)
        if given and self.task not in GENERATING_PREDICTORS:
            raise RunError(f"generation settings ({', '.join(given)}) apply to text-generating runs (sft, "
                           f"causal_lm, {', '.join(GENERATING_PREDICTORS)}); this run's task is '{self.task}'")
        from lmtune.console import make_progress, quiet_libraries

        quiet_libraries()
        if self.task != "classification":
            return self._predict_task_file(source, output, text_column=text_column, batch_size=batch_size,
                                           show_progress=show_progress, overrides=generation)
        table, texts, pairs = self._read_inputs(source, text_column, pair_column)
        p = self.predictor()
        with make_progress(show_progress) as progress:
            probs = p.probabilities(texts, pairs, batch_size=batch_size or 64, progress=progress)
        results = p.decode(probs)
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        if out.suffix.lower() in _JSONL_SUFFIXES:
            with tmp.open("w", encoding="utf-8") as f:
                for row, res in zip(table.rows, results, strict=True):
                    f.write(json.dumps({**row, **res}, ensure_ascii=False, default=str) + "\n")
        elif out.suffix.lower() in _DELIMITED_SUFFIXES:
            delim = "\t" if out.suffix.lower() == ".tsv" else ","
            pred_cols = ["labels"] if p.multi_label else ["label", "score"]
            prob_cols = [f"prob_{name}" for name in p.labels]
            with tmp.open("w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, delimiter=delim)
                writer.writerow(table.columns + pred_cols + prob_cols)
                for row, res in zip(table.rows, results, strict=True):
                    pred = ["|".join(res["labels"])] if p.multi_label else [res["label"], f"{res['score']:.6f}"]
                    writer.writerow([row.get(c) for c in table.columns] + pred
                                    + [f"{res['probabilities'][n]:.6f}" for n in p.labels])
        else:
            raise DataError("output must end in .csv, .tsv or .jsonl", file=out)
        tmp.replace(out)
        return len(results)

    def _predict_task_file(self, source: str | Path, output: str | Path, *, text_column: str | None,
                           batch_size: int | None, show_progress: bool,
                           overrides: GenerationOverrides | None = None) -> int:
        """Predictions of a registered task predictor (NER, QA, seq2seq) for every row of ``source``.

        Each output row is the input row plus the predictor's fields; a field named like an input column
        (NER's ``tags`` beside gold ``tags``) is written as ``predicted_<name>``, the input column kept. In
        CSV/TSV a field holding a list or mapping (entities, say) is written as JSON text. ``overrides``
        (seq2seq) change the generation settings saved with the model.
        """
        from lmtune.console import make_progress
        from lmtune.data.readers import read_table

        out = Path(output)
        if out.suffix.lower() not in _JSONL_SUFFIXES + _DELIMITED_SUFFIXES:
            raise DataError("output must end in .csv, .tsv or .jsonl", file=out)
        table = read_table(source)
        p = self.predictor()
        columns = {"text": text_column} if text_column else None
        extra_args: dict[str, Any] = {}
        changes: dict[str, Any] = {k: v for k, v in (overrides or {}).items() if v is not None}
        if changes:
            if "stop" in changes:
                changes["stop"] = list(changes["stop"])
            try:
                extra_args["settings"] = dataclasses.replace(p.settings, **changes)
            except ValueError as exc:
                raise ConfigError(f"generation settings: {exc}") from None
        with make_progress(show_progress) as progress:
            results = p.predict_table(table, columns=columns, batch_size=batch_size or 32, progress=progress,
                                      **extra_args)
        taken = set(table.columns)
        results = [{(f"predicted_{k}" if k in taken else k): v for k, v in res.items()} for res in results]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        if out.suffix.lower() in _JSONL_SUFFIXES:
            with tmp.open("w", encoding="utf-8") as f:
                for row, res in zip(table.rows, results, strict=True):
                    f.write(json.dumps({**row, **res}, ensure_ascii=False, default=str) + "\n")
        else:
            delim = "\t" if out.suffix.lower() == ".tsv" else ","
            extra = [k for k in (results[0] if results else {}) if k not in table.columns]
            with tmp.open("w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, delimiter=delim)
                writer.writerow(table.columns + extra)
                for row, res in zip(table.rows, results, strict=True):
                    # Lists and mappings (entities; a JSONL input's word lists) as JSON text.
                    cells = [row.get(c) for c in table.columns] + [res.get(k) for k in extra]
                    writer.writerow([json.dumps(c, ensure_ascii=False) if isinstance(c, (list, dict)) else c
                                     for c in cells])
        tmp.replace(out)
        return len(results)

    # ------------------------------------------------------------------------------------ generate
    def generate(
        self, prompts: str | list[str], *, max_new_tokens: int | None = None, temperature: float | None = None,
        top_p: float | None = None, do_sample: bool | None = None, stop: list[str] | None = None,
        batch_size: int | None = None, seed: int | None = None,
    ) -> list[dict[str, Any]]:
        """Generate one answer per prompt: raw-text continuation (causal_lm) or the answer to the prompt
        as a user message in the model's chat template (sft).

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
        ModelError for a model without a chat template or trained on raw text (causal_lm).
        """
        from lmtune.models.generation import chat_prompt

        g = self.generator()
        g.require_chat()
        try:
            conversation = validate_prompt_messages(messages, source="messages", line=None, field="messages")
        except DataError as exc:  # a Python argument has no file or line
            exc.file, exc.line = None, None
            raise
        settings = self.generation_settings(**overrides)
        rendered = [chat_prompt(g.tokenizer, conversation)]
        g.check_lengths(rendered, settings.max_new_tokens)
        result = g.generate(rendered, settings)[0]
        return {**result, "message": {"role": "assistant", "content": result["text"]}}

    def chat_session(self, *, system: str | None = None, **overrides: Unpack[GenerationOverrides]) -> ChatSession:
        """A conversation with this sft model kept across turns (what ``lmtune chat`` drives)."""
        g = self.generator()
        g.require_chat()
        return ChatSession(g, self.generation_settings(**overrides), system=system)

    def _generate_file(self, source: str | Path, output: str | Path, *, text_column: str | None,
                       batch_size: int | None, show_progress: bool, overrides: GenerationOverrides) -> int:
        from lmtune.console import make_progress, quiet_libraries
        from lmtune.data.readers import read_table
        from lmtune.models.generation import chat_prompt

        quiet_libraries()
        out = Path(output)
        if out.suffix.lower() not in _JSONL_SUFFIXES + _DELIMITED_SUFFIXES:
            raise DataError("output must end in .csv, .tsv or .jsonl", file=out)
        table = read_table(source)
        column, is_messages = self._prompt_column(table, text_column)
        g = self.generator()
        settings = self.generation_settings(batch_size=batch_size, **overrides)
        rendered = []
        for value, line in zip(table.column(column), table.lines, strict=True):
            if is_messages:
                conversation = validate_prompt_messages(value, source=table.source, line=line, field=column)
                rendered.append(chat_prompt(g.tokenizer, conversation))
            else:
                rendered.append(g.render(_prompt_text(value, table.source, line, column, self.task)))
        too_long = g.check_lengths(rendered, settings.max_new_tokens, raise_error=False)
        if too_long:
            i, tokens = too_long[0]
            raise DataError(g.too_long_message(tokens, settings.max_new_tokens), file=table.source,
                            line=table.lines[i], field=column,
                            hint=f"{len(too_long)} row(s) are too long; shorten them or lower --max-new-tokens")
        with make_progress(show_progress) as progress:
            results = g.generate(rendered, settings, progress=progress)
        _write_generated(out, table, results)
        return len(results)

    def _prompt_column(self, table: Table, text_column: str | None) -> tuple[str, bool]:
        """The column holding the prompts and whether it holds chat messages (sft only)."""
        chat = self.task == "sft"
        if text_column is not None:
            values = table.column(text_column)  # a clear error when there is no such column
            return text_column, chat and (text_column == "messages" or any(isinstance(v, list) for v in values))
        for name in ("prompt", *(("messages",) if chat else ()), "text"):
            if name in table.columns:
                return name, name == "messages"
        wanted = "a 'prompt' column (or 'messages', a conversation ending with a user message)" if chat \
            else "a 'prompt' column"
        raise DataError(f"needs {wanted}; the columns are: {', '.join(repr(c) for c in table.columns)}",
                        file=table.source, hint="name the column holding the prompts with --text-column")

    # ------------------------------------------------------------------------------------ evaluate
    def evaluate(self, data: str | Path | None = None, *, batch_size: int | None = None) -> dict[str, Any]:
        """Metrics of the saved model on a file, or (no file) on the run's own validation and test splits.

        Classification: accuracy, F1 ... on a labelled file or the test split. sft and causal_lm: loss and
        perplexity on the target tokens, plus (sft) generation scores against the reference answers
        (exact match, token F1, ROUGE-L, chrF, BLEU, stopped_fraction); ``data`` is in the training
        format (chat records for sft, text for causal_lm).
        """
        from lmtune.console import quiet_libraries

        quiet_libraries()
        if self.task != "classification":
            return self._evaluate_with_task(data, batch_size)
        p = self.predictor()
        batch_size = batch_size or 64
        if data is not None:
            table, texts, pairs = self._read_inputs(data, None, None)
            labels = table.column(self.meta.get("label_column") or "label")
            y = p.targets(labels, table.source, table.lines)
            return {"data": str(data), **p.metrics(y, p.probabilities(texts, pairs, batch_size=batch_size))}
        config_file = self.path / "config.yaml"
        if not config_file.is_file():
            raise RunError("a bare model folder has no test split; pass --data FILE", file=self.path)
        from lmtune.config import load_config
        from lmtune.tasks import get_task

        cfg = load_config(config_file)
        task = get_task(cfg.task)(cfg)
        prepared = task.prepare(p.tokenizer)
        out = {}
        for split in ("validation", "test"):
            if split in prepared.extra["inputs"] and prepared.extra["inputs"][split][0]:
                texts, pairs = prepared.extra["inputs"][split]
                out[split] = p.metrics(prepared.extra["targets"][split],
                                       p.probabilities(texts, pairs, batch_size=batch_size))
        return out

    def _evaluate_with_task(self, data: str | Path | None, batch_size: int | None) -> dict[str, Any]:
        """The task's own evaluation (as at the end of training) of the saved model, on the run's rebuilt
        splits or on ``data`` (a file in the training format). Used by every task but classification."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from torch.utils.data import DataLoader

        from lmtune.config import load_config
        from lmtune.data.features import SortedBatchSampler
        from lmtune.tasks import get_task

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
        loaded: Any = self.generator() if self.generative else self.predictor()
        task = get_task(cfg.task)(cfg)
        task.tokenizer = loaded.tokenizer  # what load_tokenizer would set: the saved one (chat template ...)
        task.saved_meta = self.meta  # the trained model's own settings (label set, tag scheme ...) win
        if hasattr(task, "load_model_meta"):
            task.load_model_meta(self.meta)  # settings decided at training time (QA: the no-answer threshold)
        prepared = task.prepare(loaded.tokenizer)
        if hasattr(task, "evaluation_phase"):
            task.evaluation_phase("final")  # generation scores too, not only the loss
        # Accelerate keeps its settings in a process-wide singleton (see workflow.train).
        AcceleratorState._reset_state()
        GradientState._reset_state()
        device = next(loaded.model.parameters()).device
        accelerator = Accelerator(cpu=device.type != "cuda")
        size = batch_size or cfg.train.eval_batch_size or cfg.train.batch_size
        splits = ["test"] if data is not None else ["validation", "test"]
        out: dict[str, Any] = {}
        for split in splits:
            if split not in prepared.splits or not len(prepared.splits[split]):
                continue
            loader = DataLoader(prepared.splits[split], collate_fn=task.collator(loaded.tokenizer),
                                batch_sampler=SortedBatchSampler(prepared.lengths[split], size))
            with torch.no_grad():
                out[split] = task.evaluate(loaded.model, accelerator.prepare_data_loader(loader), accelerator, split,
                                           prepared)
        if data is not None:
            return {"data": str(data), **out["test"]}
        return out


# ------------------------------------------------------------------------------------------ generation
class TextGenerator:
    """A saved causal LM loaded once for generation: float32, eval mode, on CUDA when there is one.

    Answers end at the model's end-of-turn/EOS tokens: ``lmtune.json``'s ``eos_token_ids`` and, for sft
    models, every end-of-turn token the vocabulary holds (as the training evaluation does).
    """

    def __init__(self, model_dir: Path, meta: dict[str, Any], *, device: str | None = None) -> None:
        from lmtune.console import quiet_libraries
        from lmtune.data.chat import end_of_turn_ids
        from lmtune.models.registry import load_padded_tokenizer

        quiet_libraries()
        self.task = str(meta.get("task"))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_padded_tokenizer(model_dir)
        self.model = _load_causal_lm(model_dir, meta).to(self.device).eval()
        eos = {int(i) for i in meta.get("eos_token_ids") or []}
        if self.task == "sft":
            eos |= end_of_turn_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None))
        # None: lmtune.generation.generate falls back to the model's generation config.
        self.eos_token_ids: list[int] | None = sorted(eos) or None
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.positions: int | None = int(positions) if positions else None
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None)
        if not tokenizer_max or tokenizer_max > 1_000_000:  # transformers' "no limit" is a huge number
            tokenizer_max = None
        # The longest sequence the model was trained on (lmtune.json), else what the tokenizer says.
        self.max_length = int(meta.get("max_length") or tokenizer_max or self.positions or 2048)

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer can render chat messages."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def require_chat(self) -> None:
        """Raise ModelError unless this model can hold a conversation (an sft model with a chat template)."""
        if self.task == "causal_lm":
            raise ModelError("chat needs an instruction-tuned (sft) model; this one was trained on raw text "
                             "(task causal_lm) and continues text rather than answering",
                             hint="continue prompts with `lmtune predict RUN -i prompts.jsonl -o out.jsonl` "
                             "or run.generate(prompts)")
        if not self.has_chat_template:
            raise ModelError("the model has no chat template, so a conversation cannot be turned into a prompt",
                             hint="chat needs an instruction-tuned (sft) model; use `lmtune predict` for "
                             "plain-text prompts")

    def render(self, prompt: str) -> str:
        """The text the model sees for a prompt: a user message in the chat template (sft), else the prompt."""
        from lmtune.models.generation import chat_prompt

        if self.task == "sft":
            return chat_prompt(self.tokenizer, [{"role": "user", "content": prompt}])
        return prompt

    def count_tokens(self, rendered: str) -> int:
        """Tokens of a rendered prompt, counted as :func:`lmtune.generation.generate` encodes it."""
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and rendered.startswith(bos))  # a chat template may write the BOS itself
        return len(self.tokenizer(rendered, add_special_tokens=add_special)["input_ids"])

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Most prompt tokens: the trained length, and room for the answer within the model's positions."""
        budget = self.max_length
        if self.positions is not None and self.positions > max_new_tokens:
            budget = min(budget, self.positions - max_new_tokens)
        return budget

    def too_long_message(self, tokens: int, max_new_tokens: int) -> str:
        """Why a prompt of ``tokens`` tokens cannot be answered."""
        return (f"the prompt is {tokens} tokens; with max_new_tokens {max_new_tokens} it does not fit the "
                f"model's {self.positions} positions")

    def check_lengths(self, rendered: list[str], max_new_tokens: int, *,
                      raise_error: bool = True) -> list[tuple[int, int]]:
        """(index, tokens) of the prompts whose answer would run past the model's positions; raises a
        DataError naming the first unless ``raise_error`` is False."""
        if self.positions is None:
            return []
        too_long = [(i, n) for i, n in enumerate(map(self.count_tokens, rendered)) if n + max_new_tokens > self.positions]
        if too_long and raise_error:
            i, n = too_long[0]
            raise DataError(f"prompt {i + 1}: {self.too_long_message(n, max_new_tokens)}", field="prompts",
                            hint="shorten the prompt or lower max_new_tokens")
        return too_long

    def generate(self, rendered: list[str], settings: GenerationSettings, *, progress: Any = None) -> list[dict[str, Any]]:
        """:func:`lmtune.generation.generate` on rendered prompts, stopping at this model's EOS ids."""
        from lmtune.models.generation import generate

        return generate(self.model, self.tokenizer, rendered, settings, progress=progress,
                        eos_token_ids=self.eos_token_ids)

    def stream(self, messages: list[dict[str, str]], settings: GenerationSettings) -> Generator[str, None, None]:
        """:func:`lmtune.generation.stream_chat`: the answer to ``messages`` in pieces, as generated."""
        from lmtune.models import generation

        stream = generation.stream_chat(self.model, self.tokenizer, messages, settings,
                                        eos_token_ids=self.eos_token_ids)
        return cast("Generator[str, None, None]", stream)  # a generator function; closing it stops generation


def _load_causal_lm(model_dir: Path, meta: dict[str, Any]) -> Any:
    """The model folder as a float32 causal LM; an adapter-only folder is applied to its base and merged."""
    from transformers import AutoModelForCausalLM

    try:
        if not (model_dir / "config.json").is_file() and (model_dir / "adapter_config.json").is_file():
            from peft import PeftModel

            base_path = meta.get("base_model_path")
            if not base_path:
                raise ModelError("the model folder holds only an adapter and lmtune.json names no base model",
                                 file=model_dir, field="base_model_path")
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
            return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload()
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model for generation: {exc}", file=model_dir) from None


class ChatSession:
    """A conversation with an sft model kept across turns: what ``lmtune chat`` drives.

    :meth:`ask` adds the user's message, dropping the oldest user/assistant exchanges (never the system
    message) until the rendered prompt fits :meth:`TextGenerator.prompt_budget`; :meth:`answer` streams
    the reply and keeps the exchange in the history.
    """

    def __init__(self, generator: TextGenerator, settings: GenerationSettings, *, system: str | None = None) -> None:
        self.generator = generator
        self.settings = settings
        self.system: str | None = None
        self.set_system(system)
        self.history: list[dict[str, str]] = []  # user/assistant messages, alternating
        self.budget = generator.prompt_budget(settings.max_new_tokens)
        self._pending: dict[str, str] | None = None

    def set_system(self, text: str | None) -> None:
        """Set the system prompt (None or blank: none)."""
        self.system = text.strip() if text and text.strip() else None

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()
        self._pending = None

    def messages(self, extra: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The conversation as the model sees it: system message, history, then ``extra``."""
        return self._with_system(self.history + (extra or []))

    def _with_system(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def prompt_tokens(self, turns: list[dict[str, str]]) -> int:
        """Tokens of the rendered prompt for ``turns`` after the system message."""
        from lmtune.models.generation import chat_prompt

        return self.generator.count_tokens(chat_prompt(self.generator.tokenizer, self._with_system(turns)))

    def ask(self, text: str) -> int:
        """Queue the user's message for :meth:`answer`; returns how many old exchanges were dropped to fit.

        A message that does not fit even alone (with the system prompt) is a DataError; the history is
        then left as it was.
        """
        if not text.strip():
            raise DataError("the message is empty")
        user = {"role": "user", "content": text}
        history = list(self.history)
        dropped = 0
        while history and self.prompt_tokens([*history, user]) > self.budget:
            del history[:2]  # the oldest exchange: a user message and its answer
            dropped += 1
        tokens = self.prompt_tokens([*history, user])
        if tokens > self.budget:
            raise DataError(f"the message is too long: the prompt would be {tokens} tokens, the model takes "
                            f"{self.budget}", hint="send a shorter message" + (" or a shorter /system prompt"
                                                                           if self.system else ""))
        self.history = history
        self._pending = user
        return dropped

    def answer(self) -> Generator[str, None, None]:
        """Stream the answer to the message given to :meth:`ask`; the exchange joins the history when the
        stream ends, also when it is closed early (the answer so far is kept), not when generation fails."""
        if self._pending is None:
            raise RuntimeError("ChatSession.answer() needs a message from ask() first")
        user, self._pending = self._pending, None
        pieces: list[str] = []
        failed = False
        stream = self.generator.stream(self.messages([user]), self.settings)
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        except Exception:
            failed = True
            raise
        finally:
            stream.close()  # stops the generation thread when the reader stopped early
            if not failed:
                self.history += [user, {"role": "assistant", "content": "".join(pieces).strip()}]

    def send(self, text: str) -> str:
        """:meth:`ask` and the whole of :meth:`answer`, as one string."""
        self.ask(text)
        return "".join(self.answer())


# ------------------------------------------------------------------------------------------ helpers
def validate_prompt_messages(value: Any, *, source: str, line: int | None, field: str) -> list[dict[str, str]]:
    """A conversation awaiting the assistant's answer, validated: an optional system message, then
    user/assistant turns alternating, ending with a user message. OpenAI layout (``role``/``content``);
    JSON text (a CSV cell) is parsed. Problems are DataErrors naming ``source``, ``line`` and ``field``."""
    from lmtune.data.chat import to_messages

    def fail(message: str) -> DataError:
        return DataError(message, file=source, line=line, field=field)

    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise fail(f"the messages are not valid JSON: {exc.msg} (character {exc.pos})") from None
    if isinstance(value, list):
        if not value:
            raise fail("the conversation has no messages")
        last = value[-1]
        role = last.get("role") if isinstance(last, dict) else None
        if isinstance(role, str) and role.strip().lower() in ("assistant", "system"):
            raise fail(f"the conversation must end with a user message (the answer is generated); the last, "
                       f"message {len(value)} (index {len(value) - 1}), is {role.strip().lower()!r}")
        # to_messages checks a training record, which ends with an answer: give it a stand-in one.
        value = [*value, {"role": "assistant", "content": "-"}]
    messages = to_messages({field: value}, "openai", {"messages": field}, source=source, line=cast(int, line))
    return messages[:-1]


def _prompt_text(value: Any, source: str, line: int, column: str, task: str) -> str:
    """One prompt cell as text, or a DataError naming where it is."""
    if isinstance(value, str) and value.strip():
        return value
    if value is None or isinstance(value, str) or (isinstance(value, float) and np.isnan(value)):
        raise DataError("empty prompt", file=source, line=line, field=column)
    hint = None
    if isinstance(value, list) and task == "causal_lm":
        hint = "a causal_lm model continues plain text; chat messages need an sft run"
    raise DataError(f"expected text, found {type(value).__name__}", file=source, line=line, field=column, hint=hint)


def _write_generated(out: Path, table: Table, results: list[dict[str, Any]]) -> None:
    """Input rows plus the generated columns, written atomically as JSONL, CSV or TSV."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    rows = [{**row, "generated": r["text"], **{k: r[k] for k in GENERATED_COLUMNS[1:]}}
            for row, r in zip(table.rows, results, strict=True)]
    try:
        if out.suffix.lower() in _JSONL_SUFFIXES:
            with tmp.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            columns = [c for c in table.columns if c not in GENERATED_COLUMNS] + list(GENERATED_COLUMNS)
            with tmp.open("w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, delimiter="\t" if out.suffix.lower() == ".tsv" else ",")
                writer.writerow(columns)
                for row in rows:
                    writer.writerow([_cell(row.get(c)) for c in columns])
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def _cell(value: Any) -> Any:
    """A CSV cell: lists and objects (chat messages) as JSON text."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value
