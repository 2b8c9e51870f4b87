"""The causal_lm task."""
