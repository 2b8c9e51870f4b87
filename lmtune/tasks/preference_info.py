"""The facts the preference task folders (dpo, orpo, simpo, kto) share in their ``TaskInfo``.

Light on purpose (no torch): the task folders' ``info`` modules import it when lmtune starts.
"""

from __future__ import annotations

from typing import Any

from lmtune.config.tasks import TaskInfo

PAIR_READS = ("preference pairs: prompt/chosen/rejected as text or message lists, or chosen/rejected whole "
              "conversations with a shared start (data.columns renames them)")
PAIR_USAGE = ('from transformers import pipeline\n\nchat = pipeline("text-generation", model="{name}")\n'
              'messages = [{{"role": "user", "content": "Hello!"}}]\n'
              'print(chat(messages, max_new_tokens=128)[0]["generated_text"][-1]["content"])')
PAIR_HEADLINE = (("accuracy", "preference accuracy"), ("reward_margin", "reward margin"),
                 ("logp_accuracy", "prefers chosen (log-prob)"), ("prefers_chosen", "answers like chosen"),
                 ("rouge_l", "ROUGE-L vs chosen"), ("stopped_fraction", "stops by itself"), ("loss", "loss"))
PAIR_CARD_METRICS = ("accuracy", "reward_margin", "logp_accuracy", "prefers_chosen", "rouge_l", "stopped_fraction",
                     "loss")


def check_pair_task(config: Any) -> None:
    """Config checks of the pair tasks (``TaskInfo.check``): ValueError naming the keys."""
    task = config.task
    if config.data.packing:
        raise ValueError(f"data.packing does not apply to task {task}: a pair's two answers go through the model "
                         "together, padded to each other (length grouping keeps the padding low)")
    if config.model.init != "pretrained":
        raise ValueError(f"task {task} tunes a pretrained (ideally instruction-tuned) model: model.init must be "
                         "pretrained")
    if config.data.streaming:
        raise ValueError(f"data.streaming does not apply to task {task}: pairs are read whole")
    pref = config.preference
    # Keys given a value other than their default (a saved config.yaml spells out every default).
    set_keys = {key for key, spec in type(pref).model_fields.items() if getattr(pref, key) != spec.default}
    if "loss" in set_keys and task != "dpo":
        raise ValueError(f"preference.loss chooses among DPO's losses (task dpo), not task {task}'s")
    if "gamma_beta_ratio" in set_keys and task != "simpo":
        raise ValueError(f"preference.gamma_beta_ratio is SimPO's target margin (task simpo), not task {task}'s")
    if set_keys & {"desirable_weight", "undesirable_weight"} and task != "kto":
        raise ValueError(f"preference.desirable_weight and undesirable_weight weigh KTO's examples (task kto), not "
                         f"task {task}'s pairs")
    if pref.label_smoothing and (task in ("orpo", "kto") or (task == "dpo" and pref.loss not in ("sigmoid", "robust"))):
        raise ValueError("preference.label_smoothing applies to dpo with preference.loss sigmoid or robust, and to "
                         f"simpo; not to {task}" + (f" with loss {pref.loss}" if task == "dpo" else ""))


def pair_task_info(name: str, summary: str) -> TaskInfo:
    """The ``TaskInfo`` of a pair task (dpo, orpo, simpo): all that differs between them is the name and summary."""
    return TaskInfo(
        name=name,
        summary=summary,
        reads=PAIR_READS,
        default_metric="accuracy",
        auto_class="AutoModelForCausalLM",
        pipeline_tag="text-generation",
        usage=PAIR_USAGE,
        headline_metrics=PAIR_HEADLINE,
        comparison_metric="logp_accuracy",
        card_metrics=PAIR_CARD_METRICS,
        decoder=True,
        chat=True,
        generates=True,
        exports=("merged", "gguf"),
        endpoints=("/v1/chat/completions", "/v1/completions"),
        check=check_pair_task,
        bundled_data=("chatterbot_pairs",),
        card_limitation="Preference tuning moves the model towards the chosen answers of its pairs and away from "
                        "the rejected ones; it inherits every bias and error of those judgements, and a model tuned "
                        "on few pairs can lose skills the pairs never exercised.",
    )
