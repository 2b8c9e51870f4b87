"""What the rest of lmtune knows about the kto task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.preference_info import PAIR_USAGE, check_pair_task

INFO = TaskInfo(
    name="kto",
    summary="Kahneman-Tversky optimisation: the model learns from single answers judged desirable or undesirable "
            "(no pairs needed), relative to its starting point",
    reads="prompt, completion and label columns (label: true/false, 1/0 or desirable/undesirable; data.columns "
          "renames them); prompt and completion as text or message lists",
    default_metric="accuracy",
    auto_class="AutoModelForCausalLM",
    pipeline_tag="text-generation",
    usage=PAIR_USAGE,
    headline_metrics=(("accuracy", "judged right"), ("reward_margin", "reward margin"),
                      ("desirable_reward", "desirable reward"), ("undesirable_reward", "undesirable reward"),
                      ("rouge_l", "ROUGE-L vs desirable"), ("stopped_fraction", "stops by itself"), ("loss", "loss")),
    comparison_metric="rouge_l",
    card_metrics=("accuracy", "reward_margin", "desirable_reward", "undesirable_reward", "rouge_l",
                  "stopped_fraction", "loss"),
    decoder=True,
    chat=True,
    generates=True,
    exports=("merged", "gguf"),
    endpoints=("/v1/chat/completions", "/v1/completions"),
    check=check_pair_task,
    bundled_data=("chatterbot_kto",),
    card_limitation="KTO moves the model towards the answers judged desirable and away from the others; it "
                    "inherits every bias and error of those judgements.",
)
