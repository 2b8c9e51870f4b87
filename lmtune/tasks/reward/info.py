"""What the rest of lmtune knows about the reward task without running it (see ``TaskInfo``)."""

from __future__ import annotations

from typing import Any

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.preference_info import PAIR_READS, check_pair_task

# How a saved reward model scores an answer with plain transformers: the conversation rendered by the chat
# template saved with it, exactly as lmtune renders it in training and in `lmtune predict`.
USAGE = ('import torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n'
         'tok = AutoTokenizer.from_pretrained("{name}")\n'
         'model = AutoModelForSequenceClassification.from_pretrained("{name}")\n'
         'messages = [{{"role": "user", "content": "Hello!"}}, {{"role": "assistant", "content": "Hi! How can I help?"}}]\n'
         'ids = tok.apply_chat_template(messages, return_tensors="pt", return_dict=True)\n'
         'with torch.no_grad():\n'
         '    print(model(**ids).logits[0, 0].item())  # higher: a better answer')


def check_reward_config(config: Any) -> None:
    """Config checks of ``task: reward`` (``TaskInfo.check``): the pair tasks' checks, and the preference
    settings a reward model has no use for; ValueError naming the keys."""
    check_pair_task(config)
    pref = config.preference
    # Values other than the defaults (a saved config.yaml spells out every default, so "set" cannot tell).
    unused = [key for key, given in (("beta", pref.beta is not None), ("label_smoothing", pref.label_smoothing != 0))
              if given]
    if unused:
        raise ValueError(f"{' and '.join('preference.' + key for key in unused)}: not used by task reward, whose loss is "
                         "the plain Bradley-Terry -log sigmoid(r_chosen - r_rejected), as TRL's RewardTrainer")


INFO = TaskInfo(
    name="reward",
    summary="reward models: a score per (prompt, answer), trained so the chosen answer of each preference pair "
            "scores above the rejected one (Bradley-Terry loss); answers POST /v1/score",
    reads=PAIR_READS,
    default_metric="accuracy",
    auto_class="AutoModelForSequenceClassification",
    pipeline_tag="text-classification",
    usage=USAGE,
    headline_metrics=(("accuracy", "pair accuracy"), ("margin", "mean margin"), ("loss", "loss")),
    comparison_metric="accuracy",
    card_metrics=("accuracy", "margin", "chosen_reward", "rejected_reward", "loss"),
    exports=("merged",),
    endpoints=("/v1/score",),
    check=check_reward_config,
    bundled_data=("chatterbot_pairs",),
    starting_point_name="before training (new head)",
    card_limitation="The score ranks answers as the training pairs ranked them: it is not a calibrated "
                    "probability, it inherits every bias of those judgements (length, style), and it can be gamed "
                    "by answers unlike any it was trained on.",
)
