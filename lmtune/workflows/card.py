"""The model card: a README.md beside the weights, in the Hugging Face format (YAML front matter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmtune.config import Config


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


_PIPELINE = {"classification": "text-classification", "sft": "text-generation", "causal_lm": "text-generation"}
_PIPELINE["token_classification"] = "token-classification"
_PIPELINE["seq2seq"] = "text2text-generation"
_PIPELINE["question_answering"] = "question-answering"
_CARD_METRICS = {
    "classification": ("accuracy", "macro_f1", "weighted_f1", "loss"),
    "sft": ("exact_match", "token_f1", "rouge_l", "chrf", "bleu", "stopped_fraction", "loss", "perplexity"),
    "causal_lm": ("perplexity", "loss"),
    "token_classification": ("f1", "precision", "recall", "macro_f1", "token_accuracy", "loss"),
    "seq2seq": ("rouge1", "rouge2", "rouge_l", "rouge_lsum", "bleu", "chrf", "stopped_fraction", "loss"),
    "question_answering": ("f1", "exact_match", "has_answer_f1", "no_answer_f1", "loss"),
}


def _usage(cfg: Config, name: str) -> list[str]:
    if cfg.task == "sft":
        return [
            "from transformers import pipeline", "",
            f'chat = pipeline("text-generation", model="{name}")',
            'messages = [{"role": "user", "content": "Hello!"}]',
            'print(chat(messages, max_new_tokens=128)[0]["generated_text"][-1]["content"])',
        ]
    if cfg.task == "question_answering":
        return [
            "from transformers import pipeline", "",
            f'qa = pipeline("question-answering", model="{name}")',
            'print(qa(question="Who wrote it?", context="Ada Lovelace wrote the first program."))',
            "# lmtune predict also applies the no-answer threshold tuned in training (lmtune.json)",
        ]
    if cfg.task == "token_classification":
        return [
            "from transformers import pipeline", "",
            f'ner = pipeline("token-classification", model="{name}", aggregation_strategy="simple")',
            'print(ner("an example sentence"))  # lmtune predict splits words as in training (exact offsets)',
        ]
    if cfg.task == "seq2seq":
        return [
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # decoder route: AutoModelForCausalLM",
            "", f'tok = AutoTokenizer.from_pretrained("{name}")',
            f'model = AutoModelForSeq2SeqLM.from_pretrained("{name}")',
            'ids = tok(["a source text"], return_tensors="pt")',
            "print(tok.batch_decode(model.generate(**ids), skip_special_tokens=True))",
        ]
    if cfg.task == "causal_lm":
        return [
            "from transformers import pipeline", "",
            f'generate = pipeline("text-generation", model="{name}")',
            'print(generate("It is a truth universally acknowledged", max_new_tokens=50)[0]["generated_text"])',
        ]
    # A neural baseline's model type is lmtune's own: importing lmtune.tasks registers it with transformers.
    register = ["import lmtune.tasks  # registers model_type lmtune_baseline"] if cfg.model.name.startswith(
        "baseline:") else []
    return [*register, "from transformers import pipeline", "",
            f'clf = pipeline("text-classification", model="{name}")', 'clf("an example sentence")']


def write_model_card(folder: Path, cfg: Config, meta: dict[str, Any], metrics: dict[str, Any],
                     data_info: dict[str, Any]) -> Path:
    """Write ``README.md``: what the model is, how it was trained, how well it does, how to use it."""
    test = metrics.get("test") or metrics.get("validation") or {}
    split = "test" if metrics.get("test") else "validation"
    keys = _CARD_METRICS.get(cfg.task, ("loss",))
    front = {
        "library_name": "transformers",
        "pipeline_tag": _PIPELINE.get(cfg.task, cfg.task),
        # A neural baseline starts from no pretrained model (the Hub field names one).
        "base_model": None if str(meta.get("base_model")).startswith("baseline:") else meta.get("base_model"),
        "tags": ["lmtune", cfg.task, cfg.method.name],
        "model-index": [{
            "name": Path(cfg.output_dir).name,
            "results": [{
                "task": {"type": _PIPELINE.get(cfg.task, cfg.task)},
                "dataset": {"name": str(cfg.data.train), "type": "custom", "split": split},
                "metrics": [{"type": k, "value": float(test[k])} for k in keys[:3] if k in test],
            }],
        }],
    }
    summary = metrics.get("summary", {})
    start: dict[str, Any] = next(iter(metrics.get("starting_point", {}).values()), {})
    labels = meta.get("labels") or []
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {Path(cfg.output_dir).name}", "",
        f"A `{meta.get('base_model')}` model fine-tuned with [lmtune](https://github.com/) for **{cfg.task}** "
        f"({cfg.method.name} fine-tuning" + (", LoRA merged into the weights" if meta.get("saved_as") == "merged" else "")
        + ").", "",
        "## Results", "",
        f"| metric ({split}) | this model | starting point |", "|---|---|---|",
    ]
    for k in keys:
        if k in test:
            lines.append(f"| {k} | {_fmt(test[k])} | {_fmt(start.get(k, '–'))} |")
    lines += [
        "", "## Training", "",
        f"- data: `{cfg.data.train}`; train/validation/test examples: "
        + ", ".join(str(data_info.get(s, {}).get("examples", "–")) for s in ("train", "validation", "test")),
        *([f"- labels ({len(labels)}): " + ", ".join(f"`{x}`" for x in labels[:50])] if labels else []),
        *([f"- chat template: {'the base model' + chr(39) + 's own' if meta.get('chat_template') == 'model' else 'lmtune default (ChatML)'}; "
           f"loss on {meta.get('train_on')} tokens; generation stops at token ids {meta.get('eos_token_ids')}"]
          if cfg.task == "sft" else []),
        *([f"- route: {meta.get('route_description')}; job: {meta.get('seq2seq_task')}"
           + (f" ({meta.get('source_language')} -> {meta.get('target_language')})" if meta.get("source_language") else "")
           + (f"; prompt `{meta.get('prompt_template')!r}`" if meta.get("prompt_template") else "")]
          if cfg.task == "seq2seq" else []),
        f"- max length {cfg.data.max_length} tokens; {summary.get('steps', '–')} optimizer steps, "
        f"batch {cfg.train.batch_size} x accumulation {cfg.train.gradient_accumulation}, "
        f"learning rate {cfg.train.learning_rate:g} ({cfg.train.schedule}), precision {summary.get('precision', '–')}",
        f"- trainable parameters: {summary.get('trainable_parameters', 0):,} of {summary.get('total_parameters', 0):,}",
        "", "## Use", "", "```python",
        *_usage(cfg, folder.name if folder.name != ".model.tmp" else "model"), "```", "",
        "or `lmtune predict RUN --input FILE --output predictions.jsonl`"
        + (" and `lmtune chat RUN`" if cfg.task == "sft" else "") + ".", "",
        "## Limitations", "",
        "Scores hold for data like the training data; check on your own examples before relying on it.",
        "The labels come from the training file: the model cannot predict a label it never saw."
        if cfg.task == "classification" else
        "A small model tuned on little data repeats its training data's style and facts, and can state wrong "
        "things fluently.", "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
