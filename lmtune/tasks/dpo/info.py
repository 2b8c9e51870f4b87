"""What the rest of lmtune knows about the dpo task without running it (see ``TaskInfo``)."""

from lmtune.tasks.preference_info import pair_task_info

INFO = pair_task_info(
    "dpo",
    "direct preference optimisation: the model learns to prefer the chosen answer of each pair over the "
    "rejected one, relative to its starting point (preference.loss: sigmoid, ipo, hinge, robust)",
)
