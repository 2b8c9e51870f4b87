"""The one training loop, its checkpoints and its precision choice."""
