"""What the rest of lmtune knows about the grpo task without running it (see ``TaskInfo``)."""

from __future__ import annotations

from typing import Any

from lmtune.config.tasks import TaskInfo
from lmtune.tasks.grpo.rewards import BUILTIN_REWARDS, check_reward_names

USAGE = ('from transformers import pipeline\n\nchat = pipeline("text-generation", model="{name}")\n'
         'messages = [{{"role": "user", "content": "What is 17 + 25? Answer with the number only."}}]\n'
         'print(chat(messages, max_new_tokens=128)[0]["generated_text"][-1]["content"])')


def check_grpo_config(config: Any) -> None:
    """Config checks of ``task: grpo`` (``TaskInfo.check``): ValueError naming the keys."""
    g = config.grpo
    if not g.rewards and not g.reward_model:
        raise ValueError("task grpo learns from rewards: list grpo.rewards (built-ins: "
                         f"{', '.join(BUILTIN_REWARDS)}; or module:function) and/or set grpo.reward_model")
    check_reward_names(list(g.rewards))
    count = len(g.rewards) + (1 if g.reward_model else 0)
    if g.reward_weights is not None and len(g.reward_weights) != count:
        raise ValueError(f"grpo.reward_weights has {len(g.reward_weights)} weights for {count} rewards (one per "
                         "entry of grpo.rewards, then one for grpo.reward_model)")
    if config.data.packing:
        raise ValueError("data.packing does not apply to task grpo: its rows are prompts, answered by sampling")
    if config.data.streaming:
        raise ValueError("data.streaming does not apply to task grpo: prompts are read whole")
    if config.model.init != "pretrained":
        raise ValueError("task grpo tunes a pretrained (ideally instruction-tuned) model: model.init must be "
                         "pretrained")
    strategy = config.train.distributed.strategy
    if strategy != "ddp":
        raise ValueError(f"task grpo samples answers on each process on its own; train.distributed.strategy "
                         f"{strategy} shards the weights, which sampling would need in lock-step: use ddp")
    if config.generation.stop:
        raise ValueError("generation.stop does not apply to task grpo: its answers end at the end-of-turn token or at "
                         "generation.max_new_tokens, in training and evaluation alike (a reward can judge the rest)")
    if config.generation.num_beams != 1:
        raise ValueError("generation.num_beams: task grpo samples its answers (and evaluates greedy ones); beam "
                         "search does not apply")


INFO = TaskInfo(
    name="grpo",
    summary="online reinforcement learning (GRPO): answers sampled for each prompt are scored by reward functions "
            "or a reward model, and each is reinforced by how much better than its group it scored",
    reads="prompts: `prompt` as text or a message list ending with a user message (data.columns renames it); the "
          "other columns reach the reward functions (grpo.rewards: module:function, or built-in "
          f"{', '.join(BUILTIN_REWARDS)}; an `answer` column for the first two)",
    default_metric="reward",
    auto_class="AutoModelForCausalLM",
    pipeline_tag="text-generation",
    usage=USAGE,
    headline_metrics=(("reward", "mean reward"), ("stopped_fraction", "stops by itself"),
                      ("mean_answer_tokens", "answer tokens"), ("loss", "loss")),
    comparison_metric="reward",
    card_metrics=("reward", "stopped_fraction", "mean_answer_tokens", "loss"),
    decoder=True,
    chat=True,
    generates=True,
    exports=("merged", "gguf"),
    endpoints=("/v1/chat/completions", "/v1/completions"),
    check=check_grpo_config,
    bundled_data=("arithmetic",),
    card_limitation="Reinforcement from rewards makes the model better at what the rewards measure, which is not "
                    "always what was meant: it can find answers that score well without being right (reward "
                    "hacking), and a small model tuned on few prompts can lose skills the prompts never exercised.",
)
