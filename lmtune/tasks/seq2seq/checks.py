"""Load-time checks of a seq2seq config (light: no torch, run whenever a config is validated)."""

from __future__ import annotations

from lmtune.config.schema import Config
from lmtune.config.tasks import RULE_BASELINES


def check_config(cfg: Config) -> None:
    """Load-time checks of a seq2seq config (``TaskInfo.check``, run by the config schema); ValueError names the keys."""
    d = cfg.data
    if d.seq2seq_task == "translation" and not (d.source_language and d.target_language):
        raise ValueError("data.seq2seq_task translation needs data.source_language and data.target_language "
                         "(e.g. English, Italian)")
    leads = [b for b in cfg.baselines if b in RULE_BASELINES]
    # The task's default (both) gives no rows for translation; naming one of them is a mistake worth saying.
    if leads and d.seq2seq_task != "summarization" and leads != list(RULE_BASELINES):
        raise ValueError(f"baselines {leads}: the lead-N baselines summarize a document by its first sentences, "
                         f"which does not apply to data.seq2seq_task {d.seq2seq_task}; set baselines: []")
    if d.source_column == d.target_column:
        raise ValueError(f"data.source_column and data.target_column are both '{d.source_column}'")
    if d.prompt_template is not None:
        if "{source}" not in d.prompt_template:
            raise ValueError("data.prompt_template must contain {source}, where the source text goes")
        try:
            d.prompt_template.format(source="", source_language="", target_language="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"data.prompt_template: only {{source}}, {{source_language}} and {{target_language}} "
                             f"can be filled in ({exc!r}); write other braces doubled, {{{{ and }}}}") from None
