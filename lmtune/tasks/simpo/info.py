"""What the rest of lmtune knows about the simpo task without running it (see ``TaskInfo``)."""

from lmtune.tasks.preference_info import pair_task_info

INFO = pair_task_info(
    "simpo",
    "simple preference optimisation: the chosen answer's mean log-probability must beat the "
    "rejected one's by a margin, without a reference model",
)
