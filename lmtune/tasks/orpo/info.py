"""What the rest of lmtune knows about the orpo task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.preference_info import (
    PAIR_CARD_METRICS,
    PAIR_HEADLINE,
    PAIR_READS,
    PAIR_USAGE,
    check_pair_task,
)

INFO = TaskInfo(
    name="orpo",
    summary="odds-ratio preference optimisation: supervised tuning on the chosen answers plus a "
            "preference for them over the rejected ones, in one loss without a reference model",
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
    endpoints=("/v1/chat/completions", "/v1/completions"),
    check=check_pair_task,
    bundled_data=("chatterbot_pairs",),
    card_limitation="Preference tuning moves the model towards the chosen answers of its pairs and away from the "
                    "rejected ones; it inherits every bias and error of those judgements, and a model tuned on few "
                    "pairs can lose skills the pairs never exercised.",
)
