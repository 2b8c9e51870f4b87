"""What the rest of lmtune knows about the orpo task without running it (see ``TaskInfo``)."""

from lmtune.tasks.preference_info import pair_task_info

INFO = pair_task_info(
    "orpo",
    "odds-ratio preference optimisation: supervised tuning on the chosen answers plus a "
    "preference for them over the rejected ones, in one loss without a reference model",
)
