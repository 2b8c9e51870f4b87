"""Instruction and chat fine-tuning (supervised fine-tuning, SFT) of a decoder: ``task: sft``.

The data preparation, loss, generation scores and saving are the chat tuning shared with ``seq2seq``'s
decoder route (:mod:`lmtune.tasks.chat_tuning`); this module adds what is SFT's own: its ``TaskInfo``,
its report section, and its ``lmtune data inspect`` report (:mod:`lmtune.tasks.sft.inspect`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from lmtune.config.tasks import TaskInfo
from lmtune.evaluate.report import Report
from lmtune.tasks.base import TaskData
from lmtune.tasks.chat_tuning import ChatTuningTask, cell
from lmtune.tasks.decoder import refuse_streaming
from lmtune.tasks.sft.info import INFO
from lmtune.tasks.sft.inspect import inspect_sft, render_sft


class SFTTask(ChatTuningTask):
    """Supervised fine-tuning on conversations, loss on the assistant's turns."""

    info: ClassVar[TaskInfo] = INFO

    # ------------------------------------------------------------------------------ report and inspect
    def report_sections(self, report: Report, run_dir: Path, metrics: dict[str, Any], data: TaskData) -> None:
        """Generation scores before and after, and example answers side by side."""
        start = metrics.get("starting_point", {})
        split = "test" if "test" in metrics else "validation"
        tuned, base = metrics.get(split, {}), start.get(split, {})
        if "rouge_l" not in tuned:
            return
        report.heading(f"Generation on the {split} split", 3)
        keys = ["exact_match", "token_f1", "rouge_l", "chrf", "bleu", "stopped_fraction", "mean_generated_words",
                "loss", "perplexity"]
        report.table(["metric", "starting model", "tuned model"],
                     [[k, base.get(k), tuned.get(k)] for k in keys if k in tuned])
        report.paragraph(f"{tuned.get('generated_examples')} held-out prompts, {self.config.generation.max_new_tokens} "
                         f"new tokens at most, {'sampled' if self.config.generation.do_sample else 'greedy'}. "
                         "`stopped_fraction`: answers that ended with the end-of-turn token (not cut by the limit).")
        before = {e["prompt"]: e for e in base.get("examples", [])}
        rows = []
        for e in tuned.get("examples", []):
            b = before.get(e["prompt"], {})
            rows.append([_last_user(e["prompt"]), e["reference"], b.get("generated", "–"), e["generated"]])
        if rows:
            report.heading("Example answers", 3)
            report.table(["prompt", "reference", "starting model", "tuned model"], [[cell(c) for c in r] for r in rows])

    def inspect(self, source: str | None, *, examples: int = 3) -> dict[str, Any] | None:
        """The conversations as the model will see them (see :func:`lmtune.tasks.sft.inspect.inspect_sft`)."""
        refuse_streaming(self.config)
        return inspect_sft(self, source, examples=examples)

    def render_inspection(self, report: dict[str, Any], console: Any) -> bool:
        """Print :meth:`inspect`'s report as tables."""
        render_sft(report, console)
        return True


def _last_user(prompt: str) -> str:
    """The last user message of a rendered ChatML-like prompt, for display (the whole prompt otherwise)."""
    marker = "user\n"
    i = prompt.rfind(marker)
    if i < 0:
        return prompt[-200:]
    text = prompt[i + len(marker):]
    for end in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        text = text.split(end)[0]
    return text.strip()
